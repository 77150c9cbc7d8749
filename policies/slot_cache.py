"""`SlotCache`: the decode loop's KV cache: every layer's keys and values in two buffers
[layers, rows, kv_heads, capacity, head_dim] allocated ahead (from `KV_POOL`), each new token
written in place, finished rows' slots refilled by moving live rows into them.

Why: a plain DynamicLayer appends by concatenation, copying the whole cache at every decoded
token; at a few hundred rows of a small model that copy costs more than the matmuls
(experiments/bench_batching.py).

    cache = slot_cache(prefilled, rows=torch.tensor([0, 0, 1]), reserve=64)   # rows of a prefill
    model(input_ids=..., past_key_values=cache, ...)     # appends one column per layer in place
    cache.move_rows(slots, sources, rows=2)              # drop finished rows
    cache.row_tail(0, start=10)                          # columns 10.. of a row: a PrefixKV copy, same device
    cache.release()                                      # buffers back to KV_POOL

Tests: `.venv/bin/python -m pytest tests/test_transformers_policy.py -k slot_cache`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from policies.host_copy import host_pair, tensor_from
from policies.kv_pool import BufferPool
from policies.prefix_cache import PrefixKV

KV_GROWTH = 32  # columns a decode buffer gains when full (one copy of the live rows per 32 tokens)
# Columns reserved at the start of a chunk: its largest budget, up to this many, so a chunk whose
# budgets fit never copies its KV to grow (each growth copied every live row's whole cache: 3% of
# a SmolLM2 beam search's wall time went to those copies and the first gather).
KV_RESERVE_LIMIT = 1024
# ... and for a chunk that stops at step boundaries, up to this many: its rows end after a step,
# most within a few dozen tokens, while its budget is the whole max_step_tokens. Columns reserved
# but never written still take memory once a pooled buffer of another shape has touched their
# pages (64-problem tiny beam search at N = 32, peak RSS: 717-737 MiB reserving the budget,
# 550-579 MiB at 64), and a growth past them copies only the rows still live, a chunk's few
# longest.
STEP_KV_RESERVE = 64
# The KV buffers of every chunk come from here and go back when the chunk is done, so the next
# chunk's buffers reuse memory whose pages are already mapped (`policies.kv_pool`).
KV_POOL = BufferPool()


class _SlotBuffers:
    """What the layers of a `SlotCache` share: key and value buffers [L, B, H, capacity, D] of
    every layer and the number of rows in use (a plain holder, so layers and cache do not form a
    reference cycle that would keep the buffers alive until the garbage collector runs)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, growth: int) -> None:
        self.keys, self.values, self.growth = keys, values, growth
        self.rows = int(keys.shape[1])
        self.spare = 0  # rows beyond `rows` that a growth keeps allocated (set by the decode batch)
        self.host = host_pair(keys, values)  # numpy views for cheap per-row copies (`policies.host_copy`); None off the CPU

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    def grow(self, capacity: int, length: int) -> None:
        """New buffers of `capacity` columns holding the first `length` columns of the rows in use
        and `spare` more rows for rows that may still fork off (`policies.decode_batch`)."""
        room = self.spare
        self.keys, self.values = (
            _gather_into(old[:, : self.rows, :, :length], torch.arange(self.rows, device=old.device), capacity, room)
            for old in (self.keys, self.values)
        )
        self.host = host_pair(self.keys, self.values)


