"""Benchmark: the policy's weights in bfloat16 vs float32 (`policy.dtype=bfloat16`), side by side
in one run on the same problems and seeds: Best-of-N and step-level beam search, time, tokens/s
and accuracy each way (`experiments.bench_ways`: alternating rounds, medians).

On a CPU with bf16 matmul instructions (AVX-512 BF16 / AMX; `python -m experiments.bench_flops`
prints the bf16 matmul peak beside fp32's) a decode step reads half the weight bytes and
multiplies faster; on one without them bf16 can be slower: measure before switching. The two
dtypes sample different tokens (bf16 rounds the logits' inputs), so the runs do not generate the
same text; compare tokens/s, and accuracy only over enough problems.

    python -m experiments.bench_dtype                                   # tiny: 32 arith problems, N = 32, M = 4
    python -m experiments.bench_dtype --model smollm2 --problems 2 --n 8 --rounds 1
On a CPU without bf16 matmul instructions (`policies.bf16_support.native_bf16`) it says so and
times nothing unless given --force (`make bench` would otherwise wait on a known loss).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import copy  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_ways import ways_report  # noqa: E402
from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, positive_int  # noqa: E402
from policies.bf16_support import native_bf16  # noqa: E402
from policies.checkpoint import torch_dtype  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402

REFERENCE = "float32"
SKIPPED = ("skipped: this CPU has no bf16 matmul instructions (policies/bf16_support.py), where torch runs a "
           "bf16 matmul through a slow fallback (an AVX2-only EPYC's was 56x slower than fp32, measured once, not in "
           "this run); keep float32 weights (--force times it anyway)")


def run(work: Workload, n: int, beam_width: int, rounds: int, seed: int, other: str = "bfloat16") -> str:
    """The table of both strategies in float32 (the workload's model) and in `other`."""
    converted = copy.deepcopy(work.lm).to(torch_dtype(other))  # what loading the checkpoint in `other` gives
    ways = {REFERENCE: lambda: work.policy(), other: lambda: work.policy(lm=converted)}
    return ways_report(work, ways, n, beam_width, rounds, seed, way_title="weights")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_dtype", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=32, n=32)
    ap.add_argument("--rounds", type=positive_int, default=3, help="timed rounds of each dtype (alternating)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="compared with float32")
    ap.add_argument("--force", action="store_true", help="time bf16 even on a CPU without bf16 matmuls")
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)
    if args.dtype == "bfloat16" and not native_bf16() and not args.force:
        print(SKIPPED)
        return
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    if next(work.lm.parameters()).dtype != torch.float32:
        raise SystemExit(f"the workload's model is {next(work.lm.parameters()).dtype}, not float32")
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); both dtypes alike
    print(run(work, args.n, args.beam_width, args.rounds, args.seed, args.dtype))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
