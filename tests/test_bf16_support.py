"""bf16 autocast only where the device multiplies bf16 natively (policies/bf16_support.py)."""
from __future__ import annotations

import pytest
import torch

from experiments.backbone_tuning import BackboneTuneConfig
from experiments.quick_eval import QuickEvalConfig
from policies import bf16_support
from policies.bf16_support import cpu_flags, native_bf16
from policies.joint_step import JointLossConfig, reference_bf16
from policies.sft import SFTConfig

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nmodel name\t: AMD EPYC\n"
X86_AMX = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags_read_x86_and_arm_lines():
    assert cpu_flags(X86_AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert "amx_bf16" in cpu_flags(X86_AMX)
    assert "bf16" in cpu_flags(ARM_BF16)
    assert cpu_flags("model name\t: flags are not here\n") == frozenset()


@pytest.mark.parametrize("text, expected", [(X86_AVX2, False), (X86_AMX, True), (ARM_BF16, True), ("", False)])
def test_native_bf16_follows_the_cpu_flags(tmp_path, monkeypatch, text, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    monkeypatch.setattr(bf16_support, "CPUINFO", info)
    native_bf16.cache_clear()
    try:
        assert native_bf16("cpu") is expected
    finally:
        native_bf16.cache_clear()


def test_a_gpu_that_only_emulates_bf16_is_not_native(monkeypatch):
    # torch.cuda.is_bf16_supported() counts emulation (T4, V100: compute capability 7.x) as support,
    # so the KL reference ran in bf16 where it is slow; and the current device was asked, not cuda:N
    capabilities = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    native_bf16.cache_clear()
    try:
        assert [native_bf16(device) for device in ("cuda", "cuda:0", "cuda:1")] == [False, False, True]
    finally:
        native_bf16.cache_clear()


def test_unreadable_cpuinfo_means_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(bf16_support, "CPUINFO", tmp_path / "missing")
    native_bf16.cache_clear()
    try:
        assert native_bf16() is False
    finally:
        native_bf16.cache_clear()


def test_the_bf16_switches_default_to_the_machine():
    here = native_bf16()
    assert SFTConfig().bf16 is here
    assert QuickEvalConfig().bf16 is here
    assert BackboneTuneConfig().ref_bf16 is here
    assert SFTConfig(bf16=not here).bf16 is (not here)  # an explicit choice is kept


def test_reference_bf16_none_asks_the_device():
    cpu = torch.device("cpu")
    assert reference_bf16(JointLossConfig(ref_bf16=None), cpu) is native_bf16("cpu")
    assert reference_bf16(JointLossConfig(ref_bf16=True), cpu) is True
    assert reference_bf16(JointLossConfig(ref_bf16=False), cpu) is False
