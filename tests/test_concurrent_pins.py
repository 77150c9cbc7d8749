"""Pins for `search_each`, `MergedScorer` and `propose_widths` behaviours that a mutation review
found unpinned elsewhere.

What is pinned: each problem's seed in `search_each` is a hash of the call's seed and the
problem's id (a different call seed gives a different search; no problem gets the call's seed
as it is); the caller's `on_round` hook reaches every problem's search; `workers=1` runs one
search at a time; `raise_first_error` raises the real error, not the `SearchCancelled` it set
off; a merged scorer call whose inner scorer returns too few rows is re-run call by call, so the
other callers still get their own rows; `TransformersPolicy.propose_widths` honours
`stop_at_step=False` as `propose` does.

Fakes and a tiny random Llama only (tests/fakes.py, tests/test_merged_scorer.py,
tests/test_transformers_policy.py); the file runs in a few seconds on one CPU core.

Run: `.venv/bin/python -m pytest tests/test_concurrent_pins.py`
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

import pytest

from fakes import FakePolicy, OracleScorer
from test_merged_scorer import GatedScorer, call_in_threads, own_scores, prefix
from test_transformers_policy import mixed_prefixes, policy
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.concurrent import SearchCancelled, problem_seed, raise_first_error, search_each
from treesearch.merged_scorer import MergedScorer
from treesearch.compute import Compute
from treesearch.records import Prefix, Problem
from treesearch.result import SearchResult
from treesearch.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

OVERLAP_WAIT_S = 0.5  # how long the first search waits to see a second one start beside it
ANSWERS = [str(i) for i in range(20)]


@dataclass
class SeededConfig:
    seed: int = 0


class NoModelScorer:
    """A scorer search_each leaves unmerged (no model forwarded)."""

    num_parameters = 0

    def score(self, paths):
        return [[0.5] * len(p.steps) for p in paths]

    def cost(self, paths):
        return 0


def stub_result(problem: Problem) -> SearchResult:
    """The least result a search can return for a problem (no candidates), as search_each checks."""
    return SearchResult(problem, "stub", {}, (), None, Tree(problem), Compute())


def problems(count: int) -> list[Problem]:
    return [Problem(f"p{i}", f"{i}+{i}", str(2 * i), {"answers": ANSWERS}) for i in range(count)]


def seeds_seen(cfg_seed: int, searched: list[Problem]) -> dict[str, int]:
    """The seed each problem's search got from search_each, by problem id."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fn(batch, policy, scorer, cfg, on_round=None):
        with lock:
            seen[batch[0].id] = cfg.seed
        return [stub_result(batch[0])]

    search_each(fn, searched, object(), NoModelScorer(), SeededConfig(seed=cfg_seed))
    return seen


def candidate_texts(result) -> list[tuple[str, ...]]:
    return [tuple(step.text for step in c.steps) for c in result.candidates]


def test_problem_seed_depends_on_the_call_seed_and_the_problem_id():
    assert problem_seed(0, "a") != problem_seed(1, "a")
    assert problem_seed(0, "a") != problem_seed(0, "b")
    assert problem_seed(3, "a") == problem_seed(3, "a")


def test_search_each_gives_each_problem_its_own_seed_from_the_call_seed():
    searched = problems(3)
    zero, one = seeds_seen(0, searched), seeds_seen(1, searched)
    assert zero == {p.id: problem_seed(0, p.id) for p in searched}
    assert len(set(zero.values())) == 3 and 0 not in zero.values()  # not the call's seed as it is
    assert all(zero[p.id] != one[p.id] for p in searched)  # the call's seed changes every problem's


def test_a_different_call_seed_gives_a_different_search():
    searched = problems(2)
    runs = [search_each(best_of_n, searched, FakePolicy(), OracleScorer(), BestOfNConfig(n=6, seed=seed))
            for seed in (0, 1, 0)]
    assert [candidate_texts(r) for r in runs[0]] == [candidate_texts(r) for r in runs[2]]  # seeded
    for a, b in zip(runs[0], runs[1]):
        assert candidate_texts(a) != candidate_texts(b)


