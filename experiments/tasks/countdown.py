"""The `countdown` task: make a target from given numbers with + - * /, each number used once.

The embedded task with a generator-verifier gap (DESIGN.md section 4, issue 3 item 8). Game of 24
is the special case of four numbers and target 24 (`GAME_OF_24`). Unlike `arith`, where every
correct rollout of a problem is the same text, a Countdown problem has many correct solution
paths (the default generator's test problems average about 7 solution traces, most have more
than one), and a step is easier to check than to choose: about three quarters of the legal first
moves are dead ends, which the exact solver sees at once (run this module for the numbers).

    prompt:    "Use 8 5 6 6 to make 24.\\n<think>"
    solution:  "8 - 5 = 3, left 6 6 3.\\n\\n6 * 3 = 18, left 6 18.\\n\\n18 + 6 = 24, left 24.\\n\\n"
               "</think>Answer: (6 * (8 - 5)) + 6"

Rules (`countdown_steps.Rules`): every intermediate value is a non-negative integer at most
`max_value` (subtraction never goes negative, division only when exact), which keeps the
arithmetic within what a 3.5M-parameter model learns: with the default single-digit numbers and
values below 100 every step is a times-table or two-digit fact. Problems are generated only when
the exact solver finds a solution under these rules (classic 24 puzzles that need a fraction,
such as 3 3 8 8, are therefore left out, and so are the 12 whose every integer solution passes a
value above 99, such as 4 4 10 10 by (10 * 10 - 4) / 4: GAME_OF_24 keeps 1,334 of the 1,346 with an
integer solution).

Steps: one per operation, "x op y = r, left <numbers still unused>" (countdown_steps.py says why
the "left" clause is there), larger operand first. Answer: the whole computation as one
expression, each intermediate result in parentheses (composing it from the steps is a mechanical
substitution, with no precedence to reason about; the grader does not read it, see below). The reference solution of an example is drawn at random among the valid
traces (`solution_text(problem, seed)`, uniform over the moves that keep the target reachable at
each step), so SFT teaches diverse valid paths rather than one canonical path per problem.

Grading reads the derivation, the steps of the think span, not the "Answer:" line after it:
the steps are composed into one expression (each "x op y = r" takes x and y from the results of
earlier steps when one has that value, most recent first, else as given numbers) and the
completion is correct iff that expression uses each given number exactly once and its TRUE value
(every intermediate value a non-negative integer <= max_value, exact division) is the target. A
step whose written result is wrong ("14 - 4 = 31") makes the true value differ, so the
derivation fails; the "left" lists are scratch work and not graded. Why the steps and not the
answer line: the SPRM reads step positions inside the think span only (the reference's rule), so
correctness must be decided by what it sees; the tiny policy also writes the answer line badly
(with expression grading, half the correct answers came from invalid traces and half the valid
traces had a wrong answer line). The answer line is kept as the human-readable summary.
`extract_answer` returns the derived expression in canonical form (operands of + and * ordered,
redundant parentheses normalised), so correctness is a function of the extracted answer alone,
as the metrics (`experiments/metrics.py`) assume, and majority voting groups the same computation
done in another order; distinct correct answers still exist, which is why majority is weak here.
`true_step_labels` grades each step (`countdown_steps.py` for the rules of one step). Nothing here
raises on malformed text.

`CountdownConfig` is the difficulty knob. Splits are assigned by a stable hash of the sorted
numbers and the target, so train and test never share a problem, not even with the numbers in
another order. Run `python -m experiments.tasks.countdown` for a few problems with solutions and
statistics (`--game24` for Game of 24, `--problems N`).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import random
import re
import statistics
from dataclasses import dataclass
from numbers import Real
from typing import Literal, Sequence, Union

from experiments.cli_args import positive_int
from experiments.tasks.benchmark_split import check_generated_count
from experiments.tasks.countdown_steps import (
    MAX_DIGITS,
    OPERATIONS,
    SEPARATOR,
    THINK_OPEN,
    Move,
    Rules,
    all_solutions,
    apply_op,
    dead_end_share,
    format_step,
    left_after,
    legal_moves,
    next_state,
    parse_step,
    random_solution,
    reachable,
    solution_count,
    step_labels,
    think_body,
)
from treesearch.config_checks import check_int
from treesearch.records import Problem

THINK_CLOSE = "</think>"
ANSWER_PREFIX = "Answer: "
# Sampling temperature at which the policy is evaluated (as arith; not yet tuned for this task).
DEFAULT_TEMPERATURE = 0.6
# One problem in TEST_MODULUS (by stable hash) belongs to the test split.
TEST_MODULUS = 5
# Longest number list a config may ask for: the solver's work grows factorially with it.
MAX_NUMBERS_LIMIT = 6
# An answer line longer than this is not parsed (garbage, and it bounds the parser's recursion).
MAX_ANSWER_CHARS = 200
MAX_STEPS = 16  # a derivation of more steps than this is not read (the default uses 3)
MAX_COMPLETION_CHARS = 8000

Split = Literal["train", "test"]
__all__ = [
    "ANSWER_PREFIX", "DEFAULT_TEMPERATURE", "GAME_OF_24", "OPERATIONS", "SEPARATOR", "TEST_MODULUS",
    "THINK_CLOSE", "THINK_OPEN", "CountdownConfig", "canonical_key", "extract_answer", "generate_problems",
    "grade", "make_problem", "prompt_text", "solution_steps", "solution_text", "split_of", "stable_hash", "training_pairs",
    "true_step_labels",
]


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty of generated problems.

    min_numbers, max_numbers: how many numbers a problem gives, drawn uniformly in the range.
    max_number: the numbers are drawn uniformly in [1, max_number] (repeats allowed).
    min_target, max_target: the target is drawn uniformly in [min_target, max_target]; draws the
        solver cannot solve are rejected, so every problem has at least one solution.
    max_value: every intermediate value stays in [0, max_value] (see Rules).
    operations: the allowed operators, a subset of "+", "-", "*", "/".
    """

    min_numbers: int = 4
    max_numbers: int = 4
    max_number: int = 9
    min_target: int = 10
    max_target: int = 50
    max_value: int = 99
    operations: tuple[str, ...] = OPERATIONS

    def __post_init__(self) -> None:
        for name in ("min_numbers", "max_numbers", "max_number", "min_target", "max_target", "max_value"):
            check_int("CountdownConfig", name, getattr(self, name))  # 9.5 failed in randrange, naming nothing
        if self.min_numbers < 2:
            raise ValueError(f"CountdownConfig.min_numbers={self.min_numbers}; must be >= 2")
        if not self.min_numbers <= self.max_numbers <= MAX_NUMBERS_LIMIT:
            raise ValueError(
                f"CountdownConfig.max_numbers={self.max_numbers}; must be in "
                f"[min_numbers={self.min_numbers}, {MAX_NUMBERS_LIMIT}]"
            )
        if self.max_number < 1:
            raise ValueError(f"CountdownConfig.max_number={self.max_number}; must be >= 1")
        if self.min_target < 0:
            raise ValueError(f"CountdownConfig.min_target={self.min_target}; must be >= 0")
        if self.max_target < self.min_target:
            raise ValueError(
                f"CountdownConfig.max_target={self.max_target}; must be >= min_target={self.min_target}"
            )
        if self.max_value < max(self.max_number, self.max_target):
            raise ValueError(
                f"CountdownConfig.max_value={self.max_value}; must be >= max_number={self.max_number} "
                f"and >= max_target={self.max_target}"
            )
        if self.max_value >= 10**MAX_DIGITS:  # a 7-digit step result is no number the grader reads
            raise ValueError(f"CountdownConfig.max_value={self.max_value}; must be below {10**MAX_DIGITS} (the grader "
                             f"reads numbers of at most {MAX_DIGITS} digits)")
        object.__setattr__(self, "operations", tuple(self.operations))  # a list failed later, unhashable in a cache
        Rules(self.max_value, self.operations)  # validates operations, naming the bad value

    @property
    def rules(self) -> Rules:
        return Rules(self.max_value, self.operations)


