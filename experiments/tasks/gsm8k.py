"""The `gsm8k` task: GSM8K grade-school math word problems (openai/grade-school-math), read in
place from `../shared/data/gsm8k/{train,test}.jsonl` (see its SOURCE.md).

Same interface as `experiments.tasks.arith`, so experiments treat both alike
(`python -m experiments.search task=gsm8k task.count=50`, experiments/conf/task/gsm8k.yaml):

    from experiments.tasks import gsm8k
    problems = gsm8k.load_gsm8k("test")                 # 1319 Problems
    problems = gsm8k.generate_problems("test", 50, seed=0, cfg=BenchmarkConfig())   # the first 50
    text = gsm8k.prompt_text(problems[0], tokenizer)    # chat template + boxed instruction
    gsm8k.grade(problems[0], "... \\\\boxed{18}")          # True

Problem.answer is the number after "####" in the reference solution with its thousands commas
removed ("1,450,000" -> "1450000"); meta keeps the full worked solution (`solution`, with the
<<calc>> annotations), the source file and line (a hub row: its row). Ids number the rows
(gsm8k-test-1 is the first; a blank line renames nothing). Run `python -m experiments.tasks.gsm8k`
to print a few problems.
"""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from experiments.tasks import grading
from experiments.tasks.benchmark_split import BenchmarkConfig, check_count, check_split, select_problems
from experiments.tasks.grading import LENIENT
from experiments.tasks.loader_errors import RowLocation, read_hub_rows, read_rows, resolve_data_file
from experiments.tasks.math_task import extract_answer, grade, prompt_text  # noqa: F401  (the task interface)
from treesearch.records import Problem

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
HUB_DATASET = ("openai/gsm8k", "main")


# GSM8K's final answers: an integer, thousands commas allowed ("1,450,000"), maybe negative or
# with decimals; what follows "####" must be all of it.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _reference_answer(solution: str, where: RowLocation) -> str:
    """The "#### N" number of a reference solution, commas removed; DataFormatError if absent
    or not a number."""
    answer = grading.hash_answer(solution)
    if answer is None and "####" in solution:  # "#### five": a line hash_answer takes for a heading
        answer = solution.rpartition("####")[2].strip().split("\n")[0].strip() or None
    if answer is None:
        raise where.error("no '#### <answer>' line in the solution", field="answer")
    if not _NUMBER_RE.fullmatch(answer):
        raise where.error(f"expected a number after '####' (such as 18, -3, 1,450,000 or 2.5), got {answer!r:.60}",
                          field="answer")
    return answer.replace(",", "")


def _problem(where: RowLocation, record: dict[str, Any], split: Split, row: int) -> Problem:
    """The problem of a row; row: its place among the split's rows from 1 (its id: the line
    number shifted every id after a blank line, and named another problem than the hub's row)."""
    question = where.require_text(record, "question")
    solution = where.require(record, "answer", str)
    meta = {
        "task": "gsm8k",
        "split": split,
        "solution": solution,
        **where.place(),
    }
    return Problem(id=f"gsm8k-{split}-{row}", question=question,
                   answer=_reference_answer(solution, where), meta=meta)


def load_gsm8k(split: Split = "test", path: str | os.PathLike[str] | None = None, hub: bool = False) -> list[Problem]:
    """All problems of a split, in file order. `path` (a jsonl, JSON array or parquet file:
    `read_rows`) wins over the shared data
    folder; hub=True reads openai/gsm8k through `datasets` instead (optional, needs the hub)."""
    check_split("gsm8k", split, SPLITS)
    if hub:
        rows = read_hub_rows(*HUB_DATASET, split=split)
    else:
        rows = read_rows(resolve_data_file(path, f"gsm8k/{split}.jsonl"))
    return [_problem(where, record, split, row) for row, (where, record) in enumerate(rows, start=1)]


def generate_problems(split: Split, count: int | None, seed: int, cfg: BenchmarkConfig = BenchmarkConfig()) -> list[Problem]:
    """The search task interface: the first `count` problems of a split (None / -1: all) in file
    order, or shuffled by seed with cfg.shuffle (`experiments.tasks.benchmark_split`)."""
    check_split("gsm8k", split, SPLITS)
    check_count("gsm8k", count)
    if cfg.grading != LENIENT:  # a key every benchmark config has; MetaStone-S1's rule covers its own benchmarks
        raise ValueError(f"task.config.grading={cfg.grading!r}: GSM8K has no reference grading (MetaStone-S1 "
                         "grades AIME and C-Eval; its AIME rule is applied to MATH-500 too); leave it lenient")
    problems = load_gsm8k(split, cfg.path, cfg.hub)
    return select_problems(problems, "gsm8k", split, count, seed, cfg.shuffle)


def _main() -> None:
    for problem in load_gsm8k("test")[:3]:
        print(prompt_text(problem) + f" [reference: {problem.answer}]", end="\n\n---\n")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
