"""Continuous batching for the transformers policy: the chunks of many concurrent policy calls
decode together, each joining the batch between two decode steps and leaving when its last row
ends, instead of every call waiting for the slowest row of a lockstep round.

Why: a batched step-level search sends all problems' beams in one call per round, and the round
lasts as long as its longest step; while the stragglers finish, the forward runs at a few rows
(`python -m experiments.bench_batching` prints the rows per forward). Here each problem runs its
own search in its own thread (`treesearch.concurrent.search_each`); the policy's calls queue
their chunks (`policies.decode_loop.ChunkRequest`) with one engine thread, which admits them
while rows are free, samples every chunk from its own logits and feeds all live rows in one
forward (`policies.joint_forward`). A problem's next round starts as soon as its own step ends.
Calls that arrive between the same two decode steps are merged into one chunk, a "cohort"
(`policies.chunk_merge`: one prefill, one sampling, one attention pass), and each is handed
back as soon as its own rows end, not when its cohort does.

Each call keeps its own generator and draws in its own row order, so a problem's samples equal
those of running that problem alone (one problem at a time), up to float rounding.

    with ContinuousEngine.attached(policy):                   # the policy's calls go to the engine
        results = search_each(beam_search, problems, policy, scorer, cfg)   # one thread per problem

    python -m experiments.search search=beam chunk=16 +batching=continuous  # the same from Hydra

Threads: the policy guards its tokenizer and prefix cache with `policy.lock`; a scorer is called
from the problems' threads at once. The engine switches the model's attention for each step
(`policies.shared_prefix.shared_prefix_attention`) and holds `policies.model_lock.model_lock` of
the model object while it does, so a scorer that runs the same model object
(`scorers.sprm_scorer`'s second forward on the reflective model the policy decodes with) takes
its turn between two steps.

Errors: a cohort whose merged prefill raises is started again one call at a time, so only the
call at fault fails (the exception is raised in its caller's thread); a cohort whose sampling
raises fails its own calls; a joint forward that raises fails the cohorts in it. The
engine keeps serving the others. An error in the engine's own loop fails every waiting call and
closes the engine (later calls raise, with that error as the cause): no caller waits forever.

Tests: `.venv/bin/python -m pytest tests/test_continuous_engine.py`.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator

import torch

from policies.allocator import release_freed_memory
from policies.chunk_merge import merge_key, merge_requests
from policies.decode_loop import ChunkOutput, ChunkRequest, ChunkRun, StepHead
from policies.joint_forward import feed_jointly
from policies.model_lock import model_lock
from policies.slot_cache import KV_POOL
from policies.step_stops import StepStopRule

POOL_BUFFERS_PER_CHUNK = 4  # KV buffers a running chunk holds (prefill keys / values, rows' keys / values)


@dataclass
class _Call:
    """One queued chunk of a policy call, and what its caller waits for."""

    request: ChunkRequest
    done: threading.Event = field(default_factory=threading.Event)
    output: ChunkOutput | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.request.row_context)

    def finish(self, output: ChunkOutput | None = None, error: BaseException | None = None) -> None:
        self.output, self.error = output, error
        self.done.set()


@dataclass
class _Cohort:
    """The calls admitted together (with one `merge_key`), decoded as one merged chunk; each call
    is handed its rows as soon as they are all done (`deliver_done`), not when the whole chunk is."""

    calls: list[_Call]
    run: ChunkRun | None = None
    pending: list[tuple[_Call, slice]] = field(default_factory=list)  # calls not handed back yet, their rows

    def __post_init__(self) -> None:
        start = 0
        for call in self.calls:
            self.pending.append((call, slice(start, start + call.rows)))
            start += call.rows

    def deliver_done(self) -> None:
        """Hand back every pending call whose rows have all finished."""
        waiting = []
        for call, rows in self.pending:
            if self.run.rows_done(rows):
                call.finish(self.run.rows_output(rows))
            else:
                waiting.append((call, rows))
        self.pending = waiting

    def deliver(self) -> None:
        """The run has ended: its buffers go back to the pool and the last calls are handed back."""
        self.run.release()
        self.deliver_done()

    def fail(self, error: BaseException) -> None:
        """Fail every call not handed back yet (the KV buffers go back to the pool)."""
        if self.run is not None:
            self.run.release()
        for call, _ in self.pending:
            call.finish(error=error)
        self.pending = []


_ATTACH_LOCK = threading.Lock()
# per policy object (not an attribute: a copy of the policy would share it) its decoders
_ATTACHED: "weakref.WeakKeyDictionary[Any, list[Any]]" = weakref.WeakKeyDictionary()


def _attached_stack(policy: Any) -> list[Any]:
    """The policy's decoders, its own first and then each attached engine's, oldest first: blocks
    of `ContinuousEngine.attached` on one policy may overlap in any order (threads), and each
    leaves the latest engine still open decoding (restoring the decoder it found left a policy
    wired to a closed engine when two blocks ended out of order). An empty stack is dropped."""
    stack = _ATTACHED.get(policy)
    if not stack:
        stack = _ATTACHED[policy] = [policy.chunk_decoder]
    return stack


class ContinuousEngine:
    """One thread that decodes every queued chunk of a model (see the module docstring).

    max_rows: most sample rows decoding at once (the policy's batch_size); a chunk waits until
        its rows fit, except that one chunk is always admitted when none runs.
    """

    def __init__(self, model: Any, rule: StepStopRule, pad_id: int, step_head: StepHead | None, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"ContinuousEngine max_rows={max_rows} must be >= 1")
        self.model, self.rule, self.pad_id, self.step_head, self.max_rows = model, rule, pad_id, step_head, max_rows
        self._queue: list[_Call] = []
        self._wake = threading.Condition()
        self._closed = False
        self._broken: BaseException | None = None  # what stopped the engine thread, if anything did
        self._held = False
        self.forwards = 0  # decode forwards of the running cohorts (joint or alone), for benchmarks
        self.cohorts_fed = 0  # cohorts summed over those forwards (/ forwards: cohorts per forward)
        self.most_cohorts = 0  # most cohorts in one forward
        self._thread = threading.Thread(target=self._serve, name="continuous-engine", daemon=True)
        self._thread.start()

    @classmethod
    @contextmanager
    def attached(cls, policy: Any) -> Iterator["ContinuousEngine"]:
        """Within the block, `policy` (a TransformersPolicy) decodes its chunks on a new engine,
        from any number of threads; the engine stops afterwards. Another policy is a TypeError
        (vLLM and OpenAI-compatible policies are called from `search_each`'s threads as they are)."""
        if not hasattr(policy, "chunk_decoder"):
            raise TypeError(
                f"ContinuousEngine.attached takes a TransformersPolicy (it decodes that policy's chunks), not a "
                f"{type(policy).__name__}; call search_each without the engine for other policies"
            )
        engine = cls(policy.model, policy.rule, policy.pad_id, policy.step_head, policy.sampling.batch_size)
        with _ATTACH_LOCK:
            stack = _attached_stack(policy)
            stack.append(engine.decode)
            policy.chunk_decoder = engine.decode
        try:
            with KV_POOL.serving_engine():  # afterwards the extra chunks' buffers go back to the allocator
                try:
                    yield engine
                finally:
                    with _ATTACH_LOCK:  # blocks may end in any order (threads): the latest still open decodes
                        stack.remove(engine.decode)
                        policy.chunk_decoder = stack[-1]
                        if len(stack) == 1:  # none attached: the policy's own decoder, no entry kept
                            del _ATTACHED[policy]
                    engine.close()
        finally:
            release_freed_memory()  # and the engine's threads' arenas to the OS (RSS grew per chunk)

    def decode(self, request: ChunkRequest) -> ChunkOutput:
        """Queue one chunk and wait for what its rows generated (`decode_chunk`'s result); an
        error in it is raised here."""
        call = _Call(request)
        with self._wake:
            if self._closed:
                raise RuntimeError("the continuous engine is closed") from self._broken
            self._queue.append(call)
            self._wake.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.output

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, queued calls wait (the running ones go on); afterwards all of them
        are admitted at once, as far as rows allow (tests use it to line calls up)."""
        with self._wake:
            self._held = True
        try:
            yield
        finally:
            with self._wake:
                self._held = False
                self._wake.notify()

    @property
    def queued(self) -> int:
        """Calls waiting to be admitted."""
        with self._wake:
            return len(self._queue)

    def close(self) -> None:
        """Stop the engine thread once the chunks it holds are done; later `decode` calls fail."""
        with self._wake:
            self._closed, self._held = True, False
            self._wake.notify()
        self._thread.join()

    # -- the engine thread --------------------------------------------------------------------

    def _serve(self) -> None:
        running: list[_Cohort] = []
        try:
            with torch.inference_mode():
                while True:
                    admitted = self._admit(running)
                    if admitted is None:
                        return
                    with model_lock(self.model):  # a scorer's forward on this model object waits for the step
                        running.extend(c for cohort in _cohorts(admitted) for c in self._started(cohort) if c.run is not None)
                        running = [cohort for cohort in running if self._sample(cohort)]
                        if running:
                            self._feed(running)
        except BaseException as error:  # a bug in the loop itself: no caller may wait forever
            self._shut_down(running, error)

    def _shut_down(self, running: list[_Cohort], error: BaseException) -> None:
        """Fail every running and queued call with `error` and refuse new ones."""
        with self._wake:
            self._closed, self._broken = True, error
            queued, self._queue = self._queue, []
        for cohort in running:
            cohort.fail(error)
        for call in queued:
            call.finish(error=error)

    def _admit(self, running: list[_Cohort]) -> list[_Call] | None:
        """The queued calls whose rows fit beside the running ones (first come first; blocks
        while nothing runs or waits; None once closed and idle)."""
        with self._wake:
            while (self._held or not self._queue) and not running:
                if self._closed and not self._queue:
                    return None
                self._wake.wait()
            if self._held:
                return []
            free = self.max_rows - sum(cohort.run.live_rows for cohort in running)
            admitted: list[_Call] = []
            while self._queue and (self._queue[0].rows <= free or not (running or admitted)):
                call = self._queue.pop(0)
                free -= call.rows
                admitted.append(call)
        cohorts = len(running) + len({merge_key(call.request) for call in admitted})
        KV_POOL.raise_max_free(POOL_BUFFERS_PER_CHUNK * cohorts)
        return admitted

    def _started(self, cohort: _Cohort) -> list[_Cohort]:
        """[the cohort, prefilled]; when its merged prefill fails, each of its calls prefilled as a
        cohort of its own, so only a call at fault gets the error (as `MergedScorer` does)."""
        if len(cohort.calls) == 1:
            return [self._start(cohort)]
        if self._start(cohort, fail=False).run is not None:
            return [cohort]
        return [self._start(_Cohort([call])) for call in cohort.calls]

    def _start(self, cohort: _Cohort, fail: bool = True) -> _Cohort:
        """Prefill the cohort's merged chunk (its first logits); on an error its calls fail (fail)
        or the cohort is left without a run (not fail: the caller splits it)."""
        try:
            request = merge_requests([call.request for call in cohort.calls])
            cohort.run = ChunkRun(self.model, request, self.rule, self.pad_id, self.step_head)
        except Exception as error:  # noqa: BLE001 - the callers get it
            if fail:
                cohort.fail(error)
            cohort.run = None
        return cohort

    def _sample(self, cohort: _Cohort) -> bool:
        """Sample the cohort's next tokens; a cohort that ends (or fails) is handed back.
        Returns whether it still decodes."""
        try:
            if cohort.run.sample():
                cohort.deliver_done()
                return True
            cohort.deliver()
        except Exception as error:  # noqa: BLE001
            cohort.fail(error)
        return False

    def _feed(self, running: list[_Cohort]) -> None:
        """One forward for every live row; if it raises, its cohorts fail."""
        try:
            feed_jointly(self.model, [cohort.run for cohort in running])
            self.forwards += 1
            self.cohorts_fed += len(running)
            self.most_cohorts = max(self.most_cohorts, len(running))
        except Exception as error:  # noqa: BLE001
            for cohort in running:
                cohort.fail(error)
            running.clear()


def _cohorts(calls: list[_Call]) -> list[_Cohort]:
    """The admitted calls grouped by `merge_key`, in order of arrival."""
    groups: dict[Hashable, list[_Call]] = {}
    for call in calls:
        groups.setdefault(merge_key(call.request), []).append(call)
    return [_Cohort(group) for group in groups.values()]
