"""The real benchmarks read in place from ../shared/data: row counts, reference answers that grade
equal to themselves (MATH-500 through math_verify), AIME jsonl vs parquet, C-Eval letters; the
search task interface (generate_problems: splits, count, seeded shuffle, config errors);
malformed rows that name file, line and field; answer extraction; the grading time limit;
prompts through a chat template."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tasks import aime, arith, ceval, grading, gsm8k, math500, prompts
from experiments.tasks.aime import AimeConfig
from experiments.tasks.benchmark_split import BenchmarkConfig
from experiments.tasks.grading import (
    answer_line,
    answers_match,
    extract_choice,
    extract_final_answer,
    hash_answer,
    last_boxed,
    parse_number,
    symbolic_match,
)
from experiments.tasks.loader_errors import DATA_DIR_ENV, DataFormatError, default_data_dir

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"shared data folder missing: {DATA}")


@pytest.fixture(scope="module")
def math_problems():
    return math500.load_math500()


# ---------------------------------------------------------------------------------------------
# The real files


def test_row_counts_and_unique_ids(math_problems):
    counts = {
        "gsm8k test": gsm8k.load_gsm8k("test"),
        "gsm8k train": gsm8k.load_gsm8k("train"),
        "math500": math_problems,
        "aime24": aime.load_aime(24),
        "aime25": aime.load_aime(25),
        "aime24 parquet": aime.load_aime(24, parquet=True),
        "ceval": ceval.load_ceval(),
    }
    expected = {"gsm8k test": 1319, "gsm8k train": 7473, "math500": 500, "aime24": 30, "aime25": 30,
                "aime24 parquet": 30, "ceval": 1346}  # numbers from each SOURCE.md
    assert {name: len(problems) for name, problems in counts.items()} == expected
    for name, problems in counts.items():
        assert len({p.id for p in problems}) == len(problems), name
        assert all(p.question and p.answer for p in problems), name


def test_math500_meta(math_problems):
    first = math_problems[0]
    assert first.id == "test/precalculus/807.json" and first.meta["line"] == 1
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {p.meta["level"] for p in math_problems} == {1, 2, 3, 4, 5}
    assert len({p.meta["subject"] for p in math_problems}) == 7
    assert all(p.meta["source"].endswith("math500/test.jsonl") for p in math_problems)


def _print_misses(label: str, misses: list[tuple[str, str | None, str]]) -> None:
    print(f"\n{label}: {len(misses)} misses")
    for problem_id, boxed, answer in misses:
        print(f"  {problem_id}: boxed={boxed!r} answer={answer!r}")


def test_math500_solutions_grade_equal_to_their_answers(math_problems):
    """The last \\boxed{} of each worked solution grades equal to the `answer` field, once through
    the production path (answers_match) and once through math_verify alone (symbolic_match),
    since in this file the two strings are identical and the fast path would decide alone."""
    production, symbolic = [], []
    for problem in math_problems:
        boxed = last_boxed(problem.meta["solution"])
        if not math500.grade(problem, problem.meta["solution"]):
            production.append((problem.id, boxed, problem.answer))
        if boxed is None or not symbolic_match(boxed, problem.answer, timeout_s=5):
            symbolic.append((problem.id, boxed, problem.answer))
    _print_misses("MATH-500 answers_match", production)
    _print_misses("MATH-500 math_verify alone", symbolic)
    assert len(production) <= 5 and len(symbolic) <= 5  # >= 99% of 500


def test_math500_neighbouring_answers_do_not_grade_equal(math_problems):
    """Grading is not trivially True: answer i vs answer i+1 (where the two differ as numbers or
    text) is equal under math_verify for at most 1% of pairs."""
    pairs = [(a.answer, b.answer) for a, b in zip(math_problems, math_problems[1:])]
    distinct = [(a, b) for a, b in pairs if grading.fast_match(a, b) is not True]
    false_equal = [(a, b) for a, b in distinct if answers_match(a, b)]
    print(f"\nMATH-500 neighbouring answers judged equal: {false_equal}")
    assert len(distinct) > 450 and len(false_equal) <= 0.01 * len(distinct)


def test_gsm8k_reference_solutions_grade_correct():
    for split in ("test", "train"):
        problems = gsm8k.load_gsm8k(split)
        wrong = [p.id for p in problems if not gsm8k.grade(p, p.meta["solution"])]
        assert wrong == [], f"{split}: {wrong[:10]}"
        assert all(parse_number(p.answer) is not None and "," not in p.answer for p in problems)
    first = gsm8k.load_gsm8k("test")[0]
    assert first.answer == "18" and first.id == "gsm8k-test-1" and first.meta["line"] == 1


def _key(text: str) -> str:
    return " ".join(text.split())[:60]


def test_aime24_jsonl_and_parquet_agree():
    """Same 30 problems and answers; the parquet's order and some texts differ (diagrams), so
    problems are matched on their first 60 characters."""
    jsonl = {_key(p.question): p.answer for p in aime.load_aime(24)}
    parquet = {_key(p.question): p.answer for p in aime.load_aime(24, parquet=True)}
    assert len(jsonl) == len(parquet) == 30
    assert jsonl == parquet
    assert not any(p.question.endswith(prompts.BOXED_INSTRUCTION) for p in aime.load_aime(25))
    with pytest.raises(ValueError, match="only AIME 2024"):
        aime.load_aime(25, parquet=True)
    # a path to a parquet file is read as one (it was read as jsonl: "not valid UTF-8 ... save the file as UTF-8")
    shipped = aime.resolve_data_file(None, aime.PARQUET_FILES[24])
    assert aime.load_aime(24, path=shipped) == aime.load_aime(24, parquet=True)
    assert aime.generate_problems("test", 2, 0, AimeConfig(year=24, path=str(shipped))) == aime.load_aime(24, parquet=True)[:2]


def test_aime_answers_are_integers_and_self_grade():
    for year in (24, 25):
        for problem in aime.load_aime(year):
            assert 0 <= int(problem.answer) <= 999 and problem.answer == str(int(problem.answer))
            assert aime.grade(problem, f"... so the answer is \\boxed{{{problem.answer}}}.")
            assert not aime.grade(problem, f"\\boxed{{{int(problem.answer) + 1}}}")


def test_ceval_letters_choices_and_grading():
    problems = ceval.load_ceval()
    assert {p.answer for p in problems} == set("ABCD")
    assert len({p.meta["subject"] for p in problems}) == 52
    assert all(len(p.meta["choices"]) == 4 and all(p.meta["choices"]) for p in problems)
    first = problems[0]
    assert first.question.startswith("使用位填充方法") and first.meta["choices"] == ("1", "2", "3", "4")
    assert first.answer == "C" and ceval.grade(first, "让我们思考。\nANSWER: C")
    assert not ceval.grade(first, "ANSWER: B") and not ceval.grade(first, "no letter here")
    assert "ANSWER: $LETTER" in ceval.prompt_text(first)


def test_every_module_has_the_arith_task_interface():
    for module in (arith, gsm8k, math500, aime, ceval):
        assert callable(module.prompt_text) and callable(module.extract_answer) and callable(module.grade)
        assert callable(module.generate_problems)


# ---------------------------------------------------------------------------------------------
# The search task interface: generate_problems(split, count, seed, cfg)

# (task module, its config, a split, the loader's problems of that split)
BENCHMARKS = {
    "gsm8k train": (gsm8k, BenchmarkConfig(), "train", lambda: gsm8k.load_gsm8k("train")),
    "gsm8k test": (gsm8k, BenchmarkConfig(), "test", lambda: gsm8k.load_gsm8k("test")),
    "math500": (math500, BenchmarkConfig(), "test", math500.load_math500),
    "aime24": (aime, AimeConfig(year=24), "test", lambda: aime.load_aime(24)),
    "aime24 parquet": (aime, AimeConfig(year=24, parquet=True), "test", lambda: aime.load_aime(24, parquet=True)),
    "aime25": (aime, AimeConfig(year=25), "test", lambda: aime.load_aime(25)),
    "ceval": (ceval, BenchmarkConfig(), "test", ceval.load_ceval),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_generate_problems_takes_the_first_count_in_file_order(name):
    module, cfg, split, load = BENCHMARKS[name]
    everything = load()
    ids = [p.id for p in everything]
    assert [p.id for p in module.generate_problems(split, 3, 0, cfg)] == ids[:3]
    assert [p.id for p in module.generate_problems(split, 3, 7, cfg)] == ids[:3]  # the seed only shuffles
    assert module.generate_problems(split, None, 0, cfg) == everything  # None and -1: the whole split
    assert module.generate_problems(split, -1, 0, cfg) == everything
    assert module.generate_problems(split, 0, 0, cfg) == []


def test_shuffle_is_seeded_and_a_smaller_count_is_a_prefix():
    shuffled = BenchmarkConfig(shuffle=True)
    ten = [p.id for p in gsm8k.generate_problems("test", 10, 1, shuffled)]
    assert ten == [p.id for p in gsm8k.generate_problems("test", 10, 1, shuffled)]
    assert ten[:4] == [p.id for p in gsm8k.generate_problems("test", 4, 1, shuffled)]
    assert ten != [p.id for p in gsm8k.generate_problems("test", 10, 2, shuffled)]
    assert ten != [p.id for p in gsm8k.generate_problems("test", 10, 1, BenchmarkConfig())]
    every = gsm8k.generate_problems("test", None, 1, shuffled)  # a permutation: nothing lost or repeated
    assert sorted(p.id for p in every) == sorted(p.id for p in gsm8k.load_gsm8k("test"))
    aime_order = [p.id for p in aime.generate_problems("test", None, 0, AimeConfig(year=25, shuffle=True))]
    assert sorted(aime_order) == sorted(p.id for p in aime.load_aime(25)) and aime_order != sorted(aime_order)


@pytest.mark.parametrize(
    "module, cfg, split, valid",
    [
        (gsm8k, BenchmarkConfig(), "validation", "gsm8k: split='validation'; valid: 'train', 'test'"),
        (math500, BenchmarkConfig(), "train", "math500: split='train'; valid: 'test'"),
        (aime, AimeConfig(year=25), "train", "aime25: split='train'; valid: 'test'"),
        (ceval, BenchmarkConfig(), "val", "ceval: split='val'; valid: 'test'"),
    ],
)
def test_a_wrong_split_lists_the_valid_ones_before_reading(module, cfg, split, valid, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))  # no files there: the split is refused first
    with pytest.raises(ValueError) as caught:
        module.generate_problems(split, 3, 0, cfg)
    assert str(caught.value) == valid


def test_a_count_beyond_the_split_names_both_numbers():
    with pytest.raises(ValueError, match=r"aime24: count=31 but the test split has only 30 problems"):
        aime.generate_problems("test", 31, 0, AimeConfig(year=24))
    with pytest.raises(ValueError, match=r"gsm8k: count=1320 but the test split has only 1319 problems"):
        gsm8k.generate_problems("test", 1320, 0, BenchmarkConfig())
    for bad in (-2, 2.5, "3", True):
        with pytest.raises(ValueError, match=rf"math500: count={bad!r} must be an integer >= 0, or -1 / null"):
            math500.generate_problems("test", bad, 0, BenchmarkConfig())


def test_task_configs_name_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"BenchmarkConfig.shuffle='yes' must be true or false"):
        BenchmarkConfig(shuffle="yes")
    with pytest.raises(ValueError, match=r"BenchmarkConfig.hub=1 must be true or false"):
        BenchmarkConfig(hub=1)
    with pytest.raises(ValueError, match=r"BenchmarkConfig.path='' must be a file path or null"):
        BenchmarkConfig(path="")
    for year in (26, True, "24"):
        with pytest.raises(ValueError, match=rf"AimeConfig.year={year!r}; valid: 24, 25"):
            AimeConfig(year=year)
    with pytest.raises(ValueError, match=r"AimeConfig.parquet=True with year=25: MetaStone ships only AIME 2024"):
        AimeConfig(year=25, parquet=True)
    AimeConfig(year=25, parquet=True, path=str(tmp_path / "own.parquet"))  # a file of one's own is allowed
    with pytest.raises(ValueError, match=r"ceval: hub=True is not supported"):
        ceval.generate_problems("test", 1, 0, BenchmarkConfig(hub=True))


def test_generate_problems_reads_a_user_path(tmp_path):
    own = _write(tmp_path / "mine.jsonl", [json.dumps(GOOD_MATH)])
    [problem] = math500.generate_problems("test", None, 0, BenchmarkConfig(path=str(own)))
    assert problem.id == "test/algebra/1.json" and problem.meta["source"] == str(own)
    with pytest.raises(ValueError, match=r"count=2 but the test split has only 1 problems"):
        math500.generate_problems("test", 2, 0, BenchmarkConfig(path=str(own)))


# ---------------------------------------------------------------------------------------------
# Paths and malformed rows


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_MATH = {"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/1.json"}


def test_user_path_wins_and_env_var_moves_the_default(tmp_path, monkeypatch):
    own = _write(tmp_path / "mine.jsonl", [json.dumps(GOOD_MATH)])
    assert [p.id for p in math500.load_math500(own)] == ["test/algebra/1.json"]
    (tmp_path / "math500").mkdir()
    _write(tmp_path / "math500" / "test.jsonl", [json.dumps(GOOD_MATH)] * 2)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert len(math500.load_math500()) == 2
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        gsm8k.load_gsm8k("test")


GOOD_GSM8K = json.dumps({"question": "q", "answer": "#### 1"})
GOOD_AIME = json.dumps({"prompt": "p", "answer": 1})


def _load_gsm8k(path: Path):
    return gsm8k.load_gsm8k("test", path)


def _load_aime(path: Path):
    return aime.load_aime(24, path)


@pytest.mark.parametrize(
    "loader, good_line, bad_line, field",
    [
        (math500.load_math500, json.dumps(GOOD_MATH), "{not json", None),
        (math500.load_math500, json.dumps(GOOD_MATH), json.dumps([1, 2]), None),
        (math500.load_math500, json.dumps(GOOD_MATH),
         json.dumps({k: v for k, v in GOOD_MATH.items() if k != "answer"}), "answer"),
        (math500.load_math500, json.dumps(GOOD_MATH), json.dumps({**GOOD_MATH, "level": "5"}), "level"),
        (math500.load_math500, json.dumps(GOOD_MATH), json.dumps({**GOOD_MATH, "level": 9}), "level"),
        (_load_gsm8k, GOOD_GSM8K, json.dumps({"question": "q", "answer": "no hash line"}), "answer"),
        (_load_gsm8k, GOOD_GSM8K, json.dumps({"question": 3, "answer": "#### 4"}), "question"),
        (_load_aime, GOOD_AIME, json.dumps({"prompt": "p", "answer": "twelve"}), "answer"),
        (_load_aime, GOOD_AIME, json.dumps({"prompt": "p", "answer": True}), "answer"),
        (_load_aime, GOOD_AIME, json.dumps({"prompt": "p", "answer": "--5"}), "answer"),  # int() raised, unnamed
        (_load_aime, GOOD_AIME, json.dumps({"prompt": "p", "answer": "²"}), "answer"),
        (_load_aime, GOOD_AIME, json.dumps({"prompt": "\n" + prompts.BOXED_INSTRUCTION, "answer": 1}), "prompt"),
    ],
)
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, loader, good_line, bad_line, field):
    path = _write(tmp_path / "rows.jsonl", [good_line, "", bad_line])  # line 2 blank, bad row on line 3
    with pytest.raises(DataFormatError) as caught:
        loader(path)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 3, field)
    assert str(caught.value).startswith(f"{path}, line 3")
    if field:
        assert repr(field) in str(caught.value)


def test_a_repeated_problem_id_names_both_lines(tmp_path):
    """Records and resume key on problem ids: a file that repeats one (MATH-500's unique_id,
    C-Eval's id) is refused, not run with two rows of one id and a count that comes up short."""
    other = {**GOOD_MATH, "unique_id": "test/algebra/2.json"}
    path = _write(tmp_path / "rows.jsonl", [json.dumps(GOOD_MATH), json.dumps(other), "", json.dumps(GOOD_MATH)])
    with pytest.raises(DataFormatError, match=r"rows.jsonl, line 4: problem id 'test/algebra/1.json' repeats the one "
                                              r"at line 1: ids must be unique") as caught:
        math500.generate_problems("test", 1, 0, BenchmarkConfig(path=str(path)))  # the whole file, not the first 1
    assert (caught.value.path, caught.value.line) == (str(path), 4)
    items = ",\n".join(json.dumps(item) for item in (_ceval_item(), _ceval_item(id=1), _ceval_item()))
    (tmp_path / "c.json").write_text(f"[\n{items}\n]", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"c.json, line 4: problem id 'ceval-math-0' repeats the one at line 2"):
        ceval.generate_problems("test", None, 0, BenchmarkConfig(path=str(tmp_path / "c.json")))


def _ceval_item(answer: str = "A", **changes) -> dict:
    prompt = ("\n以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n{1+1=____}\nA. {2}\nB. {3}\nC. {4}\nD. {5}\n"
              "让我们一步一步思考。你的回复的最后一行应遵循以下格式：'ANSWER: $LETTER'（不带引号），其中 LETTER 是选项 ABCD 中的一个。\n")
    return {"model_input": prompt, "answer": answer, "sub": "math", "id": 0, **changes}


def test_malformed_ceval_items_name_the_line(tmp_path):
    good = json.dumps(_ceval_item(), ensure_ascii=False, indent=4)
    (tmp_path / "ok.json").write_text(f"[\n{good}\n]", encoding="utf-8")
    [problem] = ceval.load_ceval(tmp_path / "ok.json")
    assert problem.question == "1+1=____" and problem.meta["choices"] == ("2", "3", "4", "5")
    cases = [
        (json.dumps(_ceval_item("E"), indent=4), "answer"),
        (json.dumps(_ceval_item(id="0"), indent=4), "id"),
        (json.dumps(_ceval_item(model_input="free text"), indent=4), "model_input"),
    ]
    for bad, field in cases:
        path = tmp_path / "bad.json"
        path.write_text(f"[\n{good},\n{bad}\n]", encoding="utf-8")
        with pytest.raises(DataFormatError) as caught:
            ceval.load_ceval(path)
        second_item_line = 2 + good.count("\n") + 1  # "[" on line 1, first item from line 2
        assert (caught.value.line, caught.value.field) == (second_item_line, field)
    path.write_text(f"[\n{good},\n{{\"answer\": \n]", encoding="utf-8")
    with pytest.raises(DataFormatError, match="bad JSON") as caught:
        ceval.load_ceval(path)
    assert caught.value.line == good.count("\n") + 4
    # a second array (or text) after the closing ']' would be dropped without a word: named instead
    for tail in (f"\n[\n{good}\n]\n", " xyz"):
        for body in (f"[\n{good}\n]", "[]"):
            path.write_text(body + tail, encoding="utf-8")
            with pytest.raises(DataFormatError, match=r"text after the array's closing '\]'") as caught:
                list(ceval.load_ceval(path))
            assert caught.value.line == body.count("\n") + 1 + (tail.startswith("\n"))
    path.write_text(f"[\n{good}\n]\n\n", encoding="utf-8")  # trailing whitespace is fine
    assert len(ceval.load_ceval(path)) == 1


def test_malformed_parquet_row_names_row_and_nested_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"question": "q0", "reward_model": {"ground_truth": {"target": "007"}}, "extra_info": {"index": 0}},
        {"question": "q1", "reward_model": {"ground_truth": {"target": None}}, "extra_info": {"index": 1}},
    ]
    path = tmp_path / "aime.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    assert [p.answer for p in aime.load_aime(25, path, parquet=True)] == ["7"]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match="row 2") as caught:
        aime.load_aime(24, path, parquet=True)
    assert caught.value.field == "reward_model.ground_truth.target"


