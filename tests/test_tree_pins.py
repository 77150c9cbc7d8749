"""Pins for tree records, result files, record logs, tree plots and live trees that a mutation
review found unpinned elsewhere.

No model, no search: hand-built Steps and Trees, so the whole file runs in about a second on one
CPU. What is pinned: a chosen candidate at index 0 is chosen (text and result JSON); a Step cut
at the length limit is terminal, and one whose token_logprobs are longer or shorter than its
token_ids is refused; `Tree.add_path` gives each node its own score and `Tree.add` under a parent
one past the last node is a ValueError naming it; `Candidate.num_tokens` counts every step;
`split_steps` keeps a run of separators that ends at `</think>` in one step and does not swallow
half a separator; the record log passes over a blank line without losing a byte, and refuses a
NUL line before good rows without touching the file; the tree plot's markers (eos square, length
X) and its [0, 1] colour scale when a score is exactly 0; a result file with an out-of-range
chosen / chosen_node, a misnumbered or doubly-listed node, an unknown live state, or a bool score
or chosen is refused; a live tree's held final result is written once (the next problem's rounds
follow), a newly followed problem's first round is written at once, and SIGTERM reads
"terminated".

Run: `.venv/bin/python -m pytest tests/test_tree_pins.py`
"""
from __future__ import annotations

import json

import pytest

from experiments import live_tree
from experiments.cli_errors import Terminated
from experiments.live_tree import LiveTree, stop_reason
from experiments.record_log import RecordLogError, append_rows, load_rows
from experiments.result_json import ResultFileError, load_result, result_from_json, result_to_json
from experiments.tree_plot import node_marker, score_range
from test_steps_tree import _tree
from treesearch.compute import Compute
from treesearch.records import Prefix, Problem, Step
from treesearch.result import Candidate, SearchResult
from treesearch.steps import StepFormat, split_steps
from treesearch.tree import Tree


def one_answer_result() -> SearchResult:
    """A Best-of-N result of one candidate (node 1), chosen: index 0."""
    problem = Problem("p", "1+1?", "2")
    tree = Tree(problem)
    step = Step("Answer: 2", (5,), (-0.1,), "eos")
    leaf = tree.add(0, step, score=0.9)
    return SearchResult(problem, "best_of_n", {}, (Candidate((step,), (0.9,), 0.9, leaf),), 0, tree, Compute())


def two_candidate_json() -> dict:
    """The result JSON of tests/test_steps_tree.py's tree (root; 1 "a" -> 2 "b"; 3 "c") with
    candidates at nodes 2 and 3, the first chosen."""
    tree = _tree()
    cands = (Candidate(tree.path(2), (0.7, 0.4), 0.4, 2), Candidate(tree.path(3), (0.1,), 0.1, 3))
    return result_to_json(SearchResult(tree.problem, "beam_search", {}, cands, 0, tree, Compute()))


def fake_clock(monkeypatch) -> list[float]:
    """live_tree's monotonic clock, as a list whose [0] the test sets."""
    clock = [0.0]
    monkeypatch.setattr(live_tree.time, "monotonic", lambda: clock[0])
    return clock


def bare_result(problem: Problem) -> SearchResult:
    return SearchResult(problem, "mcts", {}, (), None, Tree(problem), Compute())


# -- records, results, trees ------------------------------------------------------------------------


def test_a_candidate_chosen_at_index_0_is_the_chosen_one():
    result = one_answer_result()
    assert result.chosen == 0
    # pins: `chosen is None`, not falsiness: index 0 is a choice
    assert result.chosen_candidate is result.candidates[0]
    assert result.chosen_text == "Answer: 2"
    data = result_to_json(result)
    assert data["chosen"] == 0 and data["chosen_node"] == result.candidates[0].node_id == 1


def test_a_step_cut_at_the_length_limit_is_terminal():
    cut = Step("2+2=4 and then", (1, 2), (-0.1, -0.2), "length")
    # pins: only a separator step is open; "length" ends the path like "eos"
    assert cut.is_terminal
    assert Prefix(Problem("p", "q"), (cut,)).is_terminal
    assert not Step("a.\n\n", (1,), (-0.1,), "separator").is_terminal


