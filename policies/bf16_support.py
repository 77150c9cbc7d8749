"""Whether a device multiplies bfloat16 natively, so bf16 autocast speeds work up instead of
slowing it down: the default of the project's bf16-where-fast switches (`SFTConfig.bf16`,
`QuickEvalConfig.bf16`, `experiments.backbone_tuning.BackboneTuneConfig.ref_bf16`, and the joint
trainer's KL reference forward: `ref_bf16: null` in `experiments/conf/train_loss/*.yaml`, i.e.
`JointLossConfig(ref_bf16=None)`). `JointLossConfig`'s own defaults are off (`bf16=False`,
`ref_bf16=False`): the policy's joint-step forward runs in bf16 only when asked.

On a CPU without bf16 instructions, torch runs a bf16 matmul through a slow fallback. Measured
2026-12-03 on an AMD EPYC with AVX2 only: a 512 x 512 matmul (1 thread) took 213 ms in bf16
against 3.8 ms in fp32, 56x slower, so the tiny policy's SFT with bf16 autocast ran for over
half an hour without finishing its first 500 steps. On a CPU with AVX-512 BF16 the same autocast
was ~1.8x faster than fp32 (DESIGN.md).

    from policies.bf16_support import native_bf16
    native_bf16()            # True with AVX-512 BF16, AMX or Arm's BF16 (cpuinfo flags); CUDA: the GPU's own answer
    native_bf16("cuda")

Tests: `.venv/bin/pytest tests/test_bf16_support.py`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# cpuinfo flags of bf16 matmul instructions: x86 AVX-512 BF16 and AMX-BF16, Arm's BF16 ("Features")
BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(text: str) -> frozenset[str]:
    """The feature flags in /proc/cpuinfo text (x86 "flags : ...", Arm "Features : ...")."""
    flags: set[str] = set()
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.lru_cache(maxsize=None)
def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:N") has bf16 matmul instructions. A CPU whose flags
    cannot be read (no /proc/cpuinfo, e.g. macOS) counts as without: fp32 is then never the slow
    choice."""
    parsed = torch.device(device)
    if parsed.type == "cuda":  # compute capability 8.0 (Ampere) on: T4 / V100 only emulate bf16
        if not torch.cuda.is_available():
            return False
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    kind = parsed.type
    if kind != "cpu":
        return False
    try:
        return bool(cpu_flags(CPUINFO.read_text()) & BF16_FLAGS)
    except OSError:
        return False
