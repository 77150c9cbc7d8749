"""Pins from a mutation review of the session's refusals and input checks.

Each test pins a behaviour a surviving mutant changed: the Best-of-N curve of a run whose policy
returned fewer candidates than its N still reaches N and counts the short problems; countdown's
stall counter restarts with each new problem (a long drawing is no stall); arith names the size
of a too-small TEST split at once (its share of the hash space is the small one); quick_eval's
generate lets a RuntimeError other than torch's non-finite sampling one through unchanged;
load_checkpoint leaves transformers' logging verbosity as it found it, on success and on refusal;
a generate request refuses every per-request sampling option (a score request ignores them);
read_rows reads the suffixes in any case and names TSV and CSV files; serve's address check
binds as uvicorn does (a port in TIME_WAIT is free) and names a host IDNA cannot encode; --watch's
bounds are inclusive; a run-folder mismatch that no override can resume offers no empty
"add ``"; a folder of score_module.pt alone is a checkpoint folder, one of weights without
config.json is not. No model is trained; everything runs on CPU in a few seconds.

Run: `.venv/bin/python -m pytest tests/test_refusal_pins.py`
"""
from __future__ import annotations

import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers.utils import logging as hf_logging

from experiments import quick_eval
from experiments.model_folder_target import model_folder_files
from experiments.plot import watch_seconds
from experiments.search import ConfigMismatchError, claim_run_dir, mismatch_advice
from experiments.serve import address_problem
from experiments.services.api_schemas import FieldError, GenerateRequest, ScoreRequest
from experiments.sweep_metrics import run_metrics
from experiments.tasks import arith, countdown
from experiments.tasks.arith import ArithConfig
from experiments.tasks.loader_errors import DataFormatError, read_rows
from policies.checkpoint import DamagedCheckpointError, load_checkpoint
from test_arith import counting_draws
from test_model_folder import SHAPE
from test_scaling import cand, row
from tiny_checkpoint import save_tiny_checkpoint

# -- sweep_metrics: the Best-of-N curve of a run short of candidates -------------------------------


def test_a_run_with_every_problem_short_of_candidates_still_reaches_its_configured_n():
    # the policy returned 3 of n=4 candidates for every problem: the curve goes to bon@4 (N from
    # the config, not from the most candidates any problem has) and every problem is counted short
    three = [cand("1", True, 0.8), cand("5", False, 0.1), cand("6", False, 0.2)]
    m = run_metrics([row("a", three, 2, 10, n=4), row("b", three, 2, 10, n=4), row("c", three, 3, 10, n=4)])
    assert m["budget"] == 4
    assert {"bon@4", "maj@4", "wmaj@4", "pass@4"} <= set(m["best_of_n"])
    assert "bon@3" not in m["best_of_n"]
    assert m["best_of_n_short_problems"] == 3


# -- countdown: a new problem restarts the stall count --------------------------------------------


def test_countdown_draws_longer_than_a_stall_in_total_are_no_stall(monkeypatch):
    # with the split not enumerable (MAX_ENUMERATED 0) a stall is an error; a count whose drawing
    # takes far more than STALL_DRAWS draws in all, each run without a new problem short, is none
    monkeypatch.setattr(countdown, "MAX_ENUMERATED", 0)
    monkeypatch.setattr(countdown, "STALL_DRAWS", 50)
    calls = counting_draws(monkeypatch, countdown, "_draw", limit=10**6)
    problems = countdown.generate_problems("train", 150, seed=0)
    assert len(problems) == 150 and len({p.question for p in problems}) == 150
    assert calls[0] > 3 * countdown.STALL_DRAWS  # the drawing was longer than a stall


# -- arith: the test split's size is named before any draw ----------------------------------------


def test_a_count_beyond_the_test_split_fails_at_once_naming_its_size(monkeypatch):
    # the test split is 1 of TEST_MODULUS shares of the space: its (small) share decides whether
    # the split is counted up front; the other share skipped the count and drew instead
    small = ArithConfig(min_ops=1, max_ops=2, max_number=9, max_value=30, operations=("+", "-"))
    calls = counting_draws(monkeypatch, arith, "_draw_operations", limit=0)
    with pytest.raises(ValueError, match=r"count=400: the test split of .* holds only 291 distinct problems "
                                         r"\(of 1400 in both splits\); ask for at most 291"):
        arith.generate_problems("test", 400, seed=0, cfg=small)
    assert calls[0] == 0


# -- quick_eval: other RuntimeErrors of generate pass through -------------------------------------


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1


class _RaisingModel:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate(self, **kwargs):
        raise self.error


def test_a_runtime_error_of_generate_that_is_not_about_non_finite_logits_passes_through_unchanged():
    error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(RuntimeError) as caught:
        quick_eval._generate(_RaisingModel(error), _Tokenizer(), {}, {}, 4, 1)
    assert caught.value is error and not isinstance(caught.value, quick_eval.NonFiniteLogitsError)
    # torch's multinomial error is the one turned into NonFiniteLogitsError
    nan = RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    with pytest.raises(quick_eval.NonFiniteLogitsError):
        quick_eval._generate(_RaisingModel(nan), _Tokenizer(), {}, {}, 4, 1)


