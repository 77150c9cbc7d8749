"""Turn search results into graded outcomes and JSONL records (what metrics and plots read).

    outcomes = grade_results(results, task_grade, task_extract)
    write_records(path, results, outcomes)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from experiments.metrics import CandidateOutcome, ProblemOutcome
from experiments.result_json import write_atomic
from treesearch.records import Problem, Step
from treesearch.result import SearchResult

Grader = Callable[[Problem, str], bool]
Extractor = Callable[[str], "str | None"]


def grade_result(result: SearchResult, grade: Grader, extract: Extractor) -> ProblemOutcome:
    cands = tuple(
        CandidateOutcome(extract(c.text), grade(result.problem, c.text), c.score) for c in result.candidates
    )
    return ProblemOutcome(result.problem.id, cands)


def grade_results(results: Sequence[SearchResult], grade: Grader, extract: Extractor) -> list[ProblemOutcome]:
    return [grade_result(r, grade, extract) for r in results]


def record(result: SearchResult, outcome: ProblemOutcome) -> dict:
    """One JSON-ready row: the problem, every candidate with its step scores, the pick, the cost.
    A candidate whose steps carry the scores a policy's head attached while generating them (the
    reflective model's SPRM) keeps those too, as `head_scores`, beside the scorer's."""
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
