import gc
import os
import signal
import sys

import pytest

# OpenMP threads that wait passively: two spinning threads slow down 100x while another process
# holds a core (`make test` runs two test processes on two cores), and the commands the tests
# start inherit it (experiments.train sets it too, but only when a test file imports it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/fakes.py


def pytest_configure(config):
    """Under nohup, or `make test &` in a shell without job control, SIGINT arrives ignored and
    Python installs no Ctrl-C handler: the tests that send a real SIGINT, to this process or to
    the commands they start (which would inherit the ignore), then saw nothing happen. Give this
    process Python's own handler, which the commands it starts get as the default action."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def restored_signals():
    """The SIGINT and SIGTERM handlers as they were before the test (for tests that install or
    take over a handler)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    tiny models gain nothing from a second thread, and two spinning OpenMP threads slow down 100x
    when another process holds a core (measured here); the count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def vllm_cache(tmp_path_factory) -> str:
    """The one vLLM cache folder of the test process, also $VLLM_CACHE_ROOT (what an engine with
    cache_root None uses, and the commands the tests start): vLLM reads it once, when the
    process's first engine starts, and `policies.vllm_engine` refuses a later engine that asks
    for another."""
    folder = str(tmp_path_factory.mktemp("vllm_cache"))
    os.environ["VLLM_CACHE_ROOT"] = folder
    return folder


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """A test that runs a command-line entry point freezes the objects alive (policies/gc_freeze.py);
    unfreeze after each test, so the suite's dropped models stay collectable."""
    yield
    gc.unfreeze()
