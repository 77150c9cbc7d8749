"""A frozen LM's log-probs with each group's prompt forwarded once (policies/shared_prompt_logprobs.py)
equal the plain forward's on every completion target.

    .venv/bin/pytest tests/test_shared_prompt_logprobs.py
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from policies.joint_step import JointLossConfig, frozen_logprobs, target_logprobs
from policies.rollout_batch import Rollout, collate_rollouts
from policies.shared_prompt_logprobs import shared_prompt_lengths, shared_prompt_logprobs
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer
from scorers.sprm_positions import StepMarkers

TOK = build_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id
MARKERS = StepMarkers.from_tokenizer(TOK, len(TOK))
LM = build_model(TinyModelConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, seed=3), TOK).eval()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rollout(prompt: tuple[int, ...], completion: list[int]) -> Rollout:
    return Rollout("p", prompt, tuple(completion), tuple(-0.5 for _ in completion), "", "length")


# Two groups of three with prompts of different lengths; completions of different lengths (the
# batch is right-padded), one of them empty.
PROMPTS = ((BOS, 100, 101, 102, 103, 104), (BOS, 200, 201))
COMPLETIONS = (([10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30]), ([40, 41, 42, 43], [], [50, 51, EOS]))


def batch(group: int = 3):
    rows = [rollout(p, c) for p, cs in zip(PROMPTS, COMPLETIONS) for c in cs]
    return collate_rollouts(rows, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], group, MARKERS, PAD)


def plain(lm, b, temperature: float) -> torch.Tensor:
    logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    return target_logprobs(logits, b.input_ids, temperature)[0]


def test_shared_lengths_are_the_prompts():
    assert shared_prompt_lengths(batch()).tolist() == [len(p) for p in PROMPTS]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_completion_targets_equal_the_plain_forward(temperature):
    b = batch()
    shared = shared_prompt_lengths(b)
    got = shared_prompt_logprobs(LM, b, shared, temperature)
    want = plain(LM, b, temperature)
    mask = b.completion_mask > 0
    assert int(mask.sum()) == sum(len(c) for cs in COMPLETIONS for c in cs)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert bool((got[~mask] == 0).all())  # nothing outside the completions is computed


def test_frozen_logprobs_takes_the_shared_path_and_the_kl_term_is_unchanged():
    b = batch()
    cfg = JointLossConfig(temperature=0.8)
    mask = b.completion_mask > 0
    torch.testing.assert_close(frozen_logprobs(LM, b, cfg)[mask], plain(LM, b, 0.8)[mask], rtol=1e-5, atol=1e-5)


def test_sharing_does_not_apply_to_unshared_or_unusual_batches():
    assert shared_prompt_lengths(batch(group=1)) is None  # one rollout per prompt
    b = batch()
    other = b.input_ids.clone()
    other[1, 2] += 1  # the second row of the first group has another prompt
    assert shared_prompt_lengths(dataclasses.replace(b, input_ids=other)) is None
    left = b.attention_mask.flip(-1)  # not right-padded
    assert shared_prompt_lengths(dataclasses.replace(b, attention_mask=left)) is None


def test_frozen_logprobs_without_sharing_is_the_plain_forward():
    b = batch(group=1)
    torch.testing.assert_close(frozen_logprobs(LM, b, JointLossConfig()), plain(LM, b, 1.0))
