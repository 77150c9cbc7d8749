"""Train an embedded tiny policy by SFT (arith or countdown), then evaluate it quickly.

    python -m experiments.train_sft --out outputs/checkpoints/tiny-arith            # the default run
    python -m experiments.train_sft --task countdown --out outputs/checkpoints/tiny-countdown
    python -m experiments.train_sft --out /tmp/run --minutes 2 --eval-problems 50    # a short one
    python -m experiments.train_sft --out /tmp/run --minutes 4 --eval-problems 50    # the same run, trained longer

Builds the tiny tokenizer and model (policies/tiny_tokenizer.py, policies/tiny_model.py),
draws the task's training pairs (experiments/sft_tasks.py), trains with policies/sft.py (resuming from OUT/last if a run was
interrupted), then prints greedy pass@1, sampled pass@1 at the default temperature and pass@k on
held-out test problems (experiments/quick_eval.py) and writes them to OUT/quick_eval.json with the
steps of the policy it evaluated (a run trained on without evaluation removes that file).
The trained model is OUT/final, an ordinary transformers directory.

Resuming: rerunning on the same OUT resumes from OUT/last ("resuming from OUT/last at step K").
Only --minutes, --max-steps (a larger budget trains the run longer: the flags given are its
budget, --max-steps alone with no time limit, none keeps the run's own), --checkpoint-every (left
out: the run's own) and --threads may change; another --task, --lr, --batch-size, --seed, --train-problems or bf16 is
refused, naming the differing keys (policies/sft_resume.py RESUMABLE_KEYS), as is a damaged
OUT/last (a run moved to a CPU of other bf16 support: add --bf16 or --no-bf16 as it ran).
Ctrl-C stops after the current step, saves OUT/last and exits 130 saying how to resume.
Ctrl-C outside the steps is one line and exit 130 too, no traceback: while it imports and checks
its flags "interrupted while starting: nothing was written"; later (drawing the data, building
the model, saving, the evaluation) whether OUT/last holds a checkpoint to resume from
(`interrupt_hint`). SIGTERM alike, with exit 143.
A bad value or run folder prints "error: <what is wrong>" and exits 2.

Tests: `.venv/bin/pytest tests/test_sft_cli.py tests/test_cli_interrupts.py`.
"""
from __future__ import annotations

import os

# libgomp reads this when torch is imported: with the default (active spinning), 2 threads on a
# 2-core machine that another process also uses ran 2.5x SLOWER than 1 thread; passive waiting
# removed that loss. Set before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from experiments.startup_interrupt import quiet_start  # noqa: E402

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_folder_target, named_as_flag, seed_int  # noqa: E402
from experiments.model_folder_target import check_not_model_folder  # noqa: E402
from experiments.cli_errors import INTERRUPT_EXIT, TERMINATE_EXIT, interrupt_reported, is_storage_error  # noqa: E402
from experiments.quick_eval import QuickEvalConfig, format_report, quick_eval, eval_problems  # noqa: E402
from experiments.result_json import write_atomic  # noqa: E402
from experiments.sft_tasks import SFT_TASKS, SFTTask, get_sft_task  # noqa: E402
from policies.checkpoint import load_checkpoint, load_torch_file  # noqa: E402
from policies.sampling import NonFiniteLogitsError  # noqa: E402
from policies.sft import SFTConfig, train_sft  # noqa: E402
from policies.sft_resume import LAST, STATE_FILE, SUMMARY_FILE, SFTError, TrainingInterrupted  # noqa: E402
from policies.tiny_model import TinyModelConfig, build_model, num_parameters  # noqa: E402
from policies.tiny_tokenizer import build_tokenizer  # noqa: E402

DEFAULT_TRAIN_PROBLEMS = 100_000  # more than a default run consumes: no example is seen twice
# what another command's run folder holds at its top (search: records.jsonl, config.yaml; train: config.yaml,
# reference/, metrics.jsonl; train_head: metrics.jsonl; smollm2_eval: config.json): an SFT run there mixed
# its files with that run's, which was then refused on its own rerun
FOREIGN_RUN_FILES: tuple[str, ...] = ("records.jsonl", "config.yaml", "metrics.jsonl", "config.json", "reference")
QUICK_EVAL_FILE = "quick_eval.json"  # OUT's quick evaluation, with the steps of the policy it evaluated


