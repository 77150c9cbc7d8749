"""The "aha moment" metrics of MetaStone-S1 / XBai-o4: how far the SPRM head's path scores of
correct and of incorrect rollouts have split.

    scores = path_scores(step_probs, step_rows, num_rows)   # [B]: geometric mean per rollout
    fc = fc_metrics(scores.tolist(), correct, groups)       # {"correct_prob", "false_prob", ...}
    row.update({f"fc/{k}": v for k, v in fc.items()})

Definitions (the reference's, DESIGN.md section 3): a rollout's path score is the geometric mean
of its step scores (sigmoid of the head), each clamped at 1e-10, and 0 when it has no scored
step. `correct_prob` / `false_prob` are the mean path score over the correct / incorrect
rollouts, `diff_prob` their difference: the "aha moment" is where these curves split.

Added here because DESIGN.md section 4 measured that it is what Best-of-N needs:
`within_auc`, the within-problem AUC: for each problem with both correct and incorrect
rollouts, the share of (correct, incorrect) pairs the scores order correctly (ties count 1/2),
averaged over those problems. A pooled gap can come from problem difficulty alone; this cannot.

An undefined value (no correct rollout, no problem with both outcomes) is None, never NaN, so
the JSONL rows stay strict JSON.

Tests: `.venv/bin/pytest tests/test_train_loop.py -k aha`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Hashable, Sequence

# The geometric mean of each rollout's step scores (the reference's path score) lives with the head
# code in `scorers.head_training`; re-exported here, where the training loops' metrics use it.
# Lazily: that module imports torch and transformers (~5 s), which `python -m experiments.plot`
# (it reads AHA_THRESHOLD and aha_step only) must not pay on every tree or aha plot.
_LAZY_FROM_HEAD_TRAINING = ("PATH_SCORE_EPS", "path_scores")


def __getattr__(name: str) -> Any:
    """`path_scores` and `PATH_SCORE_EPS`, imported from `scorers.head_training` on first use."""
    if name in _LAZY_FROM_HEAD_TRAINING:
        from scorers import head_training

        return getattr(head_training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def within_problem_auc(scores: Sequence[float], correct: Sequence[bool], groups: Sequence[Hashable]) -> float | None:
    """Mean over problems (groups) with both outcomes of P(score of a correct > score of an
    incorrect rollout of the same problem), ties 1/2; None when no problem has both."""
    by_group: dict[Hashable, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for score, ok, group in zip(scores, correct, groups):
        by_group[group][0 if ok else 1].append(float(score))
    aucs = []
    for good, bad in by_group.values():
        if good and bad:
            wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
            aucs.append(wins / (len(good) * len(bad)))
    return _mean(aucs)


def fc_metrics(
    scores: Sequence[float], correct: Sequence[bool], groups: Sequence[Hashable] | None = None
) -> dict[str, float | None]:
    """correct_prob, false_prob, diff_prob (None when a side is empty), within_auc (None
    without groups or without a mixed group), num_correct, num_false."""
    if not len(scores) == len(correct) or (groups is not None and len(groups) != len(scores)):
        raise ValueError(f"{len(scores)} scores, {len(correct)} outcomes, {0 if groups is None else len(groups)} groups: lengths differ")
    good = [float(s) for s, ok in zip(scores, correct) if ok]
    bad = [float(s) for s, ok in zip(scores, correct) if not ok]
    correct_prob, false_prob = _mean(good), _mean(bad)
    return {
        "correct_prob": correct_prob,
        "false_prob": false_prob,
        "diff_prob": None if correct_prob is None or false_prob is None else correct_prob - false_prob,
        "within_auc": None if groups is None else within_problem_auc(scores, correct, groups),
        "num_correct": float(len(good)),
        "num_false": float(len(bad)),
    }


def prefixed(prefix: str, metrics: dict[str, float | None]) -> dict[str, float | None]:
    """{"correct_prob": x} -> {prefix + "correct_prob": x}."""
    return {prefix + key: value for key, value in metrics.items()}


# The aha moment's definition: the held-out gap (correct - incorrect mean path score) must stay above
# this from some step on. 0.1 is a third of the target gap (0.3) and well above the
# run-to-run noise of a collapsed head (|gap| < 0.01 in every head-only run of the README).
AHA_THRESHOLD = 0.1


def aha_step(steps: Sequence[int], gaps: Sequence[float], threshold: float = AHA_THRESHOLD) -> int | None:
    """The aha moment: the first step s such that the gap at s and at every later step is above
    threshold (the curves have split for good); None when the last gap is not above it. steps
    ascending, gaps the held-out diff_prob at each (a NaN gap, a diverged head, is not above)."""
    if len(steps) != len(gaps):
        raise ValueError(f"{len(steps)} steps but {len(gaps)} gaps")
    split = None
    for step, gap in zip(reversed(steps), reversed(gaps)):
        if not gap > threshold:
            break
        split = step
    return split
