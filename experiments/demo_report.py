"""The demo's tables: accuracy of each selection rule at N = 1, 2, 4, ..., written as
`report.md` and `metrics.json` (flat keys "<task>.<metric>", fractions in [0, 1]).

Selection rules on the same sampled candidates (disjoint groups of N, see experiments.metrics):
  pass@1      a single sample (mean over all samples)
  maj@N       majority vote over the final answers
  wmaj@N      confidence-weighted majority vote
  conf_bon@N  Best-of-N by the policy's own confidence (step token log-probs, geometric mean)
  random_bon@N Best-of-N by a random scorer (the floor)
  pass@N      oracle: any of the N is right

With a strategy sweep (`experiments.demo_sweep`) per task, the report adds the compute-matched
table of Best-of-N / beam search / DVTS / MCTS / REBASE / particle filtering and the scaling plot, and metrics.json adds
`<task>.budget_table` (a list of {strategy, budget, tokens, accuracy, low, high}),
`<task>.scaling.<strategy>.slope` and, for the first task swept, `scaling.<strategy>.slope`
(accuracy gained per doubling of compute C = parameters x generated tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from experiments.aha_metrics import fc_metrics
from experiments.demo_sweep import StrategySweep, budget_markdown
from experiments.metrics import Estimate, ProblemOutcome, accuracy
from experiments.result_json import write_atomic


@dataclass(frozen=True)
class TaskOutcomes:
    """Everything the tables need for one task.

    greedy: one greedy candidate per problem; conf: the sampled candidates scored by confidence;
    random: the same candidates scored by the random scorer; compute: per-problem means;
    sprm: the same candidates scored by a trained SPRM head (None: no head for this task);
    extra: further metrics.json keys (the SPRM stage's AUCs, aha numbers); ablation: the
    markdown table of `experiments.demo_ablation` (None: none).
    """

    task: str
    greedy: Sequence[ProblemOutcome]
    conf: Sequence[ProblemOutcome]
    random: Sequence[ProblemOutcome]
    compute: dict[str, float]
    sprm: Sequence[ProblemOutcome] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    ablation: str | None = None


def budgets(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out if out[-1] == n else out + [n]


def estimates(t: TaskOutcomes) -> dict[str, Estimate]:
    n = len(t.conf[0].candidates)
    est: dict[str, Estimate] = {
        "greedy": accuracy(t.greedy, 1, "first"),
        "pass@1": accuracy(t.conf, 1, "first"),
    }
    for k in budgets(n):
        est[f"maj@{k}"] = accuracy(t.conf, k, "majority")
        est[f"wmaj@{k}"] = accuracy(t.conf, k, "weighted_majority")
        est[f"conf_bon@{k}"] = accuracy(t.conf, k, "best_score")
        est[f"random_bon@{k}"] = accuracy(t.random, k, "best_score")
        est[f"pass@{k}"] = accuracy(t.conf, k, "oracle")
        if t.sprm is not None:
            est[f"sprm_bon@{k}"] = accuracy(t.sprm, k, "best_score")
            est[f"sprm_wmaj@{k}"] = accuracy(t.sprm, k, "weighted_majority")
    return est


def ranking(t: TaskOutcomes) -> dict[str, float | None]:
    """How the SPRM and the policy's confidence rank these candidates (None without an SPRM):
    `<task>.sprm_within_auc`, `<task>.conf_within_auc` (within-problem AUC against the true
    outcome, `experiments.aha_metrics`) and `<task>.sprm_diff_prob` (mean path score of correct
    minus incorrect candidates)."""
    if t.sprm is None:
        return {}
    out: dict[str, float | None] = {}
    for name, outcomes in (("sprm", t.sprm), ("conf", t.conf)):
        scores = [c.score for o in outcomes for c in o.candidates]
        correct = [c.correct for o in outcomes for c in o.candidates]
        groups = [o.problem_id for o in outcomes for _ in o.candidates]
        fc = fc_metrics(scores, correct, groups)
        out[f"{t.task}.{name}_within_auc"] = fc["within_auc"]
        if name == "sprm":
            out[f"{t.task}.sprm_diff_prob"] = fc["diff_prob"]
    return out


def sweep_metrics(task: str, sweep: StrategySweep, first: bool) -> dict:
    """The sweep's keys of metrics.json for one task."""
    out: dict = {f"{task}.budget_table": sweep.budget_table}
    for strategy, slope in sweep.slopes.items():
        out[f"{task}.scaling.{strategy}.slope"] = slope
        if first:
            out[f"scaling.{strategy}.slope"] = slope
    return out


def scorer_phrase(sweep: StrategySweep) -> str:
    """How the sweep's candidates and steps were ranked, for the report."""
    if sweep.scorer == "sprm":
        return (f"scorer: the SPRM head of the reflective model `{sweep.checkpoint}`, each step scored while it "
                "is generated (no second forward)")
    if sweep.scorer == "confidence":
        return f"scorer: the policy's own step confidence (policy `{sweep.checkpoint}`)"
    return f"scorer: `{sweep.scorer}` (policy `{sweep.checkpoint}`)"


def sweep_section(task: str, sweep: StrategySweep, out_dir: Path) -> str:
    """The report's section of one task's strategy sweep."""
    problems = sweep.runs[0].problems if sweep.runs else 0
    return (
        f"## {task}: strategies at equal budgets ({problems} test problems)\n\n"
        "Accuracy [95% CI] and tokens generated per problem; N = samples (Best-of-N), total beams "
        "(beam search, DVTS; beam width 4); MCTS (expansion width 4) gets Best-of-N's tokens per problem "
        "at the same N as its token budget and up to 16 N simulations (it stops earlier when its tree "
        f"converges: fewer tokens in its column); {scorer_phrase(sweep)}.\n\n"
        + budget_markdown(sweep)
        + f"\n\n![accuracy against log compute]({sweep.plot.relative_to(out_dir) if sweep.plot.is_relative_to(out_dir) else sweep.plot})"
    )


def sprm_section(t: TaskOutcomes) -> str:
    """What the SPRM stage measured on this task, with the aha plot."""
    x = {**t.extra, **ranking(t)}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (
        f"SPRM on {t.task} (`sprm_bon` / `sprm_wmaj` above; trained with `{x.get(t.task + '.sprm_labels')}`): "
        f"within-problem AUC on these candidates {fmt(x.get(t.task + '.sprm_within_auc'))} (confidence "
        f"{fmt(x.get(t.task + '.conf_within_auc'))}), step AUC against true step labels on held-out rollouts "
        f"{fmt(x.get(t.task + '.sprm_step_auc'))}, held-out diff_prob {fmt(x.get(t.task + '.aha.diff_prob_first'))} at the "
        f"start of training and {fmt(x.get(t.task + '.aha.diff_prob_last'))} at the end.\n\n![aha curves](aha_{t.task}.png)"
    )


def metrics_json(tasks: Sequence[TaskOutcomes], sweeps: Mapping[str, StrategySweep] | None = None) -> dict:
    out: dict = {}
    for t in tasks:
        for name, e in estimates(t).items():
            out[f"{t.task}.{name}"] = e.mean
            out.setdefault(f"{t.task}.ci95", {})[name] = [e.low, e.high]
        out[f"{t.task}.problems"] = len(t.conf)
        out[f"{t.task}.compute"] = t.compute
        out.update(t.extra)
        out.update(ranking(t))  # on the candidates themselves (a head stage's held-out AUCs give way)
    for i, (task, sweep) in enumerate((sweeps or {}).items()):
        out.update(sweep_metrics(task, sweep, first=i == 0))
    return out


def markdown_table(t: TaskOutcomes) -> str:
    est = estimates(t)
    n = len(t.conf[0].candidates)
    cols = ["maj", "wmaj", "conf_bon", "random_bon"] + (["sprm_bon", "sprm_wmaj"] if t.sprm is not None else []) + ["pass"]
    lines = [
        f"| N | pass@1 | {' | '.join(c + '@N' for c in cols)} |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for k in budgets(n):
        cells = [est["pass@1"].fmt()] + [est[f"{c}@{k}"].fmt() for c in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: Path, tasks: Sequence[TaskOutcomes], header: str, sweeps: Mapping[str, StrategySweep] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write report.md and metrics.json into out_dir (with each task's strategy sweep, if given;
    extra: more metrics.json keys, e.g. the demo's stage timings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [header]
    for t in tasks:
        est = estimates(t)
        parts += [
            f"## {t.task}: {len(t.conf)} test problems, {len(t.conf[0].candidates)} samples each",
            f"Greedy pass@1: {est['greedy'].fmt()}. Sampled pass@1: {est['pass@1'].fmt()}.",
            "Accuracy (mean [95% interval over problems: Wilson, or a bootstrap for fractional values]) on disjoint groups of N samples:",
            markdown_table(t),
            "Compute per problem (all samples): "
            + ", ".join(f"{k} {v:.4g}" for k, v in t.compute.items()),
        ]
        if t.sprm is not None:
            parts.append(sprm_section(t))
        if t.ablation is not None:
            parts.append(f"Ablation on {t.task}: the same candidates chosen by each rule, accuracy at N [95% CI] "
                         f"(`experiments.demo_ablation`):\n\n{t.ablation}")
    parts += [sweep_section(task, sweep, out_dir) for task, sweep in (sweeps or {}).items()]
    # each replaced whole (a full disk cut report.md mid-row and left metrics.json of the run before)
    metrics = metrics_json(tasks, sweeps) | dict(extra or {})
    write_atomic(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    write_atomic(out_dir / "report.md", ("\n\n".join(parts) + "\n").encode())


