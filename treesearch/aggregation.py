"""Aggregation of per-step scores into one path score.

The reference (MetaStone-S1) uses the geometric mean of step scores clamped at 1e-10, and scores a
path with no steps 0. Every aggregator here follows the same empty-path rule, and none but "last"
(the final step's score, by design) depends on the steps' order (sums by `math.fsum`, products
over sorted scores): two paths with the same step scores in another order tie exactly, and the
first one wins, as every strategy's ranking promises.

    >>> aggregate([0.25, 1.0], "geometric_mean")
    0.5
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

EPS = 1e-10  # the reference's clamp before the log


def geometric_mean(scores: Sequence[float]) -> float:
    return math.exp(math.fsum(math.log(max(s, EPS)) for s in scores) / len(scores))


def minimum(scores: Sequence[float]) -> float:
    return min(scores)


def product(scores: Sequence[float]) -> float:
    return math.prod(sorted(scores))


def last(scores: Sequence[float]) -> float:
    return scores[-1]


def mean(scores: Sequence[float]) -> float:
    return math.fsum(scores) / len(scores)


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "geometric_mean": geometric_mean,
    "min": minimum,
    "product": product,
    "last": last,
    "mean": mean,
}


def check_aggregation(name: str) -> str:
    """Return name if it is a known aggregation, else raise naming the valid ones."""
    if not isinstance(name, str) or name not in AGGREGATIONS:  # a list is not even hashable
        raise ValueError(f"unknown aggregation {name!r}; valid: {', '.join(sorted(AGGREGATIONS))}")
    return name


def aggregate(scores: Sequence[float], name: str = "geometric_mean") -> float:
    """Path score from step scores; 0.0 for a path with no steps (as the reference)."""
    fn = AGGREGATIONS[check_aggregation(name)]
    if len(scores) == 0:
        return 0.0
    return float(fn(scores))
