"""An outcome oracle as a step scorer: grades a finished path's final answer with the task grader.

The ceiling for selection (Best-of-N with this scorer = oracle pass@N when a correct candidate
exists) and a check that a search strategy actually uses its scores. It cheats on purpose: it
reads the reference answer, so it is never a method, only a bound.

Scores, one per step (a constant per path, so every aggregation ranks paths alike):
  finished path (last step finish "eos" or "length"): 1.0 if grade(problem, path text) else 0.0;
  unfinished path (no steps yet, or the last step ended on the separator): `unfinished`
      (default 0.5: the outcome is not known yet, neither success nor failure).

    from experiments.tasks import arith
    scorer = OutcomeOracleScorer(grade=arith.grade)
    scorer.score([Prefix(problem, steps)])  # [[1.0, 1.0, 1.0]] when the answer is right

Tests: `.venv/bin/pytest tests/test_experiment_configs.py -k oracle`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from treesearch.records import Prefix, Problem

Grader = Callable[[Problem, str], bool]


def _is_unit_number(value: object) -> bool:
    """An int or float (not a bool) in [0, 1]; NaN fails the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass(frozen=True)
class OutcomeOracleScorer:
    """grade: the task grader, (problem, completion text) -> correct; unfinished: the score of
    each step of a path that has not ended yet, in [0, 1]."""

    grade: Grader
    unfinished: float = 0.5

    def __post_init__(self) -> None:
        if not callable(self.grade):
            raise ValueError(f"OutcomeOracleScorer.grade={self.grade!r} must be callable (problem, text) -> bool")
        if not _is_unit_number(self.unfinished):
            raise ValueError(f"OutcomeOracleScorer.unfinished={self.unfinished!r} must be a number in [0, 1]")

    def path_value(self, path: Prefix) -> float:
        """1.0 / 0.0 for a finished path by its grade, `unfinished` otherwise."""
        if not path.is_terminal:
            return float(self.unfinished)
        return 1.0 if self.grade(path.problem, path.text) else 0.0

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        out = []
        for path in paths:
            value = self.path_value(path)
            out.append([value] * len(path.steps))
        return out

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0  # grading text runs no model
