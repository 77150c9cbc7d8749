"""How an external PRM turns its final hidden states at the read positions into two logits, (good,
bad), whose softmax's first entry is a step's score (`scorers.lm_prm_scorer`):

- `TokenRows`: a PRM that is a causal LM (Math-Shepherd, RLHFlow): its output layer's rows of the
  good and bad tokens only (no [K, vocabulary] logits), with the layer's bias and the config's
  logit scale / final soft-capping when it has them; taken from a loaded model
  (`token_pair_logits`) or read from the folder's weight files (`load_token_rows`, for a PRM whose
  hidden states come from vLLM).
- `ScoreHead`: a PRM with a two-class head on the last hidden state (Qwen2.5-Math-PRM:
  `score.0` Linear(H, H), ReLU, `score.2` Linear(H, 2); class 1 is "the step is right"), loaded
  from the folder's weight files (`load_score_head`) without running the model's own code.

    pair = token_pair_logits(causal_lm, features, good_id, bad_id)     # [K, 2]
    rows = load_token_rows(folder, good_id, bad_id); pair = rows(features)  # the same, no model
    head = load_score_head(folder, torch.bfloat16); pair = head(features)  # [K, 2]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from policies.checkpoint import reading
from policies.model_folder import weight_files

HEAD_KEYS: tuple[str, ...] = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


@dataclass(frozen=True)
class TokenRows:
    """A causal LM's output layer cut to the good and bad tokens: weight [2, H] (good, bad), its
    bias [2] or None, the config's logit scale and final soft-capping (None: none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    cap: float | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """[K, H] final hidden states -> [K, 2] (good, bad) logits."""
        weight = self.weight.to(device=features.device, dtype=features.dtype)
        bias = None if self.bias is None else self.bias.to(device=features.device, dtype=features.dtype)
        logits = torch.nn.functional.linear(features, weight, bias) * self.scale
        return logits if not self.cap else torch.tanh(logits / self.cap) * self.cap


def token_pair_logits(model: Any, features: torch.Tensor, good_id: int, bad_id: int) -> torch.Tensor:
    """[K, H] final hidden states of a causal LM -> [K, 2] logits of its good and bad tokens."""
    head = model.get_output_embeddings()
    index = torch.tensor([good_id, bad_id], device=features.device)
    bias = None if getattr(head, "bias", None) is None else head.bias[index]
    return TokenRows(head.weight[index], bias, *logit_transform(model.config))(features)


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(logit scale, final soft-capping or None) of a transformers config: Cohere's logit_scale
    multiplies the logits, Granite's logits_scaling divides them, Gemma 2 soft-caps them."""
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


def load_token_rows(directory: Path, good_id: int, bad_id: int) -> TokenRows:
    """The good and bad rows of the folder's output layer read from its weight files, without
    loading the model: `lm_head.weight` (and `lm_head.bias` when there is one), or the input
    embeddings when the config ties them; FileNotFoundError naming the folder when neither is
    there."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = ("lm_head.weight",) + (("model.embed_tokens.weight", "embed_tokens.weight") if tied else ())
    tensors = read_tensors(directory, names + ("lm_head.bias",), [good_id, bad_id])
    weight = next((tensors[name] for name in names if name in tensors), None)
    if weight is None:
        raise FileNotFoundError(
            f"PRM folder {directory} has no output layer ({' or '.join(names)}) in its weight files: "
            "a reader 'lm' PRM is a causal LM"
        )
    return TokenRows(weight, tensors.get("lm_head.bias"), *logit_transform(config))


def read_tensors(directory: Path, names: tuple[str, ...], rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Each named tensor found in the folder's weight files (`policies.model_folder.weight_files`),
    keyed by name: whole, or only its rows (the first dimension's) when rows is given
    (safetensors read by the row; .bin files memory-mapped)."""
    found: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as reader:
                for name in set(names) & set(reader.keys()):
                    if rows is None:
                        found[name] = reader.get_tensor(name)
                    else:
                        found[name] = torch.stack([reader.get_slice(name)[row] for row in rows])
        else:
            with reading(file):  # a truncated .bin file named
                state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
            for name in set(names) & set(state):
                found[name] = state[name] if rows is None else state[name][rows].clone()
    return found


class ScoreHead(torch.nn.Module):
    """Qwen2.5-Math-PRM's head: Linear(H, H), ReLU, Linear(H, 2); forward gives (good, bad) logits."""

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden, dtype=dtype), torch.nn.ReLU(), torch.nn.Linear(hidden, 2, dtype=dtype)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [K, H] -> [K, 2]
        return self.score(features.to(self.score[0].weight.dtype))[:, [1, 0]]  # class 1 = good


def load_score_head(directory: Path, dtype: torch.dtype) -> ScoreHead:
    """The folder's `score.*` tensors (in its weight files: safetensors or .bin, one or sharded)
    as a ScoreHead in dtype; FileNotFoundError naming the folder when it has none of them,
    ValueError naming a tensor whose shape is not the head's for the config's hidden size."""
    from transformers import AutoConfig

    tensors = read_tensors(directory, HEAD_KEYS)
    missing = [key for key in HEAD_KEYS if key not in tensors]
    if missing:
        raise FileNotFoundError(
            f"PRM folder {directory} has no score head ({', '.join(missing)} not in "
            f"{', '.join(f.name for f in weight_files(directory))}): "
            "prm_format=qwen_prm reads a two-class head such as Qwen2.5-Math-PRM's"
        )
    hidden = int(AutoConfig.from_pretrained(str(directory), local_files_only=True).hidden_size)
    shapes = {"score.0.weight": (hidden, hidden), "score.0.bias": (hidden,), "score.2.weight": (2, hidden),
              "score.2.bias": (2,)}
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"PRM folder {directory}: {key} has shape {tuple(tensors[key].shape)}, not {shape} "
                             f"(a two-class head on hidden size {hidden}, config.json's)")
    head = ScoreHead(hidden, dtype)
    head.score.load_state_dict({key.removeprefix("score."): value.to(dtype) for key, value in tensors.items()})
    return head.eval()
