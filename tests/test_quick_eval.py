"""experiments.quick_eval: per-problem grades, and the paired change of one checkpoint against a baseline."""
from __future__ import annotations

import contextlib
import json
import re
import shutil

import pytest
import torch

from experiments import quick_eval as qe
from experiments.checkpoint_hints import SPLIT_VERSIONS
from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer

SMALL = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_position=160)


def grades(greedy, sampled, majority) -> qe.ProblemGrades:
    return qe.ProblemGrades(tuple(greedy), tuple(tuple(s) for s in sampled), tuple(majority), tokens=10, seconds=1.0)


def test_per_problem_values():
    g = grades([True, False], [[True, False, False, False], [False] * 4], [False, False])
    assert g.per_problem() == {"greedy": [1.0, 0.0], "pass@1": [0.25, 0.0], "pass@k": [1.0, 0.0],
                               "majority@k": [0.0, 0.0]}


def test_paired_difference_is_new_minus_baseline_per_problem():
    base = grades([False, True], [[False, False], [True, False]], [False, True])
    new = grades([False, True], [[True, False], [True, True]], [True, True])
    diff = qe.paired_difference(base, new)
    # pass@1 per problem: base 0, 0.5; new 0.5, 1 -> +0.5 on both problems: exact, a zero-width interval
    assert (diff["pass@1"].mean, diff["pass@1"].low, diff["pass@1"].high) == (0.5, 0.5, 0.5)
    assert (diff["greedy"].mean, diff["greedy"].low, diff["greedy"].high) == (0.0, 0.0, 0.0)
    # majority: +1 on problem 0, 0 on problem 1 -> mean 0.5, resamples of two problems span [0, 1]
    assert diff["majority@k"].mean == 0.5 and diff["majority@k"].low == 0.0 and diff["majority@k"].high == 1.0
    assert "pass@1 +0.5000 [+0.5000, +0.5000]" in qe.format_difference(diff, 2)


def test_paired_difference_needs_the_same_problems():
    one = grades([True], [[True]], [True])
    two = grades([True, False], [[True], [False]], [True, False])
    with pytest.raises(ValueError, match="1 and 2 problems"):
        qe.paired_difference(one, two)


def small_checkpoint(folder):
    torch.manual_seed(0)
    tok = build_tokenizer()
    return save_checkpoint(build_model(SMALL, tok), tok, folder)


