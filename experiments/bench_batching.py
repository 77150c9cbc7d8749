"""Benchmark: step-level beam search over many problems in one batched run vs one problem at a
time (search-and-learn's way), measured side by side in one run on the same problems and seeds.

Each round of a batched run sends the beams of ALL problems to the policy in one call; the
sequential run calls the strategy once per problem. The chosen answers must grade the same on
average (the per-problem seeds are the same; batching changes only float rounding). Target:
batched at least 4x faster.

    python -m experiments.bench_batching                     # 64 problems, N = 8, M = 4
    python -m experiments.bench_batching --problems 8 --n 4 --beam-width 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_prefix_reuse import DEFAULT_CHECKPOINT, load_policy_parts  # noqa: E402
from experiments.tasks import arith  # noqa: E402
from policies.prefix_cache import PrefixCacheConfig  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.beam_search import BeamSearchConfig, beam_search  # noqa: E402
from treesearch.result import SearchResult  # noqa: E402


def accuracy(results: Sequence[SearchResult]) -> float:
    return sum(arith.grade(r.problem, r.chosen_text) for r in results) / len(results)


def run(checkpoint: Path, problems: int, n: int, beam_width: int, seed: int) -> str:
    lm, tokenizer, source = load_policy_parts(checkpoint)
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_total_tokens=160)
    probs = arith.generate_problems("test", problems, seed=seed)
    cfg = BeamSearchConfig(n=n, beam_width=beam_width, max_depth=20, seed=seed)

    def policy() -> TransformersPolicy:  # a fresh prefix cache for each run: no head start
        return TransformersPolicy(lm, tokenizer, sampling, arith.prompt_text, prefix_cache=PrefixCacheConfig())

    start = time.perf_counter()
    batched = beam_search(probs, policy(), ConfidenceScorer(), cfg)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    one_by_one = [r for p in probs for r in beam_search([p], policy(), ConfidenceScorer(), cfg)]
    t_single = time.perf_counter() - start
    return "\n".join([
        f"policy: {source}; beam search N={n}, M={beam_width} on {problems} arith test problems; torch threads {torch.get_num_threads()}",
        "| run | wall s | accuracy | speed-up |",
        "|---|---:|---:|---:|",
        f"| one problem at a time | {t_single:.2f} | {accuracy(one_by_one):.3f} | 1.00 |",
        f"| all problems batched | {t_batched:.2f} | {accuracy(batched):.3f} | {t_single / t_batched:.2f} |",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.checkpoint, args.problems, args.n, args.beam_width, args.seed))


if __name__ == "__main__":
    main()
