"""One-line errors for the argparse command lines: our own input errors (ValueError,
FileNotFoundError: a bad setting, a missing or damaged file) and a place that cannot be written
(`is_storage_error`: a full disk, a read-only or forbidden folder) print `error: <message>` on
stderr and give exit code 2; any other exception is a bug and keeps its traceback.

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(train_command, argv)     # train_command(argv) -> exit code

Tests: the CLI tests of each command (e.g. `.venv/bin/python -m pytest tests/test_train_head.py`).
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, Sequence

USAGE_EXIT = 2


class RunDirBusyError(RuntimeError):
    """Another process holds a run folder's lock (`experiments.search.run_lock`)."""


INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RunDirBusyError)
# OSError numbers that say the output place cannot take the file, not that the program is wrong
# (a permission error is not one: it may be a file the command reads)
STORAGE_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_storage_error(err: BaseException) -> bool:
    """An OSError (or one it was raised from) of STORAGE_ERRNOS: a full disk or quota, a
    read-only file system."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return True
        err = err.__cause__  # type: ignore[assignment]
    return False


def run_command(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """command(argv)'s exit code, or USAGE_EXIT after printing `error: <message>` for INPUT_ERRORS."""
    try:
        return command(argv)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except OSError as err:
        if not is_storage_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
