"""Checkpoint and exact resume of the joint GRPO + SPR trainer (`python -m experiments.train`).

Layout of a run folder:
    config.yaml             the resolved config; resuming with a result-relevant difference is refused
    reference/              the frozen initial policy (a transformers folder): the KL reference
    heldout_rollouts.jsonl  the fixed held-out rollouts, made once at the start
    metrics.jsonl           one row per step (row 0: the held-out baseline before any update)
    ckpt-<step>/            a checkpoint every checkpoint_every steps (the newest `keep` kept)
    last/                   the latest checkpoint: what a rerun of the same command resumes from

A checkpoint folder is a `ReflectiveModel` folder (transformers files, score_module.pt,
sprm.json: `ReflectiveModel.from_pretrained` and `TransformersPolicy.from_pretrained(...,
with_step_head=True)` load it as is) plus `joint_state.pt`: step, data position, elapsed time,
both optimisers' states, and the RNG states (python, numpy, torch) of every process. Folders are
written to a temporary sibling and renamed (`policies.checkpoint.atomic_directory`): a kill
never leaves half a checkpoint.

Resuming (`resume_point`): last/ when it is complete, else the newest complete ckpt-<K> (a
folder whose files are missing or truncated, e.g. by a full disk or a hand, is passed over and
the reason kept, as is a missing last/); a run folder with checkpoint folders of which none is complete is a
`DamagedCheckpointError` naming each folder's fault, so a rerun never starts over on top of it.

Usage:
    reflective, tok = load_policy_with_head("outputs/checkpoints/tiny-arith/final", head_seed=0)
    save_joint_checkpoint(out / "ckpt-10", reflective, tok, state)
    state = load_joint_state(out / "last")              # JointTrainState
    point = resume_point(out)                           # ResumePoint (folder, state, model) or None
    restore_rng(state.rng[rank])

Tests: `.venv/bin/pytest tests/test_train_loop.py`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.checkpoint import (
    REQUIRED_FILES, DamagedCheckpointError, atomic_directory, load_checkpoint, load_torch_file, write_checkpoint_files,
)
from policies.reflective_model import (
    DEFAULT_FEATURE_LAYER, SPRM_CONFIG_FILE, ReflectiveModel, is_saved_layer, saved_feature_layer,
)
from scorers.sprm_head import SCORE_MODULE_FILE, build_sprm_head, save_score_module

STATE_FILE = "joint_state.pt"
LAST = "last"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)$")


@dataclass(frozen=True)
class JointTrainState:
    """What a checkpoint holds besides the model.

    step: optimizer steps done (rollout batches trained on).
    data_position: prompts consumed from the training stream (all processes together).
    elapsed_s: wall time spent in the loop so far.
    actor_optimizer, head_optimizer: the two AdamW state dicts.
    rng: per process (index = process rank) the `capture_rng` dict.
    world_size: processes that trained (a resume must use as many).
    """

    step: int
    data_position: int
    elapsed_s: float
    actor_optimizer: dict
    head_optimizer: dict
    rng: tuple[dict, ...]
    world_size: int


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU) RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def load_policy_with_head(
    directory: str | Path, head_seed: int = 0, feature_layer: int | None = DEFAULT_FEATURE_LAYER
) -> tuple[ReflectiveModel, Any]:
    """(ReflectiveModel, tokenizer) from a checkpoint folder, in float32 to train; a folder without
    score_module.pt (an SFT policy) gets a fresh head (seeded) reading `feature_layer` (None:
    DEFAULT_FEATURE_LAYER). A folder with a head keeps it (head_seed unused) and its layer (None:
    its sprm.json's), made float32 if it was saved in bf16 / fp16 (a reference-format folder):
    AdamW on bf16 weights rounds away every update smaller than half a bf16 step, which at head
    learning rates is nearly all of them. ValueError when its sprm.json names another layer than
    feature_layer, counted from either end (a head reads the layer it was trained on:
    `reflective_model.is_saved_layer`). FileNotFoundError names a missing file."""
    directory = Path(directory)
    if (directory / SCORE_MODULE_FILE).is_file():
        if feature_layer is not None and not is_saved_layer(directory, feature_layer):
            saved = saved_feature_layer(directory)
            source = SPRM_CONFIG_FILE if (directory / SPRM_CONFIG_FILE).is_file() else f"the reference's, no {SPRM_CONFIG_FILE}"
            raise ValueError(
                f"{directory}'s head reads hidden layer {saved} ({source}) but run.feature_layer={feature_layer}: "
                f"set run.feature_layer={saved} (or null: the head's own) to train that head, or start from an SFT "
                "policy for a fresh head"
            )
        reflective, tokenizer = ReflectiveModel.from_pretrained(directory, feature_layer=feature_layer)
        reflective.head.float()
        return reflective, tokenizer
    lm, tokenizer = load_checkpoint(directory)
    head = build_sprm_head(int(lm.config.hidden_size), seed=head_seed)
    layer = DEFAULT_FEATURE_LAYER if feature_layer is None else feature_layer
    return ReflectiveModel(lm, head, layer).eval(), tokenizer


def save_joint_checkpoint(directory: Path, reflective: ReflectiveModel, tokenizer: Any, state: JointTrainState) -> Path:
    """The reflective model's folder (the layout of `ReflectiveModel.save_pretrained`) plus
    joint_state.pt, all in one atomic rename."""
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(reflective.lm, tokenizer, tmp)
        save_score_module(reflective.head, tmp)
        (tmp / SPRM_CONFIG_FILE).write_text(json.dumps({"feature_layer": reflective.feature_layer}) + "\n")
        torch.save(asdict(state), tmp / STATE_FILE)
    return directory


def load_joint_state(directory: Path) -> JointTrainState:
    """joint_state.pt of a checkpoint folder; FileNotFoundError / DamagedCheckpointError name the file
    (also one that loads but holds no JointTrainState: a KeyError before)."""
    path = Path(directory) / STATE_FILE
    raw = load_torch_file(path, map_location="cpu", weights_only=False)
    names = [f.name for f in fields(JointTrainState)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DamagedCheckpointError(f"{path} holds no training state of experiments.train (found {keys}; "
                                     f"expected {', '.join(names)})")
    return JointTrainState(**{**raw, "rng": tuple(raw["rng"])})


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a rerun continues from: its folder, saved state, model and tokenizer;
    passed_over: why each newer checkpoint folder was not used, a missing last/ included (empty
    when it is last/)."""

    directory: Path
    state: JointTrainState
    reflective: ReflectiveModel
    tokenizer: Any
    passed_over: tuple[str, ...] = ()


def checkpoint_folders(out_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first: last/ (when there), then ckpt-<K> by K descending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    numbered = sorted(
        ((int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    return ([out_dir / LAST] if (out_dir / LAST).is_dir() else []) + [p for _, p in numbered]


def missing_files(directory: Path) -> list[str]:
    """The files of a complete checkpoint folder that `directory` lacks."""
    return [name for name in (*REQUIRED_FILES, SCORE_MODULE_FILE, SPRM_CONFIG_FILE, STATE_FILE) if not (Path(directory) / name).is_file()]


def load_checkpoint_folder(directory: Path) -> tuple[JointTrainState, ReflectiveModel, Any]:
    """(state, model, tokenizer) of one checkpoint folder; FileNotFoundError names its missing
    files, DamagedCheckpointError a truncated or corrupted one."""
    missing = missing_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory} has no {', '.join(missing)}")
    state = load_joint_state(directory)
    reflective, tokenizer = ReflectiveModel.from_pretrained(directory)
    return state, reflective, tokenizer


def resume_point(out_dir: Path) -> ResumePoint | None:
    """The newest complete checkpoint of out_dir (last/ first, then ckpt-<K> by K descending), or
    None when out_dir holds no checkpoint folder (a fresh start). A run whose checkpoint folders
    are all incomplete or damaged is a DamagedCheckpointError naming each one's fault; so is a
    missing last/ beside the copy `atomic_directory` moved aside (it started the run afresh)."""
    last = Path(out_dir) / LAST
    aside = sorted(Path(out_dir).glob(f".{LAST}.old-*"), key=lambda p: p.stat().st_mtime)  # atomic_directory's previous copy, newest last
    if aside and not last.exists():  # a write of last/ cut between its two renames: which is newest is the user's call
        raise DamagedCheckpointError(
            f"{last} is missing but {aside[-1]} holds the checkpoint before it (a checkpoint write was cut off): "
            f"rename it to {last} to resume from it, or remove it to resume from the newest ckpt-<K>; nothing was deleted"
        )
    folders = checkpoint_folders(out_dir)
    # a resume from a ckpt-<K> says why last/ was not used when last/ is gone too (deleted, or a
    # kill between a checkpoint's ckpt-<K> and its copy to last/)
    passed_over = [] if last.is_dir() else [f"{last} is {'not a folder' if last.exists() else 'missing'}"]
    for directory in folders:
        try:
            state, reflective, tokenizer = load_checkpoint_folder(directory)
        except (FileNotFoundError, DamagedCheckpointError) as error:
            passed_over.append(str(error))
            continue
        return ResumePoint(directory, state, reflective, tokenizer, tuple(passed_over))
    if folders:
        raise DamagedCheckpointError(
            f"{out_dir} holds a run but no complete checkpoint to resume from ({'; '.join(passed_over)}). "
            f"Nothing was deleted: restore the files, or pass another out_dir= to start a new run"
        )
    return None


def copy_folder(src: Path, dst: Path) -> None:
    """src's files and folders into dst, each OSError raised as it happens: shutil.copytree gathers
    them into a shutil.Error that carries no errno, so a full disk while copying a checkpoint to
    last/ read as a bug (a traceback) instead of the one-line storage error."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copy2(path, target)


def publish_checkpoint(
    out_dir: Path, reflective: ReflectiveModel, tokenizer: Any, state: JointTrainState, numbered: bool, keep: int
) -> Path:
    """Write out_dir/last (and first out_dir/ckpt-<step> when `numbered`, copied to last), then
    drop all but the newest `keep` numbered checkpoints (keep 0: keep all). Returns last."""
    out_dir = Path(out_dir)
    if not numbered:
        return save_joint_checkpoint(out_dir / LAST, reflective, tokenizer, state)
    numbered_dir = save_joint_checkpoint(out_dir / f"ckpt-{state.step}", reflective, tokenizer, state)
    with atomic_directory(out_dir / LAST) as tmp:
        copy_folder(numbered_dir, tmp)
    if keep > 0:
        steps = sorted(int(m.group(1)) for p in out_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
        for step in steps[:-keep]:
            shutil.rmtree(out_dir / f"ckpt-{step}", ignore_errors=True)
    return out_dir / LAST

