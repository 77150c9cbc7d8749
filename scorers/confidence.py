"""The policy's own confidence as a step scorer: reads the step tokens' log-probs, no forward pass.

This is the baseline every learned scorer must beat (DESIGN.md section 4: the policy's token
probabilities carried all the useful signal on arith). Step score:
  reduce="mean": exp(mean token log-prob of the step)  (per-token geometric mean probability)
  reduce="min":  exp(min token log-prob of the step)   (the least confident token)
Both lie in (0, 1]. A step with no tokens scores 1.0 (it carries no evidence).

    scorer = ConfidenceScorer(reduce="min")
    scorer.score([Prefix(problem, steps)])  # [[s_1, ..., s_k]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from treesearch.records import Prefix, Step

REDUCTIONS = ("mean", "min")


@dataclass(frozen=True)
class ConfidenceScorer:
    reduce: str = "mean"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"ConfidenceScorer.reduce={self.reduce!r}; valid: {', '.join(REDUCTIONS)}")

    def step_score(self, step: Step) -> float:
        lps = step.token_logprobs
        if not lps:
            return 1.0
        total = sum(lps)
        if total != total:  # a NaN anywhere (min() skips one not first); named here, the strategy's check would blame the scorer
            raise ValueError(f"ConfidenceScorer: the policy gave a step NaN token log-probs ({step.text[:40]!r}); "
                             "a policy's token_logprobs must be numbers")
        value = total / len(lps) if self.reduce == "mean" else min(lps)
        return math.exp(min(value, 0.0))

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [[self.step_score(s) for s in p.steps] for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0  # reads log-probs the policy already computed
