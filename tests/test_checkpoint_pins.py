"""Pins for checkpoint, run-weights and tiny-tokenizer behaviours that a mutation review found
unpinned elsewhere.

One tiny random checkpoint (tests/tiny_checkpoint.py, built once per module) and tokenizers
learned from a few lines of text: the file runs in a few seconds on one CPU core. What is pinned:
a model folder without config.json is named, not loaded (`check_model_folder`, `load_checkpoint`);
`weights_fingerprint(heads=False)` leaves the SPRM head files out while heads=True reads them;
a read-only file system (errno 30) is a storage error like a full disk or quota, also when
safetensors quotes it as "(os error 30)"; a run folder without rows takes the served model its
server names now (`check_served_models`); `torch_dtype` accepts only the DTYPES, as dtypes or
names; the tiny tokenizer's special ids are pad 0, bos 1, eos 2, a word seen once is not merged
into one token (min_frequency=2), its model_max_length is 1024 and its smallest vocab_size is
the byte alphabet plus the three special tokens.

Run: `.venv/bin/python -m pytest tests/test_checkpoint_pins.py`
"""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from experiments.cli_errors import is_storage_error
from experiments.run_weights import WEIGHTS_FILE, check_served_models
from policies.checkpoint import load_checkpoint, torch_dtype
from policies.disk_full import disk_full_error
from policies.model_folder import check_model_folder, weights_fingerprint
from policies.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer
from tiny_checkpoint import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL_CORPUS = ["What is 12 + 7? 12 + 7 = 19.\n\n#### 19"] * 50


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


@pytest.fixture(scope="module")
def small_tok():
    return build_tokenizer(corpus=SMALL_CORPUS, vocab_size=300)


def copy_of(checkpoint: Path, out: Path) -> Path:
    return Path(shutil.copytree(checkpoint, out))


def test_a_folder_without_config_json_is_named_not_loaded(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path / "no_config")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint folder {folder} has no config.json")):
        check_model_folder(folder)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_checkpoint(folder)


def test_the_backbone_fingerprint_leaves_the_sprm_head_out(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path / "reflective")
    (folder / "score_module.pt").write_bytes(b"head v1")
    (folder / "sprm.json").write_text('{"feature_layer": -1}')
    backbone, whole = weights_fingerprint(folder, heads=False), weights_fingerprint(folder, heads=True)
    assert backbone != whole
    (folder / "score_module.pt").write_bytes(b"head v2, trained again over the same backbone")
    assert weights_fingerprint(folder, heads=False) == backbone
    assert weights_fingerprint(folder, heads=True) != whole


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_a_quota_and_a_read_only_file_system_are_storage_errors(code):
    assert (errno.ENOSPC, errno.EDQUOT, errno.EROFS) == (28, 122, 30)
    assert is_storage_error(OSError(code, "x", "/mnt/out/final"))
    quoted = disk_full_error(Exception(f"Error while serializing: I/O error: some text (os error {code})"), "/mnt/out")
    assert quoted is not None and quoted.errno == code and quoted.filename == "/mnt/out"
    assert is_storage_error(quoted)


def test_a_run_without_rows_takes_the_model_its_server_serves_now(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHTS_FILE).write_text(json.dumps({"policy.served_model": {"model": "old-model"}}))
    check_served_models(out, {"policy.served_model": "new-model"}, has_records=False)  # no rows: no refusal
    assert json.loads((out / WEIGHTS_FILE).read_text()) == {"policy.served_model": {"model": "new-model"}}


@pytest.mark.parametrize("value", [torch.float64, torch.int8, "float64", "int8", "torch.float64"])
def test_torch_dtype_refuses_what_is_not_a_checkpoint_dtype(value):
    with pytest.raises(ValueError, match="is not one of float32, bfloat16, float16"):
        torch_dtype(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_dtype_accepts_the_checkpoint_dtypes_and_their_names(dtype):
    name = str(dtype).removeprefix("torch.")
    assert torch_dtype(dtype) is dtype
    assert torch_dtype(name) is dtype
    assert torch_dtype(f"torch.{name}") is dtype


def test_the_special_token_ids_are_pad_bos_eos_in_that_order(small_tok):
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>")
    assert (small_tok.pad_token_id, small_tok.bos_token_id, small_tok.eos_token_id) == (0, 1, 2)
    assert small_tok("1")["input_ids"][0] == 1  # <bos> first


def test_a_word_seen_once_is_not_merged_into_one_token():
    corpus = ["Ann has 12 coins.\n\nBob gives her 7 coins.\n\n#### 19", "Zed zorbs 4 quux.\n\n#### 4"] * 3
    tok = build_tokenizer(corpus=[*corpus, "a Zorbleflux"], vocab_size=2000)
    assert len(tok(" quux", add_special_tokens=False)["input_ids"]) == 1  # seen three times: merged
    once = tok(" Zorbleflux", add_special_tokens=False)["input_ids"]
    assert len(once) > 1 and tok.decode(once) == " Zorbleflux"


def test_the_tokenizer_takes_1024_tokens(small_tok, tmp_path):
    assert small_tok.model_max_length == 1024
    saved = build_tokenizer(tmp_path / "tok", corpus=SMALL_CORPUS, vocab_size=300)
    assert saved.model_max_length == 1024
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_the_smallest_vocabulary_is_the_byte_alphabet_and_the_special_tokens():
    assert 256 + len(SPECIAL_TOKENS) == 259
    with pytest.raises(ValueError, match=r"vocab_size=258; must be >= 259"):
        build_tokenizer(corpus=SMALL_CORPUS, vocab_size=258)
    assert len(build_tokenizer(corpus=SMALL_CORPUS, vocab_size=259)) >= 259
