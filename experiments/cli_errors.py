"""One-line errors for the argparse command lines: our own input errors (ValueError,
FileNotFoundError: a bad setting, a missing or damaged file) and a place that cannot be written
(`is_storage_error`: a full disk, a read-only or forbidden folder) print `error: <message>` on
stderr and give exit code 2; any other exception is a bug and keeps its traceback. A stdout whose
reader is gone (`... | head -1`) stops the command quietly with exit 141
(`experiments.broken_pipe.stdout_closed_quietly`).

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(train_command, argv)     # train_command(argv) -> exit code

Ctrl-C (`interrupt_reported`): one line saying what is kept and how to go on, exit 130, instead
of the traceback of wherever the interrupt landed (HYDRA_FULL_ERROR=1 keeps it):

    with interrupt_reported("rerun the same command to go on"):
        main()

(Before it, while the command imports and checks its arguments, `experiments.startup_interrupt`
answers a Ctrl-C with one line of its own.)

SIGTERM (`kill`, `timeout`, a SLURM cancel, `docker stop`) inside it is handled alike: raised as
`Terminated` where the program is, so every `finally` and context manager runs (a vLLM engine
in its own processes is closed instead of left running with its memory), then one line and
exit 143.

Tests: the CLI tests of each command (e.g. `.venv/bin/python -m pytest tests/test_train_head.py`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Sequence

from experiments.broken_pipe import stdout_closed_quietly
from experiments.startup_interrupt import started
from policies.disk_full import STORAGE_ERRNOS
from policies.step_boundary import Terminated  # noqa: F401 (raised on SIGTERM here; re-exported)

USAGE_EXIT = 2
INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
TERMINATE_EXIT = 143  # 128 + SIGTERM


def raise_terminated(signum: int, frame: object) -> None:
    """A signal handler raising `Terminated` where the program is (SIGTERM here; bench_all's SIGHUP too)."""
    raise Terminated()


class RunDirBusyError(RuntimeError):
    """Another process holds a run folder's lock (`experiments.search.run_lock`)."""


INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RunDirBusyError)


def is_storage_error(err: BaseException) -> bool:
    """An OSError (or one it was raised from) of STORAGE_ERRNOS: a full disk or quota, a
    read-only file system."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return True
        err = err.__cause__  # type: ignore[assignment]
    return False


def error_text(err: BaseException) -> str:
    """str(err) with its notes (`add_note`: "in the search of problem 'x'") after it, "; "-joined:
    a one-line `error: ...` printed str(err) alone, without the note."""
    notes = [str(note) for note in getattr(err, "__notes__", ())]
    return "; ".join([str(err), *notes])


def run_command(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """command(argv)'s exit code, or USAGE_EXIT after printing `error: <message>` for INPUT_ERRORS;
    SystemExit(141), quietly, when stdout's reader is gone (`stdout_closed_quietly`)."""
    try:
        with stdout_closed_quietly():
            return command(argv)
    except INPUT_ERRORS as err:
        print(f"error: {error_text(err)}", file=sys.stderr)
        return USAGE_EXIT
    except OSError as err:
        if not is_storage_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT


@contextlib.contextmanager
def interrupt_reported(how_to_go_on: str | Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside: `interrupted: <how_to_go_on>` (a string, or a function giving it at that
    moment) on stderr and SystemExit(130); SIGTERM: `terminated: ...` and 143 (module
    docstring; its handler is installed for the block, in the main thread only); with
    HYDRA_FULL_ERROR=1 the KeyboardInterrupt and its traceback pass through."""
    main_thread = threading.current_thread() is threading.main_thread()
    started()  # Ctrl-C raises KeyboardInterrupt again (experiments/startup_interrupt.py held it while starting)
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as err:
        # a trainer that caught the SIGTERM, saved and re-raised says so (`TrainingInterrupted.terminated`)
        terminated = isinstance(err, Terminated) or getattr(err, "terminated", False) is True
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            if not terminated:
                raise
            traceback.print_exc()  # the traceback wanted, and still the exit status of a kill
            raise SystemExit(TERMINATE_EXIT) from None
        hint = how_to_go_on if isinstance(how_to_go_on, str) else how_to_go_on()
        print(f"\n{'terminated' if terminated else 'interrupted'}: {hint}", file=sys.stderr)
        raise SystemExit(TERMINATE_EXIT if terminated else INTERRUPT_EXIT) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


_SWEEP_DIR: list[str] = []  # the folder of the sweep whose job runs in this process (`note_hydra_job`)


def note_sweep_dir(folder: str) -> None:
    """Remember `folder` as the sweep's whose jobs this process runs or launches (`hydra_rerun_hint`)."""
    _SWEEP_DIR[:] = [folder]


def note_hydra_job(out_dir: object = None) -> None:
    """Called first in a Hydra task function: remember the sweep's folder when the job is one of a
    sweep that writes there (Hydra's config is gone by the time a Ctrl-C reaches the command's top
    level); out_dir: the job's own folder when given (`-m` with one job), found by the same command."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if out_dir:
        _SWEEP_DIR.clear()
    elif HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        note_sweep_dir(str(HydraConfig.get().sweep.dir))


def check_no_chdir() -> None:
    """A ValueError when the Hydra job changed into its output folder (hydra.job.chdir=true): the
    config's relative paths (out_dir, policy.path, ...) are read from where the command runs, so
    a run wrote its folder inside itself (out_dir=rel/x: records in rel/x/rel/x) and found no
    relative policy."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.chdir:
        raise ValueError("hydra.job.chdir=true is not supported: out_dir, policy.path and the config's other "
                         "relative paths are read from where the command runs; leave hydra.job.chdir false")


def noted_sweep_dir() -> str | None:
    """The folder of the sweep this process runs or launches jobs of (`note_sweep_dir`), else None."""
    return _SWEEP_DIR[0] if _SWEEP_DIR else None


def hydra_rerun_hint(kept: str) -> str:
    """`<kept>; rerun the same command to go on`, naming the sweep's folder for a sweep (an ad-hoc
    -m sweep's default folder is new on every run: only hydra.sweep.dir= finds this one again)."""
    if _SWEEP_DIR:
        return f"{kept}; rerun the same command with hydra.sweep.dir={_SWEEP_DIR[0]} (its folder) to go on"
    return f"{kept}; rerun the same command to go on"
