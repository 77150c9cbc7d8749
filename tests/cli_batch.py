"""Many `python -m <module> *args` runs in one child Python: the child pays torch's, transformers'
and Hydra's imports (seconds) once, then runs each case as `python -m` would (runpy as
`__main__`, sys.argv, its own folder as cwd and sys.path[0], HYDRA_FULL_ERROR unset), its stdout
and stderr captured at the file descriptors, SystemExit turned into the exit status, and the
process state a run may change (Hydra's singletons, signal handlers, logging, warnings filters,
os.environ, sys.path, modules imported from the case's folder) put back before the next.

For the checks of bad input (one `error: ...` line and exit 2, before Hydra or early in main);
keep one real `python -m` run per command beside them, which covers the entry point itself:

    runs = CliRuns([Case("experiments.search", ("search=nosuch",)), ...], tmp_path_factory.mktemp("cli"))
    done = runs[Case("experiments.search", ("search=nosuch",))]  # one child for all the module's cases
    assert done.returncode == 2 and done.stderr.startswith("error: ")

This module holds no tests; run as a script, it is the child.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """`python -m module *args` run in a folder of its own holding files ((relative path, text)
    pairs, written first); "{cwd}" in an argument stands for that folder."""

    module: str
    args: tuple[str, ...]
    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Run:
    """What the command did: its exit status, stdout and stderr, and the folder it ran in."""

    returncode: int
    stdout: str
    stderr: str
    cwd: Path


def command_env(**env: str) -> dict[str, str]:
    """The environment of a command as the tests run it: HYDRA_FULL_ERROR unset, the repo
    importable, warnings off."""
    environ = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    environ.update({"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **env})
    return environ


class CliRuns:
    """The Run of each of cases, each in its own folder under root; all the cases of one module
    run in one child when the first of them is asked for."""

    def __init__(self, cases: Iterable[Case], root: Path, timeout_per_case: float = 60.0) -> None:
        self.cases = list(dict.fromkeys(cases))
        self.root = Path(root)
        self.timeout_per_case = timeout_per_case
        self.runs: dict[Case, Run | str] = {}

    def __getitem__(self, case: Case) -> Run:
        if case not in self.cases:
            raise KeyError(f"{case} is not among the cases given to CliRuns: add it to the list")
        if case not in self.runs:
            self.runs.update(self.run_module([c for c in self.cases if c.module == case.module and c not in self.runs]))
        run = self.runs[case]
        if isinstance(run, str):  # the child ended, or was stopped, before this case
            raise AssertionError(f"python -m {case.module} {' '.join(case.args)} did not run in the batch: {run}")
        return run

    def run_module(self, cases: list[Case]) -> dict[Case, Run | str]:
        """Each case's Run, from one child; a case the child did not finish gets the child's tail."""
        folders = []
        for k, case in enumerate(cases):
            folder = self.root / f"{case.module.rsplit('.', 1)[-1]}-{k}"
            while folder.exists():
                folder = folder.with_name(folder.name + "_")
            folder.mkdir(parents=True)
            for name, text in case.files:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)
            folders.append(folder)
        plan = self.root / f"{folders[0].name}.plan.json"
        results = plan.with_suffix(".results.jsonl")
        plan.write_text(json.dumps({"module": cases[0].module, "runs": [
            {"args": [arg.replace("{cwd}", str(folder)) for arg in case.args], "cwd": str(folder)}
            for case, folder in zip(cases, folders)]}))
        try:
            child = subprocess.run([sys.executable, __file__, str(plan), str(results)], cwd=self.root, env=command_env(),
                                   capture_output=True, text=True, timeout=60 + self.timeout_per_case * len(cases))
            why = f"the batch child exited {child.returncode}; its stderr ends:\n{child.stderr[-3000:]}"
        except subprocess.TimeoutExpired as err:
            why = f"the batch child ran past {err.timeout:.0f}s; its stderr ends:\n{(err.stderr or b'')[-3000:]!r}"
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        done: dict[Case, Run | str] = {case: why for case in cases}
        for case, folder, row in zip(cases, folders, rows):
            done[case] = Run(row["returncode"], row["stdout"], row["stderr"], folder)
        return done


# -- the child ----------------------------------------------------------------------------------


def _exit_status(code: object) -> int:
    """The status `python` exits with for SystemExit(code) (a message is printed, then 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_one(module: str, args: list[str], cwd: str) -> tuple[int, str, str]:
    """`python -m module *args` in cwd, in this process: (exit status, stdout, stderr)."""
    import logging
    import runpy
    import signal
    import tempfile
    import traceback
    import warnings

    saved_environ, saved_path, saved_modules = dict(os.environ), list(sys.path), set(sys.modules)
    saved_cwd, saved_filters = os.getcwd(), list(warnings.filters)
    saved_signals = {}
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if handler is not None:
            saved_signals[signum] = handler
    loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    saved_loggers = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    saved_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None

    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            os.chdir(cwd)
            sys.path[0] = cwd  # as `python -m` puts the folder it runs in first
            sys.argv = ["-m", *args]  # runpy puts the module's file in sys.argv[0]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                status = 0
            except SystemExit as stop:
                status = _exit_status(stop.code)
            except KeyboardInterrupt:
                traceback.print_exc()
                status = -signal.SIGINT
            except BaseException:  # noqa: B036 (as the interpreter reports an uncaught one)
                traceback.print_exc()
                status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")

    # put back what the run may have changed, for the next case
    try:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobRuntime
    except ImportError:
        pass
    else:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        Singleton._instances.pop(JobRuntime, None)  # made afresh on its next use (ConfigStore's entries stay)
    for signum, handler in saved_signals.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
    for lg in [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]:
        for handler in lg.handlers:
            if not any(handler in kept for _, kept, *_ in saved_loggers):
                handler.close()
    for lg, handlers, level, propagate, disabled in saved_loggers:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    warnings.filters[:] = saved_filters
    os.environ.clear()
    os.environ.update(saved_environ)
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:  # a module of the case's folder (a task the case wrote)
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(cwd + os.sep):
            del sys.modules[name]
    if saved_threads is not None:
        sys.modules["torch"].set_num_threads(saved_threads)
    os.chdir(saved_cwd)
    return status, stdout, stderr


def _child(plan_file: str, results_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    os.environ.pop("HYDRA_FULL_ERROR", None)
    with open(results_file, "w") as results:
        for run in plan["runs"]:
            status, stdout, stderr = _run_one(plan["module"], run["args"], run["cwd"])
            results.write(json.dumps({"returncode": status, "stdout": stdout, "stderr": stderr}) + "\n")
            results.flush()  # the runs before a crash still count


if __name__ == "__main__":
    _child(*sys.argv[1:])
