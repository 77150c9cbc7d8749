"""Pins for the sweep / evaluation metrics that a mutation review found unpinned elsewhere.

Synthetic run folders and hand-built outcomes only (helpers from tests/test_scaling.py), no model.
What is pinned: experiments.metrics' bootstrap interval (its high end, every value resampled),
majority votes without extracted answers, accuracy()'s seed; experiments.outcomes' records (the
chosen candidate's grade, the last step's finish, head scores only when every step has one, the
candidate's own score, no candidate -> correct null); experiments.scaling's pooling of seeds
(mean), point order by compute, greedy's most complete copy, copies of one run refused, a gain
exactly at the threshold, `flattened` of a series that never gains; experiments.sweep_metrics'
greedy label (Best-of-1 at temperature 0 only), greedy's workload with two sampled temperatures,
row checks (negative parameters, n=0, numeric answer, correct=1, a later row missing a compute
field), Best-of-N curves over problems with fewer / no candidates, numeric order of difficulty
keys, which config.yaml names an unstarted run; a "$" in a scaling legend; plot_aha's reading
of text values, broken lines and rows without a step.

Run: `.venv/bin/python -m pytest tests/test_metrics_pins.py`
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments import plot_scaling, scaling, sweep_metrics
from experiments.metrics import CandidateOutcome as C
from experiments.metrics import ProblemOutcome, accuracy, bootstrap, interval, problem_accuracy
from experiments.outcomes import grade_results, record
from experiments.plot import main as plot_main
from experiments.record_log import append_rows
from experiments.scaling import last_gaining, scaling_by_strategy
from experiments.sweep_metrics import run_metrics, sweep_notes, sweep_summaries
from test_scaling import ARITH, CONFIDENCE, cand, point, row, write_run
from treesearch.compute import Compute
from treesearch.records import Problem, Step
from treesearch.result import Candidate, SearchResult
from treesearch.tree import Tree


def one_line_error(capsys) -> str:
    """The command's stderr, checked to be a single `error: ...` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- experiments.metrics ------------------------------------------------------------------------


def test_bootstrap_interval_spans_the_mean_of_values_that_are_not_right_or_wrong():
    est = interval([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.0])
    assert est.low < est.mean < est.high  # high was taken at the low tail: an interval [low, low]


def test_bootstrap_resamples_every_value_the_last_included():
    # three 0.5s and a 1.0 last: a resample that never drew the last value was 0.5 every time
    est = bootstrap([0.5, 0.5, 0.5, 1.0])
    assert est.mean == 0.625 and est.low == 0.5 and est.high > 0.5


def test_accuracy_passes_its_seed_to_the_interval():
    pattern = ["TFF", "TTF", "FFF", "TTT", "TFT", "FTF", "FFT"]
    outcomes = [ProblemOutcome(f"p{i}", tuple(C(str(j), ch == "T", 0.5) for j, ch in enumerate(p)))
                for i, p in enumerate(pattern)]
    values = [problem_accuracy(o, 1, "best_score") for o in outcomes]
    assert interval(values, seed=1) != interval(values, seed=0)  # the seed matters for these values
    assert accuracy(outcomes, 1, "best_score", seed=1) == interval(values, seed=1)


def test_a_vote_without_any_extracted_answer_is_wrong_even_if_a_candidate_was_graded_right():
    outcome = ProblemOutcome("p", (C(None, True, 0.9), C(None, False, 0.1)))
    assert problem_accuracy(outcome, 2, "majority") == 0.0
    assert problem_accuracy(outcome, 2, "weighted_majority") == 0.0


# -- experiments.outcomes -----------------------------------------------------------------------


def _step(text: str, finish: str, score: float | None) -> Step:
    return Step(text, (1,), (0.0,), finish, 0, score)


