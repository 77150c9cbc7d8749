"""Post-hoc sweep metrics with hand-computed values, the log-compute fit on synthetic data with a
known slope, where a curve flattens, the scaling plot, runs of several workloads in one sweep
folder kept apart, and each experiment file run end to end through the Hydra entry point
(multirun, in-process) at a tiny budget.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex
import pytest
import torch
from omegaconf import OmegaConf

from experiments import plot as plot_module
from experiments import plot_scaling as plot_scaling_module
from experiments import scaling, search, sweep_metrics
from experiments.out_dir_args import with_experiment_job_folders
from experiments.metrics import Estimate
from experiments.record_log import append_rows
from experiments.scaling import ScalingPoint, fit_log_linear, last_gaining, marginal_gains, scaling_by_strategy, verdict
from experiments.sweep_metrics import budget_ladder, run_metrics, sweep_summaries, workload_labels
from tiny_checkpoint import save_tiny_checkpoint

torch.set_num_threads(1)


def cand(answer: str, correct: bool, score: float) -> dict:
    return {"text": f"</think>Answer: {answer}", "answer": answer, "correct": correct, "score": score,
            "step_scores": [score], "num_tokens": 5, "finish": "eos"}


def row(pid: str, cands: list[dict], num_ops: int, tokens: int, strategy: str = "best_of_n", n: int = 4) -> dict:
    scores = [c["score"] for c in cands]
    chosen = scores.index(max(scores)) if cands else None
    return {
        "problem_id": pid, "question": "q", "answer": "1", "meta": {"num_ops": num_ops},
        "strategy": strategy, "config": {"n": n, "iterations": n, "seed": 0}, "chosen": chosen,
        "correct": None if chosen is None else cands[chosen]["correct"], "candidates": cands,
        "compute": {"tokens_generated": tokens, "tokens_forwarded": 2 * tokens, "scorer_tokens": 0,
                    "policy_calls": 1, "flops": 4000.0 * tokens, "wall_time_s": 0.1},
        "policy_parameters": 1000,
    }


# A: candidates 1c .9 | 2w .95 | 1c .1 | 3w .2   (chosen: .95, wrong)
# B: candidates 7w .3 | 8c .6  | 7w .4 | 7w .1   (chosen: .6, correct)
ROWS = [
    row("A", [cand("1", True, 0.9), cand("2", False, 0.95), cand("1", True, 0.1), cand("3", False, 0.2)], 2, 40),
    row("B", [cand("7", False, 0.3), cand("8", True, 0.6), cand("7", False, 0.4), cand("7", False, 0.1)], 3, 60),
]


def test_run_metrics_by_hand():
    m = run_metrics(ROWS)
    mean = lambda key: m["best_of_n"][key]["mean"]  # noqa: E731
    # N=1: the mean grade of all samples: A 2/4, B 1/4 -> 0.375 (every selector alike)
    assert [mean(f"{k}@1") for k in ("bon", "maj", "wmaj", "pass")] == [0.375] * 4
    # N=2, groups (0,1), (2,3):
    #   bon:  A .95 w, .2 w -> 0;        B .6 c, .4 w -> .5        => .25
    #   maj:  A tie 1/2 -> 1 c, tie 1/3 -> 1 c -> 1;  B tie 7/8 -> 7 w, 7 w -> 0   => .5
    #   wmaj: A 2 (.95 > .9) w, 3 (.2 > .1) w -> 0;   B 8 (.6 > .3) c, 7 w -> .5   => .25
    #   pass: A 1, 1 -> 1;  B 1, 0 -> .5   => .75
    assert (mean("bon@2"), mean("maj@2"), mean("wmaj@2"), mean("pass@2")) == (0.25, 0.5, 0.25, 0.75)
    # N=4: bon A w, B c -> .5; maj A 1 (2 votes) c, B 7 w -> .5; wmaj A 1 (1.0 > .95) c, B 7 (.8 > .6) w -> .5
    assert (mean("bon@4"), mean("maj@4"), mean("wmaj@4"), mean("pass@4")) == (0.5, 0.5, 0.5, 1.0)
    assert m["accuracy"]["mean"] == 0.5 == mean("bon@4")  # the chosen answer is Best-of-4
    assert m["accuracy_by_num_ops"]["2"]["mean"] == 0.0 and m["accuracy_by_num_ops"]["3"]["mean"] == 1.0
    # right / wrong per problem: Wilson's interval (z = 1.96): 1 of 2 -> 0.5 +- 0.4055, 2 of 2 -> [0.3424, 1]
    half = {"mean": 0.5, "low": pytest.approx(0.09453, abs=1e-5), "high": pytest.approx(0.90547, abs=1e-5)}
    assert m["all_candidates"] == {"maj@all": half, "wmaj@all": half,
                                   "pass@all": {"mean": 1.0, "low": pytest.approx(0.34238, abs=1e-5), "high": 1.0}}
    # tokens 40, 60 -> 50 per problem; C = 1000 params x 50
    assert m["compute"]["tokens_generated"] == 50 and m["compute"]["C"] == 50_000
    assert m["problems"] == 2 and m["budget"] == 4


def test_run_metrics_of_a_tree_strategy_skip_the_disjoint_group_curve():
    rows = [row("A", ROWS[0]["candidates"][:3], 2, 10, strategy="beam_search"), row("B", [], 2, 10, strategy="beam_search")]
    m = run_metrics(rows + rows[:1])  # a duplicated row is counted once
    assert "best_of_n" not in m and m["problems"] == 2
    assert m["accuracy"]["mean"] == 0.0  # A chooses 2 (.95, wrong); B has no candidate
    assert m["all_candidates"]["pass@all"]["mean"] == 0.5


def test_budget_ladder():
    assert budget_ladder(1) == [1] and budget_ladder(8) == [1, 2, 4, 8] and budget_ladder(6) == [1, 2, 4, 6]


def test_fit_recovers_a_known_slope():
    compute = 2.0 ** np.arange(10, 17)
    exact = fit_log_linear(compute, 0.1 + 0.05 * np.log2(compute))
    assert exact.slope == pytest.approx(0.05, abs=1e-12) and exact.intercept == pytest.approx(0.1, abs=1e-10)
    assert exact.r2 == pytest.approx(1.0)
    noisy = 0.1 + 0.05 * np.log2(compute) + np.random.default_rng(0).normal(0, 0.005, compute.size)
    assert fit_log_linear(compute, noisy).slope == pytest.approx(0.05, abs=0.005)
    with pytest.raises(ValueError, match="two distinct compute"):
        fit_log_linear([8.0, 8.0], [0.1, 0.2])


def test_a_flat_series_has_no_r2():
    # constant accuracy: nothing to explain, R^2 = 1 - 0/0 is undefined (not a perfect 1.00)
    flat = fit_log_linear([100.0, 200.0, 400.0], [0.5, 0.5, 0.5])
    assert flat.slope == pytest.approx(0.0, abs=1e-12) and flat.r2 is None
    assert scaling.r2_text(flat) == "n/a" and scaling.r2_text(None) == "-"
    assert fit_log_linear([100.0, 200.0, 400.0], [0.1 + 0.2, 0.3, 0.3]).r2 is None  # flat up to rounding
    assert fit_log_linear([100.0, 200.0, 400.0], [0.3, 0.3, 0.31]).r2 == pytest.approx(0.75)


def point(budget: int, compute: float, acc: float) -> ScalingPoint:
    return ScalingPoint(budget, compute, Estimate(acc, acc, acc), 1)


def test_where_the_curve_flattens():
    # doubling C each time; gains per doubling .1, .05, .005, .001 -> last step above .01 ends at N=8
    points = [point(2, 100, 0.2), point(4, 200, 0.3), point(8, 400, 0.35), point(16, 800, 0.355), point(32, 1600, 0.356)]
    assert marginal_gains(points) == pytest.approx([0.1, 0.05, 0.005, 0.001])
    assert last_gaining(points, marginal_gains(points), 0.01) == (8, True)
    assert last_gaining(points, marginal_gains(points), 0.0001) == (32, False)  # still rising at the end
    # C x4 with +.1: .05 per doubling
    assert marginal_gains([point(1, 100, 0.2), point(2, 400, 0.3)]) == pytest.approx([0.05])


ARITH = {"module": "experiments.tasks.arith", "split": "test", "count": 10, "seed": 0, "config": {"max_ops": 4}}


CONFIDENCE = {"_target_": "scorers.confidence.ConfidenceScorer"}


def write_run(folder: Path, strategy: str, budget: int, seed: int, correct: list[bool], tokens: int,
              task: dict | None = None, temperature: float = 0.7, policy_path: str = "ckpt/final",
              scorer: dict | None = None, settings: dict | None = None, run_settings: dict | None = None) -> None:
    """A run folder as experiments.search writes it: records.jsonl + config.yaml (settings: more
    fields of the strategy's config in the records; run_settings: top-level keys of config.yaml)."""
    folder.mkdir(parents=True)
    rows = [row(f"p{i}", [cand("1", ok, 0.5)], 2, tokens, strategy, budget) for i, ok in enumerate(correct)]
    for r in rows:
        r["config"].update(settings or {})
    append_rows(folder / "records.jsonl", rows)
    config = {"seed": seed, "scorer": scorer or CONFIDENCE, "task": task or ARITH,
              "policy": {"path": policy_path, "sampling": {"temperature": temperature}}, **(run_settings or {})}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))


