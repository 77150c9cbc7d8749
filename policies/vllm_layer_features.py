"""Any hidden layer through vLLM's pooling runner: an out-of-tree model class, registered with
vLLM's `ModelRegistry`, that runs only the first k decoder layers and returns their output
before the final norm (transformers' `hidden_states[k]`), so the SPRM head can read the
reference's layer -2 from vLLM.

Usage (what `policies.vllm_engine.build_llm(config, runner="pooling", feature_layer=-2)` does):
    overrides = feature_overrides(hf_config, feature_layer=-2)   # None for the last layer (-1)
    llm = LLM(path, runner="pooling", convert="embed", pooler_config=..., hf_overrides=overrides)

Why it works: vLLM's Llama / Qwen2 / Qwen3 / Mistral decoders keep the residual stream as
(hidden, residual) with a fused add-norm, loop over `islice(self.layers, start_layer, end_layer)`
and end with `hidden, _ = self.norm(hidden, residual)`. Setting `end_layer = k` stops the loop
after k layers, and a norm replaced by `hidden + residual` returns the un-normed residual stream,
which is exactly transformers' `hidden_states[k]` (k = 0: the embeddings). The skipped layers
and the norm keep their parameters, so the checkpoint loads unchanged; they simply never run
(less work than the full model). The class is selected with
`hf_overrides={"architectures": [name], "treesearch_feature_states": k}`.

Limits: only the architectures in SUPPORTED (their forward matches the above); no pipeline
parallelism; the registration is in-process, so the engine must run in this process
(`VLLMEngineConfig.multiprocessing=False`, the default) or a vLLM plugin must register it.

Tests: `.venv/bin/pytest tests/test_vllm_scorer.py` (layers -1, -2 and the embeddings against
transformers' hidden states through the SPRM scores).
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

FEATURE_STATES_KEY = "treesearch_feature_states"
# architecture in config.json -> (vLLM module, class) whose decoder forward fits the docstring
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}
_REGISTERED: dict[str, str] = {}  # base architecture -> registered name (once per process)


def hidden_state_index(feature_layer: int, num_hidden_layers: int) -> int:
    """The non-negative index k into transformers' hidden_states (L + 1 entries: embeddings, then
    each decoder layer's output, the last one after the final norm) of feature_layer."""
    num_states = num_hidden_layers + 1
    is_int = isinstance(feature_layer, int) and not isinstance(feature_layer, bool)
    if not is_int or not -num_states <= feature_layer < num_states:
        raise ValueError(
            f"feature_layer={feature_layer!r} must index the {num_states} hidden states "
            f"(an integer in [{-num_states}, {num_states - 1}])"
        )
    return feature_layer % num_states


def feature_overrides(hf_config: Any, feature_layer: int) -> dict[str, Any] | None:
    """vLLM `hf_overrides` that make the pooling runner return hidden_states[feature_layer] of a
    model with this transformers config; None for the last state (vLLM's own output)."""
    num_layers = int(hf_config.num_hidden_layers)
    k = hidden_state_index(feature_layer, num_layers)
    if k == num_layers:
        return None
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if len(architectures) != 1 or architectures[0] not in SUPPORTED:
        raise ValueError(
            f"feature_layer={feature_layer} through vLLM needs one of the architectures "
            f"{sorted(SUPPORTED)}, the checkpoint has {architectures}; only feature_layer=-1 "
            "(the final normed state) works for any model"
        )
    return {"architectures": [register_feature_model(architectures[0])], FEATURE_STATES_KEY: k}


def register_feature_model(base_architecture: str) -> str:
    """Register (once per process) the feature-state variant of a supported architecture with
    vLLM's ModelRegistry; returns its architecture name."""
    if base_architecture in _REGISTERED:
        return _REGISTERED[base_architecture]
    from vllm import ModelRegistry

    module, class_name = SUPPORTED[base_architecture]
    base = getattr(importlib.import_module(module), class_name)
    name = f"TreesearchFeatures{base_architecture}"
    ModelRegistry.register_model(name, _feature_class(base, name))
    _REGISTERED[base_architecture] = name
    return name


class ResidualSum(nn.Module):
    """Stands in for the final RMSNorm: returns the residual stream hidden + residual un-normed.
    Keeps a `weight` parameter of the norm's shape so the checkpoint's norm weight still loads."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (hidden if residual is None else hidden + residual), residual


def _feature_class(base: type, name: str) -> type:
    """A subclass of base that stops after config.treesearch_feature_states decoder layers and
    returns their output before the final norm."""

    class FeatureStates(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = vllm_config.model_config.hf_config
            if vllm_config.parallel_config.pipeline_parallel_size != 1:
                raise ValueError(f"{name} does not support pipeline parallelism")
            self.model.end_layer = self.model.start_layer + int(getattr(config, FEATURE_STATES_KEY))
            self.model.norm = ResidualSum(int(config.hidden_size))

    FeatureStates.__name__ = FeatureStates.__qualname__ = name
    return FeatureStates
