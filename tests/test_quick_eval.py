"""experiments.quick_eval: per-problem grades, and the paired change of one checkpoint against a baseline."""
from __future__ import annotations

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
        ([str(tmp_path / "missing")], "checkpoint folder .*missing does not exist"),
        ([str(ckpt), "--task", "chess"], "unknown task 'chess'"),
        ([str(ckpt), "--samples", "0"], "num_samples=0"),
        ([str(ckpt), "--temperature", "inf"], r"temperature=inf; must be a finite number > 0"),
        ([str(ckpt), "--baseline", str(truncated)], "truncated/model.safetensors is damaged"),  # the baseline too
        ([str(ckpt), "--baseline", str(tmp_path / "missing")], "missing does not exist"),
    ]
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
