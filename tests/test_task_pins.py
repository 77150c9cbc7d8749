"""Pins for task graders and generators that a mutation review found unpinned elsewhere.

Pure Python, no model: the whole module runs in about a second on one CPU core. What is pinned:
countdown grading counts each given number exactly once, composes a step from the most recent
equal earlier result, and labels an answer step wrong when the think step written before its
</think> is wrong; arith step labels stay wrong after the first wrong step, need every operation
done and nothing but blanks before </think>, and reject an inexact division; arith answer
extraction reads after the last </think> and takes answers up to 100 digits; math answer
extraction picks the answer written last (a "####" after a box), reads after </think> first,
strips Minerva's "I hope it is correct." in any case, keeps a box over a three-word prose line,
and reads a piecewise \\boxed{\\left\\{...\\right.}; mixed numbers keep their sign; choice
references are compared stripped; a blank answer matches nothing; the generators reach the ends
of their ranges (a '+' step up to max_value, a '-' step down to 0 and by max_number, no division
down to 1, repeated numbers when distinct_numbers is off, a 9 among countdown numbers) and
countdown accepts MAX_NUMBERS_LIMIT numbers.

Run: `.venv/bin/python -m pytest tests/test_task_pins.py`
"""
from __future__ import annotations

import pytest

from experiments.tasks import arith
from experiments.tasks import countdown as cd
from experiments.tasks.grading import (
    answers_match,
    extract_final_answer,
    grade_choice,
    grade_math,
    last_boxed,
    parse_number,
)


def arith_problem(start, ops, cfg=arith.ArithConfig()):
    """An arith test problem with the given start value and ((op, operand), ...)."""
    return arith._make_problem(arith.canonical_key(start, ops), "q", start, ops, cfg, "test")


# 3 + 4 = 7, 7 * 2 = 14
P3 = arith_problem(3, (("+", 4), ("*", 2)))


@pytest.fixture(scope="module")
def p8566():
    return cd.make_problem([8, 5, 6, 6], 24)


# ---------------------------------------------------------------------------------------------
# countdown grading


def test_countdown_grade_needs_each_number_exactly_once(p8566):
    # 5 used twice and one 6 never: the same set of numbers, but not the same multiset
    twice = "8 + 6 = 14, left 5 5 14.\n\n14 + 5 = 19, left 5 19.\n\n19 + 5 = 24, left 24.\n\n</think>Answer: x"
    assert cd.extract_answer(twice) == "((6 + 8) + 5) + 5"
    assert cd.grade(p8566, twice) is False


def test_countdown_step_takes_the_most_recent_equal_earlier_result():
    # two earlier results equal 1: "1 + 3" takes the later one (8 - 7), "4 * 1" the earlier (6 - 5)
    text = ("6 - 5 = 1, left 8 7 3 1.\n\n8 - 7 = 1, left 3 1 1.\n\n"
            "1 + 3 = 4, left 1 4.\n\n4 * 1 = 4, left 4.\n\n</think>Answer: x")
    assert cd.extract_answer(text) == "((8 - 7) + 3) * (6 - 5)"
    assert cd.grade(cd.make_problem([6, 5, 8, 7, 3], 4), text)


def test_countdown_answer_step_is_wrong_when_the_step_before_its_think_close_is(p8566):
    # the last think step has no separator before </think>, and its "left" list is wrong (6 is used)
    steps = ["8 - 5 = 3, left 6 6 3.\n\n", "6 * 3 = 18, left 6 18.\n\n",
             "18 + 6 = 24, left 6 24</think>Answer: (6 * (8 - 5)) + 6"]
    assert cd.grade(p8566, "".join(steps))  # the derivation itself is right
    assert cd.true_step_labels(p8566, steps) == [True, True, False]
    fixed = steps[:2] + ["18 + 6 = 24, left 24</think>Answer: (6 * (8 - 5)) + 6"]
    assert cd.true_step_labels(p8566, fixed) == [True, True, True]


# ---------------------------------------------------------------------------------------------
# arith step labels and answer extraction


def test_arith_labels_stay_false_after_the_first_wrong_step():
    steps = ["3 * 3 = 9.\n\n", "3 + 4 = 7.\n\n", "7 * 2 = 14.\n\n", "</think>Answer: 14"]
    assert arith.true_step_labels(P3, steps) == [False, False, False, False]


def test_arith_answer_step_after_a_wrong_extra_step_is_false():
    steps = ["3 + 4 = 7.\n\n", "7 * 2 = 14.\n\n", "14 + 1 = 15.\n\n", "</think>Answer: 14"]
    assert arith.true_step_labels(P3, steps) == [True, True, False, False]


def test_arith_answer_step_needs_blank_before_think_close():
    steps = ["3 + 4 = 7.\n\n", "7 * 2 = 14.\n\n"]
    assert arith.true_step_labels(P3, steps + ["so 14</think>Answer: 14"]) == [True, True, False]
    assert arith.true_step_labels(P3, steps + [" \n</think>Answer: 14"]) == [True, True, True]