# Game of 24 (four numbers 1-13, target 24), with this task's integer-only rules and values at
# most 99 (the module docstring says which classic puzzles that leaves out).
GAME_OF_24 = CountdownConfig(min_numbers=4, max_numbers=4, max_number=13, min_target=24, max_target=24, max_value=99)


# ---------------------------------------------------------------------------------------------
# Generation


def canonical_key(numbers: Sequence[int], target: int) -> str:
    """The problem up to the order of its numbers, e.g. "5 6 6 8 -> 24"."""
    return f"{' '.join(str(n) for n in sorted(numbers))} -> {target}"


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> Split:
    """The split a problem belongs to, fixed by its canonical key."""
    return "test" if stable_hash(key) % TEST_MODULUS == 0 else "train"


def _draw(rng: random.Random, cfg: CountdownConfig) -> tuple[tuple[int, ...], int]:
    """(numbers in question order, target), solvable or not."""
    numbers = tuple(rng.randint(1, cfg.max_number) for _ in range(rng.randint(cfg.min_numbers, cfg.max_numbers)))
    return numbers, rng.randint(cfg.min_target, cfg.max_target)


def generate_problems(
    split: Split, count: int, seed: int, cfg: CountdownConfig = CountdownConfig()
) -> list[Problem]:
    """`count` distinct solvable problems of one split, the same for the same (split, count, seed,
    cfg). A problem belongs to the test split iff stable_hash(canonical_key) % 5 == 0, so the
    splits are disjoint whatever the seeds. Problems are drawn (numbers and target uniformly, so a
    puzzle with repeated numbers such as 6 6 6 6 -> 24 is drawn 24 times less often than one with
    four distinct numbers); when the draws run out before `count` (a request for nearly a whole
    split), the rest of the split is enumerated in a seeded order and appended
    (`_enumerated_problems`). A prefix of a longer list with the same seed equals the shorter list
    (unless the shorter one needed that enumeration). The problem space is finite (the default
    has about 12k solvable problems, a fifth of them in test; Game of 24's test split holds
    258): asking for more than a split holds is an error."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; valid: 'train', 'test'")
    check_generated_count("countdown", count)
    pairs = _pair_count(cfg)
    if count > pairs:  # more than every (numbers, target) of the ranges: no draw can help
        _raise_too_few(split, count, cfg, _split_size(split, cfg) if pairs <= MAX_ENUMERATED else None, pairs)
    rng, rules = random.Random(seed), cfg.rules
    problems: list[Problem] = []
    seen: set[str] = set()
    max_draws = 100 * count + 1000
    draws = stall = 0
    counted = False  # whether the split was counted (`_split_size`) after a stall
    while draws < max_draws and len(problems) < count:
        if stall >= STALL_DRAWS and not counted:  # the draws stopped finding new problems: is the split that small?
            if pairs > MAX_ENUMERATED:
                raise ValueError(
                    f"count={count}: the {split} split of {cfg} seems to hold only about {len(problems)} distinct "
                    f"solvable problems ({len(problems)} found in {draws} draws, the last {stall} finding no new "
                    f"one); ask for about {len(problems)} or fewer, or {_ENLARGE}"
                )
            held, counted = _split_size(split, cfg), True
            if held < count:
                _raise_too_few(split, count, cfg, held, pairs)
            # else the draws go on as before, and the enumeration below completes them
        draws += 1
        stall += 1
        numbers, target = _draw(rng, cfg)
        key = canonical_key(numbers, target)
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        if reachable(tuple(sorted(numbers)), target, rules):
            problems.append(make_problem(numbers, target, cfg))
            stall = 0
    rest = _enumerated_problems(split, count - len(problems), seen, rng, cfg) if len(problems) < count else []
    if rest is None:
        raise ValueError(
            f"count={count}: only {len(problems)} distinct solvable {split} problems found in {max_draws} "
            f"draws with {cfg}; widen the number or target range or ask for fewer"
        )
    if len(problems) + len(rest) < count:
        _raise_too_few(split, count, cfg, len(problems) + len(rest), pairs)
    return problems + rest


# A run of this many draws in a row that finds no new solvable problem of the split means the
# split is (nearly) exhausted: when it can be enumerated, it is counted then (an error at once if
# it holds fewer than asked, else the draws go on as before); when it cannot, the drawing ends
# with an error. Drawing the default's 9,000 train problems (seed 0) saw runs of at most 217.
STALL_DRAWS = 2000
_ENLARGE = "widen the number or target range (max_number, min_target / max_target, max_numbers)"


def _pair_count(cfg: CountdownConfig) -> int:
    """How many (multiset of numbers, target) pairs cfg's ranges hold: a bound on either split."""
    multisets = sum(math.comb(cfg.max_number + k - 1, k) for k in range(cfg.min_numbers, cfg.max_numbers + 1))
    return multisets * (cfg.max_target - cfg.min_target + 1)


