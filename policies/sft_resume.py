"""The resume machinery of the SFT trainer (`policies.sft`): the run folder's checkpoints, the
run's identity, and a Ctrl-C that stops at a step boundary.

Layout of out_dir:
    out_dir/last/    the latest checkpoint (every checkpoint_every steps, on Ctrl-C, at the end): a
                     loadable model directory plus trainer_state.pt (optimizer, step, elapsed
                     time, RNG states, loss history, the run's identity); train_sft on the same
                     out_dir resumes from it.
    out_dir/final/   the trained model (save_checkpoint format); train_sft returns this path.
    out_dir/sft_summary.json   config, steps, time, tokens/s, final loss, per-step history.

Resuming (`resume_point`, `check_resumable`): a resume must train the same run. Its identity (the
SFTConfig, a digest of the training pairs, the starting model's shape and weights, the
tokenizer's vocabulary, the caller's run_info such as the task) is saved with every checkpoint;
a resume whose identity differs is refused with an SFTError naming each differing key. Only the
"how long / how" keys in RESUMABLE_KEYS may change: max_steps and max_minutes (a larger budget is
how a run trains longer; from the resume on, the learning rate follows the new budget's schedule,
so it rises from the old floor to where the longer schedule is at that point: an extended run is
not bit-identical to one given the longer budget from the start), checkpoint_every, num_threads
(what the run learns is the same up to float rounding: another thread count sums in another
order, so the weights are not bit-identical to an unbroken run's), eval_every, eval_max_examples.
A damaged or missing last/ in a folder that holds a run is an SFTError naming it, never a silent
fresh start. Ctrl-C stops after the current step, saves last/ and raises TrainingInterrupted (a
KeyboardInterrupt); a second Ctrl-C aborts at once.

This module does not import `policies.sft` (which imports it): a `cfg` here is the run's
`policies.sft.SFTConfig`, read only through `dataclasses.asdict`.

Usage (what `policies.sft.train_sft` does):
    last = resume_point(out_dir)                        # out_dir/last, None (fresh start) or SFTError
    model, tokenizer, state = load_training_checkpoint(last)
    changed = check_resumable(last, saved_identity(state), run_identity(cfg, pairs, model, tok, run_info))
    with stop_at_step_boundary() as stop:               # policies.step_boundary: stop.requested after Ctrl-C
        ...
    save_training_checkpoint(out_dir / LAST, model, tokenizer, optimizer, progress, cfg, identity)

Tests: `.venv/bin/pytest tests/test_sft.py tests/test_sft_cli.py`.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from policies.checkpoint import atomic_directory, check_checkpoint, load_checkpoint, load_torch_file, write_checkpoint_files
from policies.train_state import STATE_FILE as JOINT_STATE_FILE  # a joint training run's last/ holds it
from treesearch.config_diff import config_differences

STATE_FILE = "trainer_state.pt"
# what a trainer state holds (`save_training_checkpoint`), besides its identity (or, before identities, its config)
STATE_KEYS: tuple[str, ...] = ("step", "elapsed_s", "tokens", "history", "optimizer", "rng")
SUMMARY_FILE = "sft_summary.json"
LAST, FINAL = "last", "final"
# identity keys a resume may change: how long the run trains and how it is run, not what it learns
# (num_threads: up to float rounding, another thread count summing in another order)
BUDGET_KEYS: tuple[str, ...] = ("sft.max_steps", "sft.max_minutes")
RESUMABLE_KEYS: tuple[str, ...] = BUDGET_KEYS + (
    "sft.checkpoint_every", "sft.num_threads", "sft.eval_every", "sft.eval_max_examples",
)
# the flags of `python -m experiments.train_sft` that set them (the eval keys have none there)
RESUMABLE_FLAGS: tuple[str, ...] = ("--max-steps", "--minutes", "--checkpoint-every", "--threads")


# SFTError is also policies.sft's error for a bad setting: it lives here, the module sft imports
class SFTError(ValueError):
    """A problem the user must fix: a bad setting, a run folder that cannot be resumed (another
    config, a damaged checkpoint). Command lines print it as one line, without a traceback."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM: terminated) during training: out_dir/last holds the run at `step`,
    rerunning resumes it."""

    def __init__(self, step: int, last: Path, terminated: bool = False) -> None:
        how = "terminated" if terminated else "interrupted"
        super().__init__(f"{how}: saved {last} at step {step}; rerun the same command to resume")
        self.step, self.last, self.terminated = step, last, terminated

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------
# Trainer state: save, find and load a checkpoint


@dataclass
class TrainerProgress:
    """Mutable counters of one run (saved in trainer_state.pt)."""

    step: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0  # real (non-pad) tokens forwarded
    history: list | None = None  # [{"step", "loss", "lr", "elapsed_s", "eval_loss"?}, ...]
    resumes: list | None = None  # [{"step", "changed": ["sft.max_steps: 30 -> 40", ...]}, ...]


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def save_training_checkpoint(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer, progress: TrainerProgress, cfg: Any, identity: Mapping[str, Any],
) -> None:
    """Model directory + trainer_state.pt, written atomically."""
    state = {
        "step": progress.step,
        "elapsed_s": progress.elapsed_s,
        "tokens": progress.tokens,
        "history": progress.history,
        "resumes": progress.resumes,
        "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
        "config": asdict(cfg),
        "identity": dict(identity),
    }
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(model, tokenizer, tmp)
        torch.save(state, tmp / STATE_FILE)


def _first_sentence(err: BaseException) -> str:
    """'ErrorType: the first sentence of its message' (torch's read errors go on for lines)."""
    return f"{type(err).__name__}: {str(err).split('. ')[0].strip()}"


def start_over_hint(out_dir: Path) -> str:
    return f"this trainer keeps no older checkpoint: to train from scratch, remove {out_dir} or use another out_dir (--out)"


def resume_point(out_dir: Path) -> Path | None:
    """out_dir/last when it holds a complete trainer checkpoint; None when out_dir holds no run
    (a fresh start). Anything between is an SFTError naming the damaged or missing part: a
    folder that holds a run (last/, final/, sft_summary.json, or a checkpoint write cut between
    its two renames) is never silently trained over."""
    last = out_dir / LAST
    if last.exists():
        if (last / JOINT_STATE_FILE).is_file():  # read as a damaged SFT checkpoint before
            raise SFTError(f"{out_dir} holds a joint training run of experiments.train ({last / JOINT_STATE_FILE}), "
                           "not an SFT run; give train_sft another --out")
        if not (last / STATE_FILE).is_file():
            raise SFTError(
                f"cannot resume from {last}: it has no {STATE_FILE} (a damaged checkpoint); {start_over_hint(out_dir)}"
            )
        try:
            check_checkpoint(last)
        except FileNotFoundError as err:
            raise SFTError(f"cannot resume: {err} (a damaged checkpoint); {start_over_hint(out_dir)}") from err
        return last
    aside = sorted(out_dir.glob(f".{LAST}.old-*"))  # atomic_directory's previous copy, cut before its rename
    if aside:
        raise SFTError(
            f"{last} is missing but {aside[-1]} holds the previous checkpoint (a checkpoint write was cut off); "
            f"rename it to {last} to resume from it"
        )
    for name in (FINAL, SUMMARY_FILE):
        if (out_dir / name).exists():
            raise SFTError(
                f"{out_dir} holds a run ({out_dir / name}) but no {last} to resume from; {start_over_hint(out_dir)}"
            )
    return None




def load_training_checkpoint(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """(model, tokenizer, trainer state) from a folder resume_point accepted; an SFTError names a
    file that does not load (truncated, corrupt)."""
    path = directory / STATE_FILE
    try:  # a truncated or corrupted file: DamagedCheckpointError (a ValueError) naming it
        state = load_torch_file(path, map_location="cpu", weights_only=False)
    except ValueError as err:
        raise SFTError(f"cannot resume: {err}; {start_over_hint(directory.parent)}") from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing or not ("identity" in state or "config" in state):
        raise SFTError(f"cannot resume: {path} is no trainer state of train_sft (it lacks {', '.join(missing) or 'identity'}); "
                       f"{start_over_hint(directory.parent)}")
    try:
        model, tokenizer = load_checkpoint(directory)
    except Exception as err:  # safetensors, json, tokenizers: each reader has its own error types
        raise SFTError(
            f"cannot resume: the model in {directory} does not load ({_first_sentence(err)}); "
            f"{start_over_hint(directory.parent)}"
        ) from err
    return model, tokenizer, state


# ---------------------------------------------------------------------------------------------
# The run's identity: what a resume must share with the run it continues

MODEL_SHAPE_KEYS: tuple[str, ...] = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
)


def _digest(chunks: Iterator[bytes]) -> str:
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    return sha.hexdigest()[:16]


def data_fingerprint(examples: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{"examples": count, "sha256": digest of every (prompt, completion) in order}."""
    return {"examples": len(examples), "sha256": _digest(f"{p}\0{c}\0".encode() for p, c in examples)}


def model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """The starting model's shape (its config's MODEL_SHAPE_KEYS) and a digest of its weights
    (which also tells apart initialisation seeds and starting checkpoints)."""
    shape = {key: getattr(model.config, key) for key in MODEL_SHAPE_KEYS if hasattr(model.config, key)}
    tensors = sorted(model.state_dict().items())
    weights = (name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors)
    return {**shape, "weights_sha256": _digest(weights)}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """{"size": vocabulary size, "sha256": digest of the (token, id) pairs}."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {"size": len(tokenizer), "sha256": _digest(iter([json.dumps(vocab).encode()]))}


def run_identity(
    cfg: Any, examples: Sequence[tuple[str, str]], model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None, run_info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What defines a run: "sft" (the config), "data", and where given "model" and "tokenizer"
    (the starting ones) and "run" (the caller's run_info, e.g. {"task": "arith"})."""
    identity: dict[str, Any] = {"sft": asdict(cfg), "data": data_fingerprint(examples)}
    if model is not None:
        identity["model"] = model_fingerprint(model)
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer_fingerprint(tokenizer)
    if run_info is not None:
        identity["run"] = dict(run_info)
    return identity


def saved_identity(state: Mapping[str, Any]) -> dict[str, Any]:
    """The identity a trainer state was saved with (a state from before identities: its config)."""
    return dict(state["identity"]) if "identity" in state else {"sft": state["config"]}


def _reading_order(line: str) -> int:
    """Settings the user typed (run_info such as the task, then the config) before the
    fingerprints that follow from them (data, model, tokenizer)."""
    return {"run": 0, "sft": 1}.get(line.split(".", 1)[0], 2)


def _flag_hint(refused: Sequence[str], saved: Mapping[str, Any]) -> str:
    """" (add --bf16)" when the bf16 setting differs (its default follows the CPU: a run moved to
    another kind of machine): the flag of the saved run's value; else ""."""
    if not any(line.startswith("sft.bf16: ") for line in refused):
        return ""
    return f" (add {'--bf16' if saved['sft']['bf16'] else '--no-bf16'}: the run's bf16 setting)"


def check_resumable(last: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The differences in RESUMABLE_KEYS ('key: saved -> current', for the record), or an SFTError
    naming every other difference (_reading_order: a task change reads first).
    Parts one side lacks (a model not passed, a state saved before identities) are not compared,
    nor run_info keys one side lacks (a caller that records more or less, such as the demo's
    run of a policy against the train_sft command: the data and model fingerprints already hold
    what they say)."""
    shared = [part for part in current if part in saved]
    a, b = {part: saved[part] for part in shared}, {part: current[part] for part in shared}
    if isinstance(a.get("run"), dict) and isinstance(b.get("run"), dict):  # the keys both record
        a["run"], b["run"] = ({key: value for key, value in one.items() if key in other}
                              for one, other in ((a["run"], b["run"]), (b["run"], a["run"])))
    refused = sorted(config_differences(a, b, RESUMABLE_KEYS), key=_reading_order)
    if refused:
        allowed = ", ".join(key.removeprefix("sft.") for key in RESUMABLE_KEYS)
        raise SFTError(
            f"{last} holds a run of another config ({'; '.join(refused)}); a resume may change only {allowed} "
            f"(train_sft's {', '.join(RESUMABLE_FLAGS)}): "
            f"rerun with the saved settings{_flag_hint(refused, a)}, or use another out_dir (--out) for this one"
        )
    return config_differences(a, b)
