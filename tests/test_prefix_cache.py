"""Tests of cross-call prefix reuse: the `PrefixCache` store (longest match, LRU order, byte
budget, counters, config validation) and `TransformersPolicy(prefix_cache=...)`, whose outputs
must equal the cache-free policy's over several rounds of propose on growing paths (greedy and
seeded sampling, mixed batches of different cached lengths, chunks, a tiny budget), while it
forwards fewer tokens and `Step.tokens_forwarded` still sums to what a forward hook counts.

The tiny random Llama and word-level tokenizer come from test_transformers_policy. A
`ScriptedLM` forces the separator at every third position, so steps end on separators often and
paths grow over rounds; all other tokens are sampled from the real model.

    .venv/bin/pytest tests/test_prefix_cache.py
"""
from __future__ import annotations

import pytest
import torch

from policies.prefix_cache import (
    PrefixCache, PrefixCacheConfig, PrefixKV, candidate_lengths, pad_past,
)
from policies.kv_pool import BufferPool
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from test_transformers_policy import ID, SEP, TOK, ForwardLog, ScriptedLM, context_of, make_model, mixed_prefixes
from treesearch.records import Prefix, Problem, Step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


BASE = make_model(len(TOK))
SEPARATOR_EVERY_THIRD = {p: ID[SEP] for p in range(4, 64, 3)}  # steps of ~3 tokens


def policy(cache: PrefixCacheConfig | None, **sampling) -> TransformersPolicy:
    settings = dict(temperature=1.0, max_step_tokens=8, max_total_tokens=24, batch_size=64)
    settings.update(sampling)
    return TransformersPolicy(
        ScriptedLM(BASE, SEPARATOR_EVERY_THIRD), TOK, SamplingConfig(**settings),
        prompt_fn=lambda p: p.question, prefix_cache=cache,
    )


def kv(length: int, fill: float = 0.0, layers: int = 2) -> PrefixKV:
    """A PrefixKV of `length` tokens: [layers, 1 head, length, 2 dims] float32 = 8 bytes/token
    per layer and tensor, so 2 layers x (keys + values) = 32 bytes per token."""
    return PrefixKV(torch.full((layers, 1, length, 2), fill), torch.full((layers, 1, length, 2), fill))


def run_rounds(p: TransformersPolicy, rounds: int, n: int, width: int = 6, fresh: bool = True,
               frontiers: list | None = None):
    """A small step-level search: each round proposes n steps for every frontier prefix; the next
    frontier is the first `width` unfinished children plus (with fresh) one new problem, so each
    batch mixes cache hits of different lengths with misses. Returns every round's output (and
    appends each round's frontier to `frontiers` when given)."""
    frontier, outputs = mixed_prefixes(), []
    for r in range(rounds):
        if frontiers is not None:
            frontiers.append(frontier)
        rows = p.propose(frontier, n, seed=r)
        outputs.append(rows)
        new = [Prefix(Problem(f"new{r}", f"<think>{r}+{r}="))] if fresh else []
        frontier = children(frontier, rows)[:width] + new
    return outputs


def assert_same_outputs(a, b) -> None:
    """Same tokens and finish reasons, log-probs within 1e-4 (the same KV summed in another order)."""
    flat_a = [s for rows in a for row in rows for s in row]
    flat_b = [s for rows in b for row in rows for s in row]
    key = lambda s: (s.token_ids, s.finish, s.text)  # noqa: E731
    assert [key(s) for s in flat_a] == [key(s) for s in flat_b]
    for x, y in zip(flat_a, flat_b):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)


def children(prefixes: list[Prefix], rows) -> list[Prefix]:
    """Every proposed child that can still be extended, in order."""
    return [x.extend(s) for x, row in zip(prefixes, rows) for s in row if not s.is_terminal]


def forwarded(outputs) -> int:
    return sum(s.tokens_forwarded for rows in outputs for row in rows for s in row)


