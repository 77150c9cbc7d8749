"""`PRMMemory`: what an external PRM scorer (`scorers.lm_prm_scorer`) keeps across calls, so the
next round of a step-level search forwards only each path's new step, not the parent it extends.

Three things, keyed by a path's PRM token ids through its last reading (the tokens a child's
layout repeats: the chat layouts close the turn after it differently once a step follows):
- the KV of every path it scored, in a `policies.prefix_cache.PrefixCache` (least recently used
  out beyond `max_bytes`; chained: a path holds only its own new columns on top of its parent's
  entry or of the start it shared in its batch, so a tree's question and common steps are held
  once);
- the scores read at each path's positions: a child reads its parent's positions from here (the
  same tokens give the same hidden states under a causal model);
- the tokens forwarded to score each path, by its whole ids (what `cost` reports after `score`: a
  child found with its parent cached forwarded only its new tokens).
The scores and forwarded counts are keyed by a 16-byte digest of the ids (`ids_key`), not by the
ids themselves: MAX_RECORDS paths of 2000 tokens held as tuples took ~6 GB beside a KV budget of
512 MiB; with digests the records take ~0.1-0.4 GB (their score dicts, paths of 1-20 steps).

    memory = PRMMemory(max_bytes=512 * 2**20)
    hit = memory.parent(ids, parent_end)        # ParentHit(length, kv, scores) or None
    memory.remember(ids, end, kv, {position: score}, forwarded=tokens)   # kv: ids[:end]
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from policies.prefix_cache import PrefixCache, PrefixCacheConfig, PrefixKV

DEFAULT_MAX_BYTES = 512 * 2**20
MAX_RECORDS = 200_000  # paths whose scores and forwarded tokens are kept (oldest dropped first)


@dataclass(frozen=True)
class ParentHit:
    """A scored parent found for a path: its token count, its KV, its scores by position."""

    length: int
    kv: PrefixKV
    scores: dict[int, float]


class PRMMemory:
    """KV, position scores and forwarded tokens of the paths a PRM scored (module docstring)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """max_bytes: the KV budget; 0 keeps no KV (the forwarded tokens are still recorded)."""
        self.cache = PrefixCache(PrefixCacheConfig(max_bytes=max_bytes)) if max_bytes else None
        self._scores: OrderedDict[bytes, dict[int, float]] = OrderedDict()  # by ids_key
        self._forwarded: OrderedDict[bytes, int] = OrderedDict()  # by ids_key

    @property
    def keeps_kv(self) -> bool:
        return self.cache is not None

    def clear(self) -> None:
        """Forget everything (e.g. after the PRM's weights changed)."""
        if self.cache is not None:
            self.cache.clear()
        self._scores.clear()
        self._forwarded.clear()

    def parent(self, ids: Sequence[int], parent_end: int) -> ParentHit | None:
        """The cached ids[:parent_end] (a parent's tokens through its last reading) with its
        scores, when both are kept and at least one token of ids is left to forward; else None."""
        if self.cache is None or not 0 < parent_end < len(ids):
            return None
        scores = self._scores.get(ids_key(ids[:parent_end]))
        hit = None if scores is None else self.cache.longest(ids, [parent_end])
        return None if hit is None else ParentHit(parent_end, hit[1], scores)

    def remember(
        self, ids: Sequence[int], end: int, kv: PrefixKV | None, scores: dict[int, float], forwarded: int
    ) -> None:
        """Keep a scored path: the KV of ids[:end] (through its last reading; None: none to keep;
        the cache may refuse or later evict it), its scores by position and the tokens its scoring
        forwarded."""
        if kv is not None and self.cache is not None:
            self.cache.store(tuple(ids[:end]), kv)
            _keep(self._scores, ids_key(ids[:end]), scores)
        _keep(self._forwarded, ids_key(ids), forwarded)

    def forwarded(self, ids: Sequence[int]) -> int | None:
        """Tokens forwarded when ids were last scored (None: not scored, or forgotten)."""
        return self._forwarded.get(ids_key(ids))


def ids_key(ids: Sequence[int]) -> bytes:
    """A 16-byte digest of token ids (BLAKE2b; a collision among a search's paths is ~2^-100 likely)."""
    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


def _keep(records: OrderedDict, key: bytes, value: object) -> None:
    """records[key] = value as the newest, the oldest dropped beyond MAX_RECORDS."""
    records[key] = value
    records.move_to_end(key)
    while len(records) > MAX_RECORDS:
        records.popitem(last=False)


def stacked_kv(kv: PrefixKV) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of kv's whole chain, [layers, kv_heads, length, head_dim] each."""
    segments = kv.segments()
    if len(segments) == 1:
        return kv.keys, kv.values
    return torch.cat([s.keys for s in segments], dim=2), torch.cat([s.values for s in segments], dim=2)
