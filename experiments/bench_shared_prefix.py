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

from typing import Sequence  # noqa: E402

from experiments.bench_ways import flag_ways_report, ways_main  # noqa: E402
from experiments.bench_workload import Workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402

WAYS: dict[str, bool] = {"shared prefix": True, "copied rows": False}  # label -> TransformersPolicy(shared_prefix=)


def run(work: Workload, n: int, beam_width: int, rounds: int, seed: int) -> str:
    return flag_ways_report(
        work, "shared_prefix", WAYS, n, beam_width, rounds, seed,
        way_title="KV of a context's samples",
    )


def main(argv: Sequence[str] | None = None) -> None:
    ways_main(__doc__, argv, run, prog="python -m experiments.bench_shared_prefix")


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
