"""Forwarding a GRPO batch with each group's prompt once (policies/shared_prompt.py) gives the
plain forward's logits, features, log-probs, loss and gradients wherever a loss or the head reads.

    .venv/bin/pytest tests/test_shared_prompt.py
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from policies.joint_step import JointLossConfig, frozen_logprobs, target_logprobs
from policies.rollout_batch import Rollout, collate_rollouts
from policies.shared_prompt import shared_prompt_forward, shared_prompt_lengths
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer
from scorers.sprm_positions import StepMarkers

TOK = build_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id
SEP, OPEN = (TOK(t, add_special_tokens=False).input_ids[0] for t in (".\n\n", "<think>"))
MARKERS = StepMarkers.from_tokenizer(TOK, len(TOK))
SHAPE = TinyModelConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, seed=3)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lm():
    return build_model(SHAPE, TOK).eval()


def rollout(prompt: tuple[int, ...], completion: list[int]) -> Rollout:
    return Rollout("p", prompt, tuple(completion), tuple(-0.5 for _ in completion), "", "length")


# Two groups of three with prompts of different lengths; completions of different lengths (the
# batch is right-padded), one of them empty, steps the head reads.
PROMPTS = ((BOS, 100, 101, 102, 103, OPEN), (BOS, 200, OPEN))
COMPLETIONS = (([10, SEP, 12], [20, 21, SEP, 23, 24, SEP, 26], [30]), ([40, 41, SEP, 43], [], [50, 51, EOS]))


def batch(group: int = 3):
    rows = [rollout(p, c) for p, cs in zip(PROMPTS, COMPLETIONS) for c in cs]
    return collate_rollouts(rows, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], group, MARKERS, PAD)


def plain_logits(model, b):
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits


def read_positions(b) -> torch.Tensor:
    """[B, L] True where a loss target's logits or a head read lies."""
    read = torch.zeros_like(b.attention_mask, dtype=torch.bool)
    read[:, :-1] = b.completion_mask > 0
    read[b.step_rows, b.step_cols] = True
    return read


def test_shared_lengths_are_the_prompts():
    b = batch()
    assert b.step_rows.numel() > 0
    assert shared_prompt_lengths(b).tolist() == [len(p) for p in PROMPTS]


def test_a_head_read_before_the_prompt_ends_shortens_the_shared_part():
    b = batch()
    early = dataclasses.replace(b, step_rows=torch.tensor([1]), step_cols=torch.tensor([2]))
    assert shared_prompt_lengths(early).tolist() == [3, len(PROMPTS[1])]


def test_logits_and_features_equal_the_plain_forward_where_read():
    model, b = lm(), batch()
    shared = shared_prompt_lengths(b)
    plain = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, output_hidden_states=True)
    read = read_positions(b)
    for layer in range(-len(plain.hidden_states), len(plain.hidden_states)):
        logits, features = shared_prompt_forward(model, b.input_ids, b.attention_mask, 3, shared, layer)
        torch.testing.assert_close(logits[read], plain.logits[read], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features[read], plain.hidden_states[layer][read], rtol=1e-5, atol=1e-5)
    assert shared_prompt_forward(model, b.input_ids, b.attention_mask, 3, shared)[1] is None


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_frozen_logprobs_equal_the_plain_forward_on_completion_targets(temperature):
    model, b = lm(), batch()
    got = frozen_logprobs(model, b, JointLossConfig(temperature=temperature))
    want = target_logprobs(plain_logits(model, b), b.input_ids, temperature)[0]
    mask = b.completion_mask > 0
    assert int(mask.sum()) == sum(len(c) for cs in COMPLETIONS for c in cs)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_plain_forward():
    model, b = lm(), batch()
    shared = shared_prompt_lengths(b)
    mask = b.completion_mask

    def loss(logits):
        logprobs = target_logprobs(logits, b.input_ids, 1.0)[0]
        return -(logprobs * mask).sum() / mask.sum()

    loss(shared_prompt_forward(model, b.input_ids, b.attention_mask, 3, shared)[0]).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss(plain_logits(model, b)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sharing_does_not_apply_to_unshared_or_unusual_batches():
    assert shared_prompt_lengths(batch(group=1)) is None  # one rollout per prompt
    b = batch()
    other = b.input_ids.clone()
    other[1, 2] += 1  # the second row of the first group has another prompt
    assert shared_prompt_lengths(dataclasses.replace(b, input_ids=other)) is None
    left = b.attention_mask.flip(-1)  # not right-padded
    assert shared_prompt_lengths(dataclasses.replace(b, attention_mask=left)) is None
    prompts_only = collate_rollouts([rollout(PROMPTS[0], [])] * 3, [1.0, 0.0, 1.0], 3, MARKERS, PAD)
    assert shared_prompt_lengths(prompts_only) is None  # nothing after the prompt to forward per row


def test_frozen_logprobs_without_sharing_is_the_plain_forward():
    model, b = lm(), batch(group=1)
    torch.testing.assert_close(frozen_logprobs(model, b, JointLossConfig()), target_logprobs(plain_logits(model, b), b.input_ids, 1.0)[0])


def test_a_sliding_window_model_equals_the_plain_forward_where_read():
    # the prompt's KV came from the model's own cache, whose sliding layers keep window - 1
    # columns: a prompt longer than the window left the rows' rest reading a cut past
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    model, b = Qwen2ForCausalLM(config).eval(), batch()
    plain = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    logits, _ = shared_prompt_forward(model, b.input_ids, b.attention_mask, 3, shared_prompt_lengths(b))
    read = read_positions(b)
    torch.testing.assert_close(logits[read], plain.logits[read], rtol=1e-5, atol=1e-5)
