"""Pins for demo-pipeline behaviours that a mutation review found unpinned elsewhere.

Hand-made outcomes, specs and folders only: no training, no search run, no end-to-end demo; the
whole file runs in a few seconds on CPU. What is pinned: the report's selection rules at N = 4
(pass@N is the oracle over N, random_bon reads the random scorer's candidates) and its budgets
(1, 2, 4, ... and n itself); `--temperature 0` is kept as greedy 0.0 and the sweep passes each
task's sampling temperature; a --checkpoints folder no Hydra override can write is refused before
anything runs; a sweep folder of other settings is refused for every identity key, the budget
table's `high` is the interval's high and budgets below 4 are refused; per-problem mean compute,
per-chunk sampling seeds, the stage-time totals and the sprm_task fallback; the SPRM / reflective
stages' "done" checks (score_module.pt, the rollout cache's spec, the whole stage config) and the
aha first value; the ablation's majority and confidence rows.

Run: `.venv/bin/python -m pytest tests/test_demo_pins.py`
"""
from __future__ import annotations

import json
import types
from dataclasses import asdict

import pytest

import experiments.demo as demo
import experiments.demo_reflective as dr
import experiments.demo_sprm as ds
from experiments.demo_ablation import ablation_metrics, ablation_rows
from experiments.demo_reflective import ReflectiveStage
from experiments.demo_report import TaskOutcomes, budgets, write_report
from experiments.demo_sweep import SWEEP_STAMP, StrategySweep, SweepSpec, _identity, check_sweep_folder
from experiments.metrics import CandidateOutcome, Estimate, ProblemOutcome
from experiments.rollout_cache import CacheSpec
from test_demo import model_marks
from treesearch.best_of_n import BestOfNConfig
from treesearch.compute import Compute


# -- 1. the report's tables ------------------------------------------------------------------------


def four_by_four() -> tuple[list[ProblemOutcome], list[ProblemOutcome], list[ProblemOutcome]]:
    """(greedy, conf, random) of 4 problems x 4 candidates: one right answer "1" that confidence
    ranks last, a wrong majority "2" it ranks first; the random scorer ranks the right one first."""
    C = CandidateOutcome
    conf = [ProblemOutcome(f"p{i}", (C("1", True, 0.1), C("2", False, 0.9), C("2", False, 0.8), C("3", False, 0.7)))
            for i in range(4)]
    random = [ProblemOutcome(o.problem_id, tuple(C(c.answer, c.correct, 1.0 if c.correct else 0.0)
                                                 for c in o.candidates)) for o in conf]
    greedy = [ProblemOutcome(o.problem_id, (o.candidates[0],)) for o in conf]
    return greedy, conf, random


def test_report_metrics_apply_each_selection_rule_to_its_own_candidates(tmp_path):
    greedy, conf, random = four_by_four()
    write_report(tmp_path, [TaskOutcomes("arith", greedy, conf, random, {"tokens_generated": 10.0})], "# h")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["arith.pass@1"] == pytest.approx(0.25)
    # pass@4 is the oracle over the 4 candidates (not over one)
    assert m["arith.pass@4"] == pytest.approx(1.0)
    # confidence picks a wrong "2"; the random scorer's (right-first) scores pick the right one
    assert m["arith.conf_bon@4"] == pytest.approx(0.0)
    assert m["arith.random_bon@4"] == pytest.approx(1.0)
    assert m["arith.maj@4"] == pytest.approx(0.0)
    assert m["arith.problems"] == 4
    lines = (tmp_path / "report.md").read_text().splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header = next(cells(line) for line in lines if line.startswith("| N |"))
    table = dict(zip(header, next(cells(line) for line in lines if line.startswith("| 4 |"))))
    assert table["random_bon@N"].startswith("1.000") and table["conf_bon@N"].startswith("0.000")


def test_report_budgets_double_up_to_n_and_end_at_n():
    assert budgets(6) == [1, 2, 4, 6]
    assert budgets(32) == [1, 2, 4, 8, 16, 32]
    assert budgets(1) == [1]


# -- 2./3. the command line ------------------------------------------------------------------------


