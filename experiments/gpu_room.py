"""Room on a GPU for a scorer's own model beside a vLLM policy. A transformers PRM
(scorer=math_shepherd, qwen_prm, rlhflow_prm: device cuda) or the SPRM's second forward
(scorer=sprm_forward with scorer.device=cuda) loads its weights onto a GPU whose memory the
policy's vLLM engine has already taken policy.engine.gpu_memory_utilization of (0.9 in the GPU
presets): a 7B PRM's ~14 GiB do not fit in the 8 GiB an 80 GiB card has left, and its
`model.to("cuda")` failed with torch's OutOfMemoryError after the policy had loaded (minutes).
`check_room_for_scorer(cfg)` counts the scorer's weights from its folder's safetensors headers
(no tensor is read) plus its KV memory (`scorer.cache_bytes`) and a margin, and raises a
ValueError before anything loads, naming the share that leaves room:

    from experiments.gpu_room import check_room_for_scorer
    check_room_for_scorer(cfg)   # nothing on a machine without CUDA, or with the scorer on another GPU

Tests: `.venv/bin/pytest tests/test_gpu_room.py`.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

GIB = 1024**3
WORKING_MARGIN = 1 * GIB  # activations of a scoring batch, CUDA's own context
ITEM_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_ENGINE_TARGET = "policies.vllm_engine.VLLMEngineConfig"


def safetensors_parameters(path: Path) -> int:
    """Parameters stored in one safetensors file, from its JSON header (the tensors stay unread)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def weight_bytes(folder: Path, dtype: str) -> int | None:
    """Bytes the folder's weights take in dtype (from the safetensors headers; a folder of .bin
    files: their size on disk), or None when the folder holds no weights this can count (a
    missing folder is named by the scorer's loader)."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return sum(safetensors_parameters(path) for path in safetensors) * ITEM_BYTES.get(dtype, 4)
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    return sum(path.stat().st_size for path in pickles) if pickles else None


def gpu_index(device: str) -> int | None:
    """The GPU number of a device name ("cuda" is GPU 0), None for a CPU or a name that is none
    (`policies.devices.resolve_device` names those later)."""
    if not device.startswith("cuda"):
        return None
    _, _, number = device.partition(":")
    return int(number) if number.isdigit() else 0 if not number else None


def room_problem(share: float, total: int, needed: int) -> str | None:
    """Why `needed` bytes do not fit beside an engine that takes share x total bytes of the GPU
    (and which share would leave room), or None when they fit."""
    left = round((1 - share) * total)  # whole bytes: 1 - 0.9 is 0.0999..., which refused exactly 8 GiB of 80
    if needed <= left:
        return None
    fitting = max(total - needed, 0) * 20 // total / 20  # the largest share in steps of 0.05 that leaves room
    advice = (f"set policy.engine.gpu_memory_utilization={fitting:g} (or put the scorer on another GPU, scorer.device=cuda:N)"
              if fitting >= 0.3 else "put the scorer on another GPU (scorer.device=cuda:N)")
    return (f"needs ~{needed / GIB:.1f} GiB, and the policy's vLLM engine takes policy.engine.gpu_memory_utilization="
            f"{share:g} of the GPU's {total / GIB:.0f} GiB, leaving {left / GIB:.1f} GiB: {advice}")


def _total_memory(index: int) -> int | None:
    import torch  # not at import time (config checks, --help)

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None  # no GPU here, or one torch cannot see (resolve_device names it when the scorer loads)
    return int(torch.cuda.get_device_properties(index).total_memory)


def _local_scorer(cfg: DictConfig) -> DictConfig | None:
    """The scorer node when the policy is a vLLM engine and the scorer loads a model of its own
    on a device (`device` and `path` keys), else None (vLLM scorers: `check_engine_shares`)."""
    engine, scorer = OmegaConf.select(cfg, "policy.engine"), cfg.get("scorer")
    if not (isinstance(engine, DictConfig) and engine.get("_target_") == VLLM_ENGINE_TARGET and isinstance(scorer, DictConfig)):
        return None
    return scorer if isinstance(scorer.get("device"), str) and isinstance(scorer.get("path"), str) else None


def cpu_scorer_note(cfg: DictConfig, gpu_here: bool) -> str | None:
    """A note when a vLLM policy runs on this machine's GPU and the scorer's model on its CPU
    (scorer=sprm_forward's default device): slow, and a large model's weights in host memory."""
    scorer = _local_scorer(cfg)
    if not (gpu_here and scorer is not None and scorer.device == "cpu"):
        return None
    return (f"note: the policy runs on the GPU and the scorer's model (scorer.path={scorer.path}) on the CPU "
            f"(scorer.device=cpu, dtype {scorer.get('dtype', 'float32')}): scorer.device=cuda scorer.dtype=bfloat16 "
            "puts it beside the policy")


def check_room_for_scorer(cfg: DictConfig, total_memory: Callable[[int], int | None] | None = None) -> None:
    """ValueError before anything loads when a scorer that loads a model on a GPU the vLLM policy
    runs on (GPUs 0 .. tensor_parallel_size - 1) cannot fit in what the engine's share leaves
    (module docstring). total_memory(index) -> bytes or None (no such GPU here: nothing checked);
    None: torch's count of the GPU's memory."""
    scorer = _local_scorer(cfg)
    if scorer is None:
        return
    engine = cfg.policy.engine
    index = gpu_index(scorer.device)
    if index is None or index >= int(engine.get("tensor_parallel_size") or 1):
        return  # on the CPU, or on a GPU the policy does not use
    total = (total_memory or _total_memory)(index)
    weights = weight_bytes(Path(scorer.path), str(scorer.get("dtype", "float32")))
    if total is None or weights is None:
        return
    needed = weights + int(scorer.get("cache_bytes") or 0) + WORKING_MARGIN
    problem = room_problem(float(engine.get("gpu_memory_utilization", 0.9)), total, needed)
    if problem is not None:
        raise ValueError(f"scorer.device={scorer.device} beside the vLLM policy: the scorer's model at "
                         f"scorer.path={scorer.path} ({weights / GIB:.1f} GiB of weights in {scorer.get('dtype', 'float32')}) "
                         f"{problem}")
