"""`python -m experiments.train_sft`: one-line errors (exit 2), resume refusals and notes,
--checkpoint-every, Ctrl-C (exit 130, resumable). A few steps of a tiny model each.

    .venv/bin/python -m pytest -q tests/test_sft_cli.py
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import experiments.sft_tasks as sft_tasks
import policies.sft as sft
import policies.sft_resume as sft_resume
from experiments import train_sft as cli
from policies.tiny_model import TinyModelConfig

SMALL = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_position=160)
FAST = ["--train-problems", "40", "--eval-problems", "0", "--batch-size", "4", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def small_runs(monkeypatch):
    """The small model, and countdown drawn from 50 train problems (9k take ~14 s)."""
    monkeypatch.setattr(cli, "TinyModelConfig", lambda seed: SMALL)
    monkeypatch.setattr(sft_tasks, "COUNTDOWN_TRAIN_PROBLEMS", 50)


def main(*argv: str) -> int:
    """cli.main with FAST, then argv (a flag given again overrides FAST's); a Ctrl-C escaping it
    fails the test instead of stopping the session."""
    try:
        return cli.main([*FAST, *argv])
    except KeyboardInterrupt as err:
        pytest.fail(f"KeyboardInterrupt escaped main: {err!r}")


def test_a_full_disk_while_saving_is_one_error_line(tmp_path, monkeypatch, capsys):
    # torch.save's short write ("unexpected pos ...", a RuntimeError) was a traceback
    import policies.checkpoint as checkpoint

    def full(folder):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6192512 vs 6192404")

    monkeypatch.setattr(checkpoint, "share_as_umask", full)
    assert main("--out", str(tmp_path / "run"), "--max-steps", "1", "--minutes", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {tmp_path / 'run'}") and "No space left on device" in err[-1]
    assert "rerun the same command to go on" in err[-1]


def test_a_state_file_of_another_model_or_of_nothing_is_named(tmp_path, monkeypatch, capsys):
    # a countdown run's trainer state beside an arith run's weights (the identity is the state's:
    # a rerun as countdown passed it), then AdamW failed with a size mismatch in a traceback; a
    # state file holding something else was a KeyError ('config')
    other, run = tmp_path / "other", tmp_path / "run"
    assert main("--out", str(other), "--task", "countdown", "--max-steps", "1", "--minutes", "0") == 0
    assert main("--out", str(run), "--max-steps", "1", "--minutes", "0") == 0
    state = run / "last" / sft_resume.STATE_FILE
    state.write_bytes((other / "last" / sft_resume.STATE_FILE).read_bytes())
    capsys.readouterr()
    assert main("--out", str(run), "--task", "countdown", "--max-steps", "2", "--minutes", "0") == 2
    assert f"error: cannot resume: {state} holds the optimizer state of another model (exp_avg of shape" in capsys.readouterr().err
    torch.save({"x": 1}, state)
    assert main("--out", str(run), "--task", "countdown", "--max-steps", "2", "--minutes", "0") == 2
    assert f"error: cannot resume: {state} is no trainer state of train_sft (it lacks step, " in capsys.readouterr().err


def state_step(out) -> int:
    return torch.load(out / "last" / sft_resume.STATE_FILE, weights_only=False)["step"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--minutes", "-3"], "--minutes -3: must be > 0 (or 0 for no time limit)"),
        (["--minutes", "nan"], "--minutes nan: must be > 0"),
        (["--minutes", "0"], "--minutes 0 (no time limit) needs --max-steps N"),
        (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
        # named SFTConfig's fields, not the flags typed
        (["--batch-size", "0"], "--batch-size 0; must be >= 1"),
        (["--lr", "-1"], "--lr -1.0; must be > 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1; must be >= 0"),
        (["--threads", "0"], "--threads 0; must be >= 1"),
        (["--eval-problems", "0", "--temperature", "-1"], "--temperature -1: must be a finite number > 0"),  # taken in silence
        (["--train-problems", "0"], "--train-problems 0: must be >= 1"),
        # named an internal field ("10 examples < SFTConfig.batch_size=32")
        (["--train-problems", "3"], "--train-problems 3 gives fewer training pairs than --batch-size 4: raise "),
        (["--eval-problems", "3", "--eval-samples", "0"], "--eval-samples 0: must be >= 1"),
        (["--eval-problems", "3", "--temperature", "inf"], "--temperature inf: must be a finite number > 0"),  # a traceback
        # countdown's test split holds ~2.3k problems: found after the whole training run before
        (["--task", "countdown", "--eval-problems", "5000"], "--eval-problems 5000: count=5000: the test split of "),
    ],
)
def test_a_bad_value_is_one_error_line_and_exit_2(tmp_path, capsys, flags, message):
    rc = main("--out", str(tmp_path / "run"), *flags)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a bad setting")

    monkeypatch.setattr(cli, "train_sft", broken)
    with pytest.raises(ValueError, match="a bug"):
        main("--out", str(tmp_path / "run"), "--max-steps", "2")


def test_resume_says_so_extends_and_refuses_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("--out", str(out), "--max-steps", "2") == 0
    capsys.readouterr()
    assert main("--out", str(out), "--max-steps", "3") == 0  # a longer budget trains the same run longer
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'last'} at step 2\n" in printed and "trained 3 steps" in printed
    for flags, names in [
        (["--task", "countdown"], "run.task: 'arith' -> 'countdown'"),
        (["--lr", "0.5"], "sft.lr: 0.002 -> 0.5"),
        (["--seed", "1"], "sft.seed: 0 -> 1"),
        (["--batch-size", "8"], "sft.batch_size: 4 -> 8"),
    ]:
        assert main("--out", str(out), "--max-steps", "4", *flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out / 'last'} holds a run of another config ({names}") and err.count("\n") == 1, err
        assert "(train_sft's --max-steps, --minutes, --checkpoint-every, --threads)" in err  # the flags, not only keys
    assert state_step(out) == 3


def test_a_budget_flag_left_out_keeps_the_resumed_runs_own(tmp_path, capsys):
    # --minutes 0 --max-steps 2, extended by --max-steps 3 alone: it took the 8-minute default
    # ("sft.max_minutes: None -> 8.0"), which a run longer than 8 minutes had spent: no step trained
    out = tmp_path / "run"
    assert main("--out", str(out), "--minutes", "0", "--max-steps", "2") == 0
    capsys.readouterr()
    assert main("--out", str(out), "--max-steps", "3") == 0
    printed = capsys.readouterr().out
    assert "sft.max_steps: 2 -> 3" in printed and "max_minutes" not in printed and "trained 3 steps" in printed
    assert main("--out", str(out)) == 0  # no budget flag: the run's own (before: --minutes 8 in its record)
    assert "changed on resume" not in capsys.readouterr().out
    summary = json.loads((out / sft_resume.SUMMARY_FILE).read_text())
    assert (summary["config"]["max_minutes"], summary["config"]["max_steps"], summary["steps"]) == (None, 3, 3)
    assert main("--out", str(out), "--max-steps", "2") == 0  # a budget already spent: said, not trained in silence
    assert "the budget is spent at step 3" in capsys.readouterr().out
    assert main("--out", str(out), "--minutes", "0.001") == 0  # --minutes alone: no step limit any more
    assert "sft.max_steps: 2 -> None" in capsys.readouterr().out  # (the last resume saved 2)
    # --max-steps alone is the same budget fresh and resumed ("rerun the same command" lifted the 8 minutes)
    fresh = tmp_path / "fresh"
    assert main("--out", str(fresh), "--max-steps", "2") == 0
    assert json.loads((fresh / sft_resume.SUMMARY_FILE).read_text())["config"]["max_minutes"] is None
    capsys.readouterr()
    assert main("--out", str(fresh), "--max-steps", "2") == 0
    assert "changed on resume" not in capsys.readouterr().out


def test_a_checkpoint_interval_left_out_keeps_the_resumed_runs_own(tmp_path, capsys):
    # a resume without --checkpoint-every went back to 500 and printed a change nobody asked for
    out = tmp_path / "run"
    assert main("--out", str(out), "--max-steps", "2", "--checkpoint-every", "1") == 0
    capsys.readouterr()
    assert main("--out", str(out), "--max-steps", "3") == 0
    assert "checkpoint_every" not in capsys.readouterr().out
    assert json.loads((out / sft_resume.SUMMARY_FILE).read_text())["config"]["checkpoint_every"] == 1
    assert main("--out", str(tmp_path / "fresh"), "--max-steps", "1") == 0  # a fresh run: the default
    assert json.loads((tmp_path / "fresh" / sft_resume.SUMMARY_FILE).read_text())["config"]["checkpoint_every"] == 500


def test_run_info_keys_one_side_lacks_are_not_compared():
    # the demo records the task config and model beside the task; the train_sft command only the
    # task: resuming a demo's interrupted SFT with the command was refused over 17 keys
    saved = {"run": {"task": "arith", "train_problems": 100, "task_config": {"max_ops": 5}, "model": {"heads": 4}}}
    assert sft_resume.check_resumable(Path("last"), saved, {"run": {"task": "arith", "train_problems": 100}}) == []
    with pytest.raises(sft_resume.SFTError, match="run.task: 'arith' -> 'countdown'"):
        sft_resume.check_resumable(Path("last"), saved, {"run": {"task": "countdown", "train_problems": 100}})


def test_checkpoint_every_sets_the_resume_interval(tmp_path, monkeypatch):
    out, real_step, calls = tmp_path / "run", sft.train_step, []

    def crash_on_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_on_fourth_step)
    with pytest.raises(RuntimeError, match="crash"):
        main("--out", str(out), "--max-steps", "6", "--checkpoint-every", "3")
    assert state_step(out) == 3


@pytest.mark.parametrize("signum, code, how", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, monkeypatch, capsys, signum, code, how):
    # SIGTERM (kill, timeout, a scheduler) killed the run with every step since the last checkpoint
    out, real_step, calls = tmp_path / "run", sft.train_step, []

    def interrupt_on_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(getattr(signal, signum))  # a real Ctrl-C / kill, delivered during the step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", interrupt_on_second_step)
    assert main("--out", str(out), "--max-steps", "4") == code
    err = capsys.readouterr().err
    assert err == f"{how}: saved {out / 'last'} at step 2; rerun the same command to resume\n"
    assert state_step(out) == 2
    monkeypatch.setattr(sft, "train_step", real_step)
    assert main("--out", str(out), "--max-steps", "4") == 0
    assert f"resuming from {out / 'last'} at step 2\n" in capsys.readouterr().out and state_step(out) == 4


def test_an_out_that_is_a_file_is_named_before_training(tmp_path, capsys):
    # it trained the whole run, then failed to save it with a FileExistsError traceback
    (tmp_path / "notes.txt").write_text("mine")
    assert main("--out", str(tmp_path / "notes.txt"), "--max-steps", "2") == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'notes.txt'} is an existing file; give a folder\n"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_ctrl_c_while_preparing_the_data_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_tokenizer", interrupted)  # before the first step: a traceback before
    with pytest.raises(SystemExit) as exit_info:  # experiments.cli_errors.interrupt_reported's exit
        main("--out", str(tmp_path / "run"), "--max-steps", "2")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == (f"\ninterrupted: {tmp_path / 'run'} holds no checkpoint yet (nothing to resume: "
                                       "rerunning the same command starts the run over)\n")


def test_a_seed_torch_cannot_take_is_an_argument_error(tmp_path, capsys):
    # a traceback ("Overflow when unpacking long long") after the training data was generated
    with pytest.raises(SystemExit) as info:
        main("--out", str(tmp_path / "run"), "--seed", str(2**64))
    assert info.value.code == 2 and "argument --seed: '18446744073709551616' must be an integer from" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_joint_training_run_folder_is_named_not_called_a_damaged_checkpoint(tmp_path, capsys):
    # "it has no trainer_state.pt (a damaged checkpoint)" for a healthy experiments.train run
    (tmp_path / "joint" / "last").mkdir(parents=True)
    (tmp_path / "joint" / "last" / "joint_state.pt").write_bytes(b"state")
    assert main("--out", str(tmp_path / "joint"), "--max-steps", "2") == 2
    assert "holds a joint training run of experiments.train" in capsys.readouterr().err


def test_a_run_moved_to_a_cpu_of_other_bf16_support_resumes_with_its_setting(tmp_path, capsys):
    # bf16's default follows the CPU: the refusal said "rerun with the saved settings", which no flag could
    out = tmp_path / "run"
    assert main("--out", str(out), "--max-steps", "2", "--no-bf16") == 0
    capsys.readouterr()
    assert main("--out", str(out), "--max-steps", "3", "--bf16") == 2  # as this run's default on a bf16 CPU
    err = capsys.readouterr().err
    assert "(sft.bf16: False -> True)" in err and "rerun with the saved settings (add --no-bf16: the run's bf16 setting)" in err
    assert main("--out", str(out), "--max-steps", "3", "--no-bf16") == 0 and state_step(out) == 3


def test_a_diverged_run_is_kept_and_its_failed_evaluation_is_one_error_line(tmp_path, monkeypatch, capsys):
    # --lr 1e6: the quick evaluation met infinite logits in torch.multinomial, a traceback after the run was saved
    # (test_quick_eval makes the NonFiniteLogitsError from such a policy)
    from policies.sampling import NonFiniteLogitsError

    def diverged(*args, **kwargs):
        raise NonFiniteLogitsError("the policy's logits are not finite (NaN or inf) while sampling")

    monkeypatch.setattr(cli, "quick_eval", diverged)
    out = tmp_path / "run"
    assert main("--out", str(out), "--max-steps", "1", "--minutes", "0", "--eval-problems", "2", "--eval-samples", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the quick evaluation of {out / 'final'} failed: the policy's logits are not finite")
    assert err.endswith("; the trained checkpoint is kept") and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["records.jsonl", "config.yaml", "metrics.jsonl", "config.json"])
def test_another_commands_run_folder_is_refused_as_out(tmp_path, capsys, name):
    # a finished search / smollm2_eval folder was taken, and that run then refused on its own rerun
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("{}\n")
    assert main("--out", str(out), "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} holds {name} of another command's run") and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [name]
