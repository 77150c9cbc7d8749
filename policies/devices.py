"""Which device a policy's model runs on: `resolve_device("cuda")` checks that the device exists
here before any weights move, so a run asked for a GPU it cannot see fails at once, naming it.

    from policies.devices import resolve_device
    device = resolve_device("cuda:0")        # torch.device("cuda:0"), or ValueError saying why not

`policies.checkpoint.load_checkpoint(..., device=)` calls it, so every loader on top of it
(`ReflectiveModel`, `TransformersPolicy`, `SPRMScorer`, the services) takes a device the same way.
Hydra: `+policy.device=cuda` on the in-process presets (`experiments/conf/policy/tiny.yaml`,
`tiny_sprm.yaml`, `smollm2.yaml`); the vLLM presets place the model themselves.

Tests: `.venv/bin/pytest tests/test_cuda_backend.py`.
"""
from __future__ import annotations

import torch

KINDS: tuple[str, ...] = ("cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """torch.device(device) once it is usable here: "cpu", "cuda" or "cuda:N" with a CUDA GPU
    number N visible to torch. ValueError names the device and why it cannot be used."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device name ({', '.join(KINDS)}, cuda:N)") from error
    if resolved.type not in KINDS:
        raise ValueError(f"device={device!r}: the transformers backend runs on {' or '.join(KINDS)}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but torch {torch.__version__} sees no CUDA GPU "
                "(torch.cuda.is_available() is False); run it on the CPU (cpu) or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={device!r} but torch sees {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    return resolved
