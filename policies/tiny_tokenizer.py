"""A small byte-level BPE tokenizer for the embedded tiny policy, built locally with `tokenizers`.

Design (see DESIGN.md section 4):
- byte-level BPE, so ANY text encodes and decodes losslessly (unseen words fall back to bytes);
- every digit is its own token (digits are split off before BPE and never merged): single-digit
  tokens make arithmetic far easier for a small model to learn;
- the step separator ".\\n\\n" and the think tags "<think>", "</think>" are single added tokens that
  are NOT special, so `decode(..., skip_special_tokens=True)` keeps them;
- "<bos>", "<eos>", "<pad>" are special tokens; encoding with add_special_tokens=True prepends
  <bos> (a TemplateProcessing post-processor). <eos> is appended by the trainer, not here.

Merges are learned from a corpus (by default arith questions and solutions), so frequent words
such as " coins" become one token and prompts stay short. The result is deterministic for a
given corpus. Run `python -m policies.tiny_tokenizer OUT_DIR` to build and save one (OUT_DIR: a
folder, made when missing; an existing file there is refused).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)  # ids 0, 1, 2
STEP_TOKENS: tuple[str, ...] = (".\n\n", "<think>", "</think>")  # single, non-special
DEFAULT_VOCAB_SIZE = 512
# Pieces before byte-level mapping: one digit; a word with its leading space; a run of other
# symbols with optional leading and trailing space (" = ", ": "); any other whitespace run.
_PIECE_PATTERN = r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+ ?|\s+"


def _default_corpus(num_problems: int = 4000, seed: int = 0) -> list[str]:
    """Arith prompts + reference solutions (imported lazily: the task lives in experiments/)."""
    from experiments.tasks import arith

    problems = arith.generate_problems("train", num_problems, seed=seed)
    return [arith.prompt_text(p) + arith.solution_text(p) for p in problems]


def _build_raw_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Added after training so the trainer never sees them split; normalized=False keeps them exact.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in STEP_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a raw tokenizer (no whitespace clean-up: decoding is lossless)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def build_tokenizer(
    out_dir: str | Path | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Learn the tokenizer from `corpus` (default: 4000 arith problems with solutions), save it
    with save_pretrained into out_dir when given, and return it."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}; must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet)")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():  # saved nothing, in silence
        raise ValueError(f"{out_dir} is a file, not a folder for the tokenizer's files")
    raw = _build_raw_tokenizer(_default_corpus() if corpus is None else corpus, vocab_size)
    tokenizer = wrap(raw)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Build the default tokenizer into OUT_DIR; a file there is one error line (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m policies.tiny_tokenizer",
                                     description="Build the tiny policy's tokenizer (default corpus) into OUT_DIR.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a folder (made when missing)")
    args = parser.parse_args(argv)
    try:
        tok = build_tokenizer(args.out_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved a {len(tok)}-token tokenizer to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