# -- config and store -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(enabled="yes"), "enabled='yes'"),
        (dict(max_bytes=0), "max_bytes=0 must be"),
        (dict(max_bytes=-5), "max_bytes=-5"),
        (dict(max_bytes=1.5), "max_bytes=1.5"),
        (dict(max_bytes=True), "max_bytes=True"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixCacheConfig(**kwargs)


def test_policy_takes_the_ways_a_user_writes_the_setting():
    # +policy.prefix_cache=false / .enabled=false / .max_bytes=N (a dict without _target_) were
    # TypeError tracebacks after the model had loaded
    assert policy(False).prefix_cache is None and policy(None).prefix_cache is None
    assert policy(True).prefix_cache.config == PrefixCacheConfig()
    assert policy({"max_bytes": 10}).prefix_cache.config == PrefixCacheConfig(max_bytes=10)
    assert policy({"_target_": "policies.prefix_cache.PrefixCacheConfig", "enabled": False}).prefix_cache is None
    with pytest.raises(ValueError, match=r"prefix_cache.max_byte is not a setting of the prefix cache; valid: enabled, max_bytes"):
        policy({"max_byte": 10})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prefix_cache='no': give true / false, null, or its settings"):
        policy("no")  # type: ignore[arg-type]


def test_candidate_lengths_are_step_boundaries_and_one_before():
    # length 10, prompt 4, steps [3, 3]: boundaries 4, 7, 10; with one before each: 3, 6, 9;
    # 10 itself is excluded (its last token must be forwarded for the logits)
    assert candidate_lengths(10, 4, [3, 3]) == [9, 7, 6, 4, 3]
    assert candidate_lengths(1, 1, []) == []  # a one-token prompt: nothing can be skipped


def test_longest_takes_the_longest_candidate_and_counts():
    cache = PrefixCache(PrefixCacheConfig())
    query = [5, 6, 7, 8, 9]
    cache.store(query[:2], kv(2))
    cache.store(query[:4], kv(4))
    cache.store([5, 6, 0], kv(3))  # same length as a candidate, other tokens: never matches
    length, entry = cache.longest(query, [4, 3, 2])
    assert length == 4 and entry.length == 4
    assert cache.longest(query, [3, 2])[0] == 2
    assert cache.longest([1, 2, 3], [2, 1]) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.tokens_reused, stats.stores) == (2, 1, 4 + 2, 3)
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert (stats.entries, stats.bytes) == (3, 32 * (2 + 4 + 3))  # 32 bytes per token, see kv()


def test_lru_eviction_under_the_byte_budget():
    # each 2-token entry is 64 bytes; a 200-byte budget holds three
    cache = PrefixCache(PrefixCacheConfig(max_bytes=200))
    for key in ([1, 1], [2, 2], [3, 3]):
        cache.store(key, kv(2))
    assert cache.longest([1, 1, 9], [2]) is not None  # a hit makes [1, 1] the most recent use
    cache.store([2, 2], kv(2))  # storing an existing key refreshes it too
    assert cache.keys_in_lru_order() == [(3, 3), (1, 1), (2, 2)]
    cache.store([4, 4], kv(2))  # 256 bytes > 200: the least recent, [3, 3], goes
    assert cache.keys_in_lru_order() == [(1, 1), (2, 2), (4, 4)]
    cache.store([5, 5, 5], kv(3))  # 96 bytes: two entries must go (64 + 64 + 96 = 224 > 200 after one)
    assert cache.keys_in_lru_order() == [(4, 4), (5, 5, 5)]
    stats = cache.stats()
    assert (stats.evictions, stats.stores, stats.entries, stats.bytes) == (3, 5, 2, 64 + 96)


def test_touch_says_whether_an_entry_is_stored_and_makes_it_the_most_recent():
    cache = PrefixCache(PrefixCacheConfig())
    cache.store((1, 2), kv(2))
    cache.store((3, 4), kv(2))
    assert cache.touch((1, 2)) and not cache.touch((5, 6))
    assert cache.keys_in_lru_order() == [(3, 4), (1, 2)]
    assert cache.stats().hits == cache.stats().misses == 0  # not a lookup


def test_an_entry_larger_than_the_budget_is_not_stored():
    cache = PrefixCache(PrefixCacheConfig(max_bytes=100))
    cache.store([1, 2, 3, 4], kv(4))  # 128 bytes
    assert len(cache) == 0 and cache.stats().oversized == 1
    with pytest.raises(ValueError, match="length 2 stored under 3"):
        cache.store([1, 2, 3], kv(2))


