"""Ctrl-C (and SIGTERM) in the argparse commands rollout_cache, train_head, probe_backbone_verifier
and train_sft: one line saying what is kept and exit 130 (143), never a KeyboardInterrupt
traceback; and two smaller fixes: a checkpoint hint writes a flag and its value apart
(`--policy DIR`), and a rollout cache's JSON summary given for the cache names the cache.

Each command runs as a real `python -m experiments.X` child on tiny inputs (a random tiny
checkpoint, hand-made caches: the fixtures of tests/test_train_head.py and
tests/test_probe_backbone_verifier.py) and is signalled from outside once it shows it is working
(its progress bar or a line it prints; torch's library mapped, for a command still importing): no
sleep decides when. The workloads would run for many minutes, so the signal lands inside them.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_cli_interrupts.py
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from experiments import train_head
from experiments.checkpoint_hints import assignment, check_not_a_run_folder, checkpoint_hint
from experiments.rollout_cache import CacheSpec, cache_from_paths, load_cache, save_cache
from experiments.startup_interrupt import STARTING_LINE
from experiments.tasks import arith
import test_probe_backbone_verifier
import test_train_head
from test_train_head import handmade_paths

ROOT = Path(__file__).resolve().parents[1]
READY_S = 180  # generous: the child imports torch and transformers on a loaded 2-core machine
EXIT_S = 60
LONG = "100000000"  # steps no run finishes: the signal always lands in the work

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the fixtures of those modules, shared here: a tiny random policy (path, model, tokenizer), an
# arith test-split cache of it, countdown train and test caches of another
tiny = test_train_head.tiny
handmade = test_train_head.handmade
caches = test_probe_backbone_verifier.caches


@dataclass(frozen=True)
class Ended:
    """A signalled child: its exit code and what it wrote."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        """The last line of stderr (progress bars, written with carriage returns, come before it)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def signalled(args: list[str], ready: Callable[[int, str], bool], tmp_path: Path,
              signum: signal.Signals = signal.SIGINT) -> Ended:
    """Run `python -m <args>` in the repository, wait until ready(pid, stdout + stderr) holds,
    send signum and wait for the exit (the child is killed if the test fails first)."""
    out_log, err_log = tmp_path / "child.out", tmp_path / "child.err"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=out, stderr=err, env=env)
    try:
        deadline = time.monotonic() + READY_S
        while not ready(process.pid, out_log.read_text(errors="replace") + err_log.read_text(errors="replace")):
            assert process.poll() is None, f"ended before it was signalled:\n{err_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {READY_S} s:\n{err_log.read_text()[-3000:]}"
            time.sleep(0.05)  # polling only: the signal goes when the child shows it works
        process.send_signal(signum)
        returncode = wait_resending_a_dropped_interrupt(process, signum, err_log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)
    return Ended(returncode, out_log.read_text(errors="replace"), without_dropped_interrupt(err_log.read_text(errors="replace")))


# Python drops a KeyboardInterrupt raised inside a finalizer (a regex object's __del__ run by the
# garbage collector when the signal came), printing this block and going on: the child keeps
# working, as a program does whose user must press Ctrl-C again (not this project's to mend)
DROPPED = re.compile(r"Exception ignored in: <function [^>]*__del__[^>]*>\nTraceback \(most recent call last\):\n"
                     r"(?:.*\n)*?KeyboardInterrupt: ?\n")


def wait_resending_a_dropped_interrupt(process: subprocess.Popen, signum: int, err_log: Path) -> int:
    """The child's exit code; a SIGINT Python dropped in a finalizer (DROPPED) is sent once more."""
    deadline = time.monotonic() + EXIT_S
    resent = signum != signal.SIGINT
    while process.poll() is None and time.monotonic() < deadline:
        if not resent and DROPPED.search(err_log.read_text(errors="replace")):
            process.send_signal(signum)
            resent = True
        time.sleep(0.05)
    return process.wait(timeout=max(1.0, deadline - time.monotonic()))


def without_dropped_interrupt(stderr: str) -> str:
    """stderr without the block of a dropped interrupt (DROPPED)."""
    return DROPPED.sub("", stderr)


def shows(text: str) -> Callable[[int, str], bool]:
    """Ready once the child's output holds text."""
    return lambda pid, output: text in output


