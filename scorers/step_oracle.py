"""A step oracle as a scorer: every step scored by the task's own step checker (a perfect PRM).

For controlled studies of search: with a verifier that is never wrong, how much does each
strategy gain at equal compute, and how much of a learned scorer's shortfall is the scorer's.
Like `scorers.outcome_oracle` it cheats on purpose (it reads the problem's ground truth), so it
is a bound, never a method. It needs a task that labels steps: `true_step_labels(problem,
step_texts) -> list[bool]` (countdown has one: a step is right iff it is well formed, its
arithmetic and "left" list are right, the target is still reachable, and every earlier step is
right; arith has one too: a step is right iff it applies an operation of the question not used
yet, with the exact result, from which the others can still reach the answer in some order, and
every earlier step is right).

Scores: `right` (1.0) for a step the checker accepts, `wrong` (0.0) for one it rejects, so a path
with a wrong step ranks below every path without one under "min" / "geometric_mean" / "last".
A finished path (its last step ended the sequence or hit the length limit) is also graded: its
last step is right only when the task's `grade` accepts the whole completion, so a trace that
never closed its think span scores 0 at its end, not 1 (a path still growing is judged by its
steps alone). The step checker is stricter than the grader in one way, on purpose: a step whose
"left" list is wrong is a wrong step, though the grader, which reads the arithmetic alone, may
accept the rollout; such a rollout ranks low here.

    from experiments.tasks import countdown
    scorer = StepOracleScorer(labels=countdown.true_step_labels, grade=countdown.grade)
    scorer = StepOracleScorer.for_task("experiments.tasks.countdown")      # the same
    # without grade, a finished path is judged by its steps alone (an unclosed think span scores 1)
    scorer.score([Prefix(problem, steps)])   # [[1.0, 1.0, 0.0]]: the third step is a dead end

    python -m experiments.search task=countdown policy.path=outputs/checkpoints/tiny-countdown/final \\
        scorer=step_oracle search=rebase

Tests: `.venv/bin/pytest tests/test_scorers.py -k step_oracle`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from treesearch.records import Prefix, Problem

StepLabels = Callable[[Problem, Sequence[str]], Sequence[bool]]


def _is_unit_number(value: object) -> bool:
    """An int or float (not a bool) in [0, 1]; NaN fails the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass(frozen=True)
class StepOracleScorer:
    """labels: the task's step checker, (problem, step texts) -> one bool per step; right / wrong:
    the score of a step it accepts / rejects, in [0, 1]; grade: the task's grader, (problem,
    completion text) -> bool, for the last step of a finished path (None: steps alone)."""

    labels: StepLabels
    right: float = 1.0
    wrong: float = 0.0
    grade: Callable[[Problem, str], bool] | None = None

    def __post_init__(self) -> None:
        if not callable(self.labels):
            raise ValueError(f"StepOracleScorer.labels={self.labels!r} must be callable (problem, step texts) -> bools")
        if self.grade is not None and not callable(self.grade):
            raise ValueError(f"StepOracleScorer.grade={self.grade!r} must be callable (problem, completion) -> bool or None")
        for name in ("right", "wrong"):
            if not _is_unit_number(getattr(self, name)):
                raise ValueError(f"StepOracleScorer.{name}={getattr(self, name)!r} must be a number in [0, 1]")

    @classmethod
    def for_task(cls, module: str, right: float = 1.0, wrong: float = 0.0) -> "StepOracleScorer":
        """The oracle of the task module `module` (e.g. "experiments.tasks.countdown"), from its
        `true_step_labels` and `grade`; a task without the first is a ValueError naming it."""
        task = importlib.import_module(module)
        labels = getattr(task, "true_step_labels", None)
        if labels is None:
            raise ValueError(f"scorer=step_oracle needs a task that labels steps (a true_step_labels function); "
                             f"{module} has none (countdown has)")
        return cls(labels, right, wrong, getattr(task, "grade", None))

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [self._path_scores(path) for path in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0  # checking steps runs no model

    def _path_scores(self, path: Prefix) -> list[float]:
        texts = [step.text for step in path.steps]
        labels = list(self.labels(path.problem, texts))
        if len(labels) != len(texts):
            raise ValueError(
                f"StepOracleScorer.labels gave {len(labels)} labels for the {len(texts)} steps of a path of "
                f"problem {path.problem.id!r}; it must give one per step"
            )
        if labels and self.grade is not None and path.is_terminal:
            labels[-1] = bool(labels[-1]) and bool(self.grade(path.problem, "".join(texts)))
        return [self.right if ok else self.wrong for ok in labels]