def build_parser() -> argparse.ArgumentParser:
    d = SFTConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.train_sft", description="SFT of a tiny policy on an embedded task, then a quick evaluation.")
    parser.add_argument("--task", default="arith", choices=list(SFT_TASKS), help="the embedded task")
    parser.add_argument("--out", required=True, help="run folder: OUT/final (model), OUT/last (resume state)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"wall-clock training budget (0: no time limit, then --max-steps is needed; default "
                             f"{d.max_minutes:g}, or a resumed run's own)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step budget (with --minutes, or alone: then no time limit; default none, or a resumed "
                             "run's own)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=seed_int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help=f"steps between resume checkpoints in OUT/last (0: only at the end and on Ctrl-C; "
                             f"default {d.checkpoint_every}, or a resumed run's own)")
    parser.add_argument("--train-problems", type=int, default=DEFAULT_TRAIN_PROBLEMS)
    parser.add_argument("--eval-problems", type=int, default=QuickEvalConfig.num_problems, help="0 = no evaluation")
    parser.add_argument("--eval-samples", type=int, default=QuickEvalConfig.num_samples)
    parser.add_argument("--temperature", type=float, default=None, help="default: the task's DEFAULT_TEMPERATURE")
    parser.add_argument("--threads", type=int, default=d.num_threads, help="torch threads (default: all cores)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: where the CPU has bf16 matmuls; part of a run's identity: give "
                             "the setting a run ran with to resume it on another kind of CPU)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


@dataclass(frozen=True)
class RunPlan:
    """The validated command line: the task, its SFT config, training pairs to draw, and the quick
    evaluation's config (None: no evaluation)."""

    task: SFTTask
    sft: SFTConfig
    train_problems: int
    quick_eval: QuickEvalConfig | None


def with_saved_budget(args: argparse.Namespace) -> argparse.Namespace:
    """args with the budget the flags give, the same for a fresh run and its resume (so "rerun the
    same command" resumes it as it ran): the flags given are the budget, --max-steps alone with
    no time limit; none given: a resumed run's own (its max_minutes None reads as --minutes 0),
    a fresh run SFTConfig's --minutes. --checkpoint-every left out: a resumed run's own too. Why:
    a run trained with --minutes 0 --max-steps 1400, extended with --max-steps 2800 alone, took the
    8-minute default, already spent, and trained no step."""
    minutes, max_steps, every = args.minutes, args.max_steps, args.checkpoint_every
    saved = saved_sft_config(Path(args.out)) if minutes is None or every is None else None
    if minutes is None and max_steps is not None:
        minutes = 0.0  # --max-steps alone: the steps are the budget
    elif minutes is None:
        minutes = SFTConfig().max_minutes if saved is None else saved.get("max_minutes") or 0.0
        max_steps = None if saved is None else saved.get("max_steps")
    if every is None:  # a resume without the flag went back to the default (500) and said it "changed"
        every = SFTConfig().checkpoint_every if saved is None else saved.get("checkpoint_every", SFTConfig().checkpoint_every)
    return argparse.Namespace(**{**vars(args), "minutes": minutes, "max_steps": max_steps, "checkpoint_every": every})


def saved_sft_config(out: Path) -> dict | None:
    """The SFT config saved in out/last/trainer_state.pt, or None (no run there, or none readable:
    the resume itself then names what is wrong)."""
    path = out / LAST / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = load_torch_file(path, map_location="cpu", weights_only=False)
    except ValueError:
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


# SFTConfig's fields as their flags (an error names the flag typed)
FLAG_OF_FIELD: dict[str, str] = {"num_threads": "threads", "max_minutes": "minutes", "max_steps": "max-steps",
                                 "batch_size": "batch-size", "checkpoint_every": "checkpoint-every", "lr": "lr", "seed": "seed"}


def sft_config(args: argparse.Namespace) -> SFTConfig:
    """The SFTConfig of the flags; an SFTError names a bad flag as typed (--minutes 0: no time limit)."""
    if not (args.minutes >= 0 and math.isfinite(args.minutes)):
        raise SFTError(f"--minutes {args.minutes:g}: must be > 0 (or 0 for no time limit)")
    if args.max_steps is not None and args.max_steps < 1:
        raise SFTError(f"--max-steps {args.max_steps}: must be >= 1")
    if args.minutes == 0 and args.max_steps is None:
        raise SFTError("--minutes 0 (no time limit) needs --max-steps N: the run has no budget")
    bf16 = {} if args.bf16 is None else {"bf16": args.bf16}  # None: SFTConfig's default, the CPU's support
    try:
        return SFTConfig(
            max_minutes=args.minutes if args.minutes > 0 else None,
            max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            checkpoint_every=args.checkpoint_every, num_threads=args.threads, **bf16,
        )
    except ValueError as err:  # "SFTConfig.num_threads=0 must be ..." named a field, not the flag typed
        raise SFTError(named_as_flag(str(err), "SFTConfig", FLAG_OF_FIELD)) from None


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Validate every flag before any work (an evaluation flag too, not after minutes of training):
    an SFTError names the first bad one."""
    task = get_sft_task(args.task)
    cfg = sft_config(with_saved_budget(args))
    try:  # a file there failed only when the trained model was saved, after the whole run
        check_folder_target(Path(args.out), "--out")
        check_not_model_folder(Path(args.out), "--out")
    except ValueError as err:
        raise SFTError(str(err)) from None
    foreign = [name for name in FOREIGN_RUN_FILES if (Path(args.out) / name).exists()]
    if foreign:  # that run was refused on its next rerun ("holds last, final, sft_summary.json ...")
        raise SFTError(f"--out {args.out} holds {', '.join(foreign)} of another command's run (experiments.search, "
                       "train, train_head or smollm2_eval); use another --out")
    if args.train_problems < 1:
        raise SFTError(f"--train-problems {args.train_problems}: must be >= 1")
    if args.train_problems < cfg.batch_size:
        raise SFTError(f"--train-problems {args.train_problems} gives fewer training pairs than --batch-size "
                       f"{cfg.batch_size}: raise --train-problems or lower --batch-size")
    if args.eval_problems < 0:
        raise SFTError(f"--eval-problems {args.eval_problems}: must be >= 0 (0: no evaluation)")
    temperature = task.module.DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if not 0 < temperature < math.inf:  # checked with no evaluation too: a bad flag is never taken in silence
        raise SFTError(f"--temperature {temperature:g}: must be a finite number > 0")
    if args.eval_problems == 0:
        return RunPlan(task, cfg, args.train_problems, None)
    if args.eval_samples < 1:
        raise SFTError(f"--eval-samples {args.eval_samples}: must be >= 1")
    quick = QuickEvalConfig(num_problems=args.eval_problems, num_samples=args.eval_samples, temperature=temperature)
    try:  # the test split may hold fewer (countdown: ~2.3k); found after training before
        eval_problems(quick, task.default_config, task.module)
    except ValueError as err:
        raise SFTError(f"--eval-problems {args.eval_problems}: {err}") from None
    return RunPlan(task, cfg, args.train_problems, quick)


def run(plan: RunPlan, out: Path, seed: int, progress: bool) -> None:
    """Train (or resume) the planned run into out, then evaluate it when planned."""
    task = plan.task
    pairs = task.training_pairs(task.default_config, plan.train_problems, seed=seed)
    tokenizer = build_tokenizer(corpus=task.tokenizer_corpus(pairs))
    model = build_model(TinyModelConfig(seed=seed), tokenizer)
    print(f"tiny {task.name} policy: {num_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    run_info = {"task": task.name, "train_problems": plan.train_problems}
    if task.split_version is not None:
        run_info["split_version"] = task.split_version
    final = train_sft(plan.sft, pairs, out, model, tokenizer, progress=progress, run_info=run_info)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print(
        f"trained {summary['steps']} steps in {summary['elapsed_s'] / 60:.1f} min, "
        f"{summary['tokens_per_s']:.0f} tokens/s, final loss {summary['final_loss']:.4f} -> {final}"
    )
    if plan.quick_eval is not None:
        evaluate(final, plan.quick_eval, task, out, summary["steps"])
    else:
        drop_stale_evaluation(out, summary["steps"])


def interrupt_hint(out: Path) -> str:
    """What a Ctrl-C (or SIGTERM) outside the training steps says, at that moment (inside them the
    trainer saves OUT/last after the step and says so itself: `TrainingInterrupted`): OUT/last is
    written atomically, so a checkpoint there is whole and a rerun resumes from it."""
    if (out / LAST / STATE_FILE).is_file():
        return f"the checkpoint saved in {out / LAST} is kept; rerun the same command to resume from it"
    return f"{out} holds no checkpoint yet (nothing to resume: rerunning the same command starts the run over)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv (default: sys.argv) and run. A bad value or run folder (SFTError) prints
    "error: ..." and gives 2; Ctrl-C during training saves OUT/last and gives 130 (SIGTERM: 143); any other
    exception is a bug and keeps its traceback. Ctrl-C (SIGTERM) outside the steps: one line
    (`interrupt_hint`) and SystemExit(130) (143), from `interrupt_reported`."""
    args = build_parser().parse_args(argv)
    with interrupt_reported(functools.partial(interrupt_hint, Path(args.out))):
        return sft_command(args)


def sft_command(args: argparse.Namespace) -> int:
    """Plan and run the parsed command line; its exit code (module docstring)."""
    try:
        run(plan_run(args), Path(args.out), args.seed, progress=not args.no_progress)
    except SFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a read-only folder: the user's to fix (other OSErrors are bugs)
        if not is_storage_error(err):
            raise
        print(f"error: cannot write {err.filename or args.out}: {err.strerror or err} (the checkpoints saved before it "
              "are kept; free some space and rerun the same command to go on)", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # saved after the step; any other Ctrl-C: `interrupt_reported`'s line
        print(err, file=sys.stderr)
        return TERMINATE_EXIT if err.terminated else INTERRUPT_EXIT
    return 0


def evaluate(final: Path, cfg: QuickEvalConfig, task: SFTTask, out: Path, steps: int) -> None:
    """Quick evaluation of the trained model (of `steps` training steps): print it and write
    OUT/quick_eval.json, which names those steps."""
    model, tokenizer = load_checkpoint(final)
    t0 = time.perf_counter()
    try:
        report = quick_eval(model, tokenizer, eval_problems(cfg, task.default_config, task.module), cfg, task.module)
    except NonFiniteLogitsError as err:  # the run is saved: an error line, not a traceback
        raise SFTError(f"the quick evaluation of {final} failed: {err}; the trained checkpoint is kept") from err
    # written before it is printed: a closed stdout (`... | head -1`) cost the file, and an older one stayed
    # atomic: a Ctrl-C while it is written leaves the older file or none, not half of one
    write_atomic(out / QUICK_EVAL_FILE, json.dumps({"steps": steps, **asdict(report)}, indent=1))
    print(format_report(report))
    print(f"evaluation took {time.perf_counter() - t0:.0f} s; wrote {out / QUICK_EVAL_FILE}")


def drop_stale_evaluation(out: Path, steps: int) -> None:
    """Remove OUT/quick_eval.json when it evaluated another policy than OUT/final (of `steps`
    steps): a run trained longer with --eval-problems 0 kept the old numbers beside the new model."""
    path = out / QUICK_EVAL_FILE
    if not path.exists():
        return
    try:
        evaluated = json.loads(path.read_text()).get("steps")
    except (OSError, ValueError, AttributeError):  # cut short, or not this JSON object
        evaluated = None
    if evaluated != steps:
        path.unlink()
        print(f"removed {path}: it evaluated the policy of {evaluated if evaluated is not None else 'an unknown'} "
              f"step(s), {out / 'final'} has {steps}; rerun with --eval-problems N to evaluate it")


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
