"""Pins for decode-core behaviours that a mutation review found unpinned elsewhere.

What is pinned: a Mistral config (sliding_window, no use_sliding_window attribute) counts as
windowed, and its log-probs equal the full forward; chunked- or linear-attention layer types rule
out the shared prefix (Llama 4's log-probs equal the full forward); `gap_free_past` counts the
decode budget in a row's columns (a cached path beside a new prompt keeps its log-probs) and drops
a cached prefix as long as the longest suffix instead of cutting it to nothing (propose then
decodes such a batch); the prefix cache refuses a chained entry whose whole sequence is over
budget; `sample_continuations` cuts an engine's extra tokens to the budget, sends no request
without budget, and refuses an engine that answers fewer requests than asked; the inverse-CDF draw
never takes a zero-mass token at u = 0; the step-boundary signal handler (a second SIGTERM raises
Terminated, a second Ctrl-C KeyboardInterrupt, an ignored SIGINT is left alone); the separator mask
of a tokenizer larger than the model's vocabulary; input checks of StepMarks, Completion,
StepStopRule.from_tokenizer and SamplingConfig; a token both EOS and a separator finishes as "eos".

Tiny random models built here (no checkpoint); the file runs in a few seconds on one core.

    .venv/bin/python -m pytest tests/test_decode_pins.py
"""
from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, Llama4ForCausalLM, Llama4TextConfig, MistralConfig, MistralForCausalLM

from policies.decode_loop import FINISH_CODES, decode_chunk, gap_free_past
from policies.prefix_cache import PrefixCache, PrefixCacheConfig, PrefixKV
from policies.sampling import SplitDraws, _draw_from_cdf, draw_tokens, sample_next_tokens
from policies.sampling_config import SamplingConfig
from policies.shared_prefix import has_sliding_window, supports_shared_prefix
from policies.step_assembly import Completion, SampleRequest, StepMarks, sample_continuations
from policies.step_boundary import Terminated, stop_at_step_boundary
from policies.step_stops import StepStopRule, separator_mask
from policies.tiny_tokenizer import build_tokenizer
from policies.transformers_policy import TransformersPolicy
from test_sliding_window import (
    LONG, WINDOW, full_forward_logprobs, logprobs_after, separator_biased, windowed_model,
)
from test_transformers_policy import ScriptedLM, make_model
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEP, EOS = 7, 0  # token ids of the scripted-engine tests
MARKS = StepMarks(frozenset({SEP}), frozenset({EOS}))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def greedy_policy(model, tok) -> TransformersPolicy:
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=20, max_total_tokens=40)
    return TransformersPolicy(model, tok, sampling, lambda p: p.question, prefix_cache=None)


def assert_logprobs_equal_the_full_forward(model, tok, question: str) -> None:
    """One greedy step of `question` (longer than the window) has the log-probs of a plain forward."""
    step = greedy_policy(model, tok).propose([Prefix(Problem("a", question))], 1, seed=0)[0][0]
    assert len(tok(question).input_ids) > WINDOW
    assert step.token_logprobs == pytest.approx(full_forward_logprobs(model, tok, question, step.token_ids), abs=1e-4)


def scripted_engine(script):
    """(complete, sent): an engine answering each request with script(request); sent records the requests."""
    sent = []

    def complete(requests):
        sent.extend(requests)
        return [Completion(tuple(script(r)), tuple(-0.5 for _ in script(r)), len(r.token_ids)) for r in requests]

    return complete, sent


def kv(n: int, parent: PrefixKV | None = None, width: int = 4) -> PrefixKV:
    return PrefixKV(torch.zeros(1, 1, n, width), torch.zeros(1, 1, n, width), parent)


# -- sliding windows and attention kinds ---------------------------------------------------------


def test_a_mistral_config_without_use_sliding_window_counts_as_windowed(tok):
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                           sliding_window=WINDOW, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    assert not hasattr(config, "use_sliding_window")  # Mistral spells a window with sliding_window alone
    assert has_sliding_window(config)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert_logprobs_equal_the_full_forward(model, tok, LONG)  # read as unwindowed: off by 0.34


def test_linear_attention_layers_rule_out_the_shared_prefix():
    llama = make_model(40)
    assert supports_shared_prefix(llama)
    llama.config.layer_types = ["linear_attention", "full_attention"]  # e.g. Qwen3-Next's linear layers
    assert not supports_shared_prefix(llama)


def test_chunked_attention_layers_rule_out_the_shared_prefix_and_keep_their_log_probs(tok):
    config = Llama4TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=512, attention_chunk_size=8, num_local_experts=1,
                              interleave_moe_layer_step=0, no_rope_layers=[1, 1], moe_layers=[],
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert set(config.layer_types) == {"chunked_attention"}
    assert not supports_shared_prefix(model)
    assert_logprobs_equal_the_full_forward(model, tok, LONG)  # attention chunks of 8 < the 21-token prompt


