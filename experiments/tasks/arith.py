"""The `arith` task: generated multi-step arithmetic word problems with exact integer answers.

A problem starts from a quantity ("Ann has 7 coins.") and applies operations in words ("She gets
5 more coins. She gives away 9 coins. Then her coins are tripled."); the default is 2-4
operations on distinct numbers up to 10 with values in [0, 99], which the tiny policy learns in
1400 steps of SFT (~18 minutes on 2 CPU cores) to about the level the foundation issue asks for. The reference
solution writes one step per operation inside the think span, each step ending on the step
separator, then the answer:

    prompt:    "<question>\\n<think>"
    solution:  "7 + 5 = 12.\\n\\n12 - 9 = 3.\\n\\n3 * 3 = 9.\\n\\n</think>Answer: 9"

`ArithConfig` is the difficulty knob. Splits are assigned by a stable hash of the problem's
arithmetic skeleton with its operations as a multiset (start value and sorted operations, names,
objects and order left out: `split_key`), so train and test never share a problem, not even one
reworded or with its operations in another order ("7 -6 +5" and "7 +5 -6" have one answer, and
each one's solution is a right solution of the other: they were split apart before). Run
`python -m experiments.tasks.arith` to print a few problems with their solutions.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal, Sequence

from experiments.tasks.benchmark_split import check_flag, check_generated_count
from treesearch.config_checks import check_int
from treesearch.records import Problem

SEPARATOR = ".\n\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_PREFIX = "Answer: "
# Sampling temperature at which the default policy is evaluated (sampled pass@1, pass@k).
DEFAULT_TEMPERATURE = 0.6
# One problem in TEST_MODULUS (by stable hash) belongs to the test split.
TEST_MODULUS = 5
# Which problems the splits hold: 1 hashed the operations in story order (until 2026-12-06, when a
# problem's reordered twin could sit in the other split), 2 as a multiset (`split_key`). An SFT
# run records it (sft_summary.json); a policy of another version trained on today's test problems
# (`experiments.checkpoint_hints.trained_task_note` says so).
SPLIT_VERSION = 2
OPERATIONS: tuple[str, ...] = ("+", "-", "*", "/")

Split = Literal["train", "test"]

_NAMES: tuple[tuple[str, str], ...] = (  # (name, "f" | "m")
    ("Ann", "f"), ("Ben", "m"), ("Cara", "f"), ("Dan", "m"), ("Eva", "f"), ("Finn", "m"),
    ("Gina", "f"), ("Hugo", "m"), ("Ivy", "f"), ("Jack", "m"), ("Kim", "f"), ("Leo", "m"),
    ("Mia", "f"), ("Noah", "m"), ("Rosa", "f"), ("Sam", "m"),
)
_OBJECTS: tuple[str, ...] = (
    "coins", "apples", "marbles", "stickers", "books", "cards", "shells", "stamps", "pencils",
    "beads", "cookies", "pebbles",
)
_PRONOUNS = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}  # subject, object, possessive
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{Sub} gets {n} more {obj}.",
        "{Sub} finds {n} more {obj}.",
        "{Sub} buys {n} more {obj}.",
        "A friend gives {objp} {n} more {obj}.",
    ),
    "-": (
        "{Sub} gives away {n} {obj}.",
        "{Sub} loses {n} {obj}.",
        "{Sub} sells {n} {obj}.",
        "{Sub} uses {n} of {poss} {obj}.",
    ),
    "*": (
        "Then {poss} {obj} are multiplied by {n}.",
        "Then {sub} has {n} times as many {obj} as before.",
    ),
    "/": (
        "Then {sub} splits {poss} {obj} into {n} equal piles and keeps one pile.",
        # not "shares them among {n} friends and keeps one share": {n} shares, or {n} + 1?
        "Then {sub} divides {poss} {obj} into {n} equal shares and keeps one share.",
    ),
}
_MUL_WORDS = {2: "Then {poss} {obj} are doubled.", 3: "Then {poss} {obj} are tripled."}


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty of generated problems.

    min_ops, max_ops: number of operations per problem, drawn uniformly in [min_ops, max_ops].
    max_number: largest start value and largest operand of + and - (operands start at 1).
    max_value: every intermediate value stays in [0, max_value].
    max_factor: largest multiplier / divisor of * and / (they start at 2).
    operations: which of "+", "-", "*", "/" may appear; must include "+" or "-" so that a
        feasible next operation always exists.
    distinct_numbers: every number in a question (start and operands) is different, so each
        step's operand can be found in the question by its value alone.
    """

    min_ops: int = 2
    max_ops: int = 4
    max_number: int = 10
    max_value: int = 99
    max_factor: int = 5
    operations: tuple[str, ...] = ("+", "-", "*")
    distinct_numbers: bool = True

    def __post_init__(self) -> None:
        for name in ("min_ops", "max_ops", "max_number", "max_value", "max_factor"):  # 10.5 failed in randrange
            check_int("ArithConfig", name, getattr(self, name))
        check_flag("ArithConfig", "distinct_numbers", self.distinct_numbers)  # "no" generated as true
        if self.min_ops < 1:
            raise ValueError(f"ArithConfig.min_ops={self.min_ops}; must be >= 1")
        if self.max_ops < self.min_ops:
            raise ValueError(f"ArithConfig.max_ops={self.max_ops}; must be >= min_ops={self.min_ops}")
        if self.max_number < 2:
            raise ValueError(f"ArithConfig.max_number={self.max_number}; must be >= 2")
        if self.max_value < self.max_number:
            raise ValueError(
                f"ArithConfig.max_value={self.max_value}; must be >= max_number={self.max_number}"
            )
        if self.max_factor < 2:
            raise ValueError(f"ArithConfig.max_factor={self.max_factor}; must be >= 2")
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(
                f"ArithConfig.operations={self.operations!r}; each must be one of {OPERATIONS}"
            )
        if "+" not in self.operations and "-" not in self.operations:
            raise ValueError(f"ArithConfig.operations={self.operations!r}; must include '+' or '-'")


