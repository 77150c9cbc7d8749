"""The tiny model, checkpoints and the SFT trainer: loss goes down, files, exact resume."""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from dataclasses import asdict, replace

import pytest
import torch

import policies.sft as sft
import policies.sft_resume as sft_resume
from experiments.tasks import arith
from policies.checkpoint import REQUIRED_FILES, load_checkpoint, save_checkpoint
from policies.sft import SFTConfig, train_sft
from policies.tiny_model import TinyModelConfig, build_model, num_parameters
from policies.tiny_tokenizer import build_tokenizer

SMALL = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_position=160)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def examples():
    problems = arith.generate_problems("train", 96, seed=0)
    return [(arith.prompt_text(p), arith.solution_text(p)) for p in problems]


def steps_cfg(steps: int, **kwargs) -> SFTConfig:
    # one thread: on a shared 2-core machine, 2 spinning OpenMP threads can run several times slower
    base = dict(max_minutes=None, max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=0, num_threads=1)
    return SFTConfig(**{**base, **kwargs})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- model -------------------------------------------------------------------------------------


def test_model_takes_ids_from_tokenizer_and_ties_embeddings(tok):
    model = build_model(SMALL, tok)
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # embedding V*C + 1 layer (4 C^2 attention + 3 C*I MLP + 2C norms) + final norm C
    c, i, v = 32, 64, len(tok)
    assert num_parameters(model) == v * c + 4 * c * c + 3 * c * i + 2 * c + c
    same = build_model(SMALL, tok)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_model_config_validation_names_the_value():
    with pytest.raises(ValueError, match="hidden=30"):
        TinyModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="layers=0"):
        TinyModelConfig(layers=0)


# --- checkpoints -------------------------------------------------------------------------------


def test_save_load_round_trip_and_missing_file_is_named(tok, tmp_path):
    model = build_model(SMALL, tok)
    path = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert all((path / name).is_file() for name in REQUIRED_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded, loaded_tok = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded_tok.get_vocab() == tok.get_vocab()
    half, _ = load_checkpoint(path, "bfloat16")  # a dtype by name, as configs give it
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype='fp8' is not one of float32, bfloat16, float16"):
        load_checkpoint(path, "fp8")
    save_checkpoint(model, tok, path)  # replacing an existing checkpoint works
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


# --- trainer pieces ----------------------------------------------------------------------------


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="max_minutes=None and max_steps=None"):
        SFTConfig(max_minutes=None, max_steps=None)
    with pytest.raises(sft_resume.SFTError, match="max_minutes=nan"):  # nan passed every check before
        SFTConfig(max_minutes=float("nan"))
    with pytest.raises(sft_resume.SFTError, match="grad_clip=nan"):
        SFTConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match="batch_size=0"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr=-1"):
        SFTConfig(lr=-1)
    with pytest.raises(ValueError, match="max_minutes=0"):
        SFTConfig(max_minutes=0)


def test_collate_masks_prompt_and_padding(tok):
    data = sft.tokenize_examples([("ab\n<think>", "1 + 1 = 2.\n\n"), ("a\n<think>", "3")], tok, max_length=64)
    assert data[0].input_ids[0] == tok.bos_token_id and data[0].input_ids[-1] == tok.eos_token_id
    input_ids, labels = sft.collate(data, tok.pad_token_id)
    for row, e in enumerate(data):
        n = len(e.input_ids)
        assert (labels[row, : e.prompt_len] == sft.IGNORE_INDEX).all()
        assert labels[row, e.prompt_len : n].tolist() == list(e.input_ids[e.prompt_len :])
        assert (labels[row, n:] == sft.IGNORE_INDEX).all() and (input_ids[row, n:] == tok.pad_token_id).all()
    # the completion of the second example is "3" <eos>: exactly two labelled tokens
    assert int((labels[1] != sft.IGNORE_INDEX).sum()) == 2


