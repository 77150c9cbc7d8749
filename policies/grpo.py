"""GRPO loss pieces for the policy, as MetaStone-S1 / XBai-o4 train it (on verl): group-normalised
outcome advantages, the PPO-clipped token-mean policy loss, an entropy bonus, and the
low-variance (k3) KL to a frozen reference policy.

Usage (G rollouts per prompt, laid out [P, G]; token tensors [B, T] with B = P*G):
    adv = group_advantages(rewards)                               # [P, G] -> [P, G]
    out = grpo_loss(logprobs, old_logprobs, ref_logprobs, adv.reshape(-1), entropy, mask)
    (out.total + spr.loss).backward()                              # the reference adds the SPR loss
    out.policy, out.entropy, out.kl, out.clip_fraction, out.approx_kl   # for the logs

Definitions (verl's, which the reference uses):
  advantage   A_i = (r_i - mean_group) / (std_group + 1e-6), std UNBIASED (torch.std, n - 1); a
              group of one rollout uses mean 0 and std 1, as verl. Every token of a rollout gets
              its rollout's advantage.
  policy loss ratio = exp(logp - old_logp); token-mean over the micro-batch of
              max(-A ratio, -A clamp(ratio, 1 - 0.2, 1 + 0.2)).
  entropy     of the sampling distribution per token (`token_entropy`, from the logits divided
              by the sampling temperature, as verl); token-mean, subtracted with coef 0.001.
  KL (k3)     d = ref_logp - logp; exp(d) - d - 1, clamped to [-10, 10] as verl; token-mean,
              added with coef 0.001.
  total       = policy - 0.001 entropy + 0.001 kl.
"Token-mean" is sum over all valid tokens of the micro-batch / their count (verl's masked_mean),
so longer rollouts weigh more. Not reproduced: the reference zeroes a micro-batch's policy loss
when it exceeds 100 (a guard against blow-ups).

Tests: `.venv/bin/pytest tests/test_grpo.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treesearch.config_checks import check_finite, is_finite_number

ADVANTAGE_EPS = 1e-6
KL_CLAMP = 10.0
KL_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class GRPOLossConfig:
    """clip_ratio: PPO clip epsilon; entropy_coef: weight of the entropy bonus (subtracted);
    kl_coef: weight of the k3 KL to the reference policy (0 turns it off)."""

    clip_ratio: float = 0.2
    entropy_coef: float = 0.001
    kl_coef: float = 0.001

    def __post_init__(self) -> None:
        if not (is_finite_number(self.clip_ratio) and 0 < self.clip_ratio < 1):  # "abc" was a TypeError traceback
            raise ValueError(f"GRPOLossConfig.clip_ratio={self.clip_ratio!r} must be a number in (0, 1)")
        for name in ("entropy_coef", "kl_coef"):
            check_finite("GRPOLossConfig", name, getattr(self, name), minimum=0.0)


@dataclass(frozen=True)
class GRPOLoss:
    """total: the scalar to backpropagate; policy, entropy, kl: its token-mean parts (total =
    policy - entropy_coef * entropy + kl_coef * kl); clip_fraction: share of tokens where the
    clipped term was taken; approx_kl: token-mean of old_logp - logp (verl's ppo_kl)."""

    total: torch.Tensor
    policy: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(r - group mean) / (unbiased group std + eps) per row of rewards [P, G] -> [P, G] float32.
    G = 1 uses mean 0 and std 1 (verl)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, rollouts per prompt], got shape {list(rewards.shape)}")
    rewards = rewards.float()
    if rewards.shape[1] == 1:
        return rewards / (1 + eps)
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # [P, 1]
    return (rewards - mean) / (std + eps)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of values [B, T] over valid tokens (mask [B, T], 1 = valid) / their count."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per token: logits [B, T, V] -> [B, T] (verl's
    logsumexp(l) - sum(softmax(l) * l)). Pass logits / temperature for the sampling distribution."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def low_variance_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per token: d = ref - logp, exp(d) - d - 1 (>= 0),
    clamped to [-10, 10] as verl, d itself to [-20, 20] first as verl does (the same values: past
    it the result is clamped anyway; without it exp(d) overflows at d > 88 and the backward of
    a masked-out token turns 0 x inf into a NaN gradient). [B, T] -> [B, T]."""
    d = (ref_logprobs - logprobs).clamp(min=-KL_LOG_RATIO_CLAMP, max=KL_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(min=-KL_CLAMP, max=KL_CLAMP)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clipped policy loss, token mean. logprobs, old_logprobs, mask [B, T]; advantages [B]
    (one per rollout) or [B, T]. Returns (loss, clip fraction, approx KL old||new), scalars."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1] broadcast over tokens
    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)  # [B, T]
    loss = token_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = token_mean((clipped > unclipped).float(), mask)
    approx_kl = token_mean(-log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig = GRPOLossConfig(),
) -> GRPOLoss:
    """total = PPO-clip policy loss - entropy_coef * token-mean entropy + kl_coef * token-mean k3
    KL (tensors [B, T]; advantages [B] or [B, T]; ref_logprobs None only with kl_coef 0)."""
    policy, clip_fraction, approx_kl = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_ratio)
    mean_entropy = token_mean(entropy, mask)
    if ref_logprobs is None:
        if cfg.kl_coef:
            raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs (the frozen reference policy's)")
        kl = torch.zeros((), dtype=policy.dtype, device=policy.device)
    else:
        kl = token_mean(low_variance_kl(logprobs, ref_logprobs), mask)
    total = policy - cfg.entropy_coef * mean_entropy + cfg.kl_coef * kl
    return GRPOLoss(total, policy, mean_entropy, kl, clip_fraction, approx_kl)
