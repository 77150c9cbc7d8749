"""The `ceval` task: C-Eval's validation split (1346 four-choice questions in Chinese, 52
subjects) as MetaStone-S1 evaluates it, read in place from `../shared/data/metastone/ceval.json`
(see its SOURCE.md; a JSON array with fields model_input, answer, sub, id).

Each `model_input` is MetaStone's full prompt: a header naming the subject, the question, the
choices "A. {...}" to "D. {...}", then an instruction to end with the line 'ANSWER: $LETTER'.
The loader takes the question and the four choices apart (meta["choices"]) and keeps the prompt
(meta["model_input"]); prompt_text sends that prompt, without the newlines around it, in the
chat template.

Same interface as `experiments.tasks.arith` (`python -m experiments.search task=ceval
task.count=50`, experiments/conf/task/ceval.yaml). The file is C-Eval's validation split, which
MetaStone evaluates on; here it is the task's only split, "test":

    from experiments.tasks import ceval
    problems = ceval.load_ceval()                       # 1346 Problems
    problems = ceval.generate_problems("test", 50, seed=0, cfg=BenchmarkConfig(shuffle=True))   # 50 drawn across subjects
    ceval.grade(problems[0], "...\\nANSWER: C")          # True when the reference letter is C

Grading is lenient by default (`extract_answer`: the last "ANSWER: X", 故选X, \\boxed{X}, a lone
letter line ...); cfg.grading="reference" grades as MetaStone-S1 does: the first "答案: X" /
"answer: X" only (meta["grading"], which `grade` reads).

Problem.answer is the reference letter; ids are "ceval-<sub>-<id>" (ids restart per subject). Run
`python -m experiments.tasks.ceval` to print a few problems.
"""
from __future__ import annotations

import os
import re
from typing import Any

from experiments.tasks import grading, prompts
from experiments.tasks.benchmark_split import BenchmarkConfig, check_count, check_split, select_problems
from experiments.tasks.loader_errors import RowLocation, read_rows, resolve_data_file
from experiments.tasks.math_task import with_grading
from treesearch.records import Problem

DATA_FILE = "metastone/ceval.json"
LETTERS = grading.CHOICE_LETTERS
SPLITS: tuple[str, ...] = ("test",)
# MetaStone's prompt: header (subject in Chinese), {question}, four {choices}, instruction.
_PROMPT_RE = re.compile(
    r"^\s*以下是中国关于(?P<subject>.+?)考试的单项选择题，请选出其中的正确答案。\n"
    r"(?P<question>.*)\nA\. (?P<A>.*)\nB\. (?P<B>.*)\nC\. (?P<C>.*)\nD\. (?P<D>.*)\n"
    r"(?P<instruction>让我们一步一步思考。[^\n]*)\s*$",
    re.S,
)


def _unbrace(text: str) -> str:
    """MetaStone wraps the question and each choice in one pair of literal braces; drop them."""
    return text[1:-1] if text.startswith("{") and text.endswith("}") else text


def _problem(where: RowLocation, record: dict[str, Any]) -> Problem:
    model_input = where.require(record, "model_input", str)
    answer = where.require(record, "answer", str)
    if answer not in LETTERS or len(answer) != 1:
        raise where.error(f"expected one of {', '.join(LETTERS)}, got {answer!r}", field="answer")
    subject = where.require_text(record, "sub")
    number = where.require(record, "id", int)
    parts = _PROMPT_RE.match(model_input)
    if parts is None:
        raise where.error("not MetaStone's C-Eval prompt (header, question, choices A-D, instruction)",
                          field="model_input")
    meta = {
        "task": "ceval",
        "subject": subject,
        "subject_zh": parts.group("subject"),
        "choices": tuple(_unbrace(parts.group(letter)) for letter in LETTERS),
        "model_input": model_input,
        **where.place(),
    }
    return Problem(id=f"ceval-{subject}-{number}", question=_unbrace(parts.group("question")), answer=answer, meta=meta)


def load_ceval(path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """All questions in file order. `path` (a file of the same records: a JSON array, JSON Lines
    or parquet, `read_rows`) wins over the shared data folder. Raises DataFormatError naming
    file, line and field for a bad item."""
    rows = read_rows(resolve_data_file(path, DATA_FILE))
    return [_problem(where, record) for where, record in rows]


def generate_problems(split: str, count: int | None, seed: int, cfg: BenchmarkConfig = BenchmarkConfig()) -> list[Problem]:
    """The search task interface: the first `count` questions (None / -1: all 1346) in file order
    (grouped by subject), or shuffled by seed with cfg.shuffle (`experiments.tasks.benchmark_split`);
    split "test". cfg.hub is refused: MetaStone's prompts exist only in their file. cfg.grading
    =reference (checked by BenchmarkConfig) is recorded in each question's meta for `grade`."""
    check_split("ceval", split, SPLITS)
    check_count("ceval", count)
    if cfg.hub:
        raise ValueError("ceval: hub=True is not supported (the task uses MetaStone's prompts, which only "
                         "their ceval.json holds); set path= to another copy of that file instead")
    return with_grading(select_problems(load_ceval(cfg.path), "ceval", split, count, seed, cfg.shuffle), cfg.grading)


def prompt_text(problem: Problem, tokenizer: Any = None, think: bool | None = None) -> str:
    """What the policy sees: MetaStone's prompt (question, choices, 'ANSWER: $LETTER'
    instruction) in the chat template."""
    return prompts.render_prompt(problem.meta["model_input"].strip(), tokenizer, think=think)


def extract_answer(text: str) -> str | None:
    """The chosen letter: last "ANSWER: X", else last \\boxed{X}, else a last line that is only a
    letter; None when there is none."""
    return grading.extract_choice(text, LETTERS)


def grade(problem: Problem, completion_text: str) -> bool:
    """True iff the chosen letter is the reference letter, chosen as problem.meta["grading"] says:
    lenient (no such key) `extract_answer`'s letter, reference MetaStone-S1's (the FIRST
    "答案: X" / "answer: X", `grading.extract_choice_reference`)."""
    if grading.grading_mode(problem.meta) == grading.REFERENCE:
        return grading.grade_choice_reference(completion_text, problem.answer)
    return grading.grade_choice(completion_text, problem.answer, LETTERS)


def _main() -> None:
    for problem in load_ceval()[:2]:
        print(prompt_text(problem) + f" [reference: {problem.answer}]", end="\n\n---\n")


if __name__ == "__main__":
    from experiments.broken_pipe import stdout_closed_quietly

    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        _main()