# ---------------------------------------------------------------------------------------------
# Extraction


def test_last_boxed_nested_last_and_unclosed():
    assert last_boxed("so \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2} and finally \\boxed{ 3 }") == "3"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are content
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed {8}") == "8"
    assert last_boxed("\\boxed{4} ... \\boxed{5") is None  # cut off: no committed answer
    assert last_boxed("no box") is None and last_boxed(None) is None  # type: ignore[arg-type]


def test_hash_answer_line_and_final_answer_order():
    assert hash_answer("She makes $18.\n#### 18") == "18"
    assert hash_answer("#### 1,000\n") == "1,000" and hash_answer("####  \n") is None
    assert answer_line("steps\nAnswer: 42.") == "42" and answer_line("**Answer:** $7$") == "$7$"
    assert extract_final_answer("<think>\\boxed{1}</think>The answer is \\boxed{2}") == "2"
    assert extract_final_answer("<think>try \\boxed{1}</think> I give up") == "1"  # falls back to the whole text
    assert extract_final_answer("work\n#### 12\nAnswer: 13") == "13"  # the one written last (#### first before)
    assert extract_final_answer("work\nAnswer: 13\n#### 12") == "12"
    assert extract_final_answer("Answer: 13") == "13"
    assert extract_final_answer("nothing to see") is None and extract_final_answer("") is None


