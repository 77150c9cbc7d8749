"""Timing and memory probes shared by the benchmark scripts (`experiments/bench_*.py`).

Usage:
    with ForwardClock(model) as forward:          # time inside model.forward (hooks, any nn.Module)
        with PhaseClock({"sampling": [(decode_loop, "sample_next_tokens")]}, forward) as phases:
            ...                                   # phases.seconds["sampling"]: outside the forward
        with PolicyClock(policy) as calls:        # time inside policy.propose / policy.rollout
        with GenerateClock(vllm_policy) as engine:  # time inside its engine's LLM.generate
            timing = timed(lambda: search(...))   # Timing(wall_s, cpu_s) of the whole call
    forward.seconds, forward.calls, calls.seconds
    with DecodeRows(model) as rows: ...           # rows.mean / rows.median: rows per decode forward
    best = best_of(lambda: torch.mm(a, b), repeats=5)   # least wall seconds of several runs
    runs = interleaved({"a": run_a, "b": run_b}, rounds=3)  # a, b, a, b, a, b: [(Timing, result), ...] each
    median_timing(t for t, _ in runs["a"])        # Timing of the median wall and median CPU seconds
    peak_rss_mib()                                # this process's resident-set high-water mark

Wall time is what a user waits for; CPU time of this process is printed beside it because these
machines are shared (another job's load stretches wall time, much less a single-threaded
process's CPU time). Neither is used as an absolute target: the scripts print ratios.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    """wall_s: elapsed seconds (perf_counter); cpu_s: CPU seconds of this process, all threads."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], Any]) -> Timing:
    """Run fn once and time it (its result is dropped)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The least wall seconds of `repeats` runs of fn (a peak: the run least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(fns: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[tuple[Timing, T]]]:
    """Each function timed `rounds` times, in rounds (a, b, c, a, b, c, ...), so a slow spell of a
    shared machine falls on every one alike instead of on whichever ran during it. Returns per
    name every round's (timing, result), in order."""
    runs: dict[str, list[tuple[Timing, T]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            result: list[T] = []
            timing = timed(lambda: result.append(fn()))
            runs[name].append((timing, result[0]))
    return runs


def median_timing(timings: Iterable[Timing]) -> Timing:
    """The median wall seconds and the median CPU seconds of several runs."""
    timings = list(timings)
    return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


class ForwardClock:
    """Seconds spent inside `module.forward` while the context is open (forward pre/post hooks;
    nested calls of the same module would be counted once each, the LM is never nested):
    `seconds` of wall time and `cpu_seconds` of this process's CPU time (all its threads), the
    latter unmoved by other jobs taking the cores away. A module on a CUDA GPU is synchronized
    before and after each forward, so the forward's kernels count inside it, not in whatever
    waits for them next (its CPU seconds then include the wait, so read wall time there)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self._sync = _synchronizer(module)
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self._started = 0.0
        self._cpu_started = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> "ForwardClock":
        self._handles = [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: Any, args: Any) -> None:
        self._sync()
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.cpu_seconds += time.process_time() - self._cpu_started
        self.calls += 1


def _synchronizer(module: Any) -> Callable[[], None]:
    """torch.cuda.synchronize for a module whose first parameter is on a CUDA GPU, else a no-op."""
    import torch

    parameter = next(iter(module.parameters()), None)
    if parameter is None or parameter.device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(parameter.device)


class DecodeRows:
    """The rows of every forward that feeds one token per row (`input_ids` [B, 1]: the decode
    steps, and a step search's prefills that only feed each context's last token) while the
    context is open (a forward pre-hook): how full a batch the decode loop keeps.

        with DecodeRows(lm) as rows:
            search(...)
        rows.mean, rows.median, rows.rows
    """

    def __init__(self, module: Any) -> None:
        self.module = module
        self.rows: list[int] = []
        self._handle: Any = None

    def __enter__(self) -> "DecodeRows":
        self._handle = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _pre(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            self.rows.append(int(ids.shape[0]))

    @property
    def mean(self) -> float:
        return sum(self.rows) / len(self.rows) if self.rows else 0.0

    @property
    def median(self) -> float:
        ordered = sorted(self.rows)
        return float(ordered[len(ordered) // 2]) if ordered else 0.0


class PolicyClock:
    """Seconds spent inside a policy's `propose` / `rollout` calls while the context is open
    (the bound methods are wrapped on the instance and restored on exit)."""

    METHODS = ("propose", "rollout")

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self) -> "PolicyClock":
        for name in self.METHODS:
            setattr(self.policy, name, self._wrap(getattr(self.policy, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.METHODS:
            vars(self.policy).pop(name, None)  # back to the class's method

    def _wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed_call


class GenerateClock:
    """Seconds inside the `generate` calls of a policy's engine (`policy.llm`, e.g. a
    `VLLMPolicy`'s `vllm.LLM`) while the context is open: `seconds` (wall), `cpu_seconds` (this
    process's CPU time; vLLM's in-process engine computes in this process) and `calls`. The
    engine is swapped for a pass-through that times `generate`, and put back on exit."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self._engine: Any = None

    def __enter__(self) -> "GenerateClock":
        self._engine = self.policy.llm
        self.policy.llm = _TimedEngine(self._engine, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.policy.llm = self._engine


@dataclass
class _TimedEngine:
    """An engine whose `generate` is timed into `clock`; every other attribute is the engine's."""

    engine: Any
    clock: GenerateClock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self.engine.generate(*args, **kwargs)
        finally:
            self.clock.seconds += time.perf_counter() - wall
            self.clock.cpu_seconds += time.process_time() - cpu
            self.clock.calls += 1


class PhaseClock:
    """Wall seconds inside named phases of the engine while the context is open: each phase is
    a list of (owner, attribute) functions (module functions or class methods), wrapped on the
    owner and restored on exit; time inside the forward (a `ForwardClock` on the model, open
    around this one) during a phase is not counted. Phases must not nest one another.

        with ForwardClock(lm) as forward, PhaseClock({"sampling": [(decode_loop, "sample_next_tokens")]}, forward) as phases:
            search(...)
        phases.seconds["sampling"], phases.calls["sampling"]
    """

    def __init__(self, phases: dict[str, list[tuple[Any, str]]], forward: ForwardClock) -> None:
        self.phases, self.forward = phases, forward
        self.seconds = {name: 0.0 for name in phases}
        self.calls = {name: 0 for name in phases}
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "PhaseClock":
        for name, targets in self.phases.items():
            for owner, attribute in targets:
                original = vars(owner)[attribute]  # a class's own entry, not an inherited one
                self._saved.append((owner, attribute, original))
                setattr(owner, attribute, self._wrap(name, getattr(owner, attribute)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved = []

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed_phase(*args: Any, **kwargs: Any) -> Any:
            start, inside = time.perf_counter(), self.forward.seconds
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start - (self.forward.seconds - inside)
                self.calls[name] += 1

        return timed_phase


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB: Linux's VmHWM (/proc/self/status), which
    starts afresh in a new program; elsewhere `ru_maxrss` (bytes on macOS), which a child started
    by subprocess inherits from its parent (a parent that had held 1.1 GB made a child of 386 MiB
    report 1148). A high-water mark: measure each configuration in a fresh process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mib() -> float:
    """This process's resident set size now, MiB (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return peak_rss_mib()
    return pages * resource.getpagesize() / 2**20
