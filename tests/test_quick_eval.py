"""experiments.quick_eval: per-problem grades, and the paired change of one checkpoint against a baseline."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from experiments import quick_eval as qe
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


def test_cli_baseline_of_the_same_checkpoint_changes_nothing(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    tok = build_tokenizer()
    ckpt = save_checkpoint(build_model(SMALL, tok), tok, tmp_path / "ckpt")
    monkeypatch.setattr(sys, "argv", ["quick_eval", str(ckpt), "--baseline", str(ckpt), "--problems", "3",
                                      "--samples", "2"])
    qe._main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("baseline ") and "change vs baseline" in lines[2]
    result = json.loads(lines[-1])
    assert result["baseline"]["sampled_pass1"] == result["report"]["sampled_pass1"]
    assert result["report"]["num_problems"] == 3
    # same model, same problems, same sampling seeds: every paired change is exactly 0
    assert all(e == {"mean": 0.0, "low": 0.0, "high": 0.0} for e in result["difference"].values())
