"""The most characters one token of a tokenizer can cover, so a text too long for the context is
refused by its character count, before it is tokenised (a 960k-character text took ~1 s of the
tokenizer, and 8 of them held a small request from 40 ms to 9 s, before their token count said 413).

Usage:
    span = max_token_chars(tokenizer)            # once, at start (None: no bound is known)
    check_fits("prefix_prompt", text, 512, span, "the model's context is 512")   # FieldError 413 or None

The bound: each character of a text starts inside exactly one of its tokens, and a token's
decoded text (lossy: a character cut by the token's end still shows as one U+FFFD) or its
vocabulary string has at least one character per character starting in it. So a text of more
than max_tokens * span characters has more than max_tokens tokens: refusing it refuses no text
that fits. It holds only where the tokenizer keeps every character of the text in some token;
`max_token_chars` checks that from the tokenizer's own pipeline (tokenizer.json) and answers None
(no character check: the text is tokenised and counted) for a pipeline that drops or merges
characters before its vocabulary sees them: a normaliser that strips or removes characters, a
pre-tokenizer that drops whitespace, an unknown-token model (WordPiece, WordLevel; BPE or Unigram
fusing unknown characters into one token), an added token that swallows the whitespace beside it,
or a slow (Python) tokenizer. A composing normaliser (NFC, NFKC: Qwen's tokenizers) can turn up
to 4 characters into one (a canonical decomposition has at most 4): the span is 4 times the
longest token there.

Tests: `.venv/bin/python -m pytest tests/test_serve_lifecycle.py`.
"""
from __future__ import annotations

import json
from typing import Any

from experiments.services.api_schemas import FieldError

COMPOSED_CHARS = 4  # most characters NFC / NFKC compose into one (Unicode's longest canonical decomposition)
_KEEPING_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend"}  # no character lost
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of a text one token of tokenizer (a transformers fast tokenizer)
    covers, or None where no such bound holds (module docstring). Reads the whole vocabulary
    once (well under a second for 150k tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    factor = _normalizer_factor(spec.get("normalizer"))
    if (factor is None or not _keeps_characters(spec.get("pre_tokenizer")) or not _model_keeps_characters(spec["model"])
            or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", ()))):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)  # its strings: a byte a character (byte-level), "▁" a space
    decoded = backend.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
    longest = max(max(map(len, vocab), default=0), max(map(len, decoded), default=0))
    return max(longest, 1) * factor


def check_fits(field: str, text: str, max_tokens: int, span: int | None, limit: str) -> None:
    """FieldError 413 when text has more characters than max_tokens tokens of at most span
    characters cover (it must be over max_tokens tokens; `limit` ends the message as the token
    check's does); nothing when span is None or the text may fit."""
    if span is not None and len(text) > max_tokens * span:
        raise FieldError(field, f"has {len(text)} characters, so more than {max_tokens} tokens (a token covers at most "
                                f"{span} characters), {limit}", 413)


def _normalizer_factor(normalizer: dict[str, Any] | None) -> int | None:
    """How many text characters one normalised character may stand for (1, or COMPOSED_CHARS per
    composing step); None when the normaliser may drop characters."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers", ()):
            step = _normalizer_factor(part)
            if step is None:
                return None
            factor *= step
        return factor
    if kind in _KEEPING_NORMALIZERS:
        return 1
    if kind in _COMPOSING_NORMALIZERS:
        return COMPOSED_CHARS
    if kind == "Replace":  # Llama's " " -> "▁": a string replaced by one at least as long
        pattern = normalizer.get("pattern", {})
        return 1 if "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"]) else None
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, a Replace of a regex ...


def _keeps_characters(pre_tokenizer: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer hands every character on (Whitespace-like ones drop blanks)."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(part) for part in pre_tokenizer.get("pretokenizers", ()))
    return kind in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _model_keeps_characters(model: dict[str, Any]) -> bool:
    """Whether each vocabulary token stands for its own string: BPE and Unigram, unless several
    unknown characters can become one unknown token (WordPiece and WordLevel make a whole word one)."""
    if model.get("type") == "BPE":
        return bool(model.get("byte_fallback")) or model.get("unk_token") is None or not model.get("fuse_unk")
    if model.get("type") == "Unigram":
        return bool(model.get("byte_fallback")) or model.get("unk_id") is None
    return False
