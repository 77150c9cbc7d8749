"""Pins for experiments/smollm2_eval.py behaviours that a mutation review found unpinned.

Hand-made configs, rows and run folders only: no model is loaded or converted, no GSM8K file is
read (stage_problems / run_metrics / stage_rows are stubbed where a stage would need them), no
subprocess. What is pinned: a rerun with another value of any non-free field (the seed included)
is refused once an output made with it exists, and so is a saved field the current config lacks;
--threads is free; EvalConfig refuses 0 for its >= 1 integer fields; the flexible regrading
regrades the chosen candidate's row-level `correct` and leaves a length-cut text without a final
number; stage_metrics' key sets (best_of_n: no @1 selector rows, conf_bon not bon; beam labelled
beam@<n>); tokens/s is tokens over seconds; rows that recorded no thread count stay unlabelled;
the SPRM's metrics are filed only under --sprm-grader's prefix; a search chunk holds
chunk_rows // (paths per problem) problems.

Run: `.venv/bin/python -m pytest tests/test_smollm2_pins.py`
"""
from __future__ import annotations

import json

import pytest

from experiments import smollm2_eval
from experiments.smollm2_eval import (
    FREE_FIELDS,
    LATE_FIELDS,
    EvalConfig,
    claim_config,
    collect_metrics,
    config_defaults,
    regraded,
    stage_metrics,
)
from treesearch.records import Problem

# a valid value other than the default of every field claim_config compares (not FREE_FIELDS)
OTHER_VALUES: dict[str, object] = {
    "model_dir": "/elsewhere/model", "problems": 21, "n": 16, "beam_width": 2, "max_depth": 41,
    "temperature": 0.7, "top_p": 0.9, "max_total_tokens": 255, "max_step_tokens": 127, "seed": 1,
    "chunk_rows": 33, "train_problems": 17, "train_n": 5, "labels": "outcome_bce", "head_steps": 301,
    "head_lr": 2e-3, "head_warmup_steps": 1, "feature_layer": -3, "sprm_grader": "strict",
    "batch_size": 127, "backend": "vllm", "dtype": "bfloat16",
}
POSITIVE_INTS = ("problems", "n", "beam_width", "max_depth", "max_total_tokens", "max_step_tokens", "chunk_rows",
                 "train_problems", "train_n", "head_steps", "batch_size", "threads")


def est(value: float) -> dict[str, float]:
    return {"mean": value, "low": value, "high": value}


