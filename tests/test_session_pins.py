"""Pins from a mutation review of the 2026-12-07 changes: behaviours a single-line change of the
code left every existing test passing on.

What is pinned: a TransformersPolicy built directly or from a ReflectiveModel refuses a switch
that is not true / false (a YAML "no" is truthy), and forked / with_step_head / the joint loss's
bf16 / shared_prompt refuse null while prefix_cache and shared_prefix refuse 0 / 1; a train_sft
resume given a budget flag keeps the run's own --checkpoint-every, and --temperature 0 is refused
as typed; the aha plot reads the held-out gap when only some rows carry it, refuses a repeated step
or a drop between the first two rows, and puts a one-step run's point inside the axes; the GPU
share gpu_room advises is one it accepts (and the largest such, in steps of 0.05), exactly 8 GiB
fits beside 0.9 of 80; train_loss.temperature=abc / inf is a ValueError naming the key;
backbone tuning logs loss/kl and loss/lm each under its own coefficient; quick_eval's bf16
follows the --device GPU, not the CPU; the search notes a CPU scorer beside a GPU policy only on
a machine with a GPU; the out-of-vocabulary error names the bad id even after an id 0.

Tiny random models and hand-made configs only; no GPU (it is faked where one matters).

    .venv/bin/python -m pytest -q tests/test_session_pins.py
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import policies.bf16_support as bf16_support
import policies.sft_resume as sft_resume
import test_plot_cli
import test_probe_backbone_verifier
import test_setting_types
import test_sft_cli
from experiments import quick_eval as qe
from experiments import search
from experiments.backbone_tuning import BackboneTuneConfig, rollout_examples, train
from experiments.countdown_failures import cache_problems
from experiments.gpu_room import GIB, room_problem
from experiments.plot_aha import main as plot_aha_main
from experiments.plot_aha import split_step
from experiments.rollout_cache import FeatureReader, load_cache
from experiments.search import run_search_experiment
from experiments.tasks import countdown
from experiments.train import settings
from policies.checkpoint import load_checkpoint
from policies.joint_step import JointLossConfig
from policies.policy_requests import name_out_of_vocabulary
from policies.prefix_cache import prefix_cache_config
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from test_gpu_room import composed as search_composed
from test_setting_types import SMALL_SEARCH, search_config, train_config
from test_sft_cli import main as sft_main
from test_transformers_policy import TOK, make_model
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
caches = test_probe_backbone_verifier.caches  # its module fixture: a tiny policy and its countdown caches
ckpt = test_setting_types.ckpt  # its module fixture: a tiny policy checkpoint
saved_figures = test_plot_cli.saved_figures  # its fixture: the figures saved during a test
small_runs = test_sft_cli.small_runs  # its autouse fixture (so here too): the small model, a small countdown pool


def question(problem: Problem) -> str:
    return problem.question


def escaped(message: str) -> str:
    return re.escape(message)


# -- policy switches ------------------------------------------------------------------------------


def test_a_policy_built_directly_or_from_a_reflective_model_refuses_a_switch_that_is_no_bool():
    # from_pretrained checked the switches; the constructor itself took forked="no" (truthy: forking stayed on)
    model = make_model(len(TOK))
    with pytest.raises(ValueError, match=escaped("TransformersPolicy.forked='no' must be true or false")):
        TransformersPolicy(model, TOK, SamplingConfig(), question, forked="no")
    with pytest.raises(ValueError, match=escaped("TransformersPolicy.shared_prefix='no' must be true or false (or null)")):
        TransformersPolicy.from_reflective(ReflectiveModel(model), TOK, SamplingConfig(), question, shared_prefix="no")


def test_the_numbers_0_and_1_are_no_switches():
    # 1 turned the prefix cache on, shared_prefix=0 was stored as 0
    for value in (0, 1):
        with pytest.raises(ValueError, match=escaped(f"prefix_cache={value}: give true / false, null, or its settings")):
            prefix_cache_config(value)
    with pytest.raises(ValueError, match=escaped("TransformersPolicy.shared_prefix=0 must be true or false (or null)")):
        TransformersPolicy(make_model(len(TOK)), TOK, SamplingConfig(), question, shared_prefix=0)


@pytest.mark.parametrize("override, message", [
    ("+policy.forked=null", "TransformersPolicy.forked=None must be true or false"),
    ("+policy.with_step_head=null", "TransformersPolicy.with_step_head=None must be true or false"),
])
def test_null_is_no_policy_switch(ckpt, tmp_path, monkeypatch, override, message):
    # null was run as false
    from policies import transformers_policy

    monkeypatch.setattr(transformers_policy, "load_checkpoint", lambda *a: pytest.fail("the model was loaded"))
    cfg = search_config(["policy=tiny", f"policy.path={ckpt}", override, f"out_dir={tmp_path / 'run'}", *SMALL_SEARCH])
    with pytest.raises(ValueError, match=escaped(message)):
        run_search_experiment(cfg)


@pytest.mark.parametrize("name", ["bf16", "shared_prompt"])
def test_null_is_no_joint_loss_switch(name):
    with pytest.raises(ValueError, match=escaped(f"JointLossConfig.{name}=None must be true or false")):
        JointLossConfig(**{name: None})
    with pytest.raises(ValueError, match=escaped(f"train_loss.{name}=None must be true or false")):
        settings(train_config([f"train_loss.{name}=null"]))


# -- training settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train_loss.temperature=abc", "train_loss.temperature='abc' must be a finite number > 0"),  # a TypeError traceback
    ("train_loss.temperature=inf", "train_loss.temperature=inf must be a finite number > 0"),  # taken
])
def test_a_training_temperature_that_is_no_finite_number_is_named(override, message):
    with pytest.raises(ValueError) as caught:
        settings(train_config([override]))
    assert str(caught.value).startswith(message)


# -- train_sft ------------------------------------------------------------------------------------


def test_a_resume_given_a_budget_flag_keeps_the_runs_own_checkpoint_interval(tmp_path, capsys):
    # with --minutes given, a resume without --checkpoint-every went back to 500 and said it "changed"
    out = tmp_path / "run"
    assert sft_main("--out", str(out), "--minutes", "5", "--max-steps", "2", "--checkpoint-every", "1") == 0
    capsys.readouterr()
    assert sft_main("--out", str(out), "--minutes", "5", "--max-steps", "3") == 0
    assert "checkpoint_every" not in capsys.readouterr().out
    assert json.loads((out / sft_resume.SUMMARY_FILE).read_text())["config"]["checkpoint_every"] == 1


@pytest.mark.parametrize("eval_problems", ["0", "3"])
def test_a_zero_temperature_is_refused_as_typed(tmp_path, capsys, eval_problems):
    # with no evaluation it was taken in silence (or read as the task's default); with one, the error
    # named QuickEvalConfig.temperature, a field the user never typed
    rc = sft_main("--out", str(tmp_path / "run"), "--eval-problems", eval_problems, "--temperature", "0",
                  "--max-steps", "1")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --temperature 0: must be a finite number > 0") and err.count("\n") == 1, err
    assert not (tmp_path / "run" / sft_resume.SUMMARY_FILE).exists()


# -- the aha plot ---------------------------------------------------------------------------------


def test_the_aha_is_read_from_the_held_out_gap_when_only_some_rows_carry_it():
    # a run as experiments.train logs it: fc/* every step, heldout_fc/* every eval_every = 5 steps
    rows = [{"step": s, "fc/diff_prob": 0.3} for s in range(11)]
    for row in rows:
        if row["step"] % 5 == 0:
            row["heldout_fc/diff_prob"] = 0.0 if row["step"] < 10 else 0.2
    assert split_step(rows) == (10, "heldout_fc/diff_prob")  # not (0, "fc/diff_prob"): the train batch's own gap


@pytest.mark.parametrize("steps, message", [
    ([0, 1, 1, 2], "line 3 is step 1 after step 1"),  # a repeated step
    ([5, 0, 1, 2], "line 2 is step 0 after step 5"),  # a drop between the first two rows
])
def test_the_aha_plot_refuses_steps_that_do_not_increase(tmp_path, capsys, steps, message):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "fc/correct_prob": 0.6, "fc/false_prob": 0.4,
                                           "fc/diff_prob": 0.2}) + "\n" for s in steps))
    assert plot_aha_main([str(metrics), "--out", str(tmp_path / "aha.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {metrics}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "aha.png").exists()


def test_a_one_step_runs_point_lies_inside_the_axes(tmp_path, saved_figures):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 3, "fc/correct_prob": 0.6, "fc/false_prob": 0.4, "fc/diff_prob": 0.2}) + "\n")
    assert plot_aha_main([str(metrics), "--out", str(tmp_path / "aha.png")]) == 0
    (fig,) = saved_figures
    for ax in fig.axes:
        left, right = ax.get_xlim()
        assert left < 3 < right, (left, right)  # was on the left edge


# -- gpu_room and the search's scorer note --------------------------------------------------------


@pytest.mark.parametrize("needed_gib", [15.7, 16, 18, 30])
def test_the_share_room_problem_advises_is_the_largest_one_that_fits(needed_gib):
    total, needed = 80 * GIB, int(needed_gib * GIB)
    problem = room_problem(0.9, total, needed)
    share = float(re.search(r"set policy\.engine\.gpu_memory_utilization=([0-9.]+) ", problem)[1])
    assert room_problem(share, total, needed) is None  # 18 GiB: 0.8 was advised, which leaves 16
    assert room_problem(share + 0.05, total, needed) is not None


def test_exactly_the_bytes_a_share_leaves_fit():
    # 1 - 0.9 is 0.0999...: exactly 8 GiB of 80 was refused, naming 0.9 as the share to set
    assert room_problem(0.9, 80 * GIB, 8 * GIB) is None
    assert room_problem(0.9, 80 * GIB, 8 * GIB + 1) is not None


@pytest.mark.parametrize("gpu", [True, False])
def test_a_cpu_scorer_beside_a_gpu_policy_is_noted_on_a_machine_with_a_gpu(monkeypatch, capsys, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    search.note_cpu_scorer(search_composed("policy=metastone_s1_1p5b", "scorer=sprm_forward"))
    err = capsys.readouterr().err
    if gpu:
        assert err.startswith("note: the policy runs on the GPU and the scorer's model (scorer.path=") and "on the CPU" in err
    else:
        assert err == ""


# -- backbone tuning ------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_coef, lm_coef, logged, unlogged", [
    (0.1, 0.0, "loss/kl", "loss/lm"),
    (0.0, 0.1, "loss/lm", "loss/kl"),
])
def test_each_extra_loss_term_is_logged_under_its_own_coefficient(caches, kl_coef, lm_coef, logged, unlogged):
    path, files, _, _ = caches
    lm, tokenizer = load_checkpoint(path)
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    cache = load_cache(files["train"])
    examples = rollout_examples(cache, cache_problems(cache), reader)
    frozen = load_checkpoint(path)[0] if kl_coef else None
    torch.manual_seed(0)
    rows = train(ReflectiveModel(lm), frozen, examples, reader.pad_id,
                 BackboneTuneConfig(steps=1, batch=2, kl_coef=kl_coef, lm_coef=lm_coef, reference_solutions=0),
                 progress=False)
    assert logged in rows[-1] and unlogged not in rows[-1], sorted(rows[-1])


# -- quick_eval's bf16 on a GPU -------------------------------------------------------------------


@pytest.fixture
def cpu_flags(monkeypatch, tmp_path):
    """set(flags): the CPU's /proc/cpuinfo flags as native_bf16 reads them (its cache cleared)."""
    def set_flags(flags: str) -> None:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(bf16_support, "CPUINFO", cpuinfo)
        bf16_support.native_bf16.cache_clear()

    yield set_flags
    bf16_support.native_bf16.cache_clear()  # before monkeypatch puts the real file back


