"""One hidden layer's states from a forward, without `output_hidden_states=True`, which keeps every
layer's states [B, T, C] until the forward returns: for an inference forward over long paths that
is (layers + 1) x the one layer a SPRM head reads (a reviewer measured 45 MB more peak memory per
extra layer of a tiny model on 16 paths of 2775 tokens; a 7B model's 29 states of 16 such paths
would be ~21 GB in float32).

A forward hook on the module whose output is `hidden_states[k]` keeps that one tensor:
k = 0 the input embeddings, 0 < k < L the output of decoder layer k - 1, k = L the final norm's
(transformers' layout for its decoder models: `get_decoder()` with `.layers` and `.norm`). The
first use on a model checks the hook against `output_hidden_states` on a two-token input, and a
model of another layout, or one that answers differently, keeps the plain way (`tap_or_none`).
Training forwards keep the plain way too: their layers' outputs stay alive for the backward
anyway, so the tuple costs nothing there.
The hook sees every forward of its module while the block runs, so a forward on a model another
thread may run too holds that model's `policies.model_lock.model_lock`, as every forward of a
shared model here does (the decode loop's prefill, `SPRMScorer`).

    tap = tap_or_none(lm, feature_layer)          # None: ask for hidden states as before
    with tap:                                     # a FeatureTap
        out = lm(input_ids=ids, use_cache=False)
    tap.states                                    # [B, T, C], hidden_states[feature_layer]

Tests: `.venv/bin/pytest tests/test_sprm.py -k tap`.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

# per model: {normalised layer: whether the hook gives what output_hidden_states gives}
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, dict[int, bool]]" = weakref.WeakKeyDictionary()


def tapped_module(lm: Any, layer: int) -> tuple[nn.Module, int] | None:
    """(the module whose output is `hidden_states[layer]` of a transformers decoder LM, layer as an
    index 0..L), or None when the model does not have that layout."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        return None
    count = len(layers)
    index = layer + count + 1 if layer < 0 else layer
    if not 0 <= index <= count:
        return None
    if index == 0:
        return lm.get_input_embeddings(), index
    return (norm if index == count else layers[index - 1]), index


class FeatureTap:
    """Keeps the output of one module during a `with` block (module docstring). states: the last
    forward's [B, T, C] (None before one)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.states = module, None
        self._handle: Any = None

    def __enter__(self) -> "FeatureTap":
        self.states = None
        self._handle = self.module.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.states = output[0] if isinstance(output, tuple) else output


def tap_or_none(lm: Any, layer: int) -> FeatureTap | None:
    """A FeatureTap on hidden_states[layer] for an inference forward of lm (no grad, eval mode),
    when the hook was checked to give what output_hidden_states gives on this model; else None."""
    if torch.is_grad_enabled() or getattr(lm, "training", False):
        return None
    found = tapped_module(lm, layer)
    if found is None:
        return None
    module, index = found
    checked = _CHECKED.setdefault(lm, {})
    if index not in checked:
        checked[index] = _hook_matches(lm, module, index)
    return FeatureTap(module) if checked[index] else None


@torch.inference_mode()
def _hook_matches(lm: Any, module: nn.Module, index: int) -> bool:
    """Whether the hook on module gives hidden_states[index] on a two-token input."""
    device = next(lm.parameters()).device
    ids = torch.tensor([[1, 2]], dtype=torch.long, device=device)
    try:
        with FeatureTap(module) as tap:
            out = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
        expected = out.hidden_states[index]
    except Exception:  # a model that cannot run this probe keeps the plain way
        return False
    return isinstance(tap.states, torch.Tensor) and tap.states.shape == expected.shape and torch.equal(tap.states, expected)
