"""The SPRM head of the reflective model (MetaStone-S1 / XBai-o4): a two-layer classifier on one
of the policy's hidden states, and its `score_module.pt` file beside a transformers model folder.

Shape (exactly the reference's, so its checkpoints load unchanged):
    nn.Sequential(Linear(C, 2C), ReLU(), Dropout(0.5), Linear(2C, 1))
    state dict: 0.weight [2C, C], 0.bias [2C], 3.weight [1, 2C], 3.bias [1]
    parameters: 2C^2 + 4C + 1 (C = 1536: 4,724,737; C = 5120: 52,449,281)

Usage:
    head = build_sprm_head(hidden_size=256, seed=0)
    logits = sprm_logits(head, features)           # features [..., C] -> logits [...] float32
    save_score_module(head, "runs/tiny")           # runs/tiny/score_module.pt (torch.save of the state dict)
    head = load_score_module("runs/tiny")          # C read from the file, or checked against hidden_size=

`sprm_logits` is the inference path: it skips the dropout whatever `head.training` says, so a
policy that scores while a training loop holds the head in train mode still reads clean scores.
Training calls `head(features)` directly (dropout on, as the reference trains it).

Tests: `.venv/bin/pytest tests/test_sprm.py`.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from policies.checkpoint import load_torch_file

SCORE_MODULE_FILE = "score_module.pt"
DROPOUT = 0.5


def build_sprm_head(hidden_size: int, seed: int | None = None) -> nn.Sequential:
    """A freshly initialised head (PyTorch's default Linear init, as the reference), float32.
    With a seed the weights are reproducible and the caller's RNG is left untouched."""
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size!r} must be an integer >= 1")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Dropout(p=DROPOUT),
            nn.Linear(2 * hidden_size, 1),
        )


def sprm_head_num_parameters(hidden_size: int) -> int:
    """2C*C + 2C (first layer) + 2C + 1 (second layer)."""
    return 2 * hidden_size * hidden_size + 4 * hidden_size + 1


def expected_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of a head on hidden size C."""
    c = hidden_size
    return {"0.weight": (2 * c, c), "0.bias": (2 * c,), "3.weight": (1, 2 * c), "3.bias": (1,)}


def head_hidden_size(head: nn.Sequential) -> int:
    """C of a head (its first layer's input width)."""
    return int(head[0].in_features)


def sprm_logits(head: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """Head logits at inference (no dropout): features [..., C] -> logits [...] float32.
    Features are cast to the head's dtype first (a bf16 backbone with a float32 head works)."""
    first, last = head[0], head[3]
    x = features.to(first.weight.dtype)  # [..., C]
    hidden = F.relu(F.linear(x, first.weight, first.bias))  # [..., 2C]
    return F.linear(hidden, last.weight, last.bias).squeeze(-1).float()  # [...]


def save_score_module(head: nn.Sequential, model_dir: str | Path) -> Path:
    """torch.save(head.state_dict()) as model_dir/score_module.pt (the reference's format),
    written to a temporary file and renamed, so a reader never sees half a file. Returns the path."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / SCORE_MODULE_FILE
    state = {key: value.detach().cpu() for key, value in head.state_dict().items()}
    # not tempfile.mkstemp (mode 0600): torch.save creates the file with the umask's mode
    tmp = model_dir / f".{SCORE_MODULE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_state_dict(state: Mapping[str, torch.Tensor], hidden_size: int, source: str = "state dict") -> None:
    """Raise ValueError naming a missing or unexpected key, or a key whose shape differs from
    the head on hidden_size (with the expected and the found shape)."""
    expected = expected_shapes(hidden_size)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{source} is not an SPRM head: missing keys {missing}, unexpected keys {unexpected} "
            f"(expected {sorted(expected)})"
        )
    for key, shape in expected.items():
        found = tuple(state[key].shape)
        if found != shape:
            raise ValueError(
                f"{source}: {key} has shape {list(found)}, expected {list(shape)} for hidden size {hidden_size}"
            )


def head_file(model_dir: str | Path) -> Path:
    """model_dir's score_module.pt, or FileNotFoundError naming it (before or at the load)."""
    path = Path(model_dir) / SCORE_MODULE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no SPRM head file {path} ({SCORE_MODULE_FILE} beside the model)")
    return path


def load_score_module(
    model_dir: str | Path, hidden_size: int | None = None, map_location: str | torch.device = "cpu"
) -> nn.Sequential:
    """The head saved in model_dir/score_module.pt, in eval mode, on map_location (the LM's device:
    a head left on the CPU beside a GPU model failed at its first step), float32 unless the file
    holds another dtype. hidden_size=None reads C from the file; a given one must match it. A missing
    file is a FileNotFoundError, a truncated or corrupted one a DamagedCheckpointError (a
    ValueError) naming it."""
    path = head_file(model_dir)
    state = load_torch_file(path, map_location=map_location, weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    first = state.get("0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        check_state_dict(state, 1, str(path))  # raises naming the keys
    if hidden_size is not None and int(first.shape[1]) != hidden_size:  # an intact file of another model
        raise ValueError(f"{path} is the SPRM head of a model with hidden size {int(first.shape[1])}, not of this "
                         f"model (hidden size {hidden_size}): use the head saved with this model")
    hidden_size = int(first.shape[1])
    check_state_dict(state, hidden_size, str(path))
    head = build_sprm_head(hidden_size)
    head.load_state_dict(state, assign=True)  # the loaded tensors themselves: on map_location, in their dtype
    return head.eval()
