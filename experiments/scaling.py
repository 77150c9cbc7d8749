"""The scaling law of test-time search: accuracy against log compute, one fit per strategy.

Compute (`--compute`): "tokens", C = policy parameters x draft tokens generated per problem
(`experiments.sweep_metrics`), the policy's sampling alone; or "flops", the estimated FLOPs per
problem of every forward, the policy's (prompts and re-fed prefixes, after prefix reuse) and the
scorer's (`treesearch.compute`): a search that scores with a PRM or a second SPRM forward
spends far more than its C says (a beam search over an SPRM forward: 3.1x Best-of-N's FLOPs at
the same C), so compare strategies with scorers of different cost on "flops".
Series: one per strategy (and scorer, when the sweep has several); a sweep folder holding runs of
several workloads (task / policy configs, or policy weights recorded in the runs' weights.json:
`experiments.sweep_metrics`) gets one series per workload and strategy, named "strategy
[workload]", and a one-line note on stderr: runs of different problem sets or weights are never
pooled. Points: the runs of one series at one budget N are
pooled over their seeds (per problem: the mean correctness over seeds; then an interval over
problems, `experiments.metrics.interval`), at their mean compute; a point also says how many
problems it holds (fewer than its neighbours': a run still being written, see the stderr note). Fit: least squares of accuracy = a + b log2 C over the points
(numpy), so the slope b is the accuracy gained per doubling of compute; its r2 is undefined
(None; null in scaling.json, "n/a" in the table) when accuracy is the same at every point.
Where it flattens: the marginal gain per doubling
between consecutive budgets, (acc_{i+1} - acc_i) / log2(C_{i+1} / C_i); `last_gaining_budget`
is the last budget reached by a step whose gain exceeds the threshold (default 0.01, one point
of accuracy per doubling), and `flattened` says whether any budget beyond it was measured;
`verdict` words it, for the table and the plot's legend alike: "rising to N=32" (", below
N=4's peak" added when the last budget still scores below an earlier one), "flat after N=8",
"falling after N=8" (the last budget scored below N=8), "flat" / "falling" (no step gained that
much). A run whose compute is 0 (records without policy_parameters, a policy that
reports none) cannot sit on a log axis: its series gets no fit, its steps from that point no gain
(null in scaling.json) and no verdict ("-"), and a note names the run; a plot with no run of
compute above 0 is an error.

    python -m experiments.scaling outputs/sweeps/budget_sweep              # table + scaling.json
    python -m experiments.scaling outputs/sweeps/budget_sweep --compute flops   # table + scaling_flops.json
    python -m experiments.scaling outputs/sweeps/budget_sweep --threshold 0.02
    python -m experiments.scaling outputs/sweeps/budget_sweep --compute flops  # scorer forwards counted

Tests: `.venv/bin/pytest tests/test_scaling.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from experiments.broken_pipe import stdout_closed_quietly
from experiments.cli_args import finite_float
from experiments.metrics import Estimate, interval
from experiments.sweep_metrics import RunFolderError, RunSummary, estimate_dict, sweep_notes, sweep_summaries

DEFAULT_THRESHOLD = 0.01
FLAT_TOLERANCE = 1e-12  # accuracies this close (relative) are one value: a flat series, r2 undefined


@dataclass(frozen=True)
class ScalingPoint:
    """One budget of one series: budget N, mean compute of its runs (on the sweep's axis),
    pooled accuracy + CI, number of runs (seeds) pooled, number of problems they measured."""

    budget: int
    compute: float
    accuracy: Estimate
    runs: int
    problems: int = 0


@dataclass(frozen=True)
class ComputeAxis:
    """What a sweep's runs are compared on: its name (--compute), the plot's axis label, and the
    per-problem value of a run."""

    name: str
    label: str
    of: Callable[[RunSummary], float]


COMPUTE_AXES: dict[str, ComputeAxis] = {
    "tokens": ComputeAxis("tokens", "compute C = policy parameters x tokens generated per problem",
                          lambda run: run.compute_C),
    "flops": ComputeAxis("flops", "FLOPs per problem (policy and scorer forwards)", lambda run: run.flops_per_problem),
}
DEFAULT_AXIS = "tokens"


def scaling_file(axis: str, suffix: str) -> str:
    """The sweep folder's file of one axis: scaling.json / scaling.png for tokens, scaling_flops.json /
    scaling_flops.png for flops (one name for both: `--compute flops` replaced the token-axis files)."""
    return f"scaling.{suffix}" if axis == DEFAULT_AXIS else f"scaling_{axis}.{suffix}"


@dataclass(frozen=True)
class LogFit:
    """accuracy = intercept + slope * log2(C); slope = gain per doubling; r2 of the fit (None
    when the accuracies are all equal: no variance to explain, R^2 undefined)."""

    intercept: float
    slope: float
    r2: float | None

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.intercept + self.slope * np.log2(compute)


@dataclass(frozen=True)
class SeriesScaling:
    """One strategy's (+ scorer's, when a sweep has several) curve.

    name: series label; workload: the runs' workload label (`experiments.sweep_metrics`);
    points: by increasing C; fit: None with fewer than two distinct C;
    gains: marginal gain per doubling of each consecutive pair of points (None from a point of
        compute 0, whose doublings are unknown); last_gaining_budget:
    see the module docstring (None when no step gains more than the threshold); flattened: a
    budget beyond last_gaining_budget was measured (the curve flattens within the sweep).
    """

    name: str
    workload: str
    points: tuple[ScalingPoint, ...]
    fit: LogFit | None
    gains: tuple[float | None, ...]
    last_gaining_budget: int | None
    flattened: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "workload": self.workload,
            "points": [{"budget": p.budget, "compute": p.compute, "runs": p.runs, "problems": p.problems,
                        "accuracy": estimate_dict(p.accuracy)} for p in self.points],
            "fit": None if self.fit is None else {"intercept": self.fit.intercept, "slope_per_doubling": self.fit.slope,
                                                  "r2": self.fit.r2},
            "gains_per_doubling": list(self.gains),
            "last_gaining_budget": self.last_gaining_budget,
            "flattened": self.flattened,
            "verdict": verdict(self),
        }


def fit_log_linear(compute: Sequence[float], accuracy: Sequence[float]) -> LogFit:
    """Least squares of accuracy on log2(compute); needs two distinct positive computes. r2 is
    None for a flat series (all accuracies equal within FLAT_TOLERANCE: R^2 = 1 - 0/0)."""
    c = np.asarray(compute, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"compute and accuracy must be 1-D of one length, got {c.shape} and {y.shape}")
    if np.any(c <= 0):
        raise ValueError(f"compute must be > 0 to take its log, got {c.tolist()}")
    x = np.log2(c)
    if np.unique(x).size < 2:
        raise ValueError(f"need at least two distinct compute values to fit a slope, got {c.tolist()}")
    design = np.stack([np.ones_like(x), x], axis=1)  # [P, 2]
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (intercept + slope * x)
    total = float(np.sum((y - y.mean()) ** 2))
    flat = float(np.ptp(y)) <= FLAT_TOLERANCE * max(1.0, float(np.abs(y).max()))
    r2 = None if flat else 1.0 - float(np.sum(residual**2)) / total
    return LogFit(float(intercept), float(slope), r2)


def marginal_gains(points: Sequence[ScalingPoint]) -> list[float | None]:
    """Accuracy gained per doubling of C between consecutive points (sorted by C); None from a
    point of compute 0 (a 0 -> 0.83 rise was a gain of 0.0, and the series "flat")."""
    gains: list[float | None] = []
    for lo, hi in zip(points, points[1:]):
        if lo.compute <= 0:
            gains.append(None)
            continue
        doublings = math.log2(hi.compute / lo.compute) if lo.compute > 0 and hi.compute > lo.compute else 0.0
        gains.append((hi.accuracy.mean - lo.accuracy.mean) / doublings if doublings > 0 else 0.0)
    return gains


def last_gaining(points: Sequence[ScalingPoint], gains: Sequence[float | None],
                 threshold: float) -> tuple[int | None, bool]:
    """(budget at the end of the last step gaining more than threshold per doubling, whether a
    larger budget was measured after it)."""
    index = max((i + 1 for i, g in enumerate(gains) if g is not None and g > threshold), default=None)
    if index is None:
        return None, len(points) > 1
    return points[index].budget, index < len(points) - 1


def verdict(series: "SeriesScaling") -> str:
    """Where the series stands against the threshold (module docstring): "rising to N=32" (or
    "rising to N=32, below N=4's peak"), "flat after N=8", "falling after N=8", "flat", "falling";
    "-" for a single point, or a series with a point of compute 0 (its gains are unknown)."""
    points = series.points
    if len(points) < 2 or any(gain is None for gain in series.gains):
        return "-"
    if series.last_gaining_budget is None:
        return "falling" if _below(points[-1], points[0]) else "flat"
    if not series.flattened:
        peak = max(points[:-1], key=lambda p: p.accuracy.mean)  # the first of equals
        below = f", below N={peak.budget}'s peak" if _below(points[-1], peak) else ""  # 0.5, 0.2, 0.3
        return f"rising to N={series.last_gaining_budget}{below}"
    peak = next(p for p in points if p.budget == series.last_gaining_budget)
    return f"{'falling' if _below(points[-1], peak) else 'flat'} after N={series.last_gaining_budget}"


def _below(point: ScalingPoint, other: ScalingPoint) -> bool:
    """point's accuracy is below other's by more than float rounding (11/24 summed two ways)."""
    return point.accuracy.mean < other.accuracy.mean - FLAT_TOLERANCE * max(1.0, abs(other.accuracy.mean))


def pooled_points(runs: Sequence[RunSummary], axis: ComputeAxis = COMPUTE_AXES[DEFAULT_AXIS]) -> list[ScalingPoint]:
    """One point per budget: per-problem correctness averaged over seeds, an interval over
    problems; compute = the runs' mean on the axis, 0 when one of them has none (no place on the
    log axis: `zero_compute_note`). Sorted by compute. ValueError when two runs of a budget share
    a seed (`drawn_runs`)."""
    by_budget: dict[int, list[RunSummary]] = defaultdict(list)
    for run in runs:
        by_budget[run.budget].append(run)
    points = []
    for budget, group in by_budget.items():
        group = drawn_runs(group)
        per_problem: dict[str, list[float]] = defaultdict(list)
        for run in group:
            for problem_id, correct in run.per_problem:
                per_problem[problem_id].append(correct)
        values = [sum(v) / len(v) for v in per_problem.values()]
        computes = [axis.of(r) for r in group]
        compute = sum(computes) / len(group) if all(c > 0 for c in computes) else 0.0
        points.append(ScalingPoint(budget, compute, interval(values), len(group), len(values)))
    return sorted(points, key=lambda p: (p.compute, p.budget))


def drawn_runs(group: Sequence[RunSummary]) -> list[RunSummary]:
    """The runs of one series and budget a point pools: one per seed. Greedy decoding draws
    nothing (a budget sweep runs it again at each budget, and seeds change nothing): its one run
    with the most problems stands for its copies. Other runs that share a seed are a ValueError
    naming them: a point pools only draws (other seeds), not a copy of a run or runs that differ
    in a setting that is not the budget (four MCTS token budgets under one budget=8 made one
    point at their mean compute)."""
    if group and is_greedy(group[0]):
        return [max(group, key=lambda run: run.problems)]  # the first of the most complete
    by_seed: dict[int, list[RunSummary]] = defaultdict(list)
    for run in group:
        by_seed[run.seed].append(run)
    for seed, runs in by_seed.items():
        names = [run.run for run in runs]
        if len(names) > 1:
            first = group[0]
            mcts = (" (an MCTS run with search.token_budget is filed under the top-level budget=, 8 unless given: give "
                    "each run its own budget=, or drop search.token_budget to file runs by search.iterations)"
                    if first.strategy.startswith("mcts") else "")
            raise ValueError(
                f"runs {', '.join(names)} are all {first.strategy} at N={first.budget} with seed {seed}: a scaling "
                f"point pools only runs of other seeds; these are copies or differ in a setting that is not the "
                f"budget{mcts}; point the command at a folder without the extra runs")
    return list(group)


def is_greedy(run: RunSummary) -> bool:
    """Greedy decoding, labelled or not ("greedy", "greedy (chunk=2)": `strategy_labels`)."""
    return run.strategy == "greedy" or run.strategy.startswith("greedy (")


def series_name(run: RunSummary, several_scorers: bool, several_workloads: bool = False) -> str:
    """strategy, + " (scorer)" when the sweep has several scorers, + " [workload]" when several workloads."""
    name = f"{run.strategy} ({run.scorer})" if several_scorers else run.strategy
    return f"{name} [{run.workload}]" if several_workloads else name


def series_scaling(name: str, runs: Sequence[RunSummary], threshold: float = DEFAULT_THRESHOLD,
                   axis: ComputeAxis = COMPUTE_AXES[DEFAULT_AXIS]) -> SeriesScaling:
    """The series of runs (one workload, strategy and scorer): pooled points, fit, gains."""
    points = pooled_points(runs, axis)
    computes = [p.compute for p in points if p.compute > 0]
    fit = None
    if len(set(computes)) >= 2 and len(computes) == len(points):
        fit = fit_log_linear([p.compute for p in points], [p.accuracy.mean for p in points])
    gains = marginal_gains(points)
    budget, flattened = last_gaining(points, gains, threshold)
    workloads = sorted({r.workload for r in runs})
    if len(workloads) > 1:
        raise ValueError(f"series {name!r} mixes runs of workloads {workloads}; pass one workload's runs")
    return SeriesScaling(name, "".join(workloads), tuple(points), fit, tuple(gains), budget, flattened)


def scaling_by_strategy(runs: Sequence[RunSummary], threshold: float = DEFAULT_THRESHOLD,
                        axis: ComputeAxis = COMPUTE_AXES[DEFAULT_AXIS]) -> list[SeriesScaling]:
    """One SeriesScaling per strategy (per strategy and scorer when the sweep has several scorers;
    per workload too when its runs measured several, `experiments.sweep_metrics`)."""
    several_scorers = len({r.scorer for r in runs}) > 1
    several_workloads = len({r.workload for r in runs}) > 1
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[series_name(run, several_scorers, several_workloads)].append(run)
    return [series_scaling(name, groups[name], threshold, axis) for name in sorted(groups)]


def zero_compute_note(runs: Sequence[RunSummary], axis: ComputeAxis) -> str | None:
    """One line for stderr naming the runs whose compute is 0 on the axis (None when none): no
    place on a log axis, so their series has no fit (records without policy_parameters, a
    policy reporting 0 parameters, or a scorer-free FLOPs count of 0)."""
    zero = [run.run for run in runs if not axis.of(run) > 0]
    if not zero:
        return None
    return (f"note: {len(zero)} run{'s' if len(zero) > 1 else ''} with {axis.name} compute 0 cannot sit on the log axis "
            f"(their series get no fit; records without policy_parameters?): {', '.join(zero)}")


def scaling_notes(runs: Sequence[RunSummary], sweep_dir: str | Path, axis: ComputeAxis) -> list[str]:
    """The stderr notes of `scaling` and `plot scaling`: the sweep's (`sweep_notes`) and the
    runs of compute 0 on the axis (`zero_compute_note`)."""
    zero = zero_compute_note(runs, axis)
    return sweep_notes(runs, sweep_dir) + ([zero] if zero else [])


def add_compute_argument(ap: argparse.ArgumentParser) -> None:
    """--compute: the axis runs are compared on (COMPUTE_AXES)."""
    ap.add_argument("--compute", choices=sorted(COMPUTE_AXES), default=DEFAULT_AXIS,
                    help="tokens: C = policy parameters x tokens generated (the policy's sampling); flops: every "
                         "forward's FLOPs, the scorer's included (default %(default)s)")


def r2_text(fit: LogFit | None) -> str:
    """The table's r2 cell: "-" without a fit, "n/a" where R^2 is undefined (a flat series)."""
    if fit is None:
        return "-"
    return "n/a" if fit.r2 is None else f"{fit.r2:.2f}"


