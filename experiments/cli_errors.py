"""One-line errors for the argparse command lines: our own input errors (ValueError,
FileNotFoundError: a bad setting, a missing or damaged file) print `error: <message>` on stderr
and give exit code 2; any other exception is a bug and keeps its traceback.

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(train_command, argv)     # train_command(argv) -> exit code

Tests: the CLI tests of each command (e.g. `.venv/bin/python -m pytest tests/test_train_head.py`).
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

USAGE_EXIT = 2
INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


def run_command(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """command(argv)'s exit code, or USAGE_EXIT after printing `error: <message>` for INPUT_ERRORS."""
    try:
        return command(argv)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
