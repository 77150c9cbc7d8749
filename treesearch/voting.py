"""Voting over candidate answers: majority and score-weighted majority.

Candidates without an answer (None: malformed or missing) never win a vote; if no candidate has
an answer the vote returns None. Ties go to the answer seen first, so results are deterministic.

    >>> majority(["3", "4", "4", None])
    '4'
    >>> weighted_majority(["3", "4", "4"], [0.9, 0.2, 0.3])
    '3'
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence, TypeVar

A = TypeVar("A", bound=Hashable)


def weighted_majority(answers: Sequence[A | None], weights: Sequence[float]) -> A | None:
    """The answer with the largest total weight (first seen wins ties). Totals are exact sums
    (math.fsum), so equal weights in another order tie instead of differing in the last bit."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    weights_of: dict[A, list[float]] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            weights_of.setdefault(answer, []).append(float(weight))
    if not weights_of:
        return None
    totals = {answer: math.fsum(ws) for answer, ws in weights_of.items()}
    # max() returns the first maximal item; dicts keep first-seen order
    return max(totals, key=totals.__getitem__)


def majority(answers: Sequence[A | None]) -> A | None:
    """The most frequent answer (first seen wins ties)."""
    return weighted_majority(answers, [1.0] * len(answers))