def test_temperature_zero_is_kept_as_greedy_sampling():
    cfg = demo.parse_args(["--tasks", "arith", "--temperature", "0", "--sweep-problems", "0"])
    assert cfg.tasks[0].temperature == 0.0
    assert cfg.tasks[0].sampling_temperature == 0.0  # not the task's default 0.6
    assert demo.DemoTask("arith", temperature=0).sampling_temperature == 0


def test_the_sweep_samples_at_the_tasks_sampling_temperature():
    cfg = demo.parse_args(["--tasks", "arith"])
    overrides = demo.sweep_spec(cfg, cfg.tasks[0]).overrides
    assert "policy.sampling.temperature=0.6" in overrides  # the task's default, not "None"
    cfg = demo.parse_args(["--tasks", "arith", "--temperature", "1.5"])
    assert "policy.sampling.temperature=1.5" in demo.sweep_spec(cfg, cfg.tasks[0]).overrides


def test_a_checkpoints_folder_with_a_backslash_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran before its inputs were checked"))
    folder = str(tmp_path / "ck\\pts")
    argv = ["--tasks", "arith", "--checkpoints", folder, "--out-dir", str(tmp_path / "out")]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoints ") and "backslash" in err and len(err.strip().splitlines()) == 1, err


# -- 4. the strategy sweep -------------------------------------------------------------------------


SWEEP_CHANGES = {  # every setting the sweep's runs share, each changed
    "checkpoint": "other_ckpt", "task": "countdown", "problems": 50, "scorer": "sprm", "policy": "tiny_sprm",
    "seed": 1, "overrides": ("policy.sampling.temperature=1.2",), "match_tokens": False,
    "made_from": {"config": "other"},
}


def test_a_sweep_folder_is_refused_for_a_rerun_that_changes_any_shared_setting(tmp_path):
    base = dict(out_dir=tmp_path, checkpoint="ckpt", overrides=("policy.sampling.temperature=0.6",))
    (tmp_path / SWEEP_STAMP).write_text(json.dumps(_identity(SweepSpec(**base))))
    (tmp_path / "best_of_n_4").mkdir()
    (tmp_path / "best_of_n_4" / "records.jsonl").write_text("{}\n")
    check_sweep_folder(SweepSpec(**base))  # the same settings: resumed
    for key, value in SWEEP_CHANGES.items():
        with pytest.raises(ValueError, match=f"{key}: "):
            check_sweep_folder(SweepSpec(**{**base, key: value}))


def test_budget_table_rows_carry_the_intervals_low_and_high(tmp_path):
    run = types.SimpleNamespace(strategy="beam", budget=4, tokens_per_problem=12.0, accuracy=Estimate(0.5, 0.2, 0.8))
    assert StrategySweep((run,), (), tmp_path / "p.png").budget_table == [
        {"strategy": "beam", "budget": 4, "tokens": 12.0, "accuracy": 0.5, "low": 0.2, "high": 0.8}]


@pytest.mark.parametrize("bad", [(0, 4), (-4,), (4, 6)])
def test_sweep_budgets_below_four_or_off_the_beam_width_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="multiple of 4"):
        SweepSpec(out_dir=tmp_path, checkpoint="c", budgets=bad)


# -- 5. compute and seeds --------------------------------------------------------------------------


def test_mean_compute_is_per_problem():
    results = [types.SimpleNamespace(compute=Compute(tokens_generated=10)) for _ in range(4)]
    assert demo.mean_compute(results)["tokens_generated"] == pytest.approx(10.0)


