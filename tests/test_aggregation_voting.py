"""Closed-form checks of step-score aggregation and voting."""
from __future__ import annotations

import math

import pytest

from treesearch.aggregation import aggregate
from treesearch.voting import majority, weighted_majority


@pytest.mark.parametrize(
    "name, scores, expected",
    [
        ("geometric_mean", [0.25, 1.0], 0.5),            # sqrt(0.25 * 1)
        ("geometric_mean", [0.5, 0.5, 0.5], 0.5),
        ("geometric_mean", [0.0, 1.0], math.sqrt(1e-10)),  # clamped at 1e-10 before the log
        ("min", [0.3, 0.1, 0.7], 0.1),
        ("product", [0.5, 0.4], 0.2),
        ("last", [0.9, 0.2], 0.2),
        ("mean", [0.2, 0.4, 0.9], 0.5),
    ],
)
def test_aggregations_closed_form(name, scores, expected):
    assert aggregate(scores, name) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["geometric_mean", "min", "product", "last", "mean"])
def test_empty_path_scores_zero(name):
    assert aggregate([], name) == 0.0


@pytest.mark.parametrize("name", ["geometric_mean", "product", "mean", "min"])
def test_the_same_step_scores_in_another_order_tie_exactly(name):
    # in plain sum / prod order [0.3, 0.2, 0.1] and [0.1, 0.2, 0.3] differed in the last bit, so the
    # second path beat the first in every "first on ties" ranking
    forward, backward = aggregate([0.3, 0.2, 0.1], name), aggregate([0.1, 0.2, 0.3], name)
    assert forward == backward
    assert aggregate([0.7, 0.1, 0.9, 0.3], name) == aggregate([0.3, 0.9, 0.1, 0.7], name)


def test_best_of_n_picks_the_first_of_two_paths_with_the_same_scores_in_another_order():
    from treesearch.result import argmax_first

    scores = [aggregate(path, "geometric_mean") for path in ([0.3, 0.2, 0.1], [0.1, 0.2, 0.3])]
    assert argmax_first(scores) == 0


def test_geometric_mean_is_the_default():
    assert aggregate([0.25, 1.0]) == pytest.approx(0.5)


def test_unknown_aggregation_lists_valid():
    with pytest.raises(ValueError, match="valid: geometric_mean, last, mean, min, product"):
        aggregate([0.5], "harmonic")


def test_majority_counts_and_breaks_ties_by_first_seen():
    assert majority(["3", "4", "4", None]) == "4"
    assert majority(["5", "6", "6", "5"]) == "5"  # 2-2 tie: "5" was seen first
    assert majority([None, None]) is None
    assert majority([]) is None


def test_weighted_majority_sums_weights():
    # "3": 0.9; "4": 0.2 + 0.3 = 0.5
    assert weighted_majority(["3", "4", "4"], [0.9, 0.2, 0.3]) == "3"
    # "4": 0.5 + 0.5 = 1.0 beats "3": 0.9
    assert weighted_majority(["3", "4", "4"], [0.9, 0.5, 0.5]) == "4"
    assert weighted_majority(["3", None], [0.1, 5.0]) == "3"  # a missing answer never wins
    # the same weights in another order tie (a running float sum gives b 0.6000000000000001 > a 0.6)
    assert weighted_majority(["a", "b", "b", "a", "b", "a"], [0.3, 0.1, 0.2, 0.2, 0.3, 0.1]) == "a"


def test_weighted_majority_length_mismatch():
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        weighted_majority(["1", "2"], [1.0])