def test_clear_drops_entries_and_counters():
    cache = PrefixCache(PrefixCacheConfig())
    cache.store([1, 2], kv(2))
    cache.longest([1, 2, 3], [2])
    cache.clear()
    assert len(cache) == 0 and cache.stats() == PrefixCache(PrefixCacheConfig()).stats()


def test_pad_past_left_pads_with_masked_zeros():
    # lengths 2 and 3 and a miss -> P = 3; row 0 starts at column 1, the miss is all padding
    keys, values, mask = pad_past([kv(2, fill=1.0), kv(3, fill=2.0), None], "cpu")
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert keys.shape == values.shape == (2, 3, 1, 3, 2)  # [layers, rows, heads, P, dims]
    assert keys[1, 0, 0, :, 0].tolist() == [0.0, 1.0, 1.0] and values[0, 1, 0, :, 1].tolist() == [2.0] * 3
    assert keys[:, 2].abs().sum() == 0
    # room for 4 more columns after the past: the first 3 columns and the mask are the same
    roomy_keys, roomy_values, same_mask = pad_past([kv(2, fill=1.0), kv(3, fill=2.0), None], "cpu", extra_columns=4)
    assert torch.equal(same_mask, mask) and roomy_keys.shape == (2, 3, 1, 7, 2)
    assert torch.equal(roomy_keys[..., :3, :], keys) and torch.equal(roomy_values[..., :3, :], values)


def test_pad_past_zeroes_the_padding_of_a_reused_dirty_buffer():
    # a pooled buffer still holds the last chunk's values (here NaN): only the padding is
    # rewritten, and it must come out zero, since masked attention weights times NaN are NaN
    pool = BufferPool()
    for _ in range(2):
        pool.give(torch.full((2, 3, 1, 3, 2), float("nan")))
    keys, values, mask = pad_past([kv(2, fill=1.0), kv(3, fill=2.0), None], "cpu", pool=pool)
    assert not keys.isnan().any() and not values.isnan().any()
    assert keys[:, 0, :, 0].abs().sum() == 0 and values[:, 2].abs().sum() == 0
    assert keys[0, 0, 0, 1:, 0].tolist() == [1.0, 1.0] and mask.tolist()[0] == [0, 1, 1]


def test_a_prefix_kv_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[layers >= 1, heads, length, head_dim\].*\(2, 1, 3, 2\).*\(2, 1, 4, 2\)"):
        PrefixKV(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 4, 2))
    with pytest.raises(ValueError, match="layers >= 1"):
        PrefixKV(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))


def test_first_n_tokens_of_a_chain_are_views_of_its_columns():
    flat = torch.arange(2 * 1 * 7 * 2, dtype=torch.float32).reshape(2, 1, 7, 2)
    root = PrefixKV(flat[:, :, :3], -flat[:, :, :3])
    chain = PrefixKV(flat[:, :, 3:5], -flat[:, :, 3:5], root)
    chain = PrefixKV(flat[:, :, 5:7], -flat[:, :, 5:7], chain)  # 3 + 2 + 2 tokens
    for n in range(1, 8):
        cut = chain.first(n)
        assert cut.length == n
        assert torch.equal(torch.cat([s.keys for s in cut.segments()], dim=2), flat[:, :, :n])
        assert torch.equal(torch.cat([s.values for s in cut.segments()], dim=2), -flat[:, :, :n])
    assert chain.first(5) is chain.parent and chain.first(7) is chain
    for n in (0, 8):
        with pytest.raises(ValueError, match=rf"first\({n}\) of a sequence of 7 tokens"):
            chain.first(n)


# -- the policy with the cache on equals it with the cache off ------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_equal_the_cache_free_policy_over_rounds(temperature):
    off = run_rounds(policy(None, temperature=temperature), rounds=4, n=2)
    cached = policy(PrefixCacheConfig(), temperature=temperature)
    frontiers: list = []
    on = run_rounds(cached, rounds=4, n=2, frontiers=frontiers)
    assert_same_outputs(off, on)
    assert max(len(s.token_ids) for s in on[-1][0]) >= 1  # the paths really grew
    stats = cached.prefix_cache.stats()
    # every distinct child is looked up once per call (equal ones merged) and hits; the first
    # round and each round's new problem miss
    distinct_children = sum(len({tuple(context_of(x)) for x in frontier[:-1]}) for frontier in frontiers[1:])
    assert distinct_children >= 3 and stats.hits == distinct_children and stats.misses >= 4 + 3
    assert forwarded(on) < forwarded(off)


