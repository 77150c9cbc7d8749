"""A job in a worker of a killed `hydra/launcher=local` sweep stops (experiments/launcher_watch.py):
the workers of a sweep whose launching process got SIGKILL ran their jobs to the end before.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.launcher_watch import launcher_pid, launcher_watched, watch_parent
from tiny_checkpoint import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

# a launcher starting one multiprocessing worker that runs a watched block; the worker writes its
# pid once inside the block and "unwound" once the block's finally ran; argv: folder, "orphan" / "kill"
LAUNCHER = r"""
import multiprocessing, os, sys, time
from pathlib import Path

def job(folder):
    from experiments.launcher_watch import launcher_watched
    with launcher_watched(lambda: "the hint at that moment", poll_s=0.05):
        try:
            (Path(folder) / "worker.pid").write_text(str(os.getpid()))
            if not (Path(folder) / "finish").exists():
                for _ in range(600):  # short sleeps: a SIGTERM landing just before a long one waits it out
                    time.sleep(0.1)
        finally:
            (Path(folder) / "unwound").write_text("yes")
    (Path(folder) / "after").write_text("yes")

if __name__ == "__main__":
    folder, how = sys.argv[1], sys.argv[2]
    worker = multiprocessing.get_context("spawn").Process(target=job, args=(folder,))
    worker.start()
    pid_file = Path(folder) / "worker.pid"
    while not pid_file.exists():
        assert worker.is_alive(), worker.exitcode
        time.sleep(0.01)
    print(worker.pid, flush=True)
    if how == "kill":  # a SIGTERM sent to the worker itself, its launcher alive
        os.kill(worker.pid, 15)
    if how in ("kill", "finish"):
        worker.join()
        print("exitcode", worker.exitcode, flush=True)
    time.sleep(60)
"""


def gone(pid: int) -> bool:
    """Whether pid has exited (a zombie its new parent has not reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def kill_launcher(proc: subprocess.Popen, seconds: float) -> str:
    """SIGKILL a sweep's launching process, assert its workers exit within `seconds` (killing any
    left), and return its stderr (the workers' too, which share it)."""
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.kill()
    proc.wait()
    try:
        assert wait_gone(workers, seconds), "the sweep's jobs went on after its launcher was killed"
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    return proc.stderr.read()


def start_launcher(tmp_path: Path, how: str) -> tuple[subprocess.Popen, int]:
    script = tmp_path / "launcher.py"  # a file: a spawned worker imports its job from the launcher's __main__
    script.write_text(LAUNCHER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), how], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, int(line)


def test_a_worker_whose_launcher_is_killed_unwinds_its_job_and_exits(tmp_path):
    proc, worker = start_launcher(tmp_path, "orphan")
    proc.kill()  # SIGKILL: no chance to end its worker
    proc.wait()
    try:
        assert wait_gone([worker], 20), "the orphaned worker went on with its job"
    finally:
        if not gone(worker):
            os.kill(worker, signal.SIGKILL)
    err = proc.stderr.read()
    assert (tmp_path / "unwound").read_text() == "yes"  # Terminated where the job was: its finally ran
    assert f"terminated: the sweep's launching process (pid {proc.pid}) is gone; the hint at that moment" in err
    assert "Traceback" not in err


def worker_exit(tmp_path: Path, how: str) -> list[str]:
    """The launcher's report of its worker's exit (["exitcode", code]); the launcher is then stopped."""
    proc, _ = start_launcher(tmp_path, how)
    try:
        return proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()


def test_a_sigterm_of_the_worker_itself_takes_the_default_action(tmp_path):
    assert worker_exit(tmp_path, "kill") == ["exitcode", "-15"]
    assert not (tmp_path / "unwound").exists()  # killed as before, not unwound


def test_a_watched_job_that_ends_goes_on_in_its_worker(tmp_path):
    # the exit of an orphaned worker must not end a worker whose launcher is there
    (tmp_path / "finish").write_text("")
    assert worker_exit(tmp_path, "finish") == ["exitcode", "0"]
    assert (tmp_path / "after").read_text() == "yes"


