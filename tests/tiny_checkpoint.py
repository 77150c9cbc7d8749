"""A tiny random policy checkpoint for tests of the Hydra entry points (untrained: its text is
noise, which is all a smoke or resume test needs), optionally with a small chat template and a
random two-class score head beside its weights (the external PRM scorer's chat layouts read a
template, its Qwen2.5-Math-PRM reader the head), and a tiny folder shaped as Qwen2.5-Math-PRM's
(`save_tiny_qwen_prm`, for vLLM's own class of that PRM)."""
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


def save_tiny_qwen_prm(out_dir: Path, hidden: int = 64, seed: int = 0, step_tag: str | None = None) -> Path:
    """A random folder laid out as Qwen2.5-Math-PRM's: a Qwen2 base (`model.*`; 2 layers, heads
    of 32, vLLM's smallest on CPU) with a two-class head (`score.0`, `score.2`), no output layer,
    config.json naming `Qwen2ForProcessRewardModel`, and the tiny tokenizer with CHAT_TEMPLATE
    (step_tag, e.g. "<extra_0>": added to it as one special token, as Qwen's tokenizer has it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    if step_tag is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [step_tag]})
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=hidden // 32, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    weights = {k: v.contiguous() for k, v in Qwen2ForCausalLM(config).state_dict().items() if not k.startswith("lm_head")}
    gen = torch.Generator().manual_seed(seed + 1)
    for name, shape in (("score.0", (hidden, hidden)), ("score.2", (2, hidden))):  # logits of order 1
        weights[f"{name}.weight"] = torch.randn(shape, generator=gen) * 2 / hidden**0.5
        weights[f"{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.5
    out_dir.mkdir(parents=True)
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def resaved(checkpoint: Path, out_dir: Path, max_shard_size: str = "20KB", safe: bool = True) -> Path:
    """checkpoint saved again in out_dir as hub models often ship: safetensors shards with an index
    (safe), or one pytorch_model.bin (not safe; written by torch.save, as older models were), and no
    generation_config.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    if safe:
        model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    else:
        out_dir.mkdir(parents=True)
        model.config.save_pretrained(str(out_dir))
        torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(str(out_dir))
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    return out_dir
