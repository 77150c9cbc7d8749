"""Pins for demo-stage behaviours a mutation review left unpinned after tests/test_demo_pins.py.

Hand-made outcomes, specs, folders and stand-ins (monkeypatched) for the model, the search and the
training: no training, no search run, no end-to-end demo; the whole file runs in a few seconds on
CPU. What is pinned: the reflective stage's held-out rollouts come from the test split and every
count of its config must be >= 1; the SPRM stage's aha first value; the report's sprm_wmaj is the
weighted vote, conf_within_auc is the confidence scorer's and the on-candidate AUCs win over a
stage's held-out ones; only the first swept task gives the top-level scaling slopes; the report's
scorer phrase; `--seed` reaches the Best-of-N samples; the example tree uses beam width 4 at
n = 4; a reflective task's tokens/s time only its own pass; the sweep refuses problems=0, runs
best_of_n first (MCTS gets its tokens), refuses token matching without best_of_n, tables and
fits only its own (strategy, budget) runs, rounds MCTS's token budget up, ignores empty records
files, refuses an old stamp lacking a key that is not a later addition and lists its budget rows
in ascending order.

Run: `.venv/bin/python -m pytest tests/test_demo_stage_pins.py`
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import types

import pytest

import experiments.demo as demo
import experiments.demo_reflective as dr
import experiments.demo_sprm as ds
import experiments.demo_sweep as dsw
from experiments.demo_reflective import ReflectiveStage
from experiments.demo_report import TaskOutcomes, metrics_json, scorer_phrase
from experiments.demo_sprm import SPRMStage
from experiments.demo_sweep import SWEEP_STAMP, StrategySweep, SweepSpec, _identity, budget_markdown
from experiments.metrics import CandidateOutcome, Estimate, ProblemOutcome
from test_demo_pins import four_by_four
from treesearch.compute import Compute


# -- the reflective and SPRM stages ------------------------------------------------------------------


def test_reflective_stage_draws_its_heldout_rollouts_from_the_test_split(tmp_path, monkeypatch):
    specs = []
    monkeypatch.setattr(dr, "cached_rollouts", lambda spec, path: specs.append(spec) or path)
    monkeypatch.setattr(dr, "_trained", lambda work, stage, policy: {"seconds": 1.0})
    monkeypatch.setattr(dr, "plot_aha", lambda rows, png: png)
    stage = ReflectiveStage(task="arith", train_problems=8, train_n=2, heldout_problems=3, heldout_n=4)
    work = dr.stage_dir(stage, tmp_path)
    work.mkdir(parents=True)
    (work / "metrics.jsonl").write_text(json.dumps({"step": 0, "heldout_fc/diff_prob": 0.1}) + "\n")
    result = dr.run_reflective_stage(stage, tmp_path / "policy", tmp_path, progress=False)
    train, heldout = specs
    assert (train.split, train.problems, train.n) == ("train", 8, 2)
    assert (heldout.split, heldout.problems, heldout.n) == ("test", 3, 4)
    assert result.metrics["arith.aha.diff_prob_first"] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["train_problems", "train_n", "heldout_problems", "heldout_n", "eval_every"])
def test_reflective_stage_refuses_a_zero_count(name):
    with pytest.raises(ValueError, match=f"ReflectiveStage.{name}=0"):
        ReflectiveStage(**{name: 0})


def test_sprm_stage_reports_the_heads_first_and_last_heldout_gap(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "cached_rollouts", lambda spec, path: path)
    monkeypatch.setattr(ds, "train_head_once", lambda train, test, cfg, head: {
        "aha.diff_prob_first": 0.02, "aha.diff_prob_last": 0.4})
    monkeypatch.setattr(ds, "plot_aha", lambda rows, png: png)
    result = ds.run_sprm_stage(SPRMStage(), tmp_path / "policy", tmp_path)
    assert result.metrics["countdown.aha.diff_prob_first"] == pytest.approx(0.02)
    assert result.metrics["countdown.aha.diff_prob_last"] == pytest.approx(0.4)


# -- the report's SPRM numbers and sweep keys --------------------------------------------------------


def with_sprm_head() -> TaskOutcomes:
    """four_by_four's candidates (confidence ranks the right answer last, the random scorer first)
    plus an SPRM that scores the right "1" highest but not the wrong "2"s' total: majority "2",
    weighted majority "1"."""
    greedy, conf, random = four_by_four()
    C = CandidateOutcome
    sprm = [ProblemOutcome(o.problem_id, (C("1", True, 0.9), C("2", False, 0.2), C("2", False, 0.1),
                                          C("3", False, 0.0))) for o in conf]
    return TaskOutcomes("arith", greedy, conf, random, {}, sprm=sprm, extra={"arith.sprm_within_auc": 0.5})


def test_sprm_wmaj_is_the_score_weighted_vote_of_the_sprms_scores():
    m = metrics_json([with_sprm_head()])
    assert m["arith.sprm_wmaj@4"] == pytest.approx(1.0)  # a plain vote would pick the wrong "2"
    assert m["arith.maj@4"] == pytest.approx(0.0)


def test_conf_within_auc_ranks_the_confidence_scores_not_the_random_ones():
    m = metrics_json([with_sprm_head()])
    assert m["arith.conf_within_auc"] == pytest.approx(0.0)  # the random scorer's would be 1.0


def test_the_on_candidate_sprm_auc_wins_over_the_stages_heldout_one():
    m = metrics_json([with_sprm_head()])
    assert m["arith.sprm_within_auc"] == pytest.approx(1.0)  # not extra's held-out 0.5


def slope_sweep(tmp_path, slope: float) -> StrategySweep:
    series = (types.SimpleNamespace(name="beam", fit=types.SimpleNamespace(slope=slope)),)
    return StrategySweep((), series, tmp_path / "p.png")  # type: ignore[arg-type]


def test_only_the_first_swept_task_gives_the_top_level_scaling_slopes(tmp_path):
    m = metrics_json([], {"arith": slope_sweep(tmp_path, 0.1), "countdown": slope_sweep(tmp_path, 0.3)})
    assert m["scaling.beam.slope"] == pytest.approx(0.1)
    assert m["arith.scaling.beam.slope"] == pytest.approx(0.1)
    assert m["countdown.scaling.beam.slope"] == pytest.approx(0.3)


def test_the_report_names_the_sweeps_scorer(tmp_path):
    assert "SPRM head" in scorer_phrase(StrategySweep((), (), tmp_path, "sprm", "ck"))
    assert "own step confidence" in scorer_phrase(StrategySweep((), (), tmp_path, "confidence", "ck"))


# -- the demo's sampling and example tree --------------------------------------------------------------


class FakePolicy:
    """Stands in for TransformersPolicy: no model is loaded."""

    model = tokenizer = step_head = None

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()


def test_best_of_n_samples_use_the_seed_of_the_command_line(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "TransformersPolicy", FakePolicy)
    monkeypatch.setattr(demo, "search_in_chunks",
                        lambda problems, policy, scorer, cfg, chunk, desc: seen.setdefault(cfg.n, cfg.seed) and [])
    cfg = demo.parse_args(["--tasks", "arith", "--seed", "7", "--n", "4"])
    demo.sample_problems("model", [], cfg, cfg.tasks[0])
    assert seen[4] == 7


def test_the_example_tree_uses_beam_width_four_at_n_four(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "beam_search", lambda problems, policy, scorer, cfg: seen.append(cfg) or ("result",))
    monkeypatch.setattr(demo, "save_result", lambda path, result: path)
    monkeypatch.setattr(demo, "render_tree", lambda path: None)
    cfg = demo.parse_args(["--tasks", "arith", "--n", "4"])
    demo.write_example_tree(tmp_path, "problem", None, None, cfg, "arith")
    assert (seen[0].n, seen[0].beam_width) == (4, 4)


def test_the_reflective_tasks_tokens_per_second_time_only_the_reflective_models_own_pass(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    result = types.SimpleNamespace(compute=Compute(tokens_generated=50))

    def sample(model_dir, problems, cfg, task, with_step_head=False):
        clock[0] += 2.0 if with_step_head else 10.0  # the reflective model's pass: 2 s; the SFT baseline's: 10 s
        return demo.Samples(types.SimpleNamespace(num_parameters=1e6), [result], [result])

    monkeypatch.setattr(demo, "sample_problems", sample)
    monkeypatch.setattr(demo, "ensure_policy", lambda *a, **k: tmp_path / "ckpt")
    monkeypatch.setattr(demo, "run_reflective_stage", lambda stage, ckpt, out: ds.SPRMResult(tmp_path / "refl", {},
                                                                                               tmp_path / "aha.png"))
    for name, stub in {"grade_results": lambda *a: [], "rescored": lambda *a: [], "ablation_rows": lambda *a: [],
                       "frozen_heads_outcomes": lambda *a: {}, "ablation_markdown": lambda rows: "",
                       "sft_baseline": lambda *a: {}, "ablation_metrics": lambda *a: {},
                       "mean_compute": lambda results: {}, "write_records": lambda *a: None,
                       "write_example_tree": lambda *a: None, "strategy_sweep": lambda cfg, task: None}.items():
        monkeypatch.setattr(demo, name, stub)
    cfg = demo.parse_args(["--tasks", "arith", "--problems", "2", "--sweep-problems", "0"])
    task = dataclasses.replace(cfg.tasks[0], reflective=ReflectiveStage(task="arith"))
    run = demo.run_task(cfg, task, tmp_path)
    assert "took 2.0 s for 100 tokens (50 tokens/s)" in run.summary, run.summary
    assert run.seconds["sampling"] == pytest.approx(12.0)  # the stage table still counts both passes


# -- the strategy sweep --------------------------------------------------------------------------------


def test_a_sweep_of_zero_problems_is_refused(tmp_path):
    with pytest.raises(ValueError, match="problems=0"):
        SweepSpec(out_dir=tmp_path, checkpoint="c", problems=0)


def test_the_sweep_runs_best_of_n_first_so_mcts_gets_its_token_budget(tmp_path, monkeypatch):
    ran: list[list[str]] = []
    bon = types.SimpleNamespace(run="best_of_n_4", strategy="best_of_n", budget=4, tokens_per_problem=30.0)
    monkeypatch.setattr(dsw, "initialize_config_dir", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(dsw, "compose", lambda name, overrides: overrides)
    monkeypatch.setattr(dsw, "run_search_experiment", ran.append)
    monkeypatch.setattr(dsw, "sweep_summaries", lambda folder: [bon] if ran else [])
    monkeypatch.setattr(dsw, "scaling_by_strategy", lambda runs, threshold: [])
    monkeypatch.setattr(dsw, "plot_runs", lambda runs, name, png: png)
    dsw.run_strategy_sweep(SweepSpec(out_dir=tmp_path / "sweep", checkpoint="ck", strategies=("mcts", "best_of_n"),
                                     budgets=(4,)))
    assert [next(o for o in run if o.startswith("search=")) for run in ran] == ["search=best_of_n", "search=mcts"]
    assert "search.token_budget=30" in ran[1]


@pytest.mark.parametrize("strategies", [("mcts", "beam"), ("mcts",)])
def test_a_token_matched_sweep_with_mcts_but_not_best_of_n_is_refused(tmp_path, strategies):
    """Without best_of_n MCTS ran unmatched while sweep.json said match_tokens: true, and a rerun
    of ("mcts",) on a folder of matched MCTS runs stopped with a raw ConfigMismatchError."""
    with pytest.raises(ValueError, match=r"has mcts but not best_of_n.*add best_of_n, or set match_tokens=False"):
        SweepSpec(out_dir=tmp_path, checkpoint="c", strategies=strategies, budgets=(4,))
    SweepSpec(out_dir=tmp_path, checkpoint="c", strategies=strategies, budgets=(4,), match_tokens=False)
    SweepSpec(out_dir=tmp_path, checkpoint="c", strategies=("beam",), budgets=(4,))  # no MCTS: nothing to match


def test_the_sweeps_table_and_fit_hold_only_its_own_strategies_and_budgets(tmp_path, monkeypatch):
    """A rerun of a six-strategy folder with strategies=(best_of_n, mcts), budgets=(4,) reported
    every (strategy, N) left in the folder and fitted every strategy."""
    def run(folder, strategy, budget):
        return types.SimpleNamespace(run=folder, strategy=strategy, budget=budget, tokens_per_problem=30.0,
                                     accuracy=Estimate(0.5, 0.4, 0.6))

    found = [run("beam_4", "beam_search", 4), run("beam_8", "beam_search", 8), run("best_of_n_4", "best_of_n", 4),
             run("best_of_n_8", "best_of_n", 8), run("mcts_4", "mcts", 4), run("mcts_8", "mcts", 8),
             run("my_run", "best_of_n", 4), run("mine/best_of_n_4", "best_of_n", 4)]
    fitted: list[list] = []
    monkeypatch.setattr(dsw, "initialize_config_dir", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(dsw, "compose", lambda name, overrides: overrides)
    monkeypatch.setattr(dsw, "run_search_experiment", lambda cfg: None)
    monkeypatch.setattr(dsw, "sweep_summaries", lambda folder: found)
    monkeypatch.setattr(dsw, "scaling_by_strategy", lambda runs, threshold: fitted.append(list(runs)) or [])
    plotted: list[list] = []
    monkeypatch.setattr(dsw, "plot_runs", lambda runs, name, png: plotted.append(list(runs)) or png)
    sweep = dsw.run_strategy_sweep(SweepSpec(out_dir=tmp_path / "sweep", checkpoint="ck",
                                             strategies=("best_of_n", "mcts"), budgets=(4,)))
    assert [(r["strategy"], r["budget"]) for r in sweep.budget_table] == [("best_of_n", 4), ("mcts", 4)]
    assert [r.run for r in fitted[0]] == [r.run for r in plotted[0]] == ["best_of_n_4", "mcts_4"]


def test_mcts_token_budget_rounds_best_of_ns_tokens_up(tmp_path, monkeypatch):
    # a Best-of-N run of the user's in the folder (my_run, N = 4 too) set MCTS's budget when read last
    runs = [types.SimpleNamespace(run="best_of_n_4", strategy="best_of_n", budget=4, tokens_per_problem=10.2),
            types.SimpleNamespace(run="my_run", strategy="best_of_n", budget=4, tokens_per_problem=99.0)]
    monkeypatch.setattr(dsw, "sweep_summaries", lambda folder: runs)
    assert dsw.token_budgets(SweepSpec(out_dir=tmp_path, checkpoint="c"), "mcts") == {4: 11}


def stamped_folder(tmp_path, records: str, drop: str | None = None):
    base = dict(out_dir=tmp_path, checkpoint="ckpt")
    saved = _identity(SweepSpec(**base))
    saved.pop(drop, None)
    (tmp_path / "best_of_n_4").mkdir(parents=True)
    (tmp_path / SWEEP_STAMP).write_text(json.dumps(saved))
    (tmp_path / "best_of_n_4" / "records.jsonl").write_text(records)
    return base


def test_a_sweep_whose_runs_wrote_only_empty_records_binds_nothing(tmp_path):
    base = stamped_folder(tmp_path, "")
    assert not dsw.has_rows(tmp_path)
    dsw.check_sweep_folder(SweepSpec(**{**base, "seed": 1}))  # not refused


def test_an_old_stamp_is_excused_only_for_the_keys_added_since(tmp_path):
    base = stamped_folder(tmp_path / "a", "{}\n", drop="made_from")
    dsw.check_sweep_folder(SweepSpec(**{**base, "made_from": {"config": "x"}}))  # made_from: added later
    base = stamped_folder(tmp_path / "b", "{}\n", drop="match_tokens")
    with pytest.raises(ValueError, match="match_tokens: None -> True"):
        dsw.check_sweep_folder(SweepSpec(**base))


def test_the_budget_table_lists_budgets_in_ascending_order(tmp_path):
    def run(strategy, budget):
        return types.SimpleNamespace(strategy=strategy, budget=budget, tokens_per_problem=1.0,
                                     accuracy=Estimate(0.5, 0.4, 0.6))

    sweep = StrategySweep((run("beam", 8), run("best_of_n", 4), run("best_of_n", 8)), (), tmp_path)
    rows = [line.split(" |")[0] for line in budget_markdown(sweep).splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert rows == ["| 4", "| 8"]