def test_records_grade_the_chosen_candidate_and_keep_its_score_finish_and_full_head_scores():
    problem = Problem("p1", "1+1?", "2")
    cands = (Candidate((_step("1+1=3.\n\n", "separator", 0.9), _step("Answer: 3", "eos", 0.8)), (0.2, 0.1), 0.14, 1),
             Candidate((_step("1+1=2.\n\n", "separator", None), _step("Answer: 2", "length", 0.7)), (0.9, 0.8), 0.85, 2))
    result = SearchResult(problem, "best_of_n", {"n": 2}, cands, 1, Tree(problem), Compute())
    [outcome] = grade_results([result], lambda p, text: text.endswith(p.answer), lambda text: text[-1])
    assert [c.score for c in outcome.candidates] == [0.14, 0.85]
    assert [c.correct for c in outcome.candidates] == [False, True]
    rec = record(result, outcome)
    assert rec["chosen"] == 1 and rec["correct"] is True  # the chosen candidate's grade, not the first's
    assert [c["finish"] for c in rec["candidates"]] == ["eos", "length"]  # the last step's
    # the second candidate's first step has no head score: no head_scores at all (and no TypeError)
    assert rec["candidates"][0]["head_scores"] == [0.9, 0.8]
    assert "head_scores" not in rec["candidates"][1]


def test_a_record_with_no_candidate_has_correct_null():
    problem = Problem("p1", "1+1?", "2")
    result = SearchResult(problem, "beam_search", {"n": 2}, (), None, Tree(problem), Compute())
    [outcome] = grade_results([result], lambda p, text: True, lambda text: text)
    assert record(result, outcome)["correct"] is None


# -- experiments.scaling ------------------------------------------------------------------------


def test_seeds_of_one_budget_pool_by_the_mean_per_problem(tmp_path):
    write_run(tmp_path / "s0", "best_of_n", 4, 0, [True, False], 40)
    write_run(tmp_path / "s1", "best_of_n", 4, 1, [False, True], 40)
    [series] = scaling_by_strategy(sweep_summaries(tmp_path))
    [p] = series.points
    assert (p.budget, p.runs, p.problems, p.accuracy.mean) == (4, 2, 2, 0.5)


def test_points_are_ordered_by_compute_not_budget(tmp_path):
    # an MCTS-like series: N=2 spent more tokens than N=4
    write_run(tmp_path / "n2", "best_of_n", 2, 0, [True, False], 80)
    write_run(tmp_path / "n4", "best_of_n", 4, 0, [True, True], 40)
    [series] = scaling_by_strategy(sweep_summaries(tmp_path))
    assert [(p.budget, p.compute) for p in series.points] == [(4, 40_000.0), (2, 80_000.0)]
    assert series.gains == (-0.5,)


def test_greedy_keeps_its_most_complete_copy_even_when_a_stopped_one_sorts_first(tmp_path):
    write_run(tmp_path / "a-greedy-stopped", "best_of_n", 1, 0, [False], 10, temperature=0.0)
    write_run(tmp_path / "b-greedy", "best_of_n", 1, 0, [True] * 4, 10, temperature=0.0)
    [series] = scaling_by_strategy(sweep_summaries(tmp_path))
    assert series.name == "greedy"
    assert [(p.runs, p.problems, p.accuracy.mean) for p in series.points] == [(1, 4, 1.0)]


def test_two_copies_of_one_run_at_one_budget_and_seed_are_refused(tmp_path, capsys):
    write_run(tmp_path / "run", "best_of_n", 4, 0, [True, False], 40)
    write_run(tmp_path / "run-copy", "best_of_n", 4, 0, [True, True], 40)
    write_run(tmp_path / "n2", "best_of_n", 2, 0, [True, False], 20)
    assert scaling.main([str(tmp_path)]) == 2
    assert "runs run, run-copy are all best_of_n at N=4 with seed 0" in one_line_error(capsys)
    assert not (tmp_path / "scaling.json").exists()


def test_a_gain_exactly_at_the_threshold_does_not_count_as_gaining():
    points = [point(2, 10.0, 0.5), point(4, 20.0, 0.51)]
    assert last_gaining(points, [0.01], 0.01) == (None, True)
    assert last_gaining(points, [0.0101], 0.01) == (4, False)


def test_a_series_that_never_gains_is_flattened_in_scaling_json(tmp_path, capsys):
    write_run(tmp_path / "n2", "best_of_n", 2, 0, [True, False], 20)
    write_run(tmp_path / "n4", "best_of_n", 4, 0, [True, False], 40)
    assert scaling.main([str(tmp_path)]) == 0
    [series] = json.loads((tmp_path / "scaling.json").read_text())["series"]
    assert (series["last_gaining_budget"], series["flattened"], series["verdict"]) == (None, True, "flat")


