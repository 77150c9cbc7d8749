"""The tiny Llama-architecture policy of the embedded default (a few million parameters).

`build_model(TinyModelConfig(), tokenizer)` returns a freshly initialised
`transformers.LlamaForCausalLM` whose special-token ids come from the tokenizer, so the saved
directory is an ordinary transformers (and vLLM) model. Defaults follow the measured data point
of DESIGN.md section 4: 4 layers, hidden 256, 4 heads, tied embeddings (about 3.5M parameters
with the ~450-token tiny tokenizer: 3,526,144 at its 453 tokens, 4 x 852,480 per block + 453 x 256
embedding + 256 final norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny policy.

    hidden: residual width C. layers: decoder blocks. heads: attention heads (hidden % heads == 0);
    kv_heads: key/value heads (grouped-query attention when < heads; heads % kv_heads == 0).
    intermediate: SwiGLU MLP width. max_position: longest sequence (prompt + completion).
    tie_embeddings: share the input embedding with the output projection.
    rope_theta: RoPE base. init_std: std of the normal initialisation. seed: initialisation seed.
    """

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 768
    max_position: int = 512
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyModelConfig.{name}={getattr(self, name)}; must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"TinyModelConfig.hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"TinyModelConfig.kv_heads={self.kv_heads} does not divide heads={self.heads}")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"TinyModelConfig head dim {self.hidden // self.heads} must be even (RoPE)")
        if self.init_std <= 0:
            raise ValueError(f"TinyModelConfig.init_std={self.init_std}; must be > 0")


def llama_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The transformers config: vocabulary size and bos/eos/pad ids taken from the tokenizer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )


def build_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (float32, training mode off), same weights for the same seed."""
    config = llama_config(cfg, tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):  # initialisation never disturbs the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
