"""Run a strategy on each problem in its own thread, for a policy that batches concurrent calls
(continuous batching, `policies.continuous_engine`): every problem's search proceeds at its own
pace, and the policy decodes whatever calls are waiting together.

    with ContinuousEngine.attached(policy):
        results = search_each(beam_search, problems, policy, scorer, BeamSearchConfig(n=8))

Results are in problem order and equal `[fn([p], ..., seeded_for(cfg, p))[0] for p in problems]`,
one problem at a time (search-and-learn's way), since each search makes the same calls with the
same seeds: each problem's own, a hash of cfg.seed and its id (`problem_seed`; with cfg.seed
itself, sample j of every problem drew the same uniforms, so a repeated question got the same
candidates under each id); only
the wall time a problem's compute ledger records includes waiting for the others' rows (and, for
a PRM whose merged calls forward a start that several problems' paths share, such as its system
prompt, which of them its `scorer_tokens` charge that start to; the total is the same).
What fn returns for each problem is checked (`treesearch.result_checks`), naming the problem.
An error in one problem's search, or an interrupt (Ctrl-C) here, stops the other searches at the
end of their current round (`SearchCancelled` in their threads; the problems not started yet never
start) and is then raised here: the error that stopped them (which one, when several searches
fail in one round, depends on timing: the first in problem order of those failed by then), or
the interrupt.

A scorer that forwards a model is wrapped in a `treesearch.merged_scorer.MergedScorer`
(`merge_scores=True`, the default): the `score` calls the threads make at once run as one call,
one batch of every waiting problem's paths, instead of one small batch per problem (its scores
then equal the scorer's alone up to the float rounding of a batched forward).

Tests: `.venv/bin/python -m pytest tests/test_continuous_engine.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Sequence

from treesearch.config_checks import check_round_hook, is_int, problem_list
from treesearch.merged_scorer import merged_for_threads
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch.result import SearchResult
from treesearch.result_checks import check_results, fn_label

MAX_WORKERS = 256  # threads at most; more problems wait for a free one


class SearchCancelled(RuntimeError):
    """Raised in a problem's thread at the end of a round once another problem's search failed or
    the caller was interrupted (`search_each`)."""


def search_each(
    fn: Callable[..., list[SearchResult]],
    problems: Iterable[Problem],
    policy: Policy,
    scorer: Scorer,
    cfg: Any,
    workers: int | None = None,
    on_round: RoundHook | None = None,
    merge_scores: bool = True,
    label: str | None = None,
) -> list[SearchResult]:
    """fn([problem], policy, scorer, cfg) for every problem, `workers` at a time (default: all,
    up to MAX_WORKERS), in threads; the results in problem order. on_round, when given, is passed
    on to every call (`RoundHook`: each thread calls it with its own problem's tree); fn gets a
    hook of its own either way (`on_round=`, as every strategy takes), which stops the search at
    the end of a round once another one failed or the caller was interrupted.
    merge_scores: run the threads' concurrent calls of a scorer that forwards a model as one
    (`treesearch.merged_scorer.merged_for_threads`); False calls it from each thread as it is.
    What fn returns for each problem is checked (`treesearch.result_checks.check_results`: one sound
    SearchResult of that problem): a ValueError (`ResultError`) naming the strategy (`label`, by
    default fn's name: `strategy beam_search`), the problem and the fault."""
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ValueError(f"search_each workers={workers!r} must be an integer >= 1 (or None: one per problem)")
    check_round_hook(on_round)  # wrapped in round_end below: fn's own check cannot see it
    label = fn_label(fn) if label is None else label
    problems = problem_list(problems)  # a generator or a lone Problem, named as the strategies do
    if not problems:
        return []
    count = min(len(problems), MAX_WORKERS) if workers is None else workers
    if merge_scores:
        scorer = merged_for_threads(scorer)

    stop = threading.Event()

    def round_end(trees: Any) -> None:
        if stop.is_set():
            raise SearchCancelled("stopped at the end of a round: another problem's search failed or was interrupted")
        if on_round is not None:
            on_round(trees)

    def one(problem: Problem) -> SearchResult:
        if stop.is_set():  # a worker freed by a failed search takes the next problem before the caller wakes
            raise SearchCancelled("not started: another problem's search failed or was interrupted")
        try:
            results = fn([problem], policy, scorer, seeded_for(cfg, problem), on_round=round_end)
            check_results(results, [problem], label)  # 0 or 2 results were "cannot unpack", naming no problem
        except BaseException as error:
            stop.set()  # in this thread, before its worker can take another problem
            # a scorer's own error names no problem; a TypeError (a policy or scorer that is not one) is no problem's
            if not isinstance(error, (SearchCancelled, TypeError)) and isinstance(error, Exception) \
                    and repr(problem.id) not in str(error):
                error.add_note(f"in the search of problem {problem.id!r}")
            raise
        return results[0]

    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="search")
    try:
        futures = [pool.submit(one, problem) for problem in problems]
        wait(futures, return_when=FIRST_EXCEPTION)
        raise_first_error(futures)
        return [future.result() for future in futures]
    except BaseException:
        stop.set()  # the running searches end at their next round; the others never start
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def problem_seed(seed: int, problem_id: str) -> int:
    """The seed of one problem's search in `search_each`: a hash of the call's seed and the
    problem's id, the same whatever else is searched beside it."""
    digest = hashlib.blake2b(f"{seed}|{problem_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def seeded_for(cfg: Any, problem: Problem) -> Any:
    """cfg with the problem's own seed (`problem_seed`) when it is a dataclass config with an
    integer seed (every strategy's is), else cfg as given."""
    seed = getattr(cfg, "seed", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) and is_int(seed):
        return dataclasses.replace(cfg, seed=problem_seed(seed, problem.id))
    return cfg


def raise_first_error(futures: Sequence[Future]) -> None:
    """The first error of the finished futures in order, other than a `SearchCancelled` (what the
    first error set off), if any."""
    for future in futures:
        if future.done() and not future.cancelled():
            error = future.exception()
            if error is not None and not isinstance(error, SearchCancelled):
                raise error
