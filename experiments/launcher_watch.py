"""A sweep's job in a worker process of `hydra/launcher=local` (joblib's loky workers) stops when
the process that launched the sweep is gone, killed without a chance to end its workers
(`kill -9`, the kernel's out-of-memory killer): the workers were orphaned and ran their jobs to
the end, each another hour of a training run nobody would read, beside a rerun of the same sweep.

    with launcher_watched(lambda: hydra_rerun_hint("the rows of finished chunks are kept")):
        run the job

A thread looks every POLL_S seconds whether the worker's parent is still the process that
started it; once it is not, the job is stopped as a SIGTERM stops it (`Terminated` where it is,
so its context managers close; a training run saves at its next step boundary), then one line,
`terminated: the sweep's launching process (pid N) is gone; <hint>`, and the worker exits 143.
Ctrl-C and SIGTERM of the launching process need none of this (joblib ends its workers) and a
SIGTERM sent to a worker itself ends it as before (the default action). Outside a process that
multiprocessing started (a plain run, a `-m` sweep under Hydra's basic launcher, an `accelerate
launch` rank) the block does nothing: a run started with nohup whose shell is gone goes on.

Tests: `.venv/bin/pytest tests/test_launcher_watch.py`.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from experiments.cli_errors import TERMINATE_EXIT, Terminated

POLL_S = 1.0  # seconds between two looks at the worker's parent


def launcher_pid() -> int | None:
    """The pid of the process that started this one with multiprocessing (a loky worker's
    launcher), or None when this process was not started so or the block runs off the main
    thread (a signal handler can only be set there)."""
    parent = multiprocessing.parent_process()
    if parent is None or threading.current_thread() is not threading.main_thread():
        return None
    return parent.pid


@contextlib.contextmanager
def launcher_watched(hint: str | Callable[[], str], poll_s: float = POLL_S) -> Iterator[None]:
    """Run the block; in a worker whose launcher dies meanwhile, stop it (module docstring), print
    `terminated: the sweep's launching process (pid N) is gone; <hint>` (hint: a string, or a
    function giving it at that moment) and exit the worker with TERMINATE_EXIT."""
    launcher = launcher_pid()
    if launcher is None:
        yield
        return
    orphaned = threading.Event()
    previous = signal.signal(signal.SIGTERM, terminate_handler(orphaned))
    done = threading.Event()
    threading.Thread(target=watch_parent, args=(launcher, orphaned, done, poll_s),
                     name="launcher-watch", daemon=True).start()
    try:
        yield
    finally:  # an orphan's Terminated (or whatever its unwinding raised) ends here, with the worker
        done.set()
        signal.signal(signal.SIGTERM, previous)
        if orphaned.is_set():
            text = hint if isinstance(hint, str) else hint()
            with contextlib.suppress(OSError, ValueError):  # a stderr whose reader went with the launcher
                print(f"terminated: the sweep's launching process (pid {launcher}) is gone; {text}", file=sys.stderr)
            flush_quietly()
            os._exit(TERMINATE_EXIT)  # noqa: SLF001 (the worker's loop would wait minutes for jobs that never come)


def flush_quietly() -> None:
    """Flush stdout and stderr before `os._exit` (which skips it), whatever their readers did."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a reader gone, a closed or missing stream
            pass


def terminate_handler(orphaned: threading.Event) -> Callable[[int, Any], None]:
    """A SIGTERM handler: `Terminated` where the job is once the watcher found the launcher gone;
    before, a SIGTERM from outside (joblib ending its workers, a kill of this worker) takes the
    default action as it did without the watcher."""
    def handle(signum: int, frame: Any) -> None:
        if orphaned.is_set():
            raise Terminated()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    return handle


def watch_parent(launcher: int, orphaned: threading.Event, done: threading.Event, poll_s: float) -> None:
    """Until `done`, look every poll_s seconds whether this process's parent is still `launcher`;
    once not, set `orphaned` and send this process a SIGTERM (its handler stops the job)."""
    while not done.wait(poll_s):
        if os.getppid() != launcher:
            orphaned.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return
