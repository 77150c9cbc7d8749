"""A search run folder remembers which weights its rows came from (`experiments/run_weights.py`):
a model trained again at the same path is refused on resume, an untouched one is not read again,
the same weights under another path pass.

    .venv/bin/python -m pytest tests/test_run_weights.py
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from experiments import run_weights
from experiments.run_weights import WEIGHTS_FILE, WeightsChangedError, check_run_weights, model_folders
from experiments.search import run_search_experiment
from policies.checkpoint import load_checkpoint, save_checkpoint
from test_experiment_configs import TINY, composed
from tiny_checkpoint import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def policy(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "policy" / "final")


def train_again_in_place(folder: Path) -> None:
    lm, tokenizer = load_checkpoint(folder)
    with torch.no_grad():
        next(lm.parameters()).add_(0.01)
    save_checkpoint(lm, tokenizer, folder)


def test_model_folders_are_the_paths_that_hold_weights(policy, tmp_path):
    (tmp_path / "tokenizer_only").mkdir()
    (tmp_path / "tokenizer_only" / "config.json").write_text("{}")
    config = {"policy": {"path": str(policy)}, "scorer": {"path": str(tmp_path / "tokenizer_only")},
              "task": {"path": str(policy)}}
    assert model_folders(config) == {"policy.path": policy.resolve()}  # a served PRM's folder holds no weights
    assert model_folders({"policy": {"path": str(tmp_path / "missing")}}) == {}  # the loader names it


def test_a_model_trained_again_in_place_is_refused(policy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    folders = {"policy.path": policy}
    check_run_weights(out, folders, has_records=False)
    saved = json.loads((out / WEIGHTS_FILE).read_text())
    assert saved["policy.path"]["path"] == str(policy) and len(saved["policy.path"]["fingerprint"]) == 64
    monkeypatch.setattr(run_weights, "weights_fingerprint", lambda folder: pytest.fail("read untouched weights"))
    check_run_weights(out, folders, has_records=True)  # untouched: the stat says so
    monkeypatch.undo()
    train_again_in_place(policy)
    with pytest.raises(WeightsChangedError, match=rf"{out} holds rows searched with other weights than "
                                                  rf"policy.path={policy} holds now"):
        check_run_weights(out, folders, has_records=True)
    assert json.loads((out / WEIGHTS_FILE).read_text()) == saved  # the record stays the old weights'
    check_run_weights(out, folders, has_records=False)  # no rows yet: bound to today's weights


def test_the_same_weights_touched_or_moved_still_resume(policy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    check_run_weights(out, {"policy.path": policy}, has_records=False)
    weights = policy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched: hashed again
    check_run_weights(out, {"policy.path": policy}, has_records=True)
    moved = Path(shutil.copytree(policy, tmp_path / "elsewhere"))
    check_run_weights(out, {"policy.path": moved}, has_records=True)
    assert json.loads((out / WEIGHTS_FILE).read_text())["policy.path"]["path"] == str(moved)


def test_a_damaged_record_is_named(policy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHTS_FILE).write_text('{"policy.path": ')
    with pytest.raises(ValueError, match=f"{out / WEIGHTS_FILE} is not readable"):
        check_run_weights(out, {"policy.path": policy}, has_records=True)


def test_the_search_command_refuses_rows_of_a_policy_trained_again(policy, tmp_path):
    """The demo's sweeps and any rerun of one command: rows of the old policy were resumed into
    the new one's, one table of two models."""
    out = tmp_path / "search"
    base = [f"policy.path={policy}", f"out_dir={out}"] + TINY
    run_search_experiment(composed(base))
    rows = (out / "records.jsonl").read_text()
    run_search_experiment(composed(base))  # the same weights: resumes, nothing to do
    train_again_in_place(policy)
    with pytest.raises(WeightsChangedError, match="trained again in place"):
        run_search_experiment(composed(base))
    assert (out / "records.jsonl").read_text() == rows


