"""What the task loaders do with bad input: files that are not UTF-8 (a byte-order mark loads), empty ids, GSM8K rows with an empty
question or a non-numeric final answer, a bad `count` for the generated tasks (arith,
countdown), and the hint of a missing data file. Synthetic files only (no shared data needed)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.search import load_task
from experiments.tasks import aime, arith, ceval, countdown, gsm8k, math500
from experiments.tasks.loader_errors import DATA_DIR_ENV, DataFormatError, default_data_dir, resolve_data_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "conf"
GOOD_ROWS = {
    "gsm8k": {"question": "q", "answer": "#### 1"},
    "math500": {"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2", "subject": "Algebra", "level": 1,
                "unique_id": "test/algebra/1.json"},
    "aime": {"prompt": "p", "answer": 1},
}
CEVAL_PROMPT = ("以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n1+1=____\nA. 2\nB. 3\nC. 4\nD. 5\n"
                "让我们一步一步思考。")
LOADERS = {
    "gsm8k": lambda path: gsm8k.load_gsm8k("test", path),
    "math500": math500.load_math500,
    "aime": lambda path: aime.load_aime(24, path),
}


def _write_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _write_rows(path: Path, rows: list[dict]) -> Path:
    return _write_bytes(path, [json.dumps(row).encode() for row in rows])


# ---------------------------------------------------------------------------------------------
# Files that are not UTF-8


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_jsonl_that_is_not_utf8_names_file_line_and_byte_offset(tmp_path, name):
    good = json.dumps(GOOD_ROWS[name]).encode()
    bad = good.replace(b'"', b'"\xff\xfe', 1)  # two bytes that no UTF-8 text holds, inside row 3
    path = _write_bytes(tmp_path / "rows.jsonl", [good, b"", bad])
    with pytest.raises(DataFormatError) as caught:
        LOADERS[name](path)
    offset = len(good) + 2 + bad.index(b"\xff")  # row 1 + newline, blank line 2, then into row 3
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 3, None)
    assert str(caught.value).startswith(f"{path}, line 3: not valid UTF-8: byte 0xff at byte offset {offset}")


def test_utf8_beyond_ascii_still_loads(tmp_path):
    path = _write_rows(tmp_path / "rows.jsonl", [{"question": "Zoë pays 5 €?", "answer": "#### 5"}])
    assert gsm8k.load_gsm8k("test", path)[0].question == "Zoë pays 5 €?"


def test_json_array_that_is_not_utf8_names_the_line(tmp_path):
    item = {"model_input": "x", "answer": "A", "sub": "math", "id": 0}
    text = "[\n" + json.dumps(item) + ",\n" + json.dumps(item) + "\n]"
    data = text.encode().replace(b'"x"', b'"x\xff"', 2)
    path = tmp_path / "ceval.json"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as caught:
        ceval.load_ceval(path)
    assert (caught.value.path, caught.value.line) == (str(path), 2)
    offset = data.index(b"\xff")
    assert f"byte offset {offset}" in str(caught.value)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_a_utf8_file_with_a_byte_order_mark_loads(tmp_path, name):
    # "Unexpected UTF-8 BOM" from the jsonl loaders; "expected a JSON array ('[')" from C-Eval's
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROWS[name]).encode() + b"\n")
    assert len(LOADERS[name](path)) == 1
    item = {"model_input": CEVAL_PROMPT, "answer": "A", "sub": "math", "id": 0}
    array = tmp_path / "ceval.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([item]).encode())
    assert [p.answer for p in ceval.load_ceval(array)] == ["A"]


def test_an_empty_ceval_subject_is_named(tmp_path):
    path = tmp_path / "ceval.json"
    path.write_text(json.dumps([{"model_input": CEVAL_PROMPT, "answer": "A", "sub": " ", "id": 0}]))
    with pytest.raises(DataFormatError) as caught:
        ceval.load_ceval(path)
    assert (caught.value.line, caught.value.field) == (1, "sub")


# ---------------------------------------------------------------------------------------------
# GSM8K rows


@pytest.mark.parametrize(
    "row, field",
    [
        ({"question": "", "answer": "#### 18"}, "question"),
        ({"question": " \n ", "answer": "#### 18"}, "question"),
        ({"question": "q", "answer": "so #### eighteen"}, "answer"),
        ({"question": "q", "answer": "#### 18 apples"}, "answer"),
        ({"question": "q", "answer": "#### 1,2"}, "answer"),
        ({"question": "q", "answer": "x\n#### five"}, "answer"),
    ],
)
def test_gsm8k_refuses_an_empty_question_and_a_non_numeric_answer(tmp_path, row, field):
    path = _write_rows(tmp_path / "rows.jsonl", [GOOD_ROWS["gsm8k"], row])
    with pytest.raises(DataFormatError) as caught:
        gsm8k.load_gsm8k("test", path)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 2, field)


def test_gsm8k_names_a_non_numeric_answer_as_such(tmp_path):
    # "#### five" was taken for a markdown heading: "no '#### <answer>' line", though there is one
    path = _write_rows(tmp_path / "rows.jsonl", [{"question": "q", "answer": "x\n#### five"}])
    with pytest.raises(DataFormatError, match="expected a number after '####'.*'five'"):
        gsm8k.load_gsm8k("test", path)


@pytest.mark.parametrize("answer", [1000, -3, "1000"])
def test_aime_refuses_an_answer_outside_0_to_999(tmp_path, answer):
    path = _write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "answer": answer}])
    with pytest.raises(DataFormatError, match="from 0 to 999") as caught:
        aime.load_aime(24, path)
    assert (caught.value.line, caught.value.field) == (1, "answer")


def test_aime_ids_count_rows_not_lines(tmp_path):
    # a blank first line made the first problem aime24-1 (and shifted every id after it)
    path = tmp_path / "rows.jsonl"
    path.write_text('\n{"prompt": "p", "answer": 5}\n\n{"prompt": "q", "answer": 6}\n')
    assert [(p.id, p.meta["line"]) for p in aime.load_aime(24, path)] == [("aime24-0", 2), ("aime24-1", 4)]


def test_gsm8k_numbers_with_commas_signs_and_decimals_load(tmp_path):
    answers = ["18", "1,000", "1,450,000", "-3", "2.5", "-1,200.75"]
    path = _write_rows(tmp_path / "rows.jsonl", [{"question": "q", "answer": f"x\n#### {a}"} for a in answers])
    assert [p.answer for p in gsm8k.load_gsm8k("test", path)] == ["18", "1000", "1450000", "-3", "2.5", "-1200.75"]


@pytest.mark.parametrize("name, field", [("math500", "problem"), ("math500", "answer"), ("aime", "prompt"),
                                         ("math500", "unique_id"), ("math500", "subject")])  # Problem(id="") before
def test_other_loaders_refuse_empty_question_text(tmp_path, name, field):
    path = _write_rows(tmp_path / "rows.jsonl", [{**GOOD_ROWS[name], field: "  "}])
    with pytest.raises(DataFormatError) as caught:
        LOADERS[name](path)
    assert (caught.value.line, caught.value.field) == (1, field)


# ---------------------------------------------------------------------------------------------
# count of the generated tasks


@pytest.mark.parametrize("module", [arith, countdown], ids=["arith", "countdown"])
@pytest.mark.parametrize("count", ["abc", 2.5, None, True, -1])
def test_generated_tasks_name_a_bad_count(module, count):
    task = module.__name__.rsplit(".", 1)[-1]
    with pytest.raises(ValueError, match=f"{task}: count={count!r} must be an integer >= 0"):
        module.generate_problems("test", count, seed=0)


@pytest.mark.parametrize("module", [arith, countdown], ids=["arith", "countdown"])
def test_generated_tasks_take_count_zero_like_the_benchmarks(module):
    assert module.generate_problems("test", 0, seed=0) == []


@pytest.mark.parametrize("value, shown", [("abc", "'abc'"), ("2.5", "2.5")])
def test_arith_count_from_the_hydra_command_line(value, shown):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("search", overrides=["task=arith", f"task.count={value}"])
    with pytest.raises(ValueError, match=f"arith: count={shown} must be an integer >= 0"):
        load_task(cfg.task)


# ---------------------------------------------------------------------------------------------
# The missing-file hint


def test_missing_file_hint_when_the_env_var_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as caught:
        gsm8k.load_gsm8k("test")
    message = str(caught.value)
    assert f"{tmp_path / 'gsm8k' / 'test.jsonl'}" in message
    assert f"looked in ${DATA_DIR_ENV}={tmp_path};" in message and f"set ${DATA_DIR_ENV}" not in message
    assert "task.config.path=..." in message


def test_missing_file_hint_when_the_env_var_is_unset(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as caught:
        resolve_data_file(None, "nothing-here/test.jsonl")
    message = str(caught.value)
    assert f"looked in the shared data folder {default_data_dir()};" in message
    assert f"set ${DATA_DIR_ENV} to a folder holding nothing-here/test.jsonl" in message
    assert "task.config.path=..." in message


def test_a_user_path_that_is_missing_gets_no_data_dir_hint(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        gsm8k.load_gsm8k("test", tmp_path / "absent.jsonl")
    assert DATA_DIR_ENV not in str(caught.value)


def test_hub_without_the_datasets_package_is_a_value_error(monkeypatch):
    # an ImportError: a 33-line traceback of experiments.search, exit 1, and a left-over run folder
    import sys

    import pytest

    from experiments.tasks.loader_errors import read_hub_rows

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError, match=r"task.config.hub=true needs the `datasets` package \(pip install datasets\)"):
        next(read_hub_rows("openai/gsm8k", "main", "test"))


def test_a_json_arrays_items_are_located_by_their_first_line(tmp_path):
    # each item's line was counted from the start of the text (quadratic in the file's size); it
    # is now counted on from the item before: the lines must stay those of each item's start
    from experiments.tasks.loader_errors import DataFormatError, read_json_array

    path = tmp_path / "items.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}, {"a": 4},\n  {"a": 5}\n]\n')
    assert [(where.line, record["a"]) for where, record in read_json_array(path)] == [(2, 1), (4, 2), (5, 4), (6, 5)]
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2}, 7\n]\n')
    with pytest.raises(DataFormatError, match=r"line 4.*expected a JSON object, got int"):
        list(read_json_array(path))


def test_gsm8k_ids_number_rows_and_a_hub_rows_repeat_is_named_as_a_row(tmp_path, monkeypatch):
    # the id was the line number: a blank line renamed every later problem (the same id then named
    # another problem than the hub's row of that number); a hub row's repeated id said "line 10"
    import sys
    import types

    rows = [{"question": f"q{k}", "answer": f"#### {k}"} for k in range(3)]
    plain, spaced = tmp_path / "plain.jsonl", tmp_path / "spaced.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spaced.write_text("\n" + json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    ids = [(p.id, p.question) for p in gsm8k.load_gsm8k("test", plain)]
    assert ids == [("gsm8k-test-1", "q0"), ("gsm8k-test-2", "q1"), ("gsm8k-test-3", "q2")]
    assert [(p.id, p.question) for p in gsm8k.load_gsm8k("test", spaced)] == ids
    assert [p.meta["line"] for p in gsm8k.load_gsm8k("test", spaced)] == [2, 4, 5]  # errors still name the line
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    hub = gsm8k.load_gsm8k("test", hub=True)
    assert [p.id for p in hub] == [i for i, _ in ids] and hub[1].meta["row"] == 2 and "line" not in hub[1].meta
    from experiments.tasks.benchmark_split import check_unique_ids

    with pytest.raises(DataFormatError, match=r"row 3: problem id 'gsm8k-test-1' repeats the one at row 1"):
        check_unique_ids([hub[0], hub[1], dataclasses.replace(hub[2], id=hub[0].id)], "gsm8k")


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_a_parquet_or_json_array_file_holds_the_same_records_as_jsonl(tmp_path, name):
    # a .parquet file (the hubs' GSM8K) was read as JSON Lines: "not valid UTF-8 ... save the file as UTF-8"
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD_ROWS[name], {**GOOD_ROWS[name], "question" if name == "gsm8k" else "problem": "again?"}]
    if name == "math500":
        rows[1]["unique_id"] = "test/algebra/2.json"
    jsonl = LOADERS[name](_write_rows(tmp_path / "rows.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text("\ufeff \n" + json.dumps(rows, indent=1))  # a BOM and blanks first
    parquet, array = LOADERS[name](tmp_path / "rows.parquet"), LOADERS[name](tmp_path / "rows.json")
    assert [(p.question, p.answer) for p in parquet] == [(p.question, p.answer) for p in jsonl] == [
        (p.question, p.answer) for p in array]
    assert parquet[1].meta["row"] == 2 and array[1].meta["line"] > 2 and len({p.id for p in parquet}) == 2


def test_a_csv_file_is_named_as_such_with_the_formats_read(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nq,#### 1\n")
    with pytest.raises(DataFormatError, match=r"rows.csv, line 1: a CSV file: the benchmark loaders read JSON Lines, "
                                              r"a JSON array or parquet \(.parquet\); convert it"):
        gsm8k.load_gsm8k("test", path)


def test_a_jsonl_ceval_file_loads_as_its_json_array_does(tmp_path):
    rows = [{"id": 0, "sub": "math", "answer": "A", "model_input": CEVAL_PROMPT}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    array = ceval.load_ceval(tmp_path / "c.json")
    assert [p.question for p in ceval.load_ceval(_write_rows(tmp_path / "c.jsonl", rows))] == [array[0].question]


def test_a_gsm8k_solution_with_windows_line_ends_keeps_its_answer(tmp_path):
    # "#### 7\r\n" inside the JSON string: "expected a number after '####' ..., got '7\r'"
    path = _write_rows(tmp_path / "rows.jsonl", [{"question": "q\r\nmore", "answer": "work\r\n#### 7\r\n"}])
    (problem,) = gsm8k.load_gsm8k("test", path)
    assert problem.answer == "7" and gsm8k.grade(problem, "so\r\n#### 7\r\n")
