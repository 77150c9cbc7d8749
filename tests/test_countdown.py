"""The countdown task: generation, splits, solution format, grading, true step labels, the solver,
config validation, and the generator-verifier gap it exists for."""
from __future__ import annotations

import random
import statistics

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


@pytest.mark.parametrize(
    "answer",
    ["(6 * (8 - 5)) + 6", "(8-5)*6+6", "6 + 6 * (8 - 5)", "((8 - 5) * 6) + 6", "  (8 - 5) * 6 + 6 .", "6*(8-5)+6"],
)
def test_correct_expressions_in_any_form_grade_true(p8566, answer):
    assert grade(p8566, f"8 - 5 = 3, left 6 6 3.\n\n</think>Answer: {answer}")
    assert extract_answer(f"</think>Answer: {answer}") == "((8 - 5) * 6) + 6"  # one canonical form


@pytest.mark.parametrize(
    "answer, why",
    [
        ("(8 - 5) * 8", "a number not given twice, 6s unused"),
        ("(8 - 5) * 6 + 5", "5 used twice"),
        ("(8 - 5) * 6", "a 6 unused"),
        ("(8 - 5) * 6 + 6 + 0", "0 is not a given number"),
        ("(8 + 5) * 6 + 6", "wrong value"),
        ("6 - 8 + 5 * 6 - 6 + 8", "numbers beyond those given"),
        ("6 - 8 + 26", "wrong numbers and a negative intermediate"),
        ("24", "no computation"),
    ],
)
def test_wrong_expressions_grade_false(p8566, answer, why):
    assert not grade(p8566, f"</think>Answer: {answer}"), why


def test_the_rules_apply_to_the_answer_too():
    s = make_problem((1, 2, 3), 5)
    assert grade(s, "</think>Answer: 2 * 3 - 1") and not grade(s, "</think>Answer: 1 - 3 + 7")
    n = make_problem((2, 4, 6), 4)
    assert grade(n, "</think>Answer: 6 - 4 + 2")
    assert not grade(n, "</think>Answer: 2 - 4 + 6")  # (2 - 4) = -2: no negative values
    f = make_problem((2, 3, 4), 6)
    assert grade(f, "</think>Answer: 3 * 4 / 2")  # 12 / 2: every intermediate an integer
    assert not grade(f, "</think>Answer: 3 / 2 * 4")  # 3 / 2 = 1.5: no fractions
    b = make_problem((10, 20, 5), 40)
    assert grade(b, "</think>Answer: 20 / 5 * 10")
    assert not grade(b, "</think>Answer: 10 * 20 / 5")  # 200 > max_value 99
    assert not grade(b, "</think>Answer: 20 / 0 * 10 + 5")  # division by zero, and a 0 not given


def test_only_the_last_answer_after_the_last_think_close_counts(p8566):
    good, bad = "(8 - 5) * 6 + 6", "8 + 5 + 6 + 6"
    assert grade(p8566, f"Answer: {bad}</think>Answer: {good}")
    assert not grade(p8566, f"Answer: {good}</think>Answer: {bad}")
    assert grade(p8566, f"</think>Answer: {bad}\nAnswer: {good}")
    assert grade(p8566, f"Answer: {good}")  # no </think>: anywhere


@pytest.mark.parametrize(
    "text",
    ["", "Answer:", "</think>", "</think>Answer: ", "</think>Answer: (8 - 5", "</think>Answer: 8 -- 5",
     "</think>Answer: -8 + 5", "</think>Answer: 2.5 * 4", "</think>Answer: 8 5 6 6", "Answer: " + "(" * 500 + "1" + ")" * 500,
     "</think>Answer: " + "9" * 50, "\x00\uffff", "</think>Answer: ()"],
)
def test_malformed_text_grades_false(p8566, text):
    assert not grade(p8566, text) and extract_answer(text) is None


def test_grade_never_raises_on_non_text_or_foreign_problems(p8566):
    assert grade(p8566, None) is False  # type: ignore[arg-type]
    assert grade(Problem("x", "q", "1"), "Answer: 1 + 2") is False  # a problem without countdown meta
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
    assert ok == (answer is not None and grade(p, f"Answer: {answer}"))  # what metrics.py assumes
    labels = true_step_labels(p, split_steps(text))
    assert len(labels) == len(split_steps(text)) and all(isinstance(v, bool) for v in labels)
    assert parse_step(text) is None or isinstance(parse_step(text).x, int)


def _expression_strategy() -> st.SearchStrategy[str]:
    leaf = st.integers(0, 30).map(str)
    return st.recursive(
        leaf, lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        max_leaves=5,
    )


@settings(max_examples=200, deadline=None)
@given(_expression_strategy())
def test_fuzz_canonical_answer_is_a_fixed_point(expr):
    canonical = extract_answer(f"Answer: {expr}")
    assert canonical is not None
    assert extract_answer(f"Answer: {canonical}") == canonical


# -- true step labels ---------------------------------------------------------------------------


def test_true_step_labels_hand_worked(p8566):
    answer = "</think>Answer: (8 - 5) * 6 + 6"
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
    assert true_step_labels(p8566, good + ["</think>Answer: 8 + 5 + 6 + 6"]) == [True] * 3 + [False]
    assert true_step_labels(p8566, good + ["oops</think>" + answer[len("</think>"):]]) == [True] * 3 + [False]
    assert true_step_labels(p8566, [answer]) == [True]  # a bare correct answer
    assert true_step_labels(p8566, [answer, good[0]]) == [True, False]  # nothing counts after the answer
    assert true_step_labels(p8566, []) == []


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
