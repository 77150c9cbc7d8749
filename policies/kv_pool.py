"""Reuse the decode loop's large KV buffers from one chunk to the next instead of allocating them
anew.

Why: a step-level search allocates, per call, the padded past of its prefixes and the KV buffers
of its rows ([layers, rows, heads, columns, head_dim]: hundreds of MB for SmolLM2 at 128 rows),
each a little larger than the last as paths grow. Fresh memory costs a page fault per 4 KiB page
on first touch: measured on this CPU, ten such gathers of growing size took 8.4 s, 8.2 s of it
system time (1.1M page faults), where the copies themselves need ~1 s. Buffers handed back here
keep their pages; the next request takes the smallest free one large enough.

    pool = BufferPool()
    keys = pool.take((layers, rows, heads, columns, head_dim), torch.float32, device)
    ...                                   # use; nothing else may hold a view of it afterwards
    pool.give(keys)                       # its memory serves the next take

Tests: `.venv/bin/pytest tests/test_prefix_cache.py -k pool`.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

HEADROOM = 1.25  # a new buffer is this much larger than asked, so slowly growing requests reuse it
MAX_FREE = 4  # free buffers kept (a chunk holds four at once: padded past and rows, keys and values)


class BufferPool:
    """Free flat buffers by dtype, device and inference mode; `take` a view of one, `give` it
    back when done. Safe from several threads (one lock: two policies on different models decode
    at once, and an unlocked pool handed one buffer to both, so one call sampled other tokens)."""

    def __init__(self, max_free: int = MAX_FREE, drop_smaller: bool = True) -> None:
        self.max_free = max_free
        # a take that nothing free fits drops the smaller free buffers of its kind (a step search
        # asks for ever larger ones); False keeps them for later, smaller requests (the continuous
        # engine's chunks come in many sizes at once)
        self.drop_smaller = drop_smaller
        self._free: list[torch.Tensor] = []  # flat, contiguous
        self._lock = threading.Lock()
        self._engines = 0  # continuous engines running (`serving_engine`)
        self._settings = (max_free, drop_smaller)  # the settings to restore when the last one stops
        self.allocations = 0  # buffers made (not served from the pool), for tests and benchmarks

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` (a view of a pooled buffer when one fits)."""
        numel = math.prod(int(s) for s in shape)
        device = torch.device(device)
        inference = torch.is_inference_mode_enabled()  # an inference tensor cannot be written outside that mode
        with self._lock:
            same_kind = [b for b in self._free if b.dtype == dtype and b.device == device and b.is_inference() == inference]
            fits = [b for b in same_kind if b.numel() >= numel]
            flat = min(fits, key=lambda b: b.numel()) if fits else None
            if flat is not None:
                self._free = [b for b in self._free if b is not flat]
            elif self.drop_smaller:  # requests grow as paths do: a smaller free buffer would only sit there
                self._free = [b for b in self._free if not any(b is small for small in same_kind)]
        if flat is None:
            flat = torch.empty(max(int(numel * HEADROOM), 1), dtype=dtype, device=device)
            with self._lock:
                self.allocations += 1
        return flat[:numel].view(tuple(int(s) for s in shape))

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor from `take`: its whole buffer (the tensor's storage, found from the
        tensor itself since inference-mode views keep no `_base`) becomes free; the largest
        max_free free buffers (in bytes) are kept. Only give what nothing else holds a view of."""
        if tensor.storage_offset() != 0:
            return  # not the start of a buffer
        flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(tensor.untyped_storage())
        with self._lock:
            if any(b.data_ptr() == tensor.data_ptr() for b in self._free):
                return  # given back already
            self._free.append(flat)
            self._free.sort(key=lambda b: -b.numel() * b.element_size())  # the largest in bytes first
            del self._free[self.max_free:]

    def set_max_free(self, max_free: int) -> None:
        """Keep at most max_free free buffers from now on (the largest; the rest are dropped)."""
        with self._lock:
            self.max_free = max_free
            del self._free[max_free:]

    def raise_max_free(self, max_free: int) -> None:
        """Keep at least max_free free buffers from now on (a running engine's cohorts need them)."""
        with self._lock:
            self.max_free = max(self.max_free, max_free)

    @contextmanager
    def serving_engine(self) -> Iterator[None]:
        """While any continuous engine runs (blocks of several engines may overlap in any order):
        keep smaller free buffers too (chunks of many sizes run at once). When the last engine
        stops, the settings from before the first come back and the extra free buffers are dropped
        (one engine restoring its own saved settings undid a second engine's while it still ran)."""
        with self._lock:
            if self._engines == 0:
                self._settings = (self.max_free, self.drop_smaller)
                self.drop_smaller = False
            self._engines += 1
        try:
            yield
        finally:
            with self._lock:
                self._engines -= 1
                if self._engines == 0:
                    self.max_free, self.drop_smaller = self._settings
                    del self._free[self.max_free:]

    def clear(self) -> None:
        """Drop every free buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()
