"""Moves of the Countdown task: the exact solver, the text of one step, and the step checker.

A Countdown state is the multiset of numbers still unused, kept as a sorted tuple. A move takes
two of them, x and y, and replaces them by x op y. The rules keep every value a small
non-negative integer, which is what a tiny policy can learn to compute:

- "+" and "*" always; "-" only when x >= y (no negative values); "/" only when y > 0 divides x
  exactly (no fractions);
- the result must be at most `Rules.max_value`.

The solver is exact (integers only, so exact rational arithmetic reduces to exact integer
arithmetic under these rules): `solution_count` counts the complete move sequences ("traces")
that end on exactly the target with every number used once, memoised per (state, target, rules),
and `reachable` is `solution_count > 0`. A move is a dead end when its next state cannot reach the
target any more.

One step of a solution is one move, written with the numbers still left after it:

    "8 - 5 = 3, left 6 6 3"        (then the step separator ".\\n\\n")

The "left" clause is the verifier's handle: it makes each step self-contained (the state after
the step is in the step's own text, so neither the policy choosing the next move nor a head
judging this one has to reconstruct it from the whole trace), and a dead end is visible in the
step itself ("left 1 1 2" with target 24). It is written as the previous list with the two
operands removed (first occurrences) and the result appended, a copy-and-edit a small model can
learn; the checker compares it as a multiset, so any order passes.

`check_step(state, target, text, rules)` says whether one step is correct from a state; a step is
correct iff it is well formed, both operands are available, the operation is allowed and its
arithmetic right, the "left" list is the true remaining multiset, and the target is still
reachable from it. `step_labels` labels a whole trace, where a step after a wrong one is wrong
(its state is undefined): the usual process-reward convention.

    >>> rules = Rules(max_value=99)
    >>> solution_count((2, 3, 4, 6), 24, rules)  # e.g. 6 * 4 = 24, 3 - 2 = 1, 24 * 1 = 24
    24
    >>> check_step((2, 3, 4, 6), 24, "4 * 3 = 12, left 2 6 12.\\n\\n", rules).ok
    True
    >>> check_step((2, 3, 4, 6), 24, "6 / 3 = 2, left 2 4 2.\\n\\n", rules).reason
    'dead end: 24 cannot be made from [2, 2, 4]'
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

SEPARATOR = ".\n\n"
THINK_OPEN = "<think>"
OPERATIONS: tuple[str, ...] = ("+", "-", "*", "/")
# Digits per number that a step may contain (a longer run is malformed, never parsed into a huge int).
MAX_DIGITS = 6

State = tuple[int, ...]  # the unused numbers, sorted ascending


@dataclass(frozen=True)
class Rules:
    """What a move may do.

    max_value: largest value any move may produce (results stay in [0, max_value]).
    operations: the allowed operators, a subset of "+", "-", "*", "/".
    """

    max_value: int = 100
    operations: tuple[str, ...] = OPERATIONS

    def __post_init__(self) -> None:
        if self.max_value < 1:
            raise ValueError(f"Rules.max_value={self.max_value}; must be >= 1")
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations or len(set(self.operations)) != len(self.operations):
            raise ValueError(f"Rules.operations={self.operations!r}; each must be one of {OPERATIONS}, no repeats")


@dataclass(frozen=True)
class Move:
    """x op y = result, taking x and y from the state and putting result in."""

    x: int
    op: str
    y: int
    result: int


@dataclass(frozen=True)
class StepCheck:
    """The verdict on one step: ok, why not (empty when ok), and the state after it (None when the
    step could not be applied); kind: which rule failed, one of STEP_FAULTS ("" when ok)."""

    ok: bool
    reason: str
    state_after: State | None
    kind: str = ""


# What can be wrong with a step, in the order check_step tests it.
STEP_FAULTS: tuple[str, ...] = ("malformed", "operands", "not allowed", "arithmetic", "left list", "dead end")


# ---------------------------------------------------------------------------------------------
# Moves and the solver


def apply_op(x: int, op: str, y: int, rules: Rules) -> int | None:
    """x op y under the rules, or None when the rules forbid it (negative, fraction, too big)."""
    if op not in rules.operations:
        return None
    if op == "+":
        value = x + y
    elif op == "-":
        value = x - y
    elif op == "*":
        value = x * y
    elif op == "/":
        if y == 0 or x % y:
            return None
        value = x // y
    else:
        return None
    return value if 0 <= value <= rules.max_value else None


def remove_pair(state: State, x: int, y: int) -> State | None:
    """state without one x and one y (sorted), or None when they are not both there."""
    rest = list(state)
    for value in (x, y):
        if value not in rest:
            return None
        rest.remove(value)
    return tuple(rest)


def next_state(state: State, move: Move) -> State:
    """The state after a legal move (its operands must be in state)."""
    rest = remove_pair(state, move.x, move.y)
    if rest is None:
        raise ValueError(f"move {move} uses numbers not in state {state}")
    return tuple(sorted(rest + (move.result,)))


def legal_moves(state: State, rules: Rules) -> list[Move]:
    """Every distinct move from state. Equal values are one choice (two 6s give one "6 + 6");
    commutative operations are written larger operand first, so "6 + 8" and "8 + 6" are one move."""
    moves: list[Move] = []
    values = sorted(set(state), reverse=True)
    counts = Counter(state)
    for i, x in enumerate(values):
        for y in values[i:]:  # y <= x
            if y == x and counts[x] < 2:
                continue
            for op in rules.operations:
                moves += _moves_of_pair(x, y, op, rules)
    return moves


def _moves_of_pair(x: int, y: int, op: str, rules: Rules) -> list[Move]:
    """The moves op makes of the pair x >= y: (x op y), and also (y / x) when that is exact
    (only 0 / x, since numbers are non-negative)."""
    out = []
    for a, b in ((x, y), (y, x)) if op == "/" and x != y else ((x, y),):
        value = apply_op(a, op, b, rules)
        if value is not None:
            out.append(Move(a, op, b, value))
    return out


@functools.lru_cache(maxsize=1 << 20)
def solution_count(state: State, target: int, rules: Rules) -> int:
    """How many move sequences take state to exactly (target,): the number of distinct solution
    traces (two traces differ when some step differs, including the order of independent steps)."""
    if len(state) == 1:
        return int(state[0] == target)
    return sum(solution_count(next_state(state, m), target, rules) for m in legal_moves(state, rules))


@functools.lru_cache(maxsize=1 << 20)
def reachable(state: State, target: int, rules: Rules) -> bool:
    """Whether the target can be made from state using every number exactly once (stops at the
    first solution, so it is cheaper than solution_count)."""
    if len(state) == 1:
        return state[0] == target
    return any(reachable(next_state(state, m), target, rules) for m in legal_moves(state, rules))


def good_moves(state: State, target: int, rules: Rules) -> list[Move]:
    """The legal moves after which the target is still reachable."""
    return [m for m in legal_moves(state, rules) if reachable(next_state(state, m), target, rules)]


def random_solution(state: State, target: int, rules: Rules, rng: random.Random) -> list[Move]:
    """A solution drawn move by move, uniformly among the moves that keep the target reachable
    (not uniform over traces: every good first move is equally likely, which is the diversity a
    policy needs at each branch). Raises ValueError when the target is not reachable."""
    if not reachable(state, target, rules):
        raise ValueError(f"target {target} is not reachable from {state} with {rules}")
    moves = []
    while len(state) > 1:
        move = rng.choice(good_moves(state, target, rules))
        moves.append(move)
        state = next_state(state, move)
    return moves


def all_solutions(state: State, target: int, rules: Rules) -> Iterator[list[Move]]:
    """Every solution trace, depth first (solution_count(state) of them)."""
    if len(state) == 1:
        if state[0] == target:
            yield []
        return
    for move in good_moves(state, target, rules):
        for rest in all_solutions(next_state(state, move), target, rules):
            yield [move] + rest


def dead_end_share(state: State, target: int, rules: Rules) -> float:
    """The share of legal moves from state after which the target is unreachable (0.0 with no
    legal move)."""
    moves = legal_moves(state, rules)
    if not moves:
        return 0.0
    return sum(not reachable(next_state(state, m), target, rules) for m in moves) / len(moves)


# ---------------------------------------------------------------------------------------------
# Step text


def format_step(move: Move, left: Sequence[int]) -> str:
    """The step text of a move, with the separator: "8 - 5 = 3, left 6 6 3.\\n\\n"."""
    return f"{move.x} {move.op} {move.y} = {move.result}, left {' '.join(map(str, left))}{SEPARATOR}"


def left_after(left: Sequence[int], move: Move) -> list[int]:
    """The written "left" list after a move: operands removed (first occurrences), result appended."""
    rest = list(left)
    rest.remove(move.x)
    rest.remove(move.y)
    return rest + [move.result]


_NUM = rf"(\d{{1,{MAX_DIGITS}}})"
_STEP_RE = re.compile(rf"{_NUM} *([-+*/]) *{_NUM} *= *{_NUM} *, *left((?: +\d{{1,{MAX_DIGITS}}})+)")


@dataclass(frozen=True)
class ParsedStep:
    """The content of a well-formed step text."""

    x: int
    op: str
    y: int
    result: int
    left: tuple[int, ...]


def think_body(text: str) -> str:
    """text after the think span's opener when its first <think> opens the span: at the start of
    the text, or after a prompt ("Use 8 5 6 6 to make 24.\n<think>": a line with no step
    separator in it, ended by a newline); else text itself, where a <think> lies inside a step
    (malformed): "9 * 9 = 81, left 81.\n\n<think>" + a derivation dropped the wrong step before it
    and was graded right, as the same text after the prompt was not."""
    before, opener, after = text.partition(THINK_OPEN)
    if opener and (before == "" or (before.endswith("\n") and SEPARATOR not in before)):
        return after
    return text


def step_body(text: str) -> str:
    """A step text without leading and trailing separators and surrounding blanks (a <think> in it
    stays: malformed; the first step's prompt and opener are `step_labels`' to drop)."""
    body = text.strip().lstrip(". \t\n\r")  # a leading lone separator is no part of it
    end = len(body)
    while end and (body[end - 1] == "." or body[end - 1].isspace()):  # one pass (a loop of slices was quadratic)
        end -= 1
    return body[:end]


def parse_step(text: str) -> ParsedStep | None:
    """The step "x op y = r, left a b c" (separator optional), or None when malformed. Never raises."""
    if not isinstance(text, str) or len(text) > 200:
        return None
    match = _STEP_RE.fullmatch(step_body(text))
    if match is None:
        return None
    x, op, y, result, left = match.groups()
    return ParsedStep(int(x), op, int(y), int(result), tuple(int(v) for v in left.split()))


def check_step(state: State, target: int, text: str, rules: Rules) -> StepCheck:
    """Whether step `text` is correct from `state` (see the module docstring). Never raises."""
    step = parse_step(text)
    if step is None:
        return StepCheck(False, f"malformed step {text!r}", None, "malformed")
    rest = remove_pair(state, step.x, step.y)
    if rest is None:
        return StepCheck(False, f"{step.x} and {step.y} are not both among {state}", None, "operands")
    value = apply_op(step.x, step.op, step.y, rules)
    if value is None:
        return StepCheck(False, f"{step.x} {step.op} {step.y} is not allowed by {rules}", None, "not allowed")
    if value != step.result:
        return StepCheck(False, f"{step.x} {step.op} {step.y} is {value}, not {step.result}", None, "arithmetic")
    after = tuple(sorted(rest + (value,)))
    if tuple(sorted(step.left)) != after:
        return StepCheck(False, f"left {list(step.left)} should be {list(after)} as a multiset", after, "left list")
    if not reachable(after, target, rules):
        return StepCheck(False, f"dead end: {target} cannot be made from {list(after)}", after, "dead end")
    return StepCheck(True, "", after)


def step_labels(numbers: Sequence[int], target: int, rules: Rules, step_texts: Sequence[str]) -> list[bool]:
    """One label per think-span step: correct iff every step up to it is correct (check_step from
    the state the earlier steps reached); an empty step (a lone separator) changes nothing and is
    right while every step before it is. Never raises."""
    labels: list[bool] = []
    state: State | None = tuple(sorted(numbers))
    for i, text in enumerate(step_texts):
        if i == 0:  # split_steps joins a prompt and its <think> to the first step (`think_body`)
            text = think_body(text)
        # a lone separator: no step, as the grader skips it; a <think> anywhere else is text inside a
        # step, malformed, as the grader reads it ("3.\n\n<think>6 * 3 = 18", "I will cheat\n<think>...")
        if state is not None and step_body(text) == "":
            labels.append(True)
            continue
        verdict = check_step(state, target, text, rules) if state is not None else None
        ok = verdict is not None and verdict.ok
        labels.append(ok)
        state = verdict.state_after if ok else None
    return labels
