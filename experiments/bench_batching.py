"""Benchmark: step-level beam search over many problems in one batched run vs one problem at a
time (search-and-learn's way), measured side by side in one run on the same problems and seeds.

Each round of a batched run sends the beams of ALL problems to the policy in one call; the
sequential run calls the strategy once per problem. The lockstep batched run draws other samples
than one at a time (a policy call has one generator and its rows take their uniforms in batch
order), so its accuracy is another draw of the same search, equal within its interval rather than
answer for answer (a line checks it: `accuracy_check`; the last line counts the problems whose
candidates are the same anyway).
Target: batched at least 4x faster. An untimed one-problem search first takes the one-time costs
(lazy initialisation, allocator growth) off whichever run would come first. Wall time and this process's CPU time are both printed (on a shared
machine another job's load stretches wall time; a one-thread run's CPU time much less). The
three runs go in --rounds interleaved rounds (default 3; batched, one at a time, continuous,
batched, ...): each time is the median of its rounds and each speed-up the median of the rounds'
ratios, a last line lists those ratios (how much single runs differ on a shared machine).

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
later steps of a search batch a little less well than this.) The searches decode forked (the
policy's default, `policies.decode_batch`): the samples of a context share one forward row until
they draw different tokens, so the runs forward fewer rows than they sample and the batched run
can beat this ceiling, which forwards every row (`python -m experiments.bench_forked` compares
forked decoding with every row alone).

    python -m experiments.bench_batching                     # tiny: 64 problems, N = 8, M = 4
    python -m experiments.bench_batching --model smollm2 --problems 16 --rounds 1

Workloads (`--model`, `experiments.bench_workload`): `tiny`, the trained 3.5M-parameter arith
policy, and `smollm2`, SmolLM2-135M-Instruct on GSM8K (answers cut at 128 tokens).
    python -m experiments.bench_batching --problems 8 --n 4 --beam-width 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import Workload, add_search_arguments, load_workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, positive_int  # noqa: E402
from experiments.bench_timing import DecodeRows, Timing, best_of, interleaved, median_timing  # noqa: E402
from policies.continuous_engine import ContinuousEngine  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from policies.shared_prefix import SharedPrefixCache, supports_shared_prefix  # noqa: E402
from policies.slot_cache import slot_cache  # noqa: E402
from scorers.confidence import ConfidenceScorer  # noqa: E402
from treesearch.beam_search import BeamSearchConfig, beam_search  # noqa: E402
from treesearch.concurrent import search_each, seeded_for  # noqa: E402
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
    batched chunk (problems x N, at most the policy's batch_size rounded down to whole problems),
    M rows per context, and their ratio."""
    lm, context = work.lm, median_prompt_tokens(work)
    small_rows, large_rows = n, min(len(work.problems), max(work.sampling.batch_size // n, 1)) * n
    small = decode_step_seconds(lm, small_rows, beam_width, context) / small_rows
    large = decode_step_seconds(lm, large_rows, beam_width, context) / large_rows
    return (f"ceiling (bare decode step, no search, {beam_width} rows per context, "
            f"{context}-token context = the median prompt): "
            f"{small * 1e6:.0f} us per row-token at {small_rows} rows, "
            f"{large * 1e6:.0f} us at {large_rows} rows: batching alone, every row forwarded, can give at most "
            f"~{small / large:.2f}x")


@dataclass(frozen=True)
class _Runs:
    """One configuration over the rounds: its timing per round, the results and decode rows of
    its first round (every round searches the same problems with the same seeds)."""

    timings: tuple[Timing, ...]
    results: tuple[SearchResult, ...]
    rows: DecodeRows

    @property
    def wall_s(self) -> float:
        return median_timing(self.timings).wall_s

    @property
    def cpu_s(self) -> float:
        return median_timing(self.timings).cpu_s


def _rounds(lm: Any, configs: dict[str, Callable[[], list[SearchResult]]], rounds: int) -> dict[str, _Runs]:
    """Each configuration's searches in `rounds` interleaved rounds (`bench_timing.interleaved`),
    the rows of every decode forward counted."""

    def counted(search: Callable[[], list[SearchResult]]) -> Callable[[], tuple[list[SearchResult], DecodeRows]]:
        def run_counted() -> tuple[list[SearchResult], DecodeRows]:
            with DecodeRows(lm) as rows:
                return search(), rows
        return run_counted

    runs = interleaved({name: counted(search) for name, search in configs.items()}, rounds)
    return {name: _Runs(tuple(t for t, _ in got), tuple(got[0][1][0]), got[0][1][1]) for name, got in runs.items()}


def _speed_ups(single: _Runs, other: _Runs, cpu: bool = False) -> list[float]:
    """One problem at a time / other, per round (the two runs of a round are close in time)."""
    pick = (lambda t: t.cpu_s) if cpu else (lambda t: t.wall_s)
    return [pick(s) / pick(o) for s, o in zip(single.timings, other.timings)]


def run(work: Workload, n: int, beam_width: int, seed: int, rounds: int = 1) -> str:
    """The table: one problem at a time, all batched, continuous batching; times are medians of
    `rounds` interleaved rounds and each speed-up the median of its rounds' ratios."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    probs, policy = work.problems, work.policy  # a fresh prefix cache for each run: no head start
    cfg = BeamSearchConfig(n=n, beam_width=beam_width, max_depth=20, seed=seed)
    engines: list[ContinuousEngine] = []  # each continuous run's, for its cohort counts

    def continuous() -> list[SearchResult]:
        shared = policy()
        with ContinuousEngine.attached(shared) as engine:
            results = search_each(beam_search, probs, shared, ConfidenceScorer(), cfg)
        engines.append(engine)
        return results

    beam_search(probs[:1], policy(), ConfidenceScorer(), cfg)  # untimed warm-up (module docstring)
    runs = _rounds(work.lm, {
        "batched": lambda: beam_search(probs, policy(), ConfidenceScorer(), cfg),
        "single": lambda: [r for p in probs for r in beam_search([p], policy(), ConfidenceScorer(), seeded_for(cfg, p))],
        "continuous": continuous,
    }, rounds)
    single, engine = runs["single"], engines[0]
    same = sum(_candidates(a) == _candidates(b) for a, b in zip(single.results, runs["continuous"].results))
    lockstep_same = sum(_candidates(a) == _candidates(b) for a, b in zip(single.results, runs["batched"].results))
    full = min(len(probs) * n, work.sampling.batch_size)

    def line(name: str, r: _Runs, full_rows: int) -> str:
        speed_up, cpu_speed_up = (statistics.median(_speed_ups(single, r, cpu)) for cpu in (False, True))
        return (f"| {name} | {r.wall_s:.2f} | {work.accuracy(r.results):.3f} | {speed_up:.2f} | "
                f"{r.cpu_s:.2f} | {cpu_speed_up:.2f} | {r.rows.mean:.1f} / {r.rows.median:.0f} ({full_rows}) |")

    lines = [
        f"{work.description}; beam search N={n}, M={beam_width}; torch threads {torch.get_num_threads()}; "
        + ("one round" if rounds == 1 else f"medians of {rounds} interleaved rounds"),
        "| run | wall s | accuracy | speed-up | cpu s | cpu speed-up | rows per decode forward: mean / median (full) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        line("one problem at a time", single, n),
        line("all problems batched (lockstep rounds)", runs["batched"], full),
        line("continuous batching (a thread per problem)", runs["continuous"], full),
        f"continuous batching: {engine.cohorts_fed / max(engine.forwards, 1):.1f} cohorts per decode forward "
        f"(most {engine.most_cohorts}); {same} of {len(probs)} problems have the same candidates as one at a time "
        f"(lockstep batching, which draws other samples: {lockstep_same})",
        "same accuracy as one at a time: " + "; ".join(
            accuracy_check(name, work.accuracy(runs[name].results), work.accuracy(single.results), len(probs))
            for name in ("batched", "continuous")),
    ]
    if rounds > 1:
        lines.append("speed-up (wall) per round: lockstep " + ", ".join(f"{x:.2f}x" for x in _speed_ups(single, runs["batched"]))
                     + "; continuous " + ", ".join(f"{x:.2f}x" for x in _speed_ups(single, runs["continuous"])))
    return "\n".join(lines)


def accuracy_check(name: str, accuracy: float, single: float, problems: int) -> str:
    """Whether a run's accuracy is one at a time's within sampling noise: their difference
    against the 95% interval of the difference of two independent draws over `problems`
    (1.96 x sqrt(p(1-p)/n + q(1-q)/n); a run of the same draws, as continuous batching's, sits
    at 0 difference)."""
    half = 1.96 * math.sqrt((accuracy * (1 - accuracy) + single * (1 - single)) / problems)
    verdict = "yes" if abs(accuracy - single) <= half else "NO"
    return f"{name} {verdict} ({accuracy:.3f} vs {single:.3f}, difference {accuracy - single:+.3f}, interval +-{half:.3f})"


def _candidates(result: SearchResult) -> list[str]:
    return [c.text for c in result.candidates]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_batching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(ap, problems=64, n=8)
    ap.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; times and speed-ups are their medians")
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    freeze_long_lived()  # as the CLIs do (policies/gc_freeze.py); both runs alike
    print(run(work, args.n, args.beam_width, args.seed, args.rounds))
    print(ceiling_line(work, args.n, args.beam_width))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
