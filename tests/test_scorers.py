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


# -- the step oracle ------------------------------------------------------------------------------


def _countdown_path(texts):
    from experiments.tasks import countdown

    problem = countdown.make_problem((2, 3, 4, 6), 24)
    steps = tuple(Step(text=t, token_ids=(1,), token_logprobs=(-0.1,), finish="separator") for t in texts)
    return Prefix(problem, steps)


def test_step_oracle_scores_each_step_by_the_tasks_checker():
    from scorers.step_oracle import StepOracleScorer

    scorer = StepOracleScorer.for_task("experiments.tasks.countdown")
    right = _countdown_path(["4 + 2 = 6, left 3 6 6.\n\n", "6 * 3 = 18, left 6 18.\n\n"])
    # 6 / 3 = 2 leaves 2 2 4, from which 24 cannot be made: a dead end, and so is what follows it
    dead = _countdown_path(["4 + 2 = 6, left 3 6 6.\n\n", "6 / 3 = 2, left 2 6.\n\n", "6 * 2 = 12, left 12.\n\n"])
    assert scorer.score([right, dead, _countdown_path([])]) == [[1.0, 1.0], [1.0, 0.0, 0.0], []]
    assert scorer.cost([right, dead]) == 0
    assert StepOracleScorer(scorer.labels, right=0.9, wrong=0.2).score([dead]) == [[0.9, 0.2, 0.2]]


def test_step_oracle_scores_arith_by_its_one_correct_path():
    # arith was refused ("has none") though rollout_cache and train_head labelled its steps
    from experiments.tasks import arith
    from scorers.step_oracle import StepOracleScorer

    problem = arith.generate_problems("test", 1, seed=0)[0]
    reference = arith.solution_steps(problem)
    answer = arith.solution_text(problem).split(arith.THINK_CLOSE, 1)[1]

    def path(texts: list[str], finish: str = "separator") -> Prefix:
        return Prefix(problem, tuple(Step(text=t, token_ids=(1,), token_logprobs=(-0.1,),
                                          finish=finish if i == len(texts) - 1 else "separator") for i, t in enumerate(texts)))

    scorer = StepOracleScorer.for_task("experiments.tasks.arith")
    wrong = "1 + 1 = 3.\n\n"
    right = path([*reference, arith.THINK_CLOSE + answer], finish="eos")
    assert scorer.score([right, path([wrong, *reference[1:]])]) == [[1.0] * (len(reference) + 1), [0.0] * len(reference)]


def test_step_oracle_grades_the_end_of_a_finished_path():
    # a trace that ended without closing its think span scored 1 at every step and, on a tie with
    # a right one, was chosen: its end is graded now; a path still growing keeps its step labels
    from dataclasses import replace

    from scorers.step_oracle import StepOracleScorer

    scorer = StepOracleScorer.for_task("experiments.tasks.countdown")
    texts = ["4 + 2 = 6, left 3 6 6.\n\n", "6 * 3 = 18, left 6 18.\n\n", "18 + 6 = 24, left 24.\n\n"]
    growing = _countdown_path(texts)
    ended = Prefix(growing.problem, growing.steps[:-1] + (replace(growing.steps[-1], finish="eos"),))
    closed = _countdown_path([*texts, "</think>Answer: (4 + 2) * 3 + 6"])
    closed = Prefix(closed.problem, closed.steps[:-1] + (replace(closed.steps[-1], finish="eos"),))
    assert scorer.score([growing, ended, closed]) == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0] * 4]
    assert StepOracleScorer(scorer.labels).score([ended]) == [[1.0, 1.0, 1.0]]  # no grade: steps alone
    from experiments.tasks import countdown  # the module docstring's other form, "the same"

    assert StepOracleScorer(labels=countdown.true_step_labels, grade=countdown.grade) == scorer


def test_step_oracle_names_a_task_without_step_labels_and_bad_settings():
    from scorers.step_oracle import StepOracleScorer

    with pytest.raises(ValueError, match=r"step_oracle needs a task that labels steps .* experiments.tasks.gsm8k has none"):
        StepOracleScorer.for_task("experiments.tasks.gsm8k")
    with pytest.raises(ValueError, match=r"StepOracleScorer.right=1.5 must be a number in \[0, 1\]"):
        StepOracleScorer(lambda p, t: [True] * len(t), right=1.5)
    with pytest.raises(ValueError, match=r"StepOracleScorer.labels=3 must be callable"):
        StepOracleScorer(3)  # type: ignore[arg-type]
    short = StepOracleScorer(lambda p, t: [True])
    with pytest.raises(ValueError, match=r"gave 1 labels for the 2 steps of a path of problem"):
        short.score([_countdown_path(["a.\n\n", "b.\n\n"])])