def test_batches_mixing_cached_lengths_and_misses_equal_each_row_alone():
    # One call whose contexts hit at different depths (1 and 2 steps, different prompts) or miss,
    # vs each prefix alone without any cache.
    cached = policy(PrefixCacheConfig(), temperature=0.0)
    depth1 = extend_all(cached, mixed_prefixes())
    depth2 = extend_all(cached, depth1[:2])
    batch = [*depth1[1:], Prefix(Problem("m", "<think>7-2=")), *depth2]
    assert len({len(x.steps) for x in batch}) >= 3 and len({len(x.problem.question) for x in batch}) >= 3
    log = ForwardLog(cached.model)
    hits_before = cached.prefix_cache.stats().hits
    mixed = cached.propose(batch, 3, seed=5)
    assert cached.prefix_cache.stats().hits - hits_before == len(batch) - 1  # all but the new problem
    plain = policy(None, temperature=0.0)
    for prefix, row in zip(batch, mixed):
        alone = plain.propose([prefix], 3, seed=5)[0]
        assert [s.token_ids for s in row] == [s.token_ids for s in alone]
        for x, y in zip(row, alone):
            assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)
    assert sum(s.tokens_forwarded for row in mixed for s in row) == log.tokens


def extend_all(p: TransformersPolicy, prefixes: list[Prefix]) -> list[Prefix]:
    """Each prefix extended by one proposed step, keeping those that can still be extended."""
    rows = p.propose(prefixes, 1, seed=0)
    return [x.extend(row[0]) for x, row in zip(prefixes, rows) if not row[0].is_terminal]


def test_a_child_forwards_only_its_last_token():
    # Round 2 prefill: each child's context minus its last token is cached, so the prefill call
    # has U rows and U tokens (U distinct children: equal ones are one context).
    cached = policy(PrefixCacheConfig(), temperature=1.0)
    first = cached.propose(mixed_prefixes(), 2, seed=0)
    kids = children(mixed_prefixes(), first)
    distinct = len({tuple(context_of(k)) for k in kids})
    assert distinct >= 2
    log = ForwardLog(cached.model)
    second = cached.propose(kids, 2, seed=1)
    assert log.calls[0] == (distinct, distinct)
    assert sum(row[0].tokens_forwarded for row in second) >= distinct  # 1 prefill token each + fed


def test_split_chunks_and_rollout_equal_the_cache_free_policy():
    # batch_size 5 splits prefixes across chunks (each part looks up again); rollout reads the cache.
    def both(p):
        rounds = run_rounds(p, rounds=3, n=3)
        return rounds, p.rollout(children(mixed_prefixes(), rounds[0]), 2, seed=9)

    off, off_roll = both(policy(None, batch_size=5))
    on, on_roll = both(policy(PrefixCacheConfig(), batch_size=5))
    assert_same_outputs(off, on)
    flatten_paths = lambda rows: [[[s for path in row for s in path] for row in rows]]  # noqa: E731
    assert_same_outputs(flatten_paths(off_roll), flatten_paths(on_roll))


def test_a_tiny_budget_gives_the_same_outputs_with_more_forwarding():
    off = run_rounds(policy(None), rounds=4, n=2)
    roomy = policy(PrefixCacheConfig())
    # 512 bytes per token (2 layers x keys and values x 2 kv heads x 16 dims x 4 bytes): 12 KiB
    # holds about two paths
    small = policy(PrefixCacheConfig(max_bytes=3 * 2**12))
    tiny = policy(PrefixCacheConfig(max_bytes=1))  # nothing fits
    outs = {name: run_rounds(p, rounds=4, n=2) for name, p in (("roomy", roomy), ("small", small), ("tiny", tiny))}
    for out in outs.values():
        assert_same_outputs(off, out)
    assert small.prefix_cache.stats().evictions > 0 and small.prefix_cache.stats().hits > 0
    assert roomy.prefix_cache.stats().evictions == 0
    assert tiny.prefix_cache.stats().hits == 0 and len(tiny.prefix_cache) == 0
    assert forwarded(outs["roomy"]) < forwarded(outs["small"]) <= forwarded(outs["tiny"]) == forwarded(off)