@pytest.fixture
def synthetic_sweep(tmp_path) -> Path:
    """best_of_n: accuracy 0.2 + 0.1 per doubling of N (tokens = 10 N), two seeds; beam: flat 0.5."""
    for k, budget in enumerate((2, 4, 8)):
        for seed in (0, 1):
            good = 2 + k  # of 10 problems: .2, .3, .4
            write_run(tmp_path / f"bon-{budget}-{seed}", "best_of_n", budget, seed, [i < good for i in range(10)], 10 * budget)
            write_run(tmp_path / f"beam-{budget}-{seed}", "beam_search", budget, seed, [i < 5 for i in range(10)], 10 * budget)
    return tmp_path


def test_sweep_summaries_and_the_fit_per_strategy(synthetic_sweep):
    runs = sweep_summaries(synthetic_sweep)
    assert len(runs) == 12
    first = runs[0].table_row()
    assert first["strategy"] == "beam_search" and first["budget"] == 2 and first["seed"] == 0
    assert first["workload"] == "arith"  # one workload: just the task's name
    assert first["tokens_per_problem"] == 20 and first["compute_C"] == 20_000 and first["accuracy"] == 0.5
    series = {s.name: s for s in scaling_by_strategy(runs, threshold=0.01)}
    bon, beam = series["best_of_n"], series["beam_search"]
    assert [p.runs for p in bon.points] == [2, 2, 2]  # seeds pooled per budget
    assert bon.fit.slope == pytest.approx(0.1) and bon.fit.intercept == pytest.approx(0.2 - 0.1 * np.log2(20_000))
    assert bon.last_gaining_budget == 8 and not bon.flattened
    assert beam.fit.slope == pytest.approx(0.0, abs=1e-12) and beam.last_gaining_budget is None


def test_sweep_and_scaling_commands_write_their_files(synthetic_sweep, capsys):
    assert sweep_metrics.main([str(synthetic_sweep)]) == 0
    assert (synthetic_sweep / "sweep_metrics.csv").read_text().startswith("run,workload,strategy,scorer,budget,seed")
    assert len(json.loads((synthetic_sweep / "sweep_metrics.json").read_text())) == 12
    assert scaling.main([str(synthetic_sweep)]) == 0
    saved = json.loads((synthetic_sweep / "scaling.json").read_text())
    assert {s["name"] for s in saved["series"]} == {"best_of_n", "beam_search"}
    beam = next(s for s in saved["series"] if s["name"] == "beam_search")
    assert beam["fit"]["slope_per_doubling"] == pytest.approx(0.0, abs=1e-12) and beam["fit"]["r2"] is None  # flat
    table = capsys.readouterr()
    assert next(line for line in table.out.splitlines() if line.startswith("beam_search")).split()[3] == "n/a"
    assert "note:" not in table.err  # one workload: nothing to say
    out = plot_scaling_module.plot_scaling(synthetic_sweep, synthetic_sweep / "plots" / "scaling.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (synthetic_sweep / "empty").mkdir()
    assert sweep_metrics.main([str(synthetic_sweep / "empty")]) == 2
    assert "no records.jsonl" in capsys.readouterr().err


def test_scorers_of_one_class_with_other_settings_are_separate_series(tmp_path):
    """scorer=sprm_forward,orm (two SPRMScorer heads at different paths) and scorer.reduce=mean,min
    each stay their own series; a RandomScorer's seed (the run's ${seed}) pools like any seed."""
    sprm = {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "path": "ckpt/final", "batch_size": 16}
    scorers = {
        "sprm": sprm, "orm": {**sprm, "path": "heads/arith_orm/final"},
        "conf-mean": {**CONFIDENCE, "reduce": "mean"}, "conf-min": {**CONFIDENCE, "reduce": "min"},
    }
    for name, scorer in scorers.items():
        good = {"sprm": 6, "orm": 3, "conf-mean": 5, "conf-min": 4}[name]
        write_run(tmp_path / f"{name}-4", "best_of_n", 4, 0, [i < good for i in range(10)], 40, scorer=scorer)
    for seed in (0, 1):
        random = {"_target_": "scorers.random_scorer.RandomScorer", "seed": seed}
        write_run(tmp_path / f"random-4-{seed}", "best_of_n", 4, seed, [i < 1 for i in range(10)], 40, scorer=random)
    runs = sweep_summaries(tmp_path)
    assert {r.run: r.scorer for r in runs} == {
        "sprm-4": "SPRMScorer (scorer.path=ckpt/final)", "orm-4": "SPRMScorer (scorer.path=heads/arith_orm/final)",
        "conf-mean-4": "ConfidenceScorer (scorer.reduce=mean)", "conf-min-4": "ConfidenceScorer (scorer.reduce=min)",
        "random-4-0": "RandomScorer", "random-4-1": "RandomScorer",
    }
    series = {s.name: s for s in scaling_by_strategy(runs, threshold=0.01)}
    assert series["best_of_n (SPRMScorer (scorer.path=heads/arith_orm/final))"].points[0].accuracy.mean == 0.3
    assert series["best_of_n (ConfidenceScorer (scorer.reduce=min))"].points[0].accuracy.mean == 0.4
    assert series["best_of_n (RandomScorer)"].points[0].runs == 2  # seeds pooled
    assert len(series) == 5


def test_a_sweep_folder_that_cannot_be_written_still_gets_its_table(synthetic_sweep, capsys, monkeypatch):
    # a shared (read-only) sweep folder: the CSV was written before the table was printed, a traceback and no table
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(synthetic_sweep / "sweep_metrics.csv"))

    monkeypatch.setattr(sweep_metrics, "write_sweep_table", read_only)
    assert sweep_metrics.main([str(synthetic_sweep)]) == 2
    out, err = capsys.readouterr()
    assert "beam_search" in out and "best_of_n" in out  # the table
    assert err.endswith(f"error: cannot write the sweep's tables into {synthetic_sweep} (Read-only file system)\n")


