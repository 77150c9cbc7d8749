"""The `aime` task: AIME 2024 and AIME 2025 (30 problems each; integer answers 0-999), read in
place from MetaStone-S1's files in `../shared/data/metastone/` (see its SOURCE.md):

- `aime24.jsonl`, `aime25.jsonl`: their test files; `prompt` = problem + "\\n" + the boxed
  instruction (stripped here: prompt_text adds it back), `answer` an int.
- `aime.parquet`: their verl RL validation file, AIME 2024 only; `question`,
  `reward_model.ground_truth.target` (a zero-padded string such as "025"), `extra_info.index`.
  Its texts differ slightly from the jsonl's (some keep the [asy] diagram code) and its rows come
  in another order; the answers agree.

Same interface as `experiments.tasks.arith` (`python -m experiments.search task=aime24`, or
task=aime25: experiments/conf/task/aime2{4,5}.yaml, both this module with `AimeConfig.year`);
AIME has only a test split:

    from experiments.tasks import aime
    problems = aime.load_aime(24)                        # 30 Problems
    problems = aime.load_aime(24, parquet=True)          # the same problems from the parquet file
    problems = aime.generate_problems("test", None, seed=0, cfg=AimeConfig(year=25))   # all 30 of 2025
    aime.grade(aime.load_aime(24)[0], "... \\\\boxed{204}")   # True (2024's first answer)
    aime.generate_problems("test", None, 0, AimeConfig(grading="reference"))   # graded as MetaStone-S1 does

Problem.answer is the canonical integer string ("025" -> "25"); ids are "aime24-<index>" (line
order in the jsonl, extra_info.index in the parquet: the same id names different problems in
the two files, so never compare records of the two by id). Run
`python -m experiments.tasks.aime` to print a few problems.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from experiments.tasks import grading, prompts
from experiments.tasks.benchmark_split import check_count, check_flag, check_path, check_split, select_problems
from experiments.tasks.loader_errors import RowLocation, read_jsonl, read_parquet_rows, resolve_data_file
from experiments.tasks.math_task import extract_answer, grade, prompt_text, with_grading  # noqa: F401  (the task interface)
from treesearch.records import Problem

Year = Literal[24, 25]
JSONL_FILES = {24: "metastone/aime24.jsonl", 25: "metastone/aime25.jsonl"}
PARQUET_FILES = {24: "metastone/aime.parquet"}  # MetaStone ships no AIME 2025 parquet
_PROMPT_SUFFIX = "\n" + prompts.BOXED_INSTRUCTION
_INTEGER_RE = re.compile(r"-?[0-9]+")
SPLITS: tuple[str, ...] = ("test",)


@dataclass(frozen=True)
class AimeConfig:
    """Which AIME file a search run reads (the task config of `generate_problems`).

    year: 24 (AIME 2024) or 25 (AIME 2025).
    path: a file to read instead of the shared copy (a jsonl, or a parquet file with parquet=True).
    parquet: read MetaStone's verl parquet file instead of the jsonl (AIME 2024 only, unless
        path names a parquet file of your own); its ids name other problems than the jsonl's (module docstring).
    shuffle: draw the problems in a permutation seeded by the task's seed instead of file order.
    grading: "lenient" (grading.extract_final_answer: a box, "#### N", "Answer: N" or "The answer
        is N", in the thinking too when nothing follows it) or "reference" (MetaStone-S1's rule: the
        completion must write "\\box" and its last \\boxed{} must equal the answer); recorded in
        each Problem's meta["grading"] (reference only), which `grade` reads.
    """

    year: int = 24
    path: str | None = None
    parquet: bool = False
    shuffle: bool = False
    grading: str = grading.LENIENT

    def __post_init__(self) -> None:
        if isinstance(self.year, bool) or not isinstance(self.year, int) or self.year not in JSONL_FILES:
            raise ValueError(f"AimeConfig.year={self.year!r}; valid: {', '.join(map(str, JSONL_FILES))}")
        check_path("AimeConfig", self.path)
        check_flag("AimeConfig", "parquet", self.parquet)
        check_flag("AimeConfig", "shuffle", self.shuffle)
        grading.check_grading("AimeConfig", self.grading)
        if self.parquet and self.path is None and self.year not in PARQUET_FILES:
            raise ValueError(f"AimeConfig.parquet=True with year={self.year}: MetaStone ships only AIME 2024 as "
                             "parquet; set path= to a parquet file of your own, or parquet=false")


def _canonical_answer(value: Any, where: RowLocation, field: str) -> str:
    """An AIME answer as a canonical integer string; DataFormatError unless it is an integer from 0
    to 999 (every AIME answer is)."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not _INTEGER_RE.fullmatch(text) or len(text) > 12:  # ASCII digits: "²" and "--5" are no integers
        raise where.error(f"expected an integer answer, got {value!r}", field=field)
    if not 0 <= int(text) <= 999:
        raise where.error(f"expected an AIME answer from 0 to 999, got {value!r}", field=field)
    return str(int(text))


