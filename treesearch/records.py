"""Frozen records that cross module boundaries: a problem, a step, a partial path (prefix).

Everything a policy, a scorer or a strategy exchanges is one of these; none of them changes after
it is made, so a tree, a result file and a metric all see the same values.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

Finish = Literal["separator", "eos", "length"]
FINISH_REASONS: tuple[str, ...] = ("separator", "eos", "length")


@dataclass(frozen=True)
class Problem:
    """One question to solve.

    id: stable identifier, unique within a task split.
    question: the text shown to the policy (the policy's prompt template wraps it).
    answer: the reference final answer as a string, or None when it is unknown.
    meta: task-specific extras (difficulty, source file and line, ...); never read by the search;
        compared by ==, left out of the hash (a dict: a Problem is a dict key, and a Prefix with it).
    """

    id: str
    question: str
    answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


_INTS, _FLOATS = frozenset({int}), frozenset({float})  # the element types a Step keeps as they are


def _plain_tuple(name: str, values: Any, kind: Callable[[Any], Any]) -> tuple:
    """values (a list, tuple, numpy array or tensor) as a tuple of Python numbers: ints for ids
    (operator.index: 3.0 is refused, np.int64(3) is 3), floats for log-probs; ValueError naming the field."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        what = "integers" if kind is operator.index else "numbers"
        raise ValueError(f"Step.{name} must hold {what}, got {values!r:.80}") from None


def plain_float(value: Any, name: str) -> float:
    """A score (a Python, numpy or torch number) as a Python float, which JSON writes (a numpy
    float32 made a tree unsaveable), or a ValueError naming `name`."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name}={value!r:.80} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r:.80} must be a number") from None


@dataclass(frozen=True)
class Step:
    """One reasoning step as the policy produced it.

    text: the decoded step, separator included when the step ended on one.
    token_ids: the generated token ids of this step (what a continuation appends, never re-tokenised).
    token_logprobs: log-probability of each generated token under the policy (temperature 1), same
        length as token_ids.
    finish: "separator" (the step ended on the step separator), "eos" (the sequence ended) or
        "length" (a token limit cut it).
    tokens_forwarded: tokens the backend ran through the model to make this step, prompt tokens
        that were not cached included; when several samples share one prefill, the prefill is
        counted on the first sample only, so sums over steps equal the real work.
    score: a step score in [0, 1] attached by a policy that owns a scorer head, else None.
    """

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    finish: Finish
    tokens_forwarded: int = 0
    score: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"Step.text={self.text!r} must be a string")
        # a list given stays changeable (and unhashable); numpy / torch numbers do not go to JSON
        for name, kind, plain in (("token_ids", operator.index, _INTS), ("token_logprobs", float, _FLOATS)):
            value = getattr(self, name)
            if type(value) in (tuple, list) and set(map(type, value)) <= plain:  # the common case: one pass in C
                if type(value) is list:
                    object.__setattr__(self, name, tuple(value))
            else:
                object.__setattr__(self, name, _plain_tuple(name, value, kind))
        forwarded = self.tokens_forwarded
        if type(forwarded) is not int or forwarded < 0:  # (the common case in one test)
            if not isinstance(forwarded, numbers.Integral) or isinstance(forwarded, bool) or forwarded < 0:
                raise ValueError(f"Step.tokens_forwarded={forwarded!r} must be an integer >= 0 (tokens the backend "
                                 "ran to make the step: 0 when unknown)")
            object.__setattr__(self, "tokens_forwarded", int(forwarded))
        if self.score is not None and type(self.score) is not float:  # a numpy score made the tree unsaveable
            object.__setattr__(self, "score", plain_float(self.score, "Step.score"))
        if self.finish not in FINISH_REASONS:
            raise ValueError(f"Step.finish={self.finish!r}; valid: {', '.join(FINISH_REASONS)}")
        if len(self.token_ids) != len(self.token_logprobs):
            raise ValueError(
                f"Step has {len(self.token_ids)} token_ids but {len(self.token_logprobs)} token_logprobs"
            )

    @property
    def logprob(self) -> float:
        """Sum of the step's token log-probabilities."""
        return float(sum(self.token_logprobs))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_terminal(self) -> bool:
        """True when nothing can follow this step (the sequence ended or was cut)."""
        return self.finish != "separator"


@dataclass(frozen=True)
class Prefix:
    """A partial solution: the problem and the steps taken so far (possibly none)."""

    problem: Problem
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple):  # a list given stays changeable (and unhashable)
            object.__setattr__(self, "steps", tuple(self.steps))

    def extend(self, step: Step) -> "Prefix":
        return Prefix(self.problem, self.steps + (step,))

    @property
    def text(self) -> str:
        """The solution text so far (steps joined as generated)."""
        return "".join(s.text for s in self.steps)

    @property
    def is_terminal(self) -> bool:
        return bool(self.steps) and self.steps[-1].is_terminal
