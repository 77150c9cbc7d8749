"""Settings of the wrong type, as a user types them on the command line: each is a ValueError
naming the key before anything loads, not a TypeError traceback, and never a YAML "no" read as
true (train_loss.*, policy.prefix_cache / with_step_head, scorer.seed). The prefix cache's
spellings that mean something (false, .enabled=false, .max_bytes=N) work.

    .venv/bin/pytest tests/test_setting_types.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.search import CONFIG_DIR, run_search_experiment
from experiments.train import CONFIG_DIR as TRAIN_CONFIG_DIR
from experiments.train import settings
from tiny_checkpoint import save_tiny_checkpoint

SMALL_SEARCH = ["task.count=1", "chunk=1", "budget=2", "policy.sampling.max_total_tokens=8",
                "policy.sampling.max_step_tokens=4", "progress=false"]


def train_config(overrides: list[str]):
    with initialize_config_dir(str(TRAIN_CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def search_config(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


@pytest.mark.parametrize("override, message", [
    ("train_loss.kl_coef=abc", "train_loss.kl_coef='abc' must be a finite number >= 0"),
    ("train_loss.entropy_coef=abc", "train_loss.entropy_coef='abc' must be a finite number >= 0"),
    ("train_loss.grpo_coef=abc", "train_loss.grpo_coef='abc' must be a finite number >= 0"),
    ("train_loss.grpo_coef=inf", "train_loss.grpo_coef=inf must be a finite number >= 0"),
    ("train_loss.spr_coef=nan", "train_loss.spr_coef=nan must be a finite number >= 0"),
    ("train_loss.clip_ratio=abc", "train_loss.clip_ratio='abc' must be a number in (0, 1)"),
    ("train_loss.truncated_wrong_reward=abc", "train_loss.truncated_wrong_reward='abc' must be >= 0 and < 0.5"),
    ("train_loss.backbone_grad_scale=abc", "train_loss.backbone_grad_scale='abc' must be in [0, 1]"),
    ("train_loss.bf16=no", "train_loss.bf16='no' must be true or false"),
    ("train_loss.shared_prompt=no", "train_loss.shared_prompt='no' must be true or false"),
    ("train_loss.ref_bf16=1", "train_loss.ref_bf16=1 must be true or false (or null)"),
])
def test_a_training_loss_setting_of_the_wrong_type_is_named(override, message):
    with pytest.raises(ValueError) as caught:
        settings(train_config([override]))
    assert str(caught.value).startswith(message)


def test_the_reference_bf16_switch_takes_null():
    assert settings(train_config(["train_loss.ref_bf16=null"])).loss.ref_bf16 is None


@pytest.mark.parametrize("override, message", [
    ("+policy.with_step_head=no", "TransformersPolicy.with_step_head='no' must be true or false"),
    ("+policy.shared_prefix=no", "TransformersPolicy.shared_prefix='no' must be true or false (or null)"),
    ("+policy.forked=1", "TransformersPolicy.forked=1 must be true or false"),
    ("+policy.prefix_cache=no", "prefix_cache='no': give true / false, null, or its settings"),
    ("+policy.prefix_cache.max_byte=100", "prefix_cache.max_byte is not a setting of the prefix cache"),
])
def test_a_policy_switch_of_the_wrong_type_is_named_before_the_model_loads(ckpt, tmp_path, monkeypatch, override, message):
    from policies import transformers_policy

    monkeypatch.setattr(transformers_policy, "load_checkpoint", lambda *a: pytest.fail("the model was loaded"))
    cfg = search_config(["policy=tiny", f"policy.path={ckpt}", override, f"out_dir={tmp_path / 'run'}", *SMALL_SEARCH])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_search_experiment(cfg)


def test_the_ways_to_write_the_prefix_cache_setting_run(ckpt, tmp_path):
    # each was a TypeError traceback after the model had loaded
    chosen = {}
    for name, override in (("off", "+policy.prefix_cache=false"), ("disabled", "+policy.prefix_cache.enabled=false"),
                           ("budget", "+policy.prefix_cache.max_bytes=100000000"), ("default", None)):
        out = tmp_path / name
        run_search_experiment(search_config(["policy=tiny", f"policy.path={ckpt}", f"out_dir={out}", *SMALL_SEARCH,
                                             *([override] if override else [])]))
        (row,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        chosen[name] = row["chosen"]
    assert len({json.dumps(c, sort_keys=True) for c in chosen.values()}) == 1  # a cache never changes a sample


@pytest.mark.parametrize("seed", ["true", "1.5"])
def test_the_random_scorers_seed_is_an_integer(ckpt, tmp_path, seed):
    # hashed as text: seed 1.0 scored unlike seed 1, and true was taken
    cfg = search_config(["policy=tiny", f"policy.path={ckpt}", "scorer=random", f"scorer.seed={seed}",
                         f"out_dir={tmp_path / 'run'}", *SMALL_SEARCH])
    with pytest.raises(ValueError, match=r"RandomScorer.seed=.* must be an integer"):
        run_search_experiment(cfg)


def test_a_nucleus_below_1_is_refused_with_grpo_and_taken_without():
    # the rollouts were drawn from the nucleus, the loss read the whole softmax: off-policy in silence
    with pytest.raises(ValueError, match=r"sampling.top_p=0.5: GRPO's log-probs are the policy's whole softmax"):
        settings(train_config(["sampling.top_p=0.5"]))
    assert settings(train_config(["sampling.top_p=0.5", "train_loss=spr_only"])).sampling.top_p == 0.5
