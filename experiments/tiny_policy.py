"""The embedded default policies: reuse the cached tiny model of a task, or train it when missing.

    final = ensure_policy(Path("outputs/checkpoints/tiny-arith"), SFTConfig(), TinyModelConfig(), ArithConfig())
    final = ensure_policy(Path("outputs/checkpoints/tiny-countdown"), SFTConfig(), TinyModelConfig(),
                          CountdownConfig(), task="countdown")

The run folder holds `final/` (an ordinary transformers directory) once training has finished and
`last/` (resume state) while it runs; an interrupted run resumes from `last/` when it was made by
the same settings (else `policies.sft_resume.SFTError` names what differs). A `final/` folder with
a file missing is not silently reused: it is reported and written again from `last/` under the
settings its run was trained with (its sft_summary.json), so it is the policy that run made even
when the caller asks for another budget (an SFTError when `last/` is missing or damaged: the
folder is never silently trained over).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.sft_tasks import get_sft_task
from experiments.train_sft import DEFAULT_TRAIN_PROBLEMS
from policies.checkpoint import check_checkpoint
from policies.sft import SFTConfig, train_sft
from policies.sft_resume import SUMMARY_FILE
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer


# SFT settings that do not change the trained weights (how often to save or evaluate, threads)
NOT_THE_WEIGHTS = ("checkpoint_every", "eval_every", "eval_max_examples", "num_threads")


def cached_policy(run_dir: Path, sft: SFTConfig | None = None, run: dict[str, Any] | None = None) -> Path | None:
    """run_dir/final when it is a complete checkpoint, else None (saying what is missing). With
    sft (and run: `run_settings`), a policy trained with other settings (its sft_summary.json) is
    still used, with a note naming what differs: it is not retrained behind the user's back, nor
    passed off in silence."""
    final = run_dir / "final"
    if not final.exists():
        return None
    try:
        found = check_checkpoint(final)
    except FileNotFoundError as err:
        print(f"cached policy is incomplete, writing it again from {run_dir / 'last'}: {err}")
        return None
    note = None if sft is None else settings_note(run_dir, sft, run)
    if note is not None:
        print(note, file=sys.stderr)
    return found


def settings_note(run_dir: Path, sft: SFTConfig, run: dict[str, Any] | None = None) -> str | None:
    """A note when run_dir/sft_summary.json records SFT settings, or run settings (task config,
    model shape, training pairs: `run_settings`; a summary written before it kept them says
    nothing of them), that differ from those asked for (None when they agree or no summary says)."""
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
        saved, saved_run = summary.get("config") or {}, summary.get("run") or {}
    except (OSError, ValueError, AttributeError):
        return None
    wanted = json.loads(json.dumps(asdict(sft)))  # tuples as lists, as saved
    diffs = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in wanted.items()
             if key not in NOT_THE_WEIGHTS and saved.get(key) != value]
    diffs += [f"{key}: {saved_run.get(key)!r} -> {value!r}" for key, value in (run or {}).items()
              if key in saved_run and saved_run[key] != value and key != "split_version"]  # below, explained
    if run and "split_version" in run and saved_run.get("split_version", 1) != run["split_version"]:
        diffs.append(f"split_version: {saved_run.get('split_version', 1)!r} -> {run['split_version']!r}, its train "
                     "split held test problems of this one")
    if not diffs:
        return None
    return (f"note: the cached policy {run_dir / 'final'} was trained with other settings ({'; '.join(diffs)}); "
            f"it is used as it is: delete {run_dir} to train it with these")


def saved_settings(run_dir: Path) -> SFTConfig | None:
    """The SFT settings run_dir's finished run was trained with (its sft_summary.json), or None
    when no readable summary says."""
    try:
        saved = json.loads((run_dir / SUMMARY_FILE).read_text()).get("config")
        return SFTConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in saved.items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def ensure_policy(
    run_dir: Path,
    sft: SFTConfig,
    model: TinyModelConfig,
    task_cfg: Any,
    train_problems: int = DEFAULT_TRAIN_PROBLEMS,
    progress: bool = True,
    task: str = "arith",
) -> Path:
    """The trained policy's directory: the cached one, or a freshly trained (or resumed) one.
    task: an `experiments.sft_tasks` name; task_cfg: its difficulty config; train_problems: SFT
    pairs to draw (more than a run consumes)."""
    cached = cached_policy(run_dir, sft, run_settings(task, task_cfg, model, train_problems))
    if cached is not None:
        return cached
    saved = saved_settings(run_dir) if (run_dir / "final").exists() else None
    if saved is not None:  # an incomplete final/: resumed as its run ran, not trained on under these settings
        sft = saved
    else:
        print(f"no cached policy in {run_dir}: training the tiny {task} policy (SFT)")
    sft_task = get_sft_task(task)
    pairs = sft_task.training_pairs(task_cfg, train_problems, seed=sft.seed)
    tokenizer = build_tokenizer(corpus=sft_task.tokenizer_corpus(pairs))
    net = build_model(model, tokenizer)
    return train_sft(sft, pairs, run_dir, net, tokenizer, progress=progress,
                     run_info=run_settings(task, task_cfg, model, train_problems))


def run_settings(task: str, task_cfg: Any, model: TinyModelConfig, train_problems: int) -> dict[str, Any]:
    """What besides the SFT config makes the policy (sft_summary.json's "run", as JSON reads it
    back): the task, its difficulty config, the model's shape and the training pairs drawn."""
    settings = {"task": task, "train_problems": train_problems, "task_config": asdict(task_cfg), "model": asdict(model)}
    version = get_sft_task(task).split_version
    if version is not None:
        settings["split_version"] = version
    return json.loads(json.dumps(settings))