def loads_torch(pid: int, output: str) -> bool:
    """Ready once torch's library is mapped into the child (it is importing torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def assert_one_line(ended: Ended, code: int, line: str) -> None:
    assert ended.returncode == code, ended.stderr[-3000:]
    assert "Traceback" not in ended.stderr, ended.stderr[-3000:]
    assert ended.last_line == line, ended.stderr[-3000:]


def snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


# -- rollout_cache ----------------------------------------------------------------------------------


def test_rollout_cache_ctrl_c_while_rolling_out_keeps_the_earlier_cache(tiny, handmade, tmp_path):
    # a KeyboardInterrupt traceback through the generation before
    policy, _, _ = tiny
    out = save_cache(handmade[0], tmp_path / "cache.pt")  # an earlier cache and its summary at --out
    before = snapshot(out, out.with_suffix(".json"))
    ended = signalled(["experiments.rollout_cache", "--policy", str(policy), "--task", "arith", "--split", "test",
                       "--problems", "1000", "--n", "8", "--out", str(out)], shows("rollouts"), tmp_path)
    assert_one_line(ended, 130, f"interrupted: an earlier cache at {out} is kept as it was; rerun the same command to build it")
    assert snapshot(out, out.with_suffix(".json")) == before
    assert sorted(p.name for p in tmp_path.glob(".cache.pt*")) == []  # no temp file left


# -- train_head -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_caches(tiny, handmade, tmp_path_factory) -> tuple[Path, Path]:
    """(train, test) arith caches of the tiny policy, hand-made: 3 train-split problems x 2, and
    `handmade`'s 3 test-split ones."""
    policy, lm, tokenizer = tiny
    folder = tmp_path_factory.mktemp("head_caches")
    problems = arith.generate_problems("train", 3, seed=0)
    spec = CacheSpec(str(policy), "arith", "train", 3, 2, feature_layers=(-2, -1), forward_batch=4)
    train = cache_from_paths(spec, lm, tokenizer, problems, handmade_paths(tokenizer, problems, 2))
    return save_cache(train, folder / "train.pt"), save_cache(handmade[0], folder / "test.pt")


def earlier_head_run(out: Path) -> dict[Path, bytes | None]:
    """--out as an earlier train_head run left it (metrics.jsonl, metrics.json, final/); its snapshot."""
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "metrics.json").write_text('{"earlier": true}\n')
    return snapshot(out / "metrics.jsonl", out / "metrics.json", out / "final" / "config.json")


def test_train_head_ctrl_c_while_training_keeps_the_earlier_run(head_caches, tmp_path):
    # a KeyboardInterrupt traceback through the training loop before
    out = tmp_path / "head"
    before = earlier_head_run(out)
    train, test = head_caches
    ended = signalled(["experiments.train_head", "--train", str(train), "--test", str(test), "--out", str(out),
                       "--steps", LONG, "--eval-every", LONG, "--batch-rollouts", "2"], shows("head (spr)"), tmp_path)
    assert_one_line(ended, 130, f"interrupted: nothing was written to {out} (an earlier run's files there are kept "
                                "as they were); rerun the same command to train again")
    assert snapshot(*before) == before


def test_train_head_ctrl_c_while_writing_names_what_is_whose(head_caches, tmp_path, monkeypatch, capsys):
    # in the command's writing: metrics.json (written last) is gone, metrics.jsonl is new, final/ the earlier one
    out = tmp_path / "head"
    before = earlier_head_run(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_head, "save_reflective_head", interrupted)
    train, test = head_caches
    with pytest.raises(SystemExit) as exit_info:
        try:
            train_head.main(["--train", str(train), "--test", str(test), "--out", str(out), "--steps", "2"])
        except KeyboardInterrupt as err:  # fails this test instead of stopping the session
            pytest.fail(f"KeyboardInterrupt escaped main: {err!r}")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: {out} holds no finished run: no metrics.json (a finished run's last file); metrics.jsonl is "
        "this run's, final/ an earlier run's; rerun the same command to train again")
    assert not (out / "metrics.json").exists() and (out / "metrics.jsonl").read_bytes() != before[out / "metrics.jsonl"]
    assert (out / "final" / "config.json").read_bytes() == before[out / "final" / "config.json"]


# -- probe_backbone_verifier ------------------------------------------------------------------------


def test_probe_ctrl_c_while_training_writes_nothing(caches, tmp_path):
    # a KeyboardInterrupt traceback through the backbone's training before
    policy, files, _, _ = caches
    save, out = tmp_path / "tuned", tmp_path / "probe.json"
    ended = signalled(["experiments.probe_backbone_verifier", "--policy", str(policy), "--train", str(files["train"]),
                       "--test", str(files["test"]), "--steps", LONG, "--batch", "2", "--reference-solutions", "0",
                       "--kl-coef", "0", "--threads", "1", "--save", str(save), "--out", str(out)],
                      shows("backbone + head"), tmp_path)
    assert_one_line(ended, 130, "interrupted: nothing was written; rerun the same command to run the probe again")
    assert not save.exists() and not out.exists()


# -- train_sft --------------------------------------------------------------------------------------

