"""Pins for library behaviours that a mutation review found unpinned elsewhere.

- `TransformersPolicy`: a policy used without a continuous engine holds no reference cycle (freed
  by `del` with the cyclic collector off); a closed policy refuses a call with an engine attached
  and a call that `close()` lands in the middle of, with its own RuntimeError; `close()` drops the
  step head.
- `LiveTree.finish`: a stop (Ctrl-C) after the final write leaves the final result in the file.
- The strategy registry refuses a known name with a new config class of another definition, and
  `run_search` refuses a non-callable on_round before a registered user strategy runs.
- `Tree` equality compares problems; result JSON refuses a candidate's step_scores that is no
  list; a problem meta with a tuple key, or one containing itself, is refused by name before any
  policy call; the tree page's data stays strict JSON with NaN in lists, dicts, scores and priors.
- The reference math grader reads an upper-case "IS", "we get", "is" before a newline and the
  last \\fbox.
- bench_all: plain Ctrl-C exits 130 with its own report mark; the caller's own SIGTERM / SIGHUP
  handlers come back. bench_engine_overhead's median run: upper middle of an even count, by CPU share.
- experiments.search: lookahead=0 is never refused for its lookahead_temperature; a run resumed
  with live_tree=true keeps its live file and prints no "removed" note.

On the tiny random checkpoint of `tests/tiny_checkpoint.py` and scripted step trees, CPU only.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_library_pins.py`
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import signal
import weakref
from dataclasses import asdict
from pathlib import Path

import pytest

import policies.transformers_policy as transformers_policy
from experiments import bench_all
from experiments.bench_all import Section
from experiments.bench_engine_overhead import OverheadRow, median_run
from experiments.live_tree import LIVE_TREE_FILE, LiveTree, is_live_file
from experiments.result_json import ResultFileError, load_result, save_result
from experiments.tasks.grading import grade_math_reference
from experiments.tree_html import write_tree_html
from policies.checkpoint import load_checkpoint
from policies.continuous_engine import ContinuousEngine
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from step_tree_fakes import ScriptedPolicy, ScriptedScorer, trap_problem
import test_search_resume
from test_search_resume import run_in_process
from test_live_tree import stop_a_live_run, tiny_beam_run
from treesearch import registry
from treesearch.beam_search import beam_search
from treesearch.mcts import MCTSConfig, mcts
from treesearch.records import Prefix, Problem
from treesearch.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ckpt = test_search_resume.ckpt  # its module fixture: a tiny policy checkpoint

SAMPLING = SamplingConfig(temperature=0.8, max_step_tokens=6, max_total_tokens=16)
PREFIXES = [Prefix(Problem("p", "<think>3"))]
CLOSED = "TransformersPolicy was closed"


def question(problem: Problem) -> str:
    return problem.question


def load(ckpt: Path) -> TransformersPolicy:
    return TransformersPolicy.from_pretrained(ckpt, SAMPLING, question)


@pytest.fixture
def registry_restored():
    """The strategy registry as it was before the test."""
    saved = dict(registry.STRATEGIES)
    yield
    registry.STRATEGIES.clear()
    registry.STRATEGIES.update(saved)


# -- TransformersPolicy --------------------------------------------------------------------------


def test_a_policy_used_without_an_engine_is_freed_by_reference_counting(ckpt):
    gc.collect()
    gc.disable()
    try:
        policy = load(ckpt)
        policy.propose(PREFIXES, 2, seed=0)  # no continuous engine ever attached
        freed_policy, freed_model = weakref.ref(policy), weakref.ref(policy.model)
        del policy
        assert freed_policy() is None and freed_model() is None
    finally:
        gc.enable()


def test_a_policy_closed_with_an_engine_attached_refuses_the_next_call(ckpt):
    policy = load(ckpt)
    with ContinuousEngine.attached(policy):
        policy.close()
        with pytest.raises(RuntimeError, match=CLOSED):
            policy.propose(PREFIXES, 2, seed=0)


def test_a_close_in_the_middle_of_a_call_is_the_closed_error(ckpt, monkeypatch):
    # past its open check, the call decoded on model=None: a TypeError about weak references
    policy = load(ckpt)
    real = transformers_policy.encode_contexts

    def closing(*args, **kwargs):  # another thread closes the policy here
        out = real(*args, **kwargs)
        policy.close()
        return out

    monkeypatch.setattr(transformers_policy, "encode_contexts", closing)
    with pytest.raises(RuntimeError, match=CLOSED):
        policy.propose(PREFIXES, 2, seed=0)


def test_close_drops_the_step_head(ckpt):
    lm, tokenizer = load_checkpoint(ckpt)
    policy = TransformersPolicy.from_reflective(ReflectiveModel(lm), tokenizer, SAMPLING, question)
    assert policy.step_head is not None
    policy.close()
    assert policy.step_head is None and policy.model is None


# -- live tree -----------------------------------------------------------------------------------


def test_a_stop_after_the_final_write_leaves_the_final_result(tmp_path):
    path = tmp_path / LIVE_TREE_FILE
    live = LiveTree(path, interval_s=0)
    cfg = MCTSConfig(iterations=4, expand_width=2, leaves_per_round=2)
    problem = trap_problem()
    live.follow(problem.id, "mcts", asdict(cfg), problem=problem)
    with pytest.raises(KeyboardInterrupt), live.marking_stops():
        results = mcts([problem], ScriptedPolicy(), ScriptedScorer(), cfg, on_round=live)
        live.finish(results)
        raise KeyboardInterrupt  # a Ctrl-C just after the final write, still inside the block
    record = load_result(path)
    assert record.live is None and record.chosen == results[0].chosen and record.chosen_node is not None
    live.stop("interrupted")
    assert load_result(path).live is None


# -- registry ------------------------------------------------------------------------------------


def test_a_known_name_with_a_config_of_another_definition_is_refused(registry_restored):
    @dataclasses.dataclass(frozen=True)
    class OtherConfig:
        n: int = 4
        seed: int = 0

    held = registry.STRATEGIES["beam_search"]
    with pytest.raises(ValueError, match="strategy beam_search is registered already"):
        registry.register("beam_search", beam_search, OtherConfig)
    assert registry.STRATEGIES["beam_search"] == held


def test_run_search_refuses_a_round_hook_that_is_not_callable_before_a_user_strategy_runs(registry_restored):
    @dataclasses.dataclass(frozen=True)
    class MineConfig:
        seed: int = 0

    calls = []

    def mine(problems, policy, scorer, cfg, on_round=None):
        calls.append(on_round)
        return []

    registry.register("mine_pin", mine, MineConfig)
    with pytest.raises(TypeError, match="on_round must be callable"):
        registry.run_search("mine_pin", [], None, None, on_round=5)
    assert calls == []


# -- trees, result JSON, problem checks -----------------------------------------------------------


def test_bare_trees_of_two_different_problems_differ():
    assert Tree(Problem("p1", "2+2?", "4")) != Tree(Problem("p2", "3+3?", "6"))
    assert Tree(Problem("p1", "2+2?", "4")) == Tree(Problem("p1", "2+2?", "4"))


def test_a_saved_candidate_whose_step_scores_is_no_list_is_named(tmp_path):
    (result,) = registry.run_search("best_of_n", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=2)
    path = save_result(tmp_path / "r.json", result)
    data = json.loads(path.read_text())
    data["candidates"][0]["step_scores"] = "0.9"  # hand-edited
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"candidates\[0\]\.step_scores='0\.9' must be a list"):
        load_result(path).to_result()


def circular_meta() -> dict:
    meta = {}
    meta["self"] = meta
    return meta


@pytest.mark.parametrize("meta, key", [
    ({(1, 2): "pair"}, r"meta\[\(1, 2\)\]"),  # json.dumps refuses the key, not the value
    (circular_meta(), r"meta\['self'\]"),  # a ValueError, not a TypeError
], ids=["tuple_key", "circular"])
def test_a_meta_json_cannot_hold_is_refused_by_key_before_any_policy_call(meta, key):
    policy = ScriptedPolicy()
    problem = dataclasses.replace(trap_problem(), meta={**trap_problem().meta, **meta})
    with pytest.raises(ValueError, match=r"^problems\[0\] \(problem 'trap'\) has " + key + ".*not JSON"):
        registry.run_search("best_of_n", [problem], policy, ScriptedScorer(), n=2)
    assert policy.calls == []


def reject_constant(name: str) -> None:
    raise AssertionError(f"the page's JSON holds {name}")


@pytest.mark.parametrize("edit, field, shown", [
    (lambda d: d["problem"].__setitem__("answer", [float("nan")]), "answer", ["nan"]),
    (lambda d: d["nodes"][1]["step"].__setitem__("finish", {"p": float("nan")}), "finish", {"p": "nan"}),
    (lambda d: d["nodes"][1].__setitem__("score", float("nan")), "score", "nan"),
    (lambda d: d["nodes"][1].__setitem__("prior", float("nan")), "prior", "nan"),
], ids=["answer_list", "finish_dict", "score", "prior"])
def test_a_hand_edited_nan_keeps_the_page_data_strict_json(tmp_path, edit, field, shown):
    (result,) = registry.run_search("best_of_n", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=2)
    data = json.loads(save_result(tmp_path / "r.json", result).read_text())
    edit(data["tree"])
    page = write_tree_html(data["tree"], data["chosen_node"], tmp_path / "r.html", candidates=data["candidates"])
    block = re.search(r'<script type="application/json" id="tree-data">(.*?)</script>', page.read_text(), re.S)
    shown_data = json.loads(block.group(1), parse_constant=reject_constant)
    where = shown_data["problem"] if field == "answer" else shown_data["nodes"][1]
    assert where[field] == shown


# -- grading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "So the total IS 204",  # markers match in any case
    "Multiplying, we get 204",
    "So the answer is\n204",
    "\\fbox{7} then corrected: \\fbox{204}",  # the last box
])
def test_the_reference_grader_reads_the_answer(text):
    assert grade_math_reference(text, "204") is True


# -- bench_all and bench_engine_overhead ----------------------------------------------------------


def test_a_ctrl_c_run_kills_its_benchmark_exits_130_and_says_interrupted(monkeypatch, tmp_path, restored_signals):
    pid_file = tmp_path / "child.pid"  # not the report: the Ctrl-C may come before bench_all reads a line
    code = (f"import os, pathlib, signal, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); "
            "os.kill(os.getppid(), signal.SIGINT); time.sleep(60)")  # Ctrl-C reaches bench_all
    monkeypatch.setattr(bench_all, "SECTIONS", (Section("slow", "Slow", ("-c", code)),
                                                Section("first", "First table", ("-c", "print('| a |')"))))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 130
    report = out.read_text()
    assert "*interrupted (Ctrl-C): the report stops here*" in report and "First table" not in report
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)


def test_stop_signals_raised_gives_back_the_callers_own_handlers():
    def mine(signum, frame):  # a caller's own handler
        raise KeyboardInterrupt

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, mine)
        with bench_all.stop_signals_raised():
            assert all(signal.getsignal(sig) is not mine for sig in saved)
        assert all(signal.getsignal(sig) is mine for sig in saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def overhead_row(forward_s: float, forward_cpu_s: float) -> OverheadRow:
    return OverheadRow("beam_search", 1.0, 1.0, forward_s, forward_cpu_s, 10, 1.0, 100)


def test_the_median_run_of_an_even_count_is_the_upper_middle():
    runs = [overhead_row(f, f) for f in (0.95, 0.90, 0.85, 0.80)]  # 5, 10, 15, 20 % outside
    assert median_run(runs) is runs[2]


def test_the_median_run_is_judged_by_cpu_share_not_wall_share():
    # outside the forward, wall: 5 %, 50 %, 20 %; CPU: 3 %, 10 %, 20 %
    runs = [overhead_row(0.95, 0.97), overhead_row(0.5, 0.90), overhead_row(0.8, 0.80)]
    assert median_run(runs) is runs[1]


# -- experiments.search ---------------------------------------------------------------------------


def test_a_lookahead_temperature_without_lookahead_steps_is_not_refused(tmp_path):
    # the temperature is never sampled at lookahead=0: the run goes on to the policy folder
    with pytest.raises(FileNotFoundError, match="checkpoint folder .* does not exist"):
        run_in_process(["policy=vllm", "search=beam", "search.lookahead=0", "search.lookahead_temperature=0.005",
                        f"policy.path={tmp_path / 'nope'}", f"out_dir={tmp_path / 'run'}"])


def test_a_run_resumed_with_live_tree_keeps_its_live_file_and_notes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    base = tiny_beam_run(ckpt, out)
    stop_a_live_run(monkeypatch, base)
    assert is_live_file(out / LIVE_TREE_FILE)
    capsys.readouterr()
    run_in_process(base + ["live_tree=true"])  # resumed with live_tree=true: it rewrites the file itself
    assert "removed" not in capsys.readouterr().err
    assert load_result(out / LIVE_TREE_FILE).live is None
