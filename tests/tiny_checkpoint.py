"""A tiny random policy checkpoint for tests of the Hydra entry points (untrained: its text is
noise, which is all a smoke or resume test needs), optionally with a small chat template and a
random two-class score head beside its weights (the external PRM scorer's chat layouts read a
template, its Qwen2.5-Math-PRM reader the head)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer

TINY_SHAPE = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64)


def save_tiny_checkpoint(out_dir: Path, shape: TinyModelConfig = TINY_SHAPE) -> Path:
    """Build the locally learned tokenizer and a random Llama (TINY_SHAPE: ~25k parameters); save
    both to out_dir."""
    tokenizer = build_tokenizer()
    return save_checkpoint(build_model(shape, tokenizer), tokenizer, out_dir)

# user and assistant turns, each on its own line; the generation prompt opens an assistant turn
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def with_chat_template(checkpoint: Path, out_dir: Path) -> Path:
    """A copy of checkpoint in out_dir whose tokenizer has CHAT_TEMPLATE."""
    shutil.copytree(checkpoint, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def with_score_head(checkpoint: Path, out_dir: Path, seed: int = 0) -> Path:
    """A copy of checkpoint in out_dir whose model.safetensors also holds a random head of
    Qwen2.5-Math-PRM's shape (`score.0` Linear(H, H), `score.2` Linear(H, 2))."""
    shutil.copytree(checkpoint, out_dir)
    weights = load_file(str(out_dir / "model.safetensors"))
    hidden, gen = TINY_SHAPE.hidden, torch.Generator().manual_seed(seed)
    for name, shape in (("score.0", (hidden, hidden)), ("score.2", (2, hidden))):
        weights[f"{name}.weight"] = torch.randn(shape, generator=gen) * 0.5
        weights[f"{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.5
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
