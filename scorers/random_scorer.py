"""A random step scorer: the floor every scorer must beat. Deterministic by seed and path
content (the same path always gets the same scores, whatever else is in the batch)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from treesearch.config_checks import check_int
from treesearch.records import Prefix


@dataclass(frozen=True)
class RandomScorer:
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("RandomScorer", "seed", self.seed)  # hashed as text: seed 1.0 scored unlike seed 1, true as "True"

    def _uniform(self, key: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}|{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        out = []
        for p in paths:
            key = p.problem.id
            scores = []
            for step in p.steps:
                key = f"{key}|{step.token_ids}"
                scores.append(self._uniform(key))
            out.append(scores)
        return out

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0
