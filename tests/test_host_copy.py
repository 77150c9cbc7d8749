"""The numpy-view copies of the decode loop's per-row KV work (`policies.host_copy`): the bits
arrive unchanged in every dtype, including those numpy lacks (bfloat16), and the KV copies that use
them (copy-out, `pad_past`, moving rows) give what torch's copies give."""
from __future__ import annotations

import pytest
import torch

from policies.host_copy import host_array, host_pair, tensor_from
from policies.prefix_cache import PrefixKV, pad_past
from policies.slot_cache import SlotCache

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_array_shares_memory_and_round_trips_bits(dtype):
    tensor = torch.randn(3, 5).to(dtype)
    array = host_array(tensor)
    assert array is not None and array.shape == (3, 5)
    array[1, 2] = array[0, 0]  # a write through the view lands in the tensor
    assert tensor[1, 2].item() == tensor[0, 0].item()
    copied = tensor_from(array[:, 1:4].copy(), dtype)
    assert copied.dtype == dtype
    assert torch.equal(copied, tensor[:, 1:4])


def test_host_array_declines_tensors_torch_must_copy():
    assert host_array(torch.zeros(2, requires_grad=True)) is None
    assert host_pair(torch.zeros(2), torch.zeros(2, requires_grad=True)) is None
    assert host_pair(torch.zeros(2), torch.zeros(2)) is not None


def _random_cache(dtype: torch.dtype, rows: int = 4, length: int = 5) -> SlotCache:
    keys, values = (torch.randn(2, rows, 3, length + 2, 4).to(dtype) for _ in range(2))  # [L, B, H, capacity, D]
    return SlotCache(keys, values, length)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_copy_out_matches_the_buffers(dtype):
    cache = _random_cache(dtype)
    kv = cache.row_tail(2, start=1)
    assert kv.keys.dtype == dtype and kv.keys.shape == (2, 3, 4, 4)
    assert torch.equal(kv.keys, cache._buffers.keys[:, 2, :, 1:5])
    assert torch.equal(kv.values, cache._buffers.values[:, 2, :, 1:5])
    kv.keys.zero_()  # a copy: the cache is untouched
    assert not torch.equal(kv.keys, cache._buffers.keys[:, 2, :, 1:5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_move_rows_copies_every_layer_of_the_moved_rows(dtype):
    cache = _random_cache(dtype)
    before = cache._buffers.keys.clone(), cache._buffers.values.clone()
    cache.move_rows(torch.tensor([0, 1]), torch.tensor([3, 2]), rows=2)
    for now, then in zip((cache._buffers.keys, cache._buffers.values), before):
        assert torch.equal(now[:, 0, :, :5], then[:, 3, :, :5])
        assert torch.equal(now[:, 1, :, :5], then[:, 2, :, :5])
    assert cache.layers[0].keys.shape[0] == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_past_copies_chains_bit_for_bit(dtype):
    def segment(length, parent=None):
        return PrefixKV(torch.randn(2, 3, length, 4).to(dtype), torch.randn(2, 3, length, 4).to(dtype), parent)

    root = segment(3)
    chained, flat = segment(2, root), segment(4)
    keys, values, mask = pad_past([chained, flat, None], "cpu", extra_columns=1)
    assert keys.dtype == dtype and keys.shape == (2, 3, 3, 6, 4)
    assert torch.equal(keys[:, 0, :, :5], torch.cat([root.keys, chained.keys], dim=2))
    assert torch.equal(values[:, 0, :, :5], torch.cat([root.values, chained.values], dim=2))
    assert torch.equal(keys[:, 1, :, 1:5], flat.keys) and torch.equal(keys[:, 1, :, :1], torch.zeros_like(keys[:, 1, :, :1]))
    assert not values[:, 2, :, :5].any()
    assert mask.tolist() == [[1] * 5, [0, 1, 1, 1, 1], [0] * 5]


def test_pad_past_refuses_prefixes_of_mixed_dtypes():
    kv32 = PrefixKV(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    kv16 = PrefixKV(torch.zeros(1, 1, 2, 2, dtype=torch.float16), torch.zeros(1, 1, 2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="one dtype"):
        pad_past([kv32, kv16], "cpu")


def test_the_torch_path_gives_the_same_copies(monkeypatch):
    """Where numpy cannot view a tensor (CUDA, exotic dtypes) the same functions copy with torch."""
    import policies.prefix_cache as prefix_cache
    import policies.slot_cache as slot_cache

    def copies():
        torch.manual_seed(0)
        cache = _random_cache(torch.float32)
        kv = cache.row_tail(1, start=2)
        cache.move_rows(torch.tensor([0]), torch.tensor([3]), rows=3)
        root = PrefixKV(torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4))
        padded = pad_past([PrefixKV(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4), root), None], "cpu")
        return [kv.keys, kv.values, cache._buffers.keys, cache._buffers.values, *padded]

    through_numpy = copies()
    monkeypatch.setattr(prefix_cache, "host_pair", lambda keys, values: None)
    monkeypatch.setattr(slot_cache, "host_pair", lambda keys, values: None)
    through_torch = copies()
    assert len(through_numpy) == len(through_torch) == 7
    for a, b in zip(through_numpy, through_torch):
        assert torch.equal(a, b)
