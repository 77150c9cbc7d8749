"""Small copies between CPU tensors through numpy views of the same memory.

Why: the decode loop copies one row's KV (a few KB to a few hundred KB) thousands of times in a
step-level search: a finished row's new columns out to the prefix cache
(`SlotCache.row_kv_span`), cached prefixes into the batch (`prefix_cache.pad_past`), live rows
into the slots of finished ones (`SlotCache.move_rows`). At that size the copy itself is cheap and
each torch op's dispatch is not: ~2-4 us per slice view, `clone` or `copy_` on this machine's
CPU, ~1 us for numpy's. Measured (`python -m experiments.bench_engine_overhead`, tiny policy, a
row's 7 new columns of 4 layers): its keys and values copied out as a `PrefixKV` in 20.2 us with
torch, 7.7 us through numpy.

Tensors off the CPU (CUDA) have no numpy view: `host_array` returns None and callers copy with
torch as before. Dtypes numpy lacks (bfloat16, float8) are viewed as integers of their width:
a copy moves bits, never converts.

    keys = host_array(buffer)                     # numpy view of a CPU tensor, or None
    if keys is not None:
        row = tensor_from(keys[:, 3, :, 0:7].copy(), buffer.dtype)   # a torch tensor again
    pair = host_pair(keys_buffer, values_buffer)  # both views, or None if either has none

Tests: `.venv/bin/python -m pytest tests/test_host_copy.py`.
"""
from __future__ import annotations

import numpy as np
import torch

# torch dtypes numpy has no equivalent of -> the integer dtype of the same width their bits are viewed as
_BITS_AS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _BITS_AS[getattr(torch, _name)] = torch.uint8


def host_array(tensor: torch.Tensor) -> np.ndarray | None:
    """A numpy view sharing `tensor`'s memory (bits viewed as same-width integers for dtypes
    numpy lacks), or None when the tensor is not on the CPU or numpy cannot view it (complex
    halves, quantised dtypes: callers then copy with torch)."""
    if tensor.device.type != "cpu" or tensor.requires_grad:
        return None
    bits = _BITS_AS.get(tensor.dtype)
    try:
        return (tensor if bits is None else tensor.view(bits)).numpy()
    except (TypeError, RuntimeError):
        return None


def tensor_from(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The torch tensor (same memory) of an array made from a `host_array` of a `dtype` tensor."""
    tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == dtype else tensor.view(dtype)


def host_pair(keys: torch.Tensor, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """`host_array` of both a keys and a values tensor, or None when either has no numpy view."""
    pair = host_array(keys), host_array(values)
    return None if pair[0] is None or pair[1] is None else pair
