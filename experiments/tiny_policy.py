"""The embedded default policy: reuse the cached tiny arith model, or train it when missing.

    final = ensure_policy(Path("outputs/checkpoints/tiny-arith"), SFTConfig(), TinyModelConfig(), ArithConfig())

The run folder holds `final/` (an ordinary transformers directory) once training has finished and
`last/` (resume state) while it runs; an interrupted run resumes from `last/`. A `final/` folder
with a file missing is not silently reused: it is reported and retrained.
"""
from __future__ import annotations

from pathlib import Path

from experiments.tasks import arith
from experiments.train_sft import DEFAULT_TRAIN_PROBLEMS, sft_examples
from policies.checkpoint import check_checkpoint
from policies.sft import SFTConfig, train_sft
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer


def cached_policy(run_dir: Path) -> Path | None:
    """run_dir/final when it is a complete checkpoint, else None (saying what is missing)."""
    final = run_dir / "final"
    if not final.exists():
        return None
    try:
        return check_checkpoint(final)
    except FileNotFoundError as err:
        print(f"cached policy is incomplete, retraining: {err}")
        return None


def ensure_policy(
    run_dir: Path,
    sft: SFTConfig,
    model: TinyModelConfig,
    task: arith.ArithConfig,
    train_problems: int = DEFAULT_TRAIN_PROBLEMS,
    progress: bool = True,
) -> Path:
    """The trained policy's directory: the cached one, or a freshly trained (or resumed) one."""
    cached = cached_policy(run_dir)
    if cached is not None:
        return cached
    print(f"no cached policy in {run_dir}: training the tiny arith policy (SFT)")
    tokenizer = build_tokenizer()
    net = build_model(model, tokenizer)
    train = arith.generate_problems("train", train_problems, seed=sft.seed, cfg=task)
    return train_sft(sft, sft_examples(train), run_dir, net, tokenizer, progress=progress)
