"""Live trees (`experiments/live_tree.py`): a strategy's `on_round` hook writes the followed
problem's tree after every round as a result JSON the tree plot reads, and its final result when
the search returns; `python -m experiments.search live_tree=true` does it for the chunk it searches.

    .venv/bin/pytest tests/test_live_tree.py
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from experiments.live_tree import LIVE_TREE_FILE, LiveTree, is_live_file
from experiments.plot import render_tree
from experiments.result_json import load_result, save_result
from step_tree_fakes import ScriptedPolicy, ScriptedScorer, trap_problem
from treesearch.tree import Tree
import test_search_resume
from test_search_resume import run_in_process
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.dvts import DVTSConfig, dvts
from treesearch.mcts import MCTSConfig, mcts
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering
from treesearch.rebase import RebaseConfig, rebase
from treesearch.registry import run_search

ckpt = test_search_resume.ckpt  # its module fixture: a tiny policy checkpoint

STRATEGIES = [
    (mcts, MCTSConfig(iterations=8, expand_width=2, leaves_per_round=2)),
    (beam_search, BeamSearchConfig(n=4, beam_width=2)),
    (dvts, DVTSConfig(n=4, beam_width=2)),
    (best_of_n, BestOfNConfig(n=4)),
    (rebase, RebaseConfig(n=4, balance_temperature=10.0)),
    (particle_filtering, ParticleFilteringConfig(n=4)),
]


class Snapshots:
    """A RoundHook that passes each round to a LiveTree, then reads back what the file holds."""

    def __init__(self, live: LiveTree) -> None:
        self.live, self.seen = live, []

    def __call__(self, trees) -> None:
        self.live(trees)
        self.seen.append(load_result(self.live.path))


@pytest.mark.parametrize("fn, cfg", STRATEGIES, ids=lambda x: getattr(x, "__name__", ""))
def test_each_round_writes_the_growing_tree_and_the_end_its_result(fn, cfg, tmp_path):
    problems = [trap_problem("p0"), trap_problem("p1", swapped=True)]
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0)
    live.follow("p1", fn.__name__, asdict(cfg))
    hook = Snapshots(live)
    results = fn(problems, ScriptedPolicy(), ScriptedScorer(), cfg, on_round=hook)
    sizes = [len(record.tree["nodes"]) for record in hook.seen]
    assert hook.seen and all(record.problem["id"] == "p1" for record in hook.seen)
    assert sizes == sorted(sizes) and sizes[-1] == len(results[1].tree.nodes)  # it grows to the final tree
    assert all(record.chosen_node is None and record.candidates == [] for record in hook.seen)  # not chosen yet
    if fn is not best_of_n:
        assert len(set(sizes)) > 1  # seen while growing, not only at the end
    live.finish(results)
    final = load_result(live.path)
    assert final.chosen_node == results[1].chosen_candidate.node_id and len(final.candidates) == len(results[1].candidates)
    png, html = render_tree(live.path)
    assert png.stat().st_size > 0 and "<html" in html.read_text().lower()


def test_rounds_closer_than_the_interval_are_not_written(tmp_path):
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=3600)
    live.follow("trap", "mcts", {})
    cfg = MCTSConfig(iterations=8, expand_width=2, leaves_per_round=2)
    (result,) = run_search("mcts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), on_round=live, **asdict(cfg))
    assert live.rounds > 1
    assert len(load_result(live.path).tree["nodes"]) == 3 < len(result.tree.nodes)  # the first round only
    with pytest.raises(ValueError, match="interval_s=-1 must be a number >= 0"):
        LiveTree(tmp_path / "x.json", interval_s=-1)


def test_a_slow_write_spaces_the_next_ones_so_writing_takes_a_tenth_of_the_time(tmp_path, monkeypatch):
    # the interval counted from a write's start: a big tree whose write took 0.46 s of every 0.5 s
    # was written round after round, most of the search's time
    from experiments import live_tree

    clock = [0.0]
    monkeypatch.setattr(live_tree.time, "monotonic", lambda: clock[0])

    def slow_save(path, result, live=None):
        clock[0] += 1.0  # each write takes 1 s
        writes.append(clock[0])

    writes: list[float] = []
    monkeypatch.setattr(live_tree, "save_result", slow_save)
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0.5)
    live.follow("trap", "mcts", {})
    tree = Tree(trap_problem())
    for _ in range(40):  # a round every 0.6 s of search (27 s in all)
        live([tree])
        clock[0] += 0.6
    assert len(writes) == 3  # at 0 s, then 10 s after each write's start (1 s x WRITE_TIME_FACTOR)
    assert all(later - earlier >= live_tree.WRITE_TIME_FACTOR for earlier, later in zip(writes, writes[1:]))


def test_a_search_run_with_live_tree_leaves_the_last_chunks_tree_and_resumes_with_or_without_it(ckpt, tmp_path):
    out = tmp_path / "run"
    base = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=4", "chunk=2", "search=beam", "search.n=4",
            "search.beam_width=2", "policy.sampling.max_total_tokens=16", "policy.sampling.max_step_tokens=4",
            "progress=false", "num_threads=1"]
    run_in_process(base + ["live_tree=true"])
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    record = load_result(out / LIVE_TREE_FILE)
    assert record.strategy == "beam_search" and record.problem["id"] == rows[2]["problem_id"]  # the last chunk's first
    assert record.chosen_node is not None and record.tree["nodes"][0]["children"]
    before = (out / "records.jsonl").read_text()
    run_in_process(base)  # live_tree is not part of the result: the same run, nothing to do
    assert (out / "records.jsonl").read_text() == before
    assert load_result(out / LIVE_TREE_FILE).live is None  # a final tree stays true of the run: kept
    with pytest.raises(ValueError, match=r"^live_tree='maybe' must be true or false$"):
        run_in_process(base + ["live_tree=maybe"])


def test_rounds_are_marked_searching_and_a_stopped_search_says_why(tmp_path):
    # a Ctrl-C'd search left a growing tree that looked live for ever
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0)
    live.follow("trap", "mcts", {})
    tree = Tree(trap_problem())
    live([tree])
    live([tree])
    assert load_result(live.path).live == {"state": "searching", "round": 2}
    with pytest.raises(KeyboardInterrupt), live.marking_stops():
        live([tree])
        raise KeyboardInterrupt
    assert load_result(live.path).live == {"state": "stopped", "round": 3, "reason": "interrupted"}
    live.follow("trap", "mcts", {})
    live([tree])
    with pytest.raises(ValueError), live.marking_stops():
        raise ValueError("the PRM's window\nis 512 tokens")
    assert load_result(live.path).live["reason"] == "ValueError: the PRM's window"
    live.follow("other", "mcts", {})  # no round of it seen: the last file is left as it is
    with pytest.raises(KeyboardInterrupt), live.marking_stops():
        raise KeyboardInterrupt
    assert load_result(live.path).live["round"] == 1
    # given the problem, a search stopped before its first round (Best-of-N has one, at the end)
    # is marked with the bare root: the last chunk's final result had looked like the live one
    live.follow("next", "best_of_n", {}, problem=trap_problem("next"))
    with pytest.raises(KeyboardInterrupt), live.marking_stops():
        raise KeyboardInterrupt
    stopped = load_result(live.path)
    assert (stopped.problem["id"], stopped.live["round"], len(stopped.tree["nodes"])) == ("next", 0, 1)


def test_a_finished_result_is_unmarked_and_stays_before_the_next_problems_rounds(tmp_path, monkeypatch):
    # a watcher polling every second saw no chunk's chosen path but the last one's
    from experiments import live_tree

    clock = [0.0]
    monkeypatch.setattr(live_tree.time, "monotonic", lambda: clock[0])
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0.5)
    cfg = MCTSConfig(iterations=4, expand_width=2, leaves_per_round=2)
    live.follow("trap", "mcts", asdict(cfg))
    (result,) = run_search("mcts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), on_round=live, **asdict(cfg))
    live.finish([result])
    assert load_result(live.path).live is None and load_result(live.path).chosen_node is not None
    live.follow("next", "mcts", {})
    clock[0] += live_tree.FINAL_HOLD_S - 0.1
    live([Tree(trap_problem("next"))])
    assert load_result(live.path).problem["id"] == "trap"  # held
    clock[0] += 0.2
    live([Tree(trap_problem("next"))])
    assert load_result(live.path).problem["id"] == "next"
    with pytest.raises(KeyboardInterrupt), live.marking_stops():  # a finished result is never marked stopped
        live.finish([result])
        raise KeyboardInterrupt


def test_a_final_result_that_comes_during_a_hold_waits_its_turn(tmp_path, monkeypatch):
    # chunks faster than the hold (the tiny policy: 0.15 s): the next chunk's final replaced the
    # held one at once, and a watcher saw no chunk's chosen path but the last
    from experiments import live_tree

    clock = [0.0]
    monkeypatch.setattr(live_tree.time, "monotonic", lambda: clock[0])
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0.5)
    results = {}
    for name in ("a", "b", "c"):
        (results[name],) = run_search("best_of_n", [trap_problem(name)], ScriptedPolicy(), ScriptedScorer(), n=2)
    shown = lambda: (load_result(live.path).problem["id"], load_result(live.path).live)  # noqa: E731
    live.follow("a", "best_of_n", {})
    live.finish([results["a"]])
    live.follow("b", "best_of_n", {})
    clock[0] = 0.3
    live.finish([results["b"]])
    assert shown() == ("a", None)  # a is held; b waits
    live.follow("c", "best_of_n", {})
    clock[0] = 1.0
    live([Tree(trap_problem("c"))])
    assert shown() == ("a", None)
    clock[0] = live_tree.FINAL_HOLD_S + 0.1
    live([Tree(trap_problem("c"))])  # the hold is over: b's final, not c's round
    assert shown() == ("b", None)
    clock[0] += 0.5
    live.finish([results["c"]])
    assert shown() == ("b", None)  # b's own hold
    live.close()  # the run's end: c's final is written
    assert shown() == ("c", None)


def test_the_watcher_says_where_the_live_tree_stands(tmp_path, capsys):
    from experiments.plot import render_if_changed

    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0)
    live.follow("trap", "mcts", {})
    live([Tree(trap_problem())])
    render_if_changed(live.path, tmp_path, 1.0, None)
    assert "mcts · problem trap · searching, round 1" in (tmp_path / "live_tree.html").read_text()
    live.stop("interrupted")
    render_if_changed(live.path, tmp_path, 1.0, None)
    assert "stopped (interrupted) at round 1" in (tmp_path / "live_tree.html").read_text()
    assert "the search stopped (interrupted) at round 1" in capsys.readouterr().err
    cfg = MCTSConfig(iterations=4, expand_width=2, leaves_per_round=2)
    (result,) = run_search("mcts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), **asdict(cfg))
    live.finish([result])
    render_if_changed(live.path, tmp_path, 1.0, None)
    assert "problem trap · final" in (tmp_path / "live_tree.html").read_text()
    assert "the search of problem trap finished" in capsys.readouterr().err
    render_tree(live.path)  # rendered once, not watched: no status in the title
    assert "· final" not in (tmp_path / "live_tree.html").read_text()


def test_an_interrupted_search_run_marks_its_live_tree_stopped(ckpt, tmp_path, monkeypatch):
    from experiments import search

    def interrupted(part, spec, cfg, policy, scorer, batching, on_round=None):
        on_round([Tree(part[0])])
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "search_chunk", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_in_process([f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "search=beam", "search.n=2",
                        "search.beam_width=1", "progress=false", "live_tree=true"])
    assert load_result(out / LIVE_TREE_FILE).live == {"state": "stopped", "round": 1, "reason": "interrupted"}


def interrupted_final_write(monkeypatch) -> None:
    """Make live_tree's final write (save_result without `live`) raise KeyboardInterrupt, as a
    Ctrl-C during a big tree's write (seconds for thousands of nodes) does."""
    from experiments import live_tree

    real_save = live_tree.save_result

    def save(path, result, live=None):
        if live is None:
            raise KeyboardInterrupt
        return real_save(path, result, live=live)

    monkeypatch.setattr(live_tree, "save_result", save)


