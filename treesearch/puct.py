"""PUCT selection for MCTS over reasoning steps: the score, the priors and virtual loss.

    score(child) = Q + c_puct * P * sqrt(N_parent) / (1 + N_child)

Q: the child's backed-up value (mean or max of values in [0, 1]); P: its prior among its
siblings; N: visit counts. Priors are a softmax over the siblings' step log-probabilities taken
as the PER-TOKEN MEAN (not the sum): sibling steps differ in length, and a summed log-prob would
make the prior mostly a length penalty (the shortest step would take nearly all the mass).

Virtual loss (for selecting several leaves per round before any is evaluated): each pending
selection through a node counts as `virtual_loss` extra visits of value 0, the worst value, so
    N_eff = N + virtual_loss * pending,   Q_eff = Q * N / N_eff.

    puct_score(q=0.5, prior=0.25, parent_visits=4, child_visits=1, c_puct=2.0)  # 0.5 + 2*0.25*2/2 = 1.0

Tests: `.venv/bin/pytest tests/test_mcts.py -k puct`.
"""
from __future__ import annotations

import math
from typing import Sequence

from treesearch.records import Step


def puct_score(q: float, prior: float, parent_visits: float, child_visits: float, c_puct: float) -> float:
    return q + c_puct * prior * math.sqrt(parent_visits) / (1.0 + child_visits)


def step_prior_logit(step: Step) -> float:
    """Per-token mean log-prob of the step; 0.0 (probability 1) for a step with no tokens."""
    lps = step.token_logprobs
    return sum(lps) / len(lps) if lps else 0.0


def sibling_priors(logits: Sequence[float]) -> list[float]:
    """Softmax over siblings' log-prob logits (max subtracted first, so it never overflows). A
    sibling at -inf gets prior 0; when all are -inf (a policy that reports no log-probs as -inf)
    the priors are uniform, where the softmax gave NaN priors and PUCT always took the first
    child. A NaN or +inf logit is a ValueError: no prior can be read from it."""
    if not logits:
        return []
    if any(math.isnan(x) or x == math.inf for x in logits):
        raise ValueError(f"step log-prob logits {list(logits)!r}: a step's token log-probs must be numbers <= 0 "
                         "(the policy returned NaN or +inf)")
    top = max(logits)
    if top == -math.inf:
        return [1.0 / len(logits)] * len(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def with_virtual_loss(q: float, visits: int, pending: int, virtual_loss: float) -> tuple[float, float]:
    """(Q_eff, N_eff) of a node with `pending` in-flight selections through it."""
    n_eff = visits + virtual_loss * pending
    if n_eff == 0:
        return q, 0.0
    return q * visits / n_eff, n_eff

