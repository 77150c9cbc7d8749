"""`PrefixCache`: key/value tensors of token-id prefixes kept across policy calls, so a step-level
search that extends last round's paths forwards only the new tokens.

Usage:
    cache = PrefixCache(PrefixCacheConfig(max_bytes=256 * 2**20))
    cache.store(tuple(ids), PrefixKV(keys, values))              # [layers, heads, len, head_dim] each
    hit = cache.longest(ids, candidate_lengths(len(ids), prompt_len, step_lengths))
    if hit is not None:
        length, kv = hit                                         # ids[:length] need no forward
    cache.stats()                                                # hits, misses, evictions, bytes

What is stored: one entry per path, keyed by the exact token ids whose KV it holds (one row,
unpadded, on the model's device: host memory on a CPU, GPU memory on a GPU), as a chain of
segments: a step generated from a cached prefix stores only its own columns and points at that
prefix's entry (`PrefixKV.parent`), so storing a step copies one step and the paths of a tree
share their prompt and common steps in memory.

Lookup checks only the lengths a search can have stored (`candidate_lengths`: each step boundary
of the query and one token before it, since a step's last token is never fed back while it is
generated), longest first, in a hash map: no trie needed. At least one token of a query is always
left to forward, because its logits are what the next token is sampled from.

Eviction: least recently used (a hit or a store counts as a use) until the stored bytes fit
`max_bytes`; an entry larger than the whole budget (its whole sequence, `PrefixKV.nbytes`) is
not stored. The stored bytes are those of every segment the entries' chains hold, each counted
once however many entries share it (a tree's prompt and common steps once, not once per path):
the memory the cache keeps alive, since an evicted entry's segments stay counted while a stored
entry extends them. (Counting each entry's whole sequence instead, a SmolLM2 beam search over
16 GSM8K problems, N = 8, depth 3, evicted most of a round's children before the next round
could reuse them: 41 of 80 lookups hit, 269 evictions, 146 s; counted once: 64 hits, none
evicted, 474 MiB held, 99 s, as many tokens generated.) Entries are only valid for the weights
that computed them: call `clear()` after changing the model.

Tests: `.venv/bin/pytest tests/test_prefix_cache.py`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from policies.host_copy import host_pair
from policies.kv_pool import BufferPool

DEFAULT_MAX_BYTES = 512 * 2**20


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Settings of the cross-call prefix cache of a generation backend.

    enabled: reuse cached prefixes (False behaves exactly as no cache).
    max_bytes: memory budget of the stored key/value tensors; least recently used entries are
        evicted beyond it.
    """

    enabled: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"PrefixCacheConfig.enabled={self.enabled!r} must be a bool")
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 1:
            raise ValueError(f"PrefixCacheConfig.max_bytes={self.max_bytes!r} must be an integer >= 1")