def test_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = [i % 17 for i in range(100)]
    a = sft.epoch_batches(lengths, 8, 4, seed=0, epoch=3)
    assert a == sft.epoch_batches(lengths, 8, 4, seed=0, epoch=3)
    assert a != sft.epoch_batches(lengths, 8, 4, seed=0, epoch=4)
    flat = [i for b in a for i in b]
    assert len(a) == 100 // 8 and all(len(b) == 8 for b in a) and len(set(flat)) == len(flat)


def test_learning_rate_schedule_closed_form():
    cfg = SFTConfig(max_minutes=None, max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert sft.learning_rate(0, 0.0, cfg) == pytest.approx(1e-4)  # warmup: (0+1)/10 of lr
    assert sft.learning_rate(50, 0.5, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cos(pi/2)=0
    assert sft.learning_rate(100, 1.0, cfg) == pytest.approx(1e-4)  # the floor
    timed = SFTConfig(max_minutes=2.0, max_steps=1000)
    assert sft.budget_fraction(10, 60.0, timed) == 0.5  # time dominates: 60 s of 120 s


# --- training ----------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_checkpoints(tok, examples, tmp_path):
    model = build_model(SMALL, tok)
    data = sft.tokenize_examples(examples, tok, 256)
    before = sft.evaluate_loss(model, data, tok.pad_token_id, steps_cfg(1))
    final = train_sft(steps_cfg(30, checkpoint_every=10), examples, tmp_path / "run", model, tok, progress=False)
    trained, _ = load_checkpoint(final)
    after = sft.evaluate_loss(trained, data, tok.pad_token_id, steps_cfg(1))
    assert after < before - 1.0, (before, after)  # ln(453) ~ 6.1 at init
    assert final == tmp_path / "run" / "final"
    assert all((tmp_path / "run" / "last" / name).is_file() for name in REQUIRED_FILES + (sft_resume.STATE_FILE,))
    state = torch.load(tmp_path / "run" / "last" / sft_resume.STATE_FILE, weights_only=False)
    assert state["step"] == 30 and "optimizer" in state and "rng" in state
    summary = json.loads((tmp_path / "run" / sft_resume.SUMMARY_FILE).read_text())
    assert summary["steps"] == 30 and summary["tokens"] > 0 and math.isfinite(summary["final_loss"])


class _Crash(RuntimeError):
    pass


def test_resume_after_interruption_is_exact(tok, examples, tmp_path, monkeypatch):
    cfg = steps_cfg(8, checkpoint_every=4)
    straight = train_sft(cfg, examples, tmp_path / "a", build_model(SMALL, tok), tok, progress=False)

    real_step, calls = sft.train_step, []

    def crash_on_fifth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the step-4 checkpoint
            raise _Crash()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_on_fifth_step)
    with pytest.raises(_Crash):
        train_sft(cfg, examples, tmp_path / "b", build_model(SMALL, tok), tok, progress=False)
    monkeypatch.setattr(sft, "train_step", real_step)
    torch.manual_seed(12345)  # resuming restores the RNG state itself
    resumed = train_sft(cfg, examples, tmp_path / "b", None, None, progress=False)

    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert torch.load(tmp_path / "b" / "last" / sft_resume.STATE_FILE, weights_only=False)["step"] == 8
    # calling again on a finished run trains no further
    again = train_sft(cfg, examples, tmp_path / "b", None, None, progress=False)
    c, _ = load_checkpoint(again)
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))


def test_time_budget_ends_training(tok, examples, tmp_path):
    cfg = SFTConfig(max_minutes=0.03, max_steps=None, batch_size=8, checkpoint_every=0, num_threads=1)  # 1.8 s
    train_sft(cfg, examples, tmp_path / "t", build_model(SMALL, tok), tok, progress=False)
    summary = json.loads((tmp_path / "t" / sft_resume.SUMMARY_FILE).read_text())
    assert 1.8 <= summary["elapsed_s"] < 1.8 + 2.0 and summary["steps"] >= 1


# --- resuming: identity checks, damaged folders, Ctrl-C -----------------------------------------


def state_step(run_dir) -> int:
    return torch.load(run_dir / "last" / sft_resume.STATE_FILE, weights_only=False)["step"]