def _split_size(split: Split, cfg: CountdownConfig) -> int:
    """How many distinct solvable problems the split holds (every pair enumerated and solved)."""
    return sum(
        1 for k in range(cfg.min_numbers, cfg.max_numbers + 1)
        for numbers in itertools.combinations_with_replacement(range(1, cfg.max_number + 1), k)
        for target in range(cfg.min_target, cfg.max_target + 1)
        if split_of(canonical_key(numbers, target)) == split and reachable(numbers, target, cfg.rules)
    )


def _raise_too_few(split: Split, count: int, cfg: CountdownConfig, held: int | None, pairs: int) -> None:
    """The ValueError of a count the split cannot give: its size when known, else the pairs bound."""
    size = f"only {held} distinct solvable problems" if held is not None else \
        f"at most {pairs} problems (the (numbers, target) pairs of both splits)"
    raise ValueError(
        f"count={count}: the {split} split of {cfg} holds {size}; ask for at most {held if held is not None else pairs}, "
        f"or {_ENLARGE}"
    )


MAX_ENUMERATED = 2_000_000  # (numbers, target) pairs: a larger space is not enumerated, its draws decide


def _enumerated_problems(split: Split, count: int, seen: set[str], rng: random.Random,
                         cfg: CountdownConfig) -> list[Problem] | None:
    """Up to `count` solvable problems of the split not in `seen`, from every (multiset of
    numbers, target) of cfg's ranges in an order shuffled by rng (the numbers of each in a
    shuffled order too); None when the space exceeds MAX_ENUMERATED (not enumerated)."""
    sizes = range(cfg.min_numbers, cfg.max_numbers + 1)
    targets = range(cfg.min_target, cfg.max_target + 1)
    if sum(math.comb(cfg.max_number + k - 1, k) for k in sizes) * len(targets) > MAX_ENUMERATED:
        return None
    pairs = [(numbers, target) for k in sizes
             for numbers in itertools.combinations_with_replacement(range(1, cfg.max_number + 1), k) for target in targets]
    rng.shuffle(pairs)
    found: list[Problem] = []
    for numbers, target in pairs:
        if len(found) == count:
            break
        key = canonical_key(numbers, target)
        if key in seen or split_of(key) != split or not reachable(numbers, target, cfg.rules):
            continue
        seen.add(key)
        found.append(make_problem(rng.sample(numbers, len(numbers)), target, cfg))
    return found


