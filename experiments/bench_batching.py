"""Benchmark: step-level beam search over many problems in one batched run vs one problem at a
time (search-and-learn's way), measured side by side in one run on the same problems and seeds.

Each round of a batched run sends the beams of ALL problems to the policy in one call; the
sequential run calls the strategy once per problem. The chosen answers must grade the same on
average (the per-problem seeds are the same; batching changes only float rounding). Target:
batched at least 4x faster. Wall time and this process's CPU time are both printed (on a shared
machine another job's load stretches wall time; a one-thread run's CPU time much less).

A third run uses continuous batching (`policies.continuous_engine`): each problem's search in
its own thread (`treesearch.concurrent.search_each`), every policy call's chunk joining the batch
between two decode steps, so a problem starts its next round as soon as its own step ends
instead of waiting for the round's longest step. Each problem then samples exactly what it
samples alone, so its candidates equal the one-at-a-time run's (the last line counts the
problems where they do, up to float rounding) and its speed-up is over the same results.

The last column says how full the decode forwards were: the mean and median rows of a forward
that feeds one token per row (decode steps; a round's prefill that feeds only each context's
last token counts too, with one row per context), against a full batch (one problem's N rows;
the batched run's problems x N, at most the policy's batch_size). Every row of a beam-search
round decodes until its step ends, so the longest step of a round holds the forward at few rows
(stragglers).

The ceiling line measures the bare model's decode step (a KV-cached forward of one token per
row, no search, M rows per context sharing its KV as the decode loop does, at the workload's
median prompt length) at the rows one problem sends per forward (N) and at the rows a batched
chunk sends (all problems' N, up to the policy's batch_size): the speed-up a perfectly
overhead-free engine could get from batching alone, since one problem at a time is already a
batch of N rows. (Contexts grow as steps are added, and per-row attention with them, so the
later steps of a search batch a little less well than this.)

    python -m experiments.bench_batching                     # tiny: 64 problems, N = 8, M = 4
    python -m experiments.bench_batching --model smollm2 --problems 16

Workloads (`--model`, `experiments.bench_workload`): `tiny`, the trained 3.5M-parameter arith
policy, and `smollm2`, SmolLM2-135M-Instruct on GSM8K (answers cut at 128 tokens).
    python -m experiments.bench_batching --problems 8 --n 4 --beam-width 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from experiments.bench_timing import DecodeRows, Timing, best_of, timed  # noqa: E402
from policies.continuous_engine import ContinuousEngine  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from policies.shared_prefix import SharedPrefixCache, supports_shared_prefix  # noqa: E402
from policies.slot_cache import slot_cache  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.beam_search import BeamSearchConfig, beam_search  # noqa: E402
from treesearch.concurrent import search_each  # noqa: E402
from treesearch.result import SearchResult  # noqa: E402


@torch.inference_mode()
def decode_step_seconds(
    lm: Any, rows: int, group: int = 1, context: int = 48, steps: int = 16, repeats: int = 3
) -> float:
    """Wall seconds of one bare decode step of `rows` rows over a `context`-token KV cache, laid
    out as the decode loop lays it out: `group` rows per context reading its KV in place
    (`policies.shared_prefix`) when the model supports it, else one copied row each
    (`policies.slot_cache`). Best of `repeats` runs of `steps` steps, per step."""
    contexts = max(rows // group, 1)
    ids = torch.randint(3, int(lm.config.vocab_size), (contexts, context))
    prefilled = lm(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    row_context = torch.arange(rows) // group
    tokens, shared, slots = ids[row_context, -1:], supports_shared_prefix(lm), torch.arange(rows)  # slot b holds row b

    def decode() -> None:
        if shared:
            cache = SharedPrefixCache.over(prefilled, torch.ones((contexts, context)), row_context, steps)
        else:
            cache = slot_cache(prefilled, row_context, steps)
        mask = torch.ones((rows, context), dtype=torch.long)
        for step in range(steps):
            position = torch.full((rows, 1), context + step)
            if shared:
                cache.forward(lm, slots, tokens, position)
            else:
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=-1)
                lm(input_ids=tokens, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
        cache.release()

    return best_of(decode, repeats) / steps


def median_prompt_tokens(work: Workload) -> int:
    """The median token length of the workload's prompts (the context a search's first steps decode at)."""
    lengths = sorted(len(work.tokenizer(work.prompt_fn(p)).input_ids) for p in work.problems)
    return lengths[len(lengths) // 2]


def ceiling_line(work: Workload, n: int, beam_width: int) -> str:
    """The bare decode step's time per row-token at N rows (one problem) and at the rows of a
    batched chunk (problems x N, at most the policy's batch_size), M rows per context, and their
    ratio."""
    lm, context = work.lm, median_prompt_tokens(work)
    small_rows, large_rows = n, min(len(work.problems) * n, work.sampling.batch_size)
    small = decode_step_seconds(lm, small_rows, beam_width, context) / small_rows
    large = decode_step_seconds(lm, large_rows, beam_width, context) / large_rows
    return (f"ceiling (bare decode step, no search, {beam_width} rows per context, "
            f"{context}-token context = the median prompt): "
            f"{small * 1e6:.0f} us per row-token at {small_rows} rows, "
            f"{large * 1e6:.0f} us at {large_rows} rows: batching alone can give at most ~{small / large:.2f}x")


def run(work: Workload, n: int, beam_width: int, seed: int) -> str:
    probs, policy = work.problems, work.policy  # a fresh prefix cache for each run: no head start
    cfg = BeamSearchConfig(n=n, beam_width=beam_width, max_depth=20, seed=seed)
    batched: list[SearchResult] = []
    one_by_one: list[SearchResult] = []
    continuous: list[SearchResult] = []
    with DecodeRows(work.lm) as rows_batched:
        t_batched = timed(lambda: batched.extend(beam_search(probs, policy(), ConfidenceScorer(), cfg)))
    with DecodeRows(work.lm) as rows_single:
        t_single = timed(lambda: one_by_one.extend(
            r for p in probs for r in beam_search([p], policy(), ConfidenceScorer(), cfg)))
    shared = policy()
    with DecodeRows(work.lm) as rows_continuous, ContinuousEngine.attached(shared) as engine:
        t_continuous = timed(lambda: continuous.extend(search_each(beam_search, probs, shared, ConfidenceScorer(), cfg)))
    same = sum(_candidates(a) == _candidates(b) for a, b in zip(one_by_one, continuous))
    full = min(len(probs) * n, work.sampling.batch_size)

    def line(name: str, t: Timing, results: list[SearchResult], rows: DecodeRows, full_rows: int) -> str:
        return (f"| {name} | {t.wall_s:.2f} | {work.accuracy(results):.3f} | {t_single.wall_s / t.wall_s:.2f} | "
                f"{t.cpu_s:.2f} | {t_single.cpu_s / t.cpu_s:.2f} | {rows.mean:.1f} / {rows.median:.0f} ({full_rows}) |")

    return "\n".join([
        f"{work.description}; beam search N={n}, M={beam_width}; "
        f"torch threads {torch.get_num_threads()}",
        "| run | wall s | accuracy | speed-up | cpu s | cpu speed-up | rows per decode forward: mean / median (full) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        line("one problem at a time", t_single, one_by_one, rows_single, n),
        line("all problems batched (lockstep rounds)", t_batched, batched, rows_batched, full),
        line("continuous batching (a thread per problem)", t_continuous, continuous, rows_continuous, full),
        f"continuous batching: {engine.cohorts_fed / max(engine.forwards, 1):.1f} cohorts per decode forward "
        f"(most {engine.most_cohorts}); {same} of {len(probs)} problems have the same candidates as one at a time",
    ])


def _candidates(result: SearchResult) -> list[str]:
    return [c.text for c in result.candidates]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=64, n=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); both runs alike
    print(run(work, args.n, args.beam_width, args.seed))
    print(ceiling_line(work, args.n, args.beam_width))


if __name__ == "__main__":
    main()
