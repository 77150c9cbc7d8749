"""The loss of one joint training step of the reflective model (MetaStone-S1 / XBai-o4): GRPO for
the policy plus the SPR loss for the SPRM head, from ONE forward of the shared backbone, summed
into one scalar for one backward.

Usage:
    model = JointForward(reflective)                   # (or the accelerate/DDP-wrapped one)
    out = joint_step(model, batch, ref_lm, JointLossConfig(temperature=1.0))
    out.loss.backward()                                # policy + head gradients together
    out.metrics["loss/pg"], out.metrics["spr/kept_fraction"], ...

What one step computes (B rollouts, L tokens, T = L-1 target positions, N scored steps):
    logits, head_logits = model(input_ids, mask, step_rows, step_cols)   # [B, L, V], [N]
    logprobs, entropy   = of logits[:, :-1] / temperature at the targets  # [B, T] each (verl)
    old_logprobs        = batch.old_logprobs, or logprobs.detach() (one update per rollout batch:
                          what a separate no-grad forward of the same weights gives, at no cost)
    ref_logprobs        = the frozen initial policy's, no grad (only when kl_coef > 0)
    advantages          = group_advantages(grpo_rewards [P, G])           # [B]: truncated_wrong_reward -> 0
    grpo                = policies.grpo.grpo_loss(...)                    # pg - 0.001 H + 0.001 KL
    spr                 = scorers.spr_loss.spr_loss(head_logits, reward[step_rows] > 0.5, mode),
                          over the steps of rollouts whose reward is not truncated_wrong_reward
    loss                = grpo_coef * grpo.total + spr_coef * spr.loss
The head reads the backbone's features through `scale_backbone_grad` (value unchanged, gradient
into the backbone x 1e-4, as the reference), so the backbone's SPR gradient is 1e-4 of what the
head's input receives; with spr_coef = 0 the head's gradient is exactly zero (it still runs, so a
DDP reducer sees every parameter used).

Tests: `.venv/bin/pytest tests/test_joint_step.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from policies.bf16_support import native_bf16
from policies.grpo import GRPOLoss, GRPOLossConfig, group_advantages, grpo_loss, token_entropy
from policies.reflective_model import ReflectiveModel
from policies.rollout_batch import TRUNCATED_WRONG_REWARD, RolloutBatch
from policies.shared_prompt import shared_prompt_forward, shared_prompt_lengths
from scorers.spr_loss import BACKBONE_GRAD_SCALE, SPR_MODES, SPRLoss, scale_backbone_grad, spr_loss
from treesearch.config_checks import check_finite, check_flag, is_finite_number


@dataclass(frozen=True)
class JointLossConfig:
    """The terms of the joint loss.

    temperature: logits are divided by it for the policy's log-probs and entropy (verl's rule: the
        rollout temperature, so the ratio compares the distribution that sampled); > 0.
    clip_ratio, entropy_coef, kl_coef: GRPO (`policies.grpo.GRPOLossConfig`); kl_coef 0 skips the
        reference forward.
    grpo_coef, spr_coef: weights of the two losses (1 and 1 in the reference; 0 turns one off).
    spr_mode: "reference" | "paper" | "bce" (`scorers.spr_loss`).
    backbone_grad_scale: factor on the SPR gradient into the backbone (1e-4 in the reference;
        0 trains the head on frozen features, 1 lets the head's loss reach the backbone fully).
    bf16: bf16 autocast of the forward (CPU or CUDA); weights stay float32.
    ref_bf16: bf16 autocast of the frozen reference's forward alone (the KL term's only input; verl
        runs its reference model in bf16 too). On CPU it takes the reference forward from ~25% of
        the step to ~10% (`experiments.bench_train_throughput`); the KL moves by ~1e-4. None: bf16
        where the device has bf16 matmuls (`policies.bf16_support`; without them bf16 is slower).
    shared_prompt: the policy's forward runs each group's prompt once, not once per rollout
        (`policies.shared_prompt`; the same loss and gradients up to float rounding); the
        reference forward always does.
    truncated_wrong_reward: the reward that marks a rollout cut at the token limit after writing
        a wrong final answer (`policies.rollout_batch.outcome_reward`; the reference's
        math_v2.compute_score gives 0.1): GRPO reads it as 0, as the reference zeroes its 0.1s
        before the advantages (`grpo_rewards`), and the rollout's steps are left out of the SPR
        loss, as the reference's code is written (`valid_mask = reward != 0.1`: a trace that never
        ended is no outcome label for its steps). In the reference as it ran that mask read the
        very tensor zeroed in place (ray_trainer.fit stores it, then sets its 0.1s to 0), so it
        left nothing out: 0 reproduces that run (such a rollout an ordinary wrong one, its steps
        SPR negatives).
    """

    temperature: float = 1.0
    clip_ratio: float = 0.2
    entropy_coef: float = 0.001
    kl_coef: float = 0.001
    grpo_coef: float = 1.0
    spr_coef: float = 1.0
    spr_mode: str = "reference"
    backbone_grad_scale: float = BACKBONE_GRAD_SCALE
    bf16: bool = False
    ref_bf16: bool | None = False
    shared_prompt: bool = True
    truncated_wrong_reward: float = TRUNCATED_WRONG_REWARD

    def __post_init__(self) -> None:
        # each a number / a bool: "abc" was a TypeError traceback, bf16="no" one after the first
        # rollouts, shared_prompt="no" ran as true, grpo_coef=inf diverged at step 1
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"JointLossConfig.temperature={self.temperature!r} must be a finite number > 0 (GRPO needs sampled rollouts)"
            )
        if self.spr_mode not in SPR_MODES:
            raise ValueError(f"JointLossConfig.spr_mode={self.spr_mode!r}; valid: {', '.join(SPR_MODES)}")
        for name in ("grpo_coef", "spr_coef"):
            check_finite("JointLossConfig", name, getattr(self, name), minimum=0.0)
        if not (is_finite_number(self.truncated_wrong_reward) and 0 <= self.truncated_wrong_reward < 0.5):
            raise ValueError(
                f"JointLossConfig.truncated_wrong_reward={self.truncated_wrong_reward!r} must be >= 0 and < 0.5 "
                "(0.1 in the reference; 0 counts a cut wrong rollout as an ordinary wrong one)"
            )
        if not (is_finite_number(self.backbone_grad_scale) and 0 <= self.backbone_grad_scale <= 1):
            raise ValueError(f"JointLossConfig.backbone_grad_scale={self.backbone_grad_scale!r} must be in [0, 1]")
        for name in ("bf16", "shared_prompt"):
            check_flag("JointLossConfig", name, getattr(self, name))
        check_flag("JointLossConfig", "ref_bf16", self.ref_bf16, or_none=True)
        GRPOLossConfig(self.clip_ratio, self.entropy_coef, self.kl_coef)  # validates those three

    @property
    def grpo(self) -> GRPOLossConfig:
        return GRPOLossConfig(self.clip_ratio, self.entropy_coef, self.kl_coef)


class JointForward(nn.Module):
    """The reflective model's training forward in one module (so DDP sees every parameter used in
    its forward): LM logits and the head's logits at the given positions.

    reflective: the `ReflectiveModel` (its `.lm` is the policy, `.head` the SPRM head).
    """

    def __init__(self, reflective: ReflectiveModel) -> None:
        super().__init__()
        self.reflective = reflective

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        step_rows: torch.Tensor,
        step_cols: torch.Tensor,
        backbone_grad_scale: float = BACKBONE_GRAD_SCALE,
        group_size: int = 1,
        shared: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, L]; step_rows, step_cols [N] -> (logits [B, L, V],
        head logits [N] float32; the head in its current mode, dropout on in train mode).
        shared: per group of group_size rows the leading tokens they share
        (`policies.shared_prompt.shared_prompt_lengths`), forwarded once per group (the logits
        before each group's last shared token are then 0; no loss reads them); None: plain."""
        if shared is None:
            out = self.reflective(input_ids, attention_mask)  # logits [B, L, V], features [B, L, C]
            logits, all_features = out.logits, out.features
        else:
            logits, all_features = shared_prompt_forward(self.reflective.lm, input_ids, attention_mask, group_size,
                                                         shared, self.reflective.feature_layer)
        features = all_features[step_rows, step_cols]  # [N, C]
        features = scale_backbone_grad(features, backbone_grad_scale)  # backbone grad x scale
        return logits, self.reflective.head_logits(features).float()  # [B, L, V], [N]