@pytest.mark.parametrize("logprobs", [(-0.1, -0.2, -5.0), ()], ids=["more", "fewer"])
def test_a_step_whose_logprobs_do_not_match_its_tokens_is_refused(logprobs):
    # pins: more log-probs than tokens is refused as well as fewer
    with pytest.raises(ValueError, match=f"Step has 1 token_ids but {len(logprobs)} token_logprobs"):
        Step("x", (1,), logprobs, "eos")


def test_add_path_gives_each_node_its_own_score():
    tree = Tree(Problem("p", "q"))
    steps = [Step(f"s{i}.\n\n", (i,), (-0.1,), "separator") for i in range(2)] + [Step("end", (9,), (-0.1,), "eos")]
    leaf = tree.add_path(steps, [0.9, 0.5, 0.1])
    assert leaf == 3
    assert [n.score for n in tree.nodes] == [None, 0.9, 0.5, 0.1]


def test_adding_under_the_id_one_past_the_last_node_is_a_value_error_naming_it():
    tree = Tree(Problem("p", "q"))
    with pytest.raises(ValueError, match=r"parent=1 is not a node id of this tree \(0\.\.0\)"):
        tree.add(1, Step("a", (1,), (-0.1,), "eos"))
    assert len(tree) == 1


def test_a_candidates_num_tokens_counts_every_step():
    a = Step("1+1=2.\n\n", (1, 2, 3), (-0.1,) * 3, "separator")
    b = Step("Answer: 2", (4, 5), (-0.1,) * 2, "eos")
    assert Candidate((a, b), (0.5, 0.9), 0.9, 2).num_tokens == 5


# -- step splitting -----------------------------------------------------------------------------------


def test_a_run_of_separators_ending_at_think_close_stays_one_step():
    # pins: the run swallows a separator that ends exactly at the span's end (`<=`, not `<`)
    assert split_steps("<think>1 + 2 = 3.\n\n.\n\n</think>Answer: 3") == ["<think>1 + 2 = 3.\n\n.\n\n", "</think>Answer: 3"]
    assert split_steps("1 + 2 = 3.\n\n.\n\n") == ["1 + 2 = 3.\n\n.\n\n"]


def test_a_run_swallows_whole_separators_only():
    # "\n\n\n" with separator "\n\n": one separator ends the step, the odd "\n" starts the next one
    assert split_steps("x = 1\n\n\ny = 2", StepFormat(separator="\n\n")) == ["x = 1\n\n", "\ny = 2"]


# -- record log ---------------------------------------------------------------------------------------