def make_problem(numbers: Sequence[int], target: int, cfg: CountdownConfig = CountdownConfig()) -> Problem:
    """The problem "use `numbers` to make `target`" under cfg's rules (its ranges are not enforced,
    so any puzzle can be posed); a ValueError naming the numbers when it has no solution."""
    if not all(_is_whole(n) for n in (*numbers, target)):
        raise ValueError(f"numbers={tuple(numbers)}, target={target!r}: need whole numbers (8.9 became 8 before)")
    numbers, target = tuple(int(n) for n in numbers), int(target)
    if not 2 <= len(numbers) <= MAX_NUMBERS_LIMIT or min(numbers) < 0 or target < 0:
        raise ValueError(
            f"numbers={numbers}, target={target}: need 2 to {MAX_NUMBERS_LIMIT} non-negative numbers and a non-negative target"
        )
    if not reachable(tuple(sorted(numbers)), target, cfg.rules):
        raise ValueError(f"numbers={numbers}: {target} cannot be made from them under {cfg.rules}")
    key = canonical_key(numbers, target)
    reference = _expression_of(numbers, _moves_of_seed(key, numbers, target, cfg.rules, 0))
    return Problem(
        id=f"countdown-{stable_hash(key):016x}",
        question=f"Use {' '.join(map(str, numbers))} to make {target}.",
        answer=_canonical(_parse_expression(reference)),  # type: ignore[arg-type]  # solution 0 of possibly many
        meta=_meta(key, numbers, target, cfg),
    )


def _is_whole(value: object) -> bool:
    """An int, or a float / numpy number with no fractional part (not a bool, not a string)."""
    return isinstance(value, Real) and not isinstance(value, bool) and float(value).is_integer()


