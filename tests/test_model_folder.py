"""Model folders as the hub ships them (`policies/model_folder.py`): safetensors shards with an
index, one pytorch_model.bin, no generation_config.json all load (`load_checkpoint`, the external
PRM's head and output rows read from the weight files), and what a folder lacks is named: its
weights, a shard its index names, its tokenizer.

    .venv/bin/python -m pytest tests/test_model_folder.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from policies.checkpoint import check_checkpoint, load_checkpoint
from policies.model_folder import check_model_folder, weight_files
from policies.tiny_model import TinyModelConfig
from scorers.prm_readers import load_score_head, load_token_rows, read_tensors
from tiny_checkpoint import resaved, save_tiny_checkpoint, with_score_head

SHAPE = TinyModelConfig(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
IDS = torch.tensor([[1, 7, 9, 12, 5]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    single = save_tiny_checkpoint(root / "single", SHAPE)
    untied = save_tiny_checkpoint(root / "untied", dataclasses.replace(SHAPE, tie_embeddings=False))
    return {
        "single": single,
        "sharded": resaved(single, root / "sharded"),
        "bin": resaved(single, root / "bin", safe=False),
        "untied": resaved(untied, root / "untied_sharded"),
        "untied_bin": resaved(untied, root / "untied_bin", safe=False),
    }


def logits(directory: Path) -> torch.Tensor:
    model, _ = load_checkpoint(directory)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_hub_layouts_load_as_the_single_file_does(folders, kind):
    folder = folders[kind]
    assert not (folder / "generation_config.json").exists()
    files = weight_files(check_model_folder(folder))
    assert len(files) > 1 if kind == "sharded" else [f.name for f in files] == ["pytorch_model.bin"]
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        check_checkpoint(folder)  # this project's own checkpoints are stricter
    assert torch.equal(logits(folder), logits(folders["single"]))


@pytest.mark.parametrize("kind", ["single", "sharded", "bin", "untied", "untied_bin"])
def test_output_rows_are_read_from_any_layout_tied_or_not(folders, kind):
    model, _ = load_checkpoint(folders[kind])
    rows = load_token_rows(folders[kind], 9, 4)
    assert torch.equal(rows.weight, model.get_output_embeddings().weight[[9, 4]].detach())
    features = torch.randn(3, SHAPE.hidden)
    assert torch.allclose(rows(features), features @ model.get_output_embeddings().weight[[9, 4]].T.detach())


def test_a_score_head_loads_from_a_bin_file(folders, tmp_path):
    safe = with_score_head(folders["single"], tmp_path / "safe")
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (binary / name).write_bytes((safe / name).read_bytes())
    torch.save(load_file(str(safe / "model.safetensors")), binary / "pytorch_model.bin")
    features = torch.randn(4, SHAPE.hidden)
    head_safe, head_bin = load_score_head(safe, torch.float32), load_score_head(binary, torch.float32)
    assert torch.equal(head_safe(features), head_bin(features))
    assert set(read_tensors(binary, ("score.0.bias", "absent"))) == {"score.0.bias"}


def test_what_a_folder_lacks_is_named(folders, tmp_path):
    sharded = shutil.copytree(folders["sharded"], tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (sharded / gone).unlink()
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json names 1 shard\(s\) that are not there \({gone}\)"):
        load_checkpoint(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no weights: model.safetensors \(or model.safetensors.index.json\) or pytorch_model.bin"):
        check_model_folder(empty)
    weights_only = shutil.copytree(folders["single"], tmp_path / "no_tokenizer")
    (weights_only / "tokenizer.json").unlink()  # tokenizer_config.json alone: transformers' message named nothing
    with pytest.raises(FileNotFoundError, match=rf"{weights_only} has no tokenizer \(tokenizer.json or "
                                                r"tokenizer.model or vocab.json or vocab.txt or spiece.model\)"):
        load_checkpoint(weights_only)
    with pytest.raises(FileNotFoundError, match="does not exist$"):  # an absolute path needs no more
        check_model_folder(tmp_path / "absent")


def test_a_truncated_shard_is_named(folders, tmp_path):
    from policies.checkpoint import DamagedCheckpointError

    sharded = shutil.copytree(folders["sharded"], tmp_path / "sharded")
    shard = weight_files(sharded)[2]
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(DamagedCheckpointError, match=shard.name):
        load_checkpoint(sharded)


@pytest.mark.parametrize("change", ["renamed", "fewer layers in config.json", "wider in config.json"])
def test_weights_that_do_not_fit_the_config_are_named_not_loaded_at_random(folders, tmp_path, change):
    # transformers initialised the missing weights at random and dropped the rest: a search scored 0 in silence
    from safetensors.torch import save_file

    from policies.checkpoint import DamagedCheckpointError

    folder = Path(shutil.copytree(folders["single"], tmp_path / "folder"))
    if change == "renamed":
        tensors = load_file(str(folder / "model.safetensors"))
        save_file({f"lm.{name}": value for name, value in tensors.items()}, str(folder / "model.safetensors"))
        expected = r"\d+ weight\(s\) the model needs are not in its weight files .*weight\(s\) in its weight files are not"
    elif change == "fewer layers in config.json":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
        expected = r"\d+ weight\(s\) in its weight files are not the model's \(model.layers.1."
    else:  # transformers' RuntimeError pointed at "the above report"
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
        width = config["hidden_size"]
        expected = (rf"\d+ weight\(s\) of other shapes than config.json makes \(model.embed_tokens.weight "
                    rf"\[{config['vocab_size']}, {width}\] in the file, \[{config['vocab_size']}, {2 * width}\] by config.json")
    with transformers_log() as logged, pytest.raises(DamagedCheckpointError, match=f"checkpoint folder {folder}: " + expected):
        load_checkpoint(folder)
    assert "LOAD REPORT" not in logged.getvalue()  # transformers' table of every weight


@contextlib.contextmanager
def transformers_log() -> Iterator[io.StringIO]:
    """What transformers logs inside (its own handler keeps the stderr of when it was made, which
    pytest's capfd does not see)."""
    from transformers.utils import logging as hf_logging

    stream, root = io.StringIO(), hf_logging._get_library_root_logger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize("index", ['{"metadata": {}, "weight_map": {"a": "mod', '{"metadata": {}}'])
def test_a_damaged_weight_index_is_named(folders, tmp_path, index):
    from policies.checkpoint import DamagedCheckpointError

    sharded = shutil.copytree(folders["sharded"], tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(index)  # a bare JSONDecodeError / KeyError before
    with pytest.raises(DamagedCheckpointError, match="model.safetensors.index.json is damaged"):
        load_checkpoint(sharded)


def test_a_save_into_a_folder_of_other_files_is_refused_and_keeps_them(folders, tmp_path):
    # the save replaced the folder: train_cache.pt and notes.txt were deleted
    from policies.checkpoint import save_checkpoint

    model, tokenizer = load_checkpoint(folders["single"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"{mine} holds files but none of a model folder's"):
        save_checkpoint(model, tokenizer, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".mine*"))
    save_checkpoint(model, tokenizer, tmp_path / "empty")  # new, empty and model folders are written
    save_checkpoint(model, tokenizer, tmp_path / "empty")
    assert torch.equal(logits(tmp_path / "empty"), logits(folders["single"]))
    # a damaged model folder (config.json gone: a resumed training's last/, a conversion made again) is replaced
    (tmp_path / "empty" / "config.json").unlink()
    save_checkpoint(model, tokenizer, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_eos_ids_without_a_generation_config_are_config_jsons_on_every_backend(folders, tmp_path):
    """transformers and vLLM derive the generation config from config.json when the folder has
    none; the vLLM / OpenAI policies took the tokenizer's EOS alone, so a step ending on
    config.json's EOS was cut as "length" with the token in its text."""
    from policies.transformers_policy import _eos_ids
    from policies.vllm_policy import checkpoint_eos_ids

    folder = Path(shutil.copytree(folders["sharded"], tmp_path / "eos"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 11}))
    model, tokenizer = load_checkpoint(folder)
    assert tokenizer.eos_token_id != 11 and not (folder / "generation_config.json").exists()
    assert checkpoint_eos_ids(folder, tokenizer) == _eos_ids(model, tokenizer) == [tokenizer.eos_token_id, 11]


def test_writers_that_fill_the_disk_are_named_as_a_full_disk():
    # torch.save's short write and safetensors' SafetensorError are no OSError: a CLI printed
    # their traceback where a full disk is one `error: cannot write ...` line
    import errno

    from experiments.cli_errors import is_storage_error
    from policies.disk_full import disk_full_error

    short = disk_full_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 179712 vs 179604"), "out/last")
    assert short.errno == errno.ENOSPC and short.filename == "out/last" and is_storage_error(short)
    rust = disk_full_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "m")
    assert rust.errno == errno.ENOSPC and "Exception: Error while serializing" in rust.strerror
    assert disk_full_error(Exception("I/O error: Disk quota exceeded (os error 122)"), "m").errno == errno.EDQUOT
    for other in (Exception("(os error 2)"), RuntimeError("a bug"), OSError(errno.ENOSPC, "x"), KeyboardInterrupt()):
        assert disk_full_error(other, "m") is None


def test_an_atomic_directory_whose_writer_fills_the_disk_raises_a_storage_error(tmp_path):
    import errno

    from policies.checkpoint import atomic_directory

    out = tmp_path / "last"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the previous, good folder
    with pytest.raises(OSError) as caught:
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 179712 vs 179604")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and (out / "config.json").read_text() == "{}"


def test_an_atomic_directory_behind_a_symlink_is_written_where_it_points(tmp_path, monkeypatch):
    """A link to an empty folder was replaced by a folder; a dangling one failed with
    NotADirectoryError and left its temporary folder (a model's worth of disk) behind."""
    import os

    from policies import checkpoint
    from policies.checkpoint import atomic_directory

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "model")
    for link, target in ((tmp_path / "link", tmp_path / "target"), (tmp_path / "dangling", tmp_path / "nowhere" / "model")):
        with atomic_directory(link) as tmp:
            (tmp / "config.json").write_text("{}")
        assert link.is_symlink() and (target / "config.json").read_text() == "{}"
    assert not [p for p in tmp_path.rglob(".*tmp-*")]
    # a rename that fails puts the old folder back and leaves no temporary folder
    real = os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: real(a, b) if ".old-" in str(b) or ".old-" in str(a)
                        else (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(tmp_path / "target") as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
    assert (tmp_path / "target" / "config.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_missing_relative_folder_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch):
    # a default such as outputs/checkpoints/tiny-arith/final is read from the current directory:
    # "does not exist" alone told a user running from elsewhere nothing of where it was looked for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint folder outputs/x does not exist \(relative to the "
                                                rf"current directory, {re.escape(str(tmp_path))}\)$"):
        check_model_folder("outputs/x")
