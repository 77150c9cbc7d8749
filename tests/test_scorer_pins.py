"""Pins for scorer behaviours that a mutation review of scorers/ found unpinned elsewhere.

Tiny hand-made inputs only (a 2-layer random Llama for the SPRM scorer, a 1-layer one saved to a
temporary folder for the PRM output rows, synthetic head-training caches): the file runs in a few
seconds on CPU. What is pinned: `SPRMScorer` reads the separators of its own `StepFormat` (a custom
separator, no think tags); the PRM output rows keep the LM head's bias, the config's
`logits_scaling` and final soft-capping, also when read from a folder's weight files; head
training passes weight decay and grad_clip to the optimiser, refuses lr=0, writes a training row
at the last step, and its fc/correct_prob averages the correct rollouts only; the step oracle's
finished last step must pass both the checker and the grader; `ConfidenceScorer` refuses NaN
log-probs and caps a step score at 1; `spr_loss` counts its kept negatives; a seeded
`build_sprm_head` leaves the caller's RNG alone; the outcome oracle accepts unfinished=0.0; a
common start of exactly min_shared tokens is shared by the PRM batch plan.

Run: `.venv/bin/python -m pytest tests/test_scorer_pins.py`
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from policies.reflective_model import ReflectiveModel
from scorers.confidence import ConfidenceScorer
from scorers.head_training import HeadTrainConfig, batch_fc, path_scores, position_probs, train_head
from scorers.outcome_oracle import OutcomeOracleScorer
from scorers.prm_batches import MIN_SHARED, forwarded_tokens, plan_batches
from scorers.prm_readers import TokenRows, load_token_rows, token_pair_logits
from scorers.spr_loss import spr_loss
from scorers.sprm_head import build_sprm_head
from scorers.sprm_positions import StepMarkers
from scorers.sprm_scorer import SPRMScorer
from scorers.step_oracle import StepOracleScorer
from test_train_head import separable_cache
from test_transformers_policy import ID, TOK, ids, make_model
from treesearch.records import Prefix, Problem, Step
from treesearch.steps import StepFormat

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROBLEM = Problem("p", "1")


def step(text: str, finish: str = "separator", logprobs: list[float] | None = None) -> Step:
    """A step of TOK's tokens of text (or of len(logprobs) dummy tokens when logprobs is given)."""
    token_ids = tuple(ids(text)) if logprobs is None else tuple(range(len(logprobs)))
    lps = tuple(logprobs) if logprobs is not None else (0.0,) * len(token_ids)
    return Step(text, token_ids, lps, finish)


def train(cache, **settings):
    """train_head on cache with a small outcome_bce config (settings override it), no progress bar."""
    config = dict(labels="outcome_bce", lr=1e-2, steps=20, batch_rollouts=8, eval_every=0)
    config.update(settings)
    return train_head(cache, HeadTrainConfig(**config), progress=False)


# -- SPRMScorer: the policy's step format ----------------------------------------------------------


def test_sprm_scorer_reads_the_separators_of_its_own_step_format():
    # a policy whose steps end on "=" and that writes no think tags: every "=" of the completion is
    # a step end, the head reads the token before it (the default format, ".\n\n" inside <think>,
    # would read nothing on this path and score both steps 0)
    fmt = StepFormat(separator="=", think_open="", think_close="")
    model = ReflectiveModel(make_model(len(TOK)), build_sprm_head(64, seed=1))
    scorer = SPRMScorer(model, TOK, prompt_fn=lambda p: p.question, step_format=fmt)
    assert scorer.markers == StepMarkers(frozenset({ID["="]}), None, None)
    path = Prefix(PROBLEM, (step("+2=3 "), step("x2=6 ")))
    reading = scorer.read([path])[0]
    expected = [i - 1 for i, t in enumerate(reading.token_ids) if t == ID["="] and i >= reading.prompt_length]
    assert len(expected) == 2
    assert list(reading.positions) == expected
    # one reading per step, each its own separator's (sigmoid of a random head: strictly in (0, 1))
    assert reading.step_scores == pytest.approx(reading.position_scores)
    assert all(0.0 < s < 1.0 for s in reading.step_scores)


# -- PRM output rows -------------------------------------------------------------------------------


def test_token_rows_soft_cap_the_logits():
    rows = TokenRows(torch.eye(2), None, 1.0, 30.0)
    x = torch.tensor([[100.0, -20.0], [40.0, 35.0]])
    assert torch.allclose(rows(x), 30.0 * torch.tanh(x / 30.0))
    assert not torch.allclose(rows(x), x)  # the cap bites at these sizes


def test_token_pair_logits_keep_the_lm_head_bias():
    head = torch.nn.Linear(2, 5, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.arange(10.0).reshape(5, 2) / 10)
        head.bias.copy_(torch.tensor([0.0, 0.0, 3.0, -3.0, 0.0]))
    model = SimpleNamespace(config=SimpleNamespace(), get_output_embeddings=lambda: head)
    features = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    pair = token_pair_logits(model, features, 2, 3)  # [K, 2] (good, bad)
    expected = features @ head.weight[[2, 3]].T + torch.tensor([3.0, -3.0])
    assert torch.allclose(pair, expected.detach())