def test_extract_choice():
    assert extract_choice("分析……\nANSWER: C") == "C"
    assert extract_choice("答案：B。") == "B" and extract_choice("The answer is (D).") == "D"
    assert extract_choice("ANSWER: A\nwait, no.\nANSWER: B") == "B"
    assert extract_choice("so \\boxed{\\text{C}}") == "C" and extract_choice("reasoning\n(A)") == "A"
    assert extract_choice("Answer: A triangle has three sides") is None  # prose, not a choice
    assert extract_choice("ANSWER: E") is None and extract_choice("no choice") is None


def test_numbers_with_commas_and_dollars():
    assert answers_match("$1,000", "1000") and answers_match("\\$18.00", "18")
    assert answers_match("1,450,000", "1450000") and answers_match("-3", "-3.0")
    assert answers_match("\\frac{1}{2}", "0.5") and answers_match("1/2", "\\dfrac{1}{2}")
    assert answers_match("25\\%", "25") and answers_match("12.5%", "12.5")  # references omit the %
    assert not answers_match("1,2", "12")  # a pair, not a thousands separator
    assert not answers_match("18", "19") and not answers_match("$18", "1800")
    assert gsm8k.grade(gsm8k.load_gsm8k("test")[0], "She makes \\boxed{\\$18} a day.")


