"""The context window of a model, as vLLM derives its max_model_len from the same folder, so the
transformers backend (and the servers on it) ends a path "length" where vLLM does:

    max_position_embeddings x the RoPE scaling factor (a linear or dynamic rope type; YaRN,
    LongRoPE, Llama 3's and DeepSeek's scalings leave max_position_embeddings scaled already,
    and so does Gemma 3), at most the tokenizer's model_max_length when it sets one.

    context_window(model.config, tokenizer.model_max_length)   # 1024 for a linear factor-2 model of 512

A linear factor-2 checkpoint of 512 positions ended paths at 512 here and at 1024 on vLLM, so the
two backends' sweeps cut long paths differently. Tests: `.venv/bin/pytest tests/test_vllm_policy.py -k window`.
"""
from __future__ import annotations

from typing import Any

# rope types whose max_position_embeddings is scaled already (vLLM's list, config/model.py)
ALREADY_SCALED: frozenset[str] = frozenset({"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"})
# a tokenizer without a model_max_length reports a huge sentinel (transformers' VERY_LARGE_INTEGER)
_NO_TOKENIZER_LIMIT = 10**9


def context_window(config: Any, tokenizer_max_length: int | None = None) -> int | None:
    """The longest sequence (prompt + generated) the model reads (module docstring); None when
    its config names no max_position_embeddings."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    window = int(positions * rope_factor(config))
    if isinstance(tokenizer_max_length, int) and 0 < tokenizer_max_length < _NO_TOKENIZER_LIMIT:
        window = min(window, tokenizer_max_length)
    return window


def rope_factor(config: Any) -> float:
    """The factor RoPE scaling stretches max_position_embeddings by (1.0 for none or an
    already-scaled type), from `rope_parameters` (transformers 5) or `rope_scaling`."""
    if "gemma3" in str(getattr(config, "model_type", "")):
        return 1.0
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return 1.0
    per_layer_type = not ("rope_type" in params or "type" in params)  # {"full_attention": {...}, ...}
    factor: Any = 1.0
    for entry in (params.values() if per_layer_type else [params]):
        if isinstance(entry, dict) and entry.get("rope_type", entry.get("type")) not in ALREADY_SCALED:
            factor = entry.get("factor", factor)
    return float(factor) if factor else 1.0
