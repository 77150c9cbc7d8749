"""Ctrl-C or SIGTERM at a step boundary: the first one asks a training loop to stop after its
current step (where the state is consistent and can be saved), a second aborts at once.

    with stop_at_step_boundary() as stop:
        while training:
            step()
            if stop.requested:
                save(); raise stop.interrupt()   # Terminated after a SIGTERM, else KeyboardInterrupt

SIGTERM is what `kill`, `timeout` and a cluster's scheduler send (SLURM sends SIGKILL after a
grace period, 30 s by default): it saves as Ctrl-C does, where it used to unwind at once and lose
every step since the last checkpoint. Used by the SFT trainer (`policies.sft`) and the joint
trainer (`experiments.train`). Tests: `.venv/bin/pytest tests/test_sft_cli.py tests/test_train_inputs.py`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from tqdm.auto import tqdm




class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (`experiments.cli_errors.interrupt_reported`, or the
    second one here); a KeyboardInterrupt, so the code that cleans up after Ctrl-C does so after
    a kill too."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by the first Ctrl-C or SIGTERM of `stop_at_step_boundary`."""

    requested: bool = False
    terminated: bool = False  # the request was a SIGTERM

    def interrupt(self) -> KeyboardInterrupt:
        """What the loop raises once it has saved: Terminated after a SIGTERM (exit 143 through
        `interrupt_reported`), else KeyboardInterrupt."""
        return Terminated() if self.terminated else KeyboardInterrupt()


@contextlib.contextmanager
def stop_at_step_boundary() -> Iterator[StopRequest]:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets .requested (and .terminated
    for SIGTERM), so the loop stops after the current step (a step cut in the middle, e.g. half
    of optimizer.step, could not be saved); a second one raises KeyboardInterrupt (Terminated
    for SIGTERM) at once. Off the main thread, or for a signal that is ignored, the signal is
    left alone."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum: int, frame: Any) -> None:
        if stop.requested:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt
        stop.requested, stop.terminated = True, signum == signal.SIGTERM
        name = "SIGTERM" if stop.terminated else "Ctrl-C"
        tqdm.write(f"{name}: saving a checkpoint after this step (Ctrl-C or SIGTERM again aborts without saving)")

    handled = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