SFT_FAST = ["--max-steps", "1", "--minutes", "0", "--train-problems", "40", "--batch-size", "4", "--threads", "1",
            "--no-progress"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/PID/maps")
def test_train_sft_ctrl_c_while_it_imports_is_one_line(tmp_path):
    # the imports had no handler: a KeyboardInterrupt traceback through torch's
    out = tmp_path / "run"
    ended = signalled(["experiments.train_sft", "--out", str(out), *SFT_FAST], loads_torch, tmp_path)
    assert_one_line(ended, 130, STARTING_LINE)
    assert not out.exists()


def test_train_sft_sigterm_during_the_evaluation_says_the_checkpoint_is_kept(tmp_path):
    # SIGTERM outside the training steps ended it without a word (exit -15); the run is resumable
    out = tmp_path / "run"
    ended = signalled(["experiments.train_sft", "--out", str(out), *SFT_FAST, "--eval-problems", "2000"],
                      shows("trained 1 steps"), tmp_path, signal.SIGTERM)
    assert_one_line(ended, 143, f"terminated: the checkpoint saved in {out / 'last'} is kept; rerun the same "
                                "command to resume from it")
    assert (out / "last" / "trainer_state.pt").is_file() and not (out / "quick_eval.json").exists()


def test_the_commands_take_ctrl_c_before_their_heavy_imports():
    """The order the import-time test relies on, for each of the four commands: quiet_start(__name__)
    at module level before any line importing torch or a project module that loads it."""
    for name in ("rollout_cache", "train_head", "probe_backbone_verifier", "train_sft"):
        lines = (ROOT / "experiments" / f"{name}.py").read_text().splitlines()
        taken = lines.index("quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback")
        heavy = [i for i, line in enumerate(lines) if line.startswith((
            "import torch", "from tqdm", "from policies", "from scorers", "from treesearch", "from experiments.cli",
            "from experiments.rollout_cache", "from experiments.checkpoint_hints"))]
        assert heavy and taken < min(heavy), name


# -- the smaller fixes ------------------------------------------------------------------------------


def test_a_saved_model_hint_writes_a_flag_and_its_value_apart(tmp_path):
    # "(--policy/path/final)": the flag glued to its value, as a config key's `=` would be
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}\n")
    missing = FileNotFoundError(f"checkpoint folder {run} has no config.json")
    assert checkpoint_hint(run, missing, "--policy") == (
        f"The model is saved in {run / 'final'}: point --policy at it (--policy {run / 'final'})")
    assert checkpoint_hint(run, missing, "policy.path") == (
        f"The model is saved in {run / 'final'}: point policy.path= at it (policy.path={run / 'final'})")
    with pytest.raises(FileNotFoundError) as error:
        check_not_a_run_folder(str(run), "--policy")
    assert str(error.value).endswith(f"point --policy at it (--policy {run / 'final'})")
    assert assignment("--policy", "a/final") == "--policy a/final" and assignment("init_from", "a") == "init_from=a"
    assert assignment("the checkpoint", "a") == "the checkpoint a"


@pytest.mark.parametrize("path", ["sweep/run.seed=0,train_loss=grpo/last", "it's/a=b", "a\\b=(c)", "sweep/#1"])
def test_a_hinted_path_that_hydra_cannot_read_bare_is_quoted_for_hydra_and_the_shell(path):
    # a training sweep job's folder holds '=' and ',': the hint's policy.path=... pasted was Hydra's
    # "mismatched input '='"; typed into a shell, the quoted hint gives Hydra the path itself
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    (typed,) = shlex.split(assignment("policy.path", path))
    override = OverridesParser.create().parse_override(typed)
    assert (override.key_or_group, override.value()) == ("policy.path", path)
    assert assignment("policy.path", "runs/a-1/final") == "policy.path=runs/a-1/final"  # bare when it reads back


def test_a_cache_summary_given_for_the_cache_names_the_cache(handmade, tmp_path):
    # it said the JSON was "damaged", with torch's advice on weights_only
    cache = save_cache(handmade[0], tmp_path / "arith_test.pt")
    summary = cache.with_suffix(".json")
    with pytest.raises(ValueError) as error:
        load_cache(summary)
    assert str(error.value) == f"{summary} is the JSON summary of a rollout cache, not the cache: pass {cache} (beside it)"
    cache.unlink()
    with pytest.raises(ValueError) as error:
        load_cache(summary)
    assert str(error.value) == (f"{summary} is the JSON summary of a rollout cache, not the cache: pass {cache} "
                                "(which does not exist: build it with python -m experiments.rollout_cache)")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"not": "a summary"}))
    with pytest.raises(ValueError, match="is damaged"):  # any other file keeps its message
        load_cache(other)
