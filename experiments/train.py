"""`python -m experiments.train`: joint GRPO + SPR training of the reflective model (the policy and
its SPRM head on ONE backbone, as MetaStone-S1 / XBai-o4 train it), resumable, on one process or
several (accelerate, DDP).

    python -m experiments.train                                  # from outputs/checkpoints/tiny-arith/final
    python -m experiments.train run.max_steps=50 out_dir=runs/joint num_threads=1
    python -m experiments.train train_loss=grpo_only             # ablations: grpo_only | spr_only | bce
    accelerate launch --multi_gpu --num_processes 2 -m experiments.train device=cpu num_threads=1 out_dir=runs/ddp
    python -m experiments.plot_aha runs/joint/metrics.jsonl      # the "aha" curves

(On a CPU machine `--multi_gpu` is what makes accelerate start the processes, through torchrun;
`accelerate launch --cpu --num_processes 2` starts only ONE process unless MPI is set up.
`device=cpu` then makes each process a gloo DDP rank.)

One step, per process (its own share of the step's prompts):
  1. rollouts: G samples per prompt from the current policy (`TransformersPolicy.from_reflective`:
     the head's path score comes attached, no extra forward), graded 1/0 by the task;
  2. one train-mode forward of `JointForward` over prompt + completion: token logits and the
     head's logits at the step positions; reference log-probs from the frozen initial policy;
  3. loss = GRPO + SPR (`policies.joint_step`), one backward per PPO mini-batch (run.mini_batches),
     or run.micro_batches accumulated ones, each over its part of the mini-batch's prompts;
  4. two AdamW optimisers (actor = backbone + LM head, and the SPRM head), each clipped, a step
     per mini-batch;
  5. every checkpoint_every steps: out_dir/ckpt-<step> and out_dir/last (`policies.train_state`);
  6. a metrics.jsonl row (main process): fc/* on the batch (the path scores attached at
     generation: the head before this step's update, without dropout), heldout_fc/* on a fixed
     held-out set of rollouts re-scored by the current head every eval_every steps (and at step
     0), heldout/greedy_acc every greedy_every steps, losses, the agreement filter's kept share,
     grad norms, rewards, tokens/s (`experiments.aha_metrics`); optional TensorBoard (when the
     `tensorboard` package is importable).
Rerunning the same command resumes from out_dir/last: same weights and the same metric rows
(time/* aside) as a run that was never stopped. When last/ is missing, incomplete or damaged (a
missing or truncated file) it resumes from the newest complete ckpt-<K> instead, printing one line
that says which and why, and metrics.jsonl is cut back to step K; a folder with checkpoints of
which none is complete, or without its config.yaml, is refused (nothing is deleted). A rerun may
change RESUMABLE_KEYS (the budget, checkpointing, threads, device, ...): one stderr line names each
change, saved -> current (num_threads and device change the weights by float rounding). A Ctrl-C
before the run's first checkpoint says that nothing was saved to resume from.
Checked before anything loads: device= (cpu, cuda, cuda:N: one torch cannot see is refused; auto:
accelerate picks), and the configs (`settings`: e.g. run.rollouts_per_prompt >= 2 while the loss
has a GRPO term). Randomness is explicit: the data order is a pure
function of (seed, position), rollout seeds and the head's dropout seed of (seed, step, rank).

`run_training(cfg) -> Path` is the plain function (tests call it with `hydra.compose`); `main` is
the thin `@hydra.main` around it. Tests: `.venv/bin/pytest tests/test_train_loop.py`.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: set before torch loads

from experiments.startup_interrupt import quiet_start  # noqa: E402

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from itertools import compress  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import hydra  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list, gather_object  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.aha_metrics import fc_metrics, path_scores, prefixed  # noqa: E402
from experiments.record_log import append_rows, encode_rows, load_rows  # noqa: E402
from experiments.result_json import write_atomic  # noqa: E402
from experiments.checkpoint_hints import checkpoint_hint, trained_task_note  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import check_seed  # noqa: E402
from experiments.data_order import derived_seed, stream_indices  # noqa: E402
from experiments.cli_errors import (  # noqa: E402
    check_no_chdir, hydra_rerun_hint, interrupt_reported, note_hydra_job, noted_sweep_dir,
)
from experiments.group_options import check_group_options, check_launcher_commands  # noqa: E402
from experiments.launcher_watch import launcher_watched  # noqa: E402
from experiments.model_folder_target import check_not_model_folder  # noqa: E402
from experiments.out_dir_args import check_out_dir_argument  # noqa: E402
from experiments.tasks.benchmark_split import TAKE_ALL_HINT  # noqa: E402
from experiments.tasks.chat_prompt import ChatPrompt, task_prompt_fn  # noqa: E402
from experiments.override_keys import check_override_keys, check_plain_keys, check_refused_keys  # noqa: E402
from experiments.search import (  # noqa: E402
    CONFIG_DIR, TASK_KEYS, build_frozen, check_int, check_switches, resolve_out_dir, resolved_config, run_lock,
    user_errors_reported,
)
from experiments.sweep_metrics import read_run_config  # noqa: E402
from policies.bf16_support import native_bf16  # noqa: E402
from policies.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint  # noqa: E402
from policies.step_boundary import StopRequest, stop_at_step_boundary  # noqa: E402
from policies.devices import resolve_device  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from policies.joint_step import (  # noqa: E402
    JointForward, JointLossConfig, frozen_logprobs, grpo_rewards, joint_step, spr_labelled,
)
from policies.reflective_model import ReflectiveModel  # noqa: E402
from policies.rollout_batch import (  # noqa: E402
    Rollout, RolloutBatch, RolloutSource, TransformersRolloutSource, answer_written, collate_rollouts,
    outcome_reward,
)
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.train_state import (  # noqa: E402
    STATE_FILE, JointTrainState, ResumePoint, capture_rng, checkpoint_folders, load_policy_with_head,
    publish_checkpoint, restore_rng, resume_point,
)
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from scorers.sprm_positions import StepMarkers  # noqa: E402
from treesearch.config_checks import check_positive, is_finite_number  # noqa: E402
from treesearch.config_diff import config_differences, resume_overrides, with_added_settings  # noqa: E402
from treesearch.records import Problem  # noqa: E402

METRICS, HELDOUT, CONFIG, REFERENCE = "metrics.jsonl", "heldout_rollouts.jsonl", "config.yaml", "reference"
TENSORBOARD = "tensorboard"
# what other commands' runs hold (a search's rows; SFT's and train_head's saved model, SFT's
# summary): a fresh training run never starts over them
FOREIGN_RUN_FILES: tuple[str, ...] = ("records.jsonl", "final", "sft_summary.json", "metrics.json", "last/trainer_state.pt")
# result-relevant settings added after runs were saved: a config.yaml without one ran with this
# value (`treesearch.config_diff.with_added_settings`), so the run still resumes
ADDED_SETTINGS: dict[str, Any] = {
    "train_loss.ref_bf16": False,  # 2026-12-01: the KL reference ran in float32 before
    "train_loss.shared_prompt": False,  # 2026-12-03 presets: every rollout forwarded its prompt before
    "train_loss.truncated_wrong_reward": 0.0,  # 2026-12-05: a cut wrong rollout was an ordinary wrong one
    "prompt": "plain",  # 2026-12-06: the task's own prompt_text before
    "sampling.separator_match": "suffix",  # 2026-12-07: every token ending with the separator before
    "run.micro_batches": 1,  # 2026-12-07: each mini-batch was one forward and backward before
}
# the task node's search settings, which training never reads (it draws its problems by `data`)
UNUSED_TASK_KEYS: dict[str, str] = {"task.split": "data.train_problems / data.heldout_problems",
                                    "task.count": "data.train_problems / data.heldout_problems", "task.seed": "data.seed"}
# keys a resume may change, each named on stderr when it does (`resume_changes`): where the run
# is and how it shows, how long it trains and how often it saves, and settings training never
# reads change nothing it computes; num_threads and device change it up to float rounding
# (another thread count or device sums in another order: the tiny policy resumed at step 3 with
# num_threads=2 ended a few steps later up to 6e-8 from an unbroken run's weights), device also
# the random draws when it moves to another kind (a cuda torch.Generator's stream is not the
# CPU's: other rollouts are sampled)
RESUMABLE_KEYS: tuple[str, ...] = (
    "out_dir", "device", "num_threads", "progress", "tensorboard", "run.max_steps", "run.max_minutes",
    "run.checkpoint_every", "run.keep_checkpoints", *UNUSED_TASK_KEYS,
    "sampling.max_step_tokens",  # read by no rollout (they run to the end): a change blocked the resume for nothing
)
# the RESUMABLE_KEYS whose change makes the resumed run's weights differ from an unbroken run's
INEXACT_KEYS: tuple[str, ...] = ("device", "num_threads")
# the settings of the nodes no class is built from: `+num_thread=2` composed and was never read
PLAIN_NODE_KEYS: dict[str, tuple[str, ...]] = {
    "": ("task", "train_loss", "init_from", "out_dir", "device", "num_threads", "progress", "tensorboard", "run",
         "data", "sampling", "actor_optim", "head_optim", "prompt"),
    "task": TASK_KEYS,
}
OLD_LOGPROBS: tuple[str, ...] = ("recompute", "rollout")
# `prompt=`: plain (the task's prompt_text, as policy=tiny / tiny_sprm search it) or chat (a
# benchmark question through init_from's chat template, as the chat presets policy=smollm2,
# xbai_o4, ... search it: `experiments.tasks.chat_prompt.ChatPrompt`)
PROMPTS: tuple[str, ...] = ("plain", "chat")
# `device=`: cpu, cuda, cuda:N (checked by policies.devices.resolve_device), or auto (accelerate's pick)
AUTO_DEVICE = "auto"


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """The loop.

    max_steps: optimizer steps (rollout batches) to reach; max_minutes: also stop after the step
        that crosses this wall time (None: no limit).
    prompts_per_step: prompts per step over all processes (split evenly between them).
    rollouts_per_prompt: G, the GRPO group (8 in the reference).
    mini_batches: optimizer steps per rollout batch, each over whole prompts (1: on-policy, the
        PPO ratio is 1 and the clip never binds; verl's ppo_mini_batch_size < batch gives > 1).
    micro_batches: gradient accumulation inside each mini-batch (verl's ppo_micro_batch_size):
        its prompt groups (per process) split into this many parts, each its own forward and
        backward of `joint_step`'s loss / micro_batches, then one clip and optimizer step. The
        SPR class weights and the GRPO token mean are then per part, averaged (the reference's
        loss when its micro-batch holds the same prompts); peak activation memory falls with the
        part. 1: the whole mini-batch in one forward. Must divide the groups of a mini-batch.
    old_logprobs: "recompute" (verl: the current weights before the update; free when
        mini_batches is 1) or "rollout" (the sampler's own log-probs, needs temperature 1).
    checkpoint_every: K, steps between out_dir/ckpt-<step> checkpoints (0: only out_dir/last at
        the end); keep_checkpoints: newest ckpt-* kept (0: all).
    eval_every: held-out fc metrics every N steps (0: off); greedy_every: greedy held-out
        accuracy every N steps (0: off). Both also at step 0 (before any update).
    eval_batch_size: sequences per forward when re-scoring the held-out rollouts.
    seed: data order, rollout seeds, dropout seeds. head_seed: a fresh head's initialisation.
    feature_layer: the hidden layer a fresh head reads (-2 as the reference); an init_from with a
        head must name its sprm.json's layer (from either end), or None to follow it.
    """

    max_steps: int = 200
    max_minutes: float | None = None
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 8
    mini_batches: int = 1
    micro_batches: int = 1
    old_logprobs: str = "recompute"
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    eval_every: int = 5
    greedy_every: int = 10
    eval_batch_size: int = 64
    seed: int = 0
    head_seed: int = 0
    feature_layer: int | None = -2

    def __post_init__(self) -> None:
        # by type first: "abc" was a TypeError traceback, 2.0 failed mid-run, 1.5 steps ran as 2
        for name in ("max_steps", "prompts_per_step", "rollouts_per_prompt", "mini_batches", "micro_batches",
                     "eval_batch_size"):
            check_int(f"RunConfig.{name}", getattr(self, name), minimum=1)
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "greedy_every"):
            check_int(f"RunConfig.{name}", getattr(self, name), minimum=0)
        check_int("RunConfig.seed", self.seed)
        if self.feature_layer is not None:
            check_int("RunConfig.feature_layer", self.feature_layer)
        if self.max_minutes is not None and not (is_finite_number(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"RunConfig.max_minutes={self.max_minutes!r} must be a finite number > 0 (or null)")
        check_seed("run.head_seed", self.head_seed)  # torch.manual_seed's; run.seed only feeds derived_seed's hash
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"RunConfig.old_logprobs={self.old_logprobs!r}; valid: {', '.join(OLD_LOGPROBS)}")


@dataclass(frozen=True)
class DataConfig:
    """train_problems: size of the training pool (the task's train split, drawn in shuffled
    epochs); heldout_problems x heldout_rollouts: the fixed held-out rollouts (test split), made
    once by the initial policy; seed: problem generation seed."""

    train_problems: int = 20_000
    heldout_problems: int = 32
    heldout_rollouts: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_problems", "heldout_problems", "heldout_rollouts"):
            check_int(f"DataConfig.{name}", getattr(self, name), minimum=1)
        check_int("DataConfig.seed", self.seed)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW of one parameter set: lr, weight_decay (on every parameter, as verl), betas, eps;
    grad_clip: max gradient norm of this set (0: measured, not clipped); warmup_steps: linear
    warmup, constant after."""

    lr: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_positive("OptimizerConfig", "lr", self.lr)  # "1e-5x" was a TypeError traceback
        betas = self.betas
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not (pair and all(is_finite_number(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"OptimizerConfig.betas={betas!r} must be two values in [0, 1)")
        for name in ("weight_decay", "grad_clip", "eps"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):
                raise ValueError(f"OptimizerConfig.{name}={value!r} must be a finite number >= 0")
        check_int("OptimizerConfig.warmup_steps", self.warmup_steps, minimum=0)  # 1.5 ran as a fraction

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr

    def build(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Settings:
    """Every validated component config of one run (built from the Hydra config by `settings`)."""

    init_from: str
    run: RunConfig
    data: DataConfig
    loss: JointLossConfig
    sampling: SamplingConfig
    actor_optim: OptimizerConfig
    head_optim: OptimizerConfig
    task_module: str
    task_config: Any
    prompt: str = "plain"


def settings(cfg: DictConfig) -> Settings:
    """Build and cross-check the component configs; errors name the bad value."""
    check_plain_keys(cfg, PLAIN_NODE_KEYS, "experiments.train")
    s = Settings(
        init_from=str(cfg.init_from), run=built_node(cfg, "run"), data=built_node(cfg, "data"),
        loss=built_node(cfg, "train_loss"), sampling=built_node(cfg, "sampling"),
        actor_optim=built_node(cfg, "actor_optim"), head_optim=built_node(cfg, "head_optim"),
        task_module=str(cfg.task.module), task_config=built_node(cfg, "task.config"), prompt=str(cfg.get("prompt", "plain")),
    )
    check_prompt(s.prompt, s.task_module)
    if cfg.get("num_threads") is not None:  # 0 was skipped in silence, -1 a torch traceback
        check_int("num_threads", cfg.num_threads, minimum=1, or_else=", or null for torch's default")
    check_switches(cfg, ("progress", "tensorboard"))
    if s.sampling.temperature != s.loss.temperature:
        raise ValueError(
            f"train_loss.temperature={s.loss.temperature} differs from sampling.temperature="
            f"{s.sampling.temperature}: the policy's log-probs must be those of the distribution that sampled"
        )
    if s.sampling.repetition_penalty != 1.0 and s.loss.grpo_coef > 0:
        raise ValueError(
            f"sampling.repetition_penalty={s.sampling.repetition_penalty}: GRPO's log-probs are the policy's own, "
            f"without the penalty, so rollouts drawn with it would train off-policy; use 1.0, or "
            f"train_loss.grpo_coef=0 (train_loss=spr_only)"
        )
    if s.sampling.top_p != 1.0 and s.loss.grpo_coef > 0:
        raise ValueError(
            f"sampling.top_p={s.sampling.top_p}: GRPO's log-probs are the policy's whole softmax, not the nucleus "
            f"the rollouts were drawn from, so they would train off-policy (verl's rollouts keep top_p 1); use 1.0, "
            f"or train_loss.grpo_coef=0 (train_loss=spr_only)"
        )
    if s.run.rollouts_per_prompt < 2 and s.loss.grpo_coef > 0:
        raise ValueError(
            f"run.rollouts_per_prompt={s.run.rollouts_per_prompt}: a GRPO group of one rollout has no baseline "
            f"(its advantage is its raw reward: an update without a baseline, not GRPO); use >= 2, or train_loss.grpo_coef=0 "
            f"(train_loss=spr_only)"
        )
    if s.run.old_logprobs == "rollout" and s.sampling.temperature != 1.0:
        raise ValueError(
            f"run.old_logprobs=rollout needs sampling.temperature=1.0 (the sampler reports temperature-1 "
            f"log-probs), got {s.sampling.temperature}; use run.old_logprobs=recompute"
        )
    return s


# "OptimizerConfig." of "OptimizerConfig.lr=0 must be ...", or the start of "max_total_tokens=0 must be ..."
_CLASS_PREFIX = re.compile(r"^(?:[A-Z]\w*\.)?(?=\w+=)")


def built_node(cfg: DictConfig, key: str) -> Any:
    """`build_frozen` of the config node at `key`; a bad value's error names the key as typed
    (`head_optim.lr=0 must be ...`, not `OptimizerConfig.lr=0`, which actor_optim shares;
    `sampling.max_total_tokens=0`, not `max_total_tokens=0`; another message: `sampling: ...`)."""
    try:
        return build_frozen(OmegaConf.select(cfg, key))
    except ValueError as err:
        message = str(err)
        if message.startswith(f"{key}."):  # named already ("run.bogus is not a setting of RunConfig")
            raise
        named = _CLASS_PREFIX.sub(f"{key}.", message, count=1)
        raise ValueError(named if named != message else f"{key}: {message}") from err


def check_prompt(prompt: str, task_module: str) -> None:
    """prompt= is one of PROMPTS; chat only for a task whose prompt_text takes a tokenizer (a
    benchmark: the embedded tasks write their own prompt). ValueError naming the value."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r}; valid: {', '.join(PROMPTS)}")
    if prompt == "chat":
        try:
            task_prompt_fn(task_module)
        except ValueError:
            raise ValueError(f"prompt=chat: task {task_module} writes its own prompt (no chat template applies); "
                             "use prompt=plain") from None


def prompt_function(s: Settings, task: Any) -> Callable[[Problem], str]:
    """The rollouts' prompt (`prompt=`): the task's prompt_text, or ChatPrompt over init_from's template."""
    return task.prompt_text if s.prompt == "plain" else ChatPrompt(s.init_from, s.task_module)


def train_device(device: Any) -> torch.device | None:
    """The device of `device=`: "cpu", "cuda" or "cuda:N" once torch can use it here (else a
    ValueError naming it, `policies.devices.resolve_device`), or None for "auto" (accelerate picks:
    a GPU when there is one)."""
    if str(device) == AUTO_DEVICE:
        return None
    try:
        return resolve_device(str(device))
    except ValueError as error:
        raise ValueError(f"{error} (the trainer's device= takes cpu, cuda, cuda:N or {AUTO_DEVICE})") from None


def make_accelerator(device: torch.device | None) -> Accelerator:
    """The Accelerator on `device` (None: accelerate's choice). cuda:N becomes the current CUDA
    device first (a single process puts its model there); several processes each take their
    local GPU, so they refuse an index. RuntimeError if accelerate ended up elsewhere."""
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    accelerator = Accelerator(cpu=device is not None and device.type == "cpu")
    if device is not None and device.index is not None and accelerator.num_processes > 1:
        raise ValueError(f"device={device} with {accelerator.num_processes} processes: pass device=cuda (each process "
                         "takes its local GPU)")
    if device is not None and accelerator.device.type != device.type:
        raise RuntimeError(f"device={device} asked, but accelerate placed the run on {accelerator.device}")
    return accelerator


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything one process holds during a run (mutable: step, data_position, elapsed_s)."""

    s: Settings
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module  # the prepared JointForward (DDP-wrapped with several processes)
    reflective: ReflectiveModel
    tokenizer: Any
    ref_lm: Any | None
    actor_opt: Any
    head_opt: Any
    source: RolloutSource
    greedy: RolloutSource  # the same policy at temperature 0
    markers: StepMarkers
    task: Any
    train_problems: list[Problem]
    heldout_problems: list[Problem]
    heldout: list[tuple[int, Rollout, bool]]  # (problem index, rollout, correct)
    pad_id: int = 0  # the policy's pad id (EOS when the tokenizer has none)
    step: int = 0
    data_position: int = 0
    elapsed_s: float = 0.0

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def load_start(s: Settings, out: Path, world: int) -> tuple[ReflectiveModel, Any, ResumePoint | None]:
    """(model, tokenizer, resume point) from out_dir's newest complete checkpoint
    (`policies.train_state.resume_point`), or the init policy and None on a fresh start."""
    point = resume_point(out)
    if point is None:
        try:
            reflective, tokenizer = load_policy_with_head(s.init_from, s.run.head_seed, s.run.feature_layer)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"init_from: {err}. {checkpoint_hint(s.init_from, err, 'init_from')}") from err
        return reflective, tokenizer, None
    if point.state.world_size != world:
        raise ValueError(
            f"{point.directory} was trained by {point.state.world_size} processes; resume it with as many, not {world}"
        )
    return point.reflective, point.tokenizer, point


def resume_message(point: ResumePoint) -> str:
    """The one line a resume from an older checkpoint prints: which one, and why not the newer ones."""
    return f"resuming from {point.directory} (step {point.state.step}): {'; '.join(point.passed_over)}"


def reference_lm(trainer_out: Path, reflective: ReflectiveModel, tokenizer: Any, fresh: bool, main: bool, s: Settings):
    """The frozen initial policy: a copy of the starting LM on a fresh start (the main process
    saves it to out_dir/reference), loaded from there on resume; None when kl_coef is 0."""
    if fresh and main:
        save_checkpoint(reflective.lm, tokenizer, trainer_out / REFERENCE)
    if s.loss.kl_coef == 0:
        return None
    if not fresh and not (trainer_out / REFERENCE).is_dir():  # "checkpoint folder .../reference does not exist"
        raise FileNotFoundError(
            f"{trainer_out / REFERENCE} is missing: it holds the KL reference, the policy this run started from "
            f"(saved at its start); restore it, e.g. with a copy of the model folder init_from={s.init_from} names")
    lm = copy.deepcopy(reflective.lm) if fresh else load_checkpoint(trainer_out / REFERENCE)[0]
    return lm.eval().requires_grad_(False)


def claim_out_dir(
    out: Path, config: dict[str, Any], resuming: bool, main: bool, held: contextlib.ExitStack | None = None,
) -> list[str]:
    """Resuming: refuse a config that differs in a result-relevant key; return the RESUMABLE_KEYS
    it changes ('key: saved -> current'). Fresh: reset the run files of this config's own start
    that stopped before its first checkpoint; refuse a folder holding another run
    (`check_fresh_out_dir`); return []. held: the main process takes the folder's lock into it
    once the checks pass (a refused folder gets no .lock), before anything is written."""
    changed = check_resume_config(out, config) if resuming else []
    if not resuming:
        check_fresh_out_dir(out, config)
    if held is not None and main:
        held.enter_context(run_lock(out))
    if main and not resuming:
        out.mkdir(parents=True, exist_ok=True)
        note_starting_over(out)
        for name in (METRICS, HELDOUT):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD, ignore_errors=True)  # its step 0 was logged twice after such a stop
        write_atomic(out / CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)))
    return changed


def note_starting_over(out: Path) -> None:
    """One stderr line when a fresh start resets metric rows a run left without any checkpoint (it
    was killed before its first, or its last/ was deleted): the rows are dropped and step 0 runs
    again, which it did in silence."""
    path = out / METRICS
    steps = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0
    if steps:
        print(f"note: {out} holds {steps} metric row(s) of this config but no checkpoint to resume from (killed "
              f"before its first, or last/ removed): starting over at step 0, its {METRICS} rewritten",
              file=sys.stderr, flush=True)


def check_resume_config(out: Path, config: dict[str, Any]) -> list[str]:
    """ValueError when the run being resumed in out ran another config (RESUMABLE_KEYS may differ),
    saying which overrides resume it as it ran; FileNotFoundError when its config.yaml is gone.
    Returns the RESUMABLE_KEYS that differ, 'key: saved -> current' (`resume_changes`)."""
    path = out / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {out} holds checkpoints of a run whose config is gone, so a resume cannot be "
            "checked against it; restore config.yaml, or pass another out_dir= to start a new run"
        )
    saved = saved_run_config(out, config)
    diffs = config_differences(saved, config, RESUMABLE_KEYS)  # type: ignore[arg-type]
    if diffs:
        overrides = resume_overrides(saved, config, RESUMABLE_KEYS)  # type: ignore[arg-type]
        resume = f", or add `{' '.join(overrides)}` to resume it as it ran" if overrides else ""
        raise ValueError(f"{out} holds a run of another config ({'; '.join(diffs)}); use another out_dir{resume}")
    return config_differences(saved, config)  # type: ignore[arg-type]  # RESUMABLE_KEYS alone, by now


def resume_changes(changed: Sequence[str]) -> str:
    """The one stderr line a resume that changes RESUMABLE_KEYS prints (as train_sft's "changed on
    resume"): each key, saved -> current, and whether the weights now part from an unbroken run's."""
    line = f"changed on resume: {'; '.join(changed)}"
    inexact = [key for key in INEXACT_KEYS if any(change.startswith(f"{key}: ") for change in changed)]
    if "num_threads" in inexact:
        line += "; another num_threads sums in another order: the weights differ from an unbroken run's by float rounding"
    if "device" in inexact:
        line += ("; another device computes in another order, and another kind of device (cpu / cuda) draws other "
                 "rollouts: the run goes on as another run would")
    return line


def saved_run_config(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """out's config.yaml as the run ran, to compare with `config` (this start's, with its KL
    reference precision pinned, `pinned_reference_precision`): settings added since it was saved
    read as they ran then (ADDED_SETTINGS), and a `train_loss.ref_bf16: null` saved before the
    precision was pinned reads as this start's (the run resolved it per machine then)."""
    saved = with_added_settings(read_run_config(out), config, ADDED_SETTINGS)
    loss, current = saved.get("train_loss"), config.get("train_loss")
    if isinstance(loss, dict) and isinstance(current, dict) and "ref_bf16" in loss and loss["ref_bf16"] is None:
        loss["ref_bf16"] = current.get("ref_bf16")
    return saved


def pinned_reference_precision(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """config with `train_loss.ref_bf16: null` (bf16 where `device` has bf16 matmuls) replaced by
    what it means on `device` when the run has a KL term (and no train_loss.bf16, which puts the
    reference in bf16 everywhere), so the config.yaml a run saves says how
    its reference ran: a resume on a machine of other bf16 support is refused, naming the setting
    to add, instead of going on with another reference precision."""
    loss = config.get("train_loss")
    if not isinstance(loss, dict) or loss.get("ref_bf16", False) is not None or not loss.get("kl_coef"):
        return config
    if loss.get("bf16"):  # the whole step in bf16, the reference too, on every machine: nothing to pin
        return config
    return {**config, "train_loss": {**loss, "ref_bf16": native_bf16(str(device))}}


def check_not_foreign(out: Path) -> None:
    """ValueError when out holds another command's run (FOREIGN_RUN_FILES: a search's records, an
    SFT run's final/, summary or resume state, train_head's metrics); checked before a resume is
    looked for (an SFT run's last/ read as a damaged joint checkpoint: "restore the files")."""
    foreign = [name for name in FOREIGN_RUN_FILES if (out / name).exists()]
    if foreign:
        raise ValueError(f"{out} holds {', '.join(foreign)} of another command's run (experiments.train_sft, "
                         "experiments.search or train_head), which a training run there would overwrite; use another out_dir")
    check_not_model_folder(out, "out_dir")  # <run>/last: replaced whole at that run's next checkpoint


def check_fresh_out_dir(out: Path, config: dict[str, Any]) -> None:
    """ValueError for a fresh start in a folder holding another run, which the start would
    overwrite: a config.yaml of another config, or metrics.jsonl without a config.yaml (another
    command's files were refused before, `check_not_foreign` in `open_run`). This config's own
    start that stopped before its first checkpoint passes (its rows are reset)."""
    path = out / CONFIG
    if path.is_file():
        saved = saved_run_config(out, config)
        diffs = config_differences(saved, config, RESUMABLE_KEYS)  # type: ignore[arg-type]
        if diffs:
            shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
            raise ValueError(f"{out} holds the config.yaml of another run and no checkpoint of it ({shown}); use "
                             "another out_dir, or delete that folder to start this run there")
    elif (out / METRICS).exists():
        raise ValueError(f"{out} holds a {METRICS} without a {CONFIG} (another command's rows, e.g. "
                         "experiments.train_head's), which a new training run there would overwrite; use another out_dir")


def open_run(
    cfg: DictConfig, s: Settings, accelerator: Accelerator, held: contextlib.ExitStack | None = None,
) -> tuple[Trainer, bool]:
    """Load or resume everything a process needs; returns (trainer, resumed). held: the main
    process takes the run folder's lock (`experiments.search.run_lock`) into it once every check
    has passed, as it claims the folder (`claim_out_dir`): a second run on the folder (the same
    command in another terminal, a requeued job while the old one runs, a search) is refused
    instead of mixing its rows and checkpoints with this one's."""
    out = resolve_out_dir(cfg)
    per_process, rest = divmod(s.run.prompts_per_step, accelerator.num_processes)
    if rest or per_process % s.run.mini_batches:
        raise ValueError(
            f"run.prompts_per_step={s.run.prompts_per_step} must split evenly over {accelerator.num_processes} "
            f"processes and then into run.mini_batches={s.run.mini_batches}"
        )
    check_micro_batches(s.run, per_process, accelerator.num_processes)
    problems = run_problems(s)  # before anything loads or is written: a split too small is a named error
    check_not_foreign(out)
    reflective, tokenizer, point = load_start(s, out, accelerator.num_processes)
    markers = step_markers(s, reflective, tokenizer)
    check_separator_ends_tokens(s, markers)  # before the folder is claimed and reference/ saved
    state = point.state if point is not None else None
    config = pinned_reference_precision(resolved_config(cfg), accelerator.device)
    changed = claim_out_dir(out, config, state is not None, accelerator.is_main_process, held)
    if point is not None and point.passed_over and accelerator.is_main_process:
        print(resume_message(point), flush=True)
    if changed and accelerator.is_main_process:
        print(resume_changes(changed), file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    ref_lm = reference_lm(out, reflective, tokenizer, state is None, accelerator.is_main_process, s)
    if ref_lm is not None:
        ref_lm.to(accelerator.device)
    actor_opt = s.actor_optim.build(list(reflective.lm.parameters()))
    head_opt = s.head_optim.build(list(reflective.head.parameters()))
    model, actor_opt, head_opt = accelerator.prepare(JointForward(reflective), actor_opt, head_opt)
    reflective = accelerator.unwrap_model(model).reflective
    trainer = _assemble(s, accelerator, out, model, reflective, tokenizer, ref_lm, actor_opt, head_opt, problems, markers)
    if state is not None:
        state_file = point.directory / STATE_FILE  # type: ignore[union-attr]
        load_optimizer_state(actor_opt, state.actor_optimizer, state_file)
        load_optimizer_state(head_opt, state.head_optimizer, state_file)
        restore_rng(state.rng[trainer.rank])
        trainer.step, trainer.data_position, trainer.elapsed_s = state.step, state.data_position, state.elapsed_s
    return trainer, state is not None


def check_micro_batches(run: RunConfig, per_process: int, processes: int) -> None:
    """ValueError when run.micro_batches does not split each mini-batch's prompt groups (on one
    process) into parts of whole groups: per_process / run.mini_batches groups, a multiple of it."""
    groups = per_process // run.mini_batches
    if groups % run.micro_batches:
        raise ValueError(
            f"run.micro_batches={run.micro_batches} must divide the {groups} prompt group(s) of each mini-batch "
            f"(run.prompts_per_step={run.prompts_per_step} over {processes} process(es) and run.mini_batches="
            f"{run.mini_batches}): each micro-batch holds whole groups"
        )


def run_problems(s: Settings) -> tuple[list[Problem], list[Problem]]:
    """(train problems, held-out problems) of the run's task; a split that cannot give the count
    asked for is a ValueError naming the setting (countdown's train split holds ~9.9k problems)."""
    task = importlib.import_module(s.task_module)
    drawn = []
    for key, split, count in (("data.train_problems", "train", s.data.train_problems),
                              ("data.heldout_problems", "test", s.data.heldout_problems)):
        try:
            drawn.append(list(task.generate_problems(split, count, s.data.seed, s.task_config)))
        except ValueError as error:  # a search's hint for task.count does not apply: counts here are >= 1
            raise ValueError(f"{key}={count}: {str(error).replace(' ' + TAKE_ALL_HINT, '')}") from None
    check_heldout_unseen(drawn[0], drawn[1], s.task_config)
    return drawn[0], drawn[1]


def check_heldout_unseen(train: Sequence[Problem], heldout: Sequence[Problem], task_config: Any) -> None:
    """ValueError when held-out problems are among the training problems (by question): their
    held-out metrics would measure training data (task=gsm8k task.config.path=FILE read that one
    file for both splits: 20 of 20 held-out problems were trained on, in silence)."""
    seen = {problem.question for problem in train}
    repeated = sum(problem.question in seen for problem in heldout)
    if not repeated:
        return
    path = getattr(task_config, "path", None)
    cause = (f": task.config.path={path} gives every split that one file; leave it unset to read each split's own"
             if path is not None else "")
    raise ValueError(f"{repeated} of the {len(heldout)} held-out problems (data.heldout_problems, the test split) are "
                     f"among the training problems (the train split), so the held-out metrics would measure training "
                     f"data{cause}")


def _assemble(
    s: Settings, accelerator: Accelerator, out: Path, model, reflective, tokenizer, ref_lm, actor_opt, head_opt,
    problems: tuple[list[Problem], list[Problem]], markers: StepMarkers,
) -> Trainer:
    """The rollout sources around the prepared model, the run's problems and step markers."""
    task = importlib.import_module(s.task_module)
    prompt_fn = prompt_function(s, task)
    policy = TransformersPolicy.from_reflective(reflective, tokenizer, s.sampling, prompt_fn)
    greedy = TransformersPolicy(reflective.lm, tokenizer, dataclasses.replace(s.sampling, temperature=0.0), prompt_fn)
    return Trainer(
        s=s, accelerator=accelerator, out=out, model=model, reflective=reflective, tokenizer=tokenizer,
        ref_lm=ref_lm, actor_opt=actor_opt, head_opt=head_opt, source=TransformersRolloutSource(policy),
        greedy=TransformersRolloutSource(greedy), markers=markers, task=task,
        train_problems=problems[0], heldout_problems=problems[1],
        heldout=[], pad_id=policy.pad_id,
    )


def step_markers(s: Settings, reflective: ReflectiveModel, tokenizer: Any) -> StepMarkers:
    """Which tokens end a step or open / close the think span, for sampling's step format. With the
    SPR loss on, the tokenizer's warning of a separator no token ends with is left out:
    `check_separator_ends_tokens` refuses the run in one line saying the same."""
    width = max(int(reflective.config.vocab_size), len(tokenizer))
    with warnings.catch_warnings():
        if s.loss.spr_coef > 0:
            warnings.filterwarnings("ignore", message="no token's text (ends with|is) separator")
        return StepMarkers.from_tokenizer(tokenizer, width, s.sampling.step_format)


def check_separator_ends_tokens(s: Settings, markers: StepMarkers) -> None:
    """ValueError when the SPR loss is on and no token of init_from's vocabulary ends with
    sampling.separator (is it, under sampling.separator_match=exact): no step would end, so the
    head trains on nothing (SmolLM2 under `prompt=chat` with the default ".\\n\\n": spr/steps 0,
    loss/spr 0, behind one warning)."""
    if markers.separator_ids or s.loss.spr_coef == 0:
        return
    typed = " (a backslash and an n, not a newline: Hydra keeps them as typed)" if "\\n" in s.sampling.separator else ""
    exact = s.sampling.separator_match == "exact"
    suffix = ", sampling.separator_match=suffix (every token whose text ends with it)" if exact else ""
    raise ValueError(
        f"sampling.separator={s.sampling.separator!r}{typed} {'is' if exact else 'ends'} no token of {s.init_from}'s "
        "vocabulary: no step would end and the SPR loss train the head on nothing; give the separator its steps end "
        f"""with, e.g. a newline for SmolLM2 as its search preset (bash: $'sampling.separator="\\n"'){suffix}, """
        "or train_loss.spr_coef=0")


# -- held-out rollouts and evaluation -----------------------------------------------------------


def make_heldout(t: Trainer, resumed: bool) -> None:
    """Generate the fixed held-out rollouts with the initial policy (problems shared out over
    the processes) and save them (main process); or load them when resuming."""
    path = t.out / HELDOUT
    if resumed:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the held-out rollouts of this run are gone; use a new out_dir")
        rows = load_rows(path, repair=False)  # written whole: a torn or short file is damage, not a log to trim
        expected = len(t.heldout_problems) * t.s.data.heldout_rollouts
        if len(rows) != expected:
            raise ValueError(f"{path} holds {len(rows)} complete held-out rollouts, not this run's {expected} "
                             f"({len(t.heldout_problems)} problems x data.heldout_rollouts={t.s.data.heldout_rollouts}): "
                             "the file is damaged; restore it or use a new out_dir")
        t.heldout = [_heldout_from_row(row) for row in rows]
        note_one_outcome(t)
        return
    t.reflective.eval()
    local = list(range(t.rank, len(t.heldout_problems), t.world))
    problems = [t.heldout_problems[i] for i in local]
    groups = t.source.rollouts(problems, t.s.data.heldout_rollouts, derived_seed(t.s.run.seed, "heldout", t.rank))
    mine = [(i, r, bool(t.task.grade(p, r.text))) for i, p, group in zip(local, problems, groups) for r in group]
    t.heldout = sorted(gather_object(mine), key=lambda item: item[0])
    if t.main:
        write_atomic(path, encode_rows([_heldout_row(i, r, ok) for i, r, ok in t.heldout]))
    note_one_outcome(t)


def one_outcome_note(outcomes: Sequence[bool], problems: int, rollouts: int) -> str | None:
    """A note when the held-out rollouts are all right or all wrong: their correct - incorrect gap
    (heldout_fc/diff_prob, the aha curve) is then undefined at every evaluation of the run."""
    if not outcomes or 0 < sum(outcomes) < len(outcomes):
        return None
    kind = "right" if outcomes[0] else "wrong"
    return (f"note: all {len(outcomes)} held-out rollouts are {kind}: the held-out gap heldout_fc/diff_prob (the aha "
            f"curve) is undefined for this run; raise data.heldout_problems={problems} or "
            f"data.heldout_rollouts={rollouts} for rollouts of both outcomes")


def note_one_outcome(t: Trainer) -> None:
    note = one_outcome_note([ok for _, _, ok in t.heldout], len(t.heldout_problems), t.s.data.heldout_rollouts)
    if note is not None and t.main:
        print(note, file=sys.stderr, flush=True)


def _heldout_row(index: int, r: Rollout, correct: bool) -> dict[str, Any]:
    return {"problem_index": index, "correct": correct, **dataclasses.asdict(r)}


def _heldout_from_row(row: dict[str, Any]) -> tuple[int, Rollout, bool]:
    fields = {f.name: row[f.name] for f in dataclasses.fields(Rollout)}
    for name in ("prompt_ids", "completion_ids", "completion_logprobs"):
        fields[name] = tuple(fields[name])
    return int(row["problem_index"]), Rollout(**fields), bool(row["correct"])


@torch.no_grad()
def rescore(t: Trainer, rollouts: Sequence[Rollout]) -> list[float]:
    """Path scores of the current head (eval mode, no dropout) over the rollouts, in order."""
    t.reflective.eval()
    scores: list[float] = []
    size = t.s.run.eval_batch_size
    for start in range(0, len(rollouts), size):
        chunk = rollouts[start : start + size]
        batch = collate_rollouts(chunk, [0.0] * len(chunk), 1, t.markers, t.pad_id)
        batch = batch.to(t.accelerator.device)
        out = t.reflective(batch.input_ids, batch.attention_mask, logits_to_keep=1)  # features [b, L, C]
        probs = t.reflective.step_scores(out.features[batch.step_rows, batch.step_cols])  # [n]
        scores += path_scores(probs.cpu(), batch.step_rows.cpu(), len(chunk)).tolist()
    return scores


def heldout_metrics(t: Trainer) -> dict[str, float | None]:
    """heldout_fc/*: the current head on the fixed held-out rollouts (shared out, gathered)."""
    local = list(range(t.rank, len(t.heldout), t.world))
    scores = rescore(t, [t.heldout[i][1] for i in local])
    gathered = dict(gather_object(list(zip(local, scores))))
    ordered = [gathered[i] for i in range(len(t.heldout))]
    fc = fc_metrics(ordered, [ok for _, _, ok in t.heldout], [i for i, _, _ in t.heldout])
    return prefixed("heldout_fc/", fc)


def greedy_accuracy(t: Trainer) -> dict[str, float]:
    """heldout/greedy_acc: greedy pass@1 of the current policy on the held-out problems."""
    t.reflective.eval()
    local = [t.heldout_problems[i] for i in range(t.rank, len(t.heldout_problems), t.world)]
    rollouts = t.greedy.rollouts(local, 1, 0) if local else []
    correct = [bool(t.task.grade(p, row[0].text)) for p, row in zip(local, rollouts)]
    everyone = gather_object(correct)
    return {"heldout/greedy_acc": sum(everyone) / len(everyone)}


def evaluations(t: Trainer, step: int) -> dict[str, float | None]:
    """The held-out metrics due at this step (every eval_every / greedy_every steps, and step 0)."""
    row: dict[str, float | None] = {}
    if t.s.run.eval_every and step % t.s.run.eval_every == 0:
        row.update(heldout_metrics(t))
    if t.s.run.greedy_every and step % t.s.run.greedy_every == 0:
        row.update(greedy_accuracy(t))
    return row


# -- one training step --------------------------------------------------------------------------


def collect(t: Trainer, step: int) -> tuple[list[Problem], list[Rollout], list[float]]:
    """This process's prompts of the step, their rollouts (prompt-major) and rewards."""
    per_process = t.s.run.prompts_per_step // t.world
    start = t.data_position + t.rank * per_process
    problems = [t.train_problems[i] for i in stream_indices(start, per_process, len(t.train_problems), t.s.run.seed)]
    t.reflective.eval()
    seed = derived_seed(t.s.run.seed, "rollout", step, t.rank)
    groups = t.source.rollouts(problems, t.s.run.rollouts_per_prompt, seed)
    rollouts = [r for group in groups for r in group]
    rewards = [rollout_reward(t, p, r) for p, group in zip(problems, groups) for r in group]
    return problems, rollouts, rewards


def rollout_reward(t: Trainer, problem: Problem, rollout: Rollout) -> float:
    """`outcome_reward` of one rollout; whether it wrote an answer is read only for a wrong one
    cut at the token limit, the one case that reads it."""
    correct = bool(t.task.grade(problem, rollout.text))
    answered = not correct and rollout.finish == "length" and answer_written(
        rollout.text, t.task.extract_answer(rollout.text), t.s.sampling.think_close)
    return outcome_reward(correct, rollout, answered, t.s.loss.truncated_wrong_reward)


def with_old_logprobs(t: Trainer, batch: RolloutBatch) -> RolloutBatch:
    """verl's recompute before several updates on one batch (one update reads them from its own
    forward, `joint_step`); "rollout" keeps the sampler's."""
    if t.s.run.old_logprobs == "recompute" and t.s.run.mini_batches > 1:
        return dataclasses.replace(batch, old_logprobs=frozen_logprobs(t.reflective.lm, batch, t.s.loss))
    return batch


def update(t: Trainer, batch: RolloutBatch, step: int) -> dict[str, float]:
    """mini_batches optimizer steps of both optimisers on the batch, each after micro_batches
    accumulated backwards (`accumulate`); mean metrics over them."""
    t.reflective.train()
    torch.manual_seed(derived_seed(t.s.run.seed, "dropout", step, t.rank))  # the head's dropout
    for opt, optim_cfg in ((t.actor_opt, t.s.actor_optim), (t.head_opt, t.s.head_optim)):
        for group in opt.param_groups:
            group["lr"] = optim_cfg.lr_at(step)
    batch = with_old_logprobs(t, batch)
    size = batch.num_groups // t.s.run.mini_batches
    rows: list[dict[str, float]] = []
    for k in range(t.s.run.mini_batches):
        metrics = accumulate(t, batch.groups(k * size, (k + 1) * size))
        norms = {
            "grad_norm/actor": _clip(t, t.reflective.lm.parameters(), t.s.actor_optim.grad_clip),
            "grad_norm/head": _clip(t, t.reflective.head.parameters(), t.s.head_optim.grad_clip),
        }
        for opt in learning_optimizers(t):
            opt.step()
        for opt in (t.actor_opt, t.head_opt):
            opt.zero_grad(set_to_none=True)
        rows.append({**metrics, **norms})
    return mean_rows(rows)


def accumulate(t: Trainer, mini_batch: RolloutBatch) -> dict[str, float]:
    """The gradient of one mini-batch: run.micro_batches parts of whole prompt groups, each a
    forward and a backward of `joint_step`'s loss / micro_batches (verl's ppo_micro_batch_size:
    the SPR class weights and the GRPO token mean are per part, the losses averaged); one part is
    the whole mini-batch. Under DDP only the last part's backward syncs the gradients. Returns
    the parts' mean metrics."""
    parts = micro_batch_parts(mini_batch, t.s.run.micro_batches)
    rows: list[dict[str, float]] = []
    for k, part in enumerate(parts):
        with contextlib.nullcontext() if k == len(parts) - 1 else t.accelerator.no_sync(t.model):
            out = joint_step(t.model, part, t.ref_lm, t.s.loss)
            t.accelerator.backward(out.loss / len(parts))
        rows.append(out.metrics)
        del out  # its backward freed the graph; nothing of it stays alive through the next part's forward
    return mean_rows(rows)


def micro_batch_parts(mini_batch: RolloutBatch, parts: int) -> list[RolloutBatch]:
    """mini_batch in `parts` equal parts of whole prompt groups, in order (1: the mini-batch itself)."""
    if parts == 1:
        return [mini_batch]
    size = mini_batch.num_groups // parts
    return [mini_batch.groups(k * size, (k + 1) * size) for k in range(parts)]


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each key over rows (all holding the same keys)."""
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def learning_optimizers(t: Trainer) -> list[Any]:
    """The optimizers whose parameters the loss reaches (AdamW's weight decay would move the
    others even at zero gradient): the head's when the SPR loss is on, the policy's when the GRPO
    loss is or the SPR gradient flows into it (train_loss=spr_only with backbone_grad_scale=0
    trains the head on frozen features: the backbone stays bit-identical)."""
    loss = t.s.loss
    actor = loss.grpo_coef > 0 or (loss.spr_coef > 0 and loss.backbone_grad_scale > 0)
    return [opt for opt, learns in ((t.actor_opt, actor), (t.head_opt, loss.spr_coef > 0)) if learns]


def _clip(t: Trainer, params, max_norm: float) -> float:
    return float(t.accelerator.clip_grad_norm_(list(params), max_norm if max_norm > 0 else math.inf))


def local_report(t: Trainer, problems: list[Problem], rollouts: list[Rollout], rewards: list[float],
                 batch: RolloutBatch, losses: dict[str, float]) -> dict[str, Any]:
    """What this process contributes to the step's row: loss scalars and per-rollout records
    (group id, path score attached at generation, correct, completion tokens, cut by length, reward)."""
    scores = [r.path_score for r in rollouts]
    if any(score is None for score in scores):  # a source without a head: score with the current one
        scores = rescore(t, rollouts)
    g = t.s.run.rollouts_per_prompt
    records = [
        (t.data_position + t.rank * len(problems) + i // g, float(scores[i]), rewards[i] > 0.5,
         len(r.completion_ids), r.finish == "length", float(rewards[i]))
        for i, r in enumerate(rollouts)
    ]
    return {"losses": losses, "records": records, "train_tokens": int(batch.attention_mask.sum()),
            "finite_weights": weights_finite(t.reflective) and forward_finite(t.reflective, batch)}


@torch.no_grad()
def forward_finite(model: ReflectiveModel, batch: RolloutBatch) -> bool:
    """Whether the updated model's logits, features and head outputs over the batch's first
    rollout are finite: weights can stay finite yet so large that the forward overflows (lr=1e4
    left |w| ~ 1e8: a run that ended there saved a last/ whose every sample drew NaN logits, and
    one that went on crashed in its next rollouts; features of ~4e27 gave a head of NaN scores)."""
    was_training = model.training
    model.eval()
    try:
        out = model(batch.input_ids[:1], batch.attention_mask[:1])
        outputs = (out.logits, out.features, model.head_logits(out.features))
        return all(bool(torch.isfinite(tensor).all()) for tensor in outputs)
    finally:
        model.train(was_training)


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite: one sum per parameter in its own dtype and on its own
    device (a NaN or inf carries into its sum; parameters of other dtypes or devices need no
    common tensor), with no float64 copy of the weights (what `weights_checksum` makes: a
    model's size again in memory, each step)."""
    return all(bool(torch.isfinite(p.detach().sum())) for p in model.parameters())


class TrainingDivergedError(ValueError):
    """A step's losses, its updated weights or their forward's logits are not finite (NaN / inf):
    the run stops before sampling from or saving them."""


def check_not_diverged(reports: list[dict[str, Any]], step: int) -> None:
    """TrainingDivergedError when any process's step losses or weights are not finite (every
    process sees every report, so all stop at the same step)."""
    bad = sorted({key for rep in reports for key, value in rep["losses"].items() if not math.isfinite(value)})
    if not bad and all(rep["finite_weights"] for rep in reports):
        return
    what = f"the losses {', '.join(bad)} are" if bad else "the updated weights, or their logits, are"
    raise TrainingDivergedError(
        f"training diverged at step {step}: {what} not finite (NaN or inf); nothing of this step is saved "
        "(the checkpoints written before it are kept): lower actor_optim.lr / head_optim.lr and start again "
        "in another out_dir")


def step_row(step: int, reports: list[dict[str, Any]], t: Trainer) -> dict[str, Any]:
    """The metrics row of a step from every process's report (losses averaged over processes).
    reward/mean and grpo/mixed_groups (groups whose rewards differ: the ones with a GRPO signal) read
    the rewards GRPO trains on (`policies.joint_step.grpo_rewards`: a wrong answer cut by length is
    0 there, as in the reference); rollout/correct and reward/pass_at_g read correctness; fc/* read the
    rollouts the SPR loss trains on (`policies.joint_step.spr_labelled`: the reference's false_prob
    averages reward 0 alone, not the cut wrong rollouts' 0.1)."""
    records = [rec for rep in reports for rec in rep["records"]]
    groups, scores, correct, rewards = ([r[k] for r in records] for k in (0, 1, 2, 5))
    labelled = spr_labelled(torch.tensor(rewards, dtype=torch.float32), t.s.loss.truncated_wrong_reward)
    rewards = grpo_rewards(torch.tensor(rewards, dtype=torch.float64), t.s.loss.truncated_wrong_reward).tolist()
    by_group: dict[int, list[tuple[bool, float]]] = {}
    for group, ok, reward in zip(groups, correct, rewards):
        by_group.setdefault(group, []).append((ok, reward))
    row: dict[str, Any] = {"step": step}
    row.update({k: sum(rep["losses"][k] for rep in reports) / len(reports) for k in reports[0]["losses"]})
    row.update(prefixed("fc/", fc_metrics(*(list(compress(values, labelled.tolist())) for values in (scores, correct, groups)))))
    row.update({
        "reward/mean": sum(rewards) / len(records),
        "rollout/correct": sum(correct) / len(correct),
        "reward/pass_at_g": sum(any(ok for ok, _ in v) for v in by_group.values()) / len(by_group),
        "grpo/mixed_groups": sum(len({reward for _, reward in v}) > 1 for v in by_group.values()) / len(by_group),
        "rollout/length": sum(r[3] for r in records) / len(records),
        "rollout/cut_by_length": sum(r[4] for r in records) / len(records),
        "lr/actor": t.s.actor_optim.lr_at(step - 1), "lr/head": t.s.head_optim.lr_at(step - 1),
    })
    return row


def train_step(t: Trainer) -> dict[str, Any]:
    """One step (rollouts, update, held-out evaluation when due); returns the row (complete on
    the main process) and advances step, data_position."""
    t0 = time.perf_counter()
    problems, rollouts, rewards = collect(t, t.step)
    t1 = time.perf_counter()
    batch = collate_rollouts(
        rollouts, rewards, t.s.run.rollouts_per_prompt, t.markers, t.pad_id,
        with_old_logprobs=t.s.run.old_logprobs == "rollout",
    ).to(t.accelerator.device)
    losses = update(t, batch, t.step)
    t2 = time.perf_counter()
    reports = gather_object([local_report(t, problems, rollouts, rewards, batch, losses)])
    check_not_diverged(reports, t.step + 1)  # before NaN weights are sampled from or saved
    t.step, t.data_position = t.step + 1, t.data_position + t.s.run.prompts_per_step
    t3 = time.perf_counter()
    row = {**step_row(t.step, reports, t), **evaluations(t, t.step)}
    t4 = time.perf_counter()
    generated = sum(rec[3] for rep in reports for rec in rep["records"])
    trained = sum(rep["train_tokens"] for rep in reports)
    t.elapsed_s += t4 - t0
    row.update({
        "time/rollout_s": t1 - t0, "time/update_s": t2 - t1, "time/eval_s": t4 - t3, "time/step_s": t4 - t0,
        # the step's own work: a held-out evaluation (every run.eval_every steps) read as a 4x slower step
        "time/tokens_per_s": generated / max(t3 - t0, 1e-9),
        "time/train_tokens_per_s": trained / max(t2 - t1, 1e-9), "time/elapsed_s": t.elapsed_s,
    })
    return row


# -- checkpoints, logging, the loop -------------------------------------------------------------


def weights_checksum(model: torch.nn.Module) -> float:
    """A float64 sum over every parameter: equal on all processes when DDP kept them in step."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def checkpoint(t: Trainer, numbered: bool) -> None:
    """Every process hands its RNG state (and a weights checksum) to the main process, which
    checks the processes still hold the same weights and writes the checkpoint."""
    rng = gather_object([capture_rng()])
    sums = gather_object([weights_checksum(t.reflective)])
    if len(set(sums)) > 1:
        raise RuntimeError(f"the processes' weights diverged at step {t.step} (checksums {sums})")
    if t.main:
        state = JointTrainState(
            step=t.step, data_position=t.data_position, elapsed_s=t.elapsed_s,
            actor_optimizer=t.actor_opt.state_dict(), head_optimizer=t.head_opt.state_dict(),
            rng=tuple(rng), world_size=t.world,
        )
        publish_checkpoint(t.out, t.reflective, t.tokenizer, state, numbered, t.s.run.keep_checkpoints)
    t.accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= step: a run killed after its last checkpoint may have logged
    later steps, which the resumed run logs again."""
    rows = load_rows(path)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) != len(rows):
        write_atomic(path, encode_rows(kept))


class MetricsLog:
    """metrics.jsonl (crash-safe appends) and, when the package is importable, TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool, start_step: int) -> None:
        self.path = out / METRICS
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / TENSORBOARD), purge_step=start_step + 1)
            except ImportError:  # the tensorboard package is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        append_rows(self.path, [row])
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def budget_spent(t: Trainer) -> str | None:
    """Which budget the run has spent ("run.max_steps=K", "run.max_minutes=M"), None while neither."""
    if t.step >= t.s.run.max_steps:
        return f"run.max_steps={t.s.run.max_steps}"
    if t.s.run.max_minutes is not None and t.elapsed_s >= 60 * t.s.run.max_minutes:
        return f"run.max_minutes={t.s.run.max_minutes}"
    return None


def should_stop(t: Trainer, stop: StopRequest) -> tuple[bool, bool]:
    """(stop now, because of Ctrl-C or SIGTERM): decided by the main process and shared with all,
    so every process stops after the same step: max_steps, max_minutes or a signal (one during
    the last step too: the run is saved and the process stops, a sweep's next job does not start)."""
    over = budget_spent(t) is not None
    over, interrupted = broadcast_object_list([over or stop.requested, stop.requested])
    return bool(over), bool(interrupted)

def train_loop(t: Trainer, log: MetricsLog | None, progress: bool) -> None:
    """Steps until the budget ends; a checkpoint every checkpoint_every steps and at the end. The
    first Ctrl-C or SIGTERM stops after the current step, saves out_dir/last and raises
    KeyboardInterrupt (Terminated for SIGTERM; `policies.step_boundary`; a second aborts at once,
    the last checkpoint kept)."""
    k = t.s.run.checkpoint_every
    bar = tqdm(total=t.s.run.max_steps, initial=t.step, unit="step", desc="grpo+spr",
               disable=not (progress and t.main), dynamic_ncols=True)
    saved_at = t.step
    with stop_at_step_boundary() as stop:
        while not (decision := should_stop(t, stop))[0]:
            row = train_step(t)
            if log is not None:
                log.write(row)
            if k and t.step % k == 0:
                checkpoint(t, numbered=True)
                saved_at = t.step
            bar.set_postfix(reward=f"{row['reward/mean']:.2f}", diff=_fmt(row.get("fc/diff_prob")), refresh=False)
            bar.update(1)
        bar.close()
        if saved_at != t.step:
            checkpoint(t, numbered=False)
    if decision[1]:
        if t.main:
            print(f"{'SIGTERM' if stop.terminated else 'Ctrl-C'}: saved {t.out / 'last'} at step {t.step}",
                  file=sys.stderr, flush=True)
        raise stop.interrupt()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def run_training(cfg: DictConfig) -> Path:
    """Train (or resume) the run the config describes; return its folder (module docstring)."""
    s = settings(cfg)  # validates before anything is loaded or written
    device = train_device(cfg.device)
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    accelerator = make_accelerator(device)  # first: a PartialState made before it pinned the run to a GPU
    note = trained_task_note(s.init_from, s.task_module, "init_from")
    if note and accelerator.is_main_process:
        print(note, file=sys.stderr, flush=True)
    with contextlib.ExitStack() as held:  # the run folder's lock, from its claim to the end
        t, resumed = open_run(cfg, s, accelerator, held)
        train_opened(cfg, t, resumed)
    accelerator.wait_for_everyone()
    return t.out


def train_opened(cfg: DictConfig, t: Trainer, resumed: bool) -> None:
    """The held-out rollouts, the step-0 evaluation of a fresh run, and the training loop."""
    make_heldout(t, resumed)
    log = MetricsLog(t.out, bool(cfg.tensorboard), t.step) if t.main else None
    if resumed and t.main:
        truncate_metrics(t.out / METRICS, t.step)
        spent = budget_spent(t)
        if spent is not None:  # a rerun with a smaller or spent budget did nothing in silence
            print(f"note: {t.out} is at step {t.step}, its {spent} spent: nothing to train (raise "
                  f"{spent.split('=')[0]} to train it further)", file=sys.stderr, flush=True)
    if not resumed:
        baseline = {"step": 0, **evaluations(t, 0)}
        if log is not None:
            log.write(baseline)
    try:
        train_loop(t, log, bool(cfg.progress))
    finally:
        if log is not None:
            log.close()


_RUN_DIR: list[Path] = []  # the run folder of the job this process runs (`main`), for `interrupt_hint`


def interrupt_hint() -> str:
    """What a Ctrl-C says, at that moment: the run resumes when its folder holds a checkpoint
    (`policies.train_state.checkpoint_folders`); before its first one (loading, the held-out
    rollouts, the step-0 evaluation) nothing was saved and a rerun starts the run over."""
    if not _RUN_DIR and noted_sweep_dir():  # a sweep's launcher (hydra/launcher=local: the jobs run elsewhere)
        return hydra_rerun_hint("each job's checkpoints saved so far are kept in its folder")
    if not _RUN_DIR:  # Hydra still starting: no run folder taken yet
        return hydra_rerun_hint("nothing was written by this command")
    if not checkpoint_folders(out := _RUN_DIR[-1]):
        return hydra_rerun_hint(f"{out} holds no checkpoint yet (nothing to resume: a rerun starts this run over)")
    return hydra_rerun_hint("a run resumes from its out_dir/last")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    note_hydra_job(cfg.get("out_dir"))  # a sweep's folder, for the Ctrl-C hint
    _RUN_DIR.clear()
    freeze_long_lived()  # the imports' objects: out of the garbage collector's walks (policies/gc_freeze.py)
    try:
        # a hydra/launcher=local worker whose launcher was killed saves and stops (experiments/launcher_watch.py)
        with launcher_watched(interrupt_hint), \
                user_errors_reported("the checkpoints and metrics.jsonl rows already written are kept"):  # one line, exit 2
            check_no_chdir()
            _RUN_DIR.append(resolve_out_dir(cfg))  # for the Ctrl-C hint (`interrupt_hint`)
            out = run_training(cfg)
        rows = load_rows(out / METRICS)
        if rows and PartialState().is_main_process:
            last = rows[-1]
            with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
                print(f"{out}: step {last['step']}, reward {last.get('reward/mean')}, fc/diff_prob {last.get('fc/diff_prob')}")
                print(json.dumps({k: v for k, v in last.items() if k.startswith(("heldout", "fc/"))}))
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the distributed process group, if this process joined one (`accelerate launch`),
    before the interpreter exits: left to the exit's destructors, a gloo rank sometimes aborted
    there ("terminate called without an active exception", exit code -6) after a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_unused_task_keys(argv: Sequence[str]) -> None:
    """Exit 2 with one line for an override of a task setting training never reads: task.count=500
    trained on data.train_problems' problems, saved 500 in config.yaml and refused a resume over it."""
    check_refused_keys(argv, {key: f"{key} is a search setting that experiments.train does not read (it draws its "
                                   f"problems by `data`): set {instead} instead" for key, instead in UNUSED_TASK_KEYS.items()})


if __name__ == "__main__":
    check_group_options(sys.argv[1:], CONFIG_DIR, "train")  # recipe=nosuch: one line, exit 2, before Hydra composes
    check_unused_task_keys(sys.argv[1:])
    check_override_keys(sys.argv[1:], CONFIG_DIR, "train", PLAIN_NODE_KEYS)  # grpo.bogus=1: one line, exit 2
    check_launcher_commands(sys.argv[1:], CONFIG_DIR, "train")  # -m hydra/launcher=submitit_slurm without SLURM
    check_out_dir_argument(sys.argv[1:], CONFIG_DIR, "train")  # a file; a sweep given one out_dir or run.max_steps=3,5
    with interrupt_reported(interrupt_hint):
        main()