def test_a_missing_sweep_folder_is_named_as_missing(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    for command in (lambda: plot_module.main(["scaling", str(missing)]), lambda: scaling.main([str(missing)]),
                    lambda: sweep_metrics.main([str(missing)])):
        assert command() == 2
        assert capsys.readouterr().err == f"error: {missing}: no such folder\n"
    a_file = tmp_path / "records.txt"
    a_file.write_text("x")
    assert plot_module.main(["scaling", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: {a_file}: not a folder\n"


@pytest.fixture
def two_workload_sweep(tmp_path) -> Path:
    """budget_sweep rerun with another task.count into the same folder: Best-of-4 on 10 problems
    (seeds 0, 1: 2 of 10 right) and a greedy run beside them (temperature 0: same workload),
    plus Best-of-4 on the first 4 of them (all 4 right: problem ids p0..p3 overlap the others)."""
    for seed in (0, 1):
        write_run(tmp_path / f"count10-bon4-{seed}", "best_of_n", 4, seed, [i < 2 for i in range(10)], 40)
    write_run(tmp_path / "count10-greedy", "best_of_n", 1, 0, [i < 1 for i in range(10)], 10, temperature=0.0)
    write_run(tmp_path / "count4-bon4-0", "best_of_n", 4, 0, [True] * 4, 40, task={**ARITH, "count": 4})
    return tmp_path


def test_runs_of_different_workloads_are_grouped_apart_not_pooled(two_workload_sweep, capsys):
    runs = sweep_summaries(two_workload_sweep)
    by_run = {r.run: r.workload for r in runs}
    assert by_run == {"count10-bon4-0": "arith (task.count=10)", "count10-bon4-1": "arith (task.count=10)",
                      "count10-greedy": "arith (task.count=10)", "count4-bon4-0": "arith (task.count=4)"}
    series = {s.name: s for s in scaling_by_strategy(runs)}
    assert set(series) == {"best_of_n [arith (task.count=10)]", "best_of_n [arith (task.count=4)]",
                           "greedy [arith (task.count=10)]"}
    ten, four = series["best_of_n [arith (task.count=10)]"].points, series["best_of_n [arith (task.count=4)]"].points
    assert [(p.budget, p.runs, p.accuracy.mean) for p in ten] == [(4, 2, 0.2)]  # the seeds still pool
    assert [(p.budget, p.runs, p.accuracy.mean) for p in four] == [(4, 1, 1.0)]

    def note() -> str:
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("note: ") and "2 workloads" in err[0]
        return err[0]

    assert sweep_metrics.main([str(two_workload_sweep)]) == 0
    assert "arith (task.count=10): 3 runs; arith (task.count=4): 1 run" in note()
    rows = json.loads((two_workload_sweep / "sweep_metrics.json").read_text())
    assert sorted({r["workload"] for r in rows}) == ["arith (task.count=10)", "arith (task.count=4)"]
    assert scaling.main([str(two_workload_sweep)]) == 0
    note()
    saved = json.loads((two_workload_sweep / "scaling.json").read_text())["series"]
    assert sorted((s["workload"], s["points"][0]["runs"]) for s in saved if s["name"].startswith("best_of_n")) == [
        ("arith (task.count=10)", 2), ("arith (task.count=4)", 1)]
    assert plot_module.main(["scaling", str(two_workload_sweep)]) == 0 and (two_workload_sweep / "scaling.png").is_file()
    note()


def test_a_run_saved_before_a_setting_joins_the_series_of_runs_that_ran_alike(tmp_path):
    # every policy yaml gained sampling.separator_match (suffix: as runs ran before it existed); a
    # sweep folder of older and newer runs was two workloads ("unset" against "suffix")
    target = {"_target_": "policies.sampling_config.SamplingConfig", "temperature": 0.7}
    for name, sampling in (("old", target), ("new", {**target, "separator_match": "suffix"}),
                           ("exact", {**target, "separator_match": "exact"})):
        write_run(tmp_path / name, "best_of_n", 2, 0, [True, False], 10)
        config = OmegaConf.load(tmp_path / name / "config.yaml")
        config.policy.sampling = sampling
        (tmp_path / name / "config.yaml").write_text(OmegaConf.to_yaml(config))
    labels = {r.run: r.workload for r in sweep_summaries(tmp_path)}
    assert labels == {"old": "arith (policy.sampling.separator_match=suffix)",
                      "new": "arith (policy.sampling.separator_match=suffix)",
                      "exact": "arith (policy.sampling.separator_match=exact)"}
    shutil.rmtree(tmp_path / "exact")
    assert {r.workload for r in sweep_summaries(tmp_path)} == {"arith"}


def test_workload_labels_name_the_task_and_the_keys_that_differ():
    def key(task: dict, path: str = "ckpt/final", **sampling) -> str:
        return json.dumps({"task": task, "policy": {"path": path, "sampling": sampling}}, sort_keys=True)

    gsm8k = {"module": "experiments.tasks.gsm8k", "split": "test", "count": None, "config": {"path": None, "shuffle": False}}
    labels = workload_labels([key(ARITH), key(gsm8k), key({**gsm8k, "split": "train"}), key(ARITH, "other/final")])
    assert sorted(labels.values()) == ["arith (policy.path=ckpt/final)", "arith (policy.path=other/final)",
                                       "gsm8k (task.split=test)", "gsm8k (task.split=train)"]
    assert list(workload_labels([key(ARITH), key(gsm8k)]).values()) == ["arith", "gsm8k"]  # tasks differ: names do
    many = workload_labels([key(ARITH, temperature=0.6, top_p=1.0), key({**ARITH, "count": 5, "seed": 1}, top_p=0.9)])
    assert sorted(many.values()) == ["arith (task.count=10, task.seed=0, policy.sampling.temperature=0.6, +1 more)",
                                     "arith (task.count=5, task.seed=1, policy.sampling.temperature=unset, +1 more)"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


def test_budget_sweep_rerun_with_another_task_count_is_two_workloads(ckpt, tmp_path, monkeypatch, capsys):
    """The audit's case: experiment=budget_sweep always writes to one folder; a rerun at another
    task.count lands beside the first runs and must not be pooled with them as a seed."""
    sweep = tmp_path / "budget_sweep"
    for count in (2, 4):
        monkeypatch.setattr(sys, "argv", [
            "search", "experiment=budget_sweep", f"hydra.sweep.dir={sweep}", f"policy.path={ckpt}", f"task.count={count}",
            "policy.sampling.max_total_tokens=8", "policy.sampling.max_step_tokens=4", "progress=false",
            "search=best_of_n", "budget=4", "seed=0"])
        search.main()
    capsys.readouterr()
    assert scaling.main([str(sweep)]) == 0
    assert "note: " in capsys.readouterr().err
    saved = json.loads((sweep / "scaling.json").read_text())["series"]
    assert sorted((s["workload"], s["points"][0]["runs"]) for s in saved) == [
        ("arith (task.count=2)", 1), ("arith (task.count=4)", 1)]  # not "budget 4, runs 2"
    assert sorted(r.problems for r in sweep_summaries(sweep)) == [2, 4]


@pytest.mark.parametrize("experiment,narrow", [
    ("budget_sweep", ["budget=4", "seed=0"]),                 # all six strategies at N=4
    ("scorer_sweep", ["budget=2", "search=best_of_n"]),       # all three scorers
])
def test_experiment_runs_end_to_end_through_the_entry_point(experiment, narrow, ckpt, tmp_path, monkeypatch):
    sweep = tmp_path / experiment
    argv = ["search", f"experiment={experiment}", f"hydra.sweep.dir={sweep}", f"policy.path={ckpt}", "task.count=2",
            "policy.sampling.max_total_tokens=8", "policy.sampling.max_step_tokens=4", "progress=false"] + narrow
    monkeypatch.setattr(sys, "argv", argv)
    search.main()
    runs = sweep_summaries(sweep)
    if experiment == "budget_sweep":
        assert sorted(r.strategy for r in runs) == ["beam_search", "best_of_n", "dvts", "mcts", "particle_filtering", "rebase"]
    else:
        assert sorted(r.scorer for r in runs) == ["ConfidenceScorer", "OutcomeOracleScorer", "RandomScorer"]
    assert all(r.problems == 2 and r.compute_C > 0 for r in runs)
    assert plot_scaling_module.main([str(sweep)]) == 0 and (sweep / "scaling.png").is_file()
    # the sweep's folder names its experiment, its jobs' do not: a sweep begun before a change there resumes
    assert not any("experiment=" in p.parent.name for p in sweep.rglob("records.jsonl"))


def test_the_sweep_table_keeps_its_columns_for_a_long_strategy_name():
    # before: the strategy column was 12 wide, so particle_filtering (18) pushed its row's scorer,
    # N and accuracy out of line with the header's
    def summary(strategy: str) -> sweep_metrics.RunSummary:
        return sweep_metrics.RunSummary("run", "arith", strategy, "ConfidenceScorer", 8, 0, 100, 227.0, 8e8, 1.6e9,
                                        Estimate(0.22, 0.14, 0.30), ())

    lines = sweep_metrics.format_table([summary("beam_search"), summary("particle_filtering")]).splitlines()
    starts = [line.index("ConfidenceScorer") for line in lines[1:]]
    assert starts == [lines[0].index("scorer")] * 2
    assert len({len(line) for line in lines}) == 1


def test_a_run_with_fewer_problems_than_its_workload_is_named(synthetic_sweep, capsys):
    """A run still being written (or stopped) covers fewer problems: each command says which."""
    rows = (synthetic_sweep / "beam-4-1" / "records.jsonl").read_text().splitlines()
    (synthetic_sweep / "beam-4-1" / "records.jsonl").write_text("\n".join(rows[:3]) + "\n")
    expected = ("note: 1 run holds fewer problems than their workload asks (still running, or stopped? "
                "rerun its command to finish it): beam-4-1 (3 of 10)")
    assert sweep_metrics.main([str(synthetic_sweep)]) == 0
    assert capsys.readouterr().err.strip() == expected
    assert scaling.main([str(synthetic_sweep)]) == 0
    assert capsys.readouterr().err.strip() == expected
    assert sweep_metrics.partial_note(sweep_summaries(synthetic_sweep)) == expected


def test_a_compute_matched_mcts_run_reports_its_n_alone_as_in_the_sweep(tmp_path, capsys):
    """MCTS at N = 4 matched to Best-of-4's tokens runs up to 16 N = 64 simulations: its own
    metrics (`sweep_metrics RUN`, the search's metrics.json) say N = 4, as the sweep table does."""
    run = tmp_path / "mcts_4"
    write_run(run, "mcts", 64, 0, [True, False], 40, settings={"token_budget": 40})
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({**config, "budget": 4})))
    assert sweep_metrics.main([str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == 4
    assert [r.budget for r in sweep_summaries(tmp_path)] == [4]
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert run_metrics(rows)["budget"] == 64  # without the run's config: its simulations


def test_strategies_with_other_settings_are_separate_series(tmp_path):
    """search=particle_filtering search.temperature=0.2,1.0 across budgets: two series, each of its
    budgets; a setting that differs only with the run (n, seed, MCTS's token budget) splits nothing."""
    for budget in (4, 8):
        for temperature, good in ((0.2, 6), (1.0, 3)):
            write_run(tmp_path / f"pf-{temperature}-{budget}", "particle_filtering", budget, 0,
                      [i < good for i in range(10)], 10 * budget, settings={"temperature": temperature})
        write_run(tmp_path / f"mcts-{budget}", "mcts", budget, 0, [i < 4 for i in range(10)], 10 * budget,
                  settings={"token_budget": 10 * budget, "seed": budget})
    runs = sweep_summaries(tmp_path)
    assert {r.run: r.strategy for r in runs} == {
        "pf-0.2-4": "particle_filtering (temperature=0.2)", "pf-0.2-8": "particle_filtering (temperature=0.2)",
        "pf-1.0-4": "particle_filtering (temperature=1.0)", "pf-1.0-8": "particle_filtering (temperature=1.0)",
        "mcts-4": "mcts", "mcts-8": "mcts",
    }
    series = {s.name: s for s in scaling_by_strategy(runs, threshold=0.01)}
    assert [p.accuracy.mean for p in series["particle_filtering (temperature=0.2)"].points] == [0.6, 0.6]
    assert [p.accuracy.mean for p in series["particle_filtering (temperature=1.0)"].points] == [0.3, 0.3]
    assert len(series) == 3


def test_labels_that_would_clash_name_every_setting_that_tells_them_apart(tmp_path):
    # four differing settings: lookahead_temperature, the one telling two runs apart, hid behind
    # "+1 more", and the twin series was marked " #2" only
    variants = {"a": {"lookahead": 1}, "b": {"lookahead": 1, "lookahead_temperature": 0.5},
                "c": {"batching": "continuous"}, "d": {"chunk": 2}}
    for name, settings in variants.items():
        run_settings = {k: v for k, v in settings.items() if k in ("batching", "chunk")}
        search = {k: v for k, v in settings.items() if k not in run_settings}
        write_run(tmp_path / name, "beam_search", 8, 0, [True, False], 80, settings=search, run_settings=run_settings)
    labels = {r.run: r.strategy for r in sweep_summaries(tmp_path)}
    assert len(set(labels.values())) == 4 and not any("#" in label for label in labels.values())
    assert "lookahead_temperature=0.5" in labels["b"] and "lookahead_temperature=null" in labels["a"]  # a: as it ran
    assert labels["c"].endswith("+1 more)") and labels["d"].endswith("+1 more)")  # unique already: kept short


def test_a_run_saved_before_a_setting_existed_is_one_series_with_a_newer_one_of_its_value(tmp_path):
    # DVTS rows written before search.lookahead and lookahead_temperature existed ran with 0 and the
    # policy's temperature (ADDED_SETTINGS): they were a series of their own ("lookahead=unset");
    # without lookahead its temperature does nothing, so null (older rows) and 0.0 (the preset's) pool
    write_run(tmp_path / "old-4", "dvts", 4, 0, [True, False], 40)
    write_run(tmp_path / "new-8", "dvts", 8, 0, [True, True], 80, settings={"lookahead": 0, "lookahead_temperature": None})
    write_run(tmp_path / "greedy-la-8", "dvts", 8, 1, [True, True], 80, settings={"lookahead": 0, "lookahead_temperature": 0.0})
    labels = {r.run: r.strategy for r in sweep_summaries(tmp_path)}
    assert labels["old-4"] == labels["new-8"] == labels["greedy-la-8"] and "lookahead_temperature" not in labels["old-4"]
    series = {s.name: s for s in scaling_by_strategy(sweep_summaries(tmp_path))}
    assert [(p.budget, p.runs) for p in series[labels["old-4"]].points] == [(4, 1), (8, 2)]


def test_runs_with_other_batching_or_chunks_are_separate_series(tmp_path):
    """+batching=continuous draws each problem's samples alone and chunk fixes the chunks' seeds:
    such runs at seed 0 were pooled with the lockstep run as two seeds of one point."""
    for budget in (4, 8):
        write_run(tmp_path / f"lockstep-{budget}", "beam_search", budget, 0, [i < 2 for i in range(10)], 10 * budget)
        write_run(tmp_path / f"said-lockstep-{budget}", "beam_search", budget, 1, [i < 2 for i in range(10)],
                  10 * budget, run_settings={"batching": "lockstep"})  # the default, written out: one series
        write_run(tmp_path / f"continuous-{budget}", "beam_search", budget, 0, [i < 6 for i in range(10)], 10 * budget,
                  run_settings={"batching": "continuous"})
    runs = sweep_summaries(tmp_path)
    assert {r.strategy for r in runs} == {"beam_search (batching=continuous)", "beam_search (batching=lockstep)"}
    series = {s.name: s for s in scaling_by_strategy(runs, threshold=0.01)}
    assert [p.accuracy.mean for p in series["beam_search (batching=continuous)"].points] == [0.6, 0.6]
    assert [(p.runs, p.accuracy.mean) for p in series["beam_search (batching=lockstep)"].points] == [(2, 0.2), (2, 0.2)]

    chunks = tmp_path / "chunks"
    for chunk in (8, 32):
        write_run(chunks / f"chunk-{chunk}", "beam_search", 4, 0, [True] * 10, 40, run_settings={"chunk": chunk})
    assert sorted(r.strategy for r in sweep_summaries(chunks)) == ["beam_search (chunk=32)", "beam_search (chunk=8)"]


@pytest.mark.parametrize("out, message", [
    ("a_folder", "--out is an existing folder; give a file path such as {out}/scaling.png"),
    ("a_file/scaling.png", "--out needs a folder here, but it is an existing file"),
    ("scaling.txt", "--out must end in an image suffix matplotlib writes"),
])
def test_scaling_out_that_cannot_be_an_image_is_a_one_line_error(synthetic_sweep, capsys, out, message):
    (synthetic_sweep / "a_folder").mkdir()
    (synthetic_sweep / "a_file").write_text("x")
    target = synthetic_sweep / out
    assert plot_module.main(["scaling", str(synthetic_sweep), "--out", str(target)]) == 2
    out_text, err = capsys.readouterr()
    named = synthetic_sweep / "a_file" if out.startswith("a_file") else target
    assert out_text == "" and err.startswith(f"error: {named}: ") and err.count("\n") == 1
    assert message.format(out=target) in err
    assert not list(synthetic_sweep.rglob("*.png"))


def test_scaling_out_without_suffix_is_written_where_it_says(synthetic_sweep, capsys):
    out = synthetic_sweep / "scaling_plot"
    assert plot_module.main(["scaling", str(synthetic_sweep), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # was written to scaling_plot.png instead
    assert not (synthetic_sweep / "scaling_plot.png").exists()


def test_scaling_plot_legend_says_where_a_series_flattens_by_the_threshold(synthetic_sweep, monkeypatch):
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    labels = {}
    for threshold in (0.01, 0.2):  # best_of_n gains 0.1 per doubling of compute; beam 0
        plot_scaling_module.plot_scaling(synthetic_sweep, synthetic_sweep / f"s{threshold}.png", threshold)
        labels[threshold] = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert labels[0.01] == ["beam_search: +0.000/doubling, flat", "best_of_n: +0.100/doubling"]
    assert labels[0.2] == ["beam_search: +0.000/doubling, flat", "best_of_n: +0.100/doubling, flat"]


def test_twelve_series_get_twelve_colours(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for k in range(12):  # a sweep of 6 strategies x 2 scorers has 12 series in one workload
        for budget in (2, 4):
            write_run(tmp_path / f"s{k}-{budget}", f"strategy{k:02d}", budget, 0, [True, False], 10 * budget)
    plot_scaling_module.plot_scaling(tmp_path, tmp_path / "scaling.png")
    ax = figures[-1].axes[0]
    assert len(figures[-1].legends[0].get_texts()) == 12  # beside the axes: more than CROWDED series
    colours = {to_hex(line.get_color()) for line in ax.get_lines()}  # points and fitted lines
    assert len(colours) == 12  # the default cycle has 10: two pairs were alike


def test_reasoning_modes_run_in_folders_of_their_own(ckpt, tmp_path, monkeypatch, capsys):
    # experiment= was left out of the folder name: reasoning_medium after reasoning_low was
    # refused as "a different config", and its suggested fix reran low
    monkeypatch.chdir(tmp_path)
    for mode in ("reasoning_low", "reasoning_medium"):
        monkeypatch.setattr(sys, "argv", [
            "search", f"experiment={mode}", f"policy.path={ckpt}", "task.count=1", "policy.sampling.max_total_tokens=8",
            "policy.sampling.max_step_tokens=4", "progress=false"])
        search.main()
    runs = sorted(p.parent.name for p in (tmp_path / "outputs" / "search").glob("*/records.jsonl"))
    assert len(runs) == 2 and all(name.startswith("experiment=reasoning_") for name in runs), runs


def test_a_sweep_over_experiments_gives_each_its_folder_and_an_experiment_sweep_keeps_its_names(ckpt, tmp_path, monkeypatch):
    # -m experiment=reasoning_low,reasoning_medium put both jobs in one folder: the second was refused
    monkeypatch.chdir(tmp_path)
    small = [f"policy.path={ckpt}", "task.count=1", "policy.sampling.max_total_tokens=8",
             "policy.sampling.max_step_tokens=4", "progress=false"]
    monkeypatch.setattr(sys, "argv", with_experiment_job_folders([  # what `python -m experiments.search` does first
        "search", "-m", "experiment=reasoning_low,reasoning_medium", f"hydra.sweep.dir={tmp_path / 'modes'}", *small]))
    search.main()
    runs = sorted(p.parent.name for p in (tmp_path / "modes").glob("*/records.jsonl"))
    assert [name.split(",")[0] for name in runs] == ["experiment=reasoning_low", "experiment=reasoning_medium"], runs
    # a sweep with one experiment fixed keeps the folder names it had before this change (it resumes)
    fixed = ["search", "-m", "experiment=reasoning_low", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'fixed'}", *small]
    assert with_experiment_job_folders(fixed) == fixed
    monkeypatch.setattr(sys, "argv", fixed)
    search.main()
    runs = sorted(p.parent.name for p in (tmp_path / "fixed").glob("*/records.jsonl"))
    assert len(runs) == 2 and not any("experiment" in name for name in runs), runs
    # an experiment that sets the sweep (budget_sweep) names the sweep's folder, not each job's
    monkeypatch.setattr(sys, "argv", ["search", "experiment=budget_sweep", "hydra.sweeper.params.search=best_of_n",
                                      "hydra.sweeper.params.budget=2", "hydra.sweeper.params.seed=0",
                                      f"hydra.sweep.dir={tmp_path / 'budgets'}", *small])
    search.main()
    (run,) = [p.parent.name for p in (tmp_path / "budgets").glob("*/records.jsonl")]
    assert run.startswith("budget=2,policy.path=") and "experiment" not in run


def test_runs_short_of_their_task_count_and_folders_without_rows_are_named_not_fatal(synthetic_sweep, capsys):
    # two jobs of a killed sweep at task.count=60 held 38 and 34 rows: only the 34 was named, "34 of
    # 38"; and one job's empty records.jsonl (its first append met a full disk) failed every reader
    for name in ("bon-2-0", "bon-2-1"):
        config = OmegaConf.load(synthetic_sweep / name / "config.yaml")
        config.task.count = 12
        (synthetic_sweep / name / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (synthetic_sweep / "empty-job").mkdir()
    (synthetic_sweep / "empty-job" / "records.jsonl").write_text("")
    # a job killed before its first chunk ended: its config.yaml (and Hydra's copy), no records.jsonl yet
    (synthetic_sweep / "killed-job" / ".hydra").mkdir(parents=True)
    for folder in (synthetic_sweep / "killed-job", synthetic_sweep / "killed-job" / ".hydra"):
        (folder / "config.yaml").write_text((synthetic_sweep / "bon-4-0" / "config.yaml").read_text())
    assert sweep_metrics.main([str(synthetic_sweep)]) == 0
    err = capsys.readouterr().err
    assert "bon-2-0 (10 of 12)" in err and "bon-2-1 (10 of 12)" in err
    assert ("note: left out 2 run folders with no complete row yet (not started, or its first write failed): "
            "empty-job, killed-job\n") in err
    assert len(sweep_summaries(synthetic_sweep)) == 12
    assert plot_scaling_module.main([str(synthetic_sweep)]) == 0



def test_a_falling_series_is_called_falling_not_flat(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for budget, good in ((4, 5), (8, 2)):  # beam search lost accuracy from N=4 to N=8
        write_run(tmp_path / f"beam-{budget}", "beam_search", budget, 0, [i < good for i in range(10)], 10 * budget)
    plot_scaling_module.plot_scaling(tmp_path, tmp_path / "s.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert labels == ["beam_search: -0.300/doubling, falling"]


@pytest.mark.parametrize("strategies", [1, 3, 4, 9])
def test_long_workload_labels_go_beside_the_axes_which_keep_their_size(tmp_path, monkeypatch, strategies):
    # two workloads' labels squeezed the axes to a strip (legend inside, then below them: with
    # 6-8 series the axes collapsed); "." was titled by nothing
    figures = []
    original = plot_scaling_module.Figure.savefig
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), original(self, *a, **k)))
    for strategy in ["best_of_n", "beam_search", "dvts", "mcts", "rebase", "particle_filtering", "s7", "s8", "s9"][:strategies]:
        for temperature in (0.7, 0.9):  # two workloads told apart by long policy paths
            for budget in (2, 4):
                write_run(tmp_path / "sweep" / f"{strategy}-t{temperature}-{budget}", strategy, budget, 0, [True, False],
                          10 * budget, temperature=temperature,
                          policy_path=f"/very/long/folder/of/checkpoints/{temperature}/final")
    monkeypatch.chdir(tmp_path / "sweep")
    plot_scaling_module.plot_scaling(Path("."), tmp_path / "s.png")
    fig = figures[-1]
    assert fig.axes[0].get_legend() is None and len(fig.legends) == 1  # beside, not inside the axes
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(texts) == 2 * strategies
    assert all(max(len(line) for line in t.splitlines()) <= plot_scaling_module.LABEL_WIDTH for t in texts)
    axes = fig.axes[0].get_position()  # drawn: the figure's fraction the axes got
    width, height = fig.get_size_inches()
    assert 3.0 <= axes.height * height <= 5.0 and axes.width * width >= 5.0  # as with a small legend (18 labels
    # in one column stretched the axes to 12 in)
    assert fig.axes[0].get_title() == "Test-time search scaling: sweep"  # "." named by its folder


def test_the_table_and_the_legend_give_one_verdict_and_a_drop_after_the_peak_is_falling(tmp_path, monkeypatch, capsys):
    # particle filtering 0.125 -> 0.25 -> 0.125 was "flat after N=8" in the legend and "-" / "N=8
    # (flattens after)" in the table: it fell
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for budget, good in ((4, 1), (8, 2), (16, 1)):
        write_run(tmp_path / f"pf-{budget}", "particle_filtering", budget, 0, [i < good for i in range(8)], 10 * budget)
    for budget, good in ((4, 4), (8, 2)):
        write_run(tmp_path / f"beam-{budget}", "beam_search", budget, 0, [i < good for i in range(8)], 10 * budget)
    plot_scaling_module.plot_scaling(tmp_path, tmp_path / "s.png")
    legend = figures[-1].legends[0]  # a label over 48 characters: beside the axes
    labels = [t.get_text().replace("\n", " ") for t in legend.get_texts()]
    assert labels == ["beam_search: -0.250/doubling, falling", "particle_filtering: +0.000/doubling, falling after N=8"]
    assert scaling.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert next(line for line in table if line.startswith("particle_filtering")).endswith("falling after N=8")
    assert next(line for line in table if line.startswith("beam_search")).endswith(" falling")
    saved = {s["name"]: s for s in json.loads((tmp_path / "scaling.json").read_text())["series"]}
    assert saved["particle_filtering"]["verdict"] == "falling after N=8"
    rising = scaling.SeriesScaling("s", "w", (point(2, 1, 0.1), point(4, 2, 0.3)), None, (0.2,), 4, False)
    assert scaling.verdict(rising) == "rising to N=4"
    # 11/24 summed two ways: 0.45833333333333337 and 0.4583333333333333 are one accuracy, not a fall
    level = scaling.SeriesScaling("s", "w", (point(1, 1, 0.0), point(4, 4, 0.45833333333333337), point(16, 16, 0.4583333333333333)),
                                  None, (0.23, 0.0), 4, True)
    assert scaling.verdict(level) == "flat after N=4"


def test_compute_flops_puts_every_forward_on_the_axis(synthetic_sweep, monkeypatch, capsys):
    # C counts the policy's sampling alone: a search scoring with a PRM spent more than its C says
    runs = sweep_summaries(synthetic_sweep)
    tokens = {s.name: s for s in scaling_by_strategy(runs)}
    flops = {s.name: s for s in scaling_by_strategy(runs, axis=scaling.COMPUTE_AXES["flops"])}
    assert [p.compute for p in flops["best_of_n"].points] == [4 * p.compute for p in tokens["best_of_n"].points]
    assert flops["best_of_n"].fit.slope == pytest.approx(tokens["best_of_n"].fit.slope)
    assert [p.problems for p in flops["best_of_n"].points] == [10, 10, 10]
    assert scaling.main([str(synthetic_sweep)]) == 0
    assert scaling.main([str(synthetic_sweep), "--compute", "flops"]) == 0
    saved = json.loads((synthetic_sweep / "scaling_flops.json").read_text())
    assert saved["compute"] == "flops" and saved["series"][0]["points"][0]["compute"] == 4 * 20_000
    assert json.loads((synthetic_sweep / "scaling.json").read_text())["compute"] == "tokens"  # replaced before
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    assert plot_scaling_module.main([str(synthetic_sweep), "--compute", "flops"]) == 0
    assert figures[-1].axes[0].get_xlabel().startswith("FLOPs per problem (policy and scorer forwards)")
    monkeypatch.undo()
    assert plot_scaling_module.main([str(synthetic_sweep), "--compute", "flops"]) == 0
    assert (synthetic_sweep / "scaling_flops.png").is_file()


def test_a_run_with_compute_zero_is_named(synthetic_sweep, capsys):
    # records without policy_parameters: C = 0, the series' fit dropped in silence
    path = synthetic_sweep / "bon-8-0" / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "policy_parameters"}) + "\n" for r in rows))
    assert scaling.main([str(synthetic_sweep)]) == 0
    err = capsys.readouterr().err
    assert "note: 1 run with tokens compute 0 cannot sit on the log axis" in err and err.rstrip().endswith("bon-8-0")


def test_intervals_of_right_or_wrong_problems_are_wilsons():
    # the percentile bootstrap gave 0 of 8 the interval [0, 0] and held a true 0.125 in 68% of runs
    from experiments.metrics import bootstrap, interval, wilson

    for count in range(1, 41):  # the bounds hold the mean exactly (0 of 10's low was 2.8e-17, a negative error bar)
        for successes in range(count + 1):
            e = wilson(successes, count)
            assert 0.0 <= e.low <= e.mean <= e.high <= 1.0
    assert wilson(0, 10).low == 0.0 and wilson(10, 10).high == 1.0
    none = interval([0.0] * 8)
    assert (none.mean, none.low) == (0.0, 0.0) and none.high == pytest.approx(0.3244, abs=1e-4)
    assert interval([1.0] * 8).low == pytest.approx(1 - 0.3244, abs=1e-4)
    one = wilson(1, 8)
    assert (one.low, one.high) == (pytest.approx(0.02235, abs=1e-4), pytest.approx(0.47088, abs=1e-4))
    pooled = [0.5, 1.0, 0.0, 0.25]  # seeds pooled: fractions, bootstrapped
    assert interval(pooled) == bootstrap(pooled)
    rng = np.random.default_rng(0)  # coverage at p = 0.125 over 400 draws of 8 problems
    held = [(lambda e: e.low <= 0.125 <= e.high)(interval(list((rng.random(8) < 0.125).astype(float)))) for _ in range(400)]
    assert sum(held) / 400 >= 0.9


def test_a_run_of_compute_zero_pooled_with_another_seed_leaves_its_point_off_the_fit(synthetic_sweep, capsys):
    # pooled with seed 1, the zero run's point sat at half the compute and the series kept a fit
    path = synthetic_sweep / "bon-8-0" / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "policy_parameters"}) + "\n" for r in rows))
    (bon,) = [s for s in scaling_by_strategy(sweep_summaries(synthetic_sweep)) if s.name == "best_of_n"]
    assert bon.fit is None and [p.compute for p in bon.points if p.budget == 8] == [0.0]