def test_arith_inexact_division_step_is_wrong():
    # 9 + 1 = 10, 10 / 5 = 2; "9 / 5 = 1" floors, and 1 + 1 happens to reach the answer
    cfg = arith.ArithConfig(operations=("+", "-", "/"))
    q = arith_problem(9, (("+", 1), ("/", 5)), cfg)
    assert arith.true_step_labels(q, ["9 / 5 = 1.\n\n", "1 + 1 = 2.\n\n", "</think>Answer: 2"]) == [False] * 3
    assert arith.true_step_labels(q, ["9 + 1 = 10.\n\n", "10 / 5 = 2.\n\n", "</think>Answer: 2"]) == [True] * 3


def test_arith_extract_answer_reads_after_the_last_think_close():
    assert arith.extract_answer("</think>Answer: 5\n</think>") is None
    assert arith.extract_answer("</think>Answer: 4\n</think>Answer: 5") == "5"


def test_arith_extract_answer_takes_up_to_100_digits():
    assert arith.extract_answer("Answer: " + "1" * 50) == "1" * 50
    assert arith.extract_answer("Answer: " + "1" * 100) == "1" * 100
    assert arith.extract_answer("Answer: " + "1" * 101) is None


# ---------------------------------------------------------------------------------------------
# math answer extraction and matching


def test_hash_answer_after_a_box_replaces_it():
    text = "So \\boxed{20}.\nRecheck: 9*2=18.\n#### 18"
    assert extract_final_answer(text) == "18"
    assert grade_math(text, "18")


def test_answer_after_think_close_wins_over_a_box_inside_think():
    text = "<think>maybe \\boxed{3}</think>The answer is 4."
    assert extract_final_answer(text) == "4"
    assert grade_math(text, "4")


def test_minerva_closing_is_stripped_whatever_its_case():
    text = "9 * 2 = 18.\nFinal Answer: The final answer is 18. I hope it is correct."
    assert extract_final_answer(text) == "18"
    assert grade_math(text, "18")


def test_three_word_answer_line_is_prose_and_keeps_the_box():
    text = "\\boxed{18}\nAnswer: Janet earns 18 dollars"
    assert extract_final_answer(text) == "18"
    assert grade_math(text, "18")


def test_piecewise_box_with_escaped_braces_is_read_whole():
    text = r"So $f(x) = \boxed{\left\{\begin{array}{ll} 1 & x > 0 \\ 0 & x \le 0 \end{array}\right.}$"
    assert last_boxed(text) == r"\left\{\begin{array}{ll} 1 & x > 0 \\ 0 & x \le 0 \end{array}\right."


def test_negative_mixed_number_keeps_its_sign():
    assert parse_number("-2 and a half") == -2.5
    assert answers_match("-2 and a half", "-2.5")
    assert not answers_match("-2 and a half", "-1.5")


def test_choice_reference_is_compared_stripped():
    assert grade_choice("ANSWER: C", " C")
    assert grade_choice("ANSWER: C", "C\n")


def test_blank_answers_never_match():
    assert answers_match(" ", " ") is False
    assert answers_match("", "") is False


# ---------------------------------------------------------------------------------------------
# generator ranges (fixed seeds; each count is a few times what the mutants need to show)


def test_arith_generator_reaches_max_value_zero_and_max_number():
    ps = arith.generate_problems("train", 200, seed=0, cfg=arith.ArithConfig(max_number=10, max_value=20))
    steps = [(op, n, v) for p in ps for (op, n), v in zip(p.meta["operations"], p.meta["values"])]
    assert any(op == "+" and v == 20 for op, n, v in steps)  # a '+' step up to max_value
    assert any(op == "-" and v == 0 for op, n, v in steps)  # a '-' step down to 0
    assert any((op, n) == ("-", 10) for op, n, v in steps)  # a '-' step by max_number
    assert all(0 <= v <= 20 for _, _, v in steps)


def test_arith_generator_never_divides_down_to_one():
    ps = arith.generate_problems("train", 200, seed=0, cfg=arith.ArithConfig(operations=("+", "-", "/")))
    divisions = [v for p in ps for (op, _), v in zip(p.meta["operations"], p.meta["values"]) if op == "/"]
    assert divisions and min(divisions) >= 2


def test_arith_generator_repeats_numbers_when_not_distinct():
    ps = arith.generate_problems("train", 200, seed=0, cfg=arith.ArithConfig(distinct_numbers=False))
    repeating = [p for p in ps if len({p.meta["start"], *(n for _, n in p.meta["operations"])}) < 1 + p.meta["num_ops"]]
    assert repeating


def test_countdown_generator_draws_max_number():
    ps = cd.generate_problems("train", 30, seed=0)
    assert any(9 in p.meta["numbers"] for p in ps)
    assert all(1 <= n <= 9 for p in ps for n in p.meta["numbers"])


def test_countdown_config_accepts_max_numbers_limit():
    assert cd.MAX_NUMBERS_LIMIT == 6
    assert cd.CountdownConfig(min_numbers=4, max_numbers=cd.MAX_NUMBERS_LIMIT).max_numbers == 6
    with pytest.raises(ValueError, match="max_numbers"):
        cd.CountdownConfig(min_numbers=4, max_numbers=cd.MAX_NUMBERS_LIMIT + 1)
