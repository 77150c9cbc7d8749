"""Pins for dataset-loader behaviours that a mutation review found unpinned elsewhere.

Synthetic files in tmp_path and small generated tasks only (no shared data, no model): the whole
file runs in about a second on one core. What is pinned: SFT pairs come from the train split
(arith and countdown), and about half the countdown pairs solve their problem
(COUNTDOWN_SOLVED_SHARE); a C-Eval answer is exactly one letter, and its prompt is the stripped
model_input in the plain "Question: ...\\nAnswer:" form; an AIME question drops the boxed
instruction together with the newline before it; a JSON array with CRLF line ends loads, each
item on its own line; a bool is no int (math500 level, AIME parquet extra_info.index); MATH-500
levels are 1-5; an unclosed think span cut before its first step parses is "unfinished" and
counts in the last-step table; the countdown report's oracle is pass@n (any rollout correct); a
blank config path and a folder given as the data file are refused with clear errors.

Run: `.venv/bin/python -m pytest tests/test_loader_pins.py`
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

import experiments.sft_tasks as sft_tasks
from experiments import countdown_failures
from experiments.countdown_failures import RolloutDiagnosis, diagnose, last_step_table
from experiments.tasks import aime, arith, ceval, countdown, gsm8k, math500, prompts
from experiments.tasks.benchmark_split import BenchmarkConfig
from experiments.tasks.countdown_steps import Rules
from experiments.tasks.loader_errors import DataFormatError, read_json_array, resolve_data_file
from test_benchmarks import GOOD_MATH, _ceval_item
from test_task_inputs import _write_rows

SMALL_COUNTDOWN_TRAIN = 400  # the SFT module draws from 9k train problems (~14 s); 400 keep it fast


@pytest.fixture
def small_countdown(monkeypatch):
    """Countdown SFT pairs drawn from SMALL_COUNTDOWN_TRAIN train problems."""
    monkeypatch.setattr(sft_tasks, "COUNTDOWN_TRAIN_PROBLEMS", SMALL_COUNTDOWN_TRAIN)


def countdown_train_problems() -> list:
    return countdown.generate_problems("train", SMALL_COUNTDOWN_TRAIN, seed=0, cfg=countdown.CountdownConfig())


# ---------------------------------------------------------------------------------------------
# SFT pairs


def test_arith_sft_pairs_are_train_problems_never_test_ones():
    test_prompts = {arith.prompt_text(p) for p in arith.generate_problems("test", 200, seed=0, cfg=arith.ArithConfig())}
    pairs = sft_tasks.get_sft_task("arith").training_pairs(arith.ArithConfig(), 200, 0)
    assert len(pairs) == 200
    assert not {prompt for prompt, _ in pairs} & test_prompts


def test_countdown_sft_pairs_are_train_problems_never_test_ones(small_countdown):
    task = sft_tasks.get_sft_task("countdown")
    pairs = task.training_pairs(task.default_config, 200, 0)
    test_prompts = {countdown.prompt_text(p) for p in countdown.generate_problems("test", 200, seed=0, cfg=task.default_config)}
    train_prompts = {countdown.prompt_text(p) for p in countdown_train_problems()}
    assert not {prompt for prompt, _ in pairs} & test_prompts
    assert {prompt for prompt, _ in pairs} <= train_prompts


def test_about_half_the_countdown_sft_pairs_solve_their_problem(small_countdown):
    task = sft_tasks.get_sft_task("countdown")
    pairs = task.training_pairs(task.default_config, 400, 0)
    problems = {countdown.prompt_text(p): p for p in countdown_train_problems()}
    solved = sum(countdown.grade(problems[prompt], completion) for prompt, completion in pairs)
    assert 0.4 <= solved / len(pairs) <= 0.6, solved


# ---------------------------------------------------------------------------------------------
# C-Eval


@pytest.mark.parametrize("answer", ["AB", ""])
def test_a_ceval_answer_is_exactly_one_letter(tmp_path, answer):
    path = tmp_path / "ceval.json"
    path.write_text(json.dumps([_ceval_item(answer)], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataFormatError) as caught:
        ceval.load_ceval(path)
    assert caught.value.field == "answer" and "'answer'" in str(caught.value)


def test_the_ceval_prompt_is_the_stripped_model_input_in_the_plain_form(tmp_path):
    item = _ceval_item()
    assert item["model_input"].startswith("\n") and item["model_input"].endswith("\n")
    path = tmp_path / "ceval.json"
    path.write_text(json.dumps([item], ensure_ascii=False), encoding="utf-8")
    [problem] = ceval.load_ceval(path)
    assert ceval.prompt_text(problem) == f"Question: {item['model_input'].strip()}\nAnswer:"


# ---------------------------------------------------------------------------------------------
# AIME


def test_the_aime_question_drops_the_instruction_and_its_newline(tmp_path):
    row_prompt = prompts.math_user_message("What is $1+1$?")
    path = _write_rows(tmp_path / "aime.jsonl", [{"prompt": row_prompt, "answer": 2}])
    [problem] = aime.load_aime(24, path)
    assert problem.question == "What is $1+1$?"
    assert aime.prompt_text(problem) == f"Question: {row_prompt}\nAnswer:"  # the file's prompt, unchanged


def _parquet_rows(index):
    return [{"question": "q0", "reward_model": {"ground_truth": {"target": "7"}}, "extra_info": {"index": index}}]


def test_an_aime_parquet_index_that_is_a_bool_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "aime.parquet"
    pq.write_table(pa.Table.from_pylist(_parquet_rows(3)), path)
    assert [p.id for p in aime.load_aime(24, path)] == ["aime24-3"]
    pq.write_table(pa.Table.from_pylist(_parquet_rows(True)), path)
    with pytest.raises(DataFormatError, match="expected int, got bool") as caught:
        aime.load_aime(24, path)
    assert caught.value.field == "extra_info.index"


# ---------------------------------------------------------------------------------------------
# MATH-500 and the shared row checks


def test_a_math500_level_that_is_a_bool_is_refused_naming_the_field(tmp_path):
    path = _write_rows(tmp_path / "math.jsonl", [{**GOOD_MATH, "level": True}])
    with pytest.raises(DataFormatError, match="expected int, got bool") as caught:
        math500.load_math500(path)
    assert caught.value.field == "level" and "'level'" in str(caught.value)


@pytest.mark.parametrize("level", [0, 6])
def test_math500_levels_outside_1_to_5_are_refused(tmp_path, level):
    path = _write_rows(tmp_path / "math.jsonl", [{**GOOD_MATH, "level": level}])
    with pytest.raises(DataFormatError, match=f"expected a level in 1-5, got {level}") as caught:
        math500.load_math500(path)
    assert caught.value.field == "level"
    for good in (1, 5):
        path = _write_rows(tmp_path / "ok.jsonl", [{**GOOD_MATH, "level": good}])
        assert math500.load_math500(path)[0].meta["level"] == good


def test_a_crlf_indented_json_array_loads_with_each_items_first_line(tmp_path):
    path = tmp_path / "items.json"
    path.write_bytes(b'[\r\n  {"a": 1},\r\n\r\n  {"a": 2,\r\n   "b": 3}, {"a": 4},\r\n  {"a": 5}\r\n]\r\n')
    assert [(where.line, record["a"]) for where, record in read_json_array(path)] == [(2, 1), (4, 2), (5, 4), (6, 5)]
    items = [_ceval_item(), _ceval_item(id=1)]
    text = json.dumps(items, ensure_ascii=False, indent=1)
    (tmp_path / "ceval.json").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    problems = ceval.load_ceval(tmp_path / "ceval.json")
    assert [p.id for p in problems] == ["ceval-math-0", "ceval-math-1"]
    second_item_line = 2 + json.dumps(items[0], ensure_ascii=False, indent=1).count("\n") + 1
    assert [p.meta["line"] for p in problems] == [2, second_item_line]


def test_a_blank_config_path_is_refused():
    with pytest.raises(ValueError, match=r"BenchmarkConfig.path='   ' must be a file path or null"):
        BenchmarkConfig(path="   ")


def test_a_folder_given_as_the_data_file_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"benchmark file not found: {re.escape(str(tmp_path))}"):
        resolve_data_file(tmp_path, "gsm8k/test.jsonl")
    with pytest.raises(FileNotFoundError, match="benchmark file not found"):
        gsm8k.load_gsm8k("test", tmp_path)


# ---------------------------------------------------------------------------------------------
# countdown_failures


CUT_BEFORE_A_STEP = RolloutDiagnosis(False, "unfinished", None, False, None)


def test_a_span_cut_inside_its_only_step_is_unfinished_and_unparsed():
    assert diagnose((1, 2, 3), 6, Rules(), "<think>\n1 +", False) == CUT_BEFORE_A_STEP


def _table_counts(table: str) -> int:
    """The sum of the correct and incorrect columns over the table's rows."""
    rows = [line.split("|")[3:5] for line in table.splitlines()[2:]]
    return sum(int(good) + int(bad) for good, bad in rows)


def test_the_last_step_table_counts_every_diagnosis_unparsed_ones_included():
    ds = [CUT_BEFORE_A_STEP, RolloutDiagnosis(True, None, None, True, True), RolloutDiagnosis(False, "malformed", 1, False, None)]
    table = last_step_table(ds)
    assert "| False | unparsed | 0 | 2 |" in table and "| True | True | 1 | 0 |" in table
    assert _table_counts(table) == len(ds)


def test_the_oracle_is_pass_at_n():
    # 2 problems of 4 rollouts; only problem 0's first rollout is correct: pass@4 is 1/2
    correct = torch.tensor([True, False, False, False, False, False, False, False])
    assert countdown_failures._oracle(SimpleNamespace(num_problems=2, n=4, correct=correct)) == 0.5
    assert countdown_failures._oracle(SimpleNamespace(num_problems=2, n=4, correct=~correct)) == 1.0