@dataclass(frozen=True)
class JointStepOutput:
    """loss: the scalar to backpropagate; grpo, spr: the two losses with their parts; head_logits:
    [N] detached (train mode: with dropout); metrics: floats for the log (module docstring)."""

    loss: torch.Tensor
    grpo: GRPOLoss
    spr: SPRLoss
    head_logits: torch.Tensor
    metrics: dict[str, float]


def target_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token [B, T], tempered logits [B, T, V]) from logits [B, L, V]."""
    tempered = logits[:, :-1].float() / temperature  # [B, T, V]
    logprobs = torch.log_softmax(tempered, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, T]
    return logprobs, tempered


@torch.no_grad()
def frozen_logprobs(lm: Any, batch: RolloutBatch, cfg: JointLossConfig, bf16: bool | None = None) -> torch.Tensor:
    """An LM's target log-probs [B, T] without gradient (same temperature; bf16 autocast as
    cfg.bf16 unless given): the reference policy's, or the current policy's before several
    updates on one rollout batch. Each group's prompt is forwarded once, not once per rollout,
    when its rows share it (`policies.shared_prompt`: the targets inside it are not computed)."""
    shared = shared_prompt_lengths(batch)
    with _autocast(batch.input_ids.device, cfg.bf16 if bf16 is None else bf16):
        if shared is not None:
            logits, _ = shared_prompt_forward(lm, batch.input_ids, batch.attention_mask, batch.group_size, shared)
        else:
            logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return target_logprobs(logits, batch.input_ids, cfg.temperature)[0]


def joint_step(model: nn.Module, batch: RolloutBatch, ref_lm: Any | None, cfg: JointLossConfig) -> JointStepOutput:
    """The joint loss of one (mini-)batch of whole groups (module docstring). model: a
    `JointForward` (or its DDP wrapper); ref_lm: the frozen initial LM, None only with kl_coef 0."""
    with _autocast(batch.input_ids.device, cfg.bf16):
        logits, head_logits = model(
            batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols, cfg.backbone_grad_scale,
            batch.group_size, shared_prompt_lengths(batch) if cfg.shared_prompt else None,
        )  # [B, L, V], [N]
    logprobs, tempered = target_logprobs(logits, batch.input_ids, cfg.temperature)  # [B, T], [B, T, V]
    entropy = token_entropy(tempered)  # [B, T]
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()  # [B, T]
    ref = frozen_logprobs(ref_lm, batch, cfg, cfg.bf16 or reference_bf16(cfg, batch.input_ids.device)) if cfg.kl_coef > 0 else None  # [B, T] or None
    rewards = grpo_rewards(batch.rewards, cfg.truncated_wrong_reward)  # [B]
    advantages = group_advantages(rewards.view(-1, batch.group_size)).view(-1)  # [B]
    grpo = grpo_loss(logprobs, old, ref, advantages, entropy, batch.completion_mask, cfg.grpo)
    step_rewards = batch.rewards[batch.step_rows]  # [N]
    labelled = spr_labelled(step_rewards, cfg.truncated_wrong_reward)  # [N] bool
    spr = spr_loss(head_logits[labelled], step_rewards[labelled] > 0.5, cfg.spr_mode)
    loss = cfg.grpo_coef * grpo.total + cfg.spr_coef * spr.loss
    return JointStepOutput(loss, grpo, spr, head_logits.detach(), _metrics(loss, grpo, spr, labelled, ref is not None))


def grpo_rewards(rewards: torch.Tensor, truncated_wrong_reward: float) -> torch.Tensor:
    """The rewards [K] GRPO's advantages read: a cut wrong rollout's truncated_wrong_reward is 0, as
    the reference sets math_v2's 0.1s to 0 before compute_grpo_outcome_advantage (its 0.1 was a
    full-size advantage after group normalisation: one such rollout in a wrong group got what a
    correct answer gets)."""
    return torch.where(spr_labelled(rewards, truncated_wrong_reward), rewards, torch.zeros_like(rewards))


def spr_labelled(rewards: torch.Tensor, truncated_wrong_reward: float) -> torch.Tensor:
    """[K] bool of rewards [K] (of steps or of rollouts): what the SPR loss trains on, all but
    the cut wrong rollouts (the reference's reward != 0.1; none left out when
    truncated_wrong_reward is 0)."""
    if truncated_wrong_reward == 0:
        return torch.ones_like(rewards, dtype=torch.bool)
    return rewards != torch.tensor(truncated_wrong_reward, dtype=rewards.dtype)


def _metrics(loss: torch.Tensor, grpo: GRPOLoss, spr: SPRLoss, labelled: torch.Tensor, kl_measured: bool) -> dict[str, float]:
    """The step's log scalars; spr/steps counts the steps the SPR loss reads (spr/kept_fraction's
    whole), spr/left_out_steps those of cut wrong rollouts it leaves out. loss/kl only where the
    reference forward ran (kl_coef > 0): with kl_coef 0 it is not measured, and a 0 there read as
    a policy that had not moved."""
    return {
        "loss/total": float(loss.detach()),
        "loss/pg": float(grpo.policy.detach()),
        "loss/entropy": float(grpo.entropy.detach()),
        **({"loss/kl": float(grpo.kl.detach())} if kl_measured else {}),
        "loss/spr": float(spr.loss.detach()),
        "ppo/clip_fraction": float(grpo.clip_fraction),
        "ppo/approx_kl": float(grpo.approx_kl),
        "spr/kept_fraction": spr.kept_fraction,
        "spr/agreement": spr.agreement,
        "spr/steps": float(labelled.sum()),
        "spr/left_out_steps": float((~labelled).sum()),
        "spr/kept_positive": float(spr.kept_positive),
        "spr/kept_negative": float(spr.kept_negative),
    }


def reference_bf16(cfg: JointLossConfig, device: torch.device) -> bool:
    """Whether the reference forward runs in bf16: cfg.ref_bf16, or (None) whether `device` has bf16 matmuls."""
    return native_bf16(str(device)) if cfg.ref_bf16 is None else cfg.ref_bf16


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