def test_symbolic_equivalence_through_math_verify():
    assert answers_match("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)")
    assert answers_match("x^2+2x+1", "(x+1)^2") and answers_match("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}")
    assert not answers_match("\\sqrt{3}", "\\sqrt{2}")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_grading_never_raises_on_garbage(text, reference):
    extract_final_answer(text), extract_choice(text)
    assert isinstance(answers_match(text, reference, timeout_s=1), bool)
    assert answers_match(None, reference) is False and answers_match(text, None) is False


def test_pathological_answer_times_out_instead_of_hanging():
    # without a limit, sympy would try to evaluate 9^(9^(9^9)) for hours
    start = time.monotonic()
    assert answers_match("9^{9^{9^{9}}}", "5", timeout_s=1) is False
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_pathological_answer_times_out_in_a_worker_thread():
    """Off the main thread math_verify's SIGALRM limit cannot work; a helper process is killed."""
    results: dict[str, tuple[bool, float]] = {}

    def check(name: str, predicted: str, reference: str) -> None:
        start = time.monotonic()
        results[name] = (answers_match(predicted, reference, timeout_s=1), time.monotonic() - start)

    worker = threading.Thread(target=lambda: [
        check("equal", "x^2+2x+1", "(x+1)^2"),
        check("hang", "9^{9^{9^{9}}}", "5"),
        check("after", "\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),  # a fresh helper after the kill
    ])
    worker.start()
    worker.join(timeout=300)
    assert results["equal"][0] is True and results["after"][0] is True
    assert results["hang"][0] is False and results["hang"][1] < 10


# ---------------------------------------------------------------------------------------------
# Prompts


class TemplateTokenizer:
    """A fake of a transformers tokenizer: a chat template that may open <think> itself."""

    def __init__(self, opens_think: bool, vocab: tuple[str, ...] = ("<think>", "</think>")) -> None:
        self.chat_template = "fake"
        self.opens_think, self.vocab, self.calls = opens_think, vocab, []

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.vocab)}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
        self.calls.append((messages, add_generation_prompt, tokenize, kwargs))
        tail = "<think>\n" if self.opens_think else ""
        return f"<|user|>{messages[0]['content']}<|assistant|>\n{tail}"


