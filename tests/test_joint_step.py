"""Tests of one joint GRPO + SPR step (`policies.joint_step`) and of the rollouts it trains on
(`policies.rollout_batch`): the tensor layout of a hand-made batch, the loss pieces equal
`policies.grpo` and `scorers.spr_loss` computed by hand, the on-policy policy loss in closed form,
the gradient routing (SPR off: the head gets exactly zero; GRPO off: the backbone gets 1e-4 of the
gradient the head's input receives), and the rollout source's generation-time path scores equal
a training-layout forward's.

    .venv/bin/pytest tests/test_joint_step.py
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from experiments.aha_metrics import path_scores
from experiments.tasks import arith
from policies.grpo import GRPOLossConfig, group_advantages, grpo_loss, token_entropy
from policies.joint_step import JointForward, JointLossConfig, frozen_logprobs, joint_step
from policies.reflective_model import ReflectiveModel
from policies.rollout_batch import Rollout, TransformersRolloutSource, answer_written, collate_rollouts, outcome_reward
from policies.sampling_config import SamplingConfig
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer
from policies.transformers_policy import TransformersPolicy
from scorers.spr_loss import spr_loss
from scorers.sprm_head import build_sprm_head, sprm_logits
from scorers.sprm_positions import StepMarkers

TOK = build_tokenizer()
SEP, OPEN, CLOSE = (TOK(t, add_special_tokens=False).input_ids[0] for t in (".\n\n", "<think>", "</think>"))
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id
MARKERS = StepMarkers.from_tokenizer(TOK, len(TOK))
SHAPE = TinyModelConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def biased_lm(tokenizer=TOK, seed: int = 0, sep_logit: float = 4.5, eos_logit: float = 2.5):
    """A random tiny Llama that ends steps and sequences often: every embedding gets a shared
    direction u, so the final normed state is ~ sqrt(C) u, and the (untied) output rows of the
    separator and EOS are set to logit * u / sqrt(C): logits ~4.5 and ~2.5 against ~0 for the
    other 450 tokens, i.e. P(separator) ~ 0.17, P(EOS) ~ 0.03 per token."""
    shape = dataclasses.replace(SHAPE, layers=1, tie_embeddings=False, seed=seed)
    model = build_model(shape, tokenizer)
    c = shape.hidden
    with torch.no_grad():
        u = torch.randn(c, generator=torch.Generator().manual_seed(seed))
        u = u / u.norm()
        model.model.embed_tokens.weight.add_(u)
        sep = tokenizer(".\n\n", add_special_tokens=False).input_ids[0]
        model.lm_head.weight[sep] = sep_logit * u / math.sqrt(c)
        model.lm_head.weight[tokenizer.eos_token_id] = eos_logit * u / math.sqrt(c)
    return model


def rollout(completion: list[int], prompt: tuple[int, ...] = (BOS, 100, 101, OPEN)) -> Rollout:
    logprobs = tuple(-0.1 * (k + 1) for k in range(len(completion)))
    finish = "eos" if completion and completion[-1] == EOS else "length"
    return Rollout("p", prompt, tuple(completion), logprobs, "", finish)


# r0: separators at 6 and 8 (9 repeats 8: a run), </think> at 11 -> reads 5 and 7
# r1: the separator at 4 follows <think> (skipped), the one at 6 counts -> reads 5
# r2: no separator (cut by length)        r3: 5 counts -> reads 4; 8 lies after </think>
COMPLETIONS = (
    [10, 11, SEP, 12, SEP, SEP, 13, CLOSE, 14, EOS],
    [SEP, 20, SEP, EOS],
    [30, 31, 32],
    [40, SEP, 41, CLOSE, SEP, EOS],
)
REWARDS = (1.0, 0.0, 0.0, 1.0)  # groups of 2: (r0, r1), (r2, r3)


def hand_batch(with_old_logprobs: bool = False):
    return collate_rollouts([rollout(c) for c in COMPLETIONS], REWARDS, 2, MARKERS, PAD, with_old_logprobs)


def reflective_model(seed: int = 0) -> ReflectiveModel:
    lm = build_model(dataclasses.replace(SHAPE, seed=seed), TOK)
    head = build_sprm_head(SHAPE.hidden, seed=seed)
    with torch.no_grad():
        head[3].weight.mul_(8)  # spread the head's logits so steps of both signs occur
    return ReflectiveModel(lm, head)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_collate_lays_out_tokens_masks_and_step_positions():
    batch = hand_batch(with_old_logprobs=True)
    assert batch.input_ids.shape == (4, 14) and batch.completion_mask.shape == (4, 13)
    assert batch.input_ids[1].tolist() == [BOS, 100, 101, OPEN, SEP, 20, SEP, EOS] + [PAD] * 6
    assert batch.attention_mask.sum(-1).tolist() == [14, 8, 7, 10]
    # row 2: completion tokens at positions 4, 5, 6 are the targets of columns 3, 4, 5
    assert batch.completion_mask[2].nonzero().squeeze(-1).tolist() == [3, 4, 5]
    assert batch.old_logprobs[2, 3:6].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.old_logprobs[2, :3].tolist() == [0.0] * 3 and batch.old_logprobs[2, 6:].abs().sum() == 0
    assert batch.step_rows.tolist() == [0, 0, 1, 3] and batch.step_cols.tolist() == [5, 7, 5, 4]
    assert batch.rewards.tolist() == list(REWARDS) and batch.num_groups == 2
    second = batch.groups(1, 2)  # the second prompt's rollouts, steps renumbered
    assert second.input_ids.tolist() == batch.input_ids[2:].tolist()
    assert second.step_rows.tolist() == [1] and second.step_cols.tolist() == [4]
    assert hand_batch().old_logprobs is None
    with pytest.raises(ValueError, match="groups of group_size=3"):
        collate_rollouts([rollout(c) for c in COMPLETIONS], REWARDS, 3, MARKERS, PAD)


def test_loss_pieces_equal_the_grpo_and_spr_modules():
    model, ref = reflective_model(0).eval(), build_model(dataclasses.replace(SHAPE, seed=1), TOK).eval()
    batch, cfg = hand_batch(), JointLossConfig(temperature=0.7)
    got = joint_step(JointForward(model), batch, ref, cfg)
    # by hand: one forward, logits / T, the frozen reference at T, verl's pieces
    out = model(batch.input_ids, batch.attention_mask)
    tempered = out.logits[:, :-1] / 0.7  # [B, T, V]
    targets = batch.input_ids[:, 1:, None]
    logp = torch.log_softmax(tempered, -1).gather(-1, targets).squeeze(-1)  # [B, T]
    ref_tempered = ref(input_ids=batch.input_ids).logits[:, :-1] / 0.7
    ref_logp = torch.log_softmax(ref_tempered, -1).gather(-1, targets).squeeze(-1)
    adv = group_advantages(torch.tensor(REWARDS).view(2, 2)).view(-1)
    entropy, mask = token_entropy(tempered), batch.completion_mask
    want = grpo_loss(logp, logp.detach(), ref_logp, adv, entropy, mask, GRPOLossConfig())
    head_logits = sprm_logits(model.head, out.features[batch.step_rows, batch.step_cols])
    spr = spr_loss(head_logits, torch.tensor([True, True, False, True]), "reference")
    for name in ("total", "policy", "entropy", "kl"):
        assert getattr(got.grpo, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-5, abs=1e-7), name
    assert got.grpo.kl.item() > 0  # another model: a real KL
    assert got.spr.loss.item() == pytest.approx(spr.loss.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx(want.total.item() + spr.loss.item(), rel=1e-5)
    assert got.metrics["spr/kept_fraction"] == spr.kept_fraction and got.metrics["spr/steps"] == 4
    assert got.metrics["spr/left_out_steps"] == 0


def test_a_cut_wrong_rollouts_steps_are_left_out_of_the_spr_loss():
    """The reference drops rollouts whose reward is 0.1 (a wrong final answer cut at the token
    limit) from the SPR loss: r1's step is unlabelled when its reward is 0.1, and with
    truncated_wrong_reward=0 the same reward 0 keeps it as a negative."""
    model = reflective_model(0).eval()
    rewards = (1.0, 0.1, 0.0, 1.0)
    batch = collate_rollouts([rollout(c) for c in COMPLETIONS], rewards, 2, MARKERS, PAD)
    got = joint_step(JointForward(model), batch, None, JointLossConfig(kl_coef=0.0))
    out = model(batch.input_ids, batch.attention_mask)
    head_logits = sprm_logits(model.head, out.features[batch.step_rows, batch.step_cols])  # steps of r0, r0, r1, r3
    want = spr_loss(head_logits[[0, 1, 3]], torch.tensor([True, True, True]), "reference")
    assert got.spr.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    # spr/steps is kept_fraction's whole: the 3 steps the loss reads, beside the 1 left out
    assert got.spr.weights.numel() == 3 and got.metrics["spr/steps"] == 3 and got.metrics["spr/left_out_steps"] == 1
    plain = joint_step(JointForward(model), hand_batch(), None, JointLossConfig(kl_coef=0.0, truncated_wrong_reward=0.0))
    every = spr_loss(head_logits, torch.tensor([True, True, False, True]), "reference")
    assert plain.spr.loss.item() == pytest.approx(every.loss.item(), rel=1e-5) and plain.spr.weights.numel() == 4
    bce = {cut: joint_step(JointForward(model), hand_batch() if cut == 0 else batch, None,
                           JointLossConfig(kl_coef=0.0, spr_mode="bce", truncated_wrong_reward=cut)).spr for cut in (0.0, 0.1)}
    assert bce[0.1].loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(head_logits[[0, 1, 3]], torch.ones(3)).item(), rel=1e-4)
    assert bce[0.0].loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(head_logits, torch.tensor([1.0, 1, 0, 1])).item(), rel=1e-4)


def test_grpo_reads_a_cut_wrong_rollouts_reward_as_zero_as_the_reference():
    """The reference zeroes math_v2's 0.1s before compute_grpo_outcome_advantage (ray_trainer.fit):
    rewards (1, 0.1 | 0, 1) train GRPO as (1, 0 | 0, 1); the 0.1 made r1 a full-size positive
    advantage against r2 (+0.71 each way) where the reference has none."""
    from policies.joint_step import grpo_rewards

    model = reflective_model(0).eval()
    cut = collate_rollouts([rollout(c) for c in COMPLETIONS], (1.0, 0.1, 0.0, 1.0), 2, MARKERS, PAD)
    plain = collate_rollouts([rollout(c) for c in COMPLETIONS], (1.0, 0.0, 0.0, 1.0), 2, MARKERS, PAD)
    got, want = (joint_step(JointForward(model), b, None, JointLossConfig(kl_coef=0.0)).grpo for b in (cut, plain))
    for name in ("total", "policy"):
        assert getattr(got, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-6, abs=1e-9), name
    assert grpo_rewards(torch.tensor([0.1, 0.0, 1.0, 0.1]), 0.1).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert grpo_rewards(torch.tensor([0.1, 0.0]), 0.0).tolist() == pytest.approx([0.1, 0.0])  # no mark: as given


def test_outcome_reward_is_the_references():
    """1 correct; 0.1 for a wrong answer cut at the token limit; 0 for a wrong one that ended, or a
    cut one with no answer (math_v2.compute_score of MetaStone-S1)."""
    cut, ended = rollout([10, 11, 12]), rollout([10, EOS])
    assert (cut.finish, ended.finish) == ("length", "eos")
    assert outcome_reward(True, cut, True) == outcome_reward(True, ended, True) == 1.0
    assert outcome_reward(False, cut, True) == 0.1
    assert outcome_reward(False, ended, True) == outcome_reward(False, cut, False) == 0.0
    assert outcome_reward(False, cut, True, truncated_wrong_reward=0.0) == 0.0
    with pytest.raises(ValueError, match="truncated_wrong_reward=0.5 must be >= 0 and < 0.5"):
        JointLossConfig(truncated_wrong_reward=0.5)


def test_an_answer_is_written_once_text_follows_the_think_span_as_the_references_reading():
    # math_v2.extract_solution: any non-blank text after the last </think>, whatever it extracts
    assert answer_written("1 + 2 = 3.\n\n</think>Answer: ", None)  # cut inside the answer line
    assert answer_written("</think>x</think>Ans", None)
    assert not answer_written("1 + 2 = 3.\n\n</think> \n", "3")  # only blanks after it
    assert not answer_written("</think>Answer: 4</think>", "4")  # the last </think> counts
    # no think span: the task's extract_answer decides
    assert answer_written("Answer: 4", "4") and not answer_written("Answer: ", None)


def test_on_policy_policy_loss_in_closed_form():
    # old = new log-probs: ratio 1, loss = token mean of -A.  Group [1, 0]: mean 0.5, unbiased std
    # sqrt(0.5), A = +-0.70711; group [0, 1]: -+0.70711.  Tokens per rollout n = [10, 4, 3, 6]:
    # loss = -0.70711 * (10 - 4 - 3 + 6) / 23 = -0.27669
    got = joint_step(JointForward(reflective_model().eval()), hand_batch(), None, JointLossConfig(kl_coef=0.0))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert got.grpo.policy.item() == pytest.approx(-a * 9 / 23, rel=1e-6)
    assert got.grpo.clip_fraction.item() == 0.0 and got.grpo.kl.item() == 0.0


def test_recomputed_old_logprobs_equal_the_free_shortcut():
    model = reflective_model().eval()
    batch, cfg = hand_batch(), JointLossConfig(kl_coef=0.0)
    recomputed = dataclasses.replace(batch, old_logprobs=frozen_logprobs(model.lm, batch, cfg))
    a = joint_step(JointForward(model), batch, None, cfg)
    b = joint_step(JointForward(model), recomputed, None, cfg)
    assert a.grpo.policy.item() == pytest.approx(b.grpo.policy.item(), rel=1e-6)
    assert b.grpo.approx_kl.abs().item() < 1e-6
    # the same weights as a frozen reference: KL exactly 0
    c = joint_step(JointForward(model), batch, copy.deepcopy(model.lm), JointLossConfig())
    assert c.grpo.kl.item() == pytest.approx(0.0, abs=1e-7)


def test_with_spr_off_the_head_gets_no_gradient():
    model = reflective_model()
    joint_step(JointForward(model), hand_batch(), None, JointLossConfig(kl_coef=0.0, spr_coef=0.0)).loss.backward()
    head = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in head)
    assert any(torch.count_nonzero(p.grad) for p in model.lm.parameters())  # the policy still learns


def backbone_and_head_grads(scale: float) -> tuple[dict, dict]:
    model = reflective_model().eval()  # no dropout: both runs see the same head
    # bce: every step trained, whatever the sign of its logit
    cfg = JointLossConfig(kl_coef=0.0, grpo_coef=0.0, spr_mode="bce", backbone_grad_scale=scale)
    joint_step(JointForward(model), hand_batch(), None, cfg).loss.backward()
    return grads(model.lm), grads(model.head)


def test_with_grpo_off_the_backbone_gets_1e4_of_the_heads_feature_gradient():
    scaled, head_scaled = backbone_and_head_grads(1e-4)
    full, head_full = backbone_and_head_grads(1.0)
    assert any(torch.count_nonzero(g) for g in full.values())
    for name, g in full.items():  # linear in the gradient that enters the features
        assert torch.allclose(scaled[name], 1e-4 * g, rtol=1e-4, atol=1e-12), name
    for name, g in head_full.items():  # the head itself trains at full strength either way
        assert torch.allclose(head_scaled[name], g, rtol=1e-5, atol=1e-9), name
    frozen, _ = backbone_and_head_grads(0.0)
    assert all(torch.count_nonzero(g) == 0 for g in frozen.values())


def test_the_rollout_sources_path_scores_equal_a_training_layout_forward():
    lm = biased_lm()
    model = ReflectiveModel(lm, build_sprm_head(lm.config.hidden_size, seed=3)).eval()
    sampling = SamplingConfig(temperature=1.0, max_total_tokens=24)
    source = TransformersRolloutSource(TransformersPolicy.from_reflective(model, TOK, sampling, arith.prompt_text))
    problems = arith.generate_problems("train", 3, seed=0)
    groups = source.rollouts(problems, 4, seed=0)
    flat = [r for g in groups for r in g]
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(r.prompt_ids == tuple(TOK(arith.prompt_text(p)).input_ids) for p, g in zip(problems, groups) for r in g)
    batch = collate_rollouts(flat, [0.0] * len(flat), 4, MARKERS, PAD)
    assert batch.step_rows.numel() >= 6  # the biased model ends steps often
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask)
        probs = model.step_scores(out.features[batch.step_rows, batch.step_cols])
    again = path_scores(probs, batch.step_rows, len(flat))
    attached = torch.tensor([r.path_score for r in flat])
    assert torch.allclose(attached, again, atol=1e-4)  # a rollout with no step: 1e-10 vs 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="spr_mode='soft'"):
        JointLossConfig(spr_mode="soft")
    with pytest.raises(ValueError, match="temperature=0"):
        JointLossConfig(temperature=0)
    with pytest.raises(ValueError, match="backbone_grad_scale=2"):
        JointLossConfig(backbone_grad_scale=2)
    with pytest.raises(ValueError, match="clip_ratio"):
        JointLossConfig(clip_ratio=1.5)


def test_reference_forward_in_bf16_moves_the_kl_term_only_slightly():
    model, ref = reflective_model(0).eval(), build_model(dataclasses.replace(SHAPE, seed=1), TOK).eval()
    batch = hand_batch()
    exact = joint_step(JointForward(model), batch, ref, JointLossConfig())
    half = joint_step(JointForward(model), batch, ref, JointLossConfig(ref_bf16=True))
    assert half.grpo.policy.item() == exact.grpo.policy.item()  # the policy's own forward stays fp32
    assert half.grpo.kl.item() != exact.grpo.kl.item()  # the reference really ran in bf16
    assert half.grpo.kl.item() == pytest.approx(exact.grpo.kl.item(), rel=0.05, abs=1e-3)
