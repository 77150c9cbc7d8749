"""Pins of the reflective model, the joint GRPO + SPR step and the GRPO loss that a mutation review
found no test holding: the feature layer the head reads (a feature_layer=-1 model, in the
shared-prompt training forward and in the grad-enabled forward); the entropy bonus's gradient; the
bf16 setting reaching the policy's forward, the head's logits staying float32 under it and the
reference forward following it; the logged metrics equal to their sources; the folder check
naming a layer the model lacks; GRPO's clip-ratio default and range; a bf16 head saved and loaded
as bf16; a bool refused as a feature layer; the entropy of bf16 logits computed in float32.

All run on the tiny 2-layer Llama of tests/test_joint_step.py (3 hidden states).

    .venv/bin/python -m pytest tests/test_joint_pins.py
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from policies.grpo import GRPOLossConfig, grpo_loss, token_entropy, token_mean
from policies.joint_step import JointForward, JointLossConfig, joint_step
from policies.reflective_model import ReflectiveModel, check_feature_layer, check_reflective_folder
from scorers.sprm_head import build_sprm_head, sprm_logits
from test_joint_step import SHAPE, TOK, hand_batch, reflective_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def last_layer_model() -> ReflectiveModel:
    """The tiny reflective model with its head on hidden_states[-1] (the default is -2), eval mode."""
    base = reflective_model(0)
    return ReflectiveModel(base.lm, base.head, feature_layer=-1).eval()


def hidden_state(model: ReflectiveModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int):
    """hidden_states[layer] [B, L, C] of a plain output_hidden_states forward, no grad."""
    with torch.no_grad():
        out = model.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


def test_the_shared_prompt_training_forward_feeds_the_head_its_own_feature_layer():
    model, batch = last_layer_model(), hand_batch()
    got = joint_step(JointForward(model), batch, None, JointLossConfig(kl_coef=0.0, shared_prompt=True))
    states = hidden_state(model, batch.input_ids, batch.attention_mask, -1)
    want = sprm_logits(model.head, states[batch.step_rows, batch.step_cols])
    other = sprm_logits(model.head, hidden_state(model, batch.input_ids, batch.attention_mask, -2)[
        batch.step_rows, batch.step_cols])
    assert not torch.allclose(want, other, atol=1e-3)  # the two layers give the head different inputs
    torch.testing.assert_close(got.head_logits, want, atol=1e-5, rtol=1e-5)


def test_the_grad_enabled_forward_reads_the_feature_layer_as_the_inference_one():
    model = last_layer_model()
    ids, mask = torch.tensor([[1, 100, 101, 102]]), torch.ones(1, 4, dtype=torch.long)
    want = hidden_state(model, ids, mask, -1)
    with torch.no_grad():
        inference = model(ids, mask).features
    training = model(ids, mask).features  # grad enabled: every layer's states, then [feature_layer]
    assert training.requires_grad
    torch.testing.assert_close(inference, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(training.detach(), want, atol=1e-6, rtol=1e-6)


def entropy_bonus_logit_grad(coef: float) -> torch.Tensor:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 0]
    out = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0]), token_entropy(logits), torch.ones(1, 2),
                    GRPOLossConfig(kl_coef=0.0, entropy_coef=coef))
    out.total.backward()
    return logits.grad


def test_the_entropy_bonus_backpropagates_minus_coef_times_the_entropys_gradient():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], requires_grad=True)
    (entropy_grad,) = torch.autograd.grad(token_mean(token_entropy(logits), torch.ones(1, 2)), logits)
    assert entropy_grad.abs().sum() > 0.1
    diff = entropy_bonus_logit_grad(0.01) - entropy_bonus_logit_grad(0.0)
    torch.testing.assert_close(diff, -0.01 * entropy_grad, atol=1e-7, rtol=1e-5)


def test_bf16_runs_the_policys_forward_in_bf16_and_keeps_the_head_logits_float32():
    model, batch = reflective_model(0).eval(), hand_batch()
    half = joint_step(JointForward(model), batch, None, JointLossConfig(kl_coef=0.0, bf16=True))
    exact = joint_step(JointForward(model), batch, None, JointLossConfig(kl_coef=0.0, bf16=False))
    assert half.head_logits.dtype == torch.float32
    assert half.grpo.entropy.item() != exact.grpo.entropy.item()  # the policy's logits came from bf16
    assert half.head_logits.tolist() != exact.head_logits.tolist()  # so did the head's features
    assert half.grpo.entropy.item() == pytest.approx(exact.grpo.entropy.item(), rel=0.01)
    assert half.loss.item() == pytest.approx(exact.loss.item(), rel=0.05, abs=0.01)


def test_the_reference_forward_follows_bf16_even_with_ref_bf16_false():
    model, batch = reflective_model(0).eval(), hand_batch()
    ref = copy.deepcopy(model.lm)  # the policy's own weights: the same bf16 forward gives KL 0 (exactly, on CPU)
    out = joint_step(JointForward(model), batch, ref, JointLossConfig(bf16=True, ref_bf16=False))
    assert abs(out.grpo.kl.item()) < 1e-9  # an fp32 reference against the bf16 policy gave 5.7e-08


def test_a_kl_not_measured_is_not_logged():
    # kl_coef 0 runs no reference forward: its logged 0 read as a policy that had not moved
    model, batch = reflective_model(0).eval(), hand_batch()
    metrics = joint_step(JointForward(model), batch, None, JointLossConfig(kl_coef=0.0)).metrics
    assert "loss/kl" not in metrics and "loss/pg" in metrics


def test_every_logged_metric_equals_its_source():
    model, batch = reflective_model(0).eval(), hand_batch()
    out = joint_step(JointForward(model), batch, reflective_model(1).lm.eval(),
                     JointLossConfig(kl_coef=0.01, entropy_coef=0.01, spr_mode="bce"))
    grpo, spr, m = out.grpo, out.spr, out.metrics
    assert grpo.kl.item() > 0
    # the pairs a mix-up would confuse differ here
    assert out.loss.item() != grpo.total.item() and grpo.entropy.item() != grpo.kl.item()
    assert spr.kept_positive != spr.kept_negative
    assert m["loss/total"] == out.loss.item()
    assert m["loss/pg"] == grpo.policy.item()
    assert m["loss/entropy"] == grpo.entropy.item()
    assert m["loss/kl"] == grpo.kl.item()
    assert m["loss/spr"] == spr.loss.item()
    assert m["ppo/clip_fraction"] == grpo.clip_fraction.item()
    assert m["ppo/approx_kl"] == grpo.approx_kl.item()
    assert m["spr/kept_fraction"] == spr.kept_fraction
    assert m["spr/agreement"] == spr.agreement
    assert m["spr/kept_positive"] == spr.kept_positive
    assert m["spr/kept_negative"] == spr.kept_negative


def test_the_folder_check_names_a_layer_the_model_lacks(tmp_path):
    folder = reflective_model(0).save_pretrained(tmp_path / "m", TOK)
    assert check_reflective_folder(folder) == (-2, SHAPE.layers + 1)
    (folder / "sprm.json").unlink()  # the reference's format: any layer is asked for
    with pytest.raises(ValueError, match=r"feature_layer=9 must index the 3 hidden states"):
        check_reflective_folder(folder, 9)
    (folder / "sprm.json").write_text(json.dumps({"feature_layer": 7}) + "\n")
    with pytest.raises(ValueError, match=r"feature_layer=7 must index the 3 hidden states"):
        check_reflective_folder(folder)


def test_grpo_clip_ratio_defaults_to_0_2():
    assert GRPOLossConfig().clip_ratio == 0.2
    # ratio 1.25 on a positive advantage is clipped at 1.2 by the default config
    out = grpo_loss(torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1), None, torch.tensor([1.0]),
                    torch.zeros(1, 1), torch.ones(1, 1), GRPOLossConfig(kl_coef=0.0))
    assert out.policy.item() == pytest.approx(-1.2)
    assert out.clip_fraction.item() == 1.0


def test_a_clip_ratio_of_zero_is_refused():
    with pytest.raises(ValueError, match="clip_ratio=0"):
        GRPOLossConfig(clip_ratio=0.0)
    with pytest.raises(ValueError, match="clip_ratio=0"):
        JointLossConfig(clip_ratio=0.0)


def test_a_bf16_head_stays_bf16_when_saved_and_loaded(tmp_path):
    base = reflective_model(0)
    model = ReflectiveModel(base.lm, build_sprm_head(SHAPE.hidden, seed=0).to(torch.bfloat16))
    folder = model.save_pretrained(tmp_path / "m", TOK)
    assert model.head[0].weight.dtype == torch.bfloat16  # saving leaves the live head as it was
    loaded, _ = ReflectiveModel.from_pretrained(folder)
    assert loaded.head[0].weight.dtype == torch.bfloat16
    assert torch.equal(loaded.head[0].weight, model.head[0].weight)


def test_a_bool_is_refused_as_a_feature_layer():
    for layer in (True, False):
        with pytest.raises(ValueError, match="must index the 3 hidden states"):
            check_feature_layer(layer, 3)
    check_feature_layer(1, 3)  # an int in range passes


def test_the_entropy_of_bf16_logits_is_computed_in_float32():
    torch.manual_seed(0)
    logits = (torch.randn(1, 4, 2000) * 3).to(torch.bfloat16)
    got = token_entropy(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), token_entropy(logits.double()).double(), atol=1e-4, rtol=1e-5)