def test_resume_refuses_another_config_and_allows_a_longer_budget(tok, examples, tmp_path, capsys):
    run, arith_info = tmp_path / "run", {"task": "arith"}
    train_sft(steps_cfg(4), examples, run, build_model(SMALL, tok), tok, progress=False, run_info=arith_info)
    refusals = [  # (config, examples, model, run_info) of the resume, what the error names
        ((steps_cfg(6, lr=0.5), examples, build_model(SMALL, tok), arith_info), "sft.lr: 0.003 -> 0.5"),
        ((steps_cfg(6, batch_size=4), examples, None, arith_info), "sft.batch_size: 8 -> 4"),
        ((steps_cfg(6), examples, None, {"task": "countdown"}), "run.task: 'arith' -> 'countdown'"),
        ((steps_cfg(6), examples[:-1], None, arith_info), "data.examples: 96 -> 95"),
        ((steps_cfg(6), examples, build_model(replace(SMALL, seed=1), tok), arith_info),
         "model.weights_sha256"),
    ]
    for (cfg, data, model, info), names in refusals:
        with pytest.raises(sft_resume.SFTError, match=f"{run / 'last'} holds a run of another config .*{names}"):
            train_sft(cfg, data, run, model, None if model is None else tok, progress=False, run_info=info)
        assert state_step(run) == 4  # nothing trained, nothing overwritten
    capsys.readouterr()
    # a longer budget (and another checkpoint interval) is how a run trains longer; run_info keys
    # the saved run did not record (a caller recording more since) are not compared
    longer = steps_cfg(6, checkpoint_every=5)
    train_sft(longer, examples, run, build_model(SMALL, tok), tok, progress=False,
              run_info={**arith_info, "model": {"hidden": 256}})
    out = capsys.readouterr().out
    assert f"resuming from {run / 'last'} at step 4\n" in out and "sft.max_steps: 4 -> 6" in out
    assert state_step(run) == 6
    summary = json.loads((run / sft_resume.SUMMARY_FILE).read_text())
    assert summary["resumes"] == [{"step": 4, "changed": ["sft.checkpoint_every: 0 -> 5", "sft.max_steps: 4 -> 6"]}]


def test_state_saved_before_identities_compares_its_config(tok, examples, tmp_path):
    run = tmp_path / "run"
    train_sft(steps_cfg(2), examples, run, build_model(SMALL, tok), tok, progress=False)
    path = run / "last" / sft_resume.STATE_FILE
    state = torch.load(path, weights_only=False)
    del state["identity"], state["resumes"]
    torch.save(state, path)
    with pytest.raises(sft_resume.SFTError, match="sft.lr: 0.003 -> 0.5"):
        train_sft(steps_cfg(3, lr=0.5), examples, run, build_model(SMALL, tok), tok, progress=False)
    train_sft(steps_cfg(3), examples, run, build_model(SMALL, tok), tok, progress=False)
    assert state_step(run) == 3


def test_a_damaged_run_folder_is_an_error_never_a_fresh_start(tok, examples, tmp_path):
    run = tmp_path / "run"
    train_sft(steps_cfg(2), examples, run, build_model(SMALL, tok), tok, progress=False)
    final_weights = (run / "final" / "model.safetensors").read_bytes()
    state, last = run / "last" / sft_resume.STATE_FILE, run / "last"

    def resume_fails(match: str) -> None:
        with pytest.raises(sft_resume.SFTError, match=match):
            train_sft(steps_cfg(4), examples, run, build_model(SMALL, tok), tok, progress=False)
        assert (run / "final" / "model.safetensors").read_bytes() == final_weights

    good = state.read_bytes()
    state.write_bytes(good[:1000])  # truncated: a bare OSError or RuntimeError from torch.load before
    resume_fails(f"cannot resume: {state} is damaged .*remove {run} or use another out_dir")
    state.unlink()
    resume_fails(f"cannot resume from {last}: it has no {sft_resume.STATE_FILE}")
    state.write_bytes(good)
    aside = run / ".last.old-1-abcdefgh"  # a checkpoint write cut between its two renames
    last.rename(aside)
    resume_fails(f"{last} is missing but {aside} holds the previous checkpoint.*rename it")
    shutil.rmtree(aside)
    resume_fails(f"{run} holds a run \\({run / 'final'}\\) but no {last}")


