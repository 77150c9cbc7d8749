"""MergedScorer: concurrent `score` calls run as one call of the scorer inside, each caller getting
its own rows; errors stay with the call that caused them; search_each merges a model scorer's calls."""
from __future__ import annotations

import threading
import time
from typing import Sequence

from fakes import FakePolicy, OracleScorer
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.concurrent import search_each, seeded_for
from treesearch.merged_scorer import MergedScorer, merged_for_threads
from treesearch.records import Prefix, Problem, Step

WAIT_S = 10.0  # a test thread that waits longer than this has hung


def prefix(problem_id: str, *texts: str) -> Prefix:
    steps = tuple(Step(text=t, token_ids=(1,), token_logprobs=(-0.1,), finish="separator") for t in texts)
    return Prefix(Problem(problem_id, "q", "1", {}), steps)


def own_scores(path: Prefix) -> list[float]:
    """A score per step that names its path: 1 / (1 + len(problem id) + step index)."""
    return [1.0 / (1 + len(path.problem.id) + i) for i in range(len(path.steps))]


class GatedScorer:
    """Records each call's paths; its first call waits until `release` is set (so the test can
    queue other calls behind it); a path whose problem id is "bad" raises ValueError."""

    num_parameters = 1000

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: set[str] = set()

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        self.calls.append([p.problem.id for p in paths])
        self.threads.add(threading.current_thread().name)
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        if any(p.problem.id == "bad" for p in paths):
            raise ValueError("bad path")
        return [own_scores(p) for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 7 * len(paths)


def call_in_threads(scorer: MergedScorer, inner: GatedScorer, batches: list[list[Prefix]]) -> list[object]:
    """The first batch is scored while the others queue behind it (they start once the inner
    scorer holds the first); returns each batch's scores or the exception it raised."""
    out: list[object] = [None] * len(batches)

    def run(i: int) -> None:
        try:
            out[i] = scorer.score(batches[i])
        except BaseException as error:  # noqa: BLE001 (the test inspects it)
            out[i] = error

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert inner.entered.wait(WAIT_S)
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, len(batches))]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    while scorer.calls < len(batches):  # every other call has arrived and waits
        assert time.monotonic() < deadline
        time.sleep(0.001)
    inner.release.set()
    for thread in [first, *others]:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    return out


def test_calls_that_wait_together_run_as_one_and_each_gets_its_own_rows():
    inner = GatedScorer()
    scorer = MergedScorer(inner)
    batches = [[prefix("a", "s")], [prefix("bb", "s", "t"), prefix("bb", "u")], [prefix("ccc", "s", "t", "v")]]
    out = call_in_threads(scorer, inner, batches)
    for batch, scores in zip(batches, out):
        assert scores == [own_scores(p) for p in batch]
    # the first alone; the two that waited behind it in one call, in arrival order (either order)
    assert inner.calls[0] == ["a"]
    assert sorted(inner.calls[1]) == ["bb", "bb", "ccc"] and len(inner.calls) == 2
    assert (scorer.calls, scorer.inner_calls) == (3, 2)


def test_an_error_in_a_merged_call_stays_with_the_call_that_caused_it():
    inner = GatedScorer()
    scorer = MergedScorer(inner)
    batches = [[prefix("a", "s")], [prefix("bb", "s")], [prefix("bad", "s")], [prefix("dddd", "s")]]
    out = call_in_threads(scorer, inner, batches)
    assert out[0] == [own_scores(batches[0][0])]
    assert out[1] == [own_scores(batches[1][0])] and out[3] == [own_scores(batches[3][0])]
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad path"
    # the merged call of the three failed, then each ran alone
    assert len(inner.calls) == 1 + 1 + 3 and sorted(map(tuple, inner.calls[2:])) == [("bad",), ("bb",), ("dddd",)]


class Interrupt(BaseException):
    """Not an Exception (like KeyboardInterrupt): it is not retried call by call."""


def test_an_interrupt_fails_every_call_of_its_batch_and_the_scorer_serves_again():
    class Interrupting(GatedScorer):
        def score(self, paths):
            if len(self.calls) == 1:  # the merged call, after the first
                self.calls.append([p.problem.id for p in paths])
                raise Interrupt()
            return super().score(paths)

    inner = Interrupting()
    scorer = MergedScorer(inner)
    out = call_in_threads(scorer, inner, [[prefix("a", "s")], [prefix("bb", "s")], [prefix("ccc", "s")]])
    assert out[0] == [own_scores(prefix("a", "s"))]
    assert isinstance(out[1], Interrupt) and isinstance(out[2], Interrupt)  # nobody waits forever
    assert scorer.score([prefix("e", "s")]) == [own_scores(prefix("e", "s"))]


def test_the_inner_scorer_is_called_by_one_thread_at_a_time():
    active, most = [0], [0]
    lock = threading.Lock()

    class Counting:
        num_parameters = 5

        def score(self, paths):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.002)
            with lock:
                active[0] -= 1
            return [own_scores(p) for p in paths]

        def cost(self, paths):
            return 0

    scorer = MergedScorer(Counting())
    threads = [threading.Thread(target=lambda i=i: [scorer.score([prefix(f"p{i}", "s")]) for _ in range(5)])
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert most[0] == 1 and scorer.calls == 40 and scorer.inner_calls <= 40


def test_cost_and_parameters_are_the_inner_scorers():
    inner = GatedScorer()
    inner.release.set()
    scorer = MergedScorer(inner)
    paths = [prefix("a", "s"), prefix("b", "s")]
    assert scorer.cost(paths) == 14 and scorer.num_parameters == 1000


def test_only_a_scorer_that_forwards_a_model_is_merged():
    reader = OracleScorer()  # no parameters: reads nothing from a model
    assert merged_for_threads(reader) is reader
    merged = merged_for_threads(GatedScorer())
    assert isinstance(merged, MergedScorer) and merged_for_threads(merged) is merged


class CountingModelScorer(OracleScorer):
    """OracleScorer's scores, from a 'model' (parameters > 0) that counts its calls."""

    num_parameters = 10

    def __init__(self) -> None:
        object.__setattr__(self, "paths_per_call", [])

    def score(self, paths):
        self.paths_per_call.append(len(paths))
        time.sleep(0.005)  # long enough for other problems' calls to queue behind it
        return super().score(paths)


def test_search_each_merges_a_model_scorers_calls_with_the_results_of_each_problem_alone():
    problems = [Problem(f"p{i}", f"q{i}", str(i), {"answers": [str(i), "x", "y"]}) for i in range(12)]
    cfg = BeamSearchConfig(n=4, beam_width=2)
    alone = [beam_search([p], FakePolicy(), OracleScorer(), seeded_for(cfg, p))[0] for p in problems]
    merged_inner, plain_inner = CountingModelScorer(), CountingModelScorer()
    merged = search_each(beam_search, problems, FakePolicy(), merged_inner, cfg)
    plain = search_each(beam_search, problems, FakePolicy(), plain_inner, cfg, merge_scores=False)
    for a, m, p in zip(alone, merged, plain, strict=True):  # a dropped problem is a failure
        assert m.chosen_text == a.chosen_text == p.chosen_text
        assert [c.step_scores for c in m.candidates] == [c.step_scores for c in a.candidates]
    # the same paths were scored, in fewer, larger calls
    assert sum(merged_inner.paths_per_call) == sum(plain_inner.paths_per_call)
    assert len(merged_inner.paths_per_call) < len(plain_inner.paths_per_call)