class Graded(Exception):
    """Raised by the stub grade_policy: the config it got is recorded, nothing generates."""


@pytest.mark.parametrize("flags, capability, bf16", [
    ("fpu sse2 avx512_bf16", (7, 5), False),  # a T4-class GPU on a CPU with bf16: the GPU's answer
    ("fpu sse2", (9, 0), True),  # an H100 on a CPU without
])
def test_quick_eval_on_a_gpu_autocasts_bf16_as_the_gpu_supports_it(ckpt, monkeypatch, cpu_flags, capsys,
                                                                    flags, capability, bf16):
    cpu_flags(flags)
    assert bf16_support.native_bf16("cpu") is (not bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    seen = []

    def grade(model, tokenizer, problems, cfg, module, progress=None):
        seen.append(cfg.bf16)
        raise Graded

    monkeypatch.setattr(qe, "load_policy", lambda directory, device="cpu": (None, None))
    monkeypatch.setattr(qe, "grade_policy", grade)
    with pytest.raises(Graded):
        qe.quick_eval_command([str(ckpt), "--problems", "1", "--samples", "1", "--device", "cuda"])
    assert seen == [bf16]


# -- policy requests ------------------------------------------------------------------------------


def test_the_out_of_vocabulary_error_names_the_bad_id_after_an_id_0():
    prefix = Prefix(Problem("p0", "q", "a"), ())
    with pytest.raises(ValueError, match=escaped("problem 'p0': token id 999 of its path lies outside this model's "
                                                 "vocabulary of 453")):
        name_out_of_vocabulary([prefix], [[0, 5, 999]], 453)
