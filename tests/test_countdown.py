"""The countdown task: generation, splits, solution format, grading, true step labels, the solver,
config validation, and the generator-verifier gap it exists for."""
from __future__ import annotations

import random
import statistics
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tasks import countdown
from experiments.tasks.countdown import (
    GAME_OF_24,
    CountdownConfig,
    extract_answer,
    generate_problems,
    grade,
    make_problem,
    prompt_text,
    solution_steps,
    solution_text,
    training_pairs,
    true_step_labels,
)
from experiments.tasks.countdown_steps import (
    Move,
    Rules,
    all_solutions,
    check_step,
    dead_end_share,
    legal_moves,
    parse_step,
    reachable,
    solution_count,
)
from treesearch.records import Problem
from test_arith import counting_draws
from treesearch.steps import split_steps

RULES = Rules(max_value=99)


@pytest.fixture(scope="module")
def test_problems() -> list[Problem]:
    return generate_problems("test", 200, seed=0)


@pytest.fixture(scope="module")
def p8566() -> Problem:
    # 8 5 6 6 -> 24 has exactly one trace: 8 - 5 = 3, 6 * 3 = 18, 18 + 6 = 24
    return make_problem((8, 5, 6, 6), 24)


@pytest.fixture(scope="module")
def p2346() -> Problem:
    return make_problem((2, 3, 4, 6), 24)


# -- generation and splits ----------------------------------------------------------------------


def test_same_seed_same_problems_and_prefix_property():
    a = generate_problems("train", 150, seed=7)
    assert a == generate_problems("train", 150, seed=7)
    assert a[:40] == generate_problems("train", 40, seed=7)
    assert [p.id for p in a] != [p.id for p in generate_problems("train", 150, seed=8)]


def test_every_problem_is_solvable_distinct_and_in_range(test_problems):
    cfg = CountdownConfig()
    assert len({p.meta["key"] for p in test_problems}) == len({p.id for p in test_problems}) == 200
    for p in test_problems:
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert cfg.min_numbers <= len(numbers) <= cfg.max_numbers
        assert all(1 <= n <= cfg.max_number for n in numbers) and cfg.min_target <= target <= cfg.max_target
        assert reachable(tuple(sorted(numbers)), target, RULES)
        assert p.meta["num_solutions"] == solution_count(tuple(sorted(numbers)), target, RULES) >= 1
        assert p.question == f"Use {' '.join(map(str, numbers))} to make {target}."


def test_train_and_test_never_share_a_problem():
    train = generate_problems("train", 2000, seed=0)
    test = generate_problems("test", 400, seed=0) + generate_problems("test", 400, seed=1)
    assert not {p.meta["key"] for p in train} & {p.meta["key"] for p in test}
    assert all(p.meta["split"] == "train" for p in train) and all(p.meta["split"] == "test" for p in test)
    for p in train[:100] + test[:100]:
        assert p.meta["split"] == countdown.split_of(p.meta["key"])
        assert ("test" if countdown.stable_hash(p.meta["key"]) % 5 == 0 else "train") == p.meta["split"]


def test_the_split_ignores_the_order_of_the_numbers():
    assert countdown.canonical_key((8, 5, 6, 6), 24) == countdown.canonical_key((6, 6, 5, 8), 24) == "5 6 6 8 -> 24"
    assert make_problem((8, 5, 6, 6), 24).id == make_problem((6, 5, 8, 6), 24).id


def test_asking_for_more_problems_than_a_split_holds_names_the_count():
    tiny = CountdownConfig(min_numbers=2, max_numbers=2, max_number=3, min_target=1, max_target=3, max_value=9)
    with pytest.raises(ValueError, match="count=50"):
        generate_problems("train", 50, seed=0, cfg=tiny)


