"""A command piped into a reader that leaves (`... | head -1`, a pager quit) stops quietly with
exit 141 (`experiments.broken_pipe`): real commands as child processes whose stdout pipe the test
closes, with stdout buffered (the table flushed at exit) and with PYTHONUNBUFFERED=1 (each print
written at once).

Run: `.venv/bin/python -m pytest tests/test_broken_pipe.py` (~5 s; no model is loaded: the sweep
folder is written by hand, as `tests/test_scaling.py`'s `write_run` writes one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.broken_pipe import PIPE_EXIT, stdout_closed_quietly

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Traceback", "Exception ignored", "BrokenPipeError")
RUN_COMMAND_CHILD = ("-c", "from experiments.cli_errors import run_command\n"
                     "raise SystemExit(run_command(lambda argv: print('a table\\n' * 20) or 0))")
# sweep_metrics as itself (its `__main__` block, through runpy), its json file written only once the
# test has read the table's first line and closed the pipe: the table's last newline or the "wrote ..."
# line after the json is written into a pipe without a reader, whichever way the two processes race
AFTER_FIRST_LINE_CHILD = """
import pathlib, runpy, select, sys
write_text = pathlib.Path.write_text
def write_when_reader_left(self, *args, **kwargs):
    if self.name == "sweep_metrics.json":
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        while not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(10_000)):
            pass
    return write_text(self, *args, **kwargs)
pathlib.Path.write_text = write_when_reader_left
runpy.run_module("experiments.sweep_metrics", run_name="__main__", alter_sys=True)
"""


def write_run(folder: Path, budget: int, correct: list[bool]) -> None:
    """A best-of-N run folder as experiments.search writes it: records.jsonl and config.yaml."""
    folder.mkdir(parents=True)
    rows = [{"problem_id": f"p{i}", "question": "q", "answer": "1", "meta": {"num_ops": 2},
             "strategy": "best_of_n", "config": {"n": budget, "iterations": budget, "seed": 0}, "chosen": 0,
             "correct": ok, "candidates": [{"text": "Answer: 1", "answer": "1", "correct": ok, "score": 0.5,
                                            "step_scores": [0.5], "num_tokens": 5, "finish": "eos"}],
             "compute": {"tokens_generated": 10 * budget, "tokens_forwarded": 20 * budget, "scorer_tokens": 0,
                         "policy_calls": 1, "flops": 4000.0 * budget, "wall_time_s": 0.1},
             "policy_parameters": 1000} for i, ok in enumerate(correct)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text(
        "seed: 0\nscorer:\n  _target_: scorers.confidence.ConfidenceScorer\n"
        "task:\n  module: experiments.tasks.arith\n  split: test\n  count: 4\n  seed: 0\n  config:\n    max_ops: 4\n"
        "policy:\n  path: ckpt/final\n  sampling:\n    temperature: 0.7\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep folder of two best-of-N runs (N = 2, 4)."""
    write_run(tmp_path / "bon-2", 2, [True, False, False, False])
    write_run(tmp_path / "bon-4", 4, [True, True, False, False])
    return tmp_path


def child_env(unbuffered: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "OMP_NUM_THREADS": "1", **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}


def run_reader_gone(args: tuple[str, ...], unbuffered: bool) -> tuple[int, str]:
    """Run `python ARGS` with stdout a pipe whose reader leaves before the command writes (the
    test closes it as soon as the child starts): (exit code, stderr)."""
    child = subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env(unbuffered),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the child is still starting its interpreter: every write of it comes later
    _, err = child.communicate(timeout=60)
    return child.returncode, err.decode()


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["sweep_metrics", "scaling", "plot_scaling", "bench_all", "run_command",
                                     "run_command_big", "task"])
def test_a_reader_that_left_stops_the_command_quietly_with_141(sweep, command, unbuffered):
    args = {"sweep_metrics": ("-m", "experiments.sweep_metrics", str(sweep)),
            "scaling": ("-m", "experiments.scaling", str(sweep)),
            "plot_scaling": ("-m", "experiments.plot", "scaling", str(sweep)),  # its OSError was "error: [Errno 32] ..."
            "bench_all": ("-m", "experiments.bench_all", "--list"),
            "run_command": RUN_COMMAND_CHILD,
            # a write past the buffer fails inside, with a short line still buffered for the exit
            "run_command_big": ("-c", "from experiments.cli_errors import run_command\n"
                                      "raise SystemExit(run_command(lambda argv: print('row') or print('x' * 100000) or 0))"),
            "task": ("-m", "experiments.tasks.arith")}[command]  # a task module's sample problems
    code, err = run_reader_gone(args, unbuffered)
    assert not any(word in err for word in NOISE), err
    assert code == PIPE_EXIT, err


