"""Head-only SPRM training: a fresh head of the reference's shape trained on a frozen policy's
cached hidden states (`experiments.rollout_cache`), with its own AdamW (issue 3 item 6).

Usage:
    cache = load_cache("outputs/heads/countdown_train.pt")            # experiments.rollout_cache
    cfg = HeadTrainConfig(labels="spr", feature_layer=-2, lr=1e-3, steps=600, warmup_steps=100)
    run = train_head(cache, cfg, evaluate=lambda head, step: {...})   # run.head, run.rows
    probs = position_probs(run.head, test_cache.layer(-2))              # [P] step scores
    scores = rollout_path_scores(probs, test_cache)                    # [R] path scores
    save_reflective_head(run.head, policy_dir, -2, "outputs/heads/countdown_spr/final")

Label modes (what each scored position is trained towards; `scorers.spr_loss` computes the loss):
  "spr":         the reference's SPR loss (mode "reference": the outcome of the rollout, only on
                 the positions whose logit sign already agrees with it, class balanced; the
                 rollouts cut at the token limit after a wrong answer are left out, the
                 reference's reward-0.1 mask, as the joint trainer does). DESIGN.md
                 section 4 measured that it collapses onto the steps that agreed at
                 initialisation; `warmup_steps` of plain BCE on outcomes come first when asked
                 (not in the reference, which starts the filter at once).
  "spr_paper":   the paper's form (binary filter, no class balance), the same warm-up and mask.
  "outcome_bce": every step labelled with its rollout's outcome, plain BCE: a separately trained
                 outcome reward model on frozen features (issue 3 item 10).
  "true_labels": the task's true step labels, plain BCE: the upper bound (issue 3 item 7).

A step draws `batch_rollouts` rollouts (a fresh shuffle of the train cache each epoch) and trains
on all their scored positions; the head runs in train mode (dropout 0.5, as the reference),
AdamW (weight decay 0.01 as the reference), gradient norm clipped at `grad_clip`. Evaluation and
the logged batch metrics read the head without dropout (`scorers.sprm_head.sprm_logits`), as a
policy and `SPRMScorer` do.

Tests: `.venv/bin/pytest tests/test_train_head.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from policies.checkpoint import load_checkpoint
from policies.reflective_model import ReflectiveModel
from scorers.spr_loss import SPRLoss, spr_loss
from scorers.sprm_head import build_sprm_head, sprm_logits

LABEL_MODES: tuple[str, ...] = ("spr", "spr_paper", "outcome_bce", "true_labels")
# label mode -> (spr_loss mode after the warm-up, whether the target is the true step label)
_LOSS_OF_MODE: dict[str, tuple[str, bool]] = {
    "spr": ("reference", False),
    "spr_paper": ("paper", False),
    "outcome_bce": ("bce", False),
    "true_labels": ("bce", True),
}
Evaluate = Callable[[nn.Sequential, int], dict[str, Any]]
PATH_SCORE_EPS = 1e-10  # the reference's clamp before the log


class PositionData(Protocol):
    """What training reads from a cache (`experiments.rollout_cache.RolloutCache` is one): R
    rollouts, P scored positions grouped by rollout, C features per position."""

    hidden_size: int
    correct: torch.Tensor  # [R] bool outcome of each rollout
    position_rollout: torch.Tensor  # [P] long, sorted

    @property
    def num_rollouts(self) -> int: ...

    @property
    def task(self) -> str: ...

    @property
    def position_outcome(self) -> torch.Tensor: ...  # [P] bool

    @property
    def position_labels(self) -> torch.Tensor | None: ...  # [P] bool true step labels, or None

    @property
    def cut_wrong(self) -> torch.Tensor: ...  # [R] bool wrong, cut at the token limit after an answer

    def layer(self, feature_layer: int) -> torch.Tensor: ...  # [P, C]


@dataclass(frozen=True)
class HeadTrainConfig:
    """How a head is trained.

    labels: a label mode of LABEL_MODES (module docstring).
    feature_layer: the cached hidden-state layer the head reads (-2: the reference's).
    lr: AdamW learning rate (the reference uses 1e-5 for a 1.5B model's head trained jointly;
        a fresh head on a frozen tiny model needs far more).
    weight_decay: AdamW weight decay (0.01 as the reference).
    grad_clip: max gradient norm (1.0 as the reference); 0 disables clipping.
    steps: optimiser steps.
    batch_rollouts: rollouts per step (all their scored positions are trained on).
    warmup_steps: first steps trained with plain BCE on outcomes before the filter of "spr" /
        "spr_paper" engages (0: the reference); must be 0 for the other modes.
    eval_every: call `evaluate` every this many steps (and at step 0 and at the end); 0: only at
        the end.
    log_every: write a training row every this many steps.
    seed: head initialisation, shuffling and dropout.
    """

    labels: str = "spr"
    feature_layer: int = -2
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 500
    batch_rollouts: int = 64
    warmup_steps: int = 0
    eval_every: int = 50
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"HeadTrainConfig.labels={self.labels!r}; valid: {', '.join(LABEL_MODES)}")
        if not isinstance(self.feature_layer, int) or isinstance(self.feature_layer, bool):
            raise ValueError(f"HeadTrainConfig.feature_layer={self.feature_layer!r} must be an integer")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"HeadTrainConfig.lr={self.lr!r} must be a finite number > 0")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"HeadTrainConfig.{name}={value!r} must be a finite number >= 0")
        limits = (("steps", 1), ("batch_rollouts", 1), ("warmup_steps", 0), ("eval_every", 0), ("log_every", 1))
        for name, low in limits:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"HeadTrainConfig.{name}={value!r} must be an integer >= {low}")
        if self.warmup_steps >= self.steps:  # every step plain BCE: the labels' loss never ran
            raise ValueError(f"HeadTrainConfig.warmup_steps={self.warmup_steps} must be below steps={self.steps} "
                             f"(the warm-up trains with plain BCE; the {self.labels!r} loss starts after it)")
        if self.warmup_steps and self.labels not in ("spr", "spr_paper"):
            raise ValueError(
                f"HeadTrainConfig.warmup_steps={self.warmup_steps} only applies to labels 'spr' / 'spr_paper', "
                f"not {self.labels!r}"
            )

    def loss_mode(self, step: int) -> str:
        """The `spr_loss` mode of (0-based) step: plain BCE during the warm-up, else the mode's."""
        return "bce" if step < self.warmup_steps else _LOSS_OF_MODE[self.labels][0]

    @property
    def uses_true_labels(self) -> bool:
        return _LOSS_OF_MODE[self.labels][1]


@dataclass(frozen=True)
class HeadRun:
    """A finished training run: head: the trained head (eval mode); rows: the logged rows
    (training rows and evaluation rows, each with an integer "step"); seconds: wall time."""

    head: nn.Sequential
    rows: tuple[dict[str, Any], ...]
    seconds: float


# -- scoring a cache with a head ------------------------------------------------------------------


@torch.no_grad()
def position_logits(head: nn.Sequential, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """[P, C] features -> [P] float32 head logits (no dropout), in batches of positions."""
    parts = [sprm_logits(head, features[i : i + batch]) for i in range(0, len(features), batch)]
    return torch.cat(parts) if parts else torch.zeros(0)


def position_probs(head: nn.Sequential, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """[P, C] features -> [P] float32 step scores (sigmoid of the head, no dropout)."""
    return torch.sigmoid(position_logits(head, features, batch))


def path_scores(probs: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Geometric mean of the scores of each row: probs [k] in [0, 1], rows [k] -> [num_rows]
    float32, each score clamped at 1e-10, 0 for a row with none (the reference's path score; also
    `experiments.aha_metrics.path_scores`)."""
    logs = torch.log(probs.detach().float().clamp(min=PATH_SCORE_EPS))  # [k]
    sums = torch.zeros(num_rows).index_add_(0, rows, logs)  # [num_rows]
    counts = torch.zeros(num_rows).index_add_(0, rows, torch.ones_like(logs))  # [num_rows]
    return torch.where(counts > 0, torch.exp(sums / counts.clamp(min=1)), torch.zeros(num_rows))


def rollout_path_scores(probs: torch.Tensor, cache: PositionData) -> torch.Tensor:
    """[P] position scores -> [R] path scores: the geometric mean over each rollout's positions
    (clamped at 1e-10), 0 for a rollout with none: the reference's value, `SPRMScorer.path_scores`."""
    return path_scores(probs, cache.position_rollout, cache.num_rollouts)


def rollout_min_scores(probs: torch.Tensor, cache: PositionData) -> torch.Tensor:
    """[P] position scores -> [R]: the lowest step score of each rollout, 0 for a rollout with
    none (Best-of-N with `aggregation=min` instead of the reference's geometric mean: one bad
    step sinks the path however good the others look)."""
    out = torch.ones(cache.num_rollouts).scatter_reduce(0, cache.position_rollout, probs.float(), "amin")  # [R]
    counts = torch.bincount(cache.position_rollout, minlength=cache.num_rollouts)  # [R]
    return torch.where(counts > 0, out, torch.zeros_like(out))


# -- training -------------------------------------------------------------------------------------


class RolloutBatches:
    """Batches of rollout indices, a fresh shuffle per epoch, and the positions they hold. An
    epoch is ceil(R / b) batches that hold every rollout once, its last one the remainder (as
    torch's DataLoader without drop_last; the remainder was dropped, so 12 of 96 rollouts went
    unseen in one epoch by 64).

    cache: the training cache; batch_rollouts: rollouts per batch; generator: the shuffle's RNG;
    kept: [R] bool, the rollouts to draw (None: all; an epoch then holds the kept ones).
    """

    def __init__(self, cache: PositionData, batch_rollouts: int, generator: torch.Generator,
                 kept: torch.Tensor | None = None) -> None:
        counts = torch.bincount(cache.position_rollout, minlength=cache.num_rollouts)  # [R]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # [R + 1]
        if not torch.equal(cache.position_rollout, torch.sort(cache.position_rollout).values):
            raise ValueError("the cache's positions are not grouped by rollout")
        self.pool = torch.arange(cache.num_rollouts) if kept is None else kept.nonzero().squeeze(-1)  # [R']
        if not len(self.pool):
            raise ValueError("no rollouts to train on: every rollout of the cache is a wrong one cut at the token limit")
        self.generator = generator
        self.batch = min(batch_rollouts, len(self.pool))
        self._order = torch.zeros(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        """[b] rollout indices of the next batch (fewer for an epoch's last one; a new epoch
        starts when none are left)."""
        if not len(self._order):
            self._order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
        batch, self._order = self._order[: self.batch], self._order[self.batch :]
        return batch

    def positions(self, rollouts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position indices [k], the batch row of each [k]) of the given rollouts [b]."""
        starts, ends = self.offsets[rollouts], self.offsets[rollouts + 1]  # [b] each
        counts = ends - starts  # [b]
        rows = torch.repeat_interleave(torch.arange(len(rollouts)), counts)  # [k]
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [k]
        return starts[rows] + within, rows


def position_targets(cache: PositionData, cfg: HeadTrainConfig) -> torch.Tensor:
    """[P] bool targets: the true step labels for "true_labels", else the rollout's outcome."""
    if not cfg.uses_true_labels:
        return cache.position_outcome
    labels = cache.position_labels
    if labels is None:
        raise ValueError(f"labels={cfg.labels!r} needs true step labels; the cache of task {cache.task!r} has none")
    return labels


def trained_rollouts(cache: PositionData, cfg: HeadTrainConfig) -> torch.Tensor | None:
    """[R] bool, the rollouts the SPR modes train on: all but the wrong ones cut at the token
    limit after writing an answer (the reference's reward 0.1, whose steps its SPR loss leaves
    out: `policies.joint_step`); None (all) for the other modes."""
    return ~cache.cut_wrong if cfg.labels in ("spr", "spr_paper") else None


def trained_rollout_count(cache: PositionData, cfg: HeadTrainConfig) -> int:
    """How many of the cache's rollouts the head trains on (`trained_rollouts`): what an epoch
    passes over and what a batch can hold."""
    trained = trained_rollouts(cache, cfg)
    return cache.num_rollouts if trained is None else int(trained.sum())


def label_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: HeadTrainConfig, step: int) -> SPRLoss:
    """The loss of one batch: logits [k] (train mode), targets [k] bool, at (0-based) step."""
    return spr_loss(logits, targets, cfg.loss_mode(step))


def batch_fc(head: nn.Sequential, features: torch.Tensor, rows: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """fc/correct_prob, fc/false_prob, fc/diff_prob of the batch (the reference's train-batch aha
    metrics; None for an empty side): features [k, C] of the batch's positions, rows [k] their
    rollout within the batch, correct [b] the rollouts' outcomes."""
    scores = path_scores(position_probs(head, features), rows, len(correct))  # [b]
    good = float(scores[correct].mean()) if bool(correct.any()) else None
    bad = float(scores[~correct].mean()) if bool((~correct).any()) else None
    diff = None if good is None or bad is None else good - bad
    return {"fc/correct_prob": good, "fc/false_prob": bad, "fc/diff_prob": diff}


class HeadDivergedError(ValueError):
    """Head training gave a non-finite loss or weights (lr 1e10 trained a head of NaN weights that
    was saved and scored every path NaN): the run stops before saving anything."""

    def __init__(self, step: int, lr: float) -> None:
        super().__init__(f"head training diverged at step {step}: its loss or weights are not finite (NaN or inf); "
                         f"nothing is saved: lower --lr (now {lr:g})")


def train_step(
    head: nn.Sequential, optimizer: torch.optim.Optimizer, features: torch.Tensor, targets: torch.Tensor,
    cfg: HeadTrainConfig, step: int,
) -> dict[str, float]:
    """One update on a batch's positions (features [k, C], targets [k]); the loss's numbers.
    HeadDivergedError when the loss or the updated weights are not finite."""
    head.train()
    logits = head(features).squeeze(-1)  # [k], dropout on
    out = label_loss(logits, targets, cfg, step)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    try:
        optimizer.step()
    except RuntimeError as err:  # AdamW at lr 1e38: "value cannot be converted to type float without overflow"
        if "overflow" not in str(err):
            raise
        raise HeadDivergedError(step + 1, cfg.lr) from err
    head.eval()
    if not torch.isfinite(out.loss.detach()) or not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
        raise HeadDivergedError(step + 1, cfg.lr)
    return {
        "loss": float(out.loss.detach()), "grad_norm": float(norm), "spr/kept_fraction": out.kept_fraction,
        "spr/agreement": out.agreement, "loss_mode_bce": float(cfg.loss_mode(step) == "bce"),
    }


def train_head(
    cache: PositionData, cfg: HeadTrainConfig, evaluate: Evaluate | None = None, progress: bool = True
) -> HeadRun:
    """Train a fresh head (`build_sprm_head(C, seed)`) on the cache (module docstring). Rows:
    step 0 holds `evaluate(head, 0)` before any update; step s (1-based: after s updates) holds
    the training numbers every log_every steps and `evaluate(head, s)` every eval_every steps
    and at the last step."""
    started = time.perf_counter()
    features = cache.layer(cfg.feature_layer)  # [P, C]
    targets = position_targets(cache, cfg)  # [P]
    head = build_sprm_head(cache.hidden_size, seed=cfg.seed).eval()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = RolloutBatches(cache, cfg.batch_rollouts, generator, trained_rollouts(cache, cfg))
    rows: list[dict[str, Any]] = [{"step": 0, **(evaluate(head, 0) if evaluate else {})}]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout masks
        for step in tqdm(range(cfg.steps), desc=f"head ({cfg.labels})", unit="step", disable=not progress):
            rollouts = batches.next()  # [b]
            positions, batch_rows = batches.positions(rollouts)  # [k], [k]
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            row: dict[str, Any] = {"step": step + 1}
            if logged:  # the batch as the head scores it before this update (as the reference logs)
                row.update(batch_fc(head, features[positions], batch_rows, cache.correct[rollouts]))
            row.update(train_step(head, optimizer, features[positions], targets[positions], cfg, step))
            due = bool(cfg.eval_every) and (step + 1) % cfg.eval_every == 0
            if evaluate is not None and (due or step + 1 == cfg.steps):
                row.update(evaluate(head, step + 1))
                logged = True
            if logged:
                rows.append(row)
    return HeadRun(head.eval(), tuple(rows), time.perf_counter() - started)


# -- the trained head as a reflective checkpoint --------------------------------------------------


def save_reflective_head(head: nn.Sequential, policy_dir: str | Path, feature_layer: int, out_dir: str | Path) -> Path:
    """Write the frozen policy with this head as a reflective folder (transformers files,
    score_module.pt, sprm.json with the feature layer) that `ReflectiveModel.from_pretrained`,
    `TransformersPolicy.from_pretrained(..., with_step_head=True)` and `SPRMScorer` load."""
    lm, tokenizer = load_checkpoint(policy_dir)
    return ReflectiveModel(lm, head.eval(), feature_layer).save_pretrained(out_dir, tokenizer)