def _interrupt_at_call(monkeypatch, call: int) -> None:
    """sft.train_step sends this process a SIGINT (a real Ctrl-C) during its `call`-th call."""
    real_step, calls = sft.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", step)


def test_ctrl_c_saves_the_current_step_and_resumes_exactly(tok, examples, tmp_path, monkeypatch):
    cfg = steps_cfg(6)  # no periodic checkpoint: only the Ctrl-C one
    straight = train_sft(cfg, examples, tmp_path / "a", build_model(SMALL, tok), tok, progress=False)
    _interrupt_at_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt) as info:  # before: a bare KeyboardInterrupt, no checkpoint
        train_sft(cfg, examples, tmp_path / "b", build_model(SMALL, tok), tok, progress=False)
    assert isinstance(info.value, sft_resume.TrainingInterrupted) and info.value.step == 3
    assert str(info.value) == f"interrupted: saved {tmp_path / 'b' / 'last'} at step 3; rerun the same command to resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert state_step(tmp_path / "b") == 3 and not (tmp_path / "b" / "final").exists()
    monkeypatch.undo()
    resumed = train_sft(cfg, examples, tmp_path / "b", build_model(SMALL, tok), tok, progress=False)
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- the CLI and the quick evaluation (smoke) --------------------------------------------------


def test_train_sft_cli_smoke(tmp_path, monkeypatch, capsys):
    from experiments import train_sft as cli

    monkeypatch.setattr(cli, "TinyModelConfig", lambda seed: SMALL)
    argv = ["train_sft", "--out", str(tmp_path / "cli"), "--minutes", "0", "--max-steps", "2",
            "--batch-size", "4", "--train-problems", "40", "--eval-problems", "2", "--eval-samples", "2",
            "--threads", "1", "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "greedy pass@1" in out and "pass@2" in out
    report = json.loads((tmp_path / "cli" / "quick_eval.json").read_text())
    assert report["num_problems"] == 2 and 0 <= report["sampled_pass1"] <= report["pass_at_k"] <= 1
    assert report["steps"] == 2
    # trained on without an evaluation: the old numbers (of the 2-step policy) were kept beside a new final/
    cli.main(argv[1:argv.index("--max-steps") + 1] + ["3", "--batch-size", "4", "--train-problems", "40",
                                                      "--eval-problems", "0", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "removed" in out and "quick_eval.json" in out
    assert not (tmp_path / "cli" / "quick_eval.json").exists()


def test_a_cached_policy_of_other_sft_settings_is_used_with_a_note(tok, tmp_path, capsys):
    """The demo reused outputs/checkpoints/tiny-arith of an 8-minute SFT run where its task asks
    for 1400 steps, in silence; it is still used (not retrained behind the user's back), named."""
    from experiments.tiny_policy import cached_policy

    run = tmp_path / "tiny-arith"
    save_checkpoint(build_model(TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64), tok), tok,
                    run / "final")
    made = SFTConfig(max_minutes=8.0, max_steps=None)
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(made)}))
    assert cached_policy(run, replace(made, num_threads=1, eval_every=5)) == run / "final"  # no weight changes
    assert capsys.readouterr().err == ""
    assert cached_policy(run, replace(made, max_minutes=None, max_steps=1400)) == run / "final"
    assert capsys.readouterr().err.strip() == (
        f"note: the cached policy {run / 'final'} was trained with other settings (max_minutes: 8.0 -> None; "
        f"max_steps: None -> 1400); it is used as it is: delete {run} to train it with these")
    # another task config, model shape or pair count: named too (they were not compared at all)
    from experiments.tasks.arith import ArithConfig
    from experiments.tiny_policy import run_settings

    trained = run_settings("arith", ArithConfig(), TinyModelConfig(), 1000)
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(made), "run": trained}))
    assert cached_policy(run, made, trained) == run / "final" and capsys.readouterr().err == ""
    asked = run_settings("arith", ArithConfig(max_ops=8), TinyModelConfig(hidden=128), 10)
    assert cached_policy(run, made, asked) == run / "final"
    note = capsys.readouterr().err
    assert "train_problems: 1000 -> 10" in note and "task_config: {" in note and "'hidden': 128" in note


