"""Closed-form tests of the SPR loss (reference, paper and plain-BCE modes; what is kept and how it
is weighted), of its gradient (only kept steps get one) and of the 1e-4 backbone gradient scale.

    .venv/bin/pytest tests/test_spr_loss.py
"""
from __future__ import annotations

import math

import pytest
import torch

from scorers.spr_loss import SPR_MODES, agreement_mask, scale_backbone_grad, spr_loss, spr_weights


def bce(logit: float, label: int) -> float:
    """BCE-with-logits of one step: log(1 + exp(-s)) for label 1, log(1 + exp(s)) for label 0."""
    return math.log1p(math.exp(-logit if label else logit))


LOGITS = torch.tensor([2.0, -1.0, -3.0, 0.5])
CORRECT = torch.tensor([True, True, False, False])
# step 0: s = 2 > 0, correct   -> kept positive
# step 1: s = -1 < 0, correct  -> dropped (disagrees)
# step 2: s = -3 < 0, wrong    -> kept negative
# step 3: s = 0.5 > 0, wrong   -> dropped


def test_agreement_keeps_steps_whose_sign_matches_the_outcome():
    assert agreement_mask(LOGITS, CORRECT).tolist() == [True, False, True, False]
    # a logit of exactly 0 agrees with nothing, as the reference's strict inequalities
    assert agreement_mask(torch.tensor([0.0, 0.0]), torch.tensor([True, False])).tolist() == [False, False]


def test_reference_mode_balances_the_kept_steps():
    # P = 1 kept positive + 1 = 2, N = 1 kept negative + 1 = 2, P + N = 4
    # positive weight 1.5 * N / (P + N) = 1.5 * 2/4 = 0.75; negative weight P / (P + N) = 0.5
    out = spr_loss(LOGITS, CORRECT, "reference")
    assert out.weights.tolist() == [0.75, 0.0, 0.5, 0.0]
    # loss = (0.75 * bce(2, 1) + 0.5 * bce(-3, 0)) / (0.75 + 0.5 + 1e-5)
    #      = (0.75 * 0.126928 + 0.5 * 0.048587) / 1.25001 = 0.095590
    expected = (0.75 * bce(2, 1) + 0.5 * bce(-3, 0)) / (1.25 + 1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.095590, abs=1e-6)
    assert (out.kept_fraction, out.agreement, out.kept_positive, out.kept_negative) == (0.5, 0.5, 1, 1)


def test_reference_mode_with_one_class_is_the_mean_of_the_kept_steps():
    # all correct; step 3 disagrees: 3 kept positives, P = 4, N = 0 + 1 = 1
    # positive weight 1.5 * 1/5 = 0.3 each -> loss = 0.3 * (b1 + b2 + b3) / (0.9 + 1e-5)
    logits, correct = torch.tensor([1.0, 2.0, 3.0, -1.0]), torch.ones(4, dtype=torch.bool)
    out = spr_loss(logits, correct)
    assert out.weights.tolist() == pytest.approx([0.3, 0.3, 0.3, 0.0])
    kept = bce(1, 1) + bce(2, 1) + bce(3, 1)
    assert out.loss.item() == pytest.approx(0.3 * kept / (0.9 + 1e-5), rel=1e-6)
    assert out.loss.item() == pytest.approx(kept / 3, rel=2e-5)  # the balance cancels
    assert out.kept_fraction == 0.75


def test_paper_mode_filters_without_balancing():
    # weights 1 on the two kept steps: loss = (bce(2, 1) + bce(-3, 0)) / (2 + 1e-5)
    out = spr_loss(LOGITS, CORRECT, "paper")
    assert out.weights.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out.loss.item() == pytest.approx((bce(2, 1) + bce(-3, 0)) / (2 + 1e-5), rel=1e-6)


def test_bce_mode_trains_every_step():
    # bce(2,1) = 0.126928, bce(-1,1) = 1.313262, bce(-3,0) = 0.048587, bce(0.5,0) = 0.974077
    out = spr_loss(LOGITS, CORRECT, "bce")
    total = bce(2, 1) + bce(-1, 1) + bce(-3, 0) + bce(0.5, 0)
    assert total == pytest.approx(0.126928 + 1.313262 + 0.048587 + 0.974077, abs=1e-5)
    assert out.loss.item() == pytest.approx(total / (4 + 1e-5), rel=1e-6)
    assert (out.kept_fraction, out.agreement) == (1.0, 0.5)


def test_only_kept_steps_get_a_gradient_and_labels_may_be_numbers():
    logits = LOGITS.clone().requires_grad_(True)
    spr_loss(logits, CORRECT.long()).loss.backward()
    grad = logits.grad.tolist()
    assert grad[1] == 0.0 and grad[3] == 0.0
    # d/ds of w * bce / W: w (sigmoid(s) - y) / W with W = 1.25 + 1e-5
    assert grad[0] == pytest.approx(0.75 * (torch.sigmoid(torch.tensor(2.0)).item() - 1) / 1.25001, rel=1e-5)
    assert grad[2] == pytest.approx(0.5 * torch.sigmoid(torch.tensor(-3.0)).item() / 1.25001, rel=1e-5)


def test_empty_batches_and_bad_input():
    logits = torch.zeros(0, requires_grad=True)
    out = spr_loss(logits, torch.zeros(0, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.kept_fraction == 0.0
    out.loss.backward()  # still part of the graph
    with pytest.raises(ValueError, match="mode='sum'; valid: reference, paper, bce"):
        spr_loss(LOGITS, CORRECT, "sum")
    with pytest.raises(ValueError, match=r"logits must be \[N\]"):
        spr_loss(LOGITS[None], CORRECT)
    assert SPR_MODES == ("reference", "paper", "bce")
    assert spr_weights(LOGITS, CORRECT).requires_grad is False


def test_backbone_gradient_is_scaled_by_1e_4():
    features = torch.randn(3, 5, requires_grad=True)
    scaled = scale_backbone_grad(features)
    assert torch.allclose(scaled, features, rtol=1e-6, atol=1e-7)  # same values
    upstream = torch.randn(3, 5)
    (scaled * upstream).sum().backward()
    assert torch.allclose(features.grad, 1e-4 * upstream, rtol=1e-6, atol=0)
    features.grad = None
    (scale_backbone_grad(features, scale=0.5) * upstream).sum().backward()
    assert torch.allclose(features.grad, 0.5 * upstream)
