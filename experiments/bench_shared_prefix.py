"""Benchmark: decoding with each context's KV shared by its samples (`policies.shared_prefix`, the
default) vs copied into every sample row (`TransformersPolicy(shared_prefix=False)`, the
engine before it), side by side in one run on the same problems and seeds.

Best-of-N (N samples of each prompt) and step-level beam search (M samples of each kept path)
run both ways in alternating rounds (after one untimed round of each: the KV buffer pool
filled); the table gives each way's median wall and CPU time, their ratio, the tokens generated
and accuracy (the same seeds: only float rounding differs between the two, so a few samples may).

    python -m experiments.bench_shared_prefix                      # tiny: 32 arith problems, N = 32, M = 4
    python -m experiments.bench_shared_prefix --model smollm2 --problems 2 --rounds 1
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_timing import Timing, timed  # noqa: E402
from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.registry import run_search  # noqa: E402

WAYS: dict[str, bool] = {"shared prefix": True, "copied rows": False}  # label -> TransformersPolicy(shared_prefix=)


@dataclass(frozen=True)
class WayRow:
    """One strategy run one way: median wall / CPU seconds over the timed rounds, tokens
    generated and accuracy of the last round."""

    strategy: str
    way: str
    wall_s: float
    cpu_s: float
    tokens_generated: int
    accuracy: float


def run_once(strategy: str, cfg: dict[str, Any], work: Workload, shared: bool) -> tuple[Timing, int, float]:
    """(timing, tokens generated, accuracy) of one search with a fresh policy."""
    results: list = []
    policy = work.policy(shared_prefix=shared)
    timing = timed(lambda: results.extend(run_search(strategy, work.problems, policy, ConfidenceScorer(), **cfg)))
    return timing, sum(r.compute.tokens_generated for r in results), work.accuracy(results)


def compare(strategy: str, cfg: dict[str, Any], work: Workload, rounds: int) -> list[WayRow]:
    """Both ways of one strategy: one untimed round each, then `rounds` alternating timed rounds."""
    for shared in WAYS.values():
        run_once(strategy, cfg, work, shared)
    runs: dict[str, list[tuple[Timing, int, float]]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way, shared in WAYS.items():
            runs[way].append(run_once(strategy, cfg, work, shared))
    return [
        WayRow(strategy, way, statistics.median(t.wall_s for t, _, _ in got), statistics.median(t.cpu_s for t, _, _ in got),
               got[-1][1], got[-1][2])
        for way, got in runs.items()
    ]


def table(rows: Sequence[WayRow]) -> str:
    lines = [
        "| strategy | KV of a context's samples | wall s | cpu s | time / shared (wall) | tokens generated | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    shared = {r.strategy: r for r in rows if r.way == "shared prefix"}
    for r in rows:
        lines.append(
            f"| {r.strategy} | {r.way} | {r.wall_s:.2f} | {r.cpu_s:.2f} | {r.wall_s / shared[r.strategy].wall_s:.2f}x | "
            f"{r.tokens_generated} | {r.accuracy:.3f} |"
        )
    return "\n".join(lines)


def run(work: Workload, n: int, beam_width: int, rounds: int, seed: int) -> str:
    strategies = {
        "best_of_n": dict(n=n, seed=seed),
        "beam_search": dict(n=n, beam_width=beam_width, max_depth=20, seed=seed),
    }
    rows = [row for name, cfg in strategies.items() for row in compare(name, cfg, work, rounds)]
    header = (f"{work.description}; N={n}, beam width M={beam_width}; median of {rounds} alternating rounds; "
              f"torch threads {torch.get_num_threads()}")
    return "\n".join([header, table(rows)])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=32, n=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of each way (alternating)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); both ways alike
    print(run(work, args.n, args.beam_width, args.rounds, args.seed))


if __name__ == "__main__":
    main()
