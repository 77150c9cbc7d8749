"""`ReflectiveModel`: the reflective generative form of MetaStone-S1 / XBai-o4 in one object: a
transformers causal LM, the SPRM head (`scorers.sprm_head`) and the index of the hidden layer the
head reads (default -2: the output of the second-to-last decoder layer, before the final norm).

Usage:
    model = ReflectiveModel(lm, build_sprm_head(lm.config.hidden_size, seed=0))
    model.save_pretrained("runs/tiny-sprm", tokenizer)     # transformers folder + score_module.pt
    model, tokenizer = ReflectiveModel.from_pretrained("runs/tiny-sprm")
    out = model(input_ids, attention_mask)                 # .logits, .features [B, L, C]
    probs = model.step_scores(out.features[0, positions])  # [K] in [0, 1]
    policy = TransformersPolicy.from_reflective(model, tokenizer, sampling, prompt_fn)

As a policy's step head (`policies.decode_loop.StepHead`): the decode loop asks the LM for its
hidden states, and at each sampled step separator applies `step_scores` to the feature-layer state
of the position that sampled it, so scoring costs no extra forward pass.

On disk: the folder is an ordinary transformers checkpoint (`policies.checkpoint`) plus
`score_module.pt`, the reference's layout, so a MetaStone-S1 / XBai-o4 folder loads as is. The
feature layer is not part of the reference's format; `save_pretrained` writes it to
`sprm.json` and a folder without that file reads -2 (the reference's layer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policies.checkpoint import DamagedCheckpointError, atomic_directory, load_checkpoint, reading, write_checkpoint_files
from policies.feature_tap import tap_or_none
from policies.model_folder import check_model_folder
from scorers.sprm_head import (
    build_sprm_head, head_file, head_hidden_size, load_score_module, save_score_module, sprm_logits,
)

SPRM_CONFIG_FILE = "sprm.json"
DEFAULT_FEATURE_LAYER = -2


@dataclass(frozen=True)
class ReflectiveOutput:
    """logits: [B, L', V] (L' = L, or logits_to_keep); features: [B, L, C], the feature layer."""

    logits: torch.Tensor
    features: torch.Tensor


class ReflectiveModel(nn.Module):
    """A causal LM with an SPRM head on one of its hidden layers (see the module docstring).

    lm: a transformers causal LM (`config.hidden_size`, `config.num_hidden_layers`, accepts
        `output_hidden_states=True`).
    head: the SPRM head (`nn.Sequential` of the reference's shape); None builds a fresh one.
    feature_layer: index into `hidden_states` (num_hidden_layers + 1 entries: the embeddings, then
        each decoder layer's output, the last after the final norm); -2 as the reference.
    """

    def __init__(self, lm: Any, head: nn.Sequential | None = None, feature_layer: int = DEFAULT_FEATURE_LAYER) -> None:
        super().__init__()
        hidden_size = int(lm.config.hidden_size)
        head = head if head is not None else build_sprm_head(hidden_size)
        if head_hidden_size(head) != hidden_size:
            raise ValueError(f"the head reads {head_hidden_size(head)} features, the LM's hidden size is {hidden_size}")
        check_feature_layer(feature_layer, int(lm.config.num_hidden_layers) + 1)
        self.lm, self.head, self.feature_layer = lm, head, feature_layer

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ReflectiveOutput:
        """One LM forward with hidden states: (logits, feature-layer states [B, L, C]).
        logits_to_keep=1 skips the full [B, L, V] logits when only features are wanted. An
        inference forward keeps the feature layer's states alone (`policies.feature_tap`), a
        training one asks for every layer's (kept for the backward anyway)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, logits_to_keep=logits_to_keep)
        tap = tap_or_none(self.lm, self.feature_layer)
        if tap is None:
            out = self.lm(**inputs, output_hidden_states=True)
            return ReflectiveOutput(out.logits, out.hidden_states[self.feature_layer])
        with tap:
            out = self.lm(**inputs)
        return ReflectiveOutput(out.logits, tap.states)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Training path: the head in its current mode (dropout on in train mode): [..., C] -> [...]."""
        return self.head(features.to(self.head[0].weight.dtype)).squeeze(-1)

    def step_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Inference path (`StepHead`): sigmoid of the head without dropout, [N, C] -> [N] float32."""
        return torch.sigmoid(sprm_logits(self.head, features))

    def save_pretrained(self, out_dir: str | Path, tokenizer: Any) -> Path:
        """Write LM + tokenizer (transformers folder), score_module.pt and sprm.json atomically."""
        with atomic_directory(out_dir) as tmp:
            write_checkpoint_files(self.lm, tokenizer, tmp)
            save_score_module(self.head, tmp)
            (tmp / SPRM_CONFIG_FILE).write_text(json.dumps({"feature_layer": self.feature_layer}) + "\n")
        return Path(out_dir)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | str = torch.float32, feature_layer: int | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple["ReflectiveModel", Any]:
        """(model in eval mode, tokenizer) from a folder of `save_pretrained` or of the reference.
        FileNotFoundError names a missing file (score_module.pt included), DamagedCheckpointError a
        truncated or corrupted one (model.safetensors, score_module.pt), ValueError a head of
        another hidden size. The head keeps the dtype it was saved in; feature_layer: the layer to
        read, None for sprm.json's (-2 without it; another than sprm.json's is a ValueError,
        `layer_to_read`); device: where both go (`load_checkpoint`)."""
        directory = Path(directory)
        lm, tokenizer = load_checkpoint(directory, dtype, device)
        # names a truncated file itself (DamagedCheckpointError), a head of another model (ValueError)
        head = load_score_module(directory, int(lm.config.hidden_size), map_location=lm.device)
        return cls(lm, head, layer_to_read(directory, feature_layer)).eval(), tokenizer


def check_reflective_folder(directory: str | Path, feature_layer: int | None = None) -> tuple[int, int | None]:
    """Before any weights load: (the layer the folder's head would read, the model's number of
    hidden states L + 1, or None when config.json does not say), or FileNotFoundError naming a missing folder, config.json or score_module.pt, ValueError for a
    feature_layer its model's hidden states cannot give (config.json's num_hidden_layers). A
    search names these before its policy loads (a vLLM policy engine took minutes on a GPU first)."""
    directory = check_model_folder(directory)
    head_file(directory)
    layer = layer_to_read(directory, feature_layer)
    states = hidden_state_count(directory)
    if states is None:  # another layout (a multimodal text_config): the load checks it
        return layer, None
    check_feature_layer(layer, states)
    return layer, states


def check_feature_layer(layer: object, num_states: int) -> None:
    """ValueError unless layer indexes a model's num_states hidden states (an int, not a bool)."""
    if type(layer) is not int or not -num_states <= layer < num_states:
        raise ValueError(f"feature_layer={layer!r} must index the {num_states} hidden states "
                         f"(an integer in [{-num_states}, {num_states - 1}])")


def layer_to_read(directory: str | Path, feature_layer: int | None) -> int:
    """The hidden layer a folder's head is read at: feature_layer, or the saved one when None
    (`saved_feature_layer`). A feature_layer other than the one the folder's sprm.json names is a
    ValueError: the head was trained on that layer (search took scorer.feature_layer=-1 over a
    head of -2 in silence, as training refuses it); a folder without sprm.json (the reference's
    format) takes any."""
    if feature_layer is None:
        return saved_feature_layer(directory)
    if (Path(directory) / SPRM_CONFIG_FILE).is_file() and not is_saved_layer(directory, feature_layer):
        raise ValueError(f"feature_layer={feature_layer!r}, but the head of {directory} was trained on hidden layer "
                         f"{saved_feature_layer(directory)} ({SPRM_CONFIG_FILE}): leave feature_layer unset (null) to "
                         "read that one")
    return feature_layer


def is_saved_layer(directory: str | Path, feature_layer: int) -> bool:
    """Whether feature_layer is the layer a folder's head was trained on (its sprm.json's; the
    reference's -2 without one), counted from either end (4 is -2 of 5 hidden states).
    ValueError names a layer the model lacks."""
    saved = saved_feature_layer(directory)
    states = hidden_state_count(Path(directory))
    if states is not None:  # a layer the model lacks is named as such first
        check_feature_layer(feature_layer, states)
    return feature_layer == saved or (states is not None and feature_layer % states == saved % states)


def hidden_state_count(directory: Path) -> int | None:
    """The model's number of hidden states (num_hidden_layers + 1) from its config.json, or None
    when it does not say (another layout); DamagedCheckpointError names a config.json that is not JSON."""
    with reading(directory / "config.json"):
        saved = json.loads((directory / "config.json").read_bytes())
    layers = saved.get("num_hidden_layers") if isinstance(saved, dict) else None
    return layers + 1 if type(layers) is int else None


def saved_feature_layer(directory: str | Path) -> int:
    """The hidden layer a folder's head reads: its sprm.json's feature_layer, the reference's -2
    without the file. DamagedCheckpointError names a sprm.json that is not such a JSON object."""
    config_path = Path(directory) / SPRM_CONFIG_FILE
    if not config_path.is_file():
        return DEFAULT_FEATURE_LAYER
    with reading(config_path):
        saved = json.loads(config_path.read_bytes())
    layer = saved.get("feature_layer", DEFAULT_FEATURE_LAYER) if isinstance(saved, dict) else None
    if type(layer) is not int:
        raise DamagedCheckpointError(f"{config_path} is not a JSON object such as {{\"feature_layer\": -2}}")
    return layer