def prefix_cache_config(value: object) -> PrefixCacheConfig | None:
    """A policy's `prefix_cache` setting as a PrefixCacheConfig (None: off): None, a
    PrefixCacheConfig, true / false, or a mapping of its fields (what Hydra passes for
    `+policy.prefix_cache.max_bytes=N` without a `_target_`). Anything else, or an unknown
    field, is a ValueError naming prefix_cache (was a TypeError after the model had loaded)."""
    if value is None or isinstance(value, PrefixCacheConfig):
        return value
    if isinstance(value, bool):
        return PrefixCacheConfig() if value else None
    if isinstance(value, Mapping):
        settings = {str(key): item for key, item in value.items() if key != "_target_"}
        known = {f.name for f in fields(PrefixCacheConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"prefix_cache.{unknown[0]} is not a setting of the prefix cache; valid: {', '.join(sorted(known))}")
        return PrefixCacheConfig(**settings)
    raise ValueError(f"prefix_cache={value!r}: give true / false, null, or its settings "
                     "(prefix_cache.max_bytes=N, prefix_cache.enabled=false)")


MAX_CHAIN = 16  # most segments of a PrefixKV chain; a longer one is stored whole (see PrefixKV)


@dataclass(frozen=True)
class PrefixKV:
    """The attention keys and values of one token sequence, every layer in one tensor, stored as a
    chain: `parent` holds the first parent.length tokens (None: nothing), keys / values the rest.

    keys, values: [layers, kv_heads, own length, head_dim] each, no padding (one tensor for all
        layers, so copying a row in or out of the decode cache is one op, not one per layer).
    parent: the entry this one extends. A step-level search stores each new step as the columns
        it added on top of the prefix it was generated from, so an entry costs one step's copy
        and the paths of one tree share their common prefix in memory; a chain longer than
        MAX_CHAIN segments is stored whole (the decode loop copies the full row then).
    """

    keys: torch.Tensor
    values: torch.Tensor
    parent: PrefixKV | None = None
    length: int = field(init=False, repr=False, compare=False)  # tokens of the whole sequence (the parent's and this one's)
    depth: int = field(init=False, repr=False, compare=False)  # segments in the chain (1: stored whole)

    def __post_init__(self) -> None:
        shape, parent = self.keys.shape, self.parent  # checked on torch.Size tuples: a search makes one per row per step
        if len(shape) != 4 or shape != self.values.shape or shape[0] < 1:
            raise ValueError(
                "PrefixKV keys and values must both be [layers >= 1, heads, length, head_dim], got "
                f"{tuple(shape)} and {tuple(self.values.shape)}"
            )
        if parent is not None:
            above = parent.keys.shape
            if above[0] != shape[0] or above[1] != shape[1] or above[3] != shape[3]:
                raise ValueError(f"PrefixKV extends a parent of another shape: {tuple(above)} vs {tuple(shape)}")
        # computed once: a search asks for them per row per call, and a chain would walk its parents
        object.__setattr__(self, "length", shape[2] + (0 if parent is None else parent.length))
        object.__setattr__(self, "depth", 1 if parent is None else parent.depth + 1)

    @cached_property
    def host(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views (keys, values) of this segment's own tensors, for `pad_past`'s copies
        (`policies.host_copy`); a segment on another device is copied to the CPU first."""
        return host_pair(self.keys, self.values) or host_pair(self.keys.detach().cpu(), self.values.detach().cpu())

    @property
    def own_nbytes(self) -> int:
        """Bytes of this segment's own keys and values (what the cache's budget counts, once per
        segment)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole sequence as if stored flat (an entry larger than the cache's whole
        budget is not stored)."""
        per_token = sum(t.numel() * t.element_size() for t in (self.keys, self.values)) // max(int(self.keys.shape[-2]), 1)
        return per_token * self.length

    def first(self, n: int) -> PrefixKV:
        """The KV of this sequence's first n tokens (1 <= n <= length): a chain of views sharing
        this one's memory, no copy."""
        if not 1 <= n <= self.length:
            raise ValueError(f"PrefixKV.first({n}) of a sequence of {self.length} tokens")
        entry = self
        while entry.parent is not None and entry.parent.length >= n:
            entry = entry.parent
        if entry.length == n:
            return entry
        keep = n - (0 if entry.parent is None else entry.parent.length)
        return PrefixKV(entry.keys[:, :, :keep], entry.values[:, :, :keep], entry.parent)

    def segments(self) -> list[PrefixKV]:
        """The chain, first tokens first (each segment's own keys / values)."""
        chain, entry = [], self
        while entry is not None:
            chain.append(entry)
            entry = entry.parent
        return chain[::-1]


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the cache was made (or cleared).

    hits / misses: lookups that found / did not find a cached prefix.
    tokens_reused: prefix tokens the hits spared from forwarding.
    stores: entries written (a repeated key only refreshes its use).
    evictions: entries dropped to fit the budget. oversized: entries larger than the whole budget,
        never stored.
    entries, bytes: what the cache holds now (bytes: each held segment once).
    """

    hits: int
    misses: int
    tokens_reused: int
    stores: int
    evictions: int
    oversized: int
    entries: int
    bytes: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class PrefixCache:
    """An LRU map from token-id tuples to their `PrefixKV`, bounded in bytes (module docstring)."""

    def __init__(self, config: PrefixCacheConfig) -> None:
        self.config = config
        self._entries: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()  # oldest use first
        self.clear()

    def clear(self) -> None:
        """Drop every entry and reset the counters (e.g. after the model's weights changed)."""
        self._entries.clear()
        self._segments: dict[int, list[int]] = {}  # id of a held segment -> [entries holding it, its bytes]
        self._bytes = 0
        self._hits = self._misses = self._tokens_reused = 0
        self._stores = self._evictions = self._oversized = 0

    def longest(self, token_ids: Sequence[int], lengths: Sequence[int]) -> tuple[int, PrefixKV] | None:
        """The longest cached token_ids[:length] among `lengths` (each in [1, len(token_ids)]), as
        (length, its KV), or None. A hit becomes the most recently used entry."""
        ids = tuple(token_ids)
        for length in sorted(set(lengths), reverse=True):
            entry = self._entries.get(ids[:length])
            if entry is not None:
                self._entries.move_to_end(ids[:length])
                self._hits += 1
                self._tokens_reused += length
                return length, entry
        self._misses += 1
        return None

    def store(self, token_ids: Sequence[int], kv: PrefixKV) -> None:
        """Keep kv as the KV of token_ids (most recently used), then evict to fit the budget."""
        key = tuple(token_ids)
        if kv.length != len(key):
            raise ValueError(f"PrefixKV of length {kv.length} stored under {len(key)} token ids")
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if kv.nbytes > self.config.max_bytes:
            self._oversized += 1
            return
        self._entries[key] = kv
        self._hold(kv)
        self._stores += 1
        self._evict_to_budget()

    def _hold(self, kv: PrefixKV) -> None:
        """Count kv's chain: a segment no stored entry held yet adds its bytes."""
        for segment in kv.segments():
            held = self._segments.get(id(segment))  # the entries keep it alive, so its id is its own
            if held is None:
                self._segments[id(segment)] = [1, segment.own_nbytes]
                self._bytes += segment.own_nbytes
            else:
                held[0] += 1

    def _release(self, kv: PrefixKV) -> None:
        """Uncount kv's chain: a segment no stored entry holds any more gives its bytes back."""
        for segment in kv.segments():
            held = self._segments[id(segment)]
            held[0] -= 1
            if held[0] == 0:
                del self._segments[id(segment)]
                self._bytes -= held[1]

    def _evict_to_budget(self) -> None:
        while self._bytes > self.config.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._release(dropped)
            self._evictions += 1

    def __contains__(self, token_ids: Sequence[int]) -> bool:
        return tuple(token_ids) in self._entries

    def touch(self, token_ids: tuple[int, ...]) -> bool:
        """Whether token_ids are stored; if so they become the most recently used entry, as
        storing them again would (the decode loop then skips copying out a KV the cache has)."""
        if token_ids in self._entries:
            self._entries.move_to_end(token_ids)
            return True
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def keys_in_lru_order(self) -> list[tuple[int, ...]]:
        """Stored keys, least recently used first (the next to be evicted)."""
        return list(self._entries)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self._hits, self._misses, self._tokens_reused, self._stores, self._evictions,
            self._oversized, len(self._entries), self._bytes,
        )


def candidate_lengths(length: int, prompt_length: int, step_lengths: Sequence[int]) -> list[int]:
    """Prefix lengths of a query worth looking up, longest first: one token short of the whole
    query (what generating its last step stored), and each step boundary and one token before it
    (boundaries: prompt_length + the cumulative step lengths). Only lengths in [1, length - 1]:
    the last token is always forwarded for its logits.
    E.g. length 10, prompt 4, steps [3, 3] -> boundaries 4, 7, 10 -> [9, 7, 6, 4, 3]."""
    boundaries, total = [prompt_length], prompt_length
    for step_length in step_lengths:
        total += step_length
        boundaries.append(total)
    wanted = {length - 1} | set(boundaries) | {b - 1 for b in boundaries}
    return sorted((n for n in wanted if 1 <= n <= length - 1), reverse=True)


def pad_past(
    entries: Sequence[PrefixKV | None], device: torch.device | str, extra_columns: int = 0,
    pool: BufferPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack cached prefixes of different lengths into a left-padded batch past.

    entries: per row a PrefixKV or None (nothing cached), at least one not None.
    extra_columns: free columns allocated after the past (uninitialised), so a caller can append
        the next tokens' KV in place (`policies.decode_loop.SlotCache`).
    pool: where the two buffers come from (`policies.kv_pool`; default: fresh memory).
    The batch is assembled on the entries' device (the model's, where they were copied out), then
    moved to `device` if that differs.
    Returns (keys, values, past_mask): keys and values [layers, U, kv_heads, P + extra_columns,
    head_dim] with row u's cached tensors in columns P - len_u .. P - 1 and zeros before;
    past_mask [U, P] long, 1 on cached columns; P = the longest cached length.
    """
    sample = next(e for e in entries if e is not None)
    home = sample.keys.device  # where they were copied out: the model's
    kind = (sample.keys.dtype, sample.values.dtype, home)
    if any(e is not None and (e.keys.dtype, e.values.dtype, e.keys.device) != kind for e in entries):
        raise ValueError(
            "pad_past needs cached prefixes of one dtype and device (the copies move bits, they do not "
            "convert; clear the prefix cache after moving the model)"
        )
    width = max(e.length for e in entries if e is not None)
    layers, heads, _, head_dim = sample.keys.shape
    shape = (layers, len(entries), heads, width + extra_columns, head_dim)
    if pool is None:
        take = lambda dtype: torch.empty(shape, dtype=dtype, device=home)  # noqa: E731
    else:
        take = lambda dtype: pool.take(shape, dtype, home)  # noqa: E731
    keys, values = take(sample.keys.dtype), take(sample.values.dtype)  # [L, U, H, P + extra, D]
    past_mask = torch.zeros((len(entries), width), dtype=torch.long)  # [U, P]
    # numpy views: cheaper per-row copies (`policies.host_copy`); torch copies for dtypes numpy cannot view
    into = host_pair(keys, values) or (keys, values)
    for row, entry in enumerate(entries):
        start = width - (0 if entry is None else entry.length)
        if start:  # only the left padding is zeroed (masked, but 0 x garbage could be NaN)
            for buffer in into:
                buffer[:, row, :, :start] = 0
        if entry is not None:
            _copy_chain(entry, into[0][:, row], into[1][:, row], start)
            past_mask[row, start:] = 1
    return keys.to(device), values.to(device), past_mask.to(device)


def _copy_chain(
    entry: PrefixKV, keys: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor, start: int
) -> None:
    """Copy a chain's segments, first tokens first, into keys / values [L, H, columns, D] (numpy
    views of CPU buffers, or the tensors themselves) from column `start` on: each segment
    straight into place (no concatenated temporary)."""
    through_numpy = isinstance(keys, np.ndarray)
    for segment in entry.segments():
        end = start + int(segment.keys.shape[2])
        source = segment.host if through_numpy else (segment.keys, segment.values)
        keys[:, :, start:end] = source[0]
        values[:, :, start:end] = source[1]
        start = end
