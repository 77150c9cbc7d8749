"""The context window of a model, as vLLM derives its max_model_len from the same folder, so the
transformers backend (and the servers on it) ends a path "length" where vLLM does:

    max_position_embeddings x the RoPE scaling factor of a linear or dynamic rope type (YaRN,
    Llama 3's and DeepSeek's scalings leave max_position_embeddings scaled already, and so does
    Gemma 3); a LongRoPE model (Phi-3) its original_max_position_embeddings, vLLM's default for
    it. vLLM leaves the tokenizer's model_max_length out for a generating model; so does this.

    context_window(model.config)   # 1024 for a linear factor-2 model of 512 positions

A linear factor-2 checkpoint of 512 positions ended paths at 512 here and at 1024 on vLLM, so the
two backends' sweeps cut long paths differently. Tests: `.venv/bin/pytest tests/test_vllm_policy.py -k window`.
"""
from __future__ import annotations

from typing import Any

# rope types whose max_position_embeddings is scaled already (vLLM's list, config/model.py)
ALREADY_SCALED: frozenset[str] = frozenset({"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"})


def context_window(config: Any) -> int | None:
    """The longest sequence (prompt + generated) the model reads (module docstring); None when
    its config names no max_position_embeddings."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    entries = rope_entries(config)
    if any(kind(entry) == "longrope" for entry in entries):
        original = getattr(config, "original_max_position_embeddings", None) or next(
            (e["original_max_position_embeddings"] for e in entries if e.get("original_max_position_embeddings")), None)
        return int(original or positions)
    return int(positions * rope_factor(config))


def rope_factor(config: Any) -> float:
    """The factor RoPE scaling stretches max_position_embeddings by (1.0 for none or an
    already-scaled type)."""
    if "gemma3" in str(getattr(config, "model_type", "")):
        return 1.0
    factor: Any = 1.0
    for entry in rope_entries(config):
        if kind(entry) not in ALREADY_SCALED:
            factor = entry.get("factor", factor)
    return float(factor) if factor else 1.0


def rope_entries(config: Any) -> list[dict[str, Any]]:
    """The RoPE settings of the config, one dict per layer type: `rope_parameters`
    (transformers 5; per layer type or one) or `rope_scaling`; [] for none."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if "rope_type" in params or "type" in params:
        return [params]
    return [entry for entry in params.values() if isinstance(entry, dict)]  # {"full_attention": {...}, ...}


def kind(entry: dict[str, Any]) -> Any:
    """The rope type of one settings dict ("type" in older configs)."""
    return entry.get("rope_type", entry.get("type"))
