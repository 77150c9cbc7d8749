"""Pins of SFT trainer behaviours (policies/sft.py) a mutation review found no test holding: the
completion loss is next-token cross-entropy (logit t scores token t+1); eval_max_examples caps the
held-out set; a resumed run's summary counts the tokens of the steps before the resume; batches
are length-bucketed, shuffled after bucketing, drawn from each step's own epoch, always full (and
N == batch_size makes one); an over-long example keeps exactly max_length ids; the optimizer's
no-decay group and betas; num_threads is used during training and the caller's count restored;
spent() at the budget's exact end and the "budget is spent" line on such a resume; SFTConfig's
max_steps / min_lr_ratio bounds.

Tiny models (tests/test_sft.py's SMALL) trained for a few steps, or sft's pure functions.

    .venv/bin/python -m pytest tests/test_sft_pins.py
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import policies.sft as sft
from experiments.tasks import arith
from policies.sft import SFTConfig, train_sft
from policies.tiny_model import build_model
from policies.tiny_tokenizer import build_tokenizer
from test_sft import SMALL, steps_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = build_tokenizer()
EXAMPLES = [(arith.prompt_text(p), arith.solution_text(p)) for p in arith.generate_problems("train", 16, seed=0)]


def small_model():
    torch.manual_seed(0)
    return build_model(SMALL, TOK)


def summary(run_dir) -> dict:
    return json.loads((run_dir / sft.SUMMARY_FILE).read_text())


def spread(batch: list[int], lengths: list[int]) -> int:
    return max(lengths[i] for i in batch) - min(lengths[i] for i in batch)


# --- loss --------------------------------------------------------------------------------------


def test_completion_loss_is_next_token_cross_entropy_over_completion_positions():
    model = small_model().eval()
    # an empty prompt (<bos> only) labels position 1 as well: the count includes it
    data = sft.tokenize_examples([("1+2=", "3"), ("12+5=", "17 so 17"), ("", "8")], TOK, max_length=64)
    assert data[2].prompt_len == 1
    input_ids, labels = sft.collate(data, TOK.pad_token_id)
    with torch.no_grad():
        loss, count = sft.completion_loss(model, input_ids, labels, bf16=False)
        logits = model(input_ids=input_ids).logits
    # by hand: the logits at position t score the token at t+1, for every t+1 in a completion
    terms = [F.cross_entropy(logits[row, t], input_ids[row, t + 1])
             for row, e in enumerate(data) for t in range(e.prompt_len - 1, len(e.input_ids) - 1)]
    assert count == len(terms) == sum(len(e.input_ids) - e.prompt_len for e in data)
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


# --- training runs -----------------------------------------------------------------------------


def test_eval_max_examples_caps_the_held_out_examples(tmp_path, monkeypatch):
    seen, evaluate = [], sft.evaluate_loss
    monkeypatch.setattr(sft, "evaluate_loss", lambda model, examples, *a: (seen.append(len(examples)), evaluate(model, examples, *a))[1])
    cfg = steps_cfg(2, batch_size=8, eval_every=1, eval_max_examples=4)
    train_sft(cfg, EXAMPLES, tmp_path / "run", small_model(), TOK, progress=False, eval_examples=EXAMPLES)
    assert seen == [4, 4]
    assert all("eval_loss" in h for h in summary(tmp_path / "run")["history"])


def test_a_resumed_runs_summary_counts_the_tokens_before_the_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_sft(steps_cfg(4), EXAMPLES, straight, small_model(), TOK, progress=False)
    train_sft(steps_cfg(2), EXAMPLES, resumed, small_model(), TOK, progress=False)
    train_sft(steps_cfg(4), EXAMPLES, resumed, small_model(), TOK, progress=False)
    a, b = summary(straight), summary(resumed)
    assert b["resumes"] and b["steps"] == a["steps"] == 4
    assert b["tokens"] == a["tokens"] == sum(h["tokens"] for h in b["history"]) > 0
    # throughput is over the whole run too: all its tokens over all its training time
    assert b["tokens_per_s"] == pytest.approx(b["tokens"] / b["elapsed_s"])


def test_train_sft_uses_num_threads_and_restores_the_callers(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sft.os, "cpu_count", lambda: 3)  # what num_threads=None would take
    monkeypatch.setattr(sft, "_train_sft", lambda *a: (seen.append(torch.get_num_threads()), tmp_path)[1])
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_sft(steps_cfg(1, num_threads=2), EXAMPLES, tmp_path, progress=False)
        assert seen == [2] and torch.get_num_threads() == 1
        train_sft(steps_cfg(1, num_threads=None), EXAMPLES, tmp_path, progress=False)
        assert seen == [2, 3] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller)


def test_spent_is_true_at_the_budgets_exact_end():
    steps = SFTConfig(max_minutes=None, max_steps=3)
    assert not sft.spent(steps, 2, 1e9) and sft.spent(steps, 3, 0.0)
    minutes = SFTConfig(max_minutes=1.0)
    assert not sft.spent(minutes, 10**6, 59.9) and sft.spent(minutes, 0, 60.0)


def test_a_changed_resume_of_a_spent_run_says_the_budget_is_spent(tmp_path, capsys):
    run = tmp_path / "run"
    train_sft(steps_cfg(3, checkpoint_every=2), EXAMPLES, run, small_model(), TOK, progress=False)
    capsys.readouterr()
    # unchanged: nothing to say (the run is simply complete)
    train_sft(steps_cfg(3, checkpoint_every=2), EXAMPLES, run, small_model(), TOK, progress=False)
    assert "budget is spent" not in capsys.readouterr().out
    # a resumable setting changed while the budget is exactly used up: say why nothing trains
    train_sft(steps_cfg(3, checkpoint_every=5), EXAMPLES, run, small_model(), TOK, progress=False)
    out = capsys.readouterr().out
    assert "the budget is spent at step 3 " in out and "nothing to train; raise max_steps / max_minutes" in out
    assert summary(run)["steps"] == 3


# --- data order --------------------------------------------------------------------------------


def test_batches_are_length_bucketed_and_always_full():
    lengths = list(range(10, 30))  # 20 examples, one bucket of 4 batches of 6: 3 full batches
    for epoch in range(3):
        batches = sft.epoch_batches(lengths, batch_size=6, bucket_batches=4, seed=0, epoch=epoch)
        assert [len(b) for b in batches] == [6, 6, 6]
        # sorted by length within the bucket: each batch holds 6 consecutive lengths
        assert [spread(b, lengths) for b in batches] == [5, 5, 5]


def test_batches_are_shuffled_after_bucketing():
    lengths = [i % 7 + 3 for i in range(24)]  # one bucket of 6 batches
    for seed in range(3):
        maxima = [max(lengths[i] for i in b) for b in sft.epoch_batches(lengths, 4, 6, seed=seed, epoch=0)]
        assert maxima != sorted(maxima), maxima  # not short -> long


def test_each_step_draws_from_its_own_epochs_batches():
    lengths = [i % 7 + 3 for i in range(24)]
    cfg = SFTConfig(max_minutes=None, max_steps=20, batch_size=4, bucket_batches=2)
    schedule, per_epoch = sft.BatchSchedule(lengths, cfg), 24 // 4
    epochs = [sft.epoch_batches(lengths, 4, 2, seed=0, epoch=e) for e in range(3)]
    assert epochs[0][0] != epochs[1][0]
    assert [schedule.batch(s) for s in range(3 * per_epoch)] == [b for epoch in epochs for b in epoch]


def test_exactly_batch_size_examples_make_one_batch_per_step():
    cfg = SFTConfig(max_minutes=None, max_steps=3, batch_size=4)
    schedule = sft.BatchSchedule([5, 6, 7, 8], cfg)
    assert [sorted(schedule.batch(s)) for s in range(3)] == [[0, 1, 2, 3]] * 3
    with pytest.raises(sft.SFTError, match="3 examples < SFTConfig.batch_size=4"):
        sft.BatchSchedule([5, 6, 7], cfg)


def test_an_over_long_example_keeps_exactly_max_length_ids():
    full = sft.tokenize_examples([("1+2=", "3")], TOK, max_length=64)[0]  # <bos> 1 + 2 = 3 <eos>
    cut = sft.tokenize_examples([("1+2=", "3")], TOK, max_length=4)[0]
    assert len(full.input_ids) > 4
    assert cut.input_ids == full.input_ids[:4] and cut.prompt_len == 4


# --- optimizer and config ----------------------------------------------------------------------


def test_make_optimizer_decays_matrices_only_with_the_configs_betas():
    model = small_model()
    cfg = SFTConfig(lr=1e-3, weight_decay=0.3, betas=(0.8, 0.9))
    decay, no_decay = sft.make_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["params"] and decay["betas"] == no_decay["betas"] == (0.8, 0.9)


def test_config_bounds_of_max_steps_and_min_lr_ratio():
    with pytest.raises(sft.SFTError, match="max_steps=0"):
        SFTConfig(max_minutes=None, max_steps=0)
    with pytest.raises(sft.SFTError, match="max_steps=0"):
        SFTConfig(max_minutes=1.0, max_steps=0)
    assert SFTConfig(max_minutes=None, max_steps=1).max_steps == 1
    for ratio in (0.0, 1.0):
        assert SFTConfig(min_lr_ratio=ratio).min_lr_ratio == ratio
    with pytest.raises(sft.SFTError, match="min_lr_ratio=1.5"):
        SFTConfig(min_lr_ratio=1.5)