def test_bad_split_and_count_are_named():
    with pytest.raises(ValueError, match="split='dev'"):
        generate_problems("dev", 3, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count=-1"):
        generate_problems("train", -1, seed=0)


def test_unsolvable_problem_is_refused_naming_the_numbers():
    with pytest.raises(ValueError, match=r"numbers=\(3, 3, 8, 8\)"):
        make_problem((3, 3, 8, 8), 24)  # needs 8 / (3 - 8 / 3): a fraction, outside the rules


def test_game_of_24():
    problems = generate_problems("test", 30, seed=0, cfg=GAME_OF_24)
    assert {p.meta["target"] for p in problems} == {24}
    assert all(len(p.meta["numbers"]) == 4 and max(p.meta["numbers"]) <= 13 for p in problems)
    assert all(grade(p, solution_text(p)) for p in problems)


# -- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(min_numbers=1), "min_numbers=1"),
        (dict(max_numbers=3), "max_numbers=3"),
        (dict(min_numbers=4, max_numbers=7), "max_numbers=7"),
        (dict(max_number=0), "max_number=0"),
        (dict(min_target=-1), "min_target=-1"),
        (dict(min_target=30, max_target=20), "max_target=20"),
        (dict(max_value=40), "max_value=40"),
        (dict(operations=("+", "^")), "operations=\\('\\+', '\\^'\\)"),
        (dict(operations=()), "operations=\\(\\)"),
        (dict(operations=("+", "+")), "operations="),
        # failed inside randrange, naming no setting (9.5), or passed as a float into meta (99.5)
        (dict(max_number=9.5), "CountdownConfig.max_number=9.5 must be an integer"),
        (dict(min_target=10.5), "CountdownConfig.min_target=10.5 must be an integer"),
        (dict(max_value=99.5), "CountdownConfig.max_value=99.5 must be an integer"),
        (dict(min_numbers=True), "CountdownConfig.min_numbers=True must be an integer"),
        # its solutions through a 7-digit value were graded wrong
        (dict(max_number=100, max_target=1000000, max_value=10**7), "max_value=10000000; must be below 1000000"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, names):
    with pytest.raises(ValueError, match=names):
        CountdownConfig(**kwargs)


def test_rules_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="max_value=0"):
        Rules(max_value=0)


# -- solutions and their format -----------------------------------------------------------------


def test_reference_solution_format(p8566):
    assert p8566.meta["num_solutions"] == 1
    assert prompt_text(p8566) == "Use 8 5 6 6 to make 24.\n<think>"
    assert solution_steps(p8566) == ["8 - 5 = 3, left 6 6 3.\n\n", "6 * 3 = 18, left 6 18.\n\n", "18 + 6 = 24, left 24.\n\n"]
    assert solution_text(p8566) == "".join(solution_steps(p8566)) + "</think>Answer: (6 * (8 - 5)) + 6"
    assert p8566.answer == extract_answer(solution_text(p8566))


def test_reference_solutions_grade_correct_and_label_all_true(test_problems):
    for p in test_problems[:60]:
        for seed in range(3):
            text = solution_text(p, seed)
            steps = split_steps(text)
            assert len(steps) == len(p.meta["numbers"])  # one step per operation, then the answer
            assert grade(p, text) and grade(p, prompt_text(p) + text)
            assert true_step_labels(p, steps) == [True] * len(steps)
            assert all(s.endswith(countdown.SEPARATOR) for s in solution_steps(p, seed))


def test_different_seeds_give_different_valid_solutions(p2346):
    texts = {solution_text(p2346, seed) for seed in range(40)}
    assert len(texts) >= 8  # 24 traces: 40 draws find many of them
    assert all(grade(p2346, t) for t in texts)


def test_training_pairs_cycle_with_fresh_solutions(p2346, p8566):
    pairs = training_pairs([p2346, p8566], 40, seed=0)
    assert len(pairs) == 40 and pairs[0][0] == prompt_text(p2346) and pairs[1][0] == prompt_text(p8566)
    assert pairs[2][1] == solution_text(p2346, 1)  # second pass, next solution seed
    assert len({c for _, c in pairs[::2]}) > 1 and len({c for _, c in pairs[1::2]}) == 1  # p8566 has one
    with pytest.raises(ValueError, match="count=3"):
        training_pairs([], 3)


