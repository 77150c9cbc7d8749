"""Keep large freed blocks in the process instead of returning them to the OS (glibc malloc).

Why: decoding allocates the same large temporaries at every token (the logits [B, V], their
softmax and CDF: 25 MB each at 128 rows of SmolLM2's 49k-token vocabulary). glibc serves a block
above its mmap threshold with a fresh mmap and unmaps it on free, so every token pays the page
faults of touching that memory anew (seen as system time, half the CPU time of a SmolLM2 decode
on this machine). Raising the mmap threshold and the trim threshold makes freed blocks stay in
the heap and be reused, as jemalloc / tcmalloc do (PyTorch's CPU performance guide recommends
those; vLLM's CPU backend preloads tcmalloc). The cost: the process keeps up to its peak of
freed memory mapped, per malloc arena: every thread that allocates gets an arena, so threads
started again and again (the continuous engine attached per chunk of a search) grew RSS by
~100-480 MiB over 120 searches until `release_freed_memory` (malloc_trim) ran as each engine stops.

    from policies.allocator import keep_freed_memory, release_freed_memory
    keep_freed_memory()      # idempotent; TransformersPolicy calls it
    release_freed_memory()   # give the free memory of every arena back (after a burst of threads)

Off when TREESEARCH_MALLOC_TUNING=0, and a no-op where glibc is not the allocator (macOS,
musl): the function then returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (above any per-token temporary of a model run on CPU);
# glibc versions that cap the threshold at 32 MiB (64-bit) refuse that, and get the cap.
MMAP_THRESHOLDS = (1 << 30, 32 * 1024 * 1024)
TRIM_THRESHOLD = 1 << 30
ENV_SWITCH = "TREESEARCH_MALLOC_TUNING"


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when both took effect."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mmap_set = any(mallopt(_M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS)
    return mmap_set and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """glibc's malloc_trim(0): the free memory of every arena back to the OS (a few ms); True
    when some was released, False when none was or glibc is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