def test_a_series_with_a_point_of_compute_zero_gets_no_gain_and_no_verdict(tmp_path, capsys):
    # its 0 -> 0.8 rise was a gain of 0.0 and the series "flat", in the table and the legend
    for budget, good in ((4, 0), (8, 8)):
        write_run(tmp_path / f"bon-{budget}", "best_of_n", budget, 0, [i < good for i in range(10)], 10 * budget)
    path = tmp_path / "bon-4" / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "policy_parameters"}) + "\n" for r in rows))
    (bon,) = scaling_by_strategy(sweep_summaries(tmp_path))
    assert bon.gains == (None,) and verdict(bon) == "-"
    assert scaling.main([str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "scaling.json").read_text())["series"][0]
    assert saved["gains_per_doubling"] == [None] and saved["verdict"] == "-"
    assert "flat" not in capsys.readouterr().out
    assert plot_scaling_module.main([str(tmp_path)]) == 0  # the other point is drawn


def test_a_plot_with_no_run_of_compute_above_zero_is_an_error(tmp_path, capsys):
    # empty axes were drawn and "wrote ..." printed, exit 0
    for budget in (4, 8):
        write_run(tmp_path / f"bon-{budget}", "best_of_n", budget, 0, [True, False], 10 * budget)
        path = tmp_path / f"bon-{budget}" / "records.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "policy_parameters"}) + "\n" for r in rows))
    assert plot_scaling_module.main([str(tmp_path)]) == 2
    assert "above 0 to place on a log axis" in capsys.readouterr().err
    assert not (tmp_path / "scaling.png").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x"])
