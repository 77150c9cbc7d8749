"""`MergedScorer`: the `score` calls that several threads make at once, run as one call of the
scorer inside, so a scorer that forwards a model (an external PRM, the SPRM's second forward)
gets one batch of every waiting problem's paths instead of one small batch per problem.

Why: with continuous batching (`treesearch.concurrent.search_each`, `+batching=continuous`) each
problem's search runs in its own thread and scores its own few paths whenever its step ends; a
scorer that takes one call at a time (`scorers.lm_prm_scorer` holds a lock) then forwards a
problem's 4-16 paths per call, one call after another. Here the first caller runs the inner
scorer; the calls that arrive while it runs wait, and when it returns one of them takes all the
waiting calls and runs them as one (group commit: no timer, nobody waits longer than the call
running before it).

    scorer = MergedScorer(LMPRMScorer.from_pretrained(path, "qwen_prm"))
    results = search_each(beam_search, problems, policy, scorer, BeamSearchConfig(n=8))

A call's scores are the inner scorer's for its paths: equal to calling it alone where the inner
scorer's scores do not depend on the other paths of a call (a PRM's batched forward pads rows:
equal up to float rounding). `cost` and `num_parameters` are the inner scorer's: a start that the
paths of several calls share (a PRM's system prompt) is forwarded once and counted on one of
them, whichever the merge put first, so a problem's count depends on what it was merged with; the
total is the tokens the merged calls forwarded. When a merged
call raises, each of its calls is run again alone, so only the one at fault gets the error, as
it would without merging.

Tests: `.venv/bin/python -m pytest tests/test_merged_scorer.py`.
"""
from __future__ import annotations

import numbers
import threading
from dataclasses import dataclass
from typing import Sequence

from treesearch.protocols import Scorer
from treesearch.records import Prefix


@dataclass
class _Call:
    """One thread's `score` call while it waits: its paths, then its scores or its error."""

    paths: Sequence[Prefix]
    scores: list[list[float]] | None = None
    error: BaseException | None = None
    done: bool = False

    def finish(self, scores: list[list[float]] | None = None, error: BaseException | None = None) -> None:
        self.scores, self.error, self.done = scores, error, True


class MergedScorer:
    """A `Scorer` that runs the calls of concurrent threads as one call of `inner` (module docstring).

    inner: any scorer; it is called by one thread at a time.
    calls / inner_calls: `score` calls received, and calls of `inner` made for them (fewer when
        calls were merged); read them after a search to see how much was merged.
    """

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.num_parameters: int = int(getattr(inner, "num_parameters", 0))  # the FLOPs of what it forwards
        self.calls = 0
        self.inner_calls = 0
        self._waiting: list[_Call] = []
        self._running = False
        self._changed = threading.Condition()
        self._inner_lock = threading.Lock()  # one call of inner at a time: score and cost alike

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        """The inner scorer's scores of paths, run together with the calls waiting beside it."""
        call = _Call(list(paths))
        with self._changed:
            self.calls += 1
            self._waiting.append(call)
            while self._running and not call.done:
                self._changed.wait()
            leader = not call.done  # nobody runs and this call waits: this thread takes every waiting call
            if leader:
                batch, self._waiting, self._running = self._waiting, [], True
        if leader:
            try:
                self._run(batch)
            except BaseException as error:  # an interrupt: no call of the batch may wait forever
                for waiting in batch:
                    if not waiting.done:
                        waiting.finish(error=error)
                raise
            finally:
                with self._changed:
                    self._running = False
                    self._changed.notify_all()
        if call.error is not None:
            raise call.error
        return call.scores  # type: ignore[return-value]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """The inner scorer's count of tokens forwarded for these paths (after the running inner
        call: a scorer may keep state between its score and its cost)."""
        with self._inner_lock:
            return self.inner.cost(paths)

    def _run(self, batch: list[_Call]) -> None:
        """Score the calls of batch as one inner call and hand each its rows; if that raises (or a
        row is missing), each call alone, so an error stays with the call that caused it."""
        if len(batch) > 1:
            merged = [path for call in batch for path in call.paths]
            try:
                scores = self._inner_score(merged)
            except Exception:  # noqa: BLE001 (each call is run again alone below and gets its own error)
                scores = None
            if scores is not None and len(scores) == len(merged):
                start = 0
                for call in batch:
                    call.finish(scores=list(scores[start:start + len(call.paths)]))
                    start += len(call.paths)
                return
        for call in batch:
            try:
                call.finish(scores=self._inner_score(call.paths))
            except Exception as error:  # noqa: BLE001 (raised in the caller's thread)
                call.finish(error=error)

    def _inner_score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        with self._inner_lock:
            self.inner_calls += 1
            return self.inner.score(paths)


def merged_for_threads(scorer: Scorer) -> Scorer:
    """`MergedScorer(scorer)` for a scorer that forwards a model (`num_parameters` > 0: an external
    PRM, the SPRM's second forward), else scorer itself: one that reads what the policy attached
    (head scores, log-probs) gains nothing from merging. An already merged scorer is returned as it is,
    and so is one without score / cost or an integer num_parameters (the search names it)."""
    count = getattr(scorer, "num_parameters", 0)
    if isinstance(scorer, MergedScorer) or not _is_count(count) or count <= 0:
        return scorer
    if not all(callable(getattr(scorer, method, None)) for method in ("score", "cost")):
        return scorer  # the strategy's own check names what it lacks, before any policy call
    return MergedScorer(scorer)


def _is_count(value: object) -> bool:
    """An integer that is not a bool (a method or "7B" is left to the strategy's check, which names it)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
