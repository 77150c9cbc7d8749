"""Compute accounting: what one search cost, so strategies can be compared at equal compute.

FLOPs estimate = 2 x policy parameters x tokens forwarded (+ 2 x scorer parameters x scorer tokens
when the scorer runs a model of its own): the usual forward-pass estimate, attention ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from treesearch.records import Step


@dataclass(frozen=True)
class Compute:
    """Cost of one problem's search.

    tokens_generated: tokens sampled by the policy (all candidates, discarded ones included).
    tokens_forwarded: tokens run through the policy model (prefills + fed-back tokens).
    scorer_tokens: tokens run through a separate scorer model (0 when scores come for free).
    policy_calls: policy calls (propose / rollout) that included this problem.
    flops: estimate, see module docstring.
    wall_time_s: wall time of the search call this problem was part of, split evenly over its
        problems (batched strategies serve many problems in one call).
    """

    tokens_generated: int = 0
    tokens_forwarded: int = 0
    scorer_tokens: int = 0
    policy_calls: int = 0
    flops: float = 0.0
    wall_time_s: float = 0.0

    def __add__(self, other: "Compute") -> "Compute":
        return Compute(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: "Compute | int") -> "Compute":
        """`sum(r.compute for r in results)`: sum starts from 0."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def step_compute(
    steps: Iterable[Step], policy_params: int, scorer_tokens: int = 0, scorer_params: int = 0
) -> Compute:
    """Compute of a set of generated steps (each counted once), without calls or wall time."""
    generated = forwarded = 0
    for step in steps:
        generated += step.num_tokens
        forwarded += step.tokens_forwarded
    flops = 2.0 * policy_params * forwarded + 2.0 * scorer_params * scorer_tokens
    return Compute(
        tokens_generated=generated,
        tokens_forwarded=forwarded,
        scorer_tokens=scorer_tokens,
        flops=flops,
    )
