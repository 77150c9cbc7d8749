"""Closed-form tests of the GRPO loss pieces: group advantages (unbiased std, verl's G = 1 rule),
the PPO clip on both sides, the token mean, entropy, the k3 KL and the composed total.

    .venv/bin/pytest tests/test_grpo.py
"""
from __future__ import annotations

import math

import pytest
import torch

from policies.grpo import (
    GRPOLossConfig, group_advantages, grpo_loss, low_variance_kl, ppo_clip_loss, token_entropy, token_mean,
)


def test_group_advantages_use_the_unbiased_std():
    # group [1, 0, 0, 1]: mean 0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
    # A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert adv[1].tolist() == [0.0] * 4  # all equal: no signal (0 / 1e-6)
    # a group of one: verl uses mean 0, std 1
    assert group_advantages(torch.tensor([[1.0], [0.0]]))[:, 0].tolist() == pytest.approx([1 / (1 + 1e-6), 0.0])
    with pytest.raises(ValueError, match=r"\[prompts, rollouts per prompt\]"):
        group_advantages(torch.ones(4))


def test_ppo_clip_takes_the_pessimistic_side():
    # old logp 0; new logps log 1.5 and log 0.5 -> ratios 1.5 and 0.5; clip to [0.8, 1.2]
    # A = +1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5 -> max(-0.5, -0.8) = -0.5
    # A = -1: ratio 1.5 -> max(1.5, 1.2) = 1.5;              ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    mask = torch.ones(2, 2)
    loss, clip_fraction, approx_kl = ppo_clip_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)  # = 0.15
    assert clip_fraction.item() == 0.5
    assert approx_kl.item() == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 4)


def test_token_mean_pools_all_valid_tokens():
    # rows of 3 and 1 valid tokens: (1 + 2 + 3 + 10) / 4 = 4, not the mean of row means (6)
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert token_mean(values, mask).item() == 4.0


def test_entropy_and_k3_kl():
    # uniform over 4 tokens: entropy log 4; one-hot-ish: ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert token_entropy(logits)[0].tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)
    # d = ref - logp: 0 -> 0; 1 -> e - 2 = 0.718282; -1 -> e^-1 = 0.367879; 20 -> clamped to 10
    logp = torch.zeros(1, 4)
    kl = low_variance_kl(logp, torch.tensor([[0.0, 1.0, -1.0, 20.0]]))
    assert kl[0].tolist() == pytest.approx([0.0, math.e - 2, math.exp(-1), 10.0], rel=1e-6)
    # a masked-out token far from the reference (d = 95: exp overflows) leaves the gradient finite
    logp = torch.tensor([[-1.0, -100.0]], requires_grad=True)
    kl = token_mean(low_variance_kl(logp, torch.tensor([[-1.2, -5.0]])), torch.tensor([[1.0, 0.0]]))
    kl.backward()
    assert kl.item() == pytest.approx(math.exp(-0.2) + 0.2 - 1, rel=1e-5)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_total_composes_the_parts():
    # one rollout, 2 tokens, ratio 1 (unclipped): policy = -A = -2; entropy token-mean = (1 + 3)/2 = 2;
    # KL with d = [1, 0]: ((e - 2) + 0) / 2 = 0.359141
    # total = -2 - 0.001 * 2 + 0.001 * 0.359141 = -2.001641
    logp = torch.zeros(1, 2, requires_grad=True)
    out = grpo_loss(
        logp, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([2.0]),
        torch.tensor([[1.0, 3.0]]), torch.ones(1, 2),
    )
    assert (out.policy.item(), out.entropy.item()) == (-2.0, 2.0)
    assert out.kl.item() == pytest.approx((math.e - 2) / 2, rel=1e-6)
    assert out.total.item() == pytest.approx(-2 - 0.001 * 2 + 0.001 * (math.e - 2) / 2, rel=1e-6)
    out.total.backward()
    # d total / d logp_t = -A ratio / 2 + 0.001 * d(k3)/d logp / 2, d(k3)/d logp = 1 - exp(d)
    assert logp.grad[0].tolist() == pytest.approx([-1 + 0.001 * (1 - math.e) / 2, -1.0], rel=1e-5)


def test_kl_off_and_config_validation():
    out = grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.tensor([1.0]), torch.zeros(1, 1),
                    torch.ones(1, 1), GRPOLossConfig(kl_coef=0.0))
    assert out.kl.item() == 0.0 and out.total.item() == -1.0
    with pytest.raises(ValueError, match="kl_coef=0.001 needs ref_logprobs"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.tensor([1.0]), torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="clip_ratio=1.5"):
        GRPOLossConfig(clip_ratio=1.5)
    with pytest.raises(ValueError, match="entropy_coef=-1"):
        GRPOLossConfig(entropy_coef=-1)
