"""Train an embedded tiny policy by SFT (arith or countdown), then evaluate it quickly.

    python -m experiments.train_sft --out outputs/checkpoints/tiny-arith            # the default run
    python -m experiments.train_sft --task countdown --out outputs/checkpoints/tiny-countdown
    python -m experiments.train_sft --out /tmp/run --minutes 2 --eval-problems 50    # a short one

Builds the tiny tokenizer and model (policies/tiny_tokenizer.py, policies/tiny_model.py),
draws the task's training pairs (experiments/sft_tasks.py), trains with policies/sft.py (resuming from OUT/last if a run was
interrupted), then prints greedy pass@1, sampled pass@1 at the default temperature and pass@k on
held-out test problems (experiments/quick_eval.py) and writes them to OUT/quick_eval.json.
The trained model is OUT/final, an ordinary transformers directory.
"""
from __future__ import annotations

import os

# libgomp reads this when torch is imported: with the default (active spinning), 2 threads on a
# 2-core machine that another process also uses ran 2.5x SLOWER than 1 thread; passive waiting
# removed that loss. Set before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from experiments.quick_eval import QuickEvalConfig, format_report, quick_eval, eval_problems  # noqa: E402
from experiments.sft_tasks import SFT_TASKS, SFTTask, get_sft_task  # noqa: E402
from policies.checkpoint import load_checkpoint  # noqa: E402
from policies.sft import SUMMARY_FILE, SFTConfig, train_sft  # noqa: E402
from policies.tiny_model import TinyModelConfig, build_model, num_parameters  # noqa: E402
from policies.tiny_tokenizer import build_tokenizer  # noqa: E402

DEFAULT_TRAIN_PROBLEMS = 100_000  # more than a default run consumes: no example is seen twice


def parse_args() -> argparse.Namespace:
    d = SFTConfig()
    parser = argparse.ArgumentParser(description="SFT of a tiny policy on an embedded task, then a quick evaluation.")
    parser.add_argument("--task", default="arith", choices=list(SFT_TASKS), help="the embedded task")
    parser.add_argument("--out", required=True, help="run folder: OUT/final (model), OUT/last (resume state)")
    parser.add_argument("--minutes", type=float, default=d.max_minutes, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget (with or instead of --minutes)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--train-problems", type=int, default=DEFAULT_TRAIN_PROBLEMS)
    parser.add_argument("--eval-problems", type=int, default=QuickEvalConfig.num_problems, help="0 = no evaluation")
    parser.add_argument("--eval-samples", type=int, default=QuickEvalConfig.num_samples)
    parser.add_argument("--temperature", type=float, default=None, help="default: the task's DEFAULT_TEMPERATURE")
    parser.add_argument("--threads", type=int, default=d.num_threads, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    sft_cfg = SFTConfig(
        max_minutes=args.minutes if args.minutes and args.minutes > 0 else None,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        num_threads=args.threads,
    )
    task = get_sft_task(args.task)
    pairs = task.training_pairs(task.default_config, args.train_problems, seed=args.seed)
    tokenizer = build_tokenizer(corpus=task.tokenizer_corpus(pairs))
    model = build_model(TinyModelConfig(seed=args.seed), tokenizer)
    print(f"tiny {task.name} policy: {num_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    final = train_sft(sft_cfg, pairs, out, model, tokenizer, progress=not args.no_progress)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print(
        f"trained {summary['steps']} steps in {summary['elapsed_s'] / 60:.1f} min, "
        f"{summary['tokens_per_s']:.0f} tokens/s, final loss {summary['final_loss']:.4f} -> {final}"
    )
    if args.eval_problems > 0:
        evaluate(final, args, task, out)


def evaluate(final: Path, args: argparse.Namespace, task: SFTTask, out: Path) -> None:
    temperature = task.module.DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    cfg = QuickEvalConfig(num_problems=args.eval_problems, num_samples=args.eval_samples, temperature=temperature)
    model, tokenizer = load_checkpoint(final)
    t0 = time.perf_counter()
    report = quick_eval(model, tokenizer, eval_problems(cfg, task.default_config, task.module), cfg, task.module)
    print(format_report(report))
    (out / "quick_eval.json").write_text(json.dumps(asdict(report), indent=1))
    print(f"evaluation took {time.perf_counter() - t0:.0f} s; wrote {out / 'quick_eval.json'}")


if __name__ == "__main__":
    main()