# -- checkpoint: transformers' logging verbosity is restored --------------------------------------


def test_load_checkpoint_leaves_transformers_verbosity_as_it_was_after_a_load_and_a_refusal(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", SHAPE)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        load_checkpoint(folder)
        assert hf_logging.get_verbosity() == hf_logging.WARNING
        config = json.loads((folder / "config.json").read_text())  # "wider in config.json"
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
        with pytest.raises(DamagedCheckpointError, match="of other shapes than config.json"):
            load_checkpoint(folder)
        assert hf_logging.get_verbosity() == hf_logging.WARNING
    finally:
        hf_logging.set_verbosity(before)


# -- api_schemas: per-request sampling options ----------------------------------------------------

# the sampling options the server sets for every request, or lacks (spelt out, not read from the
# module: a name dropped from SERVER_SAMPLING_OPTIONS would be a silently ignored option again)
SAMPLING_OPTIONS = ("top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


@pytest.mark.parametrize("name", SAMPLING_OPTIONS)
def test_a_generate_request_refuses_every_server_sampling_option_unless_null(name):
    with pytest.raises(FieldError) as caught:
        GenerateRequest.model_validate({"prefix_prompt": "Q: 1+1?", name: 0.5})
    assert caught.value.field == name and caught.value.status_code == 422
    assert str(caught.value).startswith(f"{name}: cannot be set per request")
    assert GenerateRequest.model_validate({"prefix_prompt": "Q: 1+1?", name: None}).prefix_prompt == "Q: 1+1?"


def test_a_score_request_ignores_sampling_options():
    request = ScoreRequest.model_validate({"text": "Q: 1+1? A: 2", "top_p": 0.9, "presence_penalty": 1.5})
    assert request.text == "Q: 1+1? A: 2" and request.return_all_scores is False


# -- loader_errors: suffixes in any case -----------------------------------------------------------


def test_read_rows_reads_an_upper_case_parquet_suffix_as_parquet(tmp_path):
    path = tmp_path / "rows.PARQUET"
    pq.write_table(pa.Table.from_pylist([{"question": "q?", "answer": "w\n#### 7"}]), path)
    assert [record for _, record in read_rows(path)] == [{"question": "q?", "answer": "w\n#### 7"}]


@pytest.mark.parametrize(("name", "text", "kind"), [
    ("rows.tsv", "question\tanswer\nq\t#### 1\n", "TSV"),
    ("rows.CSV", "question,answer\nq,#### 1\n", "CSV"),
], ids=["tsv", "CSV"])
def test_read_rows_names_tsv_and_csv_files_in_any_case(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataFormatError, match=rf"a {kind} file: the benchmark loaders read JSON Lines, a JSON array "
                                              r"or parquet \(\.parquet\); convert it"):
        list(read_rows(path))


# -- serve: the address check ---------------------------------------------------------------------


def test_a_port_left_in_time_wait_by_a_closed_connection_is_free():
    # the server side closes first, so its end of the connection holds the port in TIME_WAIT (a
    # server just stopped); uvicorn binds with SO_REUSEADDR, and so must the check
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    server.close()
    client.close()
    assert address_problem("127.0.0.1", port) is None


def test_a_host_with_a_label_over_63_characters_is_a_message_not_a_traceback():
    host = "a" * 70 + ".x"  # IDNA cannot encode it: a UnicodeError, not a gaierror
    message = address_problem(host, 8000)
    assert message is not None and message.startswith(f"cannot serve on --host {host}: no such address")


# -- plot: --watch bounds --------------------------------------------------------------------------


def test_watch_seconds_takes_both_bounds():
    assert watch_seconds("0.1") == 0.1
    assert watch_seconds("86400") == 86400.0


# -- search: advice for a run folder of another config --------------------------------------------


def test_a_mismatch_no_override_can_resume_only_says_use_another_out_dir(tmp_path):
    assert mismatch_advice(tmp_path, []) == "use another out_dir (or delete that folder)"
    claim_run_dir(tmp_path, {"seed": 0, "scorer": {"_target_": "a.A"}})
    (tmp_path / "records.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ConfigMismatchError) as caught:  # a scorer class is no override to go on with
        claim_run_dir(tmp_path, {"seed": 0, "scorer": {"_target_": "b.B"}})
    message = str(caught.value)
    assert message.endswith("use another out_dir (or delete that folder)")
    assert "or add `" not in message


# -- model_folder_target: what makes a model or checkpoint folder ---------------------------------


def test_a_score_head_alone_is_a_checkpoint_folder_and_weights_without_config_are_none(tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    (head / "score_module.pt").write_bytes(b"x")
    assert model_folder_files(head) == ["score_module.pt"]
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"x")
    assert model_folder_files(weights) == []
