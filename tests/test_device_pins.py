"""Pins for device-choice and host-copy behaviours that a mutation review found unpinned elsewhere.

No model, no GPU: CUDA is faked by monkeypatching `torch.cuda`, cpuinfo by a temporary file; each
test runs in milliseconds. What is pinned: `resolve_device` refuses a GPU number equal to the
count torch sees (naming the range it does see) and accepts the ones below it; `native_bf16` counts
an AVX-512 BF16 CPU without AMX (Zen 4) as native and any device kind other than cpu / cuda as
not; `host_array` views every float8 dtype as one byte per element (a column copy keeps its shape
and bits) and declines a tensor with the conjugate bit set instead of raising.

Run: `.venv/bin/python -m pytest tests/test_device_pins.py`
"""
from __future__ import annotations

import pytest
import torch

from policies import bf16_support
from policies.bf16_support import native_bf16
from policies.devices import resolve_device
from policies.host_copy import host_array, host_pair, tensor_from

# (not imported from tests/test_bf16_support.py: that module loads transformers, ~4 s)
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nmodel name\t: AMD EPYC\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\nmodel name\t: AMD EPYC 9654\n"
FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, name))


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def native_with_cpuinfo(tmp_path, monkeypatch, text: str, device: str = "cpu") -> bool:
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    monkeypatch.setattr(bf16_support, "CPUINFO", info)
    native_bf16.cache_clear()
    try:
        return native_bf16(device)
    finally:
        native_bf16.cache_clear()


# ---- policies/devices.py --------------------------------------------------------------------

def test_resolve_device_refuses_the_gpu_number_equal_to_the_count(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:1' but torch sees 1 CUDA GPU\(s\): cuda:0\.\.cuda:0"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'cuda:2'"):
        resolve_device("cuda:2")


def test_resolve_device_accepts_the_last_of_several_gpus(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"sees 2 CUDA GPU\(s\): cuda:0\.\.cuda:1"):
        resolve_device("cuda:2")


# ---- policies/bf16_support.py ---------------------------------------------------------------

def test_avx512_bf16_without_amx_is_native(tmp_path, monkeypatch):
    # Zen 4: AVX-512 BF16 but no AMX tiles; bf16 autocast is faster than fp32 there
    assert native_with_cpuinfo(tmp_path, monkeypatch, X86_AVX512_BF16) is True
    assert native_with_cpuinfo(tmp_path, monkeypatch, X86_AVX2) is False


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_devices_other_than_cpu_and_cuda_are_not_native(tmp_path, monkeypatch, device):
    # even where the CPU itself is native, another device kind is not answered by its flags
    assert native_with_cpuinfo(tmp_path, monkeypatch, X86_AVX512_BF16, device) is False


# ---- policies/host_copy.py ------------------------------------------------------------------

@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_column_copies_keep_their_shape_and_bits(dtype):
    tensor = torch.randn(2, 6).to(dtype)
    array = host_array(tensor)
    assert array is not None and array.shape == (2, 6) and array.itemsize == 1
    copied = tensor_from(array[:, 1:3].copy(), dtype)
    assert copied.dtype == dtype and copied.shape == (2, 2)
    assert torch.equal(copied.view(torch.uint8), tensor[:, 1:3].view(torch.uint8))


def test_a_conjugated_tensor_has_no_numpy_view_and_no_error():
    tensor = torch.randn(2, 3, dtype=torch.complex64).conj()
    assert tensor.is_conj()
    assert host_array(tensor) is None
    assert host_pair(torch.zeros(2, 3, dtype=torch.complex64), tensor) is None
