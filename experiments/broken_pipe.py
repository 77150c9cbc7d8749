"""A command whose stdout's reader is gone (`... | head -1`, a pager quit) stops quietly with exit
141, as `yes | head` does, instead of a BrokenPipeError traceback (or, with the table still in
stdout's buffer, Python's "Exception ignored ... BrokenPipeError" and exit 120 at shutdown):

    if __name__ == "__main__":
        with stdout_closed_quietly():
            raise SystemExit(main())

(`experiments.cli_errors.run_command` does it for the commands it runs.) The recipe of Python's
docs (https://docs.python.org/3/library/signal.html#note-on-sigpipe): stdout is pointed at
os.devnull, so the flush at exit has nowhere to fail. Only stdout's error is answered so: a
BrokenPipeError raised while stdout's reader is still there (a socket of the services, a pipe
to a child process) passes through as before. While stdout is fine nothing changes but one
flush of stdout at the block's end (so a reader that left is found there, not at exit).
A command that fails (SystemExit with a nonzero code) keeps its code; only the flush's error
is silenced.

Tests: `.venv/bin/python -m pytest tests/test_broken_pipe.py`.
"""
from __future__ import annotations

import contextlib
import os
import select
import sys
from typing import Iterator

PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for `yes` in `yes | head`


def stdout_reader_gone() -> bool:
    """Whether sys.stdout is a pipe (or socket) whose reading end is closed: poll reports an
    error or hang-up on it. False for a file, a terminal, a stdout without a descriptor (pytest's
    capture) or where poll is missing (Windows)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout's descriptor at os.devnull: what is left in its buffer, and anything printed
    after, is dropped instead of failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def flush_stdout() -> bool:
    """Flush sys.stdout; False (stdout silenced) when its reader is gone, True otherwise."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:  # flushing stdout fails only by stdout
        silence_stdout()
        return False
    return True


@contextlib.contextmanager
def stdout_closed_quietly() -> Iterator[None]:
    """SystemExit(PIPE_EXIT), with nothing on stderr, when stdout's reader is gone: at a
    BrokenPipeError from inside, or at the flush of stdout on leaving (module docstring)."""
    try:
        yield
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        silence_stdout()
        raise SystemExit(PIPE_EXIT) from None
    except SystemExit as done:
        if not flush_stdout() and done.code in (0, None):
            raise SystemExit(PIPE_EXIT) from None
        raise
    if not flush_stdout():
        raise SystemExit(PIPE_EXIT)
