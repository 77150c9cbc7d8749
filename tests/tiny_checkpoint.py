"""A tiny random policy checkpoint for tests of the Hydra entry points (untrained: its text is
noise, which is all a smoke or resume test needs), optionally with a small chat template (the
chat layout of the external PRM scorer reads one)."""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoTokenizer

from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer

TINY_SHAPE = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64)


def save_tiny_checkpoint(out_dir: Path) -> Path:
    """Build the locally learned tokenizer and a ~25k-parameter random Llama; save both to out_dir."""
    tokenizer = build_tokenizer()
    return save_checkpoint(build_model(TINY_SHAPE, tokenizer), tokenizer, out_dir)

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