def test_a_blank_line_before_a_torn_one_is_cut_at_the_right_byte(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"problem_id": "p1"}\n\n{"problem_id": "p2"}\n{"problem_id": "p3", "tor')
    assert [r["problem_id"] for r in load_rows(path)] == ["p1", "p2"]
    # pins: the blank line's own newline counts, so the cut keeps p2's newline and the append starts a line
    assert path.read_bytes() == b'{"problem_id": "p1"}\n\n{"problem_id": "p2"}\n'
    append_rows(path, [{"problem_id": "p3"}])
    assert [r["problem_id"] for r in load_rows(path)] == ["p1", "p2", "p3"]


def test_a_nul_line_before_good_rows_is_refused_and_the_file_left_alone(tmp_path):
    path = tmp_path / "records.jsonl"
    content = b'{"problem_id": "p1"}\n\x00\x00\x00\n{"problem_id": "p2"}\n{"problem_id": "p3"}\n'
    path.write_bytes(content)
    # pins: NUL bytes pass as torn only on the last line; rows after them are not cut away
    with pytest.raises(RecordLogError, match="line 2 is not a JSON object"):
        load_rows(path)
    assert path.read_bytes() == content


# -- tree plot ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("finish, marker", [("separator", "o"), ("eos", "s"), ("length", "X")])
def test_node_markers_by_finish(finish, marker):
    assert node_marker({"step": {"text": "x", "finish": finish}}) == marker


def test_scores_from_exactly_0_keep_the_0_to_1_colour_scale():
    tree = Tree(Problem("p", "q"))
    tree.add(0, Step("a", (1,), (-0.1,), "eos"), score=0.0)
    tree.add(0, Step("b", (2,), (-0.1,), "eos"), score=0.5)
    assert score_range(tree.to_json()) == (0.0, 1.0)


# -- result files -------------------------------------------------------------------------------------


def _set_node(i, key, value):
    return lambda d: d["tree"]["nodes"][i].update({key: value})


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(chosen=2), r"chosen=2 is not an index into candidates \(0\.\.1\)"),  # one past the last
    (lambda d: d.update(chosen_node=4), r"chosen_node=4 is not a node id of the tree \(0\.\.3\)"),  # ditto
    (lambda d: d.update(chosen=True), r"chosen=True is not an index into candidates"),
    (lambda d: d["candidates"][0].update(score=True), r"candidates\[0\].score=True must be a number"),
    (lambda d: d.update(live={"state": "finished"}), r"live=\{'state': 'finished'\} must be an object whose state"),
    (_set_node(2, "id", 7), r"tree.nodes\[2\] has id 7; node i must have id i"),
    (_set_node(0, "children", [1, 2, 3]), r"tree.nodes\[0\].children \[2\] name another node as their parent"),
], ids=["chosen-past-end", "chosen_node-past-end", "chosen-bool", "score-bool", "live-state",
        "misnumbered-node", "node-under-two-parents"])
def test_a_bad_result_file_is_refused(edit, message):
    data = two_candidate_json()
    result_from_json(json.loads(json.dumps(data)))  # the unedited file is fine
    edit(data)
    with pytest.raises(ResultFileError, match=message):
        result_from_json(data)


# -- live tree ----------------------------------------------------------------------------------------


def test_a_newly_followed_problems_first_round_is_written_at_once(tmp_path, monkeypatch):
    fake_clock(monkeypatch)  # time stands still: A's write interval never passes
    live = LiveTree(tmp_path / "live.json", interval_s=10.0)
    live.follow("A", "mcts", {})
    live([Tree(Problem("A", "qa"))])
    assert load_result(live.path).problem["id"] == "A"
    live.follow("B", "mcts", {})
    live([Tree(Problem("B", "qb"))])
    # pins: follow() resets the interval; B's first round does not wait for A's
    assert load_result(live.path).problem["id"] == "B"


def test_a_held_final_result_is_written_once_then_the_next_problems_rounds(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)
    hold = live_tree.FINAL_HOLD_S
    live = LiveTree(tmp_path / "live.json", interval_s=0.01)
    pa, pb, pc = Problem("A", "qa"), Problem("B", "qb"), Problem("C", "qc")
    live.follow("A", "mcts", {})
    live([Tree(pa)])
    live.finish([bare_result(pa)])  # written, held until `hold`
    live.follow("B", "mcts", {})
    live.finish([bare_result(pb)])  # waits for A's hold
    assert load_result(live.path).problem["id"] == "A"
    clock[0] = hold + 1.0
    live.follow("C", "mcts", {})
    live([Tree(pc)])  # after the hold: B's final result has its turn (held in turn)
    record = load_result(live.path)
    assert record.problem["id"] == "B" and record.live is None
    seen = []
    for k in range(3):
        clock[0] = (k + 2) * (hold + 1.0)  # each round after the hold of the write before
        live([Tree(pc)])
        record = load_result(live.path)
        seen.append((record.problem["id"], record.live))
    # pins: B's final result, once written, no longer waits: C's rounds follow
    assert seen == [("C", {"state": "searching", "round": r}) for r in (2, 3, 4)]


def test_sigterm_stops_are_terminated_and_ctrl_c_interrupted():
    assert stop_reason(Terminated()) == "terminated"
    assert stop_reason(KeyboardInterrupt()) == "interrupted"
