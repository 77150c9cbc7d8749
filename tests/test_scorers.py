"""The confidence, random and step-score-reader scorers."""
from __future__ import annotations

import math

import pytest

from scorers.confidence import ConfidenceScorer
from scorers.random_scorer import RandomScorer
from scorers.step_score_reader import StepScoreReader
from treesearch.records import Prefix, Problem, Step

P = Problem("p", "q", "1")


def step(lps, score=None, ids=None):
    ids = ids or tuple(range(len(lps)))
    return Step("s.\n\n", tuple(ids), tuple(lps), "separator", score=score)


def test_confidence_mean_and_min_closed_form():
    path = Prefix(P, (step([math.log(0.5), math.log(0.125)]), step([])))
    # mean: exp((ln .5 + ln .125) / 2) = sqrt(.0625) = .25 ; an empty step scores 1
    assert ConfidenceScorer().score([path]) == [[pytest.approx(0.25), 1.0]]
    # min: the least likely token, .125
    assert ConfidenceScorer(reduce="min").score([path]) == [[pytest.approx(0.125), 1.0]]
    assert ConfidenceScorer().cost([path]) == 0


def test_confidence_bad_reduce():
    with pytest.raises(ValueError, match="reduce='max'; valid: mean, min"):
        ConfidenceScorer(reduce="max")


def test_random_scorer_is_deterministic_per_path_and_in_range():
    a = Prefix(P, (step([-1.0], ids=(1,)), step([-1.0], ids=(2,))))
    b = Prefix(P, (step([-1.0], ids=(1,)), step([-1.0], ids=(3,))))
    s1 = RandomScorer(seed=0).score([a, b])
    s2 = RandomScorer(seed=0).score([b])
    assert s1[1] == s2[0]  # batch composition does not matter
    assert s1[0][0] == s1[1][0] and s1[0][1] != s1[1][1]  # shared first step, different second
    assert RandomScorer(seed=1).score([a]) != s1[:1]
    assert all(0.0 <= x < 1.0 for row in s1 for x in row)


def test_step_score_reader_reads_attached_scores_and_refuses_missing():
    path = Prefix(P, (step([-1.0], score=0.3), step([-1.0], score=0.9)))
    assert StepScoreReader().score([path]) == [[0.3, 0.9]]
    with pytest.raises(ValueError, match="step 1 of a path for problem 'p' has no score"):
        StepScoreReader().score([Prefix(P, (step([-1.0], score=0.3), step([-1.0])))])
