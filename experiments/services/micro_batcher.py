"""`MicroBatcher`: turns concurrent single requests into batches for one blocking model call.

Usage:
    batcher = MicroBatcher(run_batch=scorer.score_batch, config=BatcherConfig(max_batch=32, max_wait_s=0.005))
    await batcher.start()                      # in the app's lifespan, on the serving event loop
    result = await batcher.submit(item)        # from each request handler; raises what run_batch raised
    result = await batcher.submit(item, gone=request.is_disconnected)   # dropped if its client leaves first
    await batcher.stop()

How it batches: requests wait in an asyncio queue. A collector task takes the first one, then
keeps taking more until `max_batch` items (or `max_weight` total weight, e.g. rows of a
generation) are collected or `max_wait_s` has passed since the first; then it runs
`run_batch(items)` in ONE worker thread (so the event loop keeps accepting requests and the
model never runs two batches at once) and resolves each request's future with its own result.
While a batch runs, new requests pile up and form the next batch with no extra wait.

Failures: if `run_batch` raises on a batch of several items, each item is retried alone, so one
bad request fails only itself; its exception is raised from its `submit`. A request whose client
went away (`submit`'s `gone` says so, polled every GONE_POLL_S) is dropped before its batch
runs (`ClientGone` from its `submit`); one whose batch already runs is computed and dropped (8
clients that gave up on 64 samples each held a later 2-token request 41 s before). `stop` fails
every request still waiting or running with RuntimeError, and a `submit` after it at once.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
GONE_POLL_S = 0.25  # how often a waiting request asks whether its client is still there
MAX_WAIT_S = 60.0  # a longer batching wait is a typo (inf never answered, and blocked shutdown)


class ClientGone(Exception):
    """Raised from `submit` when its client went away before its batch ran."""


@dataclass(frozen=True)
class BatcherConfig:
    """max_batch: most requests per batch. max_wait_s: longest wait for more requests after the
    first of a batch arrived. max_weight: most total weight per batch (a single heavier item
    still runs, alone); None: no limit."""

    max_batch: int = 32
    max_wait_s: float = 0.005
    max_weight: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch!r} must be an integer >= 1")
        if not 0 <= self.max_wait_s <= MAX_WAIT_S:
            raise ValueError(f"max_wait_s={self.max_wait_s!r} must be >= 0 and <= {MAX_WAIT_S:g} seconds")
        if self.max_weight is not None and self.max_weight < 1:
            raise ValueError(f"max_weight={self.max_weight!r} must be >= 1 or None")


@dataclass(frozen=True)
class _Pending(Generic[In, Out]):
    """One submitted request: its item, weight and the future its handler awaits."""

    item: In
    weight: int
    future: "asyncio.Future[Out]"


class MicroBatcher(Generic[In, Out]):
    """Collects concurrent `submit`s into batches for `run_batch` (see the module docstring).

    run_batch: items -> one result per item, in order; blocking (runs in a worker thread).
    config: batch limits. weight: an item's weight for config.max_weight (default 1 each).
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        config: BatcherConfig = BatcherConfig(),
        weight: Callable[[In], int] = lambda _: 1,
    ) -> None:
        self.run_batch, self.config, self.weight = run_batch, config, weight
        self._queue: asyncio.Queue[_Pending[In, Out]] | None = None
        self._carry: deque[_Pending[In, Out]] = deque()  # taken from the queue, did not fit the last batch
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Pending[In, Out]] = []  # the batch run_batch is computing
        self._forming: list[_Pending[In, Out]] = []  # the batch the collector is gathering
        self._stopped = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="micro-batch")
        self.batches_run = 0  # batches run so far (for /health and tests)
        self.items_run = 0

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect_forever())

    async def stop(self) -> None:
        """Stop collecting; requests still waiting or running fail with RuntimeError (a batch in
        the worker thread finishes there, its results dropped)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in [*self._running, *self._forming, *self._carry, *self._drain()]:
            _resolve(pending.future, exc=RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: In, gone: Callable[[], Awaitable[bool]] | None = None) -> Out:
        """Queue one item and wait for its own result. gone: asked every GONE_POLL_S while the
        item waits (a request's `is_disconnected`); True drops it (`ClientGone`)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        if self._stopped:
            raise RuntimeError("the service is shutting down")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, int(self.weight(item)), future))
        if gone is None:
            return await future
        while True:
            done, _ = await asyncio.wait({future}, timeout=GONE_POLL_S)
            if done:
                return future.result()
            if await gone():
                future.cancel()  # skipped by the collector if its batch has not started
                raise ClientGone("the client went away")

    # -- phases -------------------------------------------------------------------------------

    async def _collect_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            self._forming = []  # gathered: now the running batch
            batch = [p for p in batch if not p.future.done()]  # clients that left while it gathered: dropped too
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Pending[In, Out]]:
        """Wait for a first request, then gather more until a limit or the wait runs out."""
        assert self._queue is not None
        first = None
        while first is None or first.future.done():  # a request whose client left: dropped
            first = self._carry.popleft() if self._carry else await self._queue.get()
        batch = self._forming = [first]  # stop() fails these too (they waited forever)
        weight = first.weight
        deadline = asyncio.get_running_loop().time() + self.config.max_wait_s
        while len(batch) < self.config.max_batch:
            pending = await self._next_within(deadline)
            if pending is None:
                break
            if pending.future.done():
                continue
            if self.config.max_weight is not None and weight + pending.weight > self.config.max_weight:
                self._carry.append(pending)  # first of the next batch
                break
            batch.append(pending)
            weight += pending.weight
        return batch

    async def _next_within(self, deadline: float) -> _Pending[In, Out] | None:
        """The next waiting request, or None when none comes before the deadline."""
        assert self._queue is not None
        if self._carry:
            return self._carry.popleft()
        if not self._queue.empty():
            return self._queue.get_nowait()
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self, batch: list[_Pending[In, Out]], retry: bool = False) -> None:
        """run_batch in the worker thread; on failure of several, each item alone (those whose
        client is still there); `stop` fails the whole batch's waiting items meanwhile."""
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        if not retry:
            self._running = batch
        try:
            results = await loop.run_in_executor(self._executor, self._checked_run, items)
        except Exception as exc:  # noqa: BLE001 - delivered to the waiting handlers
            if len(batch) == 1:
                _resolve(batch[0].future, exc=exc)
                return
            for pending in batch:
                if not pending.future.done():
                    await self._run([pending], retry=True)
            return
        self.batches_run += 1
        self.items_run += len(items)
        for pending, result in zip(batch, results):
            _resolve(pending.future, result=result)

    def _checked_run(self, items: list[In]) -> Sequence[Out]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results

    def _drain(self) -> list[_Pending[In, Out]]:
        drained = []
        while self._queue is not None and not self._queue.empty():
            drained.append(self._queue.get_nowait())
        return drained


def _resolve(future: "asyncio.Future[Out]", result: object = None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless its handler gave up (client gone)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