# ---------------------------------------------------------------------------------------------
# Generation


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    return value // operand  # "/": operands are always exact divisors


def _candidate_operands(value: int, op: str, cfg: ArithConfig) -> range | list[int]:
    """Operands that keep the result in [0, max_value] (an empty range if the op is infeasible)."""
    if op == "+":
        return range(1, min(cfg.max_number, cfg.max_value - value) + 1)
    if op == "-":
        return range(1, min(cfg.max_number, value) + 1)
    if op == "*":
        return range(2, min(cfg.max_factor, cfg.max_value // value if value else 0) + 1)
    # "/": exact divisors whose quotient is at least 2 (dividing down to 1 or 0 is degenerate)
    return [d for d in range(2, cfg.max_factor + 1) if value % d == 0 and value // d >= 2]


def _draw_operations(rng: random.Random, cfg: ArithConfig) -> tuple[int, tuple[tuple[str, int], ...]] | None:
    """(start, ((op, operand), ...)), or None when the walk got stuck (caller redraws)."""
    value = rng.randint(1, cfg.max_number)
    start, ops, used = value, [], {value}
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        options = {op: _fresh_operands(value, op, cfg, used) for op in cfg.operations}
        feasible = [op for op in cfg.operations if options[op]]
        if not feasible:
            return None
        op = rng.choice(feasible)
        operand = rng.choice(options[op])
        ops.append((op, operand))
        used.add(operand)
        value = _apply(value, op, operand)
    return start, tuple(ops)


def _fresh_operands(value: int, op: str, cfg: ArithConfig, used: set[int]) -> list[int]:
    """Feasible operands, without the numbers already in the question if distinct_numbers."""
    return [n for n in _candidate_operands(value, op, cfg) if not (cfg.distinct_numbers and n in used)]


def _values(start: int, ops: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
    """Values after each operation (the final answer last)."""
    out, value = [], start
    for op, operand in ops:
        value = _apply(value, op, operand)
        out.append(value)
    return tuple(out)


def canonical_key(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    """The arithmetic skeleton of a problem, e.g. "23 +14 -9 *3" (wording left out)."""
    return " ".join([str(start)] + [f"{op}{operand}" for op, operand in ops])


def split_key(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    """What the split hashes: the start and the operations sorted, e.g. "23 *3 +14 -9" (`split_of`)."""
    return canonical_key(start, tuple(sorted(ops)))


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> Split:
    """The split a problem belongs to, fixed by its `split_key`."""
    return "test" if stable_hash(key) % TEST_MODULUS == 0 else "train"


def _sentence(op: str, operand: int, names: dict[str, str], rng: random.Random) -> str:
    if op == "*" and operand in _MUL_WORDS and rng.random() < 0.5:
        template = _MUL_WORDS[operand]
    else:
        template = rng.choice(_TEMPLATES[op])
    return template.format(n=operand, **names)


def _question(start: int, ops: tuple[tuple[str, int], ...], rng: random.Random) -> str:
    name, gender = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    sub, objp, poss = _PRONOUNS[gender]
    names = {"Sub": sub.capitalize(), "sub": sub, "objp": objp, "poss": poss, "obj": obj}
    sentences = [f"{name} has {start} {obj}."]
    sentences += [_sentence(op, operand, names, rng) for op, operand in ops]
    sentences.append(f"How many {obj} does {sub} have now?")
    return " ".join(sentences)


# A run of this many draws in a row that finds no new problem of the split ends the drawing: the
# split is (nearly) exhausted. The default config's train split never went 200 draws without a new
# problem in its first 3M draws (300k problems; SFT asks for 100k), and an exhausted split stops
# here in milliseconds where the budget of 100 draws per problem ran for hours.
STALL_DRAWS = 1000
# Steps the exact count of a config's problems (`_space_size`) may take before it gives up.
SIZE_WORK_LIMIT = 2_000_000
_ENLARGE = "raise max_number, max_value, max_factor or max_ops, add operations, or set distinct_numbers=false"


def generate_problems(split: Split, count: int, seed: int, cfg: ArithConfig = ArithConfig()) -> list[Problem]:
    """`count` distinct problems of one split, the same for the same (split, count, seed, cfg).

    A problem belongs to the test split iff stable_hash(split_key) % 5 == 0, so the splits are
    disjoint by construction whatever the seeds, even up to the order of the operations. A
    prefix of a longer list with the same seed equals the shorter list. A count larger than the
    split holds is a ValueError naming the split's size, at once (`_check_split_holds`); so is a
    count whose last problems the draws stop finding (STALL_DRAWS).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; valid: 'train', 'test'")
    check_generated_count("arith", count)
    _check_split_holds(split, count, cfg)
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    max_draws = 100 * count + 1000
    draws = stall = 0
    while draws < max_draws and len(problems) < count and stall < STALL_DRAWS:
        draws += 1
        stall += 1
        drawn = _draw_operations(rng, cfg)
        if drawn is None:
            continue
        start, ops = drawn
        key = canonical_key(start, ops)
        question = _question(start, ops, rng)  # drawn for every problem: keeps the stream aligned
        if key in seen or split_of(split_key(start, ops)) != split:
            continue
        seen.add(key)
        problems.append(_make_problem(key, question, start, ops, cfg, split))
        stall = 0
    if len(problems) < count:
        held = _space_size(cfg, split)
        holds = (f"holds {held} problems, but its rarest are drawn too seldom" if held is not None
                 else f"seems to hold only about {len(problems)} problems")
        raise ValueError(
            f"count={count}: the {split} split of {cfg} {holds}: {len(problems)} found in {draws} draws, "
            f"the last {stall} finding no new one; ask for about {len(problems)} or fewer, or {_ENLARGE}"
        )
    return problems


def _check_split_holds(split: Split, count: int, cfg: ArithConfig) -> None:
    """ValueError naming the split's size when it holds fewer than `count` problems. Counting the
    whole space (no hashing) up to a size at which the split surely holds `count` is cheap (0.1 s
    for 100k train problems of the default); the split itself is counted only when the whole
    space is smaller than that. Nothing is raised when counting takes too long (the draws decide)."""
    share = 1 if split == "test" else TEST_MODULUS - 1  # of TEST_MODULUS problems
    enough = -(-3 * count * TEST_MODULUS // (2 * share)) + 100  # 1.5x what the split's share needs
    total = _space_size(cfg, None, stop=enough)
    if total is None or total >= enough:
        return
    held = _space_size(cfg, split)
    if held is not None and held < count:
        raise ValueError(
            f"count={count}: the {split} split of {cfg} holds only {held} distinct problems (of {total} "
            f"in both splits); "
            f"ask for at most {held}, or {_ENLARGE}"
        )


def _space_size(cfg: ArithConfig, split: Split | None, stop: int | None = None) -> int | None:
    """How many distinct problems cfg can generate, in `split` (None: in both), counted by walking
    every sequence of feasible operations `_draw_operations` can draw; `stop` once that many are
    found; None when the walk takes more than SIZE_WORK_LIMIT steps."""
    found = steps = 0
    stack: list[tuple[int, int, tuple[tuple[str, int], ...], frozenset[int]]] = [
        (start, start, (), frozenset((start,))) for start in range(1, cfg.max_number + 1)
    ]
    while stack:
        start, value, ops, used = stack.pop()
        steps += 1
        if steps > SIZE_WORK_LIMIT:
            return None
        if len(ops) >= cfg.min_ops and (split is None or split_of(split_key(start, ops)) == split):
            found += 1
            if stop is not None and found >= stop:
                return found
        if len(ops) < cfg.max_ops:
            for op in cfg.operations:
                for operand in _fresh_operands(value, op, cfg, used):
                    stack.append((start, _apply(value, op, operand), ops + ((op, operand),), used | {operand}))
    return found


def _make_problem(
    key: str, question: str, start: int, ops: tuple[tuple[str, int], ...], cfg: ArithConfig, split: Split
) -> Problem:
    values = _values(start, ops)
    meta = {
        "task": "arith",
        "split": split,
        "num_ops": len(ops),
        "max_number": cfg.max_number,
        "start": start,
        "operations": ops,  # ((op, operand), ...)
        "values": values,  # value after each operation
        "key": key,
    }
    return Problem(id=f"arith-{stable_hash(key):016x}", question=question, answer=str(values[-1]), meta=meta)


# ---------------------------------------------------------------------------------------------
# Text formats


def prompt_text(problem: Problem) -> str:
    """What the policy sees: the question, then the opening of the think span."""
    return f"{problem.question}\n{THINK_OPEN}"


def solution_steps(problem: Problem) -> list[str]:
    """The reference steps, one per operation, each ending on SEPARATOR."""
    steps, value = [], problem.meta["start"]
    for op, operand in problem.meta["operations"]:
        result = _apply(value, op, operand)
        steps.append(f"{value} {op} {operand} = {result}{SEPARATOR}")
        value = result
    return steps


def solution_text(problem: Problem) -> str:
    """The reference completion of prompt_text(problem): steps, then "</think>Answer: N"."""
    return "".join(solution_steps(problem)) + f"{THINK_CLOSE}{ANSWER_PREFIX}{problem.answer}"


# ---------------------------------------------------------------------------------------------
# Grading

# The whole number: "Answer: 84.5", "8/2" or "8e2" is not the answer 8 (nor "8,4" the answer 84,
# nor "84-2", "84 * 2" or "84^2" the answer 84: an operator and a digit continue the expression).
_ANSWER_RE = re.compile(
    r"Answer\s*:\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d,./]*\d|[A-Za-z]|\s*[-+*/^×÷]\s*\d)"
)


def extract_answer(text: str) -> str | None:
    """The last "Answer: <number>" after the last </think> (anywhere if there is no </think>), as a
    canonical integer string ("084" -> "84", "1,234" -> "1234", "84.0" -> "84"; a non-integer such
    as "84.5" is returned as written, and equals no reference); None when there is none.
    Never raises."""
    try:
        if not isinstance(text, str):
            return None
        tail = text.rsplit(THINK_CLOSE, 1)[-1]
        matches = _ANSWER_RE.findall(tail)
        if not matches:
            return None
        digits = matches[-1].replace(",", "")
        if len(digits.lstrip("-")) > 100:  # absurd; int() of a huge string can raise
            return None
        whole, _, fraction = digits.partition(".")
        return str(int(whole)) if fraction.strip("0") == "" else digits  # "84.0" -> "84"; "84.5" stays
    except Exception:  # a grader must never crash a search run
        return None


def grade(problem: Problem, completion_text: str) -> bool:
    """True iff the completion's extracted answer equals the reference integer exactly."""
    if problem.answer is None:
        return False
    predicted = extract_answer(completion_text)
    return predicted is not None and predicted == str(int(problem.answer))


def true_step_labels(problem: Problem, step_texts: Sequence[str]) -> list[bool]:
    """True labels of an arith rollout's steps (the step oracle's checker, `scorers.step_oracle`;
    `experiments.rollout_cache`'s too). A think step is correct iff every earlier step is, and it
    applies one of the question's operations not used yet to the current value, written as the
    reference writes a step ("15 * 2 = 30.\n\n") with the exact result, and the operations left
    can still reach the answer in some order: the story's order or another that gets there (the
    books tripled, then doubled: doubling first is right; "+ 3, then doubled" done in the other
    order is not). The answer step ("</think>Answer: N") iff nothing but blanks precedes </think>
    in it, every operation was used, every earlier step is correct and the grader accepts it.
    E.g. reference ["3 + 4 = 7.\n\n", "7 * 2 = 14.\n\n"]: ["3 + 4 = 7.\n\n", "7 * 3 = 21.\n\n",
    "</think>Answer: 21"] -> [True, False, False]."""
    # (op, operand) tuples: a problem read back from JSON holds them as lists
    operations = [(str(op), int(operand)) for op, operand in problem.meta["operations"]]
    value, unused, answer = int(problem.meta["start"]), operations, int(problem.answer)
    labels: list[bool] = []
    ok = True
    for text in step_texts:
        if THINK_CLOSE in text:
            before = text.split(THINK_CLOSE, 1)[0]
            ok = ok and before.strip() == "" and not unused and grade(problem, text)
        elif ok:
            used = _operation_of_step(text, value, unused, answer)
            ok = used is not None
            if used is not None:
                value = _exact(value, *unused.pop(used))  # type: ignore[misc]
        labels.append(ok)
    return labels


def _exact(value: int, op: str, operand: int) -> int | None:
    """value op operand, None for a division that is not exact (or by zero)."""
    if op == "/" and (operand == 0 or value % operand):
        return None
    return _apply(value, op, operand)


def _operation_of_step(text: str, value: int, unused: list[tuple[str, int]], answer: int) -> int | None:
    """The index in unused of the operation the step text applies to value correctly, from whose
    result the other unused operations still reach the answer; None if there is none."""
    for i, (op, operand) in enumerate(unused):
        result = _exact(value, op, operand)
        if result is not None and text == f"{value} {op} {operand} = {result}{SEPARATOR}":
            if _reaches(result, unused[:i] + unused[i + 1:], answer):
                return i
    return None


def _reaches(value: int, operations: list[tuple[str, int]], answer: int) -> bool:
    """Whether applying every operation once, in some order, takes value to answer exactly: a
    depth-first search over (value, operations left), each state tried once (every ordering
    listed took 7 s and 600 MiB a path at 11 operations)."""
    return _reaches_from(value, tuple(sorted(operations)), answer, set())


def _reaches_from(value: int, left: tuple[tuple[str, int], ...], answer: int, seen: set) -> bool:
    if not left:
        return value == answer
    if (value, left) in seen:
        return False
    seen.add((value, left))
    for i, (op, operand) in enumerate(left):
        if i and left[i - 1] == left[i]:
            continue  # the same operation twice: one branch
        result = _exact(value, op, operand)
        if result is not None and _reaches_from(result, left[:i] + left[i + 1:], answer, seen):
            return True
    return False


def _main() -> None:
    for problem in generate_problems("test", 3, seed=0):
        print(prompt_text(problem) + solution_text(problem), end="\n\n---\n")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
