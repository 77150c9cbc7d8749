"""Reads step scores a policy attached while generating (`Step.score`, e.g. from an SPRM head
that shares the policy's forward pass): zero extra forward. A step without a score is an error,
so a misconfigured policy cannot silently rank by nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from treesearch.records import Prefix


@dataclass(frozen=True)
class StepScoreReader:
    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        out = []
        for p in paths:
            for i, s in enumerate(p.steps):
                if s.score is None:
                    raise ValueError(
                        f"step {i} of a path for problem {p.problem.id!r} has no score: the policy "
                        "did not attach step scores (does it own a scorer head?)"
                    )
            out.append([float(s.score) for s in p.steps])  # type: ignore[arg-type]
        return out

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0