def test_problems_have_many_solutions_and_dead_ends_on_average(test_problems):
    # the generator-verifier gap the task exists for (DESIGN.md section 4)
    solutions = [p.meta["num_solutions"] for p in test_problems]
    assert statistics.mean(solutions) > 3 and sum(s > 1 for s in solutions) / len(solutions) > 0.6
    assert statistics.mean(p.meta["dead_end_share"] for p in test_problems) > 0.5


# -- the solver ---------------------------------------------------------------------------------


def test_legal_moves_keep_values_nonnegative_integers_and_bounded():
    moves = legal_moves((2, 3, 4, 6), RULES)
    assert Move(6, "/", 3, 2) in moves and Move(3, "-", 2, 1) in moves
    assert Move(6, "/", 4, 1) not in moves and Move(3, "/", 6, 0) not in moves  # not exact
    assert not any(m.op == "-" and m.x < m.y for m in moves)  # no negative values
    assert all(0 <= m.result <= 99 for m in moves)
    assert Move(50, "*", 2, 100) not in legal_moves((2, 50), RULES)  # over max_value
    assert len([m for m in legal_moves((6, 6), RULES) if m.op == "+"]) == 1  # two 6s: one move


def test_solution_count_on_hand_worked_cases():
    assert solution_count((3, 8), 24, RULES) == 1  # 8 * 3 only
    assert solution_count((2, 2), 4, RULES) == 2  # 2 + 2 and 2 * 2 are two traces
    assert solution_count((1, 2, 3), 6, RULES) == len(list(all_solutions((1, 2, 3), 6, RULES)))
    assert solution_count((3, 3, 8, 8), 24, RULES) == 0 and not reachable((3, 3, 8, 8), 24, RULES)


def test_dead_end_share_hand_worked():
    # from (3, 8) to 24: 8+3, 8-3, 8*3 are legal (8/3 is not exact); only 8*3 reaches 24
    assert dead_end_share((3, 8), 24, RULES) == pytest.approx(2 / 3)


# -- grading ------------------------------------------------------------------------------------


def derivation(*steps: str, answer: str = "anything") -> str:
    """A completion with these think-span steps and an answer line (which grading ignores)."""
    return "".join(f"{step}.\n\n" for step in steps) + f"</think>Answer: {answer}"


@pytest.mark.parametrize(
    "steps",
    [
        ("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24"),
        ("8 - 5 = 3, left 6 6 3", "3 * 6 = 18, left 6 18", "6 + 18 = 24, left 24"),  # operand order free
        ("8 - 5 = 3, left 6 6 3", "6 + 6 = 12, left 3 12", "12 * 3 = 36, left 36", "36 - 12 = 24, left 24")[:0]
        or ("6 * 3 = 18, left 18", "8 - 5 = 3, left 3")[:0] or ("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24"),
    ],
)
def test_correct_derivations_grade_true_whatever_the_answer_line(p8566, steps):
    for answer in ("(8 - 5) * 6 + 6", "24", "garbage"):
        assert grade(p8566, derivation(*steps, answer=answer))
    assert extract_answer(derivation(*steps)) == "((8 - 5) * 6) + 6"  # one canonical form


def test_a_derivation_in_another_order_is_another_answer(p8566):
    other = derivation("6 * 5 = 30, left 8 6 30", "30 - 6 = 24, left 8 24", "24 + 8 = 32, left 32")
    assert not grade(p8566, other)  # 32, not 24
    ok = derivation("6 + 6 = 12, left 8 5 12", "12 * 8 = 96, left 5 96", "96 / 5 = 19, left 19")
    assert not grade(p8566, ok)  # 96 / 5 is not exact: the true value breaks the rules