def test_a_threshold_that_is_no_finite_number_is_a_usage_error(synthetic_sweep, capsys, value):
    # nan called every series flat and wrote NaN, which is no JSON, into scaling.json
    for command in (scaling.main, plot_scaling_module.main):
        with pytest.raises(SystemExit) as stop:
            command([str(synthetic_sweep), f"--threshold={value}"])
        assert stop.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    assert not (synthetic_sweep / "scaling.json").exists()


def test_runs_of_one_budget_and_seed_are_not_pooled_as_draws(tmp_path, capsys):
    # four MCTS token budgets under one budget=8 made one point at their mean compute, in silence
    for tokens in (50, 100, 200):
        write_run(tmp_path / f"mcts-{tokens}", "mcts", 64, 0, [True, False], tokens, settings={"token_budget": tokens},
                  run_settings={"budget": 8})
    assert scaling.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "runs mcts-100, mcts-200, mcts-50 are all mcts at N=8 with seed 0" in err
    assert "filed under the top-level budget=" in err
    assert plot_scaling_module.main([str(tmp_path)]) == 2
    assert sweep_metrics.main([str(tmp_path)]) == 0  # the table lists runs, one row each


def test_rows_or_configs_that_lack_what_the_metrics_read_name_their_file(synthetic_sweep, capsys):
    path = synthetic_sweep / "bon-8-0" / "records.jsonl"
    good = path.read_text()
    rows = [json.loads(line) for line in good.splitlines()]
    # the last five counted in silence ("false" as right; Infinity and NaN as numbers) or raised a bare TypeError
    for broken, message in ((lambda r: r["candidates"][0].pop("score"), "candidates[0] lacks 'score'"),
                            (lambda r: r["compute"].pop("tokens_generated"), "lacks a finite number for compute.tokens_generated"),
                            (lambda r: r["compute"].pop("flops"), "lacks a finite number for compute.flops"),
                            (lambda r: r["candidates"][0].update(correct="false"), "candidates[0] has correct='false'"),
                            (lambda r: r.update(correct="false"), "has correct='false', not true or false"),
                            (lambda r: r["compute"].update(tokens_generated=float("inf")), "compute.tokens_generated"),
                            (lambda r: r["candidates"][0].update(score=float("nan")), "candidates[0] has score=nan"),
                            (lambda r: r.update(meta=None), "has meta=None, not an object"),
                            # tracebacks (KeyError, TypeError) or an error naming no file before
                            (lambda r: r["config"].pop("n"), "has config.n=None, not a strategy's name"),
                            (lambda r: r["config"].update(n=None), "has config.n=None"),
                            (lambda r: r.update(config=None), "has config=None"),
                            (lambda r: r.update(policy_parameters="3.5M"), "has policy_parameters='3.5M'")):
        edited = json.loads(json.dumps(rows))
        broken(edited[-1])
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
        for command in (sweep_metrics.main, scaling.main):
            assert command([str(synthetic_sweep)]) == 2
            err = capsys.readouterr().err
            assert f"error: {path}: the row of problem '{rows[-1]['problem_id']}'" in err and message in err
        assert sweep_metrics.main([str(path.parent)]) == 2
        assert message in capsys.readouterr().err
    edited = json.loads(json.dumps(rows))
    edited[-1]["problem_id"] = ["x"]  # "unhashable type: 'list'" before
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert sweep_metrics.main([str(synthetic_sweep)]) == 2
    assert f"error: {path}: a row has problem_id=['x'], not a text id" in capsys.readouterr().err
    path.write_text("")
    assert sweep_metrics.main([str(path.parent)]) == 2
    assert capsys.readouterr().err == f"error: {path} has no complete rows: nothing to compute metrics from\n"
    path.write_text(good)
    config = synthetic_sweep / "bon-8-0" / "config.yaml"
    saved = config.read_text()
    assert "seed: 0\n" in saved
    for text, message in (("", "is empty, not a run config"), ("seed: 0\n", "is not a search run's config: it has no task"),
                          (saved.replace("seed: 0\n", "seed: null\n"), "has seed=None, not an integer"),
                          (saved.replace("seed: 0\n", "seed: abc\n"), "has seed='abc', not an integer")):
        config.write_text(text)
        assert sweep_metrics.main([str(synthetic_sweep)]) == 2
        assert f"error: {config} {message}" in capsys.readouterr().err
    config.write_text(saved)
    path.unlink()
    path.mkdir()  # an IsADirectoryError traceback before
    assert sweep_metrics.main([str(synthetic_sweep)]) == 2
    assert capsys.readouterr().err == f"error: {path} is a folder, not a search's record file\n"


