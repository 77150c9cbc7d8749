"""Tests of decode attention over a shared prefix (`policies.shared_prefix`): the attention
function against SDPA over each row's full KV (grouped-query heads, rows dropped and reordered,
left-padded prefixes), the decode loop and a step-level search giving the same tokens, log-probs
and stored prefix KV with and without it, which models may use it, and the attention
implementation coming back after the block.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from policies.prefix_cache import MAX_CHAIN, PrefixCacheConfig
from policies.shared_prefix import (
    ATTENTION_NAME, SharedPrefixCache, _ranks_within, shared_prefix_attention, shared_prefix_attention_forward,
    supports_shared_prefix,
)
from policies.slot_cache import SlotCache
from test_prefix_cache import assert_same_outputs, policy, run_rounds
from test_transformers_policy import make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Layer(torch.nn.Module):
    layer_idx = 0


def _prefix_cache(prefix_k: torch.Tensor, prefix_v: torch.Tensor, mask: torch.Tensor, row_context: torch.Tensor):
    """A SharedPrefixCache of one layer over prefix KV [U, Hkv, P, D] with empty own columns."""
    rows, (_, kv_heads, _, dim) = int(row_context.numel()), prefix_k.shape
    keys, values = torch.zeros(1, rows, kv_heads, 8, dim), torch.zeros(1, rows, kv_heads, 8, dim)
    return SharedPrefixCache([(prefix_k, prefix_v)], mask, row_context, keys, values)


def test_rows_are_ranked_within_their_context_in_row_order():
    rank, group = _ranks_within(torch.tensor([2, 0, 2, 1, 0, 2]))
    assert rank.tolist() == [0, 0, 1, 0, 1, 2] and group == 3


@pytest.mark.parametrize("heads,kv_heads,dtype", [(4, 4, torch.float32), (6, 2, torch.float32), (6, 2, torch.bfloat16)])
def test_attention_matches_sdpa_over_each_rows_whole_kv(heads, kv_heads, dtype):
    torch.set_default_dtype(dtype)
    try:
        _check_attention_against_sdpa(heads, kv_heads, tolerance=1e-5 if dtype == torch.float32 else 2e-2)
    finally:
        torch.set_default_dtype(torch.float32)


def _check_attention_against_sdpa(heads: int, kv_heads: int, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(0)
    contexts, width, dim, own = 3, 7, 8, 4
    row_context = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    prefix_k, prefix_v = (torch.randn(contexts, kv_heads, width, dim, generator=gen) for _ in range(2))
    mask = torch.ones(contexts, width, dtype=torch.bool)
    mask[0, :3], mask[2, :1] = False, False  # left padding
    cache = _prefix_cache(prefix_k, prefix_v, mask, row_context)
    slots = torch.tensor([6, 1, 3, 4, 2])  # rows 0 and 5 finished; the others moved
    cache.set_slots(slots)
    query = torch.randn(len(slots), heads, 1, dim, generator=gen)
    own_k, own_v = (torch.randn(len(slots), kv_heads, own, dim, generator=gen) for _ in range(2))

    out, _ = shared_prefix_attention_forward(_Layer(), query, own_k, own_v, None, scaling=0.3, shared_prefix=cache)

    context = row_context[slots]
    full_k, full_v = (torch.cat([p[context], o], dim=2) for p, o in ((prefix_k, own_k), (prefix_v, own_v)))
    full_mask = torch.cat([mask[context], torch.ones(len(slots), own, dtype=torch.bool)], dim=1)
    expected = F.scaled_dot_product_attention(
        query, full_k.repeat_interleave(heads // kv_heads, 1), full_v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=full_mask[:, None, None, :], scale=0.3,
    )  # [B, H, 1, D]
    assert out.shape == (len(slots), 1, heads, dim) and out.dtype == query.dtype
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=tolerance, rtol=tolerance)


def test_attention_asks_for_its_cache_and_one_token_per_row():
    with pytest.raises(ValueError, match="shared_prefix"):
        shared_prefix_attention_forward(_Layer(), torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), None)


def test_a_step_search_gives_the_same_steps_and_stored_kv_with_and_without_a_shared_prefix():
    shared, copied = policy(PrefixCacheConfig()), policy(PrefixCacheConfig())
    shared.shared_prefix, copied.shared_prefix = None, False
    outputs = run_rounds(shared, rounds=4, n=3)
    assert_same_outputs(outputs, run_rounds(copied, rounds=4, n=3))
    assert shared.prefix_cache.stats().entries == copied.prefix_cache.stats().entries > 0
    for key, entry in shared.prefix_cache._entries.items():
        other = copied.prefix_cache._entries[key]
        flat = [torch.cat([s.keys for s in e.segments()], dim=2) for e in (entry, other)]
        assert entry.length == other.length == len(key)
        torch.testing.assert_close(flat[0], flat[1], atol=1e-5, rtol=1e-5)


def test_long_chains_stay_within_max_chain_with_a_shared_prefix():
    p = policy(PrefixCacheConfig(), max_total_tokens=200, max_step_tokens=4)
    run_rounds(p, rounds=MAX_CHAIN, n=1, width=2, fresh=False)
    depths = [entry.depth for entry in p.prefix_cache._entries.values()]
    assert max(depths) <= MAX_CHAIN and max(depths) > 2


def test_decode_steps_read_the_prefill_kv_in_place():
    p = policy(PrefixCacheConfig())
    calls: list[tuple[str, bool, bool]] = []  # (cache type, has an attention mask, passes shared_prefix)
    hook = p.model.inner.register_forward_pre_hook(
        lambda module, args, kw: calls.append(
            (type(kw["past_key_values"]).__name__, kw.get("attention_mask") is not None, "shared_prefix" in kw)
        ),
        with_kwargs=True,
    )
    try:
        run_rounds(p, rounds=2, n=2)
    finally:
        hook.remove()
    decode = [c for c in calls if c[0] == "SharedPrefixCache"]
    prefills = [c for c in calls if c[0] != "SharedPrefixCache"]  # a DynamicCache, or a SlotCache over cached prefixes
    assert decode and all(not has_mask and passes for _, has_mask, passes in decode)
    assert prefills and all(has_mask and not passes for _, has_mask, passes in prefills)
    assert {c[0] for c in prefills} == {"DynamicCache", "SlotCache"}


def _llama(**extra) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, **extra)
    return LlamaForCausalLM(config)


def test_which_models_can_share_a_prefix():
    assert supports_shared_prefix(make_model(40))
    assert not supports_shared_prefix(_llama(attn_implementation="flex_attention"))
    soft_capped = _llama()
    soft_capped.config.attn_logit_softcapping = 50.0
    assert not supports_shared_prefix(soft_capped)
    windowed = _llama()
    windowed.config.layer_types = ["sliding_attention"]
    assert not supports_shared_prefix(windowed)
    assert not supports_shared_prefix(torch.nn.Linear(2, 2))


def test_a_model_given_a_new_config_is_checked_again():
    model = make_model(40)
    assert supports_shared_prefix(model) and supports_shared_prefix(model)  # the second from the cache
    model.config = copy.deepcopy(model.config)  # the attention modules still read the old one
    assert not supports_shared_prefix(model)


def test_the_attention_implementation_comes_back_after_the_block_even_on_error():
    model = make_model(40)
    with pytest.raises(RuntimeError):
        with shared_prefix_attention(model):
            assert model.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_uneven_groups_keep_copied_rows():
    from policies.shared_prefix import groups_are_even

    assert groups_are_even([0] * 32)  # Best-of-N
    assert groups_are_even([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # a chunk boundary cut the last group short
    assert not groups_are_even([0] * 16 + list(range(1, 17)))  # 17 contexts padded to 16 rows each: 272 > 2 x 32