# -- experiments.sweep_metrics ------------------------------------------------------------------


def test_only_best_of_1_at_temperature_0_is_greedy(tmp_path):
    write_run(tmp_path / "b4-t0" / "run", "best_of_n", 4, 0, [True], 40, temperature=0.0)
    assert [s.strategy for s in sweep_summaries(tmp_path / "b4-t0")] == ["best_of_n"]
    folder = tmp_path / "b1-no-temperature" / "run"
    write_run(folder, "best_of_n", 1, 0, [True], 10)
    config = OmegaConf.load(folder / "config.yaml")
    del config.policy.sampling["temperature"]  # a config that records no temperature: not greedy
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert [s.strategy for s in sweep_summaries(folder.parent)] == ["best_of_n"]
    write_run(tmp_path / "b1-t0" / "run", "best_of_n", 1, 0, [True], 10, temperature=0.0)
    assert [s.strategy for s in sweep_summaries(tmp_path / "b1-t0")] == ["greedy"]


def test_greedy_keeps_its_own_workload_when_sampled_runs_have_two_temperatures(tmp_path):
    for t in (0.7, 1.0):
        write_run(tmp_path / f"bon-t{t}", "best_of_n", 4, 0, [True], 40, temperature=t)
    write_run(tmp_path / "greedy", "best_of_n", 1, 0, [True], 10, temperature=0.0)
    labels = {s.run: (s.strategy, s.workload) for s in sweep_summaries(tmp_path)}
    assert labels == {"greedy": ("greedy", "arith (policy.sampling.temperature=0.0)"),
                      "bon-t0.7": ("best_of_n", "arith (policy.sampling.temperature=0.7)"),
                      "bon-t1.0": ("best_of_n", "arith (policy.sampling.temperature=1.0)")}


def _drop_wall_time(rows: list[dict]) -> None:
    rows[-1]["compute"].pop("wall_time_s")


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[-1].update(policy_parameters=-1000), "has policy_parameters=-1000, not a number >= 0"),
    (lambda rows: rows[-1]["config"].update(n=0), "has config.n=0, not a strategy's name"),
    (lambda rows: rows[-1]["candidates"][0].update(answer=18), "candidates[0] has answer=18, not text or null"),
    (lambda rows: rows[-1]["candidates"][0].update(correct=1), "candidates[0] has correct=1, not true or false"),
    (_drop_wall_time, "lacks a finite number for compute.wall_time_s"),  # a field the first row has
], ids=["negative_parameters", "n_0", "numeric_answer", "correct_1", "later_row_lacks_wall_time"])
def test_rows_the_metrics_cannot_read_are_a_one_line_error(tmp_path, capsys, edit, message):
    write_run(tmp_path / "run", "best_of_n", 1, 0, [True, False], 10)
    path = tmp_path / "run" / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for target in (tmp_path / "run", tmp_path):  # one run's metrics, the sweep table
        assert sweep_metrics.main([str(target)]) == 2
        err = one_line_error(capsys)
        assert f"error: {path}: the row of problem 'p1'" in err and message in err