def test_greedy_run_again_at_each_budget_counts_once(tmp_path):
    # greedy ignores budget=: a budget sweep ran it once per budget, and the copies were refused
    for budget in (2, 4):
        write_run(tmp_path / f"greedy-{budget}", "best_of_n", 1, 0, [True, False], 10, temperature=0.0)
        write_run(tmp_path / f"bon-{budget}", "best_of_n", budget, 0, [True, True], 10 * budget)
    series = {s.name: s for s in scaling_by_strategy(sweep_summaries(tmp_path))}
    assert [(p.budget, p.runs) for p in series["greedy"].points] == [(1, 1)]
    assert scaling.main([str(tmp_path)]) == 0
    # the most complete copy stands for them (a stopped one was kept for sorting first); seeds and
    # a label (chunk=2) change nothing
    write_run(tmp_path / "greedy-0-stopped", "best_of_n", 1, 1, [False], 10, temperature=0.0)
    for budget in (2, 4):
        write_run(tmp_path / f"greedy-{budget}-c2", "best_of_n", 1, 0, [True, False], 10, temperature=0.0,
                  run_settings={"chunk": 2})
    series = {s.name: s for s in scaling_by_strategy(sweep_summaries(tmp_path))}
    assert sorted(series) == ["best_of_n", "greedy (chunk=2)", "greedy (chunk=null)"], sorted(series)
    assert [(p.runs, p.problems, p.accuracy.mean) for p in series["greedy (chunk=null)"].points] == [(1, 2, 0.5)]
    assert [p.runs for p in series["greedy (chunk=2)"].points] == [1]