class SlotLayer(DynamicLayer):
    """One layer of a `SlotCache`: `keys` / `values` are views [B, H, length, D] of its slice of the
    shared buffers; `update` writes the new columns in place (growing all layers' buffers by
    KV_GROWTH columns when full)."""

    def __init__(self, buffers: _SlotBuffers, index: int, length: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = buffers.keys.dtype, buffers.keys.device, True
        self._buffers, self._index, self._length = buffers, index, length
        self.refresh()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new columns [B, H, s, D] in place; return the whole KV [B, H, S+s, D] (views)."""
        buffers, end = self._buffers, self._length + int(key_states.shape[2])
        if end > buffers.capacity:
            buffers.grow(end + buffers.growth, self._length)
        buffers.keys[self._index, : buffers.rows, :, self._length : end] = key_states
        buffers.values[self._index, : buffers.rows, :, self._length : end] = value_states
        self._length = end
        self.refresh()
        return self.keys, self.values

    def refresh(self) -> None:
        """Point `keys` / `values` at the current buffers, rows and length."""
        rows = self._buffers.rows
        self.keys = self._buffers.keys[self._index, :rows, :, : self._length]
        self.values = self._buffers.values[self._index, :rows, :, : self._length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a SlotLayer's rows move with SlotCache.move_rows (all layers at once)")


class SlotCache(Cache):
    """The KV cache of the decoding rows: every layer's keys and values in two buffers
    [L, B, H, capacity, D] allocated ahead, one `SlotLayer` view per layer.

    Why: a plain DynamicLayer appends by concatenation, copying the whole cache at every decoded
    token; at a few hundred rows of a small model that copy costs more than the matmuls
    (experiments/bench_batching.py). Here a token is written in place; a finished row's slot is
    refilled by moving a live row from the end (`move_rows`), and a row's KV is copied out
    (`row_kv`), each in one op over all layers rather than one per layer (SmolLM2 has 30).
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, length: int, growth: int = KV_GROWTH, rows: int | None = None
    ) -> None:
        """Take buffers [L, B, H, capacity, D] (no copy) whose first `length` columns are filled;
        rows: how many of the B rows are in use (default all; the rest is room for rows that
        fork off later, `move_rows`)."""
        self._buffers = _SlotBuffers(keys, values, growth)
        if rows is not None:
            self._buffers.rows = int(rows)
        super().__init__(layers=[SlotLayer(self._buffers, index, int(length)) for index in range(int(keys.shape[0]))])

    @classmethod
    def gathered(cls, cache: Any, rows: torch.Tensor, reserve: int = KV_GROWTH, room: int = 0) -> "SlotCache":
        """The rows `rows` [R] (repeats allowed) of a prefilled cache (one layer list of
        [U, H, S, D] keys / values), in buffers with `reserve` free columns after the S filled
        and `room` more rows than R allocated for rows that fork off later."""
        layers = cache.layers
        length = int(layers[0].keys.shape[2])
        capacity = length + max(reserve, 1)
        if isinstance(cache, SlotCache):  # one gather over all layers
            buffers = cache._buffers
            keys, values = (
                _gather_into(b[:, : buffers.rows, :, :length], rows, capacity, room) for b in (buffers.keys, buffers.values)
            )
        else:
            keys, values = (
                _stack_gather([getattr(layer, name) for layer in layers], rows, capacity, room) for name in ("keys", "values")
            )
        return cls(keys, values, length, rows=int(rows.numel()))

    @property
    def length(self) -> int:
        """Columns filled (the same in every layer between forwards)."""
        return self.layers[0]._length

    def keep_spare_rows(self, count: int) -> None:
        """Allocate `count` rows beyond those in use whenever the buffers grow (room for rows
        that fork off later; they must fit in the buffers allocated now)."""
        self._buffers.spare = int(count)

    def move_rows(self, slots: torch.Tensor, sources: torch.Tensor, rows: int) -> None:
        """Copy rows sources [k] into slots [k] in every layer, then keep the first `rows` rows."""
        buffers, length = self._buffers, self.length
        # numpy views where there are (a third of torch's per-op cost, `policies.host_copy`), else the tensors
        into = buffers.host or (buffers.keys, buffers.values)
        for slot, source in zip(slots.tolist(), sources.tolist()):  # straight copies: no gathered temporary
            for buffer in into:
                buffer[:, slot, :, :length] = buffer[:, source, :, :length]
        buffers.rows = rows
        for layer in self.layers:
            layer.refresh()

    def keep(self, keep_mask: torch.Tensor) -> torch.Tensor:
        """Drop the rows where keep_mask [B] is False: each freed slot below the new size takes a
        live row from beyond it, so only those rows' KV is copied. Returns the old slot of each new
        slot [B'] (to reorder other per-row tensors the same way)."""
        size = int(keep_mask.sum())
        slots = (~keep_mask[:size]).nonzero().squeeze(-1)  # [k] freed slots that stay
        sources = keep_mask[size:].nonzero().squeeze(-1) + size  # [k] live rows past the new end
        self.move_rows(slots, sources, size)
        index = torch.arange(size, device=keep_mask.device)
        index[slots] = sources  # [B'] new slot s holds old slot index[s]
        return index

    def release(self) -> None:
        """Hand the buffers back to KV_POOL; the cache must not be used afterwards."""
        KV_POOL.give(self._buffers.keys)
        KV_POOL.give(self._buffers.values)

    def row_kv(self, row: int, columns: torch.Tensor, parent: PrefixKV | None = None) -> PrefixKV:
        """A copy (on the buffers' device) of slot `row`'s KV at `columns` [n] of every layer,
        extending `parent`."""
        keys, values = self._buffers.keys[:, row], self._buffers.values[:, row]  # [L, H, capacity, D]
        return PrefixKV(keys.index_select(2, columns), values.index_select(2, columns), parent)

    def row_tail(self, row: int, start: int, parent: PrefixKV | None = None) -> PrefixKV:
        """`row_kv` of the filled columns from `start` on (one contiguous span: a slice copy,
        cheaper than an index gather)."""
        return self.row_kv_span(row, slice(start, self.length), parent)

    def row_kv_span(self, row: int, columns: slice, parent: PrefixKV | None = None) -> PrefixKV:
        """`row_kv` of one contiguous span of columns (a slice copy of every layer at once)."""
        buffers = self._buffers
        host = buffers.host
        if host is not None:  # numpy: a third of torch's per-op cost (`policies.host_copy`)
            (keys, values), dtype = host, buffers.keys.dtype
            return PrefixKV(
                tensor_from(keys[:, row, :, columns].copy(), dtype), tensor_from(values[:, row, :, columns].copy(), dtype),
                parent,
            )
        keys, values = (b[:, row, :, columns] for b in (buffers.keys, buffers.values))
        # a copy on the same device, never a view: on a GPU no copy to the host, which would wait
        # for the GPU once per row (tiny beam search on an H200: 20% of its time)
        return PrefixKV(keys.clone(memory_format=torch.contiguous_format),
                        values.clone(memory_format=torch.contiguous_format), parent)