def test_cli_baseline_of_the_same_checkpoint_changes_nothing(tmp_path, capsys):
    ckpt = small_checkpoint(tmp_path / "ckpt")
    assert qe.main([str(ckpt), "--baseline", str(ckpt), "--problems", "3", "--samples", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("baseline ") and "change vs baseline" in lines[2]
    result = json.loads(lines[-1])
    assert result["baseline"]["sampled_pass1"] == result["report"]["sampled_pass1"]
    assert result["report"]["num_problems"] == 3
    # same model, same problems, same sampling seeds: every paired change is exactly 0
    assert all(e == {"mean": 0.0, "low": 0.0, "high": 0.0} for e in result["difference"].values())


def test_cli_bad_inputs_are_one_line_errors_before_any_generation(tmp_path, monkeypatch, capsys):
    ckpt = small_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(qe, "grade_policy", lambda *a, **k: pytest.fail("generated before the inputs were checked"))
    bad_config = shutil.copytree(ckpt, tmp_path / "bad_config")
    (bad_config / "config.json").write_text("{oops")
    truncated = shutil.copytree(ckpt, tmp_path / "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    cases = [
        ([str(tmp_path / "missing")], "checkpoint folder .*missing does not exist. Point the checkpoint argument at"),
        ([str(ckpt), "--task", "chess"], "unknown task 'chess'"),
        ([str(ckpt), "--samples", "0"], "^error: --samples 0; must be >= 1"),  # named QuickEvalConfig.num_samples
        ([str(ckpt), "--problems", "0"], "^error: --problems 0; must be >= 1"),
        ([str(ckpt), "--temperature", "inf"], r"^error: --temperature inf; must be a finite number > 0"),
        ([str(ckpt), "--baseline", str(truncated)], "truncated/model.safetensors is damaged"),  # the baseline too
        ([str(ckpt), "--baseline", str(tmp_path / "missing")], "missing does not exist. Point --baseline at"),
        # the README's default folder, relative: where it was looked for and how to make it
        (["outputs/checkpoints/tiny-arith/final"], "does not exist \\(relative to the current directory, "
                                                   f"{re.escape(str(tmp_path))}\\). Train the default tiny policy with"),
    ]
    monkeypatch.chdir(tmp_path)
    for argv, message in cases:
        assert qe.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), (message, err)
    monkeypatch.undo()
    # a config.json that does not parse is named with its folder (transformers' own error is an OSError)
    assert qe.main([str(bad_config), "--problems", "1", "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint folder {bad_config} cannot be loaded") and len(err.splitlines()) == 1


def test_a_sharded_checkpoint_is_evaluated_as_load_checkpoint_loads_it(tmp_path, capsys):
    # "checkpoint folder ... has no model.safetensors", though load_checkpoint and rollout_cache take shards
    ckpt = small_checkpoint(tmp_path / "ckpt")
    sharded = tmp_path / "sharded"
    from policies.checkpoint import load_checkpoint

    lm, tok = load_checkpoint(ckpt)
    lm.save_pretrained(sharded, max_shard_size="20KB")
    tok.save_pretrained(sharded)
    assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").exists()
    assert qe.main([str(sharded), "--problems", "1", "--samples", "1"]) == 0


def test_a_policy_of_another_task_or_of_old_splits_is_noted(tmp_path, capsys):
    # quick_eval printed test numbers without the notes search and train print: a policy of arith
    # graded on countdown (0.000), or one trained on version 1 of arith's splits (numbers read high)
    arith = small_checkpoint(tmp_path / "tiny-arith" / "final")
    (tmp_path / "tiny-arith" / "sft_summary.json").write_text(json.dumps({"run": {"task": "arith", "split_version": SPLIT_VERSIONS["arith"]}}))
    assert qe.main([str(arith), "--task", "countdown", "--problems", "1", "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert (f"note: the checkpoint {arith} was trained on arith, not countdown: give a policy of countdown instead "
            "(e.g. outputs/checkpoints/tiny-countdown/final)") in err
    assert qe.main([str(arith), "--problems", "1", "--samples", "1"]) == 0
    assert "note:" not in capsys.readouterr().err  # its own task, today's splits: no note
    old = small_checkpoint(tmp_path / "old" / "final")
    (tmp_path / "old" / "sft_summary.json").write_text(json.dumps({"run": {"task": "arith", "split_version": 1}}))
    assert qe.main([str(arith), "--baseline", str(old), "--problems", "1", "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert f"note: --baseline {old} was trained on version 1 of arith's splits" in err


def test_a_policy_with_infinite_logits_is_a_one_line_error(tmp_path, capsys):
    # a diverged SFT run (--lr 1e6): torch.multinomial's RuntimeError was a traceback here and in train_sft
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(SMALL, tok)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    ckpt = save_checkpoint(model, tok, tmp_path / "diverged")
    assert qe.main([str(ckpt), "--problems", "2", "--samples", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the policy's logits are not finite (NaN or inf) while sampling: its weights diverged or are damaged "
        "(a training run with too high a learning rate?)")


# -- --device ---------------------------------------------------------------------------------------


def fake_gpus(monkeypatch, count: int) -> None:
    """torch reports `count` CUDA GPUs (none is touched: the tests stop or stay on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cli_device_reaches_the_loader_of_both_checkpoints(tmp_path, monkeypatch, capsys):
    # --device was "unrecognized arguments"; both the checkpoint and the baseline load there
    import policies.checkpoint as checkpoint

    ckpt = small_checkpoint(tmp_path / "ckpt")
    real, devices = checkpoint.load_checkpoint, []

    def recording(directory, *args, **kwargs):
        devices.append(kwargs.get("device", args[1] if len(args) > 1 else None))
        return real(directory)  # the model stays on this CPU; what was asked is recorded

    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(qe, "native_bf16", lambda device="cpu": False)  # no capability query of a fake GPU
    monkeypatch.setattr(checkpoint, "load_checkpoint", recording)
    assert qe.main([str(ckpt), "--baseline", str(ckpt), "--problems", "1", "--samples", "1", "--device", "cuda:0"]) == 0
    assert devices == ["cuda:0", "cuda:0"]


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cli_a_device_torch_cannot_see_is_a_usage_error_before_any_model_loads(tmp_path, monkeypatch, capsys, device):
    import policies.checkpoint as checkpoint

    ckpt = small_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        qe.main([str(ckpt), "--device", device])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m experiments.quick_eval: error: argument --device: device={device!r} but torch {torch.__version__} "
        "sees no CUDA GPU (torch.cuda.is_available() is False); run it on the CPU (cpu) or install a CUDA build of torch")


def test_generation_runs_on_the_models_device(monkeypatch):
    # the prompts go to the model's device, bf16 autocasts there and the seeded RNGs forked are its:
    # the CPU's autocast and CPU input tensors broke a CUDA model (a "meta" model stands in for one)
    tok = build_tokenizer()
    seen: dict[str, object] = {}

    class OnDevice:
        device = torch.device("meta")

        def generate(self, input_ids, attention_mask, num_return_sequences, **kwargs):
            seen["inputs"] = {input_ids.device.type, attention_mask.device.type}
            rows = input_ids.shape[0] * num_return_sequences
            return torch.full((rows, input_ids.shape[1] + 2), tok.pad_token_id)  # nothing new: 0 tokens

    def autocast(device_type, **kwargs):
        seen["autocast"] = (device_type, kwargs["enabled"])
        return contextlib.nullcontext()

    def fork_rng(device):
        seen["fork"] = device
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(qe, "_fork_rng", fork_rng)
    texts, tokens = qe.generate_completions(OnDevice(), tok, ["1+2=", "3+4="], 2, 0.7, 4, 8, seed=0, bf16=True)
    assert (len(texts), tokens) == (2, 0)
    assert seen == {"inputs": {"meta"}, "autocast": ("meta", True), "fork": torch.device("meta")}


def test_the_rng_fork_covers_the_generators_the_device_samples_from(monkeypatch):
    forks = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kwargs: forks.append(kwargs))
    qe._fork_rng(torch.device("cpu"))
    qe._fork_rng(torch.device("cuda:1"))
    assert forks == [{"devices": []}, {"devices": [1], "device_type": "cuda"}]


@pytest.mark.parametrize("bf16", [False, True])
def test_generation_on_the_cpu_is_what_it_was(bf16):
    # --device cpu (the default) changes nothing: the same draws as the CPU-only code made (inlined here)
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(SMALL, tok).eval()
    prompts = ["12+7=", "3*4=", "100-1="]

    def before(n, temperature):
        sampling = {"do_sample": False} if temperature is None else {
            "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        tok.padding_side, out = "left", []
        for call, start in enumerate(range(0, len(prompts), max(1, 4 // n))):
            enc = tok(prompts[start : start + max(1, 4 // n)], return_tensors="pt", padding=True)
            with torch.no_grad(), torch.random.fork_rng(devices=[]), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.manual_seed((5 * 100_003 + call) % 2**64)
                seq = model.generate(**enc, **sampling, max_new_tokens=6, num_return_sequences=n,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(seq[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [texts[i : i + n] for i in range(0, len(texts), n)]
        tok.padding_side = "right"
        return out

    dtypes = set()  # what the logits were computed in: bf16 autocast on the CPU when asked
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    for n, temperature in ((1, None), (2, 1.0)):
        expected = before(n, temperature)
        dtypes.clear()
        got, _ = qe.generate_completions(model, tok, prompts, n, temperature, 6, 4, seed=5, bf16=bf16)
        assert got == expected
        assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