def test_a_head_saved_over_a_frozen_backbone_is_other_weights(policy, tmp_path):
    """A head trained again (train_head's final/: the same backbone bytes) mixed two heads' rows."""
    from policies.model_folder import HEAD_FILES
    from policies.reflective_model import SPRM_CONFIG_FILE
    from scorers.sprm_head import SCORE_MODULE_FILE

    assert HEAD_FILES == (SCORE_MODULE_FILE, SPRM_CONFIG_FILE)
    (policy / SPRM_CONFIG_FILE).write_text('{"feature_layer": -2}\n')
    out = tmp_path / "run"
    out.mkdir()
    check_run_weights(out, {"policy.path": policy}, has_records=False)
    (policy / SPRM_CONFIG_FILE).write_text('{"feature_layer": -1}\n')
    with pytest.raises(WeightsChangedError):
        check_run_weights(out, {"policy.path": policy}, has_records=True)


def test_a_folder_missing_on_one_rerun_keeps_its_record(policy, tmp_path):
    """Moved away to retrain, rerun by mistake (the loader's 'does not exist'), retrained in place:
    the record was dropped on the failed rerun and the new model resumed into the old rows."""
    out = tmp_path / "run"
    out.mkdir()
    check_run_weights(out, {"policy.path": policy}, has_records=False)
    check_run_weights(out, {}, has_records=True)  # model_folders left the missing folder out
    train_again_in_place(policy)
    with pytest.raises(WeightsChangedError):
        check_run_weights(out, {"policy.path": policy}, has_records=True)


def test_the_demo_sweep_searches_again_the_runs_of_a_policy_trained_again(policy, tmp_path, capsys):
    """The demo's sweep stopped at its last stage on the refusal, after retraining everything
    before it; it owns its runs, so it searches them again: those of its checkpoint, at any budget
    (a larger sweep's run left behind joined the table with old rows), and only those: a run of
    another model (even under a sweep's name) or a linked folder stays (the diff reviews)."""
    from experiments.demo_sweep import SweepSpec, drop_runs_of_other_weights

    sweep = tmp_path / "sweep_arith"
    spec = SweepSpec(out_dir=sweep, checkpoint=str(policy), strategies=("best_of_n", "beam"), budgets=(4,))
    mine = save_tiny_checkpoint(tmp_path / "mine" / "final")
    elsewhere = tmp_path / "elsewhere" / "beam_4"
    runs = ((sweep / "best_of_n_4", policy), (sweep / "best_of_n_8", policy), (elsewhere, policy),
            (sweep / "my_run", mine), (sweep / "beam_8", mine))
    for run_dir, model in runs:
        run_search_experiment(composed([f"policy.path={model}", f"out_dir={run_dir}"] + TINY))
    (sweep / "beam_4").symlink_to(elsewhere)
    assert drop_runs_of_other_weights(spec) == []
    train_again_in_place(policy)
    train_again_in_place(mine)
    assert drop_runs_of_other_weights(spec) == [sweep / "best_of_n_4", sweep / "best_of_n_8"]
    assert not (sweep / "best_of_n_4").exists() and not (sweep / "best_of_n_8").exists()
    for kept in (sweep / "my_run", sweep / "beam_8", elsewhere):
        assert (kept / "records.jsonl").is_file()
    assert "best_of_n_4 holds rows of other weights of policy.path (trained again): searched again" in capsys.readouterr().err


def test_a_served_model_changed_behind_the_same_url_is_refused(tmp_path):
    # policy=openai saved model: null and fingerprinted only its local tokenizer folder: a server
    # restarted with another checkpoint resumed into the old rows
    from types import SimpleNamespace

    from experiments.run_weights import check_served_models, served_models

    def served(name):
        return SimpleNamespace(client=SimpleNamespace(served_model=lambda: SimpleNamespace(name=name)))

    assert served_models({"policy": served("/models/A"), "scorer": object()}) == {"policy.served_model": "/models/A"}
    out = tmp_path / "run"
    out.mkdir()
    check_run_weights(out, {}, has_records=False)
    check_served_models(out, {"policy.served_model": "/models/A"}, has_records=False)
    check_served_models(out, {"policy.served_model": "/models/A"}, has_records=True)  # the same: resumes
    with pytest.raises(WeightsChangedError, match=r"the served model '/models/A', but its server now serves "
                                                  r"'/models/B' \(policy.served_model\)"):
        check_served_models(out, {"policy.served_model": "/models/B"}, has_records=True)
    check_run_weights(out, {}, has_records=True)  # the folders' check keeps the served record
    assert json.loads((out / WEIGHTS_FILE).read_text()) == {"policy.served_model": {"model": "/models/A"}}
