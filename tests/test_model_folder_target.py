"""A model or checkpoint folder is refused as a run's folder by every command that writes one
(experiments/model_folder_target.py): a run written into `<run>/last` was lost without a word when
that run saved its next checkpoint, and one written into a model folder mixed its files with it.

    .venv/bin/python -m pytest -q tests/test_model_folder_target.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.model_folder_target import check_not_model_folder, model_folder_files
from tiny_checkpoint import save_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("run") / "last")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_what_makes_a_folder_a_model_or_checkpoint_folder(model_dir, tmp_path):
    assert model_folder_files(model_dir) == ["config.json", "model.safetensors"]
    (tmp_path / "config.json").write_text("{}")
    assert model_folder_files(tmp_path) == []  # a config alone: a run's own files may be anything else
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    (tmp_path / "joint_state.pt").write_bytes(b"x")
    assert model_folder_files(tmp_path) == ["config.json", "pytorch_model.bin.index.json", "joint_state.pt"]
    assert model_folder_files(tmp_path / "absent") == []
    with pytest.raises(ValueError, match=rf"^--out={tmp_path} is a model or checkpoint folder \(config.json, "
                                         r"pytorch_model.bin.index.json, joint_state.pt\): a run written into it is lost "
                                         r"when the run that owns it saves .*; use another --out$"):
        check_not_model_folder(tmp_path, "--out")


def test_a_training_run_into_a_checkpoint_folder_is_refused(model_dir):
    from experiments.train import run_training
    from test_train_loop import composed, tiny

    before = files_of(model_dir)
    with pytest.raises(ValueError, match=rf"out_dir={model_dir} is a model or checkpoint folder \(config.json, model.safetensors\)"):
        run_training(composed(tiny(model_dir, model_dir, "run.max_steps=1")))
    assert files_of(model_dir) == before


def test_a_search_into_a_checkpoint_folder_is_refused(model_dir):
    from experiments.search import ConfigMismatchError, claim_run_dir

    before = files_of(model_dir)
    with pytest.raises(ConfigMismatchError, match=rf"out_dir={model_dir} is a model or checkpoint folder"):
        claim_run_dir(model_dir, {"seed": 0})
    assert files_of(model_dir) == before


def test_sft_and_head_training_into_a_checkpoint_folder_are_refused(model_dir, capsys):
    from experiments import train_sft
    from experiments.train_head import check_not_another_run

    before = files_of(model_dir)
    assert train_sft.main(["--out", str(model_dir), "--max-steps", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out={model_dir} is a model or checkpoint folder")
    with pytest.raises(ValueError, match=rf"--out={model_dir} is a model or checkpoint folder"):
        check_not_another_run(model_dir)
    assert files_of(model_dir) == before