def test_each_chunk_samples_from_the_seed_plus_its_first_problem(monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(demo, "best_of_n", lambda part, policy, scorer, cfg: seen.append(cfg.seed) or [])
    demo.search_in_chunks(list(range(6)), None, None, BestOfNConfig(n=4, seed=3), 2, "chunks")
    assert seen == [3, 5, 7]


def test_stage_times_total_every_stage_of_every_task():
    seconds = {"policy": 100.0, "sprm": 50.0, "sampling": 10.0, "sweep": 200.0}
    runs = [demo.TaskRun(TaskOutcomes(t, [], [], [], {}), None, "", seconds) for t in ("arith", "countdown")]
    assert demo.timing_lines(runs)[2] == "| arith | 100 s | 50 s | 10 s | 200 s | 360 s |"
    assert demo.timing_metrics(runs)["timing.total_s"] == pytest.approx(720.0)


def test_sprm_task_falls_back_to_the_last_task_with_a_stage():
    def run(task, first):
        extra = {f"{task}.aha.diff_prob_first": first, f"{task}.aha.diff_prob_last": first + 1}
        return demo.TaskRun(TaskOutcomes(task, [], [], [], {}, extra=extra), None, "", {})

    runs = [run("arith", 0.1), run("countdown", 0.2)]
    assert demo.sprm_task_metrics(runs, "chess") == {"sprm_task": "countdown", "aha.diff_prob_first": 0.2,
                                                     "aha.diff_prob_last": pytest.approx(1.2)}


# -- 6. the SPRM and reflective stages' "done" checks ----------------------------------------------


def test_a_model_folder_without_its_score_module_is_not_a_saved_reflective_model(tmp_path):
    model_marks(tmp_path / "m")
    assert ds.reflective_model_saved(tmp_path / "m")
    (tmp_path / "m" / "score_module.pt").unlink()
    assert not ds.reflective_model_saved(tmp_path / "m")


def test_a_rollout_cache_of_another_spec_is_built_again(tmp_path, monkeypatch):
    saved_spec = CacheSpec("policy", "arith", "train", 50, 8)
    built: list[CacheSpec] = []
    monkeypatch.setattr(ds, "load_cache", lambda path: types.SimpleNamespace(
        spec=json.loads(json.dumps(asdict(saved_spec))), policy_fingerprint="w"))
    monkeypatch.setattr(ds, "backbone_fingerprint", lambda folder: "w")
    monkeypatch.setattr(ds, "build_from_spec", lambda spec: built.append(spec) or "cache")
    monkeypatch.setattr(ds, "save_cache", lambda cache, path: None)
    path = tmp_path / "train.pt"
    path.write_text("a cache")
    assert ds.cached_rollouts(saved_spec, path) == path and built == []  # its own spec: reused
    other = CacheSpec("policy", "arith", "train", 4096, 8)
    assert ds.cached_rollouts(other, path) == path and built == [other]


def test_a_reflective_model_of_another_stage_config_on_the_same_policy_is_trained_again(tmp_path, monkeypatch):
    work, policy = tmp_path / "work", tmp_path / "policy"
    model_marks(work / "model")
    (work / "metrics.jsonl").write_text("")
    monkeypatch.setattr(dr, "weights_fingerprint", lambda folder: "w")
    old = ReflectiveStage(eval_every=150)
    (work / "metrics.json").write_text(json.dumps({**dr.stage_identity(old, policy), "policy_fingerprint": "w",
                                                   "labels_version": dr.labels_version(old.task)}))
    assert dr._trained(work, old, policy) is not None
    assert dr._trained(work, ReflectiveStage(eval_every=100), policy) is None


def test_the_aha_summary_reads_the_first_and_last_evaluations():
    rows = [{"step": 0, "loss": 1.0}, {"step": 0, "heldout_fc/diff_prob": 0.01},
            {"step": 150, "heldout_fc/diff_prob": 0.3, "heldout/step_auc": 0.7}]
    out = dr.summary(rows, "countdown")
    assert out["countdown.aha.diff_prob_first"] == pytest.approx(0.01)
    assert out["countdown.aha.diff_prob_last"] == pytest.approx(0.3)
    assert out["countdown.sprm_step_auc"] == pytest.approx(0.7)


# -- 7. the ablation table -------------------------------------------------------------------------


def test_ablation_majority_row_is_a_plain_vote_and_confidence_keeps_its_auc():
    C = CandidateOutcome
    # two low-confidence wrong "7"s outvote one high-confidence right "5" (weighted majority: "5")
    conf = [ProblemOutcome(f"p{i}", (C("7", False, 0.1), C("7", False, 0.1), C("5", True, 0.9))) for i in range(3)]
    m = ablation_metrics("arith", ablation_rows(conf, {}, (3,)))["arith.ablation"]
    assert m["majority"] == {"3": 0.0, "within_auc": None}
    assert m["confidence"] == {"3": 1.0, "within_auc": pytest.approx(1.0)}
