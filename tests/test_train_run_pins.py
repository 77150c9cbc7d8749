"""Pins of experiments.train run-level behaviours a mutation review found no test holding:
grad_clip 0 measures the gradient norm without clipping; run.max_minutes counted in minutes
(60 s); one held-out problem among the training problems is refused; a held-out file with an
extra row refused on resume; a repetition penalty accepted without GRPO (train_loss=spr_only);
run.prompts_per_step not splitting into run.mini_batches refused before anything is read or
written; the command's closing summary printing the last metrics row; a Ctrl-C's hint saying
whether the run folder holds a checkpoint to resume from.

Every test calls one function of experiments.train directly (a hand-made trainer, a composed
config, `main` with run_training stubbed): no training run, no subprocess.

    .venv/bin/python -m pytest tests/test_train_run_pins.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments import train
from experiments.record_log import encode_rows
from experiments.train import settings
from policies.rollout_batch import Rollout
from test_train_loop import composed
from treesearch.records import Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# pins: actor_optim.grad_clip=0 (or head_optim's) measures the norm and leaves the gradient alone,
# not a clip at max_norm 0 that zeroes every gradient
def test_grad_clip_0_reports_the_true_norm_and_leaves_the_gradient_unchanged():
    p = torch.nn.Parameter(torch.ones(3))
    (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    t = SimpleNamespace(accelerator=SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_))
    norm = train._clip(t, [p], 0.0)
    assert norm == pytest.approx(math.sqrt(14.0))
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def _budget_trainer(elapsed_s: float) -> SimpleNamespace:
    return SimpleNamespace(step=3, elapsed_s=elapsed_s, s=SimpleNamespace(run=SimpleNamespace(max_steps=100, max_minutes=1.0)))


# pins: run.max_minutes=1 is spent at 60 s of training, not at 1 s
def test_max_minutes_is_spent_after_60_seconds_a_minute():
    assert train.budget_spent(_budget_trainer(59.0)) is None
    assert train.budget_spent(_budget_trainer(60.0)) == "run.max_minutes=1.0"


# pins: a single held-out problem among the training problems is already refused (not only two or more)
def test_one_heldout_problem_among_the_training_problems_is_refused():
    trained = [Problem("t1", "What is 2+2?", "4"), Problem("t2", "What is 5+5?", "10")]
    heldout = [Problem("h1", "What is 2+2?", "4"), Problem("h2", "What is 3+3?", "6")]
    with pytest.raises(ValueError, match=r"^1 of the 2 held-out problems \(data.heldout_problems, the test split\) "
                                         r"are among the training problems"):
        train.check_heldout_unseen(trained, heldout, None)
    train.check_heldout_unseen(trained, heldout[1:], None)  # none repeated: passes


def _heldout_run(tmp_path: Path, rows: int) -> tuple[SimpleNamespace, Path]:
    """A resumed trainer of 2 held-out problems x 1 rollout, its held-out file holding `rows` rows."""
    rollouts = [Rollout(f"h{i % 2}", (1, 2), (3,), (-0.1,), "1", "eos", 0.5) for i in range(rows)]
    tmp_path.mkdir()
    path = tmp_path / train.HELDOUT
    path.write_bytes(encode_rows([train._heldout_row(i % 2, r, i == 0) for i, r in enumerate(rollouts)]))
    t = SimpleNamespace(out=tmp_path, heldout_problems=[Problem("h0", "q0", "1"), Problem("h1", "q1", "2")],
                        s=SimpleNamespace(data=SimpleNamespace(heldout_rollouts=1)), heldout=[])
    return t, path


# pins: on resume a held-out file with MORE rows than problems x rollouts (a duplicated row) is
# damage, refused like a short one, and left as it is
def test_a_heldout_file_with_an_extra_row_is_refused_on_resume(tmp_path):
    t, _ = _heldout_run(tmp_path / "ok", 2)
    train.make_heldout(t, True)  # the right count loads
    assert [(i, ok) for i, _, ok in t.heldout] == [(0, True), (1, False)]
    t, path = _heldout_run(tmp_path / "extra", 3)
    data = path.read_bytes()
    with pytest.raises(ValueError, match=r"holds 3 complete held-out rollouts, not this run's 2 \(2 problems x "
                                         r"data.heldout_rollouts=1\): the file is damaged"):
        train.make_heldout(t, True)
    assert t.heldout == [] and path.read_bytes() == data


# pins: the repetition-penalty refusal is GRPO's only: train_loss=spr_only trains no log-probs, so it passes
def test_a_repetition_penalty_is_accepted_without_grpo():
    s = settings(composed(["train_loss=spr_only", "+sampling.repetition_penalty=1.1"]))
    assert s.loss.grpo_coef == 0 and s.sampling.repetition_penalty == 1.1


# pins: run.prompts_per_step=5 over run.mini_batches=2 is refused by open_run first: before the
# problems are drawn, a model loaded or the out_dir touched
def test_prompts_per_step_not_splitting_into_mini_batches_is_refused_before_anything_loads(tmp_path, monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("open_run went past the split check")

    monkeypatch.setattr(train, "run_problems", reached)
    monkeypatch.setattr(train, "load_start", reached)
    out = tmp_path / "run"
    cfg = composed([f"out_dir={out}", "run.prompts_per_step=5", "run.mini_batches=2"])
    s = settings(cfg)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device="cpu")
    with pytest.raises(ValueError, match=r"^run.prompts_per_step=5 must split evenly over 1 processes and then into "
                                         r"run.mini_batches=2"):
        train.open_run(cfg, s, accelerator)
    assert not out.exists()


# pins: the command's closing summary is the last metrics row (the final step), not the step-0 baseline
def test_main_prints_the_last_steps_summary(tmp_path, monkeypatch, capsys):
    rows = [{"step": 0, "heldout/greedy_acc": 0.1, "heldout_fc/within_auc": 0.5},
            {"step": 3, "reward/mean": 0.75, "fc/diff_prob": 0.2, "heldout/greedy_acc": 0.4,
             "heldout_fc/within_auc": 0.8, "loss/total": 1.5}]
    (tmp_path / train.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(train, "run_training", lambda cfg: tmp_path)
    monkeypatch.setattr(train, "check_no_chdir", lambda: None)
    monkeypatch.setattr(train, "freeze_long_lived", lambda: None)
    # main destroys the process's torch.distributed group on its way out: in pytest's process that
    # is the group an earlier test's vLLM engine made, which every later vLLM engine then fails on
    monkeypatch.setattr(train, "close_process_group", lambda: None)
    train.main.__wrapped__(OmegaConf.create({"out_dir": str(tmp_path)}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"{tmp_path}: step 3, reward 0.75, fc/diff_prob 0.2"
    assert json.loads(lines[-1]) == {"fc/diff_prob": 0.2, "heldout/greedy_acc": 0.4, "heldout_fc/within_auc": 0.8}


# pins: a Ctrl-C before the run's first checkpoint says nothing was saved (it said the run resumes
# from out_dir/last, which did not exist), and one once a checkpoint exists says the run resumes
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_ctrl_c_says_whether_a_checkpoint_was_saved(tmp_path, monkeypatch, capsys, checkpointed):
    out = tmp_path / "run"

    def interrupted(cfg):  # the run claimed its folder (config.yaml), then Ctrl-C
        out.mkdir()
        (out / train.CONFIG).write_text("{}")
        if checkpointed:
            (out / "ckpt-2").mkdir()
        raise KeyboardInterrupt

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(train, "run_training", interrupted)
    monkeypatch.setattr(train, "check_no_chdir", lambda: None)
    monkeypatch.setattr(train, "freeze_long_lived", lambda: None)
    monkeypatch.setattr(train, "close_process_group", lambda: None)  # see test_main_prints_the_last_steps_summary
    with pytest.raises(SystemExit) as exit_info, train.interrupt_reported(train.interrupt_hint):
        train.main.__wrapped__(OmegaConf.create({"out_dir": str(out)}))
    hint = ("a run resumes from its out_dir/last" if checkpointed else
            f"{out} holds no checkpoint yet (nothing to resume: a rerun starts this run over)")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted: {hint}; rerun the same command to go on"


def test_a_ctrl_c_before_the_run_folder_is_known_says_nothing_was_written(monkeypatch, capsys):
    # Hydra still starting (no run folder taken yet): it said the run resumes from out_dir/last
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(train, "_RUN_DIR", [])
    with pytest.raises(SystemExit) as exit_info, train.interrupt_reported(train.interrupt_hint):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted: nothing was written by this command; rerun the same command to go on")