def test_prompts_through_a_chat_template_and_the_plain_fallback():
    problem = aime.load_aime(24)[0]
    message = prompts.math_user_message(problem.question)
    assert message.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    tokenizer = TemplateTokenizer(opens_think=False)
    text = aime.prompt_text(problem, tokenizer)
    assert text == f"<|user|>{message}<|assistant|>\n<think>\n"  # vocab has <think>: opened by us
    assert tokenizer.calls[0][1:] == (True, False, {})
    assert aime.prompt_text(problem, TemplateTokenizer(opens_think=True)).count("<think>") == 1
    assert not aime.prompt_text(problem, TemplateTokenizer(False, vocab=("a",))).endswith("<think>\n")
    assert math500.prompt_text(math500.load_math500()[0]).startswith("Question: Convert the point")
    assert gsm8k.prompt_text(gsm8k.load_gsm8k("test")[0]).endswith("\\boxed{}.\nAnswer:")
    assert gsm8k.prompt_text(gsm8k.load_gsm8k("test")[0], think=True).endswith("\nAnswer: <think>\n")


def test_prompt_through_a_real_transformers_chat_template():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<think>": 1}, unk_token="<unk>")))
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    text = prompts.render_prompt("Q?", tokenizer)
    assert text == "<|user|>Q?\n<|assistant|>\n<think>\n"