def _gather_into(source: torch.Tensor, rows: torch.Tensor, capacity: int, room: int = 0) -> torch.Tensor:
    """A new buffer [L, R + room, H, capacity, D] whose first R rows' first S columns hold
    source[:, rows] (source [L, U, H, S, D]); gathered straight into the buffer: a temporary of
    this size would cost a fresh allocation (page faults) as large as the copy itself."""
    layers, _, heads, length, dim = source.shape
    count = int(rows.numel())
    buf = KV_POOL.take((layers, count + room, heads, capacity, dim), source.dtype, source.device)
    torch.index_select(source, 1, rows, out=buf[:, :count, :, :length])
    return buf


def _stack_gather(tensors: Sequence[torch.Tensor], rows: torch.Tensor, capacity: int, room: int = 0) -> torch.Tensor:
    """`_gather_into` of per-layer tensors [U, H, S, D] (a DynamicCache's layers)."""
    sample = tensors[0]
    _, heads, length, dim = sample.shape
    count = int(rows.numel())
    buf = KV_POOL.take((len(tensors), count + room, heads, capacity, dim), sample.dtype, sample.device)
    for index, tensor in enumerate(tensors):
        torch.index_select(tensor, 0, rows, out=buf[index, :count, :, :length])
    return buf


def slot_cache(cache: Any, rows: torch.Tensor, reserve: int | None = None, room: int = 0) -> SlotCache:
    """A cache holding the rows `rows` [R] (repeats allowed) of a prefilled cache, with `reserve`
    free columns (default KV_GROWTH) and `room` spare rows for rows that fork off later."""
    return SlotCache.gathered(cache, rows, KV_GROWTH if reserve is None else reserve, room)
