"""The benchmarks' grading modes (task.config.grading): lenient, this project's reading of a
completion (the default, unchanged), and reference, MetaStone-S1's compute_metric.py: a math
completion is right when the answer prime_math's match_answer reads from the prompt + completion
(the last box, else the text after the last marker before the last ". ") equals the answer, a
C-Eval letter is the FIRST
`(?i)(?:答案|answer)\\s*[:：]\\s*([A-Da-d])` alone. The mode reaches `grade` through each Problem's
meta["grading"] (none: lenient, as records and Problems made before the setting)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.tasks import aime, ceval, grading, math500, math_task, prompts
from experiments.tasks.aime import AimeConfig
from experiments.tasks.benchmark_split import BenchmarkConfig
from experiments.tasks.loader_errors import default_data_dir
from treesearch.records import Problem

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "conf"
needs_data = pytest.mark.skipif(not (default_data_dir() / "metastone").is_dir(),
                                reason=f"shared data folder missing: {default_data_dir()}")
REF, LENIENT = {"grading": "reference"}, {}  # meta of a reference-graded problem / of one graded as before

# A question with ". " in it, as nearly every benchmark question has: the reference's cut at the
# last ". " reaches back into it when a completion has none after its box-less answer.
QUESTION = "Each of 3 boxes holds 68 balls. How many balls are there?"
# (completion, lenient grade, reference grade) for the answer 204: the reviewers' cases, the
# reference grades checked against prime_math's compute_score (MetaStone-S1 fa9980ad) on QUESTION's prompt
MATH_CASES = [
    ("... so the total is \\boxed{204}.", True, True),
    ("<think>3 * 68 = 204</think>\nThe total is $\\boxed{204}$.", True, True),
    ("The total is 204.\nAnswer: 204", True, False),
    ("The total is 204.\n#### 204", True, False),
    ("The total is 204. The answer is 204.", True, True),  # no box needed: "... is 204" before the last ". "
    ("<think>Let me count. 3 * 68 = 204. So the answer is 204.", True, True),  # cut off, still read
    ("so the answer is 204.", True, False),  # no ". " after it: the cut falls in the question
    ("\\fbox{204}", True, False),  # the prompt's \boxed{} is the last "\boxed": the \fbox is never read
    ("x = \\boxed{204}", True, True),
    ("$\\boxed{1}$ and $\\boxed{204}$", False, True),  # lenient: the list "1, 204"; reference: the last box
    ("First \\boxed{12}. No, recount: 204.\nAnswer: 204", True, False),  # the last box is what the reference reads
    ("\\boxed{204} is wrong; it is \\boxed{12}", False, False),
    ("no answer at all", False, False),
]
# (completion, lenient grade, reference grade) for the letter C
CHOICE_CASES = [
    ("分析……\nANSWER: C", True, True),
    ("答案：C", True, True),
    ("answer: c", True, True),  # any case, upper-cased
    ("The answer is \\boxed{C}", True, False),
    ("综上所述，故选C。", True, False),
    ("The answer is (C).", True, False),
    ("A 错，B 错，D 错。\nC", True, False),  # a last line that is only the letter
    ("答案：A\n不对，重新看。\nANSWER: C", True, False),  # lenient: the last answer; reference: the first
    ("ANSWER: C\n再想想……answer: A", False, True),
    ("no letter", False, False),
]


def _math(answer: str, meta: dict, question: str = QUESTION) -> Problem:
    return Problem(id="p", question=question, answer=answer, meta={"task": "aime", **meta})


@pytest.mark.parametrize("text, lenient, reference", MATH_CASES)
def test_math_cases_under_both_modes(text, lenient, reference):
    assert math_task.grade(_math("204", LENIENT), text) is lenient
    assert aime.grade(_math("204", {"grading": "lenient"}), text) is lenient  # the mode named is the default
    assert math_task.grade(_math("204", REF), text) is reference
    assert math500.grade(_math("204", REF), text) is reference
    prompt = prompts.math_user_message(QUESTION)
    assert grading.grade_math_reference(text, "204", prompt=prompt) is reference


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{x = 204}", "204"),  # the markers cut inside the box too
    ("It is 204. Done", "204"),  # cut before the last ". ", then after "is "
    ("3 * 68 = 204", "204"),
    ("$\\boxed{1}$ and $\\boxed{-2}$", "-2"),  # one box: the last
    ("\\boxed{} so it is 7", "7"),  # an empty box reads the whole text
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{12", "\\boxed{12"),  # a box that never closes is not one
    ("no answer at all", "no answer at all"),
])
def test_reference_math_answer_reads_as_match_answer(text, answer):
    assert grading.reference_math_answer(text) == answer


def test_the_reference_reads_the_prompt_and_the_completion_together():
    """The cut at the last ". " lands in the question when the completion has none: an
    "Answer: 204" line is right after a question without ". " and wrong after one with it."""
    assert math_task.grade(_math("204", REF, question="How many balls?"), "Answer: 204")
    assert not math_task.grade(_math("204", REF), "Answer: 204")
    assert grading.grade_math_reference("Answer: 204", "204")  # no prompt given: the completion alone
    assert not grading.grade_math_reference("Answer: 204", "204", prompt=prompts.math_user_message(QUESTION))
    assert not grading.grade_math_reference("Answer: 204", "204", prompt=None)  # type: ignore[arg-type]


def test_reference_math_compares_the_box_as_math_verify_does():
    assert math500.grade(_math("\\frac{1}{2}", REF), "so $x = \\boxed{0.5}$")
    assert math500.grade(_math("25", REF), "\\boxed{025}")
    assert not math500.grade(_math("25", REF), "\\boxed{26}")
    assert not grading.grade_math_reference(None, "25")  # type: ignore[arg-type]  # never raises


@pytest.mark.parametrize("text, lenient, reference", CHOICE_CASES)
def test_choice_cases_under_both_modes(text, lenient, reference):
    problem = Problem(id="c", question="q", answer="C", meta={"task": "ceval"})
    assert ceval.grade(problem, text) is lenient
    assert ceval.grade(Problem(id="c", question="q", answer="C", meta={"task": "ceval", **REF}), text) is reference


def test_reference_letter_is_the_first_and_only_the_regexs():
    assert grading.extract_choice_reference("Answer：b. 然后答案: D") == "B"
    assert grading.extract_choice_reference("答案 ： d") == "D"
    assert grading.extract_choice_reference("答案是C") is None  # no colon
    assert grading.extract_choice_reference("ANSWER: E") is None  # A-D only
    assert not grading.grade_choice_reference("ANSWER: C", None)


def test_a_problem_without_the_key_grades_lenient_and_an_unknown_mode_is_refused():
    assert math_task.grade(Problem(id="p", question="q", answer="204"), "Answer: 204")  # hand-made, meta {}
    assert ceval.grade(Problem(id="c", question="q", answer="C"), "故选C")
    with pytest.raises(ValueError, match=r"task\.config\.grading='strict'.*valid: lenient.*reference"):
        math_task.grade(_math("204", {"grading": "strict"}), "\\boxed{204}")


@pytest.mark.parametrize("bad", ["strict", "Reference", None, True])
def test_the_setting_is_validated(bad):
    message = rf"task\.config\.grading={bad!r} \(AimeConfig\.grading\); valid: lenient .*reference"
    with pytest.raises(ValueError, match=message):
        AimeConfig(grading=bad)
    with pytest.raises(ValueError, match=r"task\.config\.grading=.* \(BenchmarkConfig\.grading\); valid: lenient .*reference"):
        BenchmarkConfig(grading=bad)  # math500's, ceval's and gsm8k's config


# ---------------------------------------------------------------------------------------------
# The mode reaches grade through the loaded problems


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides)


@needs_data
def test_the_default_is_lenient_and_leaves_the_problems_as_they_were():
    assert AimeConfig().grading == "lenient" and composed(["task=aime24"]).task.config.grading == "lenient"
    assert aime.generate_problems("test", 2, 0, AimeConfig()) == aime.load_aime(24)[:2]  # no meta key: records unchanged
    assert math500.generate_problems("test", 2, 0) == math500.load_math500()[:2]
    assert ceval.generate_problems("test", 2, 0) == ceval.load_ceval()[:2]


@needs_data
@pytest.mark.parametrize("option, right, unboxed", [
    ("aime24", "\\boxed{{{}}}", "Answer: {}\nThat is all"),  # the reference reads "all"
    ("aime25", "\\boxed{{{}}}", "Answer: {}\nThat is all"),  # the reference reads "all"
    ("math500", "\\boxed{{{}}}", "Answer: {}\nThat is all"),  # the reference reads "all"
    ("ceval", "ANSWER: {}", "故选{}"),
])
def test_grading_reference_reaches_grade_through_the_search_config(option, right, unboxed):
    from experiments.search import load_task

    task, problems = load_task(composed([f"task={option}", "task.count=2", "task.config.grading=reference"]).task)
    assert [p.meta["grading"] for p in problems] == ["reference"] * 2
    answer = problems[0].answer
    assert task.grade(problems[0], right.format(answer)) and not task.grade(problems[0], unboxed.format(answer))
    _, lenient = load_task(composed([f"task={option}", "task.count=2"]).task)
    assert [p.id for p in lenient] == [p.id for p in problems] and "grading" not in lenient[0].meta
    assert task.grade(lenient[0], unboxed.format(answer))
    with pytest.raises(ValueError, match=r"task\.config\.grading='strict'"):
        load_task(composed([f"task={option}", "task.config.grading=strict"]).task)


@needs_data
def test_gsm8k_has_no_reference_grading():
    from experiments.search import load_task

    with pytest.raises(ValueError, match=r"task.config.grading='reference': GSM8K has no reference grading"):
        load_task(composed(["task=gsm8k", "task.count=1", "task.config.grading=reference"]).task)  # as README writes it
    assert composed(["task=gsm8k"]).task.config.grading == "lenient"


def test_an_aime_run_saved_before_the_setting_resumes():
    from experiments.search import ADDED_SETTINGS
    from treesearch.config_diff import config_differences, with_added_settings

    current = OmegaConf.to_container(composed(["task=aime24"]))
    saved = OmegaConf.to_container(composed(["task=aime24"]))
    del saved["task"]["config"]["grading"]  # type: ignore[index, union-attr]
    assert config_differences(with_added_settings(saved, current, ADDED_SETTINGS), current) == []
    reference = OmegaConf.to_container(composed(["task=aime24", "task.config.grading=reference"]))
    assert config_differences(with_added_settings(saved, reference, ADDED_SETTINGS), reference) == [
        "task.config.grading: 'lenient' -> 'reference'"]
