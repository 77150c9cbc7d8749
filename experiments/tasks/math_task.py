"""The task interface shared by the free-form math benchmarks (GSM8K, MATH-500, AIME): the prompt
(problem + the reference's boxed instruction in the chat template), answer extraction and
grading through math-verify. Each benchmark module re-exports these three names, so experiments
treat `experiments.tasks.<name>` like `experiments.tasks.arith`. `with_grading` records a task's
grading mode (task.config.grading: lenient / reference) in its problems' meta, which `grade` reads.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from experiments.tasks import grading, prompts
from treesearch.records import Problem


def prompt_text(problem: Problem, tokenizer: Any = None, think: bool | None = None) -> str:
    """What the policy sees: the problem and the boxed instruction (MetaStone's test prompt) in
    the chat template (see prompts.render_prompt for the plain form without a tokenizer)."""
    return prompts.render_prompt(prompts.math_user_message(problem.question), tokenizer, think=think)


def extract_answer(text: str) -> str | None:
    """The completion's final answer (`grading.extract_final_answer`: the last of \\boxed{}, "#### X"
    and "Answer: X", a prose line or a markdown heading yielding to a box, else "The answer is X.") in the form
    majority votes compare (`grading.canonical_answer`: "18.00" and "$18" are "18"), or None."""
    answer = grading.extract_final_answer(text)
    return None if answer is None else grading.canonical_answer(answer)


def grade(problem: Problem, completion_text: str) -> bool:
    """True iff the completion's final answer is mathematically equal to the reference answer
    ("025" == "25", "$1,000" == "1000", "\\frac{1}{2}" == "0.5"), read as problem.meta["grading"]
    says (`with_grading`): lenient (no such key) takes `extract_final_answer`'s answer, reference
    what MetaStone-S1's grader reads from the user message + completion (`grade_math_reference`)."""
    if grading.grading_mode(problem.meta) == grading.REFERENCE:
        prompt = prompts.math_user_message(problem.question)
        return grading.grade_math_reference(completion_text, problem.answer, prompt=prompt)
    return grading.grade_math(completion_text, problem.answer)


def with_grading(problems: list[Problem], mode: str) -> list[Problem]:
    """problems graded in `mode` (a task.config.grading value, already checked): reference is
    recorded as meta["grading"]; lenient leaves them as they are (no key: today's records)."""
    if mode == grading.LENIENT:
        return problems
    return [dataclasses.replace(p, meta={**p.meta, "grading": mode}) for p in problems]
