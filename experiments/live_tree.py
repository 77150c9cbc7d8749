"""A live tree: one problem's search tree written to a result JSON after every round, for
`python -m experiments.plot tree FILE --watch 1` to follow while the search runs.

`LiveTree` is a `treesearch.protocols.RoundHook`: the strategy calls it after each round with
every problem's tree; it writes the followed problem's tree (at most every `interval_s`, and
every WRITE_TIME_FACTOR times the last write's duration, so writing a big tree takes at most a
tenth of the search's time; always the first time) as a result JSON with no candidates and no choice yet, atomically
(`save_result`, so the watcher never reads half a file), marked {"live": {"state": "searching",
"round": N}}. When the search returns, `finish` writes that problem's full result (candidates,
the chosen path, compute; no "live" key) and keeps it in the file at least FINAL_HOLD_S: the
next problem's rounds wait, and a final result that comes sooner (chunks faster than the hold)
waits too, written at the first round after the hold (a later one replaces it while it waits;
`close` writes the last one when the run ends). `follow` switches to another problem (experiments.search
follows the first problem of each chunk it searches). `marking_stops` wraps a search: when it
is interrupted or fails, the tree as it then stood is written once more marked "stopped", with
the reason, so a watcher does not take a dead search's file for a live one.

    live = LiveTree(Path("runs/live_tree.json"))
    live.follow(problems[0].id, "mcts", asdict(cfg))
    with live.marking_stops():
        results = mcts(problems, policy, scorer, cfg, on_round=live)
        live.finish(results)                        # within: a Ctrl-C during this write marks it stopped too
    live.close()                                    # the run's end: a final result still waiting is written
    python -m experiments.plot tree runs/live_tree.json --watch 1   # in another terminal

    python -m experiments.search search=mcts live_tree=true out_dir=runs/mcts
    python -m experiments.plot tree runs/mcts/live_tree.json --watch 1

A run resumed without live_tree=true removes its folder's live file when that is still marked
(`is_live_file`: an earlier live run's, stopped): nothing would update it again.

Tests: `.venv/bin/pytest tests/test_live_tree.py`.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from experiments.cli_errors import Terminated
from experiments.result_json import LIVE_KEY, save_result
from treesearch.compute import Compute
from treesearch.records import Problem
from treesearch.result import SearchResult
from treesearch.tree import Tree

LIVE_TREE_FILE = "live_tree.json"  # in a run folder of experiments.search (live_tree=true)
DEFAULT_INTERVAL_S = 0.5  # at most one write per this many seconds while a tree grows
# ... and per this many times the last write's own duration: a big tree's write (0.46 s for 1300
# nodes of 50-token steps) takes at most a tenth of the search's time, not most of it
WRITE_TIME_FACTOR = 10.0
# a finished problem's result stays in the file at least this long (a watcher polling every
# second saw no chunk's chosen path but the last: the next chunk's first round replaced it 0.1 s later)
FINAL_HOLD_S = 3.0


class LiveTree:
    """Writes the followed problem's tree to `path` after rounds of a search (module docstring).
    Safe to call from several search threads: only the followed problem's thread writes."""

    def __init__(self, path: Path, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if not interval_s >= 0:
            raise ValueError(f"LiveTree interval_s={interval_s!r} must be a number >= 0")
        self.path, self.interval_s = Path(path), interval_s
        self.problem_id: str | None = None
        self.strategy, self.config = "", {}
        self.rounds = 0  # rounds of the followed problem
        self._tree: Tree | None = None  # the followed problem's tree as the last round left it (None: finished)
        self._next_write: float | None = None  # monotonic time before which a round is not written
        self._hold_until = 0.0  # monotonic time before which a finished result stays in the file
        self._pending: SearchResult | None = None  # a final result waiting for the hold of the one before
        self._lock = threading.Lock()

    def follow(self, problem_id: str, strategy: str, config: Mapping[str, Any], problem: Problem | None = None) -> None:
        """Write this problem's tree from now on (strategy / config: what its result JSON says;
        problem: the Problem itself, so a search stopped before its first round, or Best-of-N,
        which has one round at the end, still marks the file stopped with the bare root)."""
        with self._lock:
            self.problem_id, self.strategy, self.config = problem_id, strategy, dict(config)
            self.rounds = 0
            self._tree = Tree(problem) if problem is not None else None
            self._next_write = None  # its first round is written at once (after a finished one's hold)

    def __call__(self, trees: Sequence[Tree]) -> None:
        """The RoundHook: write the followed problem's tree when it is among `trees` and the
        last write is at least interval_s (and WRITE_TIME_FACTOR times its duration) old."""
        for tree in trees:
            if tree.problem.id == self.problem_id:
                self._write_round(tree)

    def _write_round(self, tree: Tree) -> None:
        now = time.monotonic()
        with self._lock:
            self.rounds += 1
            self._tree = tree
            if now < self._hold_until:
                return
            if self._pending is not None:  # a final result waited for the hold: its turn, held in turn
                self._write_final(self._pending)
                return
            if self._next_write is not None and now < self._next_write:
                return
            self._save(tree, {"state": "searching", "round": self.rounds})
            if self.interval_s > 0:  # 0: every round (tests, a debugger)
                self._next_write = now + max(self.interval_s, WRITE_TIME_FACTOR * (time.monotonic() - now))

    def _save(self, tree: Tree, live: Mapping[str, Any]) -> None:
        save_result(self.path, growing_result(tree, self.strategy, self.config), live=live)

    def finish(self, results: Sequence[SearchResult]) -> None:
        """Write the followed problem's final result, when it is among `results` (while the one
        before is held: once its hold is over, module docstring). Call it within `marking_stops`:
        an interrupted or failed write (a big tree takes seconds) then marks the file stopped."""
        for result in results:
            if result.problem.id == self.problem_id:
                with self._lock:
                    if time.monotonic() < self._hold_until:
                        self._pending = result
                    else:
                        self._write_final(result)
                    # only now, the final result written (or waiting while the file holds the one
                    # before): a Ctrl-C during the write leaves the tree to `stop`, not "searching"
                    self._tree = None

    def _write_final(self, result: SearchResult) -> None:
        save_result(self.path, result)
        self._pending = None
        if self.interval_s > 0:  # 0: every round (tests, a debugger)
            self._hold_until = time.monotonic() + FINAL_HOLD_S

    def close(self) -> None:
        """The run is over: write a final result still waiting for a hold."""
        with self._lock:
            if self._pending is not None:
                self._write_final(self._pending)

    def stop(self, reason: str) -> None:
        """Write the followed problem's tree as it stands, marked stopped with reason (nothing
        when neither a round of it nor the problem was given, or its final result is written
        already)."""
        with self._lock:
            if self._tree is not None:
                self._save(self._tree, {"state": "stopped", "round": self.rounds, "reason": reason})
                self._tree = None

    @contextmanager
    def marking_stops(self) -> Iterator[None]:
        """Within the block, an exception or Ctrl-C (SIGTERM too, `experiments.cli_errors`) first
        marks the file stopped (`stop`), then propagates."""
        try:
            yield
        except BaseException as err:
            self.stop(stop_reason(err))
            raise


def stop_reason(err: BaseException) -> str:
    """What stopped a search, in a few words: "interrupted" (Ctrl-C), "terminated" (SIGTERM) or
    the error's type and first line."""
    if isinstance(err, KeyboardInterrupt):
        return "terminated" if isinstance(err, Terminated) else "interrupted"
    first_line = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first_line}"[:200].rstrip(": ")


def growing_result(tree: Tree, strategy: str, config: Mapping[str, Any]) -> SearchResult:
    """A tree still growing, as a result: no candidates, nothing chosen, no compute counted yet."""
    return SearchResult(tree.problem, strategy, dict(config), (), None, tree, Compute())


def is_live_file(path: Path) -> bool:
    """Whether path holds a live tree's file still marked searching or stopped (a result JSON with
    a "live" key), not a finished search's final result; False when it is missing or not JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        return False
    return isinstance(data, dict) and isinstance(data.get(LIVE_KEY), dict)