def _meta(key: str, numbers: tuple[int, ...], target: int, cfg: CountdownConfig) -> dict:
    state, rules = tuple(sorted(numbers)), cfg.rules
    return {
        "task": "countdown",
        "split": split_of(key),
        "numbers": numbers,  # in question order
        "target": target,
        "num_numbers": len(numbers),
        "max_value": cfg.max_value,
        "operations": cfg.operations,
        "num_solutions": solution_count(state, target, rules),  # distinct solution traces
        "dead_end_share": round(dead_end_share(state, target, rules), 4),  # of the legal first moves
        "key": key,
    }


def rules_of(problem: Problem) -> Rules:
    """The rules a countdown problem was generated under (its max_value and operations)."""
    return Rules(int(problem.meta["max_value"]), tuple(problem.meta["operations"]))


# ---------------------------------------------------------------------------------------------
# Text formats


def prompt_text(problem: Problem) -> str:
    """What the policy sees: the question, then the opening of the think span."""
    return f"{problem.question}\n{THINK_OPEN}"


def _moves_of_seed(key: str, numbers: Sequence[int], target: int, rules: Rules, seed: int) -> list[Move]:
    """The moves of reference solution `seed`, drawn by an RNG seeded from the problem key and seed,
    so each (problem, seed) always gives the same solution and different seeds give varied ones."""
    rng = random.Random(stable_hash(f"{key}|{seed}"))
    return random_solution(tuple(sorted(numbers)), target, rules, rng)


def _solution_moves(problem: Problem, seed: int) -> list[Move]:
    meta = problem.meta
    return _moves_of_seed(meta["key"], meta["numbers"], int(meta["target"]), rules_of(problem), seed)


def _expression_of(numbers: Sequence[int], moves: Sequence[Move]) -> str:
    """The solution's expression, each intermediate result in parentheses, the outermost bare.
    Operands are taken like the "left" list: first occurrence of the value."""
    items: list[tuple[int, str]] = [(n, str(n)) for n in numbers]
    for move in moves:
        x = items.pop(next(i for i, (v, _) in enumerate(items) if v == move.x))
        y = items.pop(next(i for i, (v, _) in enumerate(items) if v == move.y))
        items.append((move.result, f"({x[1]} {move.op} {y[1]})"))
    text = items[0][1]
    return text[1:-1] if text.startswith("(") else text


def _steps_of(numbers: Sequence[int], moves: Sequence[Move]) -> list[str]:
    steps, left = [], list(numbers)
    for move in moves:
        left = left_after(left, move)
        steps.append(format_step(move, left))
    return steps


def solution_steps(problem: Problem, seed: int = 0) -> list[str]:
    """The reference steps of solution `seed`, one per operation, each ending on SEPARATOR."""
    return _steps_of(problem.meta["numbers"], _solution_moves(problem, seed))


def solution_text(problem: Problem, seed: int = 0) -> str:
    """A reference completion of prompt_text(problem): steps, then "</think>Answer: <expression>".
    Different seeds give different valid solutions where the problem has several."""
    numbers, moves = problem.meta["numbers"], _solution_moves(problem, seed)
    return "".join(_steps_of(numbers, moves)) + f"{THINK_CLOSE}{ANSWER_PREFIX}{_expression_of(numbers, moves)}"


def attempt_moves(problem: Problem, seed: int) -> list[Move] | None:
    """An honest attempt: legal moves drawn uniformly until one number is left, whether or not it
    is the target (None when a state has no legal move under the rules)."""
    meta, rules = problem.meta, rules_of(problem)
    rng = random.Random(stable_hash(f"{meta['key']}|attempt|{seed}"))
    state, moves = tuple(sorted(meta["numbers"])), []
    while len(state) > 1:
        options = legal_moves(state, rules)
        if not options:
            return None
        move = rng.choice(options)
        moves.append(move)
        state = next_state(state, move)
    return moves


def attempt_text(problem: Problem, seed: int) -> str | None:
    """The completion of an honest attempt (see `attempt_moves`): correct arithmetic throughout,
    the last step's result whatever the moves give; None when the attempt got stuck."""
    numbers, moves = problem.meta["numbers"], attempt_moves(problem, seed)
    if moves is None:
        return None
    return "".join(_steps_of(numbers, moves)) + f"{THINK_CLOSE}{ANSWER_PREFIX}{_expression_of(numbers, moves)}"


