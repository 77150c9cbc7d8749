"""Benchmark of the two generation backends side by side: Best-of-16 and step-level beam search
(N=16, beam width 4) on the same arith test problems with `TransformersPolicy` (cross-call prefix
reuse on) and with `VLLMPolicy` (vLLM's offline engine, prefix caching on), as a markdown table.

    python -m experiments.bench_vllm                              # 64 test problems, blocks 16,32,64
    python -m experiments.bench_vllm --problems 8 --block-sizes 32 --checkpoint /tmp/runs/r1/final

The policy is the trained checkpoint (default outputs/checkpoints/tiny-arith/final). When it is
missing, the benchmark says so and uses a freshly initialised tiny Llama written to a temporary
folder (vLLM needs a folder): it rarely ends a step or answers, so accuracy is ~0 and the trees
are shallow; train first (`python -m experiments.train_sft --out outputs/checkpoints/tiny-arith`).

Columns: tokens generated and tokens forwarded (`Compute`, summed over problems, discarded
samples included; forwarded = prefills not served from a cache + fed-back tokens), wall time of
the search call, tokens/s = generated / wall, accuracy of the chosen answers; for vLLM rows the
prompt tokens sent (prompt + prefix + tokens so far, every request) and three shares of them:
  cached     served from vLLM's prefix cache (`VLLMUsage.cached_share`, what vLLM reported);
  reachable  what a cache of unlimited size could have served at this block size: the leading
             full blocks of a request's prompt that an earlier request had computed (earlier
             prompts, and prompt + generated tokens of earlier engine calls), vLLM's block-hash
             rule replayed over the requests this run sent;
  block cap  the leading full blocks of every prompt but its last token, as if every prefix had
             been computed before: vLLM caches whole blocks only and always recomputes the last
             prompt token, so no cache of this block size serves more.
cached < reachable means evictions or requests batched before their prefix was computed;
reachable < block cap means prefixes seen for the first time (each problem's prompt, and steps
whose tokens did not fill a block before they were resent). Each backend first runs each strategy
once untimed on one problem (a process's one-time costs: vLLM's first generate took ~2 s more);
each vLLM run then starts from an empty prefix cache (`LLM.reset_prefix_cache`). On CPU the block size must be a multiple of 32 (a
smaller one is reported as rejected); arith prompts are 29-54 tokens and steps ~7 tokens, so
block granularity, not the cache, bounds the share. A second table replays the same requests at
other block sizes (--what-if-blocks; 1 is the bound of token-level prefix reuse).

vLLM engines here run with chunked prefill off on CPU (`VLLMEngineConfig.enable_chunked_prefill`
says why).

The samples of the two backends differ (vLLM's sampler draws from other random streams), so
accuracies differ by sampling noise; greedy outputs are equal (tests/test_vllm_policy.py). Both
backends run with --threads torch threads (vLLM's in-process CPU engine uses the same pool).

Test: `.venv/bin/pytest tests/test_bench_vllm.py` (a tiny run, marked vllm).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import astuple, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, int_list, positive_float, positive_int  # noqa: E402
from experiments.bench_workload import add_checkpoint_argument  # noqa: E402
from experiments.tasks import arith  # noqa: E402
from policies.checkpoint import save_checkpoint  # noqa: E402
from policies.prefix_cache import PrefixCacheConfig  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.tiny_model import TinyModelConfig, build_model  # noqa: E402
from policies.tiny_tokenizer import build_tokenizer  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from policies import vllm_engine  # noqa: E402
from policies.vllm_engine import VLLMEngineConfig  # noqa: E402
from policies.vllm_policy import VLLMPolicy, VLLMUsage  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.records import Problem  # noqa: E402
from treesearch.registry import run_search  # noqa: E402
from treesearch.result import SearchResult  # noqa: E402

# the policy=tiny sampling settings (experiments/conf/policy/tiny.yaml)
SAMPLING = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_step_tokens=64, max_total_tokens=160)


@dataclass(frozen=True)
class CacheBound:
    """What a prefix cache of block_size could have served of a run's prompt tokens (module
    docstring): reachable (unlimited cache, prefixes computed before) and block_cap (every
    prefix computed before)."""

    block_size: int
    reachable: int
    block_cap: int


@dataclass(frozen=True)
class BenchRow:
    """One (strategy, backend) run summed over problems (module docstring for the columns).

    block_size: vLLM's KV block size (None for transformers). rejected: why vLLM refused to start
    (then every count is 0). usage: vLLM's request counts (None for transformers). bounds: the
    cache bounds at the engine's block size (first) and at the what-if block sizes.
    """

    strategy: str
    backend: str
    block_size: int | None
    tokens_generated: int = 0
    tokens_forwarded: int = 0
    wall_s: float = 0.0
    accuracy: float = 0.0
    usage: VLLMUsage | None = None
    bounds: tuple[CacheBound, ...] = ()
    rejected: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class BlockCacheReplay:
    """vLLM's prefix-cache rule replayed at one block size: a full block is keyed by its tokens
    and its parent block's key (all tokens up to its end, as vLLM's block hashes); a request's
    prompt blocks count from its first request on (requests of one engine call share them), a
    sampled token's once it has been fed (all generated tokens but the last, after the call);
    the last prompt token is always recomputed. Counts `reachable` and `block_cap` tokens."""

    block_size: int
    reachable: int = 0
    block_cap: int = 0
    computed: set[int] = field(default_factory=set)

    def request(self, prompt: Sequence[int]) -> None:
        keys = self._keys(prompt[:-1])
        self.block_cap += len(keys) * self.block_size
        hits = next((k for k, key in enumerate(keys) if key not in self.computed), len(keys))
        self.reachable += hits * self.block_size
        self.computed.update(keys)

    def fed(self, tokens: Sequence[int]) -> None:
        self.computed.update(self._keys(tokens))

    def bound(self) -> CacheBound:
        return CacheBound(self.block_size, self.reachable, self.block_cap)

    def _keys(self, tokens: Sequence[int]) -> list[int]:
        keys, key = [], 0
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            key = hash((key, tuple(tokens[end - self.block_size : end])))
            keys.append(key)
        return keys


@dataclass
class RecordingLLM:
    """A `vllm.LLM` stand-in that passes every call through and feeds each request's prompt and
    fed tokens to the replays (one per block size)."""

    llm: Any
    replays: tuple[BlockCacheReplay, ...]

    def __getattr__(self, name: str) -> Any:  # everything but generate goes to the engine
        return getattr(self.llm, name)

    def generate(self, prompts: Sequence[dict], params: Any, **kwargs: Any) -> list[Any]:
        for prompt in prompts:
            for replay in self.replays:
                replay.request(list(prompt["prompt_token_ids"]))
        outputs = self.llm.generate(prompts, params, **kwargs)
        for prompt, output in zip(prompts, outputs):
            fed = list(prompt["prompt_token_ids"]) + list(output.outputs[0].token_ids)[:-1]
            for replay in self.replays:
                replay.fed(fed)
        return outputs


# -- runs ---------------------------------------------------------------------------------------


def strategies(n: int, beam_width: int) -> dict[str, dict[str, Any]]:
    return {"best_of_n": dict(n=n), "beam_search": dict(n=n, beam_width=beam_width, max_depth=20)}


def warm_up(policy: Any, problems: Sequence[Problem], plan: dict[str, dict[str, Any]]) -> None:
    """Each strategy once, untimed, on the first problem with another seed: a backend's one-time
    costs per process (vLLM's first generate took ~2 s more than later ones) stay out of the rows."""
    for strategy, settings in plan.items():
        run_search(strategy, problems[:1], policy, ConfidenceScorer(), **{**settings, "seed": 1})


def timed_search(strategy: str, problems: Sequence[Problem], policy: Any, settings: dict[str, Any]):
    start = time.perf_counter()
    results = run_search(strategy, problems, policy, ConfidenceScorer(), **settings)
    return results, time.perf_counter() - start


def totals(results: Sequence[SearchResult]) -> tuple[int, int]:
    """(tokens generated, tokens forwarded) summed over problems."""
    return sum(r.compute.tokens_generated for r in results), sum(r.compute.tokens_forwarded for r in results)


def accuracy(results: Sequence[SearchResult]) -> float:
    return sum(arith.grade(r.problem, r.chosen_text) for r in results if r.chosen is not None) / max(len(results), 1)


def run_transformers(
    checkpoint: Path, problems: Sequence[Problem], plan: dict[str, dict[str, Any]], sampling: SamplingConfig
) -> list[BenchRow]:
    rows = []
    fresh = lambda: TransformersPolicy.from_pretrained(  # noqa: E731
        checkpoint, sampling, arith.prompt_text, prefix_cache=PrefixCacheConfig())
    warm_up(fresh(), problems, plan)
    for strategy, settings in plan.items():  # a fresh policy each: an empty prefix cache
        policy = fresh()
        results, wall = timed_search(strategy, problems, policy, settings)
        rows.append(BenchRow(strategy, "transformers", None, *totals(results), wall, accuracy(results)))
    return rows


def run_vllm(
    checkpoint: Path, problems: Sequence[Problem], plan: dict[str, dict[str, Any]], sampling: SamplingConfig,
    block_size: int, kv_cache_gib: float, threads: int, what_if_blocks: Sequence[int] = (),
) -> list[BenchRow]:
    engine = VLLMEngineConfig(str(checkpoint), block_size=block_size, kv_cache_gib=kv_cache_gib)
    try:
        policy = VLLMPolicy.from_pretrained(checkpoint, sampling, arith.prompt_text, engine=engine)
    except ValueError as error:  # e.g. "block_size=16: vLLM's CPU attention takes a multiple of 32" (policies.vllm_engine.check_cpu_engine)
        return [BenchRow(strategy, "vllm", block_size, rejected=str(error).splitlines()[0]) for strategy in plan]
    torch.set_num_threads(threads)  # the in-process engine computes on this process's pool
    engine_llm, rows = policy.llm, []
    try:
        warm_up(policy, problems, plan)
        for strategy, settings in plan.items():
            engine_llm.reset_prefix_cache()  # each run starts cold
            replays = tuple(BlockCacheReplay(b) for b in dict.fromkeys([block_size, *what_if_blocks]))
            policy.llm = RecordingLLM(engine_llm, replays)
            before = policy.usage
            results, wall = timed_search(strategy, problems, policy, settings)
            usage = VLLMUsage(*(a - b for a, b in zip(astuple(policy.usage), astuple(before))))
            rows.append(BenchRow(strategy, "vllm", block_size, *totals(results), wall, accuracy(results), usage,
                                 tuple(replay.bound() for replay in replays)))
            policy.llm = engine_llm
    finally:
        policy.llm = engine_llm
        policy.close()
    return rows


# -- report -------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """One line per run; the shares are of the prompt tokens sent, at the engine's block size."""
    lines = [
        "| strategy | backend | block | tokens generated | tokens forwarded | wall s | tokens/s | accuracy "
        "| prompt tokens | cached | reachable | block cap |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        block = "-" if row.block_size is None else str(row.block_size)
        if row.rejected is not None:
            lines.append(f"| {row.strategy} | {row.backend} | {block} | rejected: {row.rejected} |" + " |" * 8)
            continue
        shares = ["-"] * 4
        if row.usage is not None and row.usage.prompt_tokens and row.bounds:
            sent, bound = row.usage.prompt_tokens, row.bounds[0]
            shares = [str(sent), f"{row.usage.cached_share:.1%}", f"{bound.reachable / sent:.1%}",
                      f"{bound.block_cap / sent:.1%}"]
        lines.append(
            f"| {row.strategy} | {row.backend} | {block} | {row.tokens_generated} | {row.tokens_forwarded} | "
            f"{row.wall_s:.1f} | {row.tokens_per_s:.0f} | {row.accuracy:.3f} | " + " | ".join(shares) + " |"
        )
    return "\n".join(lines)


def bounds_table(rows: Sequence[BenchRow]) -> str:
    """The same requests replayed at other block sizes: what a cache of that granularity could
    serve (vLLM's CPU backend runs only multiples of 32; 1 is the pure prefix-reuse bound)."""
    lines = ["| strategy | engine block | replayed block | reachable | block cap |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row.usage is None or not row.usage.prompt_tokens:
            continue
        sent = row.usage.prompt_tokens
        for bound in row.bounds:
            lines.append(f"| {row.strategy} | {row.block_size} | {bound.block_size} | "
                         f"{bound.reachable / sent:.1%} | {bound.block_cap / sent:.1%} |")
    return "\n".join(lines)


def resolve_checkpoint(checkpoint: Path, scratch: Path) -> tuple[Path, str]:
    """(folder, description): the checkpoint, or a random tiny Llama saved in scratch."""
    if (checkpoint / "config.json").is_file():
        return checkpoint, f"checkpoint {checkpoint}"
    print(f"{checkpoint} has no trained policy (config.json missing): using a freshly initialised tiny Llama "
          "(accuracy ~0, shallow trees). Train one with `python -m experiments.train_sft --out "
          "outputs/checkpoints/tiny-arith` for meaningful numbers.")
    tokenizer = build_tokenizer()
    path = save_checkpoint(build_model(TinyModelConfig(), tokenizer), tokenizer, scratch / "random-tiny")
    return path, "random tiny Llama (no checkpoint found)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_vllm", description="Transformers vs vLLM: Best-of-N and beam search on arith.")
    parser.add_argument("--problems", type=positive_int, default=64, help="arith test problems")
    add_checkpoint_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="problem generation seed")
    parser.add_argument("--n", type=positive_int, default=16, help="N of Best-of-N and of beam search")
    parser.add_argument("--beam-width", type=positive_int, default=4)
    parser.add_argument("--max-total-tokens", type=positive_int, default=SAMPLING.max_total_tokens)
    parser.add_argument("--block-sizes", type=int_list(), default="16,32,64",
                        help="vLLM KV block sizes, comma-separated; the first accepted also runs Best-of-N "
                        "(CPU: multiples of 32; others are reported as rejected)")
    parser.add_argument("--what-if-blocks", type=int_list(allow_empty=True), default="1,16",
                        help="block sizes to replay the vLLM runs' requests at (cache bounds only, no engine; "
                        "empty: none)")
    parser.add_argument("--kv-cache-gib", type=positive_float, default=1.0)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads of both backends (1 on a shared CPU)")
    args = parser.parse_args(argv)
    check_beam_shape(parser, args.n, args.beam_width)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print and return the report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = list(args.block_sizes)
    sampling = SamplingConfig(temperature=SAMPLING.temperature, max_step_tokens=SAMPLING.max_step_tokens,
                              max_total_tokens=args.max_total_tokens)
    plan = strategies(args.n, args.beam_width)
    problems = arith.generate_problems("test", args.problems, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as scratch:
        checkpoint, source = resolve_checkpoint(args.checkpoint, Path(scratch))
        rows = run_transformers(checkpoint, problems, plan, sampling)
        best_of_n_done = False  # Best-of-N at the first block size vLLM accepts; beam search at every one
        for block in blocks:
            chosen = {"beam_search": plan["beam_search"]} if best_of_n_done else plan
            new = run_vllm(checkpoint, problems, chosen, sampling, block, args.kv_cache_gib, args.threads,
                           list(args.what_if_blocks))
            best_of_n_done = best_of_n_done or any(row.rejected is None for row in new)
            rows += new
    report = "\n".join([
        f"policy: {source}; {len(problems)} arith test problems; scorer: confidence; threads: {args.threads}; "
        f"temperature {sampling.temperature}, max_total_tokens {sampling.max_total_tokens}",
        f"strategies: {plan}",
        markdown_table(rows),
        "",
        "prefix-cache bounds of the vLLM runs' requests at other block sizes:",
        bounds_table(rows),
    ])
    print(report)
    return report


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
