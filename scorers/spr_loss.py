"""The self-supervised process reward (SPR) loss of MetaStone-S1 / XBai-o4, for the SPRM head.

No step labels: every step of a rollout is labelled with the rollout's outcome (y = 1 if its
final answer is correct, else 0), and only the steps whose head logit already agrees with that
outcome are trained (s_j > 0 and y = 1, or s_j < 0 and y = 0): the head keeps, and sharpens,
the steps it judges "like the outcome" and ignores the rest.

Usage (one micro-batch; logits of every scored step, outcome of the rollout each belongs to):
    features = scale_backbone_grad(hidden_states[-2])          # [B, L, C], backbone grad x 1e-4
    logits = reflective.head_logits(features[rows, positions])  # [N]
    out = spr_loss(logits, correct[rows], mode="reference")
    out.loss.backward(); out.kept_fraction                     # share of steps that got a gradient

Modes:
  "reference": as the reference code (dp_actor.py): keep agreeing steps; P = #kept positive + 1,
      N = #kept negative + 1; weight 1.5 N/(P+N) on kept positives, P/(P+N) on kept negatives;
      loss = sum(weight * BCE-with-logits) / (sum(weight) + 1e-5).
  "paper": the paper's binary filter without the class balance (weight 1 on kept steps).
  "bce": plain BCE-with-logits against the outcome on every step (no filter); the mean up to the
      same 1e-5 in the denominator. A baseline, not the method.

Deviations from the reference, named: it counts P and N over all data-parallel ranks
(all_reduce of each rank's count + 1, so with W ranks the "+1" becomes "+W"); here one process
counts. Like the reference, the joint step leaves out the steps of rollouts whose reward is 0.1
(a wrong final answer cut at the token limit, `policies.joint_step.JointLossConfig.
truncated_wrong_reward`): this function trains every step it is given. A logit exactly 0 agrees
with nothing and is dropped, as there.

DESIGN.md section 4 measured how this loss behaves on the tiny arith model (it saturates on the
steps that agreed at initialisation); `kept_fraction` and `agreement` are logged for that reason.

Tests: `.venv/bin/pytest tests/test_spr_loss.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

SPR_MODES: tuple[str, ...] = ("reference", "paper", "bce")
POSITIVE_SCALE = 1.5  # the reference's extra weight on kept positive steps
DENOMINATOR_EPS = 1e-5
BACKBONE_GRAD_SCALE = 1e-4


@dataclass(frozen=True)
class SPRLoss:
    """The loss of one micro-batch and what it trained on.

    loss: scalar tensor (differentiable w.r.t. the logits).
    weights: [N] the per-step weights used (detached; 0 on dropped steps).
    kept_fraction: share of steps with a non-zero weight (1.0 in "bce" mode, 0.0 with no steps).
    agreement: share of steps whose logit sign agrees with the outcome (every mode).
    kept_positive, kept_negative: agreeing steps of correct / incorrect rollouts.
    """

    loss: torch.Tensor
    weights: torch.Tensor
    kept_fraction: float
    agreement: float
    kept_positive: int
    kept_negative: int


def agreement_mask(logits: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[N] bool: (s > 0 and correct) or (s < 0 and not correct)."""
    return ((logits > 0) & correct) | ((logits < 0) & ~correct)


def spr_weights(logits: torch.Tensor, correct: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """Per-step weights [N] float32 of the mode (module docstring); no gradient."""
    logits = logits.detach()
    if mode == "bce":
        return torch.ones_like(logits, dtype=torch.float32)
    kept = agreement_mask(logits, correct)  # [N]
    if mode == "paper":
        return kept.float()
    positive, negative = (kept & correct).float(), (kept & ~correct).float()  # [N] each
    p, n = positive.sum() + 1, negative.sum() + 1
    return POSITIVE_SCALE * positive * (n / (p + n)) + negative * (p / (p + n))


def spr_loss(logits: torch.Tensor, correct: torch.Tensor, mode: str = "reference") -> SPRLoss:
    """SPR loss of step logits [N] against their rollouts' outcomes `correct` [N] (bool, or 0/1).
    Returns the loss and what it kept; with no steps the loss is a differentiable zero."""
    if mode not in SPR_MODES:
        raise ValueError(f"spr_loss mode={mode!r}; valid: {', '.join(SPR_MODES)}")
    if logits.dim() != 1 or correct.shape != logits.shape:
        raise ValueError(
            f"logits must be [N] and correct the same shape, got {list(logits.shape)} and {list(correct.shape)}"
        )
    correct = correct.bool()
    if logits.numel() == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return SPRLoss(logits.sum() * 0.0, empty, 0.0, 0.0, 0, 0)
    weights = spr_weights(logits, correct, mode)  # [N]
    bce = F.binary_cross_entropy_with_logits(logits.float(), correct.float(), reduction="none")  # [N]
    loss = (bce * weights).sum() / (weights.sum() + DENOMINATOR_EPS)
    agree = agreement_mask(logits.detach(), correct)  # [N]
    return SPRLoss(
        loss=loss,
        weights=weights,
        kept_fraction=float((weights > 0).float().mean()),
        agreement=float(agree.float().mean()),
        kept_positive=int((agree & correct).sum()),
        kept_negative=int((agree & ~correct).sum()),
    )


def scale_backbone_grad(features: torch.Tensor, scale: float = BACKBONE_GRAD_SCALE) -> torch.Tensor:
    """Same values (up to rounding), gradient into `features` multiplied by `scale`:
    features * scale + features.detach() * (1 - scale), as the reference, so the head's loss
    barely moves the backbone. Note (DESIGN.md section 4): Adam normalises a uniformly scaled
    gradient away unless another loss (the policy loss, in the reference) dominates the same
    parameters."""
    return features * scale + features.detach() * (1 - scale)
