"""Models with sliding-window attention layers (Qwen2 `use_sliding_window`, Gemma-2's alternate
sliding / full layers) through the transformers policy: once a prefill is longer than the window,
log-probs still equal the model's own full forward, a row does not depend on the other prompts
of its batch, and the prefix cache stores their KV (before: sliding layers kept window - 1
columns, the slot buffers read uninitialised memory, and the cache raised "PrefixKV of length 26
stored under 36 token ids") and reuses it beside longer new prompts without pads inside a row's
window (`policies.decode_loop.gap_free_past`).

    .venv/bin/pytest tests/test_sliding_window.py
"""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from policies.prefix_cache import PrefixCacheConfig
from policies.sampling_config import SamplingConfig
from policies.tiny_tokenizer import build_tokenizer
from policies.transformers_policy import TransformersPolicy
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WINDOW = 12
LONG = "Tom has 3 apples and buys 4 more. How many now?\n<think>"  # 21+ tokens: longer than the window


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def windowed_model(kind: str, tok) -> torch.nn.Module:
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=WINDOW,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=0))
    else:  # Gemma-2's layout: a sliding layer, then a full one (soft-capping off: it is not what is tested)
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                                               attn_logit_softcapping=None, final_logit_softcapping=None))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model.eval()


def logprobs_after(model, context: list[int], token_ids) -> list[float]:
    """The log-probs of token_ids after context by one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + list(token_ids)])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return [logprobs[len(context) + k - 1, t].item() for k, t in enumerate(token_ids)]


def full_forward_logprobs(model, tok, question: str, token_ids) -> list[float]:
    return logprobs_after(model, tok(question).input_ids, token_ids)


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_log_probs_equal_the_full_forward_alone_or_batched(kind, tok):
    model = windowed_model(kind, tok)
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=20, max_total_tokens=40)
    policy = TransformersPolicy(model, tok, sampling, lambda p: p.question, prefix_cache=None, shared_prefix=False,
                                forked=False)
    short, long = Prefix(Problem("a", "1+2")), Prefix(Problem("b", LONG))
    alone = policy.propose([short], 1, seed=0)[0][0]
    batched = policy.propose([short, long], 1, seed=0)
    assert batched[0][0].token_ids == alone.token_ids  # before: the longer prompt changed the short one's tokens
    for prefix, row in zip((short, long), batched):
        step = row[0]
        reference = full_forward_logprobs(model, tok, prefix.problem.question, step.token_ids)
        assert step.token_logprobs == pytest.approx(reference, abs=1e-4)  # before: off by up to 4.4


def separator_biased(model, tok) -> torch.nn.Module:
    """The model with its separator's logit raised: steps end on separators, so their KV is stored."""
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids(".\n\n")] = 4.0  # steps end on separators: their KV is stored

    class SeparatorBias(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.generation_config = model, model.config, model.generation_config

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits + bias
            return out

    return SeparatorBias().eval()


def test_the_prefix_cache_stores_and_reuses_a_windowed_models_kv(tok):
    lm = separator_biased(windowed_model("qwen2", tok), tok)
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=20, max_total_tokens=60)
    cached = TransformersPolicy(lm, tok, sampling, lambda p: p.question, prefix_cache=PrefixCacheConfig())
    plain = TransformersPolicy(lm, tok, sampling, lambda p: p.question, prefix_cache=None)
    prefix = Prefix(Problem("a", LONG))
    for seed in range(3):  # round after round: each extends the path by the first step of the last
        with_cache, without = cached.propose([prefix], 2, seed=seed)[0], plain.propose([prefix], 2, seed=seed)[0]
        assert [s.token_ids for s in with_cache] == [s.token_ids for s in without]
        for a, b in zip(with_cache, without):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        if with_cache[0].finish != "separator":
            break
        prefix = Prefix(prefix.problem, prefix.steps + (with_cache[0],))
    assert len(cached.prefix_cache) > 0


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_a_cached_path_batched_with_a_longer_new_prompt_keeps_its_log_probs(kind, tok):
    # the cached row's new tokens are fewer than the fresh prompt's: laid out as [cached | pads | new]
    # its window counted the pads and lost context (log-probs off by 0.25-0.35 before `gap_free_past`)
    lm = separator_biased(windowed_model(kind, tok), tok)
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=20, max_total_tokens=80)
    policy = TransformersPolicy(lm, tok, sampling, lambda p: p.question, prefix_cache=PrefixCacheConfig())
    start = Prefix(Problem("a", "Tom has 3 apples and buys 4 more.<think>"))
    step = next(s for s in policy.propose([start], 8, seed=0)[0] if s.finish == "separator")  # its KV is cached
    child = start.extend(step)
    fresh = Prefix(Problem("b", "Sara reads 25 pages a day for a week, then 3 more days. How many pages?<think>"))
    hits, forwarded = policy.prefix_cache.stats().hits, []
    count = lm.inner.register_forward_pre_hook(  # the tokens each forward ran: the new columns' mask
        lambda _, args, kwargs: forwarded.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum())),
        with_kwargs=True)
    samples = policy.propose([child, fresh], 4, seed=1)
    count.remove()
    assert policy.prefix_cache.stats().hits > hits  # the child's prefix came from the cache
    assert sum(s.tokens_forwarded for row in samples for s in row) == sum(forwarded)  # the cut prefix's tokens counted
    for sample in samples[0]:
        ids = tok(child.problem.question).input_ids + [t for s in child.steps for t in s.token_ids]
        assert sample.token_logprobs == pytest.approx(logprobs_after(lm, ids, sample.token_ids), abs=1e-4)


def test_prefixes_are_cut_only_where_a_row_can_outgrow_its_window():
    # cutting them when no row reaches the window re-forwarded whole contexts for nothing
    from types import SimpleNamespace

    from policies.decode_loop import gap_free_past
    from policies.prefix_cache import PrefixKV

    cached = PrefixKV(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    contexts, past = [list(range(12)), list(range(30))], [cached, None]  # suffixes 2 and 30
    model = lambda window: SimpleNamespace(config=SimpleNamespace(sliding_window=window, use_sliding_window=True))  # noqa: E731
    assert gap_free_past(model(64), contexts, past, budget=20) is past  # 10 + 30 + 20 <= 64
    cut = gap_free_past(model(32), contexts, past, budget=20)
    assert cut[1] is None and cut[0] is None  # 12 - 30 < 1: the short context is forwarded whole
    longer = [list(range(40)), list(range(30))]
    assert gap_free_past(model(32), longer, [PrefixKV(torch.zeros(1, 1, 38, 2), torch.zeros(1, 1, 38, 2)), None],
                         budget=5)[0].length == 10  # 40 - 30: its new tokens as many as the longest suffix
    plain = SimpleNamespace(config=SimpleNamespace(sliding_window=None, use_sliding_window=False))
    assert gap_free_past(plain, contexts, past, budget=20) is past
