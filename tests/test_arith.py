"""The arith task: determinism, disjoint splits, solution format, grading, config validation."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tasks import arith
from experiments.tasks.arith import ArithConfig, extract_answer, generate_problems, grade, prompt_text, solution_text
from treesearch.records import Problem

STEP_RE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.\n\n$")


@pytest.fixture(scope="module")
def test_problems() -> list[Problem]:
    return generate_problems("test", 300, seed=0)


def test_same_seed_same_problems_and_prefix_property():
    a = generate_problems("train", 200, seed=7)
    assert a == generate_problems("train", 200, seed=7)
    assert a[:50] == generate_problems("train", 50, seed=7)  # a longer list extends a shorter one
    assert [p.id for p in a] != [p.id for p in generate_problems("train", 200, seed=8)]


def test_problems_are_distinct_within_a_split():
    problems = generate_problems("train", 2000, seed=0)
    assert len({p.id for p in problems}) == len({p.meta["key"] for p in problems}) == 2000


def test_train_and_test_never_share_a_problem():
    train = generate_problems("train", 3000, seed=0)
    test = generate_problems("test", 600, seed=0) + generate_problems("test", 600, seed=1)
    assert not {p.meta["key"] for p in train} & {p.meta["key"] for p in test}
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {p.id for p in train} & {p.id for p in test}
    # not even with the operations in another order ("7 -6 +5" and "7 +5 -6": one answer, and each
    # one's solution right for the other; 90 of 200 quick-eval test problems had such a train twin)
    def multiset(p):
        return p.meta["start"], tuple(sorted(p.meta["operations"]))

    assert not {multiset(p) for p in train} & {multiset(p) for p in test}
    # the rule itself: test iff stable hash of the split key (operations sorted) % 5 == 0
    key = lambda p: arith.split_key(p.meta["start"], tuple(p.meta["operations"]))  # noqa: E731
    assert all(arith.stable_hash(key(p)) % 5 == 0 for p in test)
    assert all(arith.stable_hash(key(p)) % 5 != 0 for p in train)
    assert arith.split_key(7, (("-", 6), ("+", 5))) == arith.split_key(7, (("+", 5), ("-", 6))) == "7 +5 -6"


def test_stable_hash_is_fixed():
    # sha256("23 +14") first 8 bytes, big-endian: a golden value, the same in every process
    assert arith.stable_hash("23 +14") == int.from_bytes(__import__("hashlib").sha256(b"23 +14").digest()[:8], "big")
    assert arith.canonical_key(23, (("+", 14), ("-", 9), ("*", 3))) == "23 +14 -9 *3"


def test_problem_fields_respect_the_config(test_problems):
    cfg = ArithConfig()
    for p in test_problems:
        assert cfg.min_ops <= p.meta["num_ops"] <= cfg.max_ops
        assert p.meta["max_number"] == cfg.max_number
        assert 1 <= p.meta["start"] <= cfg.max_number
        assert all(0 <= v <= cfg.max_value for v in p.meta["values"])
        assert p.answer == str(p.meta["values"][-1])
        assert p.question.startswith(tuple(name for name, _ in arith._NAMES))
        assert p.question.endswith("have now?")
        assert str(p.meta["start"]) in p.question
        for op, operand in p.meta["operations"]:
            assert op in cfg.operations
            limit = cfg.max_number if op in "+-" else cfg.max_factor
            assert (1 if op in "+-" else 2) <= operand <= limit


def test_numbers_in_a_question_are_distinct(test_problems):
    for p in test_problems:
        numbers = [p.meta["start"]] + [n for _, n in p.meta["operations"]]
        assert len(set(numbers)) == len(numbers)
        # the numbers appear in story order; only "doubled" / "tripled" spell one as a word
        found = iter(int(x) for x in re.findall(r"\d+", p.question))
        expected = [p.meta["start"]] + [
            n for op, n in p.meta["operations"] if not (op == "*" and n in (2, 3) and ("doubled" in p.question or "tripled" in p.question))
        ]
        assert all(n in found for n in expected)


def test_question_example_reads_like_a_word_problem():
    p = generate_problems("test", 1, seed=0)[0]
    # e.g. "Hugo has 32 cards. Then his cards are multiplied by 6. He buys 91 more cards. How many ..."
    assert re.match(r"^[A-Z][a-z]+ has \d+ [a-z]+\. ", p.question)


def test_solution_format_one_step_per_operation_inside_think(test_problems):
    for p in test_problems:
        prompt, solution = prompt_text(p), solution_text(p)
        assert prompt == p.question + "\n<think>"
        think, answer = solution.split("</think>")
        assert answer == f"Answer: {p.answer}"
        steps = arith.solution_steps(p)
        assert "".join(steps) == think and len(steps) == p.meta["num_ops"]
        value = p.meta["start"]
        for step, (op, operand) in zip(steps, p.meta["operations"]):
            a, sym, b, c = STEP_RE.match(step).groups()
            assert (int(a), sym, int(b)) == (value, op, operand)
            value = int(c)
        assert str(value) == p.answer
        assert think.count(arith.SEPARATOR) == p.meta["num_ops"]


def test_documented_example_solution():
    p = Problem("x", "q", "84", {"start": 23, "operations": (("+", 14), ("-", 9), ("*", 3))})
    assert solution_text(p) == "23 + 14 = 37.\n\n37 - 9 = 28.\n\n28 * 3 = 84.\n\n</think>Answer: 84"


def test_reference_solution_grades_correct(test_problems):
    assert all(grade(p, solution_text(p)) for p in test_problems)
    assert all(grade(p, prompt_text(p) + solution_text(p)) for p in test_problems)


def test_wrong_and_malformed_answers_grade_false():
    p = Problem("x", "q", "84", {})
    for text in [
        "", "garbage", "Answer:", "Answer: ", "Answer: abc", "</think>", "</think>Answer: 85",
        "1 + 1 = 2.\n\n</think>Answer: -84", "Answer: 84</think>Answer: 83", "</think>Answer: 8 4",
        "</think>Answer: " + "9" * 5000, "\x00\xff<think></think>", "Answer: 84.5.5</think>",
    ]:
        assert grade(p, text) is False, text
    assert grade(Problem("y", "q", None, {}), "Answer: 84") is False  # unknown reference


def test_tolerant_extraction():
    assert extract_answer("</think>Answer: 84") == "84"
    assert extract_answer("Answer: 084") == "84"
    assert extract_answer("Answer:84") == "84"
    assert extract_answer("</think> Answer: 1,234 apples") == "1234"
    assert extract_answer("Answer: 1 ... Answer: 2") == "2"  # the last one counts
    assert extract_answer("Answer: 7 </think> no answer here") is None  # only after </think>
    assert extract_answer("Answer: -5") == "-5"
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_the_answer_is_the_whole_number():
    """A number that continues ("84.5", "84/2", "84e2", "8,4") is not the integer before it."""
    p = Problem("x", "q", "84", {})
    for text in ["</think>Answer: 84.5", "</think>Answer: 84/2", "</think>Answer: 84e2", "</think>Answer: 8,4",
                 "</think>Answer: 84.05", "</think>Answer: 84-2", "</think>Answer: 84+1", "</think>Answer: 84 * 2",
                 "</think>Answer: 84 / 2", "</think>Answer: 84^2", "</think>Answer: 84×2"]:
        assert grade(p, text) is False, text
    assert extract_answer("</think>Answer: 84.5") == "84.5" and extract_answer("Answer: 8,4") is None
    assert extract_answer("</think>Answer: 84.0") == "84" and extract_answer("Answer: 84.") == "84"
    assert extract_answer("Answer: 84 apples.") == "84" and extract_answer("Answer: 12,345") == "12345"
    assert extract_answer("</think>Answer: 84 - that is all") == "84"  # a dash in words, not an operation


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_grading_never_raises(text):
    p = Problem("x", "q", "84", {})
    assert grade(p, text) in (True, False)
    result = extract_answer(text)  # an integer in canonical form, or a non-integer as written ("0.5")
    assert result is None or re.fullmatch(r"-?\d+(\.\d+)?", result)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"min_ops": 0}, "min_ops=0"),
        ({"min_ops": 3, "max_ops": 2}, "max_ops=2"),
        ({"max_number": 1}, "max_number=1"),
        ({"max_number": 60, "max_value": 50}, "max_value=50"),  # below max_number
        ({"max_factor": 1}, "max_factor=1"),
        ({"operations": ("+", "%")}, "'%'"),
        ({"operations": ("*",)}, "operations=('*',)"),
        # failed inside randrange, naming no setting, or generated as distinct_numbers=True
        ({"max_number": 10.5}, "ArithConfig.max_number=10.5 must be an integer"),
        ({"min_ops": 2.5}, "ArithConfig.min_ops=2.5 must be an integer"),
        ({"max_factor": 2.5}, "ArithConfig.max_factor=2.5 must be an integer"),
        ({"distinct_numbers": "no"}, "ArithConfig.distinct_numbers='no' must be true or false"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ArithConfig(**kwargs)


def test_generation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split='dev'"):
        generate_problems("dev", 1, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count=-1"):
        generate_problems("train", -1, seed=0)
    tiny = ArithConfig(min_ops=1, max_ops=1, max_number=2, max_value=4, operations=("+",))
    with pytest.raises(ValueError, match="count=100"):  # only a handful of distinct problems exist
        generate_problems("train", 100, seed=0, cfg=tiny)


def test_difficulty_knob_changes_problems():
    easy = ArithConfig(min_ops=1, max_ops=2, max_number=9, max_value=99, operations=("+", "-"))
    for p in generate_problems("train", 200, seed=0, cfg=easy):
        assert p.meta["num_ops"] in (1, 2)
        assert all(op in "+-" and n <= 9 for op, n in p.meta["operations"])
        assert grade(p, solution_text(p))


def test_division_when_enabled_is_exact():
    cfg = ArithConfig(operations=("+", "-", "*", "/"))
    problems = generate_problems("train", 500, seed=0, cfg=cfg)
    divisions = [(p, i) for p in problems for i, (op, _) in enumerate(p.meta["operations"]) if op == "/"]
    assert divisions
    for p, _ in divisions:
        assert grade(p, solution_text(p))
        assert all(STEP_RE.match(s) for s in arith.solution_steps(p))
        # replayed: every division is exact (floor division in the generator, the answer and the
        # grader agreed with each other on "14 / 4 = 3")
        for step in arith.solution_steps(p):
            for a, b, c in re.findall(r"(\d+) / (\d+) = (\d+)", step):
                assert int(a) == int(b) * int(c), step


def counting_draws(monkeypatch, module, name: str, limit: int) -> list[int]:
    """Counts the draws of a generator module (its drawing function `name`; an AssertionError past
    `limit`: the old budget of 100 draws per problem); test_countdown's too."""
    calls, draw = [0], getattr(module, name)

    def counted(rng, cfg):
        calls[0] += 1
        assert calls[0] <= limit, f"{calls[0]} draws"
        return draw(rng, cfg)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_count_beyond_the_split_fails_at_once_naming_the_split_size(monkeypatch):
    # python -m experiments.train data.train_problems=100000000 drew for minutes before the error
    small = ArithConfig(min_ops=1, max_ops=2, max_number=3, max_value=9, operations=("+", "-"))
    whole = generate_problems("train", 22, seed=0, cfg=small)  # the whole train split
    assert len({p.meta["key"] for p in whole}) == 22
    assert generate_problems("train", 10, seed=0, cfg=small) == whole[:10]
    calls = counting_draws(monkeypatch, arith, "_draw_operations", limit=0)
    for count in (23, 10**9):
        with pytest.raises(ValueError, match=rf"count={count}: the train split of .* holds only 22 distinct problems "
                                             r"\(of 26 in both splits\); ask for at most 22, or raise max_number"):
            generate_problems("train", count, seed=0, cfg=small)
    assert calls[0] == 0


def test_the_draws_stop_when_they_find_no_new_problem(monkeypatch):
    # when the split's size is not counted (too large a space), a run of STALL_DRAWS draws with
    # no new problem ends the drawing instead of 100 draws per problem asked
    monkeypatch.setattr(arith, "SIZE_WORK_LIMIT", 0)
    calls = counting_draws(monkeypatch, arith, "_draw_operations", limit=arith.STALL_DRAWS + 100)
    tiny = ArithConfig(min_ops=1, max_ops=1, max_number=2, max_value=4, operations=("+",))
    with pytest.raises(ValueError, match=r"count=1000000: the train split of .* seems to hold only about 2 problems: "
                                         r"2 found in \d+ draws, the last 1000 finding no new one; ask for about 2"):
        generate_problems("train", 10**6, seed=0, cfg=tiny)
    assert calls[0] <= arith.STALL_DRAWS + 10
    assert len(generate_problems("train", 2, seed=0, cfg=tiny)) == 2
