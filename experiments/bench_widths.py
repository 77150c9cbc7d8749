"""Benchmark: REBASE and particle filtering sampling each round in one policy call
(`TransformersPolicy.propose_widths`: every node its own width) vs one `propose` call per
distinct width (what a policy without `propose_widths` gets, `frontier.grow_nodes`), side by
side in one run on the same problems.

Both strategies give the nodes of a round different widths (REBASE: shares of the budget by
reward; particle filtering: how often a particle was drawn), so without per-node widths a round
is several calls, each a batched decode of fewer rows. The ways draw different samples (the
calls are seeded per call), so tokens and accuracy differ a little; the table's tokens/s ratio
is the fair one, and its last column counts the policy calls per problem.

    python -m experiments.bench_widths                      # tiny: 32 arith problems, N = 32
    python -m experiments.bench_widths --model smollm2 --problems 4 --n 8 --rounds 1
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

from dataclasses import dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

from experiments.bench_ways import ways_main, ways_report  # noqa: E402
from experiments.bench_workload import Workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from treesearch.protocols import Policy  # noqa: E402
from treesearch.records import Prefix, Step  # noqa: E402


@dataclass(frozen=True)
class ProposeOnly:
    """A policy seen without its `propose_widths`: the search then makes one call per width."""

    inner: Policy

    @property
    def num_parameters(self) -> int:
        return self.inner.num_parameters

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        return self.inner.propose(prefixes, n, seed, stop_at_step)

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        return self.inner.rollout(prefixes, n, seed)


def run(work: Workload, n: int, beam_width: int, rounds: int, seed: int) -> str:
    """REBASE and particle filtering at N = n (beam_width unused), both ways."""
    ways = {"one call per round": lambda: work.policy(), "one call per width": lambda: ProposeOnly(work.policy())}
    strategies = {
        "rebase": dict(n=n, max_depth=20, seed=seed),
        "particle_filtering": dict(n=n, max_depth=20, seed=seed),
    }
    return ways_report(work, ways, n, beam_width, rounds, seed, way_title="policy calls", strategies=strategies)


def main(argv: Sequence[str] | None = None) -> None:
    ways_main(__doc__, argv, run, prog="python -m experiments.bench_widths", beam=False)


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
