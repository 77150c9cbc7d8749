"""Ctrl-C while a command starts (experiments/startup_interrupt.py): one line and exit 130 instead
of a traceback through the imports, for search, train and the demo; Ctrl-C is Python's again once
the run's own handling (`interrupt_reported`) begins; a library import changes no handler.

The commands are interrupted deterministically: a child Python sends itself SIGINT the moment the
command first imports torch, then runs the command as `python -m` would (runpy, "__main__").

Run: `.venv/bin/python -m pytest tests/test_startup_interrupt.py`
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import startup_interrupt
from experiments.cli_errors import interrupt_reported
from experiments.startup_interrupt import STARTING_LINE, quiet_start, started

ROOT = Path(__file__).resolve().parents[1]

INTERRUPT_AT_TORCH = """
import importlib.abc, os, runpy, signal, sys

class InterruptAtTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)  # the handler runs here, as a Ctrl-C during the import would
        return None

sys.meta_path.insert(0, InterruptAtTorch())
sys.argv = [{module!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["experiments.search", "experiments.train", "experiments.demo"])
def test_ctrl_c_while_a_command_imports_is_one_line_and_exit_130(module):
    code = INTERRUPT_AT_TORCH.format(module=module)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip() == STARTING_LINE
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_handler_is_taken_only_by_a_command_and_given_back_when_it_starts(restored_signals):
    quiet_start("experiments.search")  # imported as a library (train.py imports search): nothing changes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    quiet_start("__main__")
    assert signal.getsignal(signal.SIGINT) is startup_interrupt._exit_while_starting
    started()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_interrupt_reported_gives_ctrl_c_back_for_its_own_line(restored_signals, capsys):
    quiet_start("__main__")
    with pytest.raises(SystemExit) as exit_info:
        with interrupt_reported("rerun the same command to go on"):
            signal.raise_signal(signal.SIGINT)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted: rerun the same command to go on"


def test_another_programs_handler_is_left_alone(restored_signals):
    def embedding_handler(signum, frame):
        raise RuntimeError("the embedding program's own")

    signal.signal(signal.SIGINT, embedding_handler)
    quiet_start("__main__")
    started()
    assert signal.getsignal(signal.SIGINT) is embedding_handler


def test_the_handler_prints_its_line_and_exits_130(capsys):
    with pytest.raises(SystemExit) as exit_info:
        startup_interrupt._exit_while_starting(signal.SIGINT, None)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == f"\n{STARTING_LINE}\n"


def test_a_command_module_takes_ctrl_c_before_it_imports_torch():
    """The order the first test relies on, read from the source: quiet_start(__name__) comes
    before any line that imports a heavy library or another project module."""
    for name in ("search", "train", "demo"):
        lines = (ROOT / "experiments" / f"{name}.py").read_text().splitlines()
        taken = lines.index("quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback")
        heavy = [i for i, line in enumerate(lines) if line.startswith(("import torch", "import hydra", "from tqdm",
                                                                       "from policies", "from scorers"))]
        assert heavy and taken < min(heavy), name
        assert textwrap.dedent(lines[taken]) == lines[taken]  # at module level, not inside a function