def test_a_policy_trained_on_an_earlier_arith_split_is_named(tmp_path, capsys):
    # the split change of 2026-12-06 put 122 of the demo's 200 test problems among the old train
    # split's problems: a policy trained before it was reused by the demo, search and train in silence
    from experiments.checkpoint_hints import trained_task_note
    from experiments.tasks.arith import SPLIT_VERSION, ArithConfig
    from experiments.tiny_policy import cached_policy, run_settings

    run = tmp_path / "tiny-arith"
    save_checkpoint(build_model(SMALL, build_tokenizer()), build_tokenizer(), run / "final")
    made = SFTConfig()
    asked = run_settings("arith", ArithConfig(), TinyModelConfig(), 1000)
    assert asked["split_version"] == SPLIT_VERSION == 2
    before = {k: v for k, v in asked.items() if k != "split_version"}  # a summary from before the change
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(made), "run": before}))
    assert cached_policy(run, made, asked) == run / "final"
    assert "split_version: 1 -> 2, its train split held test problems of this one" in capsys.readouterr().err
    note = trained_task_note(str(run / "final"), "experiments.tasks.arith")
    assert note is not None and "was trained on version 1 of arith's splits" in note and f"delete {run}" in note
    # a summary recording version 1: the difference named once (the generic settings loop named it too)
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(made), "run": {**asked, "split_version": 1}}))
    assert cached_policy(run, made, asked) == run / "final"
    assert capsys.readouterr().err.count("split_version: 1 -> 2") == 1
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(made), "run": asked}))
    assert cached_policy(run, made, asked) == run / "final" and capsys.readouterr().err == ""
    assert trained_task_note(str(run / "final"), "experiments.tasks.arith") is None
    assert "not countdown" in trained_task_note(str(run / "final"), "experiments.tasks.countdown")


def test_an_incomplete_cached_policy_is_written_again_as_its_run_made_it(tmp_path, capsys):
    # with a file of final/ missing and a caller asking for another budget, the run resumed under
    # the caller's settings and trained on (3 steps -> 6): not the policy the cache held
    from experiments.tasks.arith import ArithConfig
    from experiments.tiny_policy import ensure_policy

    run = tmp_path / "tiny-arith"
    made = steps_cfg(3, batch_size=4)
    ensure_policy(run, made, SMALL, ArithConfig(), train_problems=40, progress=False)
    weights = (run / "final" / "model.safetensors").read_bytes()
    (run / "final" / "tokenizer.json").unlink()
    capsys.readouterr()
    final = ensure_policy(run, replace(made, max_steps=6), SMALL, ArithConfig(), train_problems=40, progress=False)
    assert json.loads((run / sft_resume.SUMMARY_FILE).read_text())["steps"] == 3
    assert (final / "model.safetensors").read_bytes() == weights and (final / "tokenizer.json").is_file()
    out = capsys.readouterr().out
    assert "cached policy is incomplete, writing it again from" in out and "no cached policy" not in out


def test_a_seed_past_int64_orders_the_data_without_overflow():
    # seed * 1_000_003 overflowed torch's int64 ("Overflow when unpacking long long") for any
    # seed from ~9.2e12 (a timestamp-style seed), mid-run
    from policies.sft import epoch_batches

    lengths = list(range(64))
    big = 20231205123456
    assert epoch_batches(lengths, 8, 2, seed=big, epoch=0) == epoch_batches(lengths, 8, 2, seed=big, epoch=0)
    assert epoch_batches(lengths, 8, 2, seed=big, epoch=0) != epoch_batches(lengths, 8, 2, seed=big + 1, epoch=0)