def test_a_best_of_n_run_with_a_problem_without_candidates_counts_it_wrong_on_the_curve(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    append_rows(folder / "records.jsonl", [row("a", [cand("1", True, 0.5), cand("2", False, 0.4)], 2, 10, n=2),
                                           row("b", [], 2, 0, n=2)])
    assert sweep_metrics.main([str(folder)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    curve = {key: est["mean"] for key, est in metrics["best_of_n"].items()}
    # a: groups (1c), (2w) at N=1 -> .5; (1c .5, 2w .4) at N=2 -> bon/maj(tie: first)/wmaj/pass right; b: 0
    assert curve == {"bon@1": 0.25, "maj@1": 0.25, "wmaj@1": 0.25, "pass@1": 0.25,
                     "bon@2": 0.5, "maj@2": 0.5, "wmaj@2": 0.5, "pass@2": 0.5}
    assert metrics["accuracy"]["mean"] == 0.5 == curve["bon@2"] and metrics["best_of_n_short_problems"] == 1


def test_the_best_of_n_curve_runs_to_the_configured_n_when_a_problem_has_fewer_candidates():
    # a: the 4th candidate is the right one, with the top score; b: 3 candidates, the first right
    a = [cand("2", False, 0.1), cand("3", False, 0.2), cand("4", False, 0.3), cand("1", True, 0.9)]
    b = [cand("1", True, 0.8), cand("5", False, 0.1), cand("6", False, 0.2)]
    m = run_metrics([row("a", a, 2, 10, n=4), row("b", b, 2, 10, n=4)])
    assert sorted(m["best_of_n"]) == sorted(f"{k}@{n}" for k in ("bon", "maj", "wmaj", "pass") for n in (1, 2, 4))
    # N=4: a's one group picks 1 (right); b (3 < 4) picks from its whole list: 1 (right)
    assert m["best_of_n"]["bon@4"]["mean"] == 1.0 == m["accuracy"]["mean"]
    # N=2: a (2w 3w) wrong, (4w 1c) right -> .5; b one group (1c .8, 5w) right -> 1
    assert m["best_of_n"]["bon@2"]["mean"] == 0.75 and m["best_of_n_short_problems"] == 1
    full = run_metrics([row("a", a, 2, 10, n=4)])
    assert "best_of_n_short_problems" not in full


def test_accuracy_by_difficulty_lists_values_in_numeric_order():
    rows = [row(f"p{k}", [cand("1", True, 0.5)], k, 10) for k in (12, 2, 10, 3)]
    assert list(run_metrics(rows)["accuracy_by_num_ops"]) == ["2", "3", "10", "12"]


def test_only_a_search_config_without_records_is_named_as_unstarted(tmp_path):
    write_run(tmp_path / "done", "best_of_n", 2, 0, [True], 20)
    for name, config in (("unstarted", {"seed": 0, "task": ARITH, "policy": {"path": "ckpt"}, "scorer": CONFIDENCE}),
                         ("train-run", {"seed": 0, "task": ARITH, "train_loss": {"name": "reference"}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    notes = sweep_notes(sweep_summaries(tmp_path), tmp_path)
    assert [n for n in notes if "left out" in n] == [
        "note: left out 1 run folder with no complete row yet (not started, or its first write failed): unstarted"]


# -- plots --------------------------------------------------------------------------------------


def test_a_dollar_in_a_scaling_legend_is_text_not_maths(tmp_path, capsys):
    # two workloads: the legend names the policy path ckpt/run_$5_to_$10 (matplotlib read it as maths)
    for path in ("ckpt/run_$5_to_$10", "ckpt/other"):
        for n in (2, 4):
            write_run(tmp_path / f"{path.replace('/', '_')}-{n}", "best_of_n", n, 0, [n == 4, False], 10 * n,
                      policy_path=path)
    out = tmp_path / "s.png"
    assert plot_scaling.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def _aha_row(step: int, correct: float, false: float) -> str:
    return json.dumps({"step": step, "fc/correct_prob": correct, "fc/false_prob": false, "fc/diff_prob": correct - false})


def _write_metrics(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_aha_plot_skips_a_value_written_as_text(tmp_path, capsys):
    metrics = _write_metrics(tmp_path, [_aha_row(0, 0.5, 0.5), json.dumps({"step": 1, "fc/correct_prob": "n/a"}),
                                        _aha_row(2, 0.9, 0.3)])
    out = tmp_path / "a.png"
    assert plot_main(["aha", str(metrics), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_aha_plot_refuses_a_broken_line_in_the_middle(tmp_path, capsys):
    metrics = _write_metrics(tmp_path, [_aha_row(0, 0.5, 0.5), "{not json", _aha_row(2, 0.9, 0.3)])
    assert plot_main(["aha", str(metrics), "--out", str(tmp_path / "a.png")]) == 2
    assert one_line_error(capsys).startswith(f"error: {metrics}: line 2 is not JSON")
    assert not (tmp_path / "a.png").exists()


def test_aha_plot_refuses_a_row_without_a_step(tmp_path, capsys):
    metrics = _write_metrics(tmp_path, [_aha_row(0, 0.5, 0.5), json.dumps({"fc/correct_prob": 0.7, "fc/false_prob": 0.2})])
    assert plot_main(["aha", str(metrics), "--out", str(tmp_path / "a.png")]) == 2
    assert one_line_error(capsys) == f"error: {metrics}: line 2 is not a metrics row with an integer 'step'\n"