def test_the_watcher_sends_one_sigterm(restored_signals):
    # a second one makes a trainer's step boundary abort without saving (a step longer than a poll)
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    orphaned, done = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch_parent, args=(-1, orphaned, done, 0.01))  # -1: never the parent
    watcher.start()
    time.sleep(0.3)
    done.set()
    watcher.join()
    assert orphaned.is_set() and received == [signal.SIGTERM]


def test_outside_a_multiprocessing_worker_the_block_changes_nothing():
    # a plain run or a basic-launcher sweep: a nohup'd run whose shell is gone must go on
    assert launcher_pid() is None
    before = signal.getsignal(signal.SIGTERM)
    threads = threading.active_count()
    with launcher_watched("hint", poll_s=0.01):
        assert signal.getsignal(signal.SIGTERM) is before
        assert threading.active_count() == threads
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C passes through
        with launcher_watched("hint"):
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_killed_local_sweep_leaves_no_job_running(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.search", "-m", "hydra/launcher=local", "num_threads=1", "seed=0,1",
           f"policy.path={ckpt}", "task.count=5000", "chunk=1", "search.n=4", "policy.sampling.max_total_tokens=24",
           "progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(records := [path for path in sweep.glob("*/records.jsonl") if path.stat().st_size]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    err = kill_launcher(proc, seconds=30)
    assert err.count(f"terminated: the sweep's launching process (pid {proc.pid}) is gone; the rows of finished "
                     f"chunks are kept in records.jsonl; rerun the same command with hydra.sweep.dir={sweep}") == 2
    for path in records:  # what the jobs wrote is whole: a rerun goes on from it
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert 0 < len(rows) < 5000 and len({row["problem_id"] for row in rows}) == len(rows)


@pytest.mark.slow
def test_a_local_train_sweep_runs_and_its_killed_jobs_save_their_step(tmp_path):
    # every job of `experiments.train -m hydra/launcher=local` failed before it started: its cached
    # data order, pickled by reference to a __main__ the workers lack (experiments/data_order.py)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.train", "-m", "hydra/launcher=local", "num_threads=1", "run.seed=0,1",
           f"init_from={ckpt}", "run.max_steps=500", "run.prompts_per_step=2", "run.rollouts_per_prompt=4",
           "run.checkpoint_every=1000", "run.eval_every=1000", "data.train_problems=40", "data.heldout_problems=2",
           "data.heldout_rollouts=4", "sampling.max_total_tokens=24", "progress=false", "tensorboard=false",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len([path for path in sweep.glob("*/metrics.jsonl") if path.read_text().count("\n") >= 2]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    err = kill_launcher(proc, seconds=60)
    assert err.count("SIGTERM: saved ") == 2, err[-2000:]  # each trainer finished its step and saved it
    assert err.count(f"terminated: the sweep's launching process (pid {proc.pid}) is gone; a run resumes from its "
                     f"out_dir/last; rerun the same command with hydra.sweep.dir={sweep}") == 2
    assert len(list(sweep.glob("*/last"))) == 2


def test_a_local_train_sweeps_launcher_names_the_jobs_checkpoints_on_ctrl_c(monkeypatch):
    # the launcher holds no run folder of its own: it said "nothing was written by this command"
    from experiments import cli_errors, train

    monkeypatch.setattr(train, "_RUN_DIR", [])
    monkeypatch.setattr(cli_errors, "_SWEEP_DIR", ["outputs/train-sweeps/mine"])
    assert train.interrupt_hint() == ("each job's checkpoints saved so far are kept in its folder; rerun the same "
                                      "command with hydra.sweep.dir=outputs/train-sweeps/mine (its folder) to go on")
    monkeypatch.setattr(cli_errors, "_SWEEP_DIR", [])  # a single run before it took its folder
    assert train.interrupt_hint() == "nothing was written by this command; rerun the same command to go on"