@pytest.mark.parametrize(
    "steps, why",
    [
        (("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18"), "a 6 unused"),
        (("8 - 5 = 3, left 6 6 3", "3 * 8 = 24, left 6 6 24"), "8 used twice, 6s unused"),
        (("8 + 5 = 13, left 6 6 13", "13 * 6 = 78, left 6 78", "78 / 6 = 13, left 13"), "wrong value"),
        (("8 - 5 = 4, left 6 6 4", "6 * 4 = 24, left 6 24", "24 * 6 = 24, left 24"), "arithmetic lies"),
        (("9 - 5 = 4, left 6 6 4", "6 * 4 = 24, left 24"), "a number not given"),
        (("24",), "no computation"),
    ],
)
def test_wrong_derivations_grade_false(p8566, steps, why):
    assert not grade(p8566, derivation(*steps, answer="(8 - 5) * 6 + 6")), why


def test_a_side_step_the_derivation_never_uses_fails_it(p8566):
    """Only the last step's tree was graded: a side step reusing a number, using one the problem
    never gave, or written before a second <think>, passed while every step label said wrong."""
    good = ("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24")
    for side in ("8 + 8 = 16, left 5 6 6 16", "90 + 9 = 99, left 99"):
        text = derivation(side, *good)
        assert not grade(p8566, text) and extract_answer(text) is None
        assert not any(true_step_labels(p8566, split_steps(text)))  # the labels agree
    middle = derivation("8 - 5 = 3, left 6 6 3", "9 * 9 = 81, left 81", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24")
    assert not grade(p8566, middle)
    prompt = "Use 8 5 6 6 to make 24.\n<think>"
    assert not grade(p8566, prompt + "6 * 6 * 6 = 216.\n\n<think>" + derivation(*good))  # a second <think>
    assert grade(p8566, prompt + derivation(*good))
    assert grade(p8566, derivation(*good))
    # a completion's own <think> after a wrong step dropped that step (graded right alone, wrong
    # after the prompt), and a later step's "<think>" was cut off by the labeler, not the grader
    redo = "9 * 9 = 81, left 81.\n\n<think>" + derivation(*good)
    assert not grade(p8566, redo) and not grade(p8566, prompt + redo)
    assert not any(true_step_labels(p8566, split_steps(redo)))
    cheat = ["8 - 5 = 3, left 6 6 3.\n\n", "I will cheat <think>6 * 3 = 18, left 6 18.\n\n",
             "18 + 6 = 24, left 24.\n\n", "</think>Answer: 24"]
    assert not grade(p8566, "".join(cheat)) and true_step_labels(p8566, cheat) == [True, False, False, False]
    # a later step opening with <think>, or one after a line of its own: the grader's step parser
    # dropped the tag there and graded the path right while the labels said wrong
    for later in ("<think>", "I will cheat\n<think>"):
        steps = [cheat[0], later + "6 * 3 = 18, left 6 18.\n\n", cheat[2], cheat[3]]
        assert not grade(p8566, "".join(steps)) and not grade(p8566, prompt + "".join(steps))
        assert true_step_labels(p8566, steps) == [True, False, False, False]
    assert grade(p8566, "<think>" + derivation(*good))  # a completion opening its own span
    assert true_step_labels(p8566, split_steps(prompt + derivation(*good)))[:3] == [True, True, True]


def test_a_wrong_written_result_fails_the_derivation(p8566):
    slip = derivation("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 31, left 31")
    assert not grade(p8566, slip) and extract_answer(slip) is None  # the value is 24, but 18 + 6 is not 31
    assert true_step_labels(p8566, split_steps(slip)) == [True, True, False, False]  # labels agree
    assert extract_answer(derivation("5 - 8 = 3, left 6 6 3")) is None  # negative
    assert extract_answer(derivation("8 - 5 = 3, left 6 6 3")) == "8 - 5"


def test_the_rules_apply_to_the_true_values():
    s = make_problem((1, 2, 3), 5)
    assert grade(s, derivation("2 * 3 = 6, left 1 6", "6 - 1 = 5, left 5"))
    n = make_problem((2, 4, 6), 4)
    assert grade(n, derivation("6 - 4 = 2, left 2 2", "2 + 2 = 4, left 4"))
    assert not grade(n, derivation("2 - 4 = 2, left 6 2", "6 - 2 = 4, left 4"))  # 2 - 4 = -2: no negatives
    f = make_problem((2, 3, 4), 6)
    assert grade(f, derivation("3 * 4 = 12, left 2 12", "12 / 2 = 6, left 6"))
    assert not grade(f, derivation("3 / 2 = 1, left 4 1", "4 * 1 = 6, left 6"))  # 3 / 2 = 1.5: no fractions
    b = make_problem((10, 20, 5), 40)
    assert grade(b, derivation("20 / 5 = 4, left 10 4", "10 * 4 = 40, left 40"))
    assert not grade(b, derivation("10 * 20 = 200, left 5 200", "200 / 5 = 40, left 40"))  # 200 > max_value 99


def test_later_steps_use_the_latest_equal_result_first():
    p = make_problem((2, 3, 3, 4), 6)
    # 3 * 2 = 6, then "6 - 3": the 6 is the result (no 6 was given), 3 a given number
    text = derivation("3 * 2 = 6, left 3 4 6", "6 - 3 = 3, left 4 3", "3 + 4 = 7, left 7")
    assert extract_answer(text) == "((2 * 3) - 3) + 4" and not grade(p, text)
    assert grade(p, derivation("4 - 3 = 1, left 2 3 1", "3 * 2 = 6, left 1 6", "6 * 1 = 6, left 6"))


def test_only_the_think_span_counts(p8566):
    good = ("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24")
    assert grade(p8566, "Use 8 5 6 6 to make 24.\n<think>" + derivation(*good))  # a prompt before it
    assert not grade(p8566, derivation(*good)[: -len("</think>Answer: anything")])  # never closed: unfinished
    after = derivation(*good) + "\n" + "".join(f"{s}.\n\n" for s in ("8 + 5 = 13, left 6 6 13",))
    assert grade(p8566, after)  # steps after </think> are not read


@pytest.mark.parametrize(
    "text",
    ["", "Answer:", "</think>", "</think>Answer: ", "</think>Answer: (8 - 5", "</think>Answer: 8 -- 5",
     "</think>Answer: -8 + 5", "</think>Answer: 2.5 * 4", "</think>Answer: 8 5 6 6", "Answer: " + "(" * 500 + "1" + ")" * 500,
     "</think>Answer: " + "9" * 50, "\x00\uffff", "</think>Answer: ()", "8 - 5 = 3.\n\n</think>",
     "8 - 5 = 3, left.\n\n</think>", ".\n\n.\n\n</think>", "8 -- 5 = 3, left 6 6 3.\n\n</think>"],
)
def test_malformed_text_grades_false(p8566, text):
    assert not grade(p8566, text) and extract_answer(text) is None


def test_grade_never_raises_on_non_text_or_foreign_problems(p8566):
    assert grade(p8566, None) is False  # type: ignore[arg-type]
    assert grade(Problem("x", "q", "1"), "1 + 2 = 3, left 3.\n\n</think>") is False  # a problem without countdown meta
    assert extract_answer(12) is None  # type: ignore[arg-type]


_PIECES = st.sampled_from(["Answer: ", "</think>", "<think>", " ", "(", ")", "+", "-", "*", "/", "8", "5", "6", "24",
                           ".\n\n", ", left ", " = ", "\n", "x", "0", "99999999"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join) | st.text(max_size=80))
def test_fuzz_grader_and_labels_never_raise_and_grade_depends_only_on_the_answer(text):
    p = make_problem((8, 5, 6, 6), 24)
    ok = grade(p, text)
    answer = extract_answer(text)
    assert isinstance(ok, bool)
    assert ok == (answer is not None and _answer_grades(p, answer))  # what metrics.py assumes
    labels = true_step_labels(p, split_steps(text))
    assert len(labels) == len(split_steps(text)) and all(isinstance(v, bool) for v in labels)
    assert parse_step(text) is None or isinstance(parse_step(text).x, int)


def _answer_grades(problem, canonical: str) -> bool:
    """Whether a canonical answer is right, straight from the expression (no steps)."""
    expr = countdown._parse_expression(canonical)
    return (expr is not None and sorted(countdown._leaves(expr)) == sorted(problem.meta["numbers"])
            and countdown._evaluate(expr, countdown.rules_of(problem)) == problem.meta["target"])


# -- true step labels ---------------------------------------------------------------------------


def test_true_step_labels_hand_worked(p8566):
    answer = "</think>Answer: (8 - 5) * 6 + 6"  # the answer line is a summary; the derivation is graded
    good = ["8 - 5 = 3, left 6 6 3.\n\n", "6 * 3 = 18, left 6 18.\n\n", "18 + 6 = 24, left 24.\n\n"]
    assert true_step_labels(p8566, good + [answer]) == [True] * 4
    assert true_step_labels(p8566, ["<think>" + good[0]] + good[1:]) == [True] * 3  # <think> prefix kept by split_steps
    assert true_step_labels(p8566, split_steps(prompt_text(p8566) + "".join(good) + answer)) == [True] * 4  # and a prompt
    assert true_step_labels(p8566, ["3 * 6 = 18, left 6 18.\n\n"]) == [False]  # 3 is not given yet
    assert true_step_labels(p8566, [good[0], "3 * 6 = 18, left 18 6.\n\n"]) == [True, True]  # order free
    # 6 - 6 = 0 leaves {0, 5, 8}: from 5 and 8 only 13, 3 and 40 (8 / 5 is not exact), and a 0 then
    # adds, subtracts or zeroes: 24 is out of reach, a dead end although the arithmetic is right
    assert true_step_labels(p8566, ["6 - 6 = 0, left 8 5 0.\n\n"]) == [False]
    assert check_step((5, 6, 6, 8), 24, "6 - 6 = 0, left 8 5 0", RULES).reason.startswith("dead end")
    assert true_step_labels(p8566, ["8 - 5 = 4, left 6 6 4.\n\n"]) == [False]  # arithmetic
    assert true_step_labels(p8566, ["8 - 7 = 1, left 5 6 6 1.\n\n"]) == [False]  # 7 not given
    assert true_step_labels(p8566, ["5 - 8 = 3, left 6 6 3.\n\n"]) == [False]  # negative: 5 - 8 not allowed
    assert true_step_labels(p8566, ["8 - 5 = 3, left 6 3.\n\n"]) == [False]  # wrong "left" list
    assert true_step_labels(p8566, ["8 - 5 = 3.\n\n"]) == [False]  # no "left": malformed
    assert true_step_labels(p8566, [good[0], "8 * 3 = 24, left 6 6 24.\n\n"]) == [True, False]  # 8 used up
    # after a wrong step, later steps are wrong whatever they say
    assert true_step_labels(p8566, ["eight minus five.\n\n"] + good[1:] + [answer]) == [False] * 4
    # the answer step: right only after right steps, with nothing before </think>, and a correct answer
    assert true_step_labels(p8566, good + ["</think>Answer: 8 + 5 + 6 + 6"]) == [True] * 4  # the derivation counts
    assert true_step_labels(p8566, good[:2] + [answer]) == [True] * 2 + [False]  # unfinished derivation
    assert true_step_labels(p8566, good + ["oops</think>" + answer[len("</think>"):]]) == [True] * 3 + [False]
    assert true_step_labels(p8566, [answer]) == [False]  # a bare answer derives nothing
    assert true_step_labels(p8566, good + [answer, good[0]]) == [True] * 4 + [False]  # nothing counts after the answer
    assert true_step_labels(p8566, []) == []


def test_true_step_labels_agree_with_the_grader_on_separators(p8566):
    # the grader skips a lone separator and reads a last step written straight before </think>;
    # the labels called both wrong, so the step oracle ranked a right rollout last
    steps = ["8 - 5 = 3, left 6 6 3.\n\n", "6 * 3 = 18, left 6 18.\n\n", "18 + 6 = 24, left 24.\n\n"]
    answer = "</think>Answer: (8 - 5) * 6 + 6"
    leading = split_steps(".\n\n" + "".join(steps) + answer)
    assert grade(p8566, "".join(leading)) and true_step_labels(p8566, leading) == [True] * len(leading)
    assert true_step_labels(p8566, ["<think>.\n\n", *steps, answer]) == [True] * 5
    joined = [*steps[:2], "18 + 6 = 24, left 24" + answer]
    assert grade(p8566, "".join(joined)) and true_step_labels(p8566, joined) == [True] * 3
    wrong = [*steps[:2], "18 + 6 = 25, left 25" + answer]
    assert true_step_labels(p8566, wrong) == [True, True, False]
    # a step of dots alone: the labeler called it right and the grader a malformed step
    for dots in ("..", ". .", " . "):
        dotted = [steps[0], f"{dots}\n\n", *steps[1:], answer]
        assert grade(p8566, "".join(dotted)) and true_step_labels(p8566, dotted) == [True] * 5
    # ... but text before a second <think> is a malformed step for both (not a step of nothing)
    lost = [steps[0], "I am lost, 7 * 7 = 50<think>.\n\n", *steps[1:], answer]
    assert not grade(p8566, "".join(lost)) and true_step_labels(p8566, lost) == [True, False, False, False, False]


def test_true_step_labels_agree_with_the_solver_on_random_moves(test_problems):
    # a random legal first move is labelled True exactly when the solver can still finish from it
    rng = random.Random(0)
    seen = set()
    for p in test_problems[:50]:
        state = tuple(sorted(p.meta["numbers"]))
        move = rng.choice(legal_moves(state, RULES))
        left = list(p.meta["numbers"])
        left.remove(move.x)
        left.remove(move.y)
        text = f"{move.x} {move.op} {move.y} = {move.result}, left {' '.join(map(str, left + [move.result]))}.\n\n"
        rest = list(state)
        rest.remove(move.x)
        rest.remove(move.y)
        expected = reachable(tuple(sorted(rest + [move.result])), p.meta["target"], RULES)
        assert true_step_labels(p, [text]) == [expected]
        seen.add(expected)
    assert seen == {True, False}


def test_training_pairs_mix_solutions_with_honest_attempts(test_problems):
    pairs = countdown.training_pairs(test_problems[:50], 400, seed=3, solved_share=0.5)
    by_prompt = {prompt_text(p): p for p in test_problems[:50]}
    solved = [grade(by_prompt[prompt], completion) for prompt, completion in pairs]
    assert 0.4 < sum(solved) / len(solved) < 0.7  # half solutions, plus the attempts that happen to hit
    for prompt, completion in pairs:
        problem = by_prompt[prompt]
        steps = split_steps(completion)
        assert len(steps) == len(problem.meta["numbers"])  # one step per operation, then the answer
        for text in steps[:-1]:  # honest: every written result is the true one
            step = parse_step(text)
            assert countdown.apply_op(step.x, step.op, step.y, countdown.rules_of(problem)) == step.result
    assert countdown.training_pairs(test_problems[:50], 400, seed=3, solved_share=0.5) == pairs  # seeded
    assert all(grade(by_prompt[p], c) for p, c in countdown.training_pairs(test_problems[:50], 60, seed=3))
    with pytest.raises(ValueError, match="solved_share=1.5"):
        countdown.training_pairs(test_problems[:5], 4, solved_share=1.5)


def test_a_whole_split_can_be_asked_for():
    # 6 6 6 6 -> 24 is drawn once in 28,561 draws: the 258 problems of Game of 24's test split
    # failed ("only 257 found in 26800 draws"); the draws are completed by enumerating the split
    whole = generate_problems("test", 258, 0, GAME_OF_24)
    assert len({p.id for p in whole}) == 258 and "6 6 6 6 -> 24" in {p.meta["key"] for p in whole}
    assert all(p.meta["split"] == "test" for p in whole)
    assert generate_problems("test", 100, 0, GAME_OF_24) == whole[:100]  # drawn as before
    with pytest.raises(ValueError, match=r"count=259: the test split of .* holds only 258 distinct solvable problems"):
        generate_problems("test", 259, 0, GAME_OF_24)


def test_make_problem_and_config_take_loose_inputs_exactly():
    # 8.9 became 8 with the same id as the integer problem; a target of 24.0 gave another id and
    # "make 24.0."; a list of operations failed later, in a cache, as an unhashable TypeError
    assert make_problem((8, 5, 6, 6), 24.0) == make_problem((8, 5, 6, 6), 24)
    with pytest.raises(ValueError, match=r"need whole numbers"):
        make_problem((8.9, 5, 6, 6), 24)
    with pytest.raises(ValueError, match=r"need whole numbers"):
        make_problem((8, 5, 6, 6), "24")
    listed = CountdownConfig(operations=["+", "*"])
    assert listed.operations == ("+", "*") and generate_problems("test", 2, 0, listed)


@pytest.mark.parametrize("args, message", [
    (["--problems", "0"], "'0' must be an integer >= 1"),  # an IndexError traceback before
    (["--game24", "--problems", "300"], "holds only 258 distinct solvable problems"),  # a ValueError traceback
])
def test_the_statistics_command_names_a_bad_count_in_one_line(args, message, monkeypatch, capsys):
    from experiments.tasks import countdown as module

    monkeypatch.setattr(sys, "argv", ["countdown", *args])
    with pytest.raises(SystemExit) as stop:
        module._main()
    assert stop.value.code == 2 and message in capsys.readouterr().err


TINY = CountdownConfig(min_numbers=2, max_numbers=2, max_number=3, min_target=1, max_target=3, max_value=9)  # 18 pairs


def test_a_count_beyond_every_pair_fails_at_once_naming_the_split_size(monkeypatch):
    # data.train_problems=100000000 drew 100 times that many before the error
    calls = counting_draws(monkeypatch, countdown, "_draw", limit=0)
    with pytest.raises(ValueError, match=r"count=1000000000: the train split of .* holds only 6 distinct solvable "
                                         r"problems; ask for at most 6, or widen the number or target range"):
        generate_problems("train", 10**9, seed=0, cfg=TINY)
    assert calls[0] == 0


def test_the_draws_stop_when_they_find_no_new_problem(monkeypatch):
    calls = counting_draws(monkeypatch, countdown, "_draw", limit=countdown.STALL_DRAWS + 300)
    assert len(generate_problems("train", 6, seed=0, cfg=TINY)) == 6  # the whole split
    calls[0] = 0
    with pytest.raises(ValueError, match=r"count=15: the train split of .* holds only 6 distinct solvable problems"):
        generate_problems("train", 15, seed=0, cfg=TINY)  # <= 18 pairs: counted after the draws stall
    calls[0] = 0
    monkeypatch.setattr(countdown, "MAX_ENUMERATED", 0)  # a space too large to count: the stall ends it
    with pytest.raises(ValueError, match=r"count=15: the train split of .* seems to hold only about 6 distinct "
                                         r"solvable problems \(6 found in \d+ draws, the last 2000 finding no new one\)"):
        generate_problems("train", 15, seed=0, cfg=TINY)
    assert calls[0] <= countdown.STALL_DRAWS + 200  # the draws to the last new problem, then the stall
