"""Run a strategy on each problem in its own thread, for a policy that batches concurrent calls
(continuous batching, `policies.continuous_engine`): every problem's search proceeds at its own
pace, and the policy decodes whatever calls are waiting together.

    with ContinuousEngine.attached(policy):
        results = search_each(beam_search, problems, policy, scorer, BeamSearchConfig(n=8))

Results are in problem order and equal `[fn([p], ...)[0] for p in problems]`, one problem at a
time (search-and-learn's way), since each search makes the same calls with the same seeds; only
the wall time a problem's compute ledger records includes waiting for the others' rows.
An error in one problem's search is raised here after the other searches end.

A scorer that forwards a model is wrapped in a `treesearch.merged_scorer.MergedScorer`
(`merge_scores=True`, the default): the `score` calls the threads make at once run as one call,
one batch of every waiting problem's paths, instead of one small batch per problem (its scores
then equal the scorer's alone up to the float rounding of a batched forward).

Tests: `.venv/bin/python -m pytest tests/test_continuous_engine.py`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from treesearch.config_checks import is_int
from treesearch.merged_scorer import merged_for_threads
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch.result import SearchResult

MAX_WORKERS = 256  # threads at most; more problems wait for a free one


def search_each(
    fn: Callable[..., list[SearchResult]],
    problems: Sequence[Problem],
    policy: Policy,
    scorer: Scorer,
    cfg: Any,
    workers: int | None = None,
    on_round: RoundHook | None = None,
    merge_scores: bool = True,
) -> list[SearchResult]:
    """fn([problem], policy, scorer, cfg) for every problem, `workers` at a time (default: all,
    up to MAX_WORKERS), in threads; the results in problem order. on_round, when given, is passed
    on to every call (`RoundHook`: each thread calls it with its own problem's tree).
    merge_scores: run the threads' concurrent calls of a scorer that forwards a model as one
    (`treesearch.merged_scorer.merged_for_threads`); False calls it from each thread as it is."""
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ValueError(f"search_each workers={workers!r} must be an integer >= 1 (or None: one per problem)")
    if not problems:
        return []
    count = min(len(problems), MAX_WORKERS) if workers is None else workers
    if merge_scores:
        scorer = merged_for_threads(scorer)

    def one(problem: Problem) -> SearchResult:
        hook = {} if on_round is None else {"on_round": on_round}
        (result,) = fn([problem], policy, scorer, cfg, **hook)
        return result

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="search") as pool:
        futures = [pool.submit(one, problem) for problem in problems]
        return [future.result() for future in futures]
