"""Post-hoc metrics over saved candidates: Best-of-N, majority, weighted majority, oracle pass@N.

Generate once at the largest N and compute every smaller N from the same candidates, as the
reference does: for each problem cut its candidates IN ORDER into K = count // N disjoint groups
of N, apply the selector to each group, grade the pick, average over groups, then over problems.
Confidence intervals over problems (`interval`): Wilson's score interval when every problem is
right or wrong (one sample, one seed: a proportion), else a percentile bootstrap (a problem's
mean over groups or seeds). The percentile bootstrap of 0/1 values is far too narrow for the
few problems of a quick sweep: with 8 problems at true accuracy 0.125 its "95%" interval held
the truth in 68% of simulated runs, and 0 of 8 right gave [0, 0]; Wilson's gives [0, 0.32].

    outcomes = [ProblemOutcome("p1", (CandidateOutcome("4", True, 0.9), ...)), ...]
    accuracy(outcomes, 8, "best_score")   # Estimate(mean=..., low=..., high=...)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

from treesearch.result import argmax_first
from treesearch.voting import majority, weighted_majority


@dataclass(frozen=True)
class CandidateOutcome:
    """answer: extracted final answer (None if malformed); correct: graded; score: path score."""

    answer: str | None
    correct: bool
    score: float


@dataclass(frozen=True)
class ProblemOutcome:
    problem_id: str
    candidates: tuple[CandidateOutcome, ...]


@dataclass(frozen=True)
class Estimate:
    """mean with a confidence interval [low, high] over problems (`interval`)."""

    mean: float
    low: float
    high: float

    def fmt(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


Selector = Callable[[Sequence[CandidateOutcome]], bool]


def _answer_correct(group: Sequence[CandidateOutcome], answer: str | None) -> bool:
    # grading depends on the answer only, so any candidate with this answer tells its grade
    return answer is not None and any(c.correct for c in group if c.answer == answer)


SELECTORS: dict[str, Selector] = {
    "first": lambda g: g[0].correct,
    "oracle": lambda g: any(c.correct for c in g),
    "best_score": lambda g: g[argmax_first([c.score for c in g])].correct,  # type: ignore[index]
    "majority": lambda g: _answer_correct(g, majority([c.answer for c in g])),
    "weighted_majority": lambda g: _answer_correct(
        g, weighted_majority([c.answer for c in g], [c.score for c in g])
    ),
}


def disjoint_groups(count: int, n: int) -> list[range]:
    """K = count // n groups of n consecutive indices; an error when n is out of range."""
    if n < 1 or n > count:
        raise ValueError(f"group size n={n} must be in [1, {count}] (candidates per problem)")
    return [range(k * n, (k + 1) * n) for k in range(count // n)]


def problem_accuracy(outcome: ProblemOutcome, n: int, selector: str) -> float:
    """Mean over the disjoint groups of n of whether the selector's pick is correct."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; valid: {', '.join(sorted(SELECTORS))}")
    select = SELECTORS[selector]
    groups = disjoint_groups(len(outcome.candidates), n)
    return sum(select([outcome.candidates[i] for i in g]) for g in groups) / len(groups)


def bootstrap(values: Sequence[float], iters: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of values with a percentile bootstrap interval."""
    if not values:
        raise ValueError("bootstrap needs at least one value")
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(iters))
    tail = (1 - level) / 2
    low = means[int(tail * (iters - 1))]
    high = means[int((1 - tail) * (iters - 1))]
    return Estimate(sum(values) / k, low, high)


def wilson(successes: int, count: int, level: float = 0.95) -> Estimate:
    """successes / count with Wilson's score interval (never outside [0, 1], not empty at 0 or count)."""
    if count < 1 or not 0 <= successes <= count:
        raise ValueError(f"wilson needs 0 <= successes <= count and count >= 1, got {successes} of {count}")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / count
    shrink = 1 + z * z / count
    center = (p + z * z / (2 * count)) / shrink
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / shrink
    # the bounds hold p exactly: at 0 of 10 the rounded low was 2.8e-17 above the mean, and the
    # scaling plot's error bar (mean - low) a negative length it refused to draw
    return Estimate(p, min(p, max(0.0, center - half)), max(p, min(1.0, center + half)))


def interval(values: Sequence[float], seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-problem values with its interval: Wilson's when every value is 0 or 1, else a
    percentile bootstrap (module docstring)."""
    if values and all(v in (0, 1) for v in values):
        return wilson(int(sum(values)), len(values), level)
    return bootstrap(values, seed=seed, level=level)


def accuracy(outcomes: Sequence[ProblemOutcome], n: int, selector: str, seed: int = 0) -> Estimate:
    """Accuracy over problems of `selector` on disjoint groups of n candidates; a ValueError naming
    `outcomes` when it holds none (it said "bootstrap needs at least one value")."""
    values = [problem_accuracy(o, n, selector) for o in outcomes]
    if not values:
        raise ValueError("accuracy: outcomes is empty (no problem's outcome was given): nothing to average")
    return interval(values, seed=seed)
