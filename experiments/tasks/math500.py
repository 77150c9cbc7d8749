"""The `math500` task: MATH-500, the 500-problem test subset of the MATH benchmark used by
PRM800K ("Let's Verify Step by Step"), read in place from `../shared/data/math500/test.jsonl`
(see its SOURCE.md).

Same interface as `experiments.tasks.arith` (`python -m experiments.search task=math500
task.count=50`, experiments/conf/task/math500.yaml); MATH-500 has only a test split:

    from experiments.tasks import math500
    problems = math500.load_math500()                   # 500 Problems
    problems = math500.generate_problems("test", 50, seed=0, cfg=BenchmarkConfig())   # the first 50
    text = math500.prompt_text(problems[0], tokenizer)
    math500.grade(problems[0], "... \\\\boxed{\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)}")   # True

Problem.id is the row's unique_id ("test/precalculus/807.json"), Problem.answer its `answer` field
(LaTeX); meta holds subject, level (1-5), the worked solution, the source file and line. Grading
goes through math_verify (see grading.answers_match), lenient by default or as MetaStone-S1
grades (cfg.grading="reference": `math_task.grade`). Run `python -m experiments.tasks.math500` to
print a few problems.
"""
from __future__ import annotations

import os
from typing import Any

from experiments.tasks.benchmark_split import BenchmarkConfig, check_count, check_split, select_problems
from experiments.tasks.loader_errors import RowLocation, read_hub_rows, read_rows, resolve_data_file
from experiments.tasks.math_task import extract_answer, grade, prompt_text, with_grading  # noqa: F401  (the task interface)
from treesearch.records import Problem

HUB_DATASET = ("HuggingFaceH4/MATH-500", None)
SPLITS: tuple[str, ...] = ("test",)


def _problem(where: RowLocation, record: dict[str, Any]) -> Problem:
    level = where.require(record, "level", int)
    if not 1 <= level <= 5:
        raise where.error(f"expected a level in 1-5, got {level}", field="level")
    meta = {
        "task": "math500",
        "subject": where.require_text(record, "subject"),
        "level": level,
        "solution": where.require_text(record, "solution"),
        **where.place(),
    }
    return Problem(
        id=where.require_text(record, "unique_id"),
        question=where.require_text(record, "problem"),
        answer=where.require_text(record, "answer"),
        meta=meta,
    )


def load_math500(path: str | os.PathLike[str] | None = None, hub: bool = False) -> list[Problem]:
    """The 500 problems in file order. `path` (a jsonl, JSON array or parquet file: `read_rows`)
    wins over the shared data folder; hub=True reads HuggingFaceH4/MATH-500 through `datasets`
    instead (optional, needs the hub)."""
    rows = read_hub_rows(*HUB_DATASET, split="test") if hub else read_rows(
        resolve_data_file(path, "math500/test.jsonl")
    )
    return [_problem(where, record) for where, record in rows]


def generate_problems(split: str, count: int | None, seed: int, cfg: BenchmarkConfig = BenchmarkConfig()) -> list[Problem]:
    """The search task interface: the first `count` problems (None / -1: all 500) in file order,
    or shuffled by seed with cfg.shuffle (`experiments.tasks.benchmark_split`); split "test".
    cfg.grading=reference (checked by BenchmarkConfig) is recorded in each problem's meta
    for `grade`: MetaStone-S1's rule, a completion right only with "\\box" and its last \\boxed{}."""
    check_split("math500", split, SPLITS)
    check_count("math500", count)
    return with_grading(select_problems(load_math500(cfg.path, cfg.hub), "math500", split, count, seed, cfg.shuffle),
                        cfg.grading)


def _main() -> None:
    for problem in load_math500()[:3]:
        print(prompt_text(problem) + f" [reference: {problem.answer}]", end="\n\n---\n")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
