"""Benchmark of the external PRM scorer's reuse: the paths a step-level beam search asks a PRM to
score (`scorers/lm_prm_scorer.py`), scored three ways side by side, as a markdown table: with the
KV of scored paths kept across calls (`scorers/prm_memory.py`: a child of last round's path
forwards only its new step) and common starts forwarded once (`scorers/prm_batches.py`), the
default; with common starts only; and with every path forwarded whole (what search-and-learn's
PRM scoring and the reference's scorer do); with `--vllm`, also the same PRM on vLLM's pooling
engine (`scorers/vllm_lm_prm_scorer.py`, float32, every distinct path whole).

    python -m experiments.bench_prm_prefix                          # SmolLM2 as the PRM, 4 problems
    python -m experiments.bench_prm_prefix --prm outputs/checkpoints/tiny-arith/final --problems 16
    python -m experiments.bench_prm_prefix --vllm                   # + the PRM on vLLM

The beam search (N = --n, M = --beam-width) runs once with the tiny arith policy (`--model tiny`)
or SmolLM2 on GSM8K (`--model smollm2`), ranking its steps with the PRM (shared starts on), and
every `score` call's paths are recorded; then each way scores the recorded calls in order (its
memory emptied first) in `--rounds` interleaved rounds (the order alternating), timed on this
process's CPU and the wall. The PRM is
any causal-LM folder read in the `--prm-format` layout: SmolLM2-135M-Instruct (the packaged model,
`policies.smollm2`) by default. It is not a trained PRM, so its scores mean nothing here; the
forwarded tokens and the time they take are what is measured, and the table checks that every way
gives the same scores (largest difference from every path whole).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import Workload, add_search_arguments, has_checkpoint, load_workload  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_beam_shape, positive_int  # noqa: E402
from scorers.lm_prm_scorer import LMPRMScorer  # noqa: E402
from scorers.prm_format import PRM_FORMATS  # noqa: E402
from treesearch.protocols import Scorer  # noqa: E402
from treesearch.records import Prefix  # noqa: E402
from treesearch.registry import run_search  # noqa: E402

class RecordingScorer:
    """A scorer that passes every call to `inner` and keeps each `score` call's paths (from any
    thread: a list append is atomic); its parameters are inner's, so `search_each` merges its
    calls as it would the PRM's (`treesearch.merged_scorer.merged_for_threads`)."""

    def __init__(self, inner: LMPRMScorer) -> None:
        self.inner, self.calls = inner, []  # type: ignore[var-annotated]
        self.num_parameters = inner.num_parameters

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        self.calls.append(list(paths))
        return self.inner.score(paths)

    def cost(self, paths: Sequence[Prefix]) -> int:
        return self.inner.cost(paths)


@dataclass(frozen=True)
class WayRun:
    """One way's replay of every recorded call: PRM tokens forwarded, seconds, the scores."""

    tokens: int
    wall_s: float
    cpu_s: float
    scores: list[list[list[float]]]


def replay(scorer: Scorer, calls: Sequence[Sequence[Prefix]]) -> WayRun:
    """Score every recorded call in order with scorer (its memory, when it keeps one, emptied
    first), timed."""
    if hasattr(scorer, "clear_memory"):
        scorer.clear_memory()
    wall, cpu = time.perf_counter(), time.process_time()
    scores, tokens = [], 0
    for call in calls:
        scores.append(scorer.score(call))
        tokens += scorer.cost(call)  # after its own score, as a search asks (the memory's count)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return WayRun(tokens, wall, cpu, scores)


def largest_difference(a: list[list[list[float]]], b: list[list[list[float]]]) -> float:
    return max((abs(x - y) for ca, cb in zip(a, b) for pa, pb in zip(ca, cb) for x, y in zip(pa, pb)), default=0.0)