def test_on_round_reaches_every_problems_search():
    searched = problems(3)
    seen: list[str] = []
    lock = threading.Lock()

    def hook(trees):
        with lock:
            seen.extend(tree.problem.id for tree in trees)

    search_each(beam_search, searched, FakePolicy(), OracleScorer(), BeamSearchConfig(n=4, seed=0), on_round=hook)
    assert set(seen) == {p.id for p in searched}


def test_one_worker_runs_one_search_at_a_time():
    """The first search waits (briefly) for a second one to start beside it: with workers=1 none
    does; with more workers the second starts at once and the overlap is counted."""
    active, peak = [0], [0]
    lock = threading.Lock()
    second_started = threading.Event()

    def fn(batch, policy, scorer, cfg, on_round=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            if batch[0].id == "p0":
                second_started.wait(OVERLAP_WAIT_S)
            else:
                second_started.set()
        finally:
            with lock:
                active[0] -= 1
        return [stub_result(batch[0])]

    searched = problems(3)
    out = search_each(fn, searched, object(), NoModelScorer(), SeededConfig(), workers=1)
    assert [r.problem.id for r in out] == ["p0", "p1", "p2"]
    assert peak[0] == 1


def test_two_workers_run_two_searches_at_once_and_no_more():
    """Two searches meet at a barrier (they must run at once); a third would only start after one
    of them ended, so at most two run together."""
    active, peak = [0], [0]
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=10)

    def fn(batch, policy, scorer, cfg, on_round=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            if batch[0].id in ("p0", "p1"):
                barrier.wait()
        finally:
            with lock:
                active[0] -= 1
        return [stub_result(batch[0])]

    out = search_each(fn, problems(3), object(), NoModelScorer(), SeededConfig(), workers=2)
    assert [r.problem.id for r in out] == ["p0", "p1", "p2"] and peak[0] == 2


def done_future(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def test_raise_first_error_skips_the_cancellation_the_real_error_set_off():
    real = ValueError("the real failure")
    futures = [done_future(SearchCancelled("stopped")), done_future(real)]
    with pytest.raises(ValueError) as raised:
        raise_first_error(futures)
    assert raised.value is real
    raise_first_error([done_future(SearchCancelled("stopped"))])  # cancellations alone: nothing raised
    ok: Future = Future()
    ok.set_result(1)
    raise_first_error([ok])


class RowDroppingScorer(GatedScorer):
    """GatedScorer that returns no row (instead of an error) for a path of problem "bad"."""

    def score(self, paths):
        return super().score([p for p in paths if p.problem.id != "bad"])


def test_a_merged_call_short_of_rows_is_rerun_so_each_caller_gets_its_own_rows():
    inner = RowDroppingScorer()
    scorer = MergedScorer(inner)
    good = [[prefix("a", "s")], [prefix("bb", "s"), prefix("bb", "s", "t")], None, [prefix("dddd", "s", "t", "u", "v")]]
    bad = [prefix("bad", "s", "t", "u")]
    batches = [b if b is not None else bad for b in good]
    out = call_in_threads(scorer, inner, batches)
    for batch, scores in zip(good, out):
        if batch is not None:
            assert scores == [own_scores(p) for p in batch]
    # the faulty call fails or comes back short; it never gets another caller's row
    assert isinstance(out[2], Exception) or len(out[2]) != 1
    assert len(inner.calls) > 2  # the merged call was run again call by call


def test_propose_widths_honours_stop_at_step_false_as_propose_does():
    p = policy(max_step_tokens=8, max_total_tokens=40)
    prefixes: list[Prefix] = [Prefix(Problem("p", "1+2=", "3", {})), *mixed_prefixes()[:2]]
    whole = p.propose(prefixes, 3, seed=1, stop_at_step=False)
    assert any(step.num_tokens > 8 for row in whole for step in row)  # ran past max_step_tokens
    assert p.propose_widths(prefixes, [3] * len(prefixes), seed=1, stop_at_step=False) == whole