def format_scaling(series: Sequence[SeriesScaling], threshold: float) -> str:
    width = max([32] + [len(s.name) for s in series])
    lines = [f"{'series':<{width}} {'points':>6} {'slope/doubling':>14} {'r2':>6} "
             f"{'gain > ' + format(threshold, 'g') + '/doubling':>28}"]
    for s in series:
        slope = "-" if s.fit is None else f"{round(s.fit.slope, 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"
        lines.append(f"{s.name:<{width}} {len(s.points):>6} {slope:>14} {r2_text(s.fit):>6} {verdict(s):>28}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--threshold", type=finite_float, default=DEFAULT_THRESHOLD,
                    help="marginal accuracy gain per doubling of compute below which the curve counts as flat")
    add_compute_argument(ap)
    args = ap.parse_args(argv)
    axis = COMPUTE_AXES[args.compute]
    try:
        runs = sweep_summaries(args.sweep_dir)
        series = scaling_by_strategy(runs, args.threshold, axis)
    except (RunFolderError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in scaling_notes(runs, args.sweep_dir, axis):
        print(note, file=sys.stderr)
    print(format_scaling(series, args.threshold))
    out = args.sweep_dir / scaling_file(axis.name, "json")
    try:  # a sweep folder of someone else's, or read-only: the table above is still printed
        out.write_text(json.dumps({"threshold": args.threshold, "compute": axis.name,
                                   "series": [s.to_dict() for s in series]}, indent=2))
    except OSError as err:
        print(f"error: {out} could not be written: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