def test_an_interrupt_while_the_final_result_is_written_marks_the_file_stopped(tmp_path, monkeypatch):
    # finish dropped the tree before its write: a Ctrl-C during it left "searching" for ever
    cfg = MCTSConfig(iterations=4, expand_width=2, leaves_per_round=2)
    live = LiveTree(tmp_path / LIVE_TREE_FILE, interval_s=0)
    live.follow("trap", "mcts", asdict(cfg))
    interrupted_final_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt), live.marking_stops():
        (result,) = run_search("mcts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), on_round=live,
                               **asdict(cfg))
        live.finish([result])
    stopped = load_result(live.path)
    assert stopped.live == {"state": "stopped", "round": live.rounds, "reason": "interrupted"}
    assert len(stopped.tree["nodes"]) == len(result.tree.nodes)


def test_a_run_interrupted_while_writing_its_final_tree_marks_it_stopped(ckpt, tmp_path, monkeypatch):
    # experiments.search called finish outside marking_stops
    interrupted_final_write(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_in_process([f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "search=beam", "search.n=2",
                        "search.beam_width=1", "policy.sampling.max_total_tokens=16",
                        "policy.sampling.max_step_tokens=4", "progress=false", "num_threads=1", "live_tree=true"])
    live = load_result(out / LIVE_TREE_FILE).live
    assert (live["state"], live["reason"]) == ("stopped", "interrupted") and live["round"] >= 1


def interrupted_chunk(part, spec, cfg, policy, scorer, batching, on_round=None):
    """experiments.search's search_chunk stopped by a Ctrl-C after its first round's tree."""
    on_round([Tree(part[0])])
    raise KeyboardInterrupt


def tiny_beam_run(ckpt: Path, out: Path) -> list[str]:
    """The overrides of a two-problem beam search on the tiny checkpoint into out."""
    return [f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "search=beam", "search.n=2",
            "search.beam_width=1", "policy.sampling.max_total_tokens=16", "policy.sampling.max_step_tokens=4",
            "progress=false", "num_threads=1"]


def stop_a_live_run(monkeypatch, base: list[str]) -> None:
    """Run base with live_tree=true, stopped by a Ctrl-C in its first chunk (`interrupted_chunk`)."""
    from experiments import search

    with monkeypatch.context() as patch:
        patch.setattr(search, "search_chunk", interrupted_chunk)
        with pytest.raises(KeyboardInterrupt):
            run_in_process(base + ["live_tree=true"])


def test_a_run_resumed_without_live_tree_removes_the_stopped_tree_an_earlier_run_left(ckpt, tmp_path, monkeypatch,
                                                                                      capsys):
    # `plot tree` showed the finished run as "stopped (interrupted)" for ever
    out = tmp_path / "run"
    base = tiny_beam_run(ckpt, out)
    stop_a_live_run(monkeypatch, base)
    assert is_live_file(out / LIVE_TREE_FILE)
    capsys.readouterr()
    run_in_process(base)
    assert not (out / LIVE_TREE_FILE).exists() and (out / "records.jsonl").exists()
    err = capsys.readouterr().err
    assert f"note: removed {out / LIVE_TREE_FILE}: an earlier live_tree=true run's tree" in err
    (out / LIVE_TREE_FILE).write_text("{not json")  # not a live tree's file: left alone
    assert not is_live_file(out / LIVE_TREE_FILE) and not is_live_file(out / "missing.json")


def test_a_hand_edited_nan_answer_or_finish_still_makes_the_page(tmp_path):
    # the PNG was written, then json.dumps(allow_nan=False) raised a ValueError traceback
    from experiments.plot import main

    (result,) = run_search("best_of_n", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=2)
    path = save_result(tmp_path / "edited.json", result)
    data = json.loads(path.read_text())
    data["tree"]["problem"]["answer"] = float("nan")
    data["tree"]["nodes"][1]["step"]["finish"] = float("nan")
    path.write_text(json.dumps(data))
    assert main(["tree", str(path)]) == 0
    page = (tmp_path / "edited.html").read_text()
    assert '"answer": "nan"' in page and '"finish": "nan"' in page