def test_a_cached_path_beside_a_new_prompt_keeps_its_log_probs_once_it_decodes_past_the_window(tok):
    # the cached row's columns (6 cached + 5 new) fit the window of 12 before decoding, not with its
    # budget of 20 more: its prefix must be cut (laid out with pads, its window lost context)
    lm = separator_biased(windowed_model("qwen2", tok), tok)
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=20, max_total_tokens=80)
    policy = TransformersPolicy(lm, tok, sampling, lambda p: p.question, prefix_cache=PrefixCacheConfig())
    start = Prefix(Problem("a", "1+2<think>"))
    step = next(s for s in policy.propose([start], 16, seed=0)[0] if s.finish == "separator" and s.num_tokens <= 3)
    child = start.extend(step)
    ids = tok(child.problem.question).input_ids + list(step.token_ids)
    fresh = Prefix(Problem("b", "3+4<think>"))
    assert len(ids) + len(tok(fresh.problem.question).input_ids) <= WINDOW
    hits = policy.prefix_cache.stats().hits
    samples = policy.propose([child, fresh], 4, seed=1)[0]
    assert policy.prefix_cache.stats().hits > hits  # the path's prefix came from the cache
    assert max(len(s.token_ids) for s in samples) + len(ids) > WINDOW  # some sample outgrew the window
    for sample in samples:
        assert sample.token_logprobs == pytest.approx(logprobs_after(lm, ids, sample.token_ids), abs=1e-4)


def test_a_cached_prefix_as_long_as_the_longest_suffix_is_dropped_not_cut_to_nothing():
    model = SimpleNamespace(config=SimpleNamespace(model_type="qwen2", use_sliding_window=True, sliding_window=4))
    contexts = [list(range(6)), list(range(10, 16))]  # both 6 tokens
    past = [None, kv(3, width=2)]  # the second's suffix 3, the first's 6: the second keeps 6 - 6 = 0 cached tokens
    assert gap_free_past(model, contexts, past, budget=2) == [None, None]  # its context is forwarded whole


def test_a_cached_path_beside_a_new_prompt_as_long_as_its_context_decodes(tok):
    # the new prompt's suffix (all of it) is as long as the path's whole context: the path keeps
    # no cached token and is forwarded whole (cutting its prefix to 0 tokens raised ValueError)
    lm = separator_biased(windowed_model("qwen2", tok), tok)
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=20, max_total_tokens=80)
    policy = TransformersPolicy(lm, tok, sampling, lambda p: p.question, prefix_cache=PrefixCacheConfig())
    start = Prefix(Problem("a", "Tom has 3 apples and buys 4 more.<think>"))
    step = next(s for s in policy.propose([start], 8, seed=0)[0] if s.finish == "separator")
    child = start.extend(step)
    target = len(tok(child.problem.question).input_ids) + step.num_tokens
    text = "Sara reads 25 pages a day for a week, then 3 more days. How many pages in all of those days?"
    while len(tok(text + "<think>").input_ids) > target:
        text = text[:-1]
    fresh = Prefix(Problem("b", text + "<think>"))
    assert len(tok(fresh.problem.question).input_ids) == target
    rows = policy.propose([child, fresh], 2, seed=1)
    assert [len(row) for row in rows] == [2, 2]
    assert all(s.token_ids for row in rows for s in row)


# -- the prefix cache ------------------------------------------------------------------------------


def test_a_chained_entry_over_budget_as_a_whole_is_refused_and_evicts_nothing():
    per_token = 2 * 4 * 4  # keys + values, 4 float32 each
    cache = PrefixCache(PrefixCacheConfig(max_bytes=per_token * 10))
    cache.store(tuple(range(3)), kv(3))
    cache.store((100, 101), kv(2))
    child = kv(3, kv(8))  # 3 tokens of its own on an 8-token prompt never stored: 11 tokens > 10
    assert child.own_nbytes <= per_token * 10 < child.nbytes
    cache.store(tuple(range(200, 211)), child)
    stats = cache.stats()
    assert (stats.entries, stats.oversized, stats.evictions) == (2, 1, 0)
    assert [len(k) for k in cache.keys_in_lru_order()] == [3, 2]


# -- sample_continuations with a scripted engine ---------------------------------------------------


def test_tokens_an_engine_returns_past_max_tokens_are_dropped():
    complete, _ = scripted_engine(lambda r: [1, 2, 3, 4, 5, 6])  # ignores max_tokens
    sample = sample_continuations([SampleRequest((5,), 3, 0)], complete, MARKS, stop_at_step=True)[0]
    assert sample.token_ids == (1, 2, 3)
    assert len(sample.logprobs) == len(sample.boundary) == 3
    assert sample.finish == "length"


def test_a_budget_ending_on_a_separator_that_is_no_boundary_sends_no_empty_request():
    # SEP right after SEP is no step boundary: the engine stopped on it, but the budget is spent
    complete, sent = scripted_engine(lambda r: [SEP][: r.max_tokens])
    sample = sample_continuations([SampleRequest((5, SEP), 1, 0)], complete, MARKS, stop_at_step=True)[0]
    assert sample.token_ids == (SEP,) and sample.boundary == (False,)
    assert sample.finish == "length"
    assert sample.requests == 1 and [r.max_tokens for r in sent] == [1]


