"""Tests of the joint training loop `python -m experiments.train`: the train config composes with
every train_loss option and rejects bad values by name; a 3-step run writes metrics rows with
every key, checkpoints and the fixed held-out rollouts; a run stopped after K steps (with a row
logged past its last checkpoint, as a kill leaves it) and resumed equals a straight run (weights,
head, optimisers, metric rows but time/*); two processes under `accelerate launch` (slow); the fc
metrics in closed form; the aha plot.

The policy is a random tiny Llama biased to end steps and sequences often
(`test_joint_step.biased_lm`), and THIS module is the task (`task.module=test_train_loop`):
arith's problems and prompts, graded by a coin flip on the completion's text, so rewards are
mixed and both losses have a gradient. Runs take well under a second per step.

    .venv/bin/pytest tests/test_train_loop.py            # -m "not slow" skips the 2-process run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from experiments.aha_metrics import aha_step, fc_metrics, path_scores, within_problem_auc
from experiments.plot_aha import main as plot_aha_main
from experiments.plot_aha import plot_aha, register_aha, split_step
from experiments.tasks import arith
from experiments.train import CONFIG_DIR, one_outcome_note, run_training, settings, stream_indices
from policies.checkpoint import save_checkpoint
from policies.joint_step import JointLossConfig
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.train_state import STATE_FILE
from policies.transformers_policy import TransformersPolicy
from test_joint_step import TOK, biased_lm

REPO = Path(__file__).resolve().parents[1]

# -- this module as the task: arith problems, a coin-flip grade ---------------------------------
generate_problems = arith.generate_problems
prompt_text = arith.prompt_text
extract_answer = arith.extract_answer


def grade(problem, completion_text: str) -> bool:
    """A fair coin per (problem, text): mixed rewards from a random policy."""
    return hashlib.sha256(f"{problem.id}|{completion_text}".encode()).digest()[0] % 2 == 0


# -----------------------------------------------------------------------------------------------

STEP_KEYS = {
    "step", "loss/total", "loss/pg", "loss/entropy", "loss/kl", "loss/spr", "ppo/clip_fraction", "ppo/approx_kl",
    "spr/kept_fraction", "spr/agreement", "spr/steps", "spr/left_out_steps", "spr/kept_positive", "spr/kept_negative",
    "grad_norm/actor", "grad_norm/head", "fc/correct_prob", "fc/false_prob", "fc/diff_prob", "fc/within_auc",
    "fc/num_correct", "fc/num_false", "reward/mean", "rollout/correct", "reward/pass_at_g", "grpo/mixed_groups",
    "rollout/length",
    "rollout/cut_by_length", "lr/actor", "lr/head", "time/rollout_s", "time/update_s", "time/eval_s", "time/step_s",
    "time/tokens_per_s", "time/train_tokens_per_s", "time/elapsed_s",
}
FC = ("correct_prob", "false_prob", "diff_prob", "within_auc", "num_correct", "num_false")
HELDOUT_KEYS = {f"heldout_fc/{k}" for k in FC}
GREEDY_KEYS = {"heldout/greedy_acc"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """An SFT-style policy folder (no score_module.pt: the run adds a fresh head)."""
    return save_checkpoint(biased_lm(), TOK, tmp_path_factory.mktemp("init") / "final")


def tiny(init: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"init_from={init}", f"out_dir={out}", "task.module=test_train_loop", "run.max_steps=3",
        "run.prompts_per_step=2", "run.rollouts_per_prompt=4", "run.checkpoint_every=2", "run.eval_every=1",
        "run.greedy_every=2", "data.train_problems=40", "data.heldout_problems=2", "data.heldout_rollouts=4",
        "sampling.max_total_tokens=24", "train_loss.spr_mode=bce", "actor_optim.lr=1e-3", "head_optim.lr=1e-3",
        "progress=false", "tensorboard=false", "num_threads=1", *extra,
    ]


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


# -- config -------------------------------------------------------------------------------------


def test_train_config_composes_with_every_loss_option():
    options = sorted(p.stem for p in (CONFIG_DIR / "train_loss").glob("*.yaml"))
    assert options == ["bce", "grpo_only", "reference", "spr_only"]
    for option in options:
        s = settings(composed([f"train_loss={option}"]))
        assert isinstance(s.loss, JointLossConfig) and isinstance(s.sampling, SamplingConfig)
        assert s.loss.temperature == s.sampling.temperature
    default = settings(composed([]))
    assert default.init_from == "outputs/checkpoints/tiny-arith/final"
    assert default.run.rollouts_per_prompt == 8 and default.loss.backbone_grad_scale == 1e-4
    assert (default.actor_optim.weight_decay, default.head_optim.weight_decay) == (0.01, 0.01)
    assert default.actor_optim.betas == (0.9, 0.999)  # a list in YAML, a tuple in the frozen config
    assert settings(composed(["train_loss=grpo_only"])).loss.spr_coef == 0.0
    assert settings(composed(["train_loss=spr_only"])).loss.grpo_coef == 0.0


@pytest.mark.parametrize("override, message", [
    ("run.prompts_per_step=0", "run.prompts_per_step=0"),
    ("run.old_logprobs=stale", "run.old_logprobs='stale'"),
    ("train_loss.temperature=0.5", "differs from sampling.temperature"),
    # rollouts drawn with a penalty, log-probs (the rollout's and the trainer's) without: off-policy
    ("+sampling.repetition_penalty=1.05", "sampling.repetition_penalty=1.05: GRPO's log-probs are the policy's own"),
    ("sampling.temperature=0.7", "run.old_logprobs=rollout needs"),
    ("head_optim.lr=0", "head_optim.lr=0"),  # OptimizerConfig.lr=0: actor_optim's or head_optim's?
    ("actor_optim.lr=inf", "actor_optim.lr=inf must be a finite number > 0"),  # trained to NaN before
    ("head_optim.weight_decay=inf", "head_optim.weight_decay=inf must be a finite number >= 0"),
    ("data.heldout_problems=0", "data.heldout_problems=0"),
    ("tensorboard=maybe", "tensorboard='maybe' must be true or false"),  # ran, saved, read as bool("maybe")
    ("progress=2", "progress=2 must be true or false"),
    ("sampling.max_total_tokens=0", "sampling.max_total_tokens=0 must be an integer >= 1"),  # no node named before
])
def test_bad_values_are_named(override, message):
    extra = ["run.old_logprobs=rollout"] if override.startswith("sampling.") else []
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        settings(composed([override, *extra]))


def test_a_missing_init_policy_says_how_to_make_it(tmp_path):
    default = tmp_path / "outputs" / "checkpoints" / "tiny-arith" / "final"
    with pytest.raises(FileNotFoundError, match="experiments.train_sft --out outputs/checkpoints/tiny-arith"):
        run_training(composed(tiny(default, tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match="Point init_from= at an existing checkpoint folder") as caught:
        run_training(composed(tiny(tmp_path / "nowhere", tmp_path / "run")))
    assert "train_sft" not in str(caught.value)  # the tiny policy's command only for its folder


def test_the_data_stream_is_a_pure_function_of_seed_and_position():
    first = stream_indices(0, 25, 10, seed=3)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # whole epochs
    assert stream_indices(7, 11, 10, seed=3) == first[7:18]
    assert first[:10] != first[10:20] and stream_indices(0, 10, 10, seed=4) != first[:10]


# -- runs ---------------------------------------------------------------------------------------


def test_three_steps_write_every_metric_checkpoints_and_heldout_rollouts(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run")))
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"step"} | HELDOUT_KEYS | GREEDY_KEYS  # the baseline before any update
    for row in rows[1:]:
        want = STEP_KEYS | HELDOUT_KEYS | (GREEDY_KEYS if row["step"] % 2 == 0 else set())
        assert set(row) == want, row["step"]
    assert any(r["reward/mean"] not in (0.0, 1.0) for r in rows[1:])  # the coin gives mixed groups
    assert all(r["spr/steps"] > 0 and r["grad_norm/head"] > 0 and r["grad_norm/actor"] > 0 for r in rows[1:])
    assert all(r["fc/correct_prob"] is not None and r["fc/false_prob"] is not None for r in rows[1:])
    heldout = [json.loads(line) for line in (out / "heldout_rollouts.jsonl").read_text().splitlines()]
    assert len(heldout) == 2 * 4 and {r["problem_index"] for r in heldout} == {0, 1}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ckpt-2", "last", "reference"]
    state = torch.load(out / "last" / STATE_FILE, weights_only=False)
    assert (state["step"], state["data_position"], state["world_size"], len(state["rng"])) == (3, 6, 1, 1)
    model, _ = ReflectiveModel.from_pretrained(out / "last")  # a loadable reflective folder
    assert model.feature_layer == -2
    sampling = SamplingConfig(max_total_tokens=8)
    policy = TransformersPolicy.from_pretrained(out / "last", sampling, prompt_text, with_step_head=True)
    assert policy.step_head is not None


def test_a_stopped_and_resumed_run_equals_a_straight_one(init_dir, tmp_path):
    straight = run_training(composed(tiny(init_dir, tmp_path / "straight", "run.max_steps=4")))
    parted = tmp_path / "parted"
    run_training(composed(tiny(init_dir, parted, "run.max_steps=2")))
    with open(parted / "metrics.jsonl", "a") as log:  # a kill after logging step 3, before its checkpoint
        log.write(json.dumps({"step": 3, "loss/total": 123.0}) + "\n")
    run_training(composed(tiny(init_dir, parted, "run.max_steps=4")))
    assert untimed(rows_of(parted)) == untimed(rows_of(straight))
    assert [r["step"] for r in rows_of(parted)] == [0, 1, 2, 3, 4]
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(parted / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(init_dir / "model.safetensors")
    assert not all(torch.equal(a[k], init[k]) for k in a)  # it did train
    head_a, head_b = (torch.load(d / "last" / "score_module.pt") for d in (straight, parted))
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    sa, sb = (torch.load(d / "last" / STATE_FILE, weights_only=False) for d in (straight, parted))
    for opt in ("actor_optimizer", "head_optimizer"):
        for key, state in sa[opt]["state"].items():
            assert all(torch.equal(state[n], sb[opt]["state"][key][n]) for n in state), (opt, key)
    assert sa["data_position"] == sb["data_position"] == 8


def test_rollout_logprobs_agree_with_the_training_forward(init_dir, tmp_path):
    # the sampler's log-probs (KV-cached decode, temperature 1) as old log-probs: the first update's
    # ratio must be 1 up to float noise, so nothing is clipped
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=1", "run.old_logprobs=rollout")))
    row = rows_of(out)[1]
    assert abs(row["ppo/approx_kl"]) < 1e-5 and row["ppo/clip_fraction"] == 0.0


def test_several_updates_per_batch_recompute_old_logprobs(init_dir, tmp_path):
    # 2 prompts, 2 mini-batches of one prompt: the second update sees weights the first changed
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=2", "run.mini_batches=2",
                                     "actor_optim.lr=3e-2")))
    rows = rows_of(out)[1:]
    assert all(r["ppo/approx_kl"] != 0.0 for r in rows)  # mean over the updates: the second is off-policy


def test_resuming_with_another_config_is_refused(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=2")))
    with pytest.raises(ValueError, match="run.seed: 0 -> 1"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=3", "run.seed=1")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate(init_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; `--cpu` would start
    ONE process in accelerate 1.x without MPI) with device=cpu: two gloo DDP ranks."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "experiments.train", "device=cpu",
        *tiny(init_dir, out, "run.max_steps=2"), f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [0, 1, 2]  # written once (main process only)
    assert set(rows[2]) == STEP_KEYS | HELDOUT_KEYS | GREEDY_KEYS
    state = torch.load(out / "ckpt-2" / STATE_FILE, weights_only=False)
    # both processes handed in their RNG (and equal weights checksums, else the run fails)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ... their own
    heldout = (out / "heldout_rollouts.jsonl").read_text().splitlines()
    assert len(heldout) == 2 * 4  # one held-out problem generated by each process, gathered
    assert rows[1]["fc/num_correct"] + rows[1]["fc/num_false"] == 2 * 4  # both processes' rollouts


# -- fc metrics and the aha plot ----------------------------------------------------------------


def test_aha_path_scores_and_fc_metrics_in_closed_form():
    # row 0: steps 0.5 and 0.125 -> sqrt(0.0625) = 0.25; row 1: no step -> 0; row 2: 0 clamps to 1e-10
    scores = path_scores(torch.tensor([0.5, 0.125, 0.0]), torch.tensor([0, 0, 2]), 3)
    assert scores.tolist() == pytest.approx([0.25, 0.0, 1e-10])
    # correct 0.9, 0.6 -> 0.75; incorrect 0.2, 0.6 -> 0.4; problem a: 0.9 > 0.2 (1), b: a tie (1/2)
    fc = fc_metrics([0.9, 0.2, 0.6, 0.6], [True, False, True, False], ["a", "a", "b", "b"])
    assert fc["correct_prob"] == pytest.approx(0.75) and fc["false_prob"] == pytest.approx(0.4)
    assert fc["diff_prob"] == pytest.approx(0.35) and fc["within_auc"] == pytest.approx(0.75)
    assert fc_metrics([0.3], [False])["correct_prob"] is None and fc_metrics([0.3], [False])["within_auc"] is None
    assert within_problem_auc([0.1, 0.9], [True, False], ["a", "b"]) is None  # no problem with both outcomes


def test_aha_step_is_where_the_gap_stays_above_the_threshold():
    # the gap crosses 0.1 at step 20, falls back at 30, and stays above from 40 on
    assert aha_step([0, 10, 20, 30, 40, 50], [0.0, 0.05, 0.2, 0.08, 0.15, 0.4]) == 40
    assert aha_step([0, 10], [0.0, 0.1]) is None  # "above" is strict; the last gap decides
    assert aha_step([0, 10], [0.3, 0.3]) == 0
    assert aha_step([0, 10], [0.3, 0.3], threshold=0.5) is None
    nan = float("nan")  # a diverged head's gap: never a split
    assert aha_step([0, 100, 200, 300], [0.0, 0.05, nan, nan]) is None
    assert aha_step([0, 100, 200, 300], [0.2, nan, 0.3, 0.4]) == 200
    with pytest.raises(ValueError, match="2 steps but 1 gaps"):
        aha_step([0, 1], [0.5])
    rows = [{"step": 0, "fc/diff_prob": 0.5, "heldout_fc/diff_prob": 0.0}, {"step": 5, "heldout_fc/diff_prob": 0.2}]
    assert split_step(rows) == (5, "heldout_fc/diff_prob")  # the held-out gap, never the train batch's
    assert split_step([{"step": 3, "fc/diff_prob": 0.5}]) == (3, "fc/diff_prob")


def test_plot_aha_draws_a_runs_metrics(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=2")))
    png = plot_aha(out / "metrics.jsonl", tmp_path / "aha.png")
    assert png.stat().st_size > 10_000
    parser = argparse.ArgumentParser()
    register_aha(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["aha", str(out / "metrics.jsonl"), "--out", str(tmp_path / "cli.png")])
    assert args.run(args) == 0 and (tmp_path / "cli.png").is_file()
    assert plot_aha_main([str(out)]) == 0 and (out / "metrics.aha.png").stat().st_size > 10_000  # RUN_DIR
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert plot_aha_main([str(bad)]) == 2
    assert plot_aha_main([str(tmp_path / "missing.jsonl")]) == 2


def test_grpo_countdown_recipe_is_the_measured_run():
    """recipe=grpo_countdown: the config README's GRPO numbers come from, rollouts and loss at one temperature."""
    cfg = composed(["recipe=grpo_countdown"])
    assert cfg.task.module == "experiments.tasks.countdown" and cfg.train_loss.spr_mode == "bce"
    assert cfg.init_from == "outputs/demo/reflective_countdown/model"
    assert cfg.sampling.temperature == cfg.train_loss.temperature == 0.6
    assert (cfg.run.prompts_per_step, cfg.run.rollouts_per_prompt, cfg.run.max_steps) == (16, 16, 150)
    assert (cfg.actor_optim.lr, cfg.head_optim.lr, cfg.train_loss.kl_coef) == (1e-4, 1e-3, 0.01)
    assert composed([]).task.module == "experiments.tasks.arith"  # no recipe: the defaults


