"""Quick evaluation of a policy on an embedded task (arith by default) with HF `generate`:
greedy pass@1, sampled pass@1, oracle pass@k and majority@k.

This is a sanity check of a trained checkpoint, independent of the project's step-wise backend:
    python -m experiments.quick_eval outputs/checkpoints/tiny-arith/final --problems 200
    python -m experiments.quick_eval outputs/checkpoints/tiny-countdown/final --task countdown
    python -m experiments.quick_eval RUN/last --task countdown --baseline INIT_MODEL   # paired change
    python -m experiments.quick_eval outputs/checkpoints/tiny-arith/final --device cuda   # on a GPU (cuda:N)
Sampled pass@1 is the mean correctness of the k samples (an unbiased estimate); pass@k is 1 for
a problem when any of its k samples is correct; majority@k grades a completion holding the most
frequent extracted answer (ties: the answer seen first), so it works for tasks with many correct
answers too. With --baseline, both checkpoints answer the same problems and the change of each
metric gets a 95% bootstrap interval over problems, paired (what "GRPO raised pass@1" needs).
--device (cpu, cuda, cuda:N; default cpu) places both checkpoints; a device torch cannot see is
argparse's error before any model loads (`policies.devices.resolve_device`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from experiments.cli_args import device_name, named_as_flag, seed_int
from experiments.checkpoint_hints import hinted_checkpoint
from experiments.cli_errors import run_command
from experiments.metrics import Estimate, bootstrap
from experiments.tasks import arith
from policies.bf16_support import native_bf16
from policies.sampling import DIVERGED_HINT, NonFiniteLogitsError
from treesearch.records import Problem


@dataclass(frozen=True)
class QuickEvalConfig:
    """num_problems: test problems (seed `problem_seed`); num_samples: k samples per problem at
    `temperature` (pure temperature sampling, no top-k/top-p); max_new_tokens: generation limit;
    batch_size: sequences per generate call; seed: sampling seed; bf16: autocast generation on the
    model's device (default: where the CPU has bf16 matmuls, `policies.bf16_support`; the command
    line takes the --device's support)."""

    num_problems: int = 200
    num_samples: int = 32
    temperature: float = arith.DEFAULT_TEMPERATURE
    max_new_tokens: int = 96
    batch_size: int = 256
    seed: int = 0
    problem_seed: int = 1234
    bf16: bool = field(default_factory=native_bf16)

    def __post_init__(self) -> None:
        for name in ("num_problems", "num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"QuickEvalConfig.{name}={getattr(self, name)}; must be >= 1")
        if not 0 < self.temperature < math.inf:  # NaN and inf too
            raise ValueError(f"QuickEvalConfig.temperature={self.temperature}; must be a finite number > 0")


@dataclass(frozen=True)
class QuickEvalReport:
    """Accuracies in [0, 1] over num_problems problems; tokens_per_s counts generated tokens."""

    num_problems: int
    num_samples: int
    temperature: float
    greedy_pass1: float
    sampled_pass1: float
    pass_at_k: float
    majority_at_k: float
    tokens_per_s: float
    seconds: float


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], n: int,
    temperature: float | None, max_new_tokens: int, batch_size: int, seed: int, bf16: bool = False,
    progress: str | None = None,
) -> tuple[list[list[str]], int]:
    """(n completions per prompt, generated tokens); temperature None = greedy (n must be 1);
    progress: a progress bar with this label (None: none). Runs on the model's device: the
    prompts go there, bf16 autocasts there, and the seeded RNGs forked are the CPU's and its GPU's."""
    if temperature is None and n != 1:
        raise ValueError(f"greedy decoding with n={n}; greedy gives one completion per prompt")
    per_call = max(1, batch_size // n)
    # Pure temperature sampling: top_k=0 switches off transformers' default top-k of 50.
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    out: list[list[str]] = []
    generated = 0
    try:
        starts = range(0, len(prompts), per_call)
        for call, start in enumerate(tqdm(starts, desc=progress, unit="call", disable=progress is None)):
            enc = tokenizer(list(prompts[start : start + per_call]), return_tensors="pt", padding=True).to(model.device)
            with _fork_rng(model.device), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                torch.manual_seed((seed * 100_003 + call) % 2**64)  # a large --seed overflowed torch's int64
                sequences = _generate(model, tokenizer, enc, sampling, max_new_tokens, n)  # [P*n, prompt_len + new]
            new = sequences[:, enc["input_ids"].shape[1] :]  # [P*n, new]
            generated += int((new != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
            out += [texts[i : i + n] for i in range(0, len(texts), n)]
    finally:
        tokenizer.padding_side = old_side
    return out, generated


def _fork_rng(device: torch.device) -> Any:
    """torch.random.fork_rng of the global RNGs a generation on device draws from: the CPU's alone
    on the CPU, the CPU's and that GPU's on CUDA (its sampling draws from the GPU's generator)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, enc: Any, sampling: dict[str, Any],
    max_new_tokens: int, n: int,
) -> torch.Tensor:
    """model.generate of one batch; logits that are not finite are a NonFiniteLogitsError (torch's
    multinomial raised a RuntimeError, a traceback from quick_eval and train_sft's evaluation)."""
    try:
        return model.generate(
            **enc, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    except RuntimeError as err:
        if "probability tensor contains" not in str(err):  # torch: "... either `inf`, `nan` or element < 0"
            raise
        raise NonFiniteLogitsError(
            f"the policy's logits are not finite (NaN or inf) while sampling: {DIVERGED_HINT}") from err


def majority_answer(completions: Sequence[str], task: ModuleType = arith) -> str | None:
    """Most frequent extracted answer (first seen wins ties); None when none has an answer."""
    answers = [a for a in (task.extract_answer(c) for c in completions) if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def majority_correct(problem: Problem, completions: Sequence[str], task: ModuleType = arith) -> bool:
    """Grade of the first completion whose answer is the majority answer (False with none)."""
    top = majority_answer(completions, task)
    if top is None:
        return False
    return task.grade(problem, next(c for c in completions if task.extract_answer(c) == top))


@dataclass(frozen=True)
class ProblemGrades:
    """Per-problem grades of one policy: greedy[i], sampled[i][j] (k samples) and majority[i]
    for problem i; generated tokens and wall seconds of the whole evaluation."""

    greedy: tuple[bool, ...]
    sampled: tuple[tuple[bool, ...], ...]
    majority: tuple[bool, ...]
    tokens: int
    seconds: float

    def per_problem(self) -> dict[str, list[float]]:
        """Each metric's value per problem: greedy, pass@1 (mean of the k samples), pass@k, majority@k."""
        return {
            "greedy": [float(g) for g in self.greedy],
            "pass@1": [sum(c) / len(c) for c in self.sampled],
            "pass@k": [float(any(c)) for c in self.sampled],
            "majority@k": [float(m) for m in self.majority],
        }


def grade_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], cfg: QuickEvalConfig,
    task: ModuleType = arith, progress: str | None = None,
) -> ProblemGrades:
    """Greedy and k sampled completions of each problem, graded by `task.grade`; progress: a
    label for progress bars (None: none)."""
    model.eval()
    prompts = [task.prompt_text(p) for p in problems]
    t0 = time.perf_counter()
    greedy, tokens_g = generate_completions(model, tokenizer, prompts, 1, None, cfg.max_new_tokens, cfg.batch_size,
                                            cfg.seed, cfg.bf16, progress and f"{progress} greedy")
    sampled, tokens_s = generate_completions(
        model, tokenizer, prompts, cfg.num_samples, cfg.temperature, cfg.max_new_tokens, cfg.batch_size, cfg.seed, cfg.bf16,
        progress and f"{progress} sampled",
    )
    seconds = time.perf_counter() - t0  # generation only, as tokens_per_s means
    return ProblemGrades(
        greedy=tuple(task.grade(p, g[0]) for p, g in zip(problems, greedy)),
        sampled=tuple(tuple(task.grade(p, c) for c in cs) for p, cs in zip(problems, sampled)),
        majority=tuple(majority_correct(p, cs, task) for p, cs in zip(problems, sampled)),
        tokens=tokens_g + tokens_s,
        seconds=seconds,
    )


def report_of(grades: ProblemGrades, cfg: QuickEvalConfig) -> QuickEvalReport:
    """The means over problems of `grades`."""
    values = grades.per_problem()
    n = len(grades.greedy)
    return QuickEvalReport(
        num_problems=n,
        num_samples=cfg.num_samples,
        temperature=cfg.temperature,
        greedy_pass1=sum(values["greedy"]) / n,
        sampled_pass1=sum(values["pass@1"]) / n,
        pass_at_k=sum(values["pass@k"]) / n,
        majority_at_k=sum(values["majority@k"]) / n,
        tokens_per_s=grades.tokens / grades.seconds,
        seconds=grades.seconds,
    )


def quick_eval(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], cfg: QuickEvalConfig,
    task: ModuleType = arith,
) -> QuickEvalReport:
    """Greedy and sampled evaluation of `problems`, graded by `task.grade`."""
    return report_of(grade_policy(model, tokenizer, problems, cfg, task), cfg)


def paired_difference(baseline: ProblemGrades, new: ProblemGrades, seed: int = 0) -> dict[str, Estimate]:
    """new minus baseline for each metric of `ProblemGrades.per_problem`, on the same problems,
    with a 95% bootstrap interval over problems (paired: one resample draws a problem for both)."""
    if len(baseline.greedy) != len(new.greedy):
        raise ValueError(f"paired comparison of {len(baseline.greedy)} and {len(new.greedy)} problems")
    base, other = baseline.per_problem(), new.per_problem()
    return {k: bootstrap([b - a for a, b in zip(base[k], other[k])], iters=2000, seed=seed) for k in base}


def format_difference(diff: dict[str, Estimate], num_samples: int) -> str:
    """One line: each metric's change with its interval, `k` spelled as num_samples."""
    parts = [f"{k.replace('@k', f'@{num_samples}')} {e.mean:+.4f} [{e.low:+.4f}, {e.high:+.4f}]" for k, e in diff.items()]
    return "change vs baseline (95% paired bootstrap over problems): " + " | ".join(parts)


def format_report(report: QuickEvalReport) -> str:
    return (
        f"{report.num_problems} test problems: greedy pass@1 {report.greedy_pass1:.3f} | "
        f"sampled pass@1 (T={report.temperature}) {report.sampled_pass1:.3f} | "
        f"pass@{report.num_samples} {report.pass_at_k:.3f} | majority@{report.num_samples} "
        f"{report.majority_at_k:.3f} | {report.tokens_per_s:.0f} generated tok/s, {report.seconds:.0f} s"
    )


def eval_problems(cfg: QuickEvalConfig, task_cfg: Any = arith.ArithConfig(), task: ModuleType = arith) -> list[Problem]:
    return task.generate_problems("test", cfg.num_problems, seed=cfg.problem_seed, cfg=task_cfg)


def load_policy(directory: str, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_checkpoint(directory, device=device)`; a config or tokenizer file that does not parse
    is a ValueError naming the folder (transformers' own error names neither the folder nor, for
    the tokenizer, the file)."""
    from policies.checkpoint import load_checkpoint

    try:
        return load_checkpoint(directory, device=device)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:  # e.g. a config.json or tokenizer.json cut short
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint folder {directory} cannot be loaded ({reason})") from err


def print_policy_notes(checkpoint: str, baseline: str | None, task: str) -> None:
    """A note on stderr for each folder trained on another embedded task than `task`, or on an
    old version of its splits (its test numbers read high), as search and train print."""
    from experiments.checkpoint_hints import trained_task_note

    for folder, key in ((checkpoint, "the checkpoint"), (baseline, "--baseline")):
        note = None if folder is None else trained_task_note(folder, f"experiments.tasks.{task}", key)
        if note is not None:
            print(note, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a bad setting or checkpoint folder prints one line `error: ...` and exits 2."""
    return run_command(quick_eval_command, argv)


FLAG_OF_FIELD: dict[str, str] = {"num_problems": "problems", "num_samples": "samples", "temperature": "temperature"}


def quick_eval_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, check both checkpoint folders before generating anything, evaluate, print."""
    from policies.checkpoint import check_safetensors
    from policies.model_folder import check_model_folder, weight_files

    parser = argparse.ArgumentParser(prog="python -m experiments.quick_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a model directory written by save_checkpoint")
    parser.add_argument("--task", default="arith", help="an embedded task: arith | countdown")
    parser.add_argument("--problems", type=int, default=QuickEvalConfig.num_problems)
    parser.add_argument("--samples", type=int, default=QuickEvalConfig.num_samples)
    parser.add_argument("--temperature", type=float, default=None, help="default: the task's DEFAULT_TEMPERATURE")
    parser.add_argument("--seed", type=seed_int, default=QuickEvalConfig.seed)
    parser.add_argument("--baseline", default=None,
                        help="a second checkpoint evaluated on the same problems; prints the paired change")
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="where both checkpoints run: cpu, cuda or cuda:N (checked before any model loads)")
    args = parser.parse_args(argv)
    from experiments.sft_tasks import get_sft_task

    task = get_sft_task(args.task)
    temperature = task.module.DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    try:
        cfg = QuickEvalConfig(num_problems=args.problems, num_samples=args.samples, temperature=temperature,
                              seed=args.seed, bf16=native_bf16(args.device))  # the CPU's support on cpu, as the default reads it
    except ValueError as err:  # "QuickEvalConfig.num_problems=0" named a field the user never typed
        raise ValueError(named_as_flag(str(err), "QuickEvalConfig", FLAG_OF_FIELD)) from None
    for folder, key in ((args.checkpoint, "the checkpoint argument"), (args.baseline, "--baseline")):
        if folder is not None:  # both, before minutes of generation; any folder load_checkpoint takes
            with hinted_checkpoint(folder, key):  # a missing folder says how to get it
                for weights in weight_files(check_model_folder(folder)):
                    if weights.suffix == ".safetensors":
                        check_safetensors(weights)
    print_policy_notes(args.checkpoint, args.baseline, args.task)
    problems = eval_problems(cfg, task.default_config, task.module)
    grades = grade_policy(*load_policy(args.checkpoint, args.device), problems, cfg, task.module, progress=args.checkpoint)
    report = report_of(grades, cfg)
    if args.baseline is None:
        print(format_report(report))
        print(json.dumps(asdict(report)))
        return 0
    base = grade_policy(*load_policy(args.baseline, args.device), problems, cfg, task.module, progress=args.baseline)
    base_report, diff = report_of(base, cfg), paired_difference(base, grades, cfg.seed)
    print(f"baseline {args.baseline}: {format_report(base_report)}")
    print(f"{args.checkpoint}: {format_report(report)}")
    print(format_difference(diff, cfg.num_samples))
    print(json.dumps({"baseline": asdict(base_report), "report": asdict(report),
                      "difference": {k: asdict(e) for k, e in diff.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
