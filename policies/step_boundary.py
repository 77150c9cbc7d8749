"""Ctrl-C at a step boundary: the first Ctrl-C asks a training loop to stop after its current
step (where the state is consistent and can be saved), a second aborts at once.

    with stop_at_step_boundary() as stop:
        while training:
            step()
            if stop.requested:
                save(); raise KeyboardInterrupt

Used by the SFT trainer (`policies.sft`) and the joint trainer (`experiments.train`). Tests:
`.venv/bin/pytest tests/test_sft_cli.py tests/test_train_inputs.py`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from tqdm.auto import tqdm




@dataclass
class StopRequest:
    """Set by the first Ctrl-C of `stop_at_step_boundary`."""

    requested: bool = False


@contextlib.contextmanager
def stop_at_step_boundary() -> Iterator[StopRequest]:
    """While active, the first Ctrl-C (SIGINT) only sets .requested, so the loop stops after the
    current step (a step cut in the middle, e.g. half of optimizer.step, could not be saved); a
    second Ctrl-C raises KeyboardInterrupt at once. Off the main thread, or where SIGINT is
    ignored, Ctrl-C is left alone."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield stop
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (Ctrl-C again aborts without saving)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
