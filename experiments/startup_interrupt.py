"""Ctrl-C while a command is still starting: one line and exit 130, not a traceback through
torch's, transformers' or Hydra's imports (seconds) or the argument checks before the run. Nothing
is written by then, so there is nothing to keep or resume.

A command module calls `quiet_start(__name__)` before its heavy imports; when the run proper
begins, `experiments.cli_errors.interrupt_reported` calls `started()`, which hands Ctrl-C back
to Python (KeyboardInterrupt), so the command's own handling (what is kept, how to go on) applies
from there on:

    from experiments.startup_interrupt import quiet_start
    quiet_start(__name__)  # only when run as a command (__main__), in the main thread
    import torch  # ... the heavy imports

SIGTERM needs nothing here: its default action ends the process without a traceback (exit 143
in a shell). Tests: `.venv/bin/pytest tests/test_startup_interrupt.py`.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

STARTING_EXIT = 130  # as an interrupted run (experiments.cli_errors.INTERRUPT_EXIT)
STARTING_LINE = "interrupted while starting: nothing was written"


def _exit_while_starting(signum: int, frame: FrameType | None) -> None:
    """The SIGINT handler while a command starts: the line, then SystemExit(130) from wherever the
    main thread is (an import half done is of no use to a process that ends)."""
    print(f"\n{STARTING_LINE}", file=sys.stderr)
    raise SystemExit(STARTING_EXIT)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def quiet_start(module_name: str) -> None:
    """Take Ctrl-C over until `started()` when module_name is "__main__" (the module runs as the
    command, not imported as a library), in the main thread, and Python's own handler holds it
    (an embedding program's handler is left alone)."""
    if module_name == "__main__" and _main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_while_starting)


def started() -> None:
    """Give Ctrl-C back to Python (KeyboardInterrupt) if `quiet_start` holds it; otherwise nothing."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is _exit_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