def test_an_engine_answering_fewer_requests_than_asked_is_refused():
    calls = []

    def short_engine(requests):  # one completion fewer than asked; gives up after 5 rounds (no endless loop)
        calls.append(len(requests))
        if len(calls) > 5:
            raise RuntimeError(f"still asked after {len(calls)} rounds")
        return [Completion((1, EOS), (-0.1, -0.1), len(r.token_ids)) for r in requests[:-1]]

    requests = [SampleRequest((5,), 4, 0), SampleRequest((6,), 4, 1)]
    with pytest.raises(ValueError, match="completions for"):
        sample_continuations(requests, short_engine, MARKS, stop_at_step=True)
    assert calls == [2]


# -- the draw ---------------------------------------------------------------------------------------


class ZeroDraws(SplitDraws):
    """Uniforms that are exactly 0 (torch.rand returns 0 with chance 2**-24 per draw)."""

    def rand(self, rows, device):
        return torch.zeros(rows, 1, device=device)


def test_a_zero_uniform_never_draws_a_token_without_mass():
    probs = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    assert _draw_from_cdf(probs.cumsum(-1), torch.zeros(2, 1)).tolist() == [1, 2]
    assert draw_tokens(probs, ZeroDraws([None], [2])).tolist() == [1, 2]
    logits = torch.tensor([[float("-inf"), 1.0, 2.0]])  # token 0 masked out
    tokens, logprobs = sample_next_tokens(logits, 1.0, 1.0, ZeroDraws([None], [1]))
    assert tokens.tolist() == [1]
    assert logprobs.tolist() == pytest.approx(torch.log_softmax(logits, -1)[0, 1:2].tolist())


# -- the step-boundary signal handler --------------------------------------------------------------


def _raised_by(signum: int) -> tuple[BaseException | None, bool]:
    """(what a second `signum` raised inside stop_at_step_boundary, whether the first one set requested)."""
    try:
        with stop_at_step_boundary() as stop:
            signal.raise_signal(signum)
            first = stop.requested
            signal.raise_signal(signum)
    except KeyboardInterrupt as exc:  # caught here: one escaping would stop pytest itself
        return exc, first
    return None, first


def test_a_second_sigterm_raises_terminated(restored_signals):
    raised, requested = _raised_by(signal.SIGTERM)
    assert requested
    assert type(raised) is Terminated


def test_a_second_ctrl_c_raises_keyboard_interrupt(restored_signals):
    raised, requested = _raised_by(signal.SIGINT)
    assert requested
    assert type(raised) is KeyboardInterrupt


def test_an_ignored_sigint_is_left_alone(restored_signals):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a background job
    with stop_at_step_boundary() as stop:
        signal.raise_signal(signal.SIGINT)
        assert not stop.requested
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# -- the step rule ---------------------------------------------------------------------------------


def test_a_tokenizer_larger_than_the_models_vocabulary_builds_its_step_rule():
    tok = build_tokenizer()  # its own: a token is added
    separator = tok.convert_tokens_to_ids(".\n\n")
    tok.add_tokens(["done.\n\n"])  # added after the model was built: beyond its logit layer
    vocab_size = len(tok) - 1
    mask = separator_mask(tok, vocab_size, ".\n\n")
    assert mask.shape == (vocab_size,)
    assert mask.nonzero().flatten().tolist() == [separator]
    rule = StepStopRule.from_tokenizer(tok, vocab_size, ".\n\n", "<think>", "</think>", [tok.eos_token_id])
    assert rule.is_separator.tolist() == mask.tolist()


def test_think_marks_are_given_both_or_neither():
    with pytest.raises(ValueError, match="both or neither"):
        StepMarks(frozenset({SEP}), frozenset({EOS}), 4, None)


def test_a_completion_with_more_cached_than_prompt_tokens_is_refused():
    with pytest.raises(ValueError, match="cached_tokens=9"):
        Completion((1,), (-0.1,), 3, 9)


def test_a_step_rule_with_no_eos_id_inside_the_vocabulary_is_refused():
    class Tok:  # three tokens, the second a separator
        def __len__(self):
            return 3

        def batch_decode(self, ids, **kwargs):
            return ["a", ".\n\n", "b"][: len(ids)]

        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match="no EOS token id"):
        StepStopRule.from_tokenizer(Tok(), 3, ".\n\n", "<think>", "</think>", [5])


def test_an_infinite_repetition_penalty_is_refused():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=float("inf"))


# -- the decode loop -------------------------------------------------------------------------------


def test_a_token_both_eos_and_separator_finishes_as_eos():
    vocab = 40
    model = ScriptedLM(make_model(vocab), {3: 5})  # the token at position 3 is id 5
    is_separator = torch.zeros(vocab, dtype=torch.bool)
    is_separator[5] = True
    is_eos = is_separator.clone()  # id 5 also ends the sequence
    out = decode_chunk(model, [[1, 7]], [0], [8], StepStopRule(is_separator, is_eos, None, None),
                       stop_at_boundary=True, temperature=0.0, top_p=1.0, generator=None, pad_id=0)
    assert out.token_ids[0, : out.lengths[0]].tolist()[-1] == 5
    assert FINISH_CODES[int(out.finish[0])] == "eos"