def run_folder(tmp_path, output: str = "greedy.jsonl", saved: dict | None = None):
    """A run folder whose config.json holds the defaults (plus `saved`) and that has `output`."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**config_defaults(), **(saved or {})}))
    (out / output).parent.mkdir(parents=True, exist_ok=True)
    (out / output).write_text("")
    return out


def row(text: str, finish: str) -> dict:
    """A stored row of one candidate that the strict grader marked wrong (answer 42)."""
    return {"problem_id": "gsm8k-test-0", "question": "q", "answer": "42", "chosen": 0, "correct": False,
            "candidates": [{"text": text, "finish": finish, "answer": None, "correct": False}]}


# -- claim_config --------------------------------------------------------------------------------


def test_every_compared_field_has_an_other_value_here():
    # device's other values need a GPU torch sees: tests/test_smollm2_eval.py pins it on fake GPUs
    assert set(OTHER_VALUES) == set(config_defaults()) - set(FREE_FIELDS) - {"device"}


@pytest.mark.parametrize("field", sorted(OTHER_VALUES))
def test_another_value_of_a_field_is_refused_once_an_output_made_with_it_exists(tmp_path, field):
    output = LATE_FIELDS.get(field, ("greedy.jsonl",))[0]
    out = run_folder(tmp_path, output)
    before = (out / "config.json").read_text()
    cfg = EvalConfig(**{field: OTHER_VALUES[field]})
    with pytest.raises(ValueError, match=rf"holds a run of another config \({field}: .*\({output} made with it\)"):
        claim_config(cfg, out)
    assert (out / "config.json").read_text() == before


def test_a_seed_change_after_greedy_is_refused_and_config_json_keeps_the_seed(tmp_path):
    out = run_folder(tmp_path)
    with pytest.raises(ValueError, match=r"seed: 0 -> 1 \(greedy.jsonl made with it\)"):
        claim_config(EvalConfig(seed=1), out)
    assert json.loads((out / "config.json").read_text())["seed"] == 0


def test_a_saved_field_the_current_config_lacks_is_refused(tmp_path):
    out = run_folder(tmp_path, saved={"old_field": 1})
    with pytest.raises(ValueError, match=r"old_field: 1 -> None \(greedy.jsonl made with it\)"):
        claim_config(EvalConfig(), out)


def test_another_thread_count_is_accepted_on_a_folder_with_outputs(tmp_path):
    out = run_folder(tmp_path)
    claim_config(EvalConfig(threads=7), out)  # threads change nothing drawn


# -- EvalConfig ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", POSITIVE_INTS)
def test_zero_is_refused_for_an_integer_field_that_must_be_at_least_one(field):
    with pytest.raises(ValueError, match=rf"EvalConfig.{field}=0 must be an integer >= 1"):
        EvalConfig(**{field: 0})


# -- regrading and metrics -----------------------------------------------------------------------


def test_flexible_regrading_regrades_the_chosen_candidates_row_correct():
    (out,) = regraded([row("The answer is 42", "eos")], "flexible")
    assert out["candidates"][0]["correct"] is True
    assert out["correct"] is True
    (strict,) = regraded([row("The answer is 42", "eos")], "strict")
    assert strict["correct"] is False  # strict: as stored


def test_flexible_regrading_leaves_a_length_cut_text_without_a_final_number():
    (out,) = regraded([row("so far 42", "length")], "flexible")
    assert out["candidates"][0]["answer"] is None
    assert out["candidates"][0]["correct"] is False and out["correct"] is False
    (finished,) = regraded([row("so far 42", "eos")], "flexible")
    assert finished["correct"] is True  # the same text ended on EOS: its last number counts


def fake_run_metrics(rows):
    """run_metrics' shape for a best_of_n run of 4 samples (ladder 1, 2, 4), each value distinct."""
    curve = {f"{name}@{n}": est(i + n / 10) for i, name in enumerate(("bon", "maj", "wmaj", "pass")) for n in (1, 2, 4)}
    return {"accuracy": est(0.5), "best_of_n": curve}


def test_best_of_n_metrics_have_no_at_one_selector_rows_and_call_the_confidence_one_conf_bon(monkeypatch):
    monkeypatch.setattr(smollm2_eval, "run_metrics", fake_run_metrics)
    got = stage_metrics(EvalConfig(n=4), "best_of_n", [])
    assert sorted(got) == ["conf_bon@2", "conf_bon@4", "maj@2", "maj@4", "pass@1", "pass@2", "pass@4",
                           "wmaj@2", "wmaj@4"]
    curve = fake_run_metrics([])["best_of_n"]
    assert got["conf_bon@4"] == curve["bon@4"] and got["pass@1"] == curve["pass@1"]


def test_beam_metric_is_labelled_by_n_not_by_beam_width(monkeypatch):
    monkeypatch.setattr(smollm2_eval, "run_metrics", fake_run_metrics)
    assert stage_metrics(EvalConfig(n=8, beam_width=2), "beam", []) == {"beam@8": est(0.5)}


def test_tokens_per_s_is_generated_tokens_over_wall_seconds():
    rows = [{"compute": {"tokens_generated": 100, "wall_time_s": 2.0}}] * 2
    assert smollm2_eval._tokens_per_s(rows) == 50.0
    assert smollm2_eval._tokens_per_s([{"compute": {"tokens_generated": 30, "wall_time_s": 0.0}}]) == 0.0


