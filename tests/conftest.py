import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/fakes.py


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    tiny models gain nothing from a second thread, and two spinning OpenMP threads slow down 100x
    when another process holds a core (measured here); the count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """A test that runs a command-line entry point freezes the objects alive (policies/gc_freeze.py);
    unfreeze after each test, so the suite's dropped models stay collectable."""
    yield
    gc.unfreeze()