@pytest.mark.parametrize("call", ["propose", "rollout"])
def test_tokens_forwarded_sum_to_the_hook_count_with_the_cache(call):
    cached = policy(PrefixCacheConfig(), batch_size=5)
    log = ForwardLog(cached.model)
    rounds = run_rounds(cached, rounds=3, n=3)
    steps = [s for rows in rounds for row in rows for s in row]
    if call == "rollout":
        frontier = children(mixed_prefixes(), rounds[0])
        steps += [s for row in cached.rollout(frontier, 2, seed=3) for path in row for s in path]
    assert sum(s.tokens_forwarded for s in steps) == log.tokens > 0
    assert cached.prefix_cache.stats().hits > 0


def test_disabled_or_absent_cache_is_todays_policy():
    absent, disabled = policy(None), policy(PrefixCacheConfig(enabled=False))
    assert absent.prefix_cache is None and disabled.prefix_cache is None
    log_absent, log_disabled = ForwardLog(absent.model), ForwardLog(disabled.model)
    assert_same_outputs(run_rounds(absent, rounds=2, n=2), run_rounds(disabled, rounds=2, n=2))
    assert log_disabled.calls == log_absent.calls  # the very same forward calls


def test_terminal_steps_are_not_stored():
    # stop_at_step=False ends every sample on eos/length: nothing can extend it, nothing is stored.
    cached = policy(PrefixCacheConfig())
    cached.propose(mixed_prefixes(), 2, seed=0, stop_at_step=False)
    cached.rollout(mixed_prefixes(), 2, seed=0)
    assert len(cached.prefix_cache) == 0 and cached.prefix_cache.stats().misses == 8


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_only_kv_new_to_the_cache_is_copied_out(monkeypatch, shared_prefix):
    """Greedy samples of one context are all the same step: its KV is copied out once, not once
    per sample; the same call again finds every key stored and copies nothing, and the stored
    entries and outputs are those of copying every row."""
    from policies import slot_cache

    copies = []
    for name in ("row_kv", "row_kv_span"):
        original = getattr(slot_cache.SlotCache, name)
        monkeypatch.setattr(slot_cache.SlotCache, name,
                            lambda self, *a, _f=original, **k: copies.append(1) or _f(self, *a, **k))
    prefixes = [x for x in mixed_prefixes() if not x.steps]  # 3 contexts, none cached
    p = policy(PrefixCacheConfig(), temperature=0.0)
    p.shared_prefix = shared_prefix
    first = p.propose(prefixes, 4, seed=0)
    ended = [row for row in first if row[0].finish == "separator"]  # contexts whose (one) step is kept
    assert len(ended) >= 2 and all(len({s.token_ids for s in row}) == 1 for row in first)
    assert len(p.prefix_cache) == len(ended)
    assert len(ended) <= len(copies) <= 2 * len(ended)  # its step once (and its context once): not 4 rows
    stored = len(p.prefix_cache)
    copies.clear()
    assert p.propose(prefixes, 4, seed=0) == first
    assert copies == [] and len(p.prefix_cache) == stored


def test_the_stored_key_is_the_context_ids_and_the_step_but_its_last_token():
    # A prefix with a hand-made step: after one greedy step the cache holds exactly
    # prompt ids + the prefix's step ids + the new step's ids but the last, and extending the
    # child forwards one token.
    cached = policy(PrefixCacheConfig(), temperature=0.0)
    step = Step("1" + SEP, (ID["1"], ID[SEP]), (0.0, 0.0), "separator")
    prefix = Prefix(Problem("a", "<think>"), (step,))
    first = cached.propose([prefix], 1, seed=0)[0][0]
    assert not first.is_terminal
    child = prefix.extend(first)
    context = TOK("<think>").input_ids + [ID["1"], ID[SEP]] + list(first.token_ids)
    assert context[:-1] in cached.prefix_cache
    log = ForwardLog(cached.model)
    cached.propose([child], 1, seed=0)
    assert log.calls[0] == (1, 1)


