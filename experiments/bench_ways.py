"""Side-by-side runs of the same searches under several ways of building the policy (the shared
machinery of `experiments/bench_shared_prefix.py`, `experiments/bench_forked.py` and
`experiments/bench_dtype.py`).

Each strategy runs every way once untimed (the KV buffer pool filled), then in `rounds`
alternating timed rounds, so a noisy machine slows all ways alike; a row holds the median wall
and CPU seconds, the tokens generated and the accuracy of the last round.

    ways = {"shared prefix": lambda: work.policy(shared_prefix=True), "copied rows": lambda: work.policy(shared_prefix=False)}
    print(ways_report(work, ways, n=32, beam_width=4, rounds=3, seed=0, way_title="KV of a context's samples"))
    # the same, ways that differ in one `Workload.policy` keyword; and a script's whole command line:
    flag_ways_report(work, "shared_prefix", {"shared prefix": True, "copied rows": False}, 32, 4, 3, 0, "KV ...")
    ways_main(__doc__, argv, run)      # run(work, n, beam_width, rounds, seed) -> the table
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from experiments.bench_timing import Timing, timed
from experiments.bench_workload import Workload, add_search_arguments, load_workload
from experiments.cli_args import check_beam_shape, positive_int
from policies.gc_freeze import freeze_long_lived
from scorers.confidence import ConfidenceScorer
from treesearch.protocols import Policy
from treesearch.registry import run_search


@dataclass(frozen=True)
class WayRow:
    """One strategy run one way: median wall / CPU seconds over the timed rounds; tokens
    generated, accuracy and policy calls per problem (mean) of the last round."""

    strategy: str
    way: str
    wall_s: float
    cpu_s: float
    tokens_generated: int
    accuracy: float
    calls_per_problem: float


@dataclass(frozen=True)
class WayRun:
    """One search of the workload's problems: its timing, tokens generated, accuracy and the
    mean policy calls per problem."""

    timing: Timing
    tokens_generated: int
    accuracy: float
    calls_per_problem: float


def run_once(strategy: str, cfg: dict[str, Any], work: Workload, policy: Policy) -> WayRun:
    """One search of the workload's problems, timed."""
    results: list = []
    timing = timed(lambda: results.extend(run_search(strategy, work.problems, policy, ConfidenceScorer(), **cfg)))
    calls = sum(r.compute.policy_calls for r in results) / max(len(results), 1)
    return WayRun(timing, sum(r.compute.tokens_generated for r in results), work.accuracy(results), calls)


def compare(
    strategy: str, cfg: dict[str, Any], work: Workload, ways: Mapping[str, Callable[[], Policy]], rounds: int
) -> list[WayRow]:
    """Every way of one strategy (ways: label -> a fresh policy): one untimed round each, then
    `rounds` alternating timed rounds."""
    for make_policy in ways.values():
        run_once(strategy, cfg, work, make_policy())
    runs: dict[str, list[WayRun]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, make_policy in ways.items():
            runs[way].append(run_once(strategy, cfg, work, make_policy()))
    return [
        WayRow(strategy, way, statistics.median(r.timing.wall_s for r in got),
               statistics.median(r.timing.cpu_s for r in got), got[-1].tokens_generated, got[-1].accuracy,
               got[-1].calls_per_problem)
        for way, got in runs.items()
    ]


def way_table(rows: Sequence[WayRow], reference: str, way_title: str) -> str:
    """Markdown: per row its time / the reference way's (wall, same strategy), its tokens/s /
    the reference's (the ways may generate different tokens), accuracy and policy calls."""
    lines = [
        f"| strategy | {way_title} | wall s | cpu s | time / {reference} (wall) | tokens generated | tokens/s "
        f"| tokens/s / {reference} | accuracy | policy calls / problem |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.strategy: r for r in rows if r.way == reference}
    for r in rows:
        rate, base_rate = r.tokens_generated / r.wall_s, base[r.strategy].tokens_generated / base[r.strategy].wall_s
        lines.append(
            f"| {r.strategy} | {r.way} | {r.wall_s:.2f} | {r.cpu_s:.2f} | {r.wall_s / base[r.strategy].wall_s:.2f}x | "
            f"{r.tokens_generated} | {rate:.1f} | {rate / base_rate:.2f}x | {r.accuracy:.3f} | {r.calls_per_problem:.1f} |"
        )
    return "\n".join(lines)


def ways_report(
    work: Workload, ways: Mapping[str, Callable[[], Policy]], n: int, beam_width: int, rounds: int, seed: int,
    way_title: str, strategies: Mapping[str, dict[str, Any]] | None = None,
) -> str:
    """Best-of-N and beam search (N = n, M = beam_width), or the given strategies (name -> its
    settings), every way (the first is the reference of the ratios), as a header line and
    `way_table`."""
    runs = strategies or {
        "best_of_n": dict(n=n, seed=seed),
        "beam_search": dict(n=n, beam_width=beam_width, max_depth=20, seed=seed),
    }
    rows = [row for name, cfg in runs.items() for row in compare(name, cfg, work, ways, rounds)]
    shape = f"N={n}, beam width M={beam_width}" if strategies is None else f"N={n}"
    header = (f"{work.description}; {shape}; median of {rounds} alternating rounds; "
              f"torch threads {torch.get_num_threads()}")
    return "\n".join([header, way_table(rows, reference=next(iter(ways)), way_title=way_title)])


def flag_ways_report(
    work: Workload, flag: str, ways: Mapping[str, Any], n: int, beam_width: int, rounds: int, seed: int,
    way_title: str,
) -> str:
    """`ways_report` of policies that differ in one keyword of `Workload.policy` (ways: label ->
    the value of `flag`, e.g. {"forked": True, "every row alone": False} for flag "forked")."""
    makers = {way: (lambda value=value: work.policy(**{flag: value})) for way, value in ways.items()}
    return ways_report(work, makers, n, beam_width, rounds, seed, way_title)


def ways_main(
    doc: str, argv: Sequence[str] | None, run: Callable[[Workload, int, int, int, int], str],
    prog: str = "python -m experiments.bench_ways", beam: bool = True,
) -> None:
    """The command line of a two-way benchmark (prog: its name in usage and errors): the search
    options (32 problems, N = 32) and --rounds; prints run(work, n, beam_width, rounds, seed).
    beam=False: run makes no beam search, so N need not split into beams of --beam-width."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=32, n=32)
    ap.add_argument("--rounds", type=positive_int, default=3, help="timed rounds of each way (alternating)")
    args = ap.parse_args(argv)
    if beam:
        check_beam_shape(ap, args.n, args.beam_width)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); every way alike
    print(run(work, args.n, args.beam_width, args.rounds, args.seed))
