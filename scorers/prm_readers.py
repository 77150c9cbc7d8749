"""How an external PRM turns its final hidden states at the read positions into two logits, (good,
bad), whose softmax's first entry is a step's score (`scorers.lm_prm_scorer`):

- `token_pair_logits`: a PRM that is a causal LM (Math-Shepherd, RLHFlow): its output layer's rows
  of the good and bad tokens only (no [K, vocabulary] logits), with the layer's bias and the
  config's logit scale / final soft-capping when it has them.
- `ScoreHead`: a PRM with a two-class head on the last hidden state (Qwen2.5-Math-PRM:
  `score.0` Linear(H, H), ReLU, `score.2` Linear(H, 2); class 1 is "the step is right"), loaded
  from the folder's safetensors (`load_score_head`) without running the model's own code.

    pair = token_pair_logits(causal_lm, features, good_id, bad_id)     # [K, 2]
    head = load_score_head(folder, torch.bfloat16); pair = head(features)  # [K, 2]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

HEAD_KEYS: tuple[str, ...] = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


def token_pair_logits(model: Any, features: torch.Tensor, good_id: int, bad_id: int) -> torch.Tensor:
    """[K, H] final hidden states of a causal LM -> [K, 2] logits of its good and bad tokens."""
    head = model.get_output_embeddings()
    index = torch.tensor([good_id, bad_id], device=features.device)
    bias = None if getattr(head, "bias", None) is None else head.bias[index]
    logits = torch.nn.functional.linear(features, head.weight[index], bias)  # [K, 2]
    config = model.config
    logits = logits * float(getattr(config, "logit_scale", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


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
    """The folder's `score.*` tensors (model.safetensors, or the shards its index names) as a
    ScoreHead in dtype; FileNotFoundError naming the folder when it has none of them."""
    files = weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in HEAD_KEYS:
                if key in reader.keys():
                    tensors[key] = reader.get_tensor(key)
    missing = [key for key in HEAD_KEYS if key not in tensors]
    if missing:
        raise FileNotFoundError(
            f"PRM folder {directory} has no score head ({', '.join(missing)} not in "
            f"{', '.join(f.name for f in files)}): "
            "prm_format=qwen_prm reads a two-class head such as Qwen2.5-Math-PRM's"
        )
    head = ScoreHead(int(tensors["score.0.weight"].shape[1]), dtype)
    head.score.load_state_dict({key.removeprefix("score."): value for key, value in tensors.items()})
    return head.eval()


def weight_files(directory: Path) -> list[Path]:
    """The folder's safetensors files: model.safetensors, or the shards of its index."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"PRM folder {directory} has no model.safetensors (or its index) to read a score head from"
        )
    return [single]
