"""Benchmark: what scoring costs in Best-of-N, measured side by side in one run.

Three ways to get Best-of-N candidates on arith, same problems, same seed, same sampling:
  none      the policy samples N rollouts and nothing scores them (the floor);
  in_gen    the policy owns an SPRM head and scores each step from the hidden state it computed
            while generating that step (ours: no second forward);
  second    the policy samples, then `SPRMScorer` runs a second full forward over every candidate
            (the reference's way: a separate scorer pass per candidate).
It prints wall time, CPU time and tokens forwarded for each and the ratios to `none` (target for
in_gen: at most 1.05). Times are medians of --repeats interleaved rounds after a warm-up round;
this process's CPU time stands beside wall time because other jobs stretch wall time unevenly.

    python -m experiments.bench_scoring_overhead                       # 32 problems x N=32
    python -m experiments.bench_scoring_overhead --problems 8 --n 8 --repeats 1
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_timing import Timing, interleaved, median_timing  # noqa: E402
from experiments.bench_workload import add_checkpoint_argument, load_tiny_parts  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import positive_int  # noqa: E402
from experiments.tasks import arith  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from policies.reflective_model import ReflectiveModel  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from scorers.sprm_scorer import SPRMScorer  # noqa: E402
from treesearch.records import Prefix, Problem  # noqa: E402


def _interleaved(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[Timing, int]]:
    """Per name: (median wall and CPU seconds, tokens forwarded of the last run), the functions
    run in interleaved rounds (none, in_gen, second, none, ...: `bench_timing.interleaved`)."""
    return {
        name: (median_timing(t for t, _ in got), got[-1][1]) for name, got in interleaved(fns, repeats).items()
    }


def _rollout_forwarded(policy: TransformersPolicy, problems: Sequence[Problem], n: int, seed: int) -> tuple[list[Prefix], int]:
    rollouts = policy.rollout([Prefix(p) for p in problems], n=n, seed=seed)
    paths = [Prefix(p, tuple(r)) for p, rs in zip(problems, rollouts) for r in rs]
    return paths, sum(s.tokens_forwarded for path in paths for s in path.steps)


def run(checkpoint: Path, problems: int, n: int, repeats: int, seed: int) -> str:
    lm, tokenizer, source = load_tiny_parts(checkpoint)
    reflective = ReflectiveModel(lm).eval()  # a fresh head: its values do not change the cost
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_total_tokens=160)
    plain = TransformersPolicy(lm, tokenizer, sampling, arith.prompt_text)
    scored = TransformersPolicy.from_reflective(reflective, tokenizer, sampling, arith.prompt_text)
    scorer = SPRMScorer(reflective, tokenizer, arith.prompt_text, batch_size=64)
    probs = arith.generate_problems("test", problems, seed=seed)

    def none() -> int:
        return _rollout_forwarded(plain, probs, n, seed)[1]

    def in_gen() -> int:
        paths, forwarded = _rollout_forwarded(scored, probs, n, seed)
        assert all(s.score is not None for p in paths for s in p.steps[:-1]), "steps without head scores"
        return forwarded

    def second() -> int:
        paths, forwarded = _rollout_forwarded(plain, probs, n, seed)
        scorer.score(paths)
        return forwarded + scorer.cost(paths)

    warm = {"none": none, "in_gen": in_gen, "second": second}
    for fn in warm.values():
        fn()  # one untimed round: first-call costs (allocator, lazy init) out of the medians
    rows = _interleaved(warm, repeats)
    base, base_f = rows["none"]
    lines = [
        f"policy: {source}; {problems} arith test problems x N={n}; torch threads {torch.get_num_threads()}; "
        f"median of {repeats} interleaved rounds after one warm-up round",
        "| scoring | wall s | CPU s | tokens forwarded | wall / none | CPU / none | forwarded / none |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (t, f) in rows.items():
        lines.append(
            f"| {name} | {t.wall_s:.2f} | {t.cpu_s:.2f} | {f} | {t.wall_s / base.wall_s:.3f} | "
            f"{t.cpu_s / base.cpu_s:.3f} | {f / base_f:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_scoring_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(ap)
    ap.add_argument("--problems", type=positive_int, default=32)
    ap.add_argument("--n", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); every variant alike
    print(run(args.checkpoint, args.problems, args.n, args.repeats, args.seed))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