def table(runs: dict[str, list[WayRun]], reference: str) -> str:
    """Markdown: per way the tokens forwarded, median wall and CPU seconds, their ratios to the
    reference way, and the largest score difference from it."""
    ref = runs[reference]
    ref_wall, ref_cpu = statistics.median(r.wall_s for r in ref), statistics.median(r.cpu_s for r in ref)
    lines = [
        "| PRM forwards | tokens forwarded | / whole | wall s | / whole | CPU s | / whole | largest score difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, way_runs in runs.items():
        wall, cpu = statistics.median(r.wall_s for r in way_runs), statistics.median(r.cpu_s for r in way_runs)
        lines.append(
            f"| {name} | {way_runs[0].tokens} | {way_runs[0].tokens / ref[0].tokens:.2f} | {wall:.2f} | "
            f"{wall / ref_wall:.2f} | {cpu:.2f} | {cpu / ref_cpu:.2f} | "
            f"{largest_difference(way_runs[0].scores, ref[0].scores):.1e} |"
        )
    return "\n".join(lines)


def prm_folder(text: str) -> Path:
    """argparse type of --prm: a saved model folder (its config.json), checked before anything loads."""
    folder = Path(text)
    if has_checkpoint(folder):
        return folder
    why = "no such folder" if not folder.exists() else "no config.json in it"
    raise argparse.ArgumentTypeError(f"{text} is not a saved model ({why}); leave --prm out for SmolLM2")


def add_prm_arguments(ap: argparse.ArgumentParser, batch_size: int) -> None:
    """--prm (a folder; default SmolLM2), --prm-format and --batch-size (paths per PRM forward)."""
    ap.add_argument("--prm", type=prm_folder, default=None, help="PRM folder (default: SmolLM2, converted once)")
    ap.add_argument("--prm-format", choices=sorted(PRM_FORMATS), default="math_shepherd",
                    help="qwen_prm needs a folder with a score head")
    ap.add_argument("--batch-size", type=positive_int, default=batch_size, help="paths per PRM forward")


def load_prm(prm: Path | None, prm_format: str, batch_size: int) -> tuple[LMPRMScorer, Path]:
    """(the PRM scorer, its folder): `prm`, or SmolLM2 converted once when None."""
    if prm is None:
        from policies.smollm2 import ensure_smollm2

        prm = ensure_smollm2()
    return LMPRMScorer.from_pretrained(prm, prm_format, batch_size=batch_size), prm


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_prm_prefix", description=__doc__.split("\n")[0])
    add_search_arguments(ap, problems=4, n=16)
    add_prm_arguments(ap, batch_size=8)
    ap.add_argument("--rounds", type=positive_int, default=2)
    ap.add_argument("--vllm", action="store_true", help="also score with the PRM on vLLM's pooling engine")
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)
    return args


def run(work: Workload, prm: Path | None, prm_format: str, batch_size: int, n: int, beam_width: int, seed: int,
        rounds: int, vllm: bool = False) -> str:
    """The report: the beam search's recorded score calls replayed each way (module docstring)."""
    kept, prm = load_prm(prm, prm_format, batch_size)
    parts = (kept.model, kept.tokenizer, kept.format, batch_size)
    scorers: dict[str, Scorer] = {
        "memory + shared starts": kept,
        "shared starts": LMPRMScorer(*parts, score_head=kept.score_head, cache_bytes=0),
        "every path whole": LMPRMScorer(*parts, score_head=kept.score_head, share_prefix=False, cache_bytes=0),
    }
    if vllm:
        scorers["vLLM, every path whole"] = vllm_prm(prm, prm_format)
    recorder = RecordingScorer(kept)
    run_search("beam_search", list(work.problems), work.policy(), recorder, n=n, beam_width=beam_width,
               max_depth=20, seed=seed)
    runs: dict[str, list[WayRun]] = {name: [] for name in scorers}
    for round_index in range(rounds):
        for name in list(scorers) if round_index % 2 == 0 else list(scorers)[::-1]:
            runs[name].append(replay(scorers[name], recorder.calls))
    paths = sum(len(call) for call in recorder.calls)
    distinct = sum(len({(p.problem.id, tuple(s.text for s in p.steps)) for p in call}) for call in recorder.calls)
    header = (f"{work.description}; beam search N = {n}, M = {beam_width}: {len(recorder.calls)} score calls, "
              f"{paths} paths ({distinct} distinct within their call), their steps read by {prm} ({prm_format} layout, {batch_size} paths per forward, "
              f"{torch.get_num_threads()} thread(s)); medians of {rounds} interleaved rounds")
    for scorer in scorers.values():
        if hasattr(scorer, "close"):
            scorer.close()
    return header + "\n\n" + table(runs, reference="every path whole")


def vllm_prm(prm: Path, prm_format: str) -> Scorer:
    """The PRM on vLLM's pooling engine, float32 as the transformers ways (1 GiB of KV cache)."""
    from policies.vllm_engine import VLLMEngineConfig
    from scorers.vllm_lm_prm_scorer import VLLMLMPRMScorer

    return VLLMLMPRMScorer.from_pretrained(prm, prm_format, engine=VLLMEngineConfig(str(prm), kv_cache_gib=1.0))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = load_workload(args.model, args.problems, args.seed, args.checkpoint)
    print(run(work, args.prm, args.prm_format, args.batch_size, args.n, args.beam_width, args.seed, args.rounds,
              args.vllm))
    return 0


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
