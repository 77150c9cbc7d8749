"""Benchmark: peak resident memory (RSS) of Best-of-N and of a many-problem beam search on arith,
and how it grows with N, each configuration in a fresh process.

`ru_maxrss` is a high-water mark, so the parent runs every configuration in a child process of
this same script (`--child`), which loads the policy, notes its RSS, runs the search once and
prints one JSON line; the parent collects them into one table. Columns: RSS after loading
(interpreter, torch, model, and one untimed one-sample search on a policy of its own, so the
one-time set-up of a first search, ~21 MiB, is counted here), the peak over the whole child, and
their difference (what the search itself added at its worst: KV caches, prefix cache, logits,
records). Beam search runs
with the prefix cache on (as `experiments.bench_batching`; its budget, 512 MiB by default,
bounds what it keeps) and the confidence scorer.

    python -m experiments.bench_memory                        # N = 4, 8, 16, 32
    python -m experiments.bench_memory --ns 2 --bon-problems 2 --beam-problems 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

from experiments.bench_workload import add_checkpoint_argument, has_checkpoint, load_tiny_parts  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import int_list, positive_int  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NS = (4, 8, 16, 32)


@dataclass(frozen=True)
class MemoryConfig:
    """One child run: strategy ("best_of_n" | "beam_search"), N, problems, beam width M."""

    strategy: str
    n: int
    problems: int
    beam_width: int = 4

    def __post_init__(self) -> None:
        if self.strategy not in ("best_of_n", "beam_search"):
            raise ValueError(f"MemoryConfig.strategy={self.strategy!r}; valid: best_of_n, beam_search")
        if self.strategy == "beam_search" and not 1 <= self.beam_width <= self.n:
            raise ValueError(f"MemoryConfig.beam_width={self.beam_width} must be in [1, n={self.n}]")


@dataclass(frozen=True)
class MemoryRow:
    """What a child reports: its config, RSS after loading and peak RSS (MiB), search wall s."""

    config: MemoryConfig
    loaded_mib: float
    peak_mib: float
    wall_s: float

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.loaded_mib


def child(config: MemoryConfig, checkpoint: Path, seed: int) -> dict:
    """Load the policy, run the configured search once, return the measurements (JSON-ready)."""
    from experiments.bench_timing import current_rss_mib, peak_rss_mib, timed
    from experiments.tasks import arith
    from policies.prefix_cache import PrefixCacheConfig
    from policies.sampling_config import SamplingConfig
    from policies.transformers_policy import TransformersPolicy
    from scorers.confidence import ConfidenceScorer
    from treesearch.records import Prefix
    from treesearch.registry import run_search

    lm, tokenizer, _ = load_tiny_parts(checkpoint)
    problems = arith.generate_problems("test", config.problems, seed=seed)
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_total_tokens=160)
    cache = PrefixCacheConfig() if config.strategy == "beam_search" else None
    policy = TransformersPolicy(lm, tokenizer, sampling, arith.prompt_text, prefix_cache=cache)
    settings = dict(n=config.n, seed=seed)
    if config.strategy == "beam_search":
        settings.update(beam_width=config.beam_width, max_depth=20)
    # one sample of one problem first, on a policy of its own: the one-time set-up of a first
    # search (lazy initialisation, library buffers, ~21 MiB here) is no search's growth
    TransformersPolicy(lm, tokenizer, sampling, arith.prompt_text).rollout([Prefix(problems[0])], n=1, seed=seed)
    loaded = current_rss_mib()
    timing = timed(lambda: run_search(config.strategy, problems, policy, ConfidenceScorer(), **settings))
    return {"loaded_mib": loaded, "peak_mib": peak_rss_mib(), "wall_s": timing.wall_s}


def measure(config: MemoryConfig, checkpoint: Path, threads: int, seed: int) -> MemoryRow:
    """Run one configuration in a fresh child process of this script."""
    command = [
        sys.executable, "-m", "experiments.bench_memory", "--child", config.strategy, "--n", str(config.n),
        "--problems", str(config.problems), "--beam-width", str(config.beam_width),
        "--threads", str(threads), "--seed", str(seed),
    ]
    if has_checkpoint(checkpoint):  # else the child's default: the same random tiny Llama
        command += ["--checkpoint", str(checkpoint.resolve())]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {config} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return MemoryRow(config, report["loaded_mib"], report["peak_mib"], report["wall_s"])


def markdown_table(rows: Sequence[MemoryRow]) -> str:
    lines = [
        "| strategy | problems | N | search wall s | RSS after load MiB | peak RSS MiB | search adds MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.config
        name = c.strategy if c.strategy == "best_of_n" else f"beam_search (M={c.beam_width})"
        lines.append(
            f"| {name} | {c.problems} | {c.n} | {r.wall_s:.1f} | {r.loaded_mib:.0f} | {r.peak_mib:.0f} | "
            f"{r.growth_mib:.0f} |"
        )
    return "\n".join(lines)


def run(
    checkpoint: Path, ns: Sequence[int], bon_problems: int, beam_problems: int, beam_width: int,
    threads: int, seed: int,
) -> str:
    configs = [MemoryConfig("best_of_n", n, bon_problems) for n in ns]
    configs += [MemoryConfig("beam_search", n, beam_problems, min(beam_width, n)) for n in ns]
    rows = [measure(c, checkpoint, threads, seed) for c in configs]
    source = f"checkpoint {checkpoint}" if has_checkpoint(checkpoint) else "random tiny Llama (no checkpoint found)"
    return "\n".join([
        f"policy: {source}; arith test problems; one fresh process per row; torch threads {threads}",
        markdown_table(rows),
    ])


def main(argv: Sequence[str] | None = None) -> None:

    ap = argparse.ArgumentParser(prog="python -m experiments.bench_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(ap)
    ap.add_argument("--ns", type=int_list(), default=DEFAULT_NS,
                    help="comma-separated N values (default 4,8,16,32)")
    ap.add_argument("--bon-problems", type=positive_int, default=32)
    ap.add_argument("--beam-problems", type=positive_int, default=64)
    ap.add_argument("--beam-width", type=positive_int, default=4,
                    help="beam search's M (min(M, N) at a smaller N; a larger N must be a multiple of M)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads of each child (1 on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=("best_of_n", "beam_search"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=positive_int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--problems", type=positive_int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for n in () if args.child else args.ns:  # beam search runs M = min(--beam-width, N) at each N (`run`)
        if n % min(args.beam_width, n):
            ap.error(f"argument --ns: {n} must be divisible by --beam-width ({args.beam_width}) for beam search")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        config = MemoryConfig(args.child, args.n, args.problems, args.beam_width)
        print(json.dumps({"config": asdict(config), **child(config, args.checkpoint, args.seed)}))
        return
    print(run(args.checkpoint, args.ns, args.bon_problems, args.beam_problems, args.beam_width,
              args.threads, args.seed))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