def test_the_step_row_reads_the_rewards_grpo_trains_on():
    """reward/mean and grpo/mixed_groups read the rewards GRPO trains on, where a cut wrong
    rollout's 0.1 is 0 (as the reference's): the groups [0.1, 0, 0, 0] and [0.1, 0.1, 0, 0] have no
    GRPO signal, [1, 0.1, 0, 0] has one."""
    from types import SimpleNamespace

    from experiments.train import step_row

    rewards = [0.1, 0.0, 0.0, 0.0, 0.1, 0.1, 0.0, 0.0, 1.0, 0.1, 0.0, 0.0]
    records = [(i // 4, 0.5, r > 0.5, 10, r == 0.1, r) for i, r in enumerate(rewards)]
    optim = SimpleNamespace(lr_at=lambda step: 1e-5)
    loss = SimpleNamespace(truncated_wrong_reward=0.1)
    trainer = SimpleNamespace(s=SimpleNamespace(actor_optim=optim, head_optim=optim, loss=loss))
    row = step_row(1, [{"losses": {"loss/total": 0.0}, "records": records}], trainer)
    assert row["reward/mean"] == pytest.approx(1 / 12)
    assert row["rollout/correct"] == pytest.approx(1 / 12) and row["reward/pass_at_g"] == pytest.approx(1 / 3)
    assert row["grpo/mixed_groups"] == pytest.approx(1 / 3)  # the group with a correct rollout alone


def test_the_step_rows_aha_metrics_read_the_rollouts_the_spr_loss_trains_on():
    """fc/false_prob averages the wrong rollouts of reward 0, as the reference's (reward == 0):
    the cut wrong ones (0.1), whose steps the SPR loss leaves out, diluted it (0.6 for 0.2);
    with truncated_wrong_reward 0 none is left out."""
    from types import SimpleNamespace

    from experiments.train import step_row

    rows = [(1.0, 0.9), (0.0, 0.2), (0.1, 0.8), (0.1, 0.8)]
    records = [(0, score, reward > 0.5, 10, reward == 0.1, reward) for reward, score in rows]
    optim = SimpleNamespace(lr_at=lambda step: 1e-5)
    for cut_reward, false_prob, num_false in ((0.1, 0.2, 1), (0.0, 0.6, 3)):
        settings = SimpleNamespace(actor_optim=optim, head_optim=optim, loss=SimpleNamespace(truncated_wrong_reward=cut_reward))
        row = step_row(1, [{"losses": {"loss/total": 0.0}, "records": records}], SimpleNamespace(s=settings))
        assert row["fc/correct_prob"] == pytest.approx(0.9) and row["fc/false_prob"] == pytest.approx(false_prob)
        assert row["fc/num_false"] == num_false and row["rollout/correct"] == pytest.approx(1 / 4)


def test_the_task_nodes_search_settings_are_refused_on_the_command_line(capsys):
    # task.split=bogus task.count=-5 trained normally and saved them; a resume over task.count=7 was refused
    from experiments.train import RESUMABLE_KEYS, check_unused_task_keys

    check_unused_task_keys(["task=countdown", "data.seed=1", "data.train_problems=500"])
    for arg, instead in (("task.count=500", "data.train_problems / data.heldout_problems"), ("+task.seed=3", "data.seed")):
        with pytest.raises(SystemExit) as exit_info:
            check_unused_task_keys([arg])
        key = arg.lstrip("+").split("=")[0]
        assert exit_info.value.code == 2 and capsys.readouterr().err == (
            f"error: {key} is a search setting that experiments.train does not read (it draws its problems by `data`): "
            f"set {instead} instead\n")
    assert {"task.split", "task.count", "task.seed"} <= set(RESUMABLE_KEYS)  # runs saved with them still resume


def test_tokens_per_s_leaves_the_held_out_evaluation_out(init_dir, tmp_path, monkeypatch):
    # time/tokens_per_s divided by the whole step: a step with a held-out evaluation (every
    # run.eval_every) read 4x slower (148 vs 690 tokens/s) though its rollouts ran as fast
    import time

    import experiments.train as train_module

    evaluations = train_module.evaluations
    monkeypatch.setattr(train_module, "evaluations", lambda t, step: time.sleep(0.5) or evaluations(t, step))
    rows = rows_of(run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=1"))))
    row = rows[-1]
    assert row["time/eval_s"] >= 0.5 and row["time/step_s"] >= row["time/eval_s"] + row["time/rollout_s"]
    generated = row["rollout/length"] * 2 * 4  # run.prompts_per_step x run.rollouts_per_prompt
    assert row["time/tokens_per_s"] == pytest.approx(generated / (row["time/step_s"] - row["time/eval_s"]), rel=1e-3)


def test_a_fresh_start_clears_the_tensorboard_log_of_its_stopped_start(init_dir, tmp_path):
    # a run killed before its first checkpoint starts over from step 0: its TensorBoard log kept
    # the first start's step 0 beside the new one (two points at step 0 per curve)
    out = tmp_path / "run"
    run_training(composed(tiny(init_dir, out, "run.max_steps=1", "run.checkpoint_every=0")))
    for name in ("last", "reference"):
        shutil.rmtree(out / name)  # as a kill before the first checkpoint leaves it
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"step 0")
    run_training(composed(tiny(init_dir, out, "run.max_steps=1", "run.checkpoint_every=0")))
    assert not (out / "tensorboard").exists()  # tensorboard=false here: nothing written again
    assert [row["step"] for row in rows_of(out)] == [0, 1]


def test_held_out_rollouts_of_one_outcome_are_noted(init_dir, tmp_path, capsys):
    # every held-out rollout wrong (or right): the aha curve is undefined for the whole run, in silence
    assert one_outcome_note([True, False], 1, 2) is None
    assert one_outcome_note([False] * 4, 1, 4) == (
        "note: all 4 held-out rollouts are wrong: the held-out gap heldout_fc/diff_prob (the aha curve) is undefined "
        "for this run; raise data.heldout_problems=1 or data.heldout_rollouts=4 for rollouts of both outcomes")
    assert one_outcome_note([True] * 2, 2, 1).startswith("note: all 2 held-out rollouts are right")
    run_training(composed(tiny(init_dir, tmp_path / "one", "run.max_steps=1", "data.heldout_problems=1",
                               "data.heldout_rollouts=1")))
    assert "note: all 1 held-out rollouts are" in capsys.readouterr().err
    run_training(composed(tiny(init_dir, tmp_path / "mixed", "run.max_steps=1")))
    assert "held-out rollouts are" not in capsys.readouterr().err