def training_pairs(
    problems: Sequence[Problem], count: int, seed: int = 0, solved_share: float = 1.0
) -> list[tuple[str, str]]:
    """`count` (prompt, completion) SFT pairs cycling over `problems`; pass k over the list uses
    solution seed `seed + k`, so a problem seen again comes with another random valid solution
    (the problem space is finite, so a long run sees each problem several times).

    solved_share: the share of pairs whose completion is a valid solution; the others are honest
    attempts (`attempt_text`: uniformly drawn legal moves, arithmetic right, ending wherever they
    end). With only solutions (1.0) a small policy that cannot plan learns that the last result
    IS the target and writes it whatever the arithmetic gives ("14 - 4 = 31"): its failures are
    then lies no cheap check sees. Mixing in honest attempts keeps its arithmetic honest, so a
    failed attempt shows on its last step (the result is not the target): choosing a path is
    still a search, checking one becomes a comparison, the generator-verifier gap a verifier
    can use."""
    if count < 0:
        raise ValueError(f"count={count}; must be >= 0")
    if count and not problems:
        raise ValueError(f"count={count} pairs asked from an empty problem list")
    if not 0.0 <= solved_share <= 1.0:
        raise ValueError(f"solved_share={solved_share!r} must be in [0, 1]")
    rng = random.Random(stable_hash(f"pairs|{seed}"))
    pairs = []
    for i in range(count):
        problem, pass_seed = problems[i % len(problems)], seed + i // len(problems)
        attempt = attempt_text(problem, pass_seed) if rng.random() >= solved_share else None
        pairs.append((prompt_text(problem), attempt if attempt is not None else solution_text(problem, pass_seed)))
    return pairs


# ---------------------------------------------------------------------------------------------
# The answer expression: parse, evaluate, canonical form

Expr = Union[int, tuple[str, "Expr", "Expr"]]  # a number, or (op, left, right)
_TOKEN_RE = re.compile(r"\s*(?:(\d{1,6})|([-+*/()]))")


def _tokens(text: str) -> list[str] | None:
    out, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            return None
        out.append(match.group(1) or match.group(2))
        pos = match.end()
    return out


def _parse_expression(text: str) -> Expr | None:
    """An expression of non-negative integers, + - * / and parentheses with the usual precedence
    (left-associative); None when malformed (no unary minus, no decimals)."""
    tokens = _tokens(text) if len(text) <= MAX_ANSWER_CHARS else None
    if not tokens:
        return None
    expr, pos = _sum(tokens, 0)
    return expr if expr is not None and pos == len(tokens) else None


def _sum(tokens: list[str], pos: int) -> tuple[Expr | None, int]:
    left, pos = _product(tokens, pos)
    while left is not None and pos < len(tokens) and tokens[pos] in "+-":
        op = tokens[pos]
        right, pos = _product(tokens, pos + 1)
        left = None if right is None else (op, left, right)
    return left, pos


def _product(tokens: list[str], pos: int) -> tuple[Expr | None, int]:
    left, pos = _atom(tokens, pos)
    while left is not None and pos < len(tokens) and tokens[pos] in "*/":
        op = tokens[pos]
        right, pos = _atom(tokens, pos + 1)
        left = None if right is None else (op, left, right)
    return left, pos


def _atom(tokens: list[str], pos: int) -> tuple[Expr | None, int]:
    if pos >= len(tokens):
        return None, pos
    if tokens[pos].isdigit():
        return int(tokens[pos]), pos + 1
    if tokens[pos] == "(":
        inner, pos = _sum(tokens, pos + 1)
        if inner is None or pos >= len(tokens) or tokens[pos] != ")":
            return None, pos
        return inner, pos + 1
    return None, pos


def _evaluate(expr: Expr, rules: Rules) -> int | None:
    """The value under the task's rules (None when any intermediate value breaks them)."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = _evaluate(left, rules), _evaluate(right, rules)
    return None if a is None or b is None else apply_op(a, op, b, rules)


def _leaves(expr: Expr) -> list[int]:
    return [expr] if isinstance(expr, int) else _leaves(expr[1]) + _leaves(expr[2])


def _canonical(expr: Expr, top: bool = True) -> str:
    """Every binary operation in parentheses except the outermost; operands of + and * in sorted
    order, so commuted forms of one computation print alike."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    a, b = _canonical(left, False), _canonical(right, False)
    if op in "+*":
        a, b = sorted((a, b))
    text = f"{a} {op} {b}"
    return text if top else f"({text})"


