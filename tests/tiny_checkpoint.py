"""A tiny random policy checkpoint for tests of the Hydra entry points (untrained: its text is
noise, which is all a smoke or resume test needs)."""
from __future__ import annotations

from pathlib import Path

from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer

TINY_SHAPE = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64)


def save_tiny_checkpoint(out_dir: Path) -> Path:
    """Build the locally learned tokenizer and a ~25k-parameter random Llama; save both to out_dir."""
    tokenizer = build_tokenizer()
    return save_checkpoint(build_model(TINY_SHAPE, tokenizer), tokenizer, out_dir)