# -- chained entries ------------------------------------------------------------------------------


def test_a_chained_entry_pads_like_the_flat_one_and_counts_its_whole_length():
    whole = PrefixKV(torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2),
                     -torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2))
    root = PrefixKV(whole.keys[:, :, :2], whole.values[:, :, :2])
    middle = PrefixKV(whole.keys[:, :, 2:4], whole.values[:, :, 2:4], parent=root)
    chained = PrefixKV(whole.keys[:, :, 4:], whole.values[:, :, 4:], parent=middle)
    assert chained.length == 5 and chained.depth == 3 and [s.keys.shape[2] for s in chained.segments()] == [2, 2, 1]
    assert chained.nbytes == whole.nbytes  # the budget counts the whole sequence
    flat_keys, flat_values, flat_mask = pad_past([whole, kv(6)], "cpu", extra_columns=2)
    keys, values, mask = pad_past([chained, kv(6)], "cpu", extra_columns=2)
    assert torch.equal(mask, flat_mask) and mask[0].tolist() == [0, 1, 1, 1, 1, 1]
    assert torch.equal(keys[..., :6, :], flat_keys[..., :6, :]) and torch.equal(values[..., :6, :], flat_values[..., :6, :])
    with pytest.raises(ValueError, match="extends a parent of another shape"):
        PrefixKV(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2), parent=root)


def test_the_budget_counts_each_held_segment_once():
    """A tree's paths share their prompt: the budget counts it once; an evicted entry's segments
    stay counted while a stored entry extends them."""
    def step(parent: PrefixKV) -> PrefixKV:
        return PrefixKV(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), parent=parent)  # 2 tokens: 64 bytes

    cache = PrefixCache(PrefixCacheConfig(max_bytes=256))
    root = kv(4)  # 128 bytes
    a, b = step(root), step(root)
    cache.store((1, 2, 3, 4), root)
    cache.store((1, 2, 3, 4, 5, 6), a)
    cache.store((1, 2, 3, 4, 7, 8), b)
    assert cache.stats().bytes == 128 + 64 + 64  # the root once, not three times (its flat count: 448)
    c = step(a)
    cache.store((1, 2, 3, 4, 5, 6, 9, 9), c)  # 320 > 256: root's entry goes (its segment is held on),
    stats = cache.stats()                      # then a's (held by c), then b's, which frees 64
    assert (stats.evictions, stats.entries, stats.bytes) == (3, 1, 256)
    cache.store(tuple(range(10, 18)), kv(8))  # 256 more: c goes and its whole chain with it
    assert (cache.stats().entries, cache.stats().bytes) == (1, 256)


def test_a_step_search_stores_each_step_as_a_segment_over_its_prefix():
    p = policy(PrefixCacheConfig())
    run_rounds(p, rounds=4, n=2)
    entries = list(p.prefix_cache._entries.values())
    chained = [e for e in entries if e.parent is not None]
    assert chained, "later rounds extend the entries of earlier ones"
    for entry in chained:  # a segment holds only what its step added
        assert entry.keys.shape[2] < entry.length and entry.length == entry.parent.length + entry.keys.shape[2]


def test_a_chain_at_its_longest_is_stored_whole_and_outputs_do_not_change(monkeypatch):
    import policies.fed_kv as fed_kv

    chained = run_rounds(policy(PrefixCacheConfig()), rounds=5, n=2)
    monkeypatch.setattr(fed_kv, "MAX_CHAIN", 2)
    p = policy(PrefixCacheConfig())
    short = run_rounds(p, rounds=5, n=2)
    assert max(e.depth for e in p.prefix_cache._entries.values()) == 2
    assert short == chained  # where the KV lives changes nothing generated


# -- the KV buffer pool ---------------------------------------------------------------------------