# ---------------------------------------------------------------------------------------------
# Grading

def think_steps(text: str) -> list[str] | None:
    """The step texts of the think span (before the last </think>, after the opener `think_body`
    finds: a completion's own start, or a prompt's <think>), or None when the think span never
    closes (an unfinished or cut completion). A part with nothing but dots and blanks ("..", a
    lone separator's leftover) is no step, as `step_labels` reads it (it was a malformed step
    here, and the grader rejected a path the labeler called right); any other text is one, a
    <think> elsewhere with whatever precedes it included (malformed)."""
    if THINK_CLOSE not in text:
        return None
    span = think_body(text.rsplit(THINK_CLOSE, 1)[0])
    return [part for part in span.split(SEPARATOR) if part.strip(". \t\n\r")]


# extract_answer does not know the problem's rules: it checks the written arithmetic only (exact,
# non-negative); grade() then applies the problem's own max_value and operations
ARITHMETIC_ONLY = Rules(max_value=10**9)


def derived_expression(text: str) -> Expr | None:
    """The expression the think-span steps compose (see the module docstring), or None when a
    step is malformed, a written result is not the true result of its operation, a step's result
    is never used by a later one (a side step, which could use numbers the problem never gave),
    or there is no step."""
    steps = think_steps(text)
    if not steps or len(steps) > MAX_STEPS:
        return None
    results: list[tuple[int, Expr]] = []  # (written value, expression) of earlier steps
    last: Expr | None = None
    for step_text in steps:
        step = parse_step(step_text)
        if step is None or apply_op(step.x, step.op, step.y, ARITHMETIC_ONLY) != step.result:
            return None  # malformed, or the written result is not x op y
        left, right = _operand(step.x, results), _operand(step.y, results)
        last = (step.op, left, right)
        results.append((step.result, last))
    return last if len(results) == 1 else None  # every earlier result went into a later step


def _operand(value: int, results: list[tuple[int, Expr]]) -> Expr:
    """The most recent unused earlier result written as `value` (taken out), else the number."""
    for i in range(len(results) - 1, -1, -1):
        if results[i][0] == value:
            return results.pop(i)[1]
    return value


def extract_answer(text: str) -> str | None:
    """The canonical form of the expression the think-span steps derive ("8 - 5 = 3, ..." /
    "6 * 3 = 18, ..." / "18 + 6 = 24, ..." -> "(6 * (8 - 5)) + 6" up to operand order); None
    when the think span is unfinished or a step is malformed. Never raises."""
    try:
        if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
            return None
        expr = derived_expression(text)
        return None if expr is None else _canonical(expr)
    except Exception:  # a grader must never crash a search run
        return None


def grade(problem: Problem, completion_text: str) -> bool:
    """True iff the derivation in the think span uses each of the problem's numbers exactly once
    and truly evaluates to the target under the task's rules. Never raises."""
    try:
        answer = extract_answer(completion_text)
        expr = None if answer is None else _parse_expression(answer)
        if expr is None:
            return False
        if sorted(_leaves(expr)) != sorted(int(n) for n in problem.meta["numbers"]):
            return False
        return _evaluate(expr, rules_of(problem)) == int(problem.meta["target"])
    except Exception:  # a grader must never crash a search run
        return False


def true_step_labels(problem: Problem, step_texts: Sequence[str]) -> list[bool]:
    """One label per step text (as `treesearch.steps.split_steps` cuts a completion). A think-span
    step is correct iff it is well formed ("x op y = r, left ..."), uses numbers still available,
    its arithmetic is right under the rules, its "left" list is right, the target is still
    reachable from what is left, and every earlier step is correct (countdown_steps.step_labels).
    The answer step ("</think>Answer: ...") is correct iff what precedes </think> in it is blank
    or a correct think step (written with no separator before </think>), every earlier step is
    correct and grade() accepts the derivation; anything after it is wrong.
    Never raises."""
    texts = [t if isinstance(t, str) else "" for t in step_texts]
    end = next((i for i, t in enumerate(texts) if THINK_CLOSE in t), len(texts))
    # what precedes </think> in the answer step: one more think step (a blank one is right)
    tail = [texts[end].split(THINK_CLOSE, 1)[0]] if end < len(texts) else []
    try:
        labels = step_labels(problem.meta["numbers"], int(problem.meta["target"]), rules_of(problem), texts[:end] + tail)
    except Exception:
        labels = [False] * (end + len(tail))
    if tail:
        before_ok = labels.pop()
        labels.append(before_ok and all(labels) and grade(problem, "".join(texts[: end + 1])))
        labels += [False] * (len(texts) - end - 1)
    return labels


