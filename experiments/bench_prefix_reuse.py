"""Benchmark of cross-call prefix reuse in the transformers backend: step-level beam search,
MCTS, REBASE and particle filtering on arith, each run with the prefix cache OFF and ON, side by
side, as a markdown table.

    python -m experiments.bench_prefix_reuse                       # 16 test problems
    python -m experiments.bench_prefix_reuse --problems 4 --checkpoint /tmp/runs/r1/final

The policy is the trained checkpoint (default outputs/checkpoints/tiny-arith/final) when it exists,
else a freshly initialised tiny Llama with the tiny tokenizer (a random model rarely ends a step
on the separator, so its trees are shallow and reuse has little to save: train first for a
meaningful number). The scorer is the policy's own confidence (no forward pass), so every token
counted is the policy's.

Columns: tokens generated and tokens forwarded (prefills + fed-back tokens, from
`Step.tokens_forwarded`, summed over problems), their ratio (without reuse every round re-prefills
prompt and path; with reuse each extended child forwards about one token), the context tokens
prefilled alone (counted by a hook on the model's prefill forwards, `PrefillCounter`: what reuse
saves; forked decoding, which forwards the samples of a context once while they decode alike, keeps
the ratio of beam search below 1 even without reuse, so this column is the one that isolates
reuse), wall time of the
search call, the cache hit rate (lookups of a prefix that found a cached prefix of it), mean
candidates per problem, accuracy of the chosen answers, and whether the cached run chose the same
texts as the uncached one (it should: the cache changes only float rounding).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import add_checkpoint_argument, load_tiny_parts  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import positive_int  # noqa: E402
from experiments.tasks import arith  # noqa: E402
from policies.prefix_cache import PrefixCacheConfig  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.records import Problem  # noqa: E402
from treesearch.registry import run_search  # noqa: E402
from treesearch.result import SearchResult  # noqa: E402

# Strategy settings: beam search with N=16 paths, 4 samples per beam; MCTS with the beam search's
# compute as its cap, as the demo's sweep matches it (`experiments.demo_sweep`): a token budget
# equal to the beam search's tokens per problem (the uncached beam run, measured first in the
# same run), up to 16 x 16 simulations to spend it (its trees close before that: it spends about
# 40% of it on the tiny arith policy, a cap and not a match).
STRATEGIES: dict[str, dict[str, Any]] = {
    "beam_search": dict(n=16, beam_width=4, max_depth=20),
    "mcts": dict(iterations=16 * 16, expand_width=4, leaves_per_round=4, max_depth=20),
    "rebase": dict(n=16, max_depth=20),
    "particle_filtering": dict(n=16, max_depth=20),
}
AT_N: tuple[str, ...] = ("rebase", "particle_filtering")  # run at beam search's N as they are


@dataclass(frozen=True)
class BenchRow:
    """One (strategy, reuse) run summed over problems (see the module docstring for columns)."""

    strategy: str
    reuse: bool
    tokens_generated: int
    tokens_forwarded: int
    prefilled: int
    wall_s: float
    hit_rate: float | None
    candidates_per_problem: float
    accuracy: float
    chosen_texts: tuple[str | None, ...]

    @property
    def ratio(self) -> float:
        return self.tokens_forwarded / max(self.tokens_generated, 1)


def run_one(
    strategy: str, reuse: bool, problems: Sequence[Problem], model: Any, tokenizer: Any,
    sampling: SamplingConfig, max_bytes: int, **overrides: Any,
) -> BenchRow:
    """One search over all problems with a fresh policy (an empty cache when reuse is on);
    overrides: strategy settings on top of STRATEGIES[strategy]."""
    cache = PrefixCacheConfig(max_bytes=max_bytes) if reuse else None
    policy = TransformersPolicy(model, tokenizer, sampling, arith.prompt_text, prefix_cache=cache)
    prefill = PrefillCounter()
    handle = model.register_forward_pre_hook(prefill.count, with_kwargs=True)
    start = time.perf_counter()
    settings = {**STRATEGIES[strategy], **overrides}
    try:
        results = run_search(strategy, problems, policy, ConfidenceScorer(), **settings)
    finally:
        handle.remove()
    wall = time.perf_counter() - start
    stats = policy.prefix_cache.stats() if policy.prefix_cache is not None else None
    return BenchRow(
        strategy, reuse,
        sum(r.compute.tokens_generated for r in results),
        sum(r.compute.tokens_forwarded for r in results),
        prefill.tokens,
        wall,
        stats.hit_rate if stats is not None else None,
        sum(len(r.candidates) for r in results) / max(len(results), 1),
        sum(_correct(r) for r in results) / max(len(results), 1),
        tuple(_chosen_text(r) for r in results),
    )


class PrefillCounter:
    """Context tokens the model ran in prefill forwards (`policies.decode_loop.prefill`'s, the
    ones asking for the last position's logits alone: `logits_to_keep`; left pads not counted:
    the new columns of the attention mask), one token wide too (a cached context extended by the
    one token sampled last, with reuse); decode forwards are not counted. `count` is a forward
    pre-hook (`register_forward_pre_hook(..., with_kwargs=True)`)."""

    def __init__(self) -> None:
        self.tokens = 0

    def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or "logits_to_keep" not in kwargs:
            return
        mask = kwargs.get("attention_mask")
        self.tokens += int(mask[:, -ids.shape[1]:].sum()) if mask is not None else int(ids.numel())


def _chosen_text(result: SearchResult) -> str | None:
    chosen = result.chosen_candidate
    return None if chosen is None else chosen.text


def _correct(result: SearchResult) -> bool:
    text = _chosen_text(result)
    return text is not None and arith.grade(result.problem, text)


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """The results as a markdown table; 'same choice' compares each ON row with its OFF row."""
    off = {row.strategy: row for row in rows if not row.reuse}
    lines = [
        "| strategy | reuse | tokens generated | tokens forwarded | forwarded/generated | context prefilled | wall s "
        "| hit rate | candidates/problem | accuracy | same choice as off |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        hit = "-" if row.hit_rate is None else f"{row.hit_rate:.2f}"
        same = "-" if not row.reuse or row.strategy not in off else (
            "yes" if row.chosen_texts == off[row.strategy].chosen_texts else "no")
        lines.append(
            f"| {row.strategy} | {'on' if row.reuse else 'off'} | {row.tokens_generated} | "
            f"{row.tokens_forwarded} | {row.ratio:.2f} | {row.prefilled} | {row.wall_s:.1f} | {hit} | "
            f"{row.candidates_per_problem:.1f} | {row.accuracy:.2f} | {same} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_prefix_reuse", description="Prefix reuse OFF vs ON for beam search, MCTS, REBASE and particle filtering on arith.")
    parser.add_argument("--problems", type=positive_int, default=16, help="arith test problems")
    add_checkpoint_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="problem generation seed")
    parser.add_argument("--max-bytes", type=positive_int, default=PrefixCacheConfig().max_bytes, help="cache budget")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 on a shared CPU)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, source = load_tiny_parts(args.checkpoint)
    problems = arith.generate_problems("test", args.problems, seed=args.seed)
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_step_tokens=48,
                              max_total_tokens=256, batch_size=256)
    rows = [run_one("beam_search", reuse, problems, model, tokenizer, sampling, args.max_bytes) for reuse in (False, True)]
    token_budget = math.ceil(rows[0].tokens_generated / len(problems))  # the uncached beam search's
    rows += [
        run_one("mcts", reuse, problems, model, tokenizer, sampling, args.max_bytes, token_budget=token_budget)
        for reuse in (False, True)
    ]
    rows += [run_one(name, reuse, problems, model, tokenizer, sampling, args.max_bytes)
             for name in AT_N for reuse in (False, True)]
    print(f"policy: {source}; {len(problems)} arith test problems; scorer: confidence; "
          f"threads: {args.threads}; cache budget: {args.max_bytes / 2**20:.0f} MiB")
    print(f"strategies: {STRATEGIES}; MCTS token_budget: {token_budget} per problem (beam search's)")
    print(markdown_table(rows))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