def test_the_pool_serves_a_given_back_buffer_to_the_next_request_that_fits():
    from policies.kv_pool import HEADROOM, BufferPool

    pool = BufferPool(max_free=2)
    first = pool.take((2, 3, 4), torch.float32, "cpu")
    assert first.shape == (2, 3, 4) and first.is_contiguous() and pool.allocations == 1
    pool.give(first)
    again = pool.take((2, 3, 5), torch.float32, "cpu")  # 30 <= 24 * HEADROOM: the same memory
    assert int(24 * HEADROOM) >= 30 and again.data_ptr() == first.data_ptr() and pool.allocations == 1
    other = pool.take((2, 3, 5), torch.float16, "cpu")  # another dtype never shares
    pool.give(again)
    bigger = pool.take((100,), torch.float32, "cpu")  # nothing free fits: the too small one is dropped
    assert pool.allocations == 3 and other.dtype == torch.float16 and pool._free == []
    again = pool.take((2, 3, 5), torch.float32, "cpu")
    assert pool.allocations == 4
    pool.give(bigger[1:])  # not the start of a buffer: ignored
    assert pool._free == []
    for tensor in (again, other, bigger):
        pool.give(tensor)
    pool.give(bigger)  # twice: kept once
    assert len(pool._free) == 2 and pool._free[0].numel() == int(100 * HEADROOM)  # the largest kept
    assert pool._free[1].numel() == int(30 * HEADROOM)  # a whole buffer comes back, not the view


def test_a_pool_of_many_sizes_keeps_smaller_buffers_and_trims_to_max_free():
    from policies.kv_pool import BufferPool

    pool = BufferPool(max_free=4, drop_smaller=False)  # as the continuous engine runs it
    small = pool.take((10,), torch.float32, "cpu")
    pool.give(small)
    pool.take((1000,), torch.float32, "cpu")  # nothing free fits: a new one, the small one stays
    assert pool.allocations == 2 and [b.numel() for b in pool._free] == [12]
    assert pool.take((8,), torch.float32, "cpu").data_ptr() == small.data_ptr() and pool.allocations == 2
    for size in (20, 30, 40, 50):
        pool.give(torch.empty(size))
    pool.set_max_free(2)
    assert [b.numel() for b in pool._free] == [50, 40]  # the largest kept


def test_overlapping_engines_keep_the_pool_settings_until_the_last_one_stops():
    # one engine restored the settings it saw at its start while a second still ran
    from policies.kv_pool import BufferPool

    pool = BufferPool(max_free=4)
    first, second = pool.serving_engine(), pool.serving_engine()
    first.__enter__()
    pool.raise_max_free(8)
    second.__enter__()
    pool.raise_max_free(12)
    pool.raise_max_free(6)  # never lowers it while engines run
    for size in range(10, 130, 10):
        pool.give(torch.empty(size))
    first.__exit__(None, None, None)  # the first stops before the second
    assert (pool.max_free, pool.drop_smaller, len(pool._free)) == (12, False, 12)
    second.__exit__(None, None, None)
    assert (pool.max_free, pool.drop_smaller) == (4, True)
    assert [b.numel() for b in pool._free] == [120, 110, 100, 90]  # the extra buffers dropped


def test_a_step_search_reuses_its_kv_buffers_from_the_pool_round_to_round():
    from policies.slot_cache import KV_POOL as pool  # the decode loop's pool, emptied first

    pool.clear()
    before = pool.allocations
    cached = run_rounds(policy(PrefixCacheConfig()), rounds=4, n=2)
    calls = 4 * 1  # run_rounds makes one propose call per round; each chunk takes up to four buffers
    assert 0 < pool.allocations - before < 4 * calls and pool._free  # most buffers came back and were reused
    assert_same_outputs(cached, run_rounds(policy(None), rounds=4, n=2))


def test_the_pool_hands_a_buffer_to_one_thread_at_a_time():
    # two policies on different models decode at once (no shared model lock): the unlocked pool
    # raised "list modified during sort" or handed one buffer to two chunks, whose KV then mixed
    import sys
    import threading

    pool, held, clashes, errors = BufferPool(), set(), [], []
    guard = threading.Lock()

    def work() -> None:
        try:
            for i in range(10000):
                buffer = pool.take((64 + i % 7, 16), torch.float32, "cpu")
                with guard:
                    clashes.extend([buffer.data_ptr()] if buffer.data_ptr() in held else [])
                    held.add(buffer.data_ptr())
                with guard:
                    held.discard(buffer.data_ptr())
                pool.give(buffer)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and clashes == []
