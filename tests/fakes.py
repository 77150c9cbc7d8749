"""Fakes that pin the search core's invariants without a model.

FakePolicy: candidate j of a problem is two steps: "try {j}.\\n\\n" then "</think>Answer: {a}",
where a is drawn from the problem's `meta["answers"]` with a seeded RNG (same seed, same
candidates; the draw depends on problem id, seed, prefix length and sample index only, so it does
not depend on batch composition). OracleScorer: a step scores 0.9 when it states the reference
answer, else 0.2 (other steps 0.5), so the best path is known.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from treesearch.records import Prefix, Step

SEP = ".\n\n"


def _step(text: str, finish: str, forwarded: int) -> Step:
    ids = tuple(ord(c) % 50 for c in text)
    lps = tuple(-0.1 * (1 + i % 3) for i in range(len(ids)))
    return Step(text=text, token_ids=ids, token_logprobs=lps, finish=finish, tokens_forwarded=forwarded)


@dataclass
class FakePolicy:
    num_parameters: int = 1000
    calls: list[tuple[str, int, int]] = field(default_factory=list)  # (method, rows, n): a test spy

    def _answer(self, prefix: Prefix, j: int, seed: int) -> str:
        rng = random.Random(f"{prefix.problem.id}|{seed}|{len(prefix.steps)}|{j}")
        return rng.choice(list(prefix.problem.meta["answers"]))

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        self.calls.append(("propose", len(prefixes), n))
        out = []
        for prefix in prefixes:
            row = []
            for j in range(n):
                if not prefix.steps and stop_at_step:
                    row.append(_step(f"try {j}{SEP}", "separator", 10))
                else:
                    row.append(_step(f"</think>Answer: {self._answer(prefix, j, seed)}", "eos", 5))
            out.append(row)
        return out

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        self.calls.append(("rollout", len(prefixes), n))
        return [
            [[_step(f"try {j}{SEP}", "separator", 10), _step(f"</think>Answer: {self._answer(p, j, seed)}", "eos", 5)]
             for j in range(n)]
            for p in prefixes
        ]


@dataclass(frozen=True)
class OracleScorer:
    tokens_per_step: int = 0

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        out = []
        for p in paths:
            row = []
            for s in p.steps:
                if "Answer:" in s.text:
                    row.append(0.9 if s.text.endswith(f"Answer: {p.problem.answer}") else 0.2)
                else:
                    row.append(0.5)
            out.append(row)
        return out

    def cost(self, paths: Sequence[Prefix]) -> int:
        return self.tokens_per_step * sum(len(p.steps) for p in paths)
