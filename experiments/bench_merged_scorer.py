"""Benchmark of merged scorer calls under continuous batching: a step-level beam search over many
problems, each in its own thread (`treesearch.concurrent.search_each` with the policy's
`ContinuousEngine`), its steps ranked by an external PRM (`scorers.lm_prm_scorer`), with the
threads' concurrent `score` calls merged into one call of the PRM (`treesearch.merged_scorer`,
the default) against each thread calling the PRM on its own (it takes one call at a time).
Printed as a markdown table: PRM calls, paths per call, PRM tokens forwarded, wall and CPU
seconds (medians of `--rounds` interleaved rounds, the order alternating, after an untimed run on
two problems that pays the one-time set-up) and how many problems chose the same path both ways.

    python -m experiments.bench_merged_scorer                     # tiny policy, SmolLM2 as the PRM, 32 problems
    python -m experiments.bench_merged_scorer --prm outputs/checkpoints/tiny-arith/final --problems 64

The PRM is any causal-LM folder read in the `--prm-format` layout: SmolLM2-135M-Instruct (the
packaged model, `policies.smollm2`) by default. It is not a trained PRM, so its scores mean
nothing here; how many calls the PRM gets, the tokens it forwards and the time they take are what
is measured. Its memory of scored paths is emptied before each run.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_prm_prefix import RecordingScorer, add_prm_arguments, load_prm  # noqa: E402
from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, positive_int  # noqa: E402
from policies.continuous_engine import ContinuousEngine  # noqa: E402
from scorers.lm_prm_scorer import LMPRMScorer  # noqa: E402
from treesearch.beam_search import BeamSearchConfig, beam_search  # noqa: E402
from treesearch.concurrent import search_each  # noqa: E402

WAYS: tuple[str, ...] = ("merged calls", "a call per thread")


@dataclass(frozen=True)
class WayRun:
    """One run of the search: PRM calls and paths, PRM tokens, seconds, each problem's choice."""

    calls: int
    paths: int
    prm_tokens: int
    wall_s: float
    cpu_s: float
    chosen: tuple[str | None, ...]


def run_way(work: Workload, prm: LMPRMScorer, merged: bool, cfg: BeamSearchConfig) -> WayRun:
    """The beam search of every problem in its own thread, the PRM's calls merged or not, timed."""
    prm.clear_memory()
    scorer, policy = RecordingScorer(prm), work.policy()
    wall, cpu = time.perf_counter(), time.process_time()
    with ContinuousEngine.attached(policy):
        results = search_each(beam_search, list(work.problems), policy, scorer, cfg, merge_scores=merged)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(r.compute.scorer_tokens for r in results)
    paths = sum(len(call) for call in scorer.calls)
    return WayRun(len(scorer.calls), paths, tokens, wall, cpu, tuple(r.chosen_text for r in results))


def table(runs: dict[str, list[WayRun]]) -> str:
    """Markdown: per way the PRM calls, paths per call, PRM tokens, median wall and CPU seconds and
    their ratio to a call per thread, and the problems whose choice equals that way's."""
    ref = runs[WAYS[1]]
    ref_wall, ref_cpu = statistics.median(r.wall_s for r in ref), statistics.median(r.cpu_s for r in ref)
    lines = [
        "| PRM calls | calls | paths per call | PRM tokens | wall s | / per thread | CPU s | / per thread | same choice |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, way_runs in runs.items():
        first = way_runs[0]
        wall, cpu = statistics.median(r.wall_s for r in way_runs), statistics.median(r.cpu_s for r in way_runs)
        same = sum(a == b for a, b in zip(first.chosen, ref[0].chosen))
        lines.append(
            f"| {name} | {first.calls} | {first.paths / max(first.calls, 1):.1f} | {first.prm_tokens} | {wall:.2f} | "
            f"{wall / ref_wall:.2f} | {cpu:.2f} | {cpu / ref_cpu:.2f} | {same}/{len(first.chosen)} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_merged_scorer", description=__doc__.split("\n")[0])
    add_search_arguments(ap, problems=32, n=16)
    add_prm_arguments(ap, batch_size=32)
    ap.add_argument("--depth", type=positive_int, default=20, help="most steps in a path")
    ap.add_argument("--rounds", type=positive_int, default=2)
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)
    return args


def run(work: Workload, prm_path: Path | None, prm_format: str, batch_size: int, cfg: BeamSearchConfig,
        rounds: int) -> str:
    """The report: the search both ways in interleaved rounds (module docstring)."""
    prm, prm_path = load_prm(prm_path, prm_format, batch_size)
    run_way(replace(work, problems=work.problems[:2]), prm, True, cfg)  # untimed: the first run pays one-time set-up
    runs: dict[str, list[WayRun]] = {name: [] for name in WAYS}
    for round_index in range(rounds):
        for name in WAYS if round_index % 2 == 0 else WAYS[::-1]:
            runs[name].append(run_way(work, prm, name == WAYS[0], cfg))
    header = (f"{work.description}; beam search N = {cfg.n}, M = {cfg.beam_width}, each problem in its own thread "
              f"(continuous batching); steps read by {prm_path} ({prm_format} layout, {batch_size} paths per forward, "
              f"{torch.get_num_threads()} thread(s)); medians of {rounds} interleaved rounds")
    return header + "\n\n" + table(runs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    cfg = BeamSearchConfig(n=args.n, beam_width=args.beam_width, max_depth=args.depth, seed=args.seed)
    print(run(work, args.prm, args.prm_format, args.batch_size, cfg, args.rounds))
    return 0


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