def test_a_last_step_that_gains_but_stays_below_an_earlier_peak_says_so(tmp_path, monkeypatch, capsys):
    # 0.5 -> 0.25 -> 0.375 was "rising to N=16", and the legend showed no words at all
    figures = []
    monkeypatch.setattr(plot_scaling_module.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for budget, good in ((4, 4), (8, 2), (16, 3)):
        write_run(tmp_path / f"beam-{budget}", "beam_search", budget, 0, [i < good for i in range(8)], 10 * budget)
    plot_scaling_module.plot_scaling(tmp_path, tmp_path / "s.png")
    labels = [t.get_text().replace("\n", " ") for t in figures[-1].legends[0].get_texts()]
    assert labels == ["beam_search: -0.063/doubling, rising to N=16, below N=4's peak"]
    assert scaling.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert next(line for line in table if line.startswith("beam_search")).endswith("rising to N=16, below N=4's peak")


def test_a_sweep_folder_that_cannot_take_scaling_json_still_prints_the_table(tmp_path, monkeypatch, capsys):
    for budget, good in ((4, 1), (8, 2)):
        write_run(tmp_path / f"beam-{budget}", "beam_search", budget, 0, [i < good for i in range(8)], 10 * budget)

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refused)
    assert scaling.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "beam_search" in out and err.endswith(f"error: {tmp_path / 'scaling.json'} could not be written: Permission denied\n")
