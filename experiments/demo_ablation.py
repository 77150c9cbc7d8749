"""The demo's ablation table (issue 3): on the same Best-of-N candidates, how each way of choosing
one compares at N = 2, 8, 32 (the reference's low / medium / high modes).

Rows:
  sprm (joint)      the reflective model's own head, trained with its backbone
                    (`experiments.demo_reflective`); the scores it attached while generating
  orm (frozen)      a head of the same size trained on the SFT policy's frozen features with the
                    rollouts' outcomes (plain BCE): an external outcome reward model
  true-label head   the same head trained on the true step labels (frozen features): the upper
                    bound of a head that cannot change the features
  confidence        the policy's own step confidence (geometric mean of token probabilities)
  majority          majority vote over the final answers
  oracle            pass@N: any of the N is right

The frozen heads are trained on the reflective stage's rollout caches (`train.pt`, `heldout.pt`:
the SFT policy's features at the head's layer), cached in `<out>/reflective_<task>/head_<labels>/`,
and read the candidates with a second forward of the SFT policy (`scorers.sprm_scorer`).

    rows = ablation_rows(conf, {"sprm (joint)": sprm, "orm (frozen)": orm_outcomes}, sizes=(2, 8, 32))
    ablation_markdown(rows)             # the report's table
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from experiments.aha_metrics import fc_metrics
from experiments.demo_sprm import train_head_once
from experiments.metrics import Estimate, ProblemOutcome, accuracy
from scorers.head_training import HeadTrainConfig

ABLATION_SIZES: tuple[int, ...] = (2, 8, 32)
FROZEN_HEADS: tuple[tuple[str, str], ...] = (("orm (frozen)", "outcome_bce"), ("true-label head", "true_labels"))


@dataclass(frozen=True)
class AblationRow:
    """One way of choosing: its accuracy at each N and its within-problem AUC (None: a rule with
    no scores, or no problem with both outcomes)."""

    name: str
    accuracy: dict[int, Estimate]
    within_auc: float | None


def within_auc(outcomes: Sequence[ProblemOutcome]) -> float | None:
    """Within-problem AUC of the candidates' scores against their outcomes."""
    scores = [c.score for o in outcomes for c in o.candidates]
    correct = [c.correct for o in outcomes for c in o.candidates]
    groups = [o.problem_id for o in outcomes for _ in o.candidates]
    return fc_metrics(scores, correct, groups)["within_auc"]


def ablation_rows(conf: Sequence[ProblemOutcome], scored: Mapping[str, Sequence[ProblemOutcome]],
                  sizes: Sequence[int]) -> list[AblationRow]:
    """The table's rows: each scorer's Best-of-N (scored: name -> the same candidates with that
    scorer's path scores), then confidence, majority and the oracle, at each size (sizes larger
    than the candidates per problem are skipped)."""
    n = len(conf[0].candidates)
    sizes = [k for k in sizes if k <= n]
    rows = [AblationRow(name, {k: accuracy(o, k, "best_score") for k in sizes}, within_auc(o))
            for name, o in scored.items()]
    rows.append(AblationRow("confidence", {k: accuracy(conf, k, "best_score") for k in sizes}, within_auc(conf)))
    rows.append(AblationRow("majority", {k: accuracy(conf, k, "majority") for k in sizes}, None))
    rows.append(AblationRow("oracle (pass@N)", {k: accuracy(conf, k, "oracle") for k in sizes}, None))
    return rows


def ablation_markdown(rows: Sequence[AblationRow]) -> str:
    """The table: a row per selection rule, a column per N (none when every N exceeds the
    candidates: --n 1) and the within-problem AUC."""
    sizes = list(rows[0].accuracy)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [line(["selection", *(f"N = {k}" for k in sizes), "within-problem AUC"]), "|---|" + "---|" * (len(sizes) + 1)]
    for r in rows:
        auc = "" if r.within_auc is None else f"{r.within_auc:.3f}"
        lines.append(line([r.name, *(r.accuracy[k].fmt() for k in sizes), auc]))
    return "\n".join(lines)


def ablation_metrics(task: str, rows: Sequence[AblationRow]) -> dict[str, dict]:
    """`<task>.ablation`: {row name: {"N": accuracy, ..., "within_auc": auc}} for metrics.json."""
    table = {r.name: {**{str(k): e.mean for k, e in r.accuracy.items()}, "within_auc": r.within_auc} for r in rows}
    return {f"{task}.ablation": table}


def frozen_head(train_cache: Path, heldout_cache: Path, labels: str, feature_layer: int, work: Path,
                steps: int = 400) -> Path:
    """A head trained on the frozen features of the caches with `labels` (cached in
    work/head_<labels>); the folder of the SFT policy with that head."""
    out = work / f"head_{labels}"
    train_head_once(train_cache, heldout_cache, HeadTrainConfig(labels=labels, feature_layer=feature_layer, steps=steps),
                    out)
    return out / "final"