def _jsonl_problem(where: RowLocation, record: dict[str, Any], year: int, index: int) -> Problem:
    """The problem of a jsonl row; index: its place among the file's rows (blank lines are no row:
    the line number shifted every id after a blank line)."""
    prompt = where.require_text(record, "prompt")
    question = prompt[: -len(_PROMPT_SUFFIX)] if prompt.endswith(_PROMPT_SUFFIX) else prompt
    if not question.strip():
        raise where.error("expected a problem before the boxed instruction, got the instruction alone", field="prompt")
    answer = _canonical_answer(where.require(record, "answer", (int, str)), where, "answer")
    meta = {"task": "aime", "year": 2000 + year, "index": index, **where.place()}
    return Problem(id=f"aime{year}-{index}", question=question, answer=answer, meta=meta)


def _nested(record: dict[str, Any], where: RowLocation, dotted: str, kind: type) -> Any:
    """record["a"]["b"]... for dotted = "a.b...", with errors that name the dotted field."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise where.error("missing", field=dotted)
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise where.error(f"expected {kind.__name__}, got {type(value).__name__} ({value!r:.60})", field=dotted)
    return value


def _parquet_problem(where: RowLocation, record: dict[str, Any], year: int) -> Problem:
    target = _nested(record, where, "reward_model.ground_truth.target", str)
    index = _nested(record, where, "extra_info.index", int)
    meta = {
        "task": "aime",
        "year": 2000 + year,
        "index": index,
        **where.place(),
        "data_source": record.get("data_source"),
    }
    return Problem(
        id=f"aime{year}-{index}",
        question=where.require_text(record, "question"),
        answer=_canonical_answer(target, where, "reward_model.ground_truth.target"),
        meta=meta,
    )


def load_aime(year: Year, path: str | os.PathLike[str] | None = None, parquet: bool = False) -> list[Problem]:
    """The problems of AIME 20<year> in file order. parquet=True reads MetaStone's verl parquet
    file instead of the jsonl (AIME 2024 only, unless `path` names another parquet file), as does
    a `path` ending in .parquet (it was read as jsonl: "not valid UTF-8 ... save the file as
    UTF-8"). `path` wins over the shared data folder."""
    if year not in (24, 25):
        raise ValueError(f"year={year!r}; valid: 24, 25")
    parquet = parquet or (path is not None and str(path).lower().endswith(".parquet"))
    if not parquet:
        rows = read_jsonl(resolve_data_file(path, JSONL_FILES[year]))
        return [_jsonl_problem(where, record, year, index) for index, (where, record) in enumerate(rows)]
    if path is None and year not in PARQUET_FILES:
        raise ValueError(f"year={year} with parquet=True: MetaStone ships only AIME 2024 as parquet; "
                         "pass path=... to a parquet file of your own, or use parquet=False")
    rows = read_parquet_rows(resolve_data_file(path, PARQUET_FILES.get(year, "")))
    return [_parquet_problem(where, record, year) for where, record in rows]


def generate_problems(split: str, count: int | None, seed: int, cfg: AimeConfig = AimeConfig()) -> list[Problem]:
    """The search task interface: the first `count` problems of AIME 20<cfg.year> (None / -1: all
    30) in file order, or shuffled by seed with cfg.shuffle (`experiments.tasks.benchmark_split`);
    split "test". cfg.grading=reference is recorded in each problem's meta for `grade`."""
    task = f"aime{cfg.year}"
    check_split(task, split, SPLITS)
    check_count(task, count)
    problems = load_aime(cfg.year, cfg.path, cfg.parquet)  # type: ignore[arg-type]  # checked by AimeConfig
    return with_grading(select_problems(problems, task, split, count, seed, cfg.shuffle), cfg.grading)


def _main() -> None:
    for year in (24, 25):
        problem = load_aime(year)[0]
        print(prompt_text(problem) + f" [reference: {problem.answer}]", end="\n\n---\n")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