def test_load_token_rows_applies_the_config_logit_scaling_and_soft_capping(tmp_path: Path):
    # a Granite-style logits_scaling (divides) and a Gemma-2-style final soft-capping in config.json:
    # the rows read from the weight files give the loaded model's logits
    config = LlamaConfig(vocab_size=7, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         logits_scaling=4.0, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits large enough for the scale and the cap to matter
    model.save_pretrained(tmp_path)
    features = torch.randn(3, 8)
    raw = features @ model.lm_head.weight[[2, 5]].T.detach()
    expected = 3.0 * torch.tanh(raw / 4.0 / 3.0)
    rows = load_token_rows(tmp_path, 2, 5)
    with torch.no_grad():
        assert torch.allclose(token_pair_logits(model, features, 2, 5), expected, atol=1e-5)
        assert torch.allclose(rows(features), expected, atol=1e-5)
    assert not torch.allclose(expected, raw, atol=1e-2)


# -- head training ---------------------------------------------------------------------------------


def test_head_training_weight_decay_shrinks_the_head():
    cache = separable_cache(8, seed=0)
    plain = train(cache, weight_decay=0.0).head[0].weight.norm().item()
    decayed = train(cache, weight_decay=10.0).head[0].weight.norm().item()
    assert decayed < 0.5 * plain


def test_head_training_clips_the_gradient_norm():
    # a clip far below Adam's eps (1e-8) leaves updates ~1e-4 of the unclipped ones: the head barely
    # moves from its initialisation, while without clipping (0) it moves by ~lr per step
    cache = separable_cache(8, seed=0)
    start = build_sprm_head(cache.hidden_size, seed=0)[0].weight.detach()
    clipped = train(cache, weight_decay=0.0, grad_clip=1e-12).head[0].weight.detach()
    free = train(cache, weight_decay=0.0, grad_clip=0.0).head[0].weight.detach()
    assert (clipped - start).abs().max().item() < 1e-3
    assert (free - start).abs().max().item() > 2e-2


def test_head_training_logs_the_last_step_between_log_intervals():
    run = train(separable_cache(8, seed=0), labels="spr", steps=15, log_every=10)
    assert [r["step"] for r in run.rows] == [0, 10, 15]
    assert "loss" in run.rows[-1] and "fc/correct_prob" in run.rows[-1]


def test_head_training_refuses_lr_zero():
    with pytest.raises(ValueError, match="lr"):
        HeadTrainConfig(lr=0.0)


def test_batch_fc_averages_each_outcome_over_its_own_rollouts():
    head = build_sprm_head(4, seed=0)
    features = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    correct = torch.tensor([True, False, True, False])
    probs = position_probs(head, features)
    by_rollout = [torch.exp(torch.log(probs[rows == r]).mean()).item() for r in range(4)]
    good = (by_rollout[0] + by_rollout[2]) / 2
    bad = (by_rollout[1] + by_rollout[3]) / 2
    assert path_scores(probs, rows, 4).tolist() == pytest.approx(by_rollout, rel=1e-5)
    out = batch_fc(head, features, rows, correct)
    assert out["fc/correct_prob"] == pytest.approx(good, rel=1e-5)
    assert out["fc/false_prob"] == pytest.approx(bad, rel=1e-5)
    assert out["fc/diff_prob"] == pytest.approx(good - bad, rel=1e-4)
    assert abs(good - sum(by_rollout) / 4) > 1e-4  # the pin tells the two apart


# -- small scorers ---------------------------------------------------------------------------------


def test_step_oracle_finished_last_step_needs_the_checker_too():
    # the grader accepts the completion, but the checker rejects the last step: it stays wrong
    scorer = StepOracleScorer(labels=lambda p, texts: [True, False], grade=lambda p, text: True)
    path = Prefix(PROBLEM, (step("a"), step("b", finish="eos")))
    assert scorer.score([path]) == [[1.0, 0.0]]


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_confidence_refuses_nan_logprobs(reduce: str):
    path = Prefix(PROBLEM, (step("x", logprobs=[-0.1, float("nan")]),))
    with pytest.raises(ValueError, match="NaN"):
        ConfidenceScorer(reduce).score([path])


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_confidence_caps_positive_logprobs_at_one(reduce: str):
    # step y: mean +0.1 (capped to 1.0), min -0.5 (not capped)
    path = Prefix(PROBLEM, (step("x", logprobs=[0.2, 0.4]), step("y", logprobs=[-0.5, 0.7])))
    scores = ConfidenceScorer(reduce).score([path])[0]
    assert scores[0] == 1.0
    assert scores[1] == (1.0 if reduce == "mean" else pytest.approx(math.exp(-0.5)))


def test_spr_loss_counts_kept_negatives_by_agreement():
    # position 0: positive, agrees (kept); 1, 2: negative, logit > 0 (not kept); 3: negative, agrees
    out = spr_loss(torch.tensor([2.0, 1.0, 1.0, -3.0]), torch.tensor([True, False, False, False]))
    assert (out.kept_positive, out.kept_negative) == (1, 1)
    assert out.kept_fraction == pytest.approx(0.5)


def test_seeded_sprm_head_leaves_the_callers_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_sprm_head(4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_outcome_oracle_accepts_unfinished_zero_and_refuses_negative():
    scorer = OutcomeOracleScorer(grade=lambda p, text: True, unfinished=0.0)
    assert scorer.score([Prefix(PROBLEM, (step("a"),))]) == [[0.0]]
    with pytest.raises(ValueError, match="unfinished"):
        OutcomeOracleScorer(grade=lambda p, text: True, unfinished=-0.1)


def test_prm_batches_share_a_common_start_of_exactly_min_shared_tokens():
    start = list(range(100, 100 + MIN_SHARED))
    sequences = [start + [1, 2], start + [3, 4]]
    batches = plan_batches(sequences, 8)
    assert [(b.rows, b.shared) for b in batches] == [((0, 1), MIN_SHARED)]
    # the start once (16) + each row's own 2 tokens, not 2 * 18
    assert forwarded_tokens(batches, [len(s) for s in sequences]) == MIN_SHARED + 4
