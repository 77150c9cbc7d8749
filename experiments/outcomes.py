"""Turn search results into graded outcomes and JSONL records (what metrics and plots read).

    outcomes = grade_results(results, task_grade, task_extract, task="task module experiments.tasks.arith")
    write_records(path, results, outcomes)

A task's extract_answer must return a str or None and its grade True or False (what the records'
readers take, `experiments.sweep_metrics.check_rows`); anything else is a ValueError naming the
task (`task`), the function, the problem and the candidate, before a row is made. A result whose
`chosen` is not None or an index of its candidates is a ValueError too
(`treesearch.result_checks.chosen_fault`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from experiments.metrics import CandidateOutcome, ProblemOutcome
from experiments.result_json import write_atomic
from treesearch.records import Problem, Step
from treesearch.result import SearchResult
from treesearch.result_checks import chosen_fault

Grader = Callable[[Problem, str], bool]
Extractor = Callable[[str], "str | None"]


def grade_result(result: SearchResult, grade: Grader, extract: Extractor, task: str = "the task") -> ProblemOutcome:
    """Each candidate's extracted answer and grade (checked: module docstring; task names the task
    in the error)."""
    cands = []
    for index, cand in enumerate(result.candidates):
        where = f"for candidate {index} of problem {result.problem.id!r}"
        answer = extract(cand.text)
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{task}: extract_answer returned {type(answer).__name__} {answer!r:.60} {where}, "
                             "not a str or None")
        correct = grade(result.problem, cand.text)
        if not isinstance(correct, bool):
            raise ValueError(f"{task}: grade returned {type(correct).__name__} {correct!r:.60} {where}, not True or False")
        cands.append(CandidateOutcome(answer, correct, cand.score))
    return ProblemOutcome(result.problem.id, tuple(cands))


def grade_results(
    results: Sequence[SearchResult], grade: Grader, extract: Extractor, task: str = "the task",
) -> list[ProblemOutcome]:
    """`grade_result` of each result."""
    return [grade_result(r, grade, extract, task) for r in results]


def record(result: SearchResult, outcome: ProblemOutcome) -> dict:
    """One JSON-ready row: the problem, every candidate with its step scores, the pick, the cost.
    A candidate whose steps carry the scores a policy's head attached while generating them (the
    reflective model's SPRM) keeps those too, as `head_scores`, beside the scorer's. A ValueError
    for a `chosen` that is no index of the candidates (`chosen_fault`)."""
    fault = chosen_fault(result)
    if fault is not None:
        raise ValueError(f"the result of problem {result.problem.id!r} has {fault}")
    p = result.problem
    return {
        "problem_id": p.id,
        "question": p.question,
        "answer": p.answer,
        "meta": dict(p.meta),
        "strategy": result.strategy,
        "config": result.config,
        "chosen": result.chosen,
        "correct": None if result.chosen is None else outcome.candidates[result.chosen].correct,
        "candidates": [
            {
                "text": c.text,
                "answer": o.answer,
                "correct": o.correct,
                "score": c.score,
                "step_scores": list(c.step_scores),
                "num_tokens": c.num_tokens,
                "finish": c.steps[-1].finish if c.steps else None,
                **head_scores(c.steps),
            }
            for c, o in zip(result.candidates, outcome.candidates)
        ],
        "compute": result.compute.to_dict(),
    }


def head_scores(steps: Sequence[Step]) -> dict[str, list[float]]:
    """{"head_scores": each step's head score} when every step has one, else {}."""
    if not steps or any(step.score is None for step in steps):
        return {}
    return {"head_scores": [float(step.score) for step in steps]}  # type: ignore[arg-type]


def write_records(path: Path, results: Sequence[SearchResult], outcomes: Sequence[ProblemOutcome]) -> None:
    """Write all rows to path atomically (`write_atomic`: a temp file renamed into place, removed
    again when the write is interrupted); one outcome per result."""
    write_atomic(path, "".join(json.dumps(record(r, o)) + "\n" for r, o in zip(results, outcomes, strict=True)))
