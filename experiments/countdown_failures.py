"""Why countdown rollouts fail: the first wrong step of each rollout and what its last step wrote.

The ground truth a verifier is measured against (issue 3 item 7): a Countdown rollout fails at
its first wrong step (`countdown_steps.STEP_FAULTS`: malformed, operands not available, an
operation the rules forbid, wrong arithmetic, a wrong "left" list, or a dead end from which the
target cannot be made), and whether it then "lands" on the target shows in its last step: the
written result is the target or not, with true arithmetic or not. A failed rollout whose last
step honestly misses the target is caught by a comparison; one that writes the target with false
arithmetic ("14 + 4 = 17") needs the arithmetic checked; a dead end is as hard to see as
solving the problem.

    python -m experiments.countdown_failures outputs/demo/reflective_countdown/heldout.pt

Prints three markdown tables (first fault per outcome; last step per outcome; how often the
policy's arithmetic is right by step, operator and operand size) and what Best-of-n
would reach with the cheap checks as the verifier (`check_bon`: a candidate whose last step
writes the target, honestly or at all, ranks first; ties go to the policy's confidence). `diagnose`
is the plain function on one rollout; `diagnose_cache` runs it over a rollout cache
(`experiments.rollout_cache`) of the countdown task. A missing, damaged or non-countdown cache
prints one line `error: ...` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from experiments.cli_errors import run_command
from experiments.rollout_cache import RolloutCache, confidence_path_scores, load_cache
from experiments.rollout_cache import cache_problems as problems_of_cache
from experiments.tasks import countdown
from experiments.tasks.countdown_steps import STEP_FAULTS, Rules, apply_op, check_step, parse_step, think_body
from treesearch.records import Problem


@dataclass(frozen=True)
class RolloutDiagnosis:
    """correct: the grader's outcome; fault: the first wrong think step's kind (a STEP_FAULTS
    entry), "unfinished" when the think span never closes (and no whole step before its end is
    wrong: a last step cut mid-way by the token limit is not judged) or holds no step, None when
    every step is right; fault_step: its index; wrote_target: the last think step's written result
    is the target (of an unclosed span: its last step written so far, or the last whole one when
    the cut one does not parse); last_step_true: its arithmetic is true (`countdown.ARITHMETIC_ONLY`, as the arithmetic
    table counts it: a true result above the rules' cap is a rule fault, not false arithmetic;
    None when it does not parse)."""

    correct: bool
    fault: str | None
    fault_step: int | None
    wrote_target: bool
    last_step_true: bool | None


def diagnose(numbers: Sequence[int], target: int, rules: Rules, completion: str, correct: bool) -> RolloutDiagnosis:
    """The diagnosis of one completion of "use `numbers` to make `target`". Never raises."""
    closed = countdown.think_steps(completion)
    steps = closed if closed is not None else _unclosed_steps(completion)
    if not steps:
        return RolloutDiagnosis(correct, "unfinished", None, False, None)
    fault, fault_step, state = None, None, tuple(sorted(numbers))
    cut = closed is None and not completion.rstrip(" \t").endswith(countdown.SEPARATOR)  # a last step cut mid-way
    for i, text in enumerate(steps[:-1] if cut else steps):  # a cut step is no fault of reasoning
        verdict = check_step(state, target, text, rules)
        if not verdict.ok:
            fault, fault_step = verdict.kind, i
            break
        state = verdict.state_after
    if fault is None and closed is None:
        fault = "unfinished"
    last = parse_step(steps[-1])
    if last is None and cut and len(steps) > 1:  # cut before it parses: the last whole step's
        last = parse_step(steps[-2])
    if last is None:
        return RolloutDiagnosis(correct, fault, fault_step, False, None)
    true_value = apply_op(last.x, last.op, last.y, countdown.ARITHMETIC_ONLY)
    return RolloutDiagnosis(correct, fault, fault_step, last.result == target, true_value == last.result)


def _unclosed_steps(completion: str) -> list[str]:
    """The steps written so far of a think span that never closes (after its opener, parts of
    nothing but dots and blanks dropped as `countdown.think_steps` drops them; a cut last part
    stays: it is what the rollout wrote last)."""
    span = think_body(completion)
    return [part for part in span.split(countdown.SEPARATOR) if part.strip(". \t\n\r")]


def _problem_numbers(problem: Problem) -> tuple[tuple[int, ...], int, Rules]:
    return tuple(problem.meta["numbers"]), int(problem.meta["target"]), countdown.rules_of(problem)


def cache_problems(cache: RolloutCache) -> list[Problem]:
    """The cache's problems, regenerated from its spec (split, count, seed); a ValueError when the
    cache is not a countdown cache or the regenerated ids differ from the cached ones."""
    if cache.task != "countdown":
        raise ValueError(f"a countdown rollout cache is needed, this one is of task {cache.task!r}")
    return problems_of_cache(cache)


def diagnose_cache(cache: RolloutCache) -> list[RolloutDiagnosis]:
    """One diagnosis per cached rollout, in cache order."""
    problems = [_problem_numbers(p) for p in cache_problems(cache)]
    out = []
    for r in range(cache.num_rollouts):
        numbers, target, rules = problems[int(cache.rollout_problem[r])]
        first, last = int(cache.rollout_steps[r]), int(cache.rollout_steps[r + 1])
        completion = "".join(cache.step_texts[first:last])
        out.append(diagnose(numbers, target, rules, completion, bool(cache.correct[r])))
    return out


def fault_table(diagnoses: Sequence[RolloutDiagnosis]) -> str:
    """Markdown: rollouts per first fault (rows) and outcome (columns), with shares."""
    counts = Counter((d.fault or "none", d.correct) for d in diagnoses)
    total = max(1, len(diagnoses))
    lines = ["| first fault | correct | incorrect | share of rollouts |", "|---|---:|---:|---:|"]
    for kind in ("none", *STEP_FAULTS, "unfinished"):
        good, bad = counts[(kind, True)], counts[(kind, False)]
        if good or bad:
            lines.append(f"| {kind} | {good} | {bad} | {(good + bad) / total:.3f} |")
    return "\n".join(lines)


def last_step_table(diagnoses: Sequence[RolloutDiagnosis]) -> str:
    """Markdown: rollouts per (written result is the target, its arithmetic is true) and outcome."""
    counts = Counter((d.wrote_target, d.last_step_true, d.correct) for d in diagnoses)
    lines = ["| last step writes the target | its arithmetic is true | correct | incorrect |", "|---|---|---:|---:|"]
    for wrote in (True, False):
        for true in (True, False, None):
            good, bad = counts[(wrote, true, True)], counts[(wrote, true, False)]
            if good or bad:
                lines.append(f"| {wrote} | {'unparsed' if true is None else true} | {good} | {bad} |")
    return "\n".join(lines)


def arithmetic_rows(rollouts: Sequence[Sequence[str]]) -> dict[tuple[int, str, str], tuple[int, int]]:
    """(think step index, operator, "1 digit" | "2 digits": the larger operand) -> (steps, steps
    whose written result is the true value) over every well-formed think step of the rollouts
    (each a list of step texts; the answer step and malformed steps are skipped). Never raises."""
    counts: Counter = Counter()
    for steps in rollouts:
        for index, text in enumerate(t for t in steps if countdown.THINK_CLOSE not in t):
            step = parse_step(text)
            if step is None:
                continue
            key = (index, step.op, "1 digit" if max(step.x, step.y) < 10 else "2 digits")
            counts[key, "all"] += 1
            counts[key, "true"] += apply_op(step.x, step.op, step.y, countdown.ARITHMETIC_ONLY) == step.result
    return {key: (counts[key, "all"], counts[key, "true"]) for key, kind in counts if kind == "all"}


def arithmetic_table(rows: dict[tuple[int, str, str], tuple[int, int]]) -> str:
    """Markdown of `arithmetic_rows`: how often the policy's arithmetic is right, by step, operator
    and operand size (what a verifier of the last step has to recompute)."""
    lines = ["| step | operator | operands | steps | arithmetic right |", "|---:|---|---|---:|---:|"]
    for (index, op, size), (total, true) in sorted(rows.items()):
        lines.append(f"| {index} | {op} | {size} | {total} | {true / total:.3f} |")
    return "\n".join(lines)


# verifier name -> the rule that ranks a candidate first (ties by confidence)
CHECKS = {
    "confidence alone": lambda d: False,
    "last step writes the target": lambda d: d.wrote_target,
    "... with true arithmetic": lambda d: d.wrote_target and bool(d.last_step_true),
}


def check_bon(cache: RolloutCache, diagnoses: Sequence[RolloutDiagnosis]) -> dict[str, float]:
    """Best-of-n accuracy (n = the cache's rollouts per problem) of each CHECKS rule, ties broken
    by confidence (`rollout_cache.confidence_path_scores`, "mean": the geometric mean over steps of
    each step's mean token probability, steps weighted alike): what a verifier that only knew that
    check would reach."""
    confidence = confidence_path_scores(cache, "mean").tolist()
    n, out = cache.n, {}
    for name, rule in CHECKS.items():
        hits = 0
        for problem in range(cache.num_problems):
            rows = range(problem * n, (problem + 1) * n)
            hits += diagnoses[max(rows, key=lambda r: (rule(diagnoses[r]), confidence[r]))].correct
        out[name] = hits / max(1, cache.num_problems)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a missing, damaged or non-countdown cache prints `error: ...` (exit 2)."""
    return run_command(report_command, argv)


def report_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, diagnose the cache's rollouts and print the tables."""
    ap = argparse.ArgumentParser(prog="python -m experiments.countdown_failures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="a countdown rollout cache (.pt) from experiments.rollout_cache")
    args = ap.parse_args(argv)
    cache = load_cache(args.cache)
    diagnoses = diagnose_cache(cache)
    print(f"{args.cache}: {len(diagnoses)} rollouts, {sum(d.correct for d in diagnoses)} correct\n")
    print(fault_table(diagnoses))
    print()
    print(last_step_table(diagnoses))
    print()
    rollouts = [[s.text for s in cache.steps_of(r)] for r in range(cache.num_rollouts)]
    print(arithmetic_table(arithmetic_rows(rollouts)))
    print()
    print(f"| verifier | Best-of-{cache.n} |\n|---|---:|")
    for name, acc in check_bon(cache, diagnoses).items():
        print(f"| {name} | {acc:.3f} |")
    print(f"| oracle (pass@{cache.n}) | {_oracle(cache):.3f} |")
    return 0


def _oracle(cache: RolloutCache) -> float:
    solved = cache.correct.view(cache.num_problems, cache.n).any(dim=1)
    return float(solved.float().mean())


if __name__ == "__main__":
    sys.exit(main())
