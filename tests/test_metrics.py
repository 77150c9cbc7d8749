"""Hand-computed checks of the post-hoc metrics, the disjoint-group metric included."""
from __future__ import annotations

import pytest

from experiments.metrics import CandidateOutcome as C
from experiments.metrics import ProblemOutcome, accuracy, bootstrap, disjoint_groups, problem_accuracy

# 4 candidates: answers 7 (right), 5, 5, 7; scores 0.1, 0.8, 0.3, 0.8
P = ProblemOutcome("p", (C("7", True, 0.1), C("5", False, 0.8), C("5", False, 0.3), C("7", True, 0.8)))


def test_disjoint_groups_in_order():
    assert disjoint_groups(5, 2) == [range(0, 2), range(2, 4)]  # the 5th candidate is dropped
    with pytest.raises(ValueError, match="n=6 must be in \\[1, 5\\]"):
        disjoint_groups(5, 6)


def test_best_score_groups_first_on_ties():
    # N=1: groups [0],[1],[2],[3] -> correct 1,0,0,1 -> 0.5
    assert problem_accuracy(P, 1, "best_score") == 0.5
    # N=2: [0,1] picks 1 (0.8, wrong); [2,3] picks 3 (0.8, right) -> 0.5
    assert problem_accuracy(P, 2, "best_score") == 0.5
    # N=4: scores 0.1,0.8,0.3,0.8: tie between 1 and 3, first wins -> index 1, wrong -> 0
    assert problem_accuracy(P, 4, "best_score") == 0.0


def test_a_nan_score_is_never_the_best_wherever_it_stands():
    nan = float("nan")
    for scores in ([nan, 0.9, 0.1], [0.9, nan, 0.1], [0.1, 0.9, nan]):
        outcome = ProblemOutcome("q", tuple(C("1", s == 0.9, s) for s in scores))
        assert problem_accuracy(outcome, 3, "best_score") == 1.0  # the 0.9 candidate


def test_majority_and_weighted_majority():
    # N=4 majority: 7 x2, 5 x2, tie -> first seen "7" -> right
    assert problem_accuracy(P, 4, "majority") == 1.0
    # weighted: 7 -> 0.1 + 0.8 = 0.9 ; 5 -> 0.8 + 0.3 = 1.1 -> 5 wrong
    assert problem_accuracy(P, 4, "weighted_majority") == 0.0
    # N=2 majority: [7,5] tie -> 7 right; [5,7] tie -> 5 wrong -> 0.5
    assert problem_accuracy(P, 2, "majority") == 0.5


def test_oracle_and_first():
    assert problem_accuracy(P, 2, "oracle") == 1.0
    assert problem_accuracy(P, 1, "oracle") == 0.5
    assert problem_accuracy(P, 1, "first") == 0.5


def test_missing_answers_never_win_a_vote():
    q = ProblemOutcome("q", (C(None, False, 0.9), C(None, False, 0.9), C("3", True, 0.1)))
    assert problem_accuracy(q, 3, "majority") == 1.0


def test_accuracy_averages_problems_with_interval():
    q = ProblemOutcome("q", (C("1", False, 0.5),) * 4)
    est = accuracy([P, q], 2, "oracle")
    assert est.mean == 0.5  # (1 + 0) / 2
    assert (est.low, est.high) == pytest.approx((0.09453, 0.90547), abs=1e-5)  # Wilson's 95% interval of 1 of 2


def test_bootstrap_of_constant_is_exact():
    est = bootstrap([0.25] * 10)
    assert (est.mean, est.low, est.high) == (0.25, 0.25, 0.25)


def test_unknown_selector():
    with pytest.raises(ValueError, match="valid: best_score, first, majority, oracle, weighted_majority"):
        problem_accuracy(P, 1, "vote")