@pytest.mark.parametrize("recorded, expected", [({}, []), ({"threads": 1}, [1])])
def test_collect_metrics_labels_a_stage_by_the_threads_its_rows_recorded(tmp_path, monkeypatch, recorded, expected):
    rows = [{"compute": {"tokens_generated": 10, "wall_time_s": 1.0}, **recorded}]
    monkeypatch.setattr(smollm2_eval, "stage_rows", lambda cfg, stage, out: rows if stage == "greedy" else None)
    monkeypatch.setattr(smollm2_eval, "regraded", lambda rows, grader: rows)
    monkeypatch.setattr(smollm2_eval, "stage_metrics", lambda cfg, stage, rows: {})
    metrics = collect_metrics(EvalConfig(threads=4), tmp_path)
    assert metrics["gsm8k.threads"] == {"greedy": expected}  # not the report's own --threads 4
    assert metrics["gsm8k.tokens_per_s"] == {"greedy": 10.0}


@pytest.mark.parametrize("grader, prefix, other", [("flexible", "gsm8k_flexible", "gsm8k"),
                                                    ("strict", "gsm8k", "gsm8k_flexible")])
def test_sprm_metrics_are_filed_only_under_the_sprm_graders_prefix(tmp_path, grader, prefix, other):
    (tmp_path / "sprm").mkdir()
    head = {"gsm8k.sprm_within_auc": 0.8, "gsm8k.sprm_bon@4": 0.4, "gsm8k.ci95": {"sprm_bon@4": [0.1, 0.7]}}
    (tmp_path / "sprm" / "metrics.json").write_text(json.dumps(head))
    metrics = collect_metrics(EvalConfig(n=4, sprm_grader=grader), tmp_path)  # no stage rows: none read
    assert sorted(k for k in metrics if "sprm" in k) == [f"{prefix}.sprm_bon@4", f"{prefix}.sprm_within_auc"]
    assert metrics[f"{prefix}.ci95"] == {"sprm_bon@4": [0.1, 0.7]} and metrics[f"{other}.ci95"] == {}


# -- chunking ------------------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage, settings, expected", [
    ("best_of_n", {"n": 8, "chunk_rows": 64}, 8),
    ("beam", {"n": 8, "beam_width": 2, "chunk_rows": 64}, 8),
    ("train", {"train_n": 4, "chunk_rows": 64}, 16),
    ("greedy", {"n": 8, "chunk_rows": 64}, 64),
    ("best_of_n", {"n": 8, "chunk_rows": 4}, 1),  # at least one problem
])
def test_a_chunk_holds_chunk_rows_over_paths_per_problem_problems(tmp_path, monkeypatch, stage, settings, expected):
    problems = [Problem(f"gsm8k-test-{i}", f"question {i}", str(i)) for i in range(64)]
    sizes = []

    def chunks(items, size):
        sizes.append(size)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def no_policy(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(smollm2_eval, "stage_problems", lambda cfg, stage: problems)
    monkeypatch.setattr(smollm2_eval, "chunks", chunks)
    monkeypatch.setattr(smollm2_eval, "make_policy", no_policy)
    with pytest.raises(Stop):
        smollm2_eval.run_search_stage(EvalConfig(**settings), stage, tmp_path, 1e18)
    assert sizes == [expected]



def test_stage_outputs_without_their_config_are_refused(tmp_path):
    # config.json deleted, greedy rows kept: a rerun with other settings wrote a new config.json and
    # its report labelled the old rows with the new max_total_tokens
    out = run_folder(tmp_path, "greedy.jsonl")
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match=r"holds greedy.jsonl but no config.json: the settings those rows were made "
                                         r"with are gone; restore config.json"):
        claim_config(EvalConfig(max_total_tokens=64), out)
    assert not (out / "config.json").exists()
