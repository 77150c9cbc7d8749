"""Copying out the KV each finished row fed, for the cross-call prefix cache (`keep_kv` of
`policies.decode_loop`): a row that ended on a step separator hands back the KV of everything it
fed (its context + its tokens but the last) as a `PrefixKV` chain extending the cached prefix it
started from, so only the new columns are copied: with a shared prefix
(`policies.shared_prefix`) each context's new prefill columns once (`ContextEntries`), then each
row's own decoded columns; with copied rows, a context without a cached prefix copied once for
all its rows (`SharedContexts`), then each row's columns after its past (`copy_fed_kv`). A chain
MAX_CHAIN segments long is stored whole instead.

    copy_out = fed_kv_copier(batch, row_context, past)    # once per chunk, after the prefill
    copy_out(batch, [(slot, row), ...], fed_kv)            # when rows end; fed_kv[row] set

Tests: `.venv/bin/python -m pytest tests/test_prefix_cache.py tests/test_shared_prefix.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from policies.decode_batch import DecodeBatch
from policies.prefix_cache import MAX_CHAIN, PrefixKV
from policies.shared_prefix import SharedPrefixCache

# copy_out(batch, chosen, fed_kv): fed_kv[row] = the KV fed by each (slot, chunk row) of chosen
CopyOut = Callable[[DecodeBatch, Sequence[tuple[int, int]], list[PrefixKV | None]], None]


def fed_kv_copier(
    batch: DecodeBatch, row_context: Sequence[int], past: Sequence[PrefixKV | None] | None
) -> CopyOut:
    """The function that copies out the fed KV of finished rows, for this batch's kind of cache."""
    # no cached prefixes: one None per context index (a context may have no rows: len(set(...)) fell short)
    past = [None] * (max(row_context, default=-1) + 1) if past is None else past
    past_width = max((p.length for p in past if p is not None), default=0)  # P: cached columns
    if isinstance(batch.cache, SharedPrefixCache):
        return ContextEntries(batch.cache, past, past_width, row_context, {}).copy_fed_kv
    row_past = [past[u] for u in row_context]  # what each row's fed KV extends
    shared = SharedContexts(batch.attention_mask.shape[1], row_context, {})  # uncached contexts' KV, once each
    return lambda batch, chosen, fed_kv: copy_fed_kv(batch, chosen, fed_kv, row_past, past_width, shared)


@dataclass
class ContextEntries:
    """Fed KV with a shared prefix: each context's prefill KV is copied out once, as an entry
    extending its cached prefix past[u] (past_width: the cached columns, left-padded; a chain
    MAX_CHAIN - 1 long or none: the whole context); a finished row's entry is its own decoded
    columns on top of its context's entry."""

    cache: SharedPrefixCache
    past: Sequence[PrefixKV | None]
    past_width: int
    row_context: Sequence[int]
    entries: dict[int, PrefixKV]

    def entry(self, context: int) -> PrefixKV:
        if context not in self.entries:
            mask, parent = self.cache.prefix_mask[context], self.past[context]  # [P + L] bool
            if parent is not None and parent.depth < MAX_CHAIN - 1:  # the new columns after the past: a contiguous span
                columns = slice(self.past_width + int(mask[self.past_width:].int().argmax()), int(mask.numel()))
            else:
                parent, columns = None, mask.nonzero().squeeze(-1)  # the whole context, unpadded
            self.entries[context] = self.cache.prefix_kv(context, columns, parent)
        return self.entries[context]

    def copy_fed_kv(self, batch: DecodeBatch, chosen: Sequence[tuple[int, int]], fed_kv: list[PrefixKV | None]) -> None:
        """fed_kv[row] for each (slot, chunk row) of `chosen` (see `copy_fed_kv`)."""
        length = self.cache.length
        for b, row in chosen:
            parent = self.entry(self.row_context[row])
            fed_kv[row] = parent if length == 0 else self.cache.row_tail(b, 0, parent)


@dataclass
class SharedContexts:
    """The KV of each context that had no cached prefix, copied out once and shared (as the
    parent of a chain) by every row of it that ends on a separator: prefill_width: the columns
    the prefill filled (cached past + new tokens); row_context: each chunk row's context;
    entries: context -> its entry, made when its first row needs it."""

    prefill_width: int
    row_context: Sequence[int]
    entries: dict[int, PrefixKV]

    def entry(self, batch: DecodeBatch, b: int, row: int) -> PrefixKV:
        """The entry of row's context, copied from slot b (any row of a context holds its KV)."""
        context = self.row_context[row]
        if context not in self.entries:
            columns = batch.attention_mask[b, : self.prefill_width].nonzero().squeeze(-1)  # the context, unpadded
            self.entries[context] = batch.cache.row_kv(b, columns)
        return self.entries[context]


def copy_fed_kv(
    batch: DecodeBatch, chosen: Sequence[tuple[int, int]], fed_kv: list[PrefixKV | None],
    row_past: Sequence[PrefixKV | None], past_width: int, shared: SharedContexts,
) -> None:
    """Copy out the KV of each (slot, chunk row) of `chosen`: the cache holds exactly what
    each fed (the token sampled this step is not fed yet), as an unpadded entry. A row
    prefilled from a cached prefix row_past[r] (its tokens in the first past_width columns)
    copies only the columns after them and extends that entry, unless its chain is MAX_CHAIN
    long already (then the whole row); a row with no cached prefix extends its context's entry
    (`SharedContexts`: the prompt copied once, not once per sample)."""
    length = batch.cache.length
    for b, row in chosen:
        parent = row_past[row]
        if parent is None:
            parent, start = shared.entry(batch, b, row), shared.prefill_width
        elif parent.depth < MAX_CHAIN:
            # after the past: the left-padded new tokens, then every decoded one (a contiguous span)
            start = past_width + int(batch.attention_mask[b, past_width:].argmax())  # first 1
        else:
            fed_kv[row] = batch.cache.row_kv(b, batch.attention_mask[b].nonzero().squeeze(-1))  # the whole row
            continue
        fed_kv[row] = parent if start == length else batch.cache.row_tail(b, start, parent)