# ---------------------------------------------------------------------------------------------
# `python -m experiments.tasks.countdown`: examples and statistics


def _problem_stats(problem: Problem) -> dict[str, float]:
    numbers, target, rules = problem.meta["numbers"], int(problem.meta["target"]), rules_of(problem)
    traces = list(all_solutions(tuple(sorted(numbers)), target, rules))
    answers = {_canonical(_parse_expression(_expression_of(numbers, t))) for t in traces}  # type: ignore[arg-type]
    return {
        "traces": len(traces),
        "answers": len(answers),
        "steps": len(numbers) - 1,
        "first_dead": dead_end_share(tuple(sorted(numbers)), target, rules),
        "path_dead": _path_dead_share(problem),
    }


def _path_dead_share(problem: Problem) -> float:
    """Mean dead-end share of the legal moves at each state along reference solution 0."""
    state, target, rules = tuple(sorted(problem.meta["numbers"])), int(problem.meta["target"]), rules_of(problem)
    shares = []
    for move in _solution_moves(problem, 0):
        shares.append(dead_end_share(state, target, rules))
        state = next_state(state, move)
    return statistics.mean(shares)


def _token_lengths(problems: Sequence[Problem]) -> tuple[float, float, int]:
    """(mean prompt tokens, mean completion tokens, max total) with a tiny tokenizer learned from
    countdown text (imported lazily: it needs transformers)."""
    from policies.tiny_tokenizer import build_tokenizer

    corpus = [prompt_text(p) + solution_text(p, s) for p in problems for s in range(2)]
    tok = build_tokenizer(corpus=corpus)
    prompts = [len(tok(prompt_text(p))["input_ids"]) for p in problems]
    completions = [len(tok(solution_text(p), add_special_tokens=False)["input_ids"]) + 1 for p in problems]  # + <eos>
    return statistics.mean(prompts), statistics.mean(completions), max(a + b for a, b in zip(prompts, completions))


def _main() -> None:
    parser = argparse.ArgumentParser(description="Countdown problems, solutions and statistics.")
    parser.add_argument("--problems", type=positive_int, default=None,
                        help="test problems for the statistics (default 500; 200 with --game24, whose test split "
                             "holds only 258 solvable problems)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--game24", action="store_true", help="Game of 24 instead of the default config")
    args = parser.parse_args()
    cfg = GAME_OF_24 if args.game24 else CountdownConfig()
    count = args.problems if args.problems is not None else (200 if args.game24 else 500)
    try:
        problems = generate_problems("test", count, seed=args.seed, cfg=cfg)
    except ValueError as err:  # more problems than the split holds: a traceback before
        parser.exit(2, f"error: {err}\n")
    for problem in problems[:3]:
        print(prompt_text(problem) + solution_text(problem, 0), end="\n\n")
        print(f"another solution: {solution_text(problem, 1)!r}", end="\n---\n")
    stats = [_problem_stats(p) for p in problems]
    col = {k: [s[k] for s in stats] for k in stats[0]}
    print(f"{cfg}\n{len(problems)} test problems")
    print(f"solution traces per problem: mean {statistics.mean(col['traces']):.2f}, median "
          f"{statistics.median(col['traces']):.0f}, share with one {sum(t == 1 for t in col['traces']) / len(stats):.2f}")
    print(f"distinct answer expressions per problem: mean {statistics.mean(col['answers']):.2f}, median "
          f"{statistics.median(col['answers']):.0f}, share with one {sum(a == 1 for a in col['answers']) / len(stats):.2f}")
    print(f"steps per solution: mean {statistics.mean(col['steps']):.2f}")
    print(f"dead-end share of legal first moves: mean {statistics.mean(col['first_dead']):.3f}; "
          f"of legal moves along a solution path: mean {statistics.mean(col['path_dead']):.3f}")
    prompt_len, completion_len, longest = _token_lengths(problems)
    print(f"tiny tokenizer (learned on countdown text): prompt {prompt_len:.1f} tokens, completion "
          f"{completion_len:.1f} tokens (with <eos>), longest example {longest}")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