def test_a_failing_command_whose_reader_left_keeps_its_exit_code():
    # only a command that would have succeeded says 141: one that failed says why with its own code
    code, err = run_reader_gone(("-c", "from experiments.broken_pipe import stdout_closed_quietly\n"
                                       "with stdout_closed_quietly():\n    print('a table')\n    raise SystemExit(2)"),
                                unbuffered=False)
    assert code == 2 and not any(word in err for word in NOISE), err


def test_sweep_metrics_into_a_reader_of_one_line_stops_quietly_with_141(sweep):
    child = subprocess.Popen([sys.executable, "-c", AFTER_FIRST_LINE_CHILD, str(sweep)], cwd=REPO,
                             env=child_env(unbuffered=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().split()[:2] == [b"workload", b"strategy"]  # the table's header
    child.stdout.close()
    _, err = child.communicate(timeout=60)
    assert not any(word in err.decode() for word in NOISE), err.decode()
    assert child.returncode == PIPE_EXIT


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # a child process that left, a closed socket: not stdout (pytest's capture file)
    try:
        with pytest.raises(BrokenPipeError), stdout_closed_quietly():
            os.write(write_end, b"x")
    finally:
        os.close(write_end)


def test_a_readable_stdout_changes_nothing():
    assert PIPE_EXIT == 141  # what a shell shows for `yes | head` (${PIPESTATUS[0]})
    for code in (3, 0, None):  # a finished command's code is its own
        with pytest.raises(SystemExit) as done, stdout_closed_quietly():
            raise SystemExit(code)
        assert done.value.code == code
    with stdout_closed_quietly():
        print("kept")


@pytest.mark.parametrize("sweep_jobs", [False, True], ids=["run", "sweep"])
def test_search_into_a_reader_that_left_stops_quietly_with_141(tmp_path, sweep_jobs):
    # its result line was a traceback through Hydra; a sweep's "[HYDRA] Launching jobs" lines (now on
    # stderr) were "--- Logging error ---" tracebacks
    from tiny_checkpoint import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    where = ["-m", "search.n=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if sweep_jobs else [
        "search.n=2", f"out_dir={tmp_path / 'run'}"]
    code, err = run_reader_gone(("-m", "experiments.search", *where, f"policy.path={ckpt}", "task.count=2",
                                 "progress=false", "num_threads=1"), unbuffered=True)
    assert not any(word in err for word in NOISE), err
    assert code == PIPE_EXIT, err


def test_bench_all_into_a_reader_that_left_stops_its_running_benchmark(tmp_path):
    # it exited 141 and left the section's benchmark running until its next print (minutes on a GPU)
    pid_file = tmp_path / "bench.pid"
    bench = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('| row 1 |', flush=True); "
             "time.sleep(2); print('| row 2 |', flush=True); time.sleep(60)")
    driver = ("import sys\nfrom experiments import bench_all\nfrom experiments.broken_pipe import stdout_closed_quietly\n"
              f"bench_all.SECTIONS = (bench_all.Section('slow', 'a slow benchmark', ('-c', {bench!r})),)\n"
              f"with stdout_closed_quietly():\n    sys.exit(bench_all.main(['--out', {str(tmp_path / 'report.md')!r}]))\n")
    child = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env=child_env(unbuffered=False),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.readline()
    child.stdout.close()  # `| head -1`
    _, err = child.communicate(timeout=60)
    pid = int(pid_file.read_text())
    state = Path(f"/proc/{pid}/stat")
    running = state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    if running:
        os.kill(pid, 9)
    assert not running, "the benchmark went on after bench_all stopped"
    assert child.returncode == PIPE_EXIT and not any(word in err.decode() for word in NOISE), err.decode()


def test_a_socket_stdout_whose_peer_left_stops_quietly_with_141():
    # a supervisor's socketpair as stdout reports a hang-up, not an error, once its peer is gone
    import socket

    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, *RUN_COMMAND_CHILD], cwd=REPO, env=child_env(unbuffered=True),
                             stdout=ours.fileno(), stderr=subprocess.PIPE)
    ours.close()
    theirs.close()
    _, err = child.communicate(timeout=60)
    assert child.returncode == PIPE_EXIT and not any(word in err.decode() for word in NOISE), err.decode()
