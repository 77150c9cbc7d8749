"""A run's folder is never a model folder: a run written into `<run>/last` or `<run>/ckpt-4` was
lost without a word when the run owning it saved its next checkpoint (the folder is replaced
whole, or rotated away), and one written into a model folder mixed its files with the model's.
The commands that write a run folder (search, train, train_sft, train_head) refuse such a folder
before anything is written:

    check_not_model_folder(Path("outputs/train/grpo/last"), "out_dir")
    # ValueError: out_dir=outputs/train/grpo/last is a model or checkpoint folder (config.json,
    # model.safetensors, joint_state.pt): ...; use another out_dir

Tests: `.venv/bin/pytest tests/test_model_folder_target.py`.
"""
from __future__ import annotations

from pathlib import Path

# the weights beside a config.json that make a folder a model (a single file, shards' index, .bin)
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# what the project's checkpoints hold besides: a joint run's state, an SPRM head, an SFT run's state
CHECKPOINT_FILES: tuple[str, ...] = ("joint_state.pt", "score_module.pt", "trainer_state.pt")


def model_folder_files(folder: Path) -> list[str]:
    """The files that make folder a model or checkpoint folder (config.json with weights, a
    checkpoint's state or head), or [] when it is none."""
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()][:1]
    model = ["config.json", *weights] if weights and (folder / "config.json").is_file() else []
    return model + [name for name in CHECKPOINT_FILES if (folder / name).is_file()]


def check_not_model_folder(folder: Path, option: str) -> None:
    """ValueError naming `option` (how the user gave the folder: "out_dir", "--out") when folder
    is a model or checkpoint folder (`model_folder_files`)."""
    found = model_folder_files(folder)
    if found:
        raise ValueError(
            f"{option}={folder} is a model or checkpoint folder ({', '.join(found)}): a run written into it is lost "
            "when the run that owns it saves its next checkpoint (the folder is replaced whole), and its files mix "
            f"with the model's; use another {option}")
