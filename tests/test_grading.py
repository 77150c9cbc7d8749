"""Answer extraction and equivalence (experiments/tasks/grading.py) on tricky but realistic
completions: LaTeX matrices, thousands written with \\! \\, {,}, units inside \\text{}, an
unbraced \\boxed, "Final Answer:", markdown around a choice letter, several letters, and long
blank runs that must not make a regular expression backtrack for minutes."""
from __future__ import annotations

import time

import pytest

from experiments.metrics import CandidateOutcome, ProblemOutcome, problem_accuracy
from experiments.tasks import ceval, gsm8k, math500
from experiments.tasks.grading import (
    answer_line,
    answer_sentence,
    answers_match,
    canonical_answer,
    extract_choice,
    extract_final_answer,
    grade_math,
    last_boxed,
    normalize_text,
)
from experiments.tasks.loader_errors import default_data_dir
from treesearch.records import Problem

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "math500").is_dir(), reason=f"shared data folder missing: {DATA}")


# ---------------------------------------------------------------------------------------------
# MATH answers


@pytest.mark.parametrize(("answers", "form"), [
    (["18", "18.00", "$18", "\\$18", "18.", "\\text{18 apples}"], "18"),
    (["0.5", ".5", "1/2", "\\frac{1}{2}", "\\dfrac{1}{2}", "$0.50$"], "0.5"),
    (["-3.5", "-\\frac{7}{2}", "-7/2"], "-3.5"),
    (["1,234", "1{,}234", "1234"], "1234"),
    (["1/3", "\\frac{1}{3}"], "1/3"),
    (["$x^2 + 1$", "x^2  + 1"], "x^2+1"),
    # notation only: these voted apart, so three right answers lost maj@5 to two wrong "0.5"s
    (["\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"], "\\frac{\\sqrt{3}}{2}"),
    (["\\frac12", "\\tfrac12", "\\frac 12", "0.5"], "0.5"),
    (["\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", "(3,\\frac{\\pi}{2})"], "(3,\\frac{\\pi}{2})"),
    (["90^\\circ", "90^{\\circ}", "90°", "90"], "90"),
    (["x=5", "x = 5", "5"], "5"),
    (["\\text{(C)}", "\\textbf{(C)}", "(C)", "C"], "C"),
    (["18 eggs", "\\text{18 eggs}", "18"], "18"),
])
def test_answers_of_one_value_have_one_canonical_form(answers, form):
    assert {canonical_answer(a) for a in answers} == {form}
    assert all(answers_match(a, form) for a in answers)  # and it grades as they do


def test_majority_votes_count_one_value_written_differently_as_one_answer():
    """Three samples give 18 in three notations, two give 20: maj@5 is right (voting on the raw
    strings "18" / "18.00" / "$18" split the 18s and 20 won)."""
    texts = ["The answer is \\boxed{18}", "so\n#### 18.00", "Answer: $18", "\\boxed{20}", "\\boxed{20}"]
    problem = Problem("p", "q", "18")
    outcome = ProblemOutcome("p", tuple(CandidateOutcome(gsm8k.extract_answer(t), gsm8k.grade(problem, t), 0.5)
                                        for t in texts))  # as experiments.outcomes.grade_result makes it
    assert [c.answer for c in outcome.candidates] == ["18", "18", "18", "20", "20"]
    assert [c.correct for c in outcome.candidates] == [True, True, True, False, False]
    assert problem_accuracy(outcome, 5, "majority") == problem_accuracy(outcome, 5, "weighted_majority") == 1.0


def test_matrix_row_breaks_survive_normalisation():
    """'\\\\ ' (a row break, then a space) was read as the thin space '\\ ', which left a lone
    backslash: a matrix graded equal only when spaced exactly like the reference."""
    reference = "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"
    assert normalize_text(reference) == reference
    assert answers_match("\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", reference)
    assert answers_match("\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac23 \\end{pmatrix}",
                         "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}")
    assert not answers_match("\\begin{pmatrix}-2\\\\-14\\\\7\\end{pmatrix}", reference)


def test_thousands_written_with_latex_spacing():
    reference = "11,\\! 111,\\! 111,\\! 100"  # MATH-500 test/number_theory/417.json
    for predicted in ("11111111100", "11,111,111,100", "11,\\!111,\\!111,\\!100", "11{,}111{,}111{,}100"):
        assert answers_match(predicted, reference), predicted
    assert not answers_match("11111111101", reference)
    assert answers_match("1\\,000", "1000") and answers_match("10{,}080", "10,\\!080")


def test_a_number_with_its_unit_in_text_or_percent_in_words():
    assert grade_math("so she has \\boxed{\\text{18 apples}}.", "18")
    assert grade_math("\\boxed{\\text{\\$18 per day}}", "18")
    assert grade_math("\\boxed{10 percent}", "10")
    assert not grade_math("\\boxed{\\text{19 apples}}", "18")
    assert not grade_math("\\boxed{\\text{2 or 3}}", "2")


def test_boxed_without_braces_and_final_answer_line():
    assert last_boxed("so $\\boxed 5$.") == "5" and last_boxed("\\fbox 7") == "7"
    assert last_boxed("\\boxed{3} no, \\boxed 5") == "5" and last_boxed("\\boxed 5 no, \\boxed{3}") == "3"
    assert last_boxed("\\boxed \\frac12") == "\\frac12" and last_boxed("the \\boxed ") is None
    assert grade_math("Thus \\boxed 42.", "42")
    assert extract_final_answer("work\nFinal Answer: 42") == "42"
    assert answer_line("**Final Answer:** $7$") == "$7$"


def test_the_answer_is_sentence_when_nothing_else_states_an_answer():
    # lm-eval's GSM8K chain-of-thought format ended in "The answer is 18." and read as no answer
    assert grade_math("She earns 9 * 2 = 18 dollars. The answer is 18.", "18")
    assert grade_math("So the final answer is $\\frac{1}{2}$.", "0.5")
    assert extract_final_answer("x = 3.5, so the answer is 3.5.\nDone.") == "3.5"
    assert extract_final_answer("The answer is 5.\nWait, recheck: the answer is **7**") == "7"
    assert extract_final_answer("The answer is 5. So \\boxed{4}") == "4"  # a box, a "####" or an Answer line wins
    assert extract_final_answer("the answer is 5\n#### 6") == "6"
    assert extract_final_answer("what the answer is") is None and not grade_math("The answer is 17.", "18")
    # the number right after it, not the rest of the sentence (a first version read "6,which is ...")
    assert extract_final_answer("The answer is 6, which is the final result of the process.") == "6"
    assert extract_final_answer("The answer is 18 because 16 - 3 - 4 = 9 and 9 * 2 = 18.") == "18"
    assert extract_final_answer("The answer is:\n\n**42**") == "42"
    assert extract_final_answer("The answer is not 20. Recounting, she has 18.") is None  # the flexible grader's last number
    assert extract_final_answer("The answer is 2x+3.") is None and extract_final_answer("the answer is 1,2345") is None
    # a fraction whole, an expression none (3/4 read as 3: a false positive against 3, and 3/4 wrong)
    assert grade_math("The answer is 3/4.", "3/4") and not grade_math("The answer is 3/4.", "3")
    assert extract_final_answer("The answer is -1/2") == "-1/2" and extract_final_answer("The answer is 2^10 = 1024.") is None
    assert extract_final_answer("The answer is 3:15 pm.") is None
    # an expression after the number is not its value ("15 + 5 = 20" read as 15); a dash as punctuation is
    assert extract_final_answer("So the answer is 15 + 5 = 20.") is None and not grade_math("The answer is 18 - 2 = 16.", "18")
    assert extract_final_answer("The answer is 5 \\times 3.") is None and extract_final_answer("The answer is 4 x 2.") is None
    assert extract_final_answer("The answer is 18 - that is all.") == "18"
    assert extract_final_answer("The answer is 18 - a fair price.") == "18"  # an article, not a variable
    assert grade_math("She sold 9 * 2 = 18.\n#### 18. That is the total.", "18")  # a numbered sentence, no heading
    assert grade_math("The answer is $\\$18$.", "18") and grade_math("The answer is \\$18.", "18")  # none before
    # the last phrase decides: a retraction after it is not outvoted by an earlier answer
    assert extract_final_answer("The answer is 20. Wait, that is wrong: the answer is not 20, recounting gives 18.") is None


@needs_data
def test_every_math500_answer_grades_equal_without_its_spaces():
    """A model rarely spaces an answer as the reference does; with the blanks removed, every
    MATH-500 answer must still grade equal to itself (through math_verify when the texts differ)."""
    misses = []
    for problem in math500.load_math500():
        tight = problem.answer.replace(" ", "")
        if tight != problem.answer and not math500.grade(problem, f"So \\boxed{{{tight}}}."):
            misses.append((problem.id, problem.answer))
    assert misses == []


# ---------------------------------------------------------------------------------------------
# Choice letters


@pytest.mark.parametrize("text", [
    "**ANSWER: B**", "ANSWER: **B**", "**ANSWER:** B", "ANSWER: $B$", "ANSWER: $\\text{B}$",
    "ANSWER: B) 2", "答案：B选项", "答案：B，因为……", "ANSWER: B, because 2 > 1", "ANSWER: b",
    "work\n**B**", "答案：选B", "故选B", "所以选B。",  # the last three: None before
    "ANSWER: \\(B\\)", "ANSWER: B、2", "ANSWER：Ｂ", "ANSWER: B (2)", "ANSWER: B: 2",  # None before
])
def test_choice_letter_in_markdown_latex_or_lowercase(text):
    assert extract_choice(text) == "B"


@pytest.mark.parametrize("text", [
    "ANSWER: A, B", "答案：A，D", "ANSWER: A,B", "The answer is a.", "Answer: a triangle", "答案：A、D",
])
def test_several_letters_or_a_lowercase_word_are_no_choice(text):
    assert extract_choice(text) is None


@needs_data
def test_ceval_grades_a_bold_answer():
    first = ceval.load_ceval()[0]  # reference C
    assert ceval.grade(first, "分析……\n**ANSWER: C**") and not ceval.grade(first, "**ANSWER: A, C**")


# ---------------------------------------------------------------------------------------------
# Time: long blank runs (degenerate generations) must not make extraction backtrack


def test_a_long_blank_run_after_answer_is_read_fast():
    start = time.monotonic()
    # before: seconds for 300 blanks, minutes for 1000 newlines, all memory for 20000 (nested blank runs)
    assert extract_choice("ANSWER" + " " * 300 + "1") is None
    assert extract_choice("答案" + "\n" * 300 + "1") is None
    assert answer_line("Answer: a" + " \t" * 20000 + "b") is not None  # quadratic before
    assert grade_math("Answer: 5" + " " * 50000 + "\n", "5")
    # "The answer is" with three adjacent blank runs in one pattern: 2000 spaces took 85 s (cubic)
    assert answer_sentence("The answer is" + " " * 2000 + "x") is None
    assert answer_sentence("The answer is" + " \t" * 2000 + ":" + "\n" * 2000 + "*" * 2000 + "7") == "7"
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("text, reference, right", [
    ("\\boxed{18 eggs}", "18", True), ("#### 1,234 dollars", "1234", True), ("\\boxed{19 eggs}", "18", False),
    ("\\boxed{2 x}", "2", False),  # a one-letter word may be a variable: not a unit
])
def test_a_bare_unit_word_after_a_number_is_its_unit(text, reference, right):
    # math_verify read "18 eggs" as the product 18*e*g*g*s: graded wrong against 18
    assert grade_math(text, reference) is right



@pytest.mark.parametrize("text, reference, right", [
    # math_verify read the first number of each (and "and a half hours" was dropped as a unit)
    ("\\boxed{6\\text{ and a half hours}}", "6", False), ("\\boxed{6\\text{ and a half hours}}", "6.5", True),
    ("\\boxed{2 and one-half}", "2.5", True), ("\\boxed{1 \\text{ hour } 30 \\text{ minutes}}", "1", False),
    ("\\boxed{3 \\text{ feet } 4 \\text{ inches}}", "3", False),
    ("\\boxed{10 \\text{ cm}^2}", "10", True),  # an exponent is no second number
    ("\\boxed{6~\\text{hours}}", "6", True), ("\\boxed{90\\degree}", "90", True),  # False before
    # a restatement in brackets is no compound quantity; a magnitude after a mixed number is no part of it
    ("\\boxed{90 \\text{ minutes (1 hour 30 minutes)}}", "90", True),
    ("\\boxed{6.5 \\text{ hours (6 hours 30 minutes)}}", "6.5", True),
    ("\\boxed{2 \\text{ and a half million}}", "2.5", False), ("\\boxed{1 and a half dozen}", "1.5", False),
])
def test_mixed_numbers_and_compound_quantities(text, reference, right):
    assert grade_math(text, reference) is right


def test_a_list_answer_keeps_its_vote_apart_from_a_number():
    # "1, 100" lost its space in the vote key and was read as the number 1,100 (one vote with 1100)
    assert math500.extract_answer("The solutions are $\\boxed{1}$ and $\\boxed{100}$.") != "1100"
    assert canonical_answer("1, 100") != canonical_answer("1100") == "1100"
    assert canonical_answer("0,125") != "125" and canonical_answer("1,100") == "1100"


# ---------------------------------------------------------------------------------------------
# What a completion commits to, as models write it


@pytest.mark.parametrize("text", [
    "Answer: **18**", "#### **18**", "**Final Answer:** **18**.",  # bold: "18**" before
    "So \\boxed{18}.\nPut your final answer within \\boxed{}.",  # the prompt's empty box echoed: "" before
    "#### 18\n\\boxed{}",
    "So \\boxed{20}.\nWait, recheck: 9*2=18.\nFinal Answer: 18",  # the later statement wins: 20 before
    "#### 23\nWait, mistake.\nFinal Answer: 18",
    "Final Answer: \\boxed{18}", "#### \\boxed{18}",  # the box on the marker's line is its answer
    "Thus $\\boxed{18}$.\n\nFinal Answer: The final answer is $18$. I hope it is correct.",  # Minerva's format
    # a box is not replaced by a markdown heading or by a line restating it in prose
    "#### Final Answer\n\\boxed{18}\n\n#### Verification\n9 * 2 = 18",
    "\\boxed{18}.\n\nAnswer: Janet makes \\$18 every day at the market.",
    "So \\[\\boxed{18}\\]\n#### Summary\nShe earns 18 dollars.",
    # numbered or worded headings are no "####" answer, with or without a box ("2. Compute" before)
    "#### 1. Setup\nShe has 9.\n\n#### 2. Compute\n9*2=18.\n\nThe answer is 18.",
    "So she makes $\\boxed{18}$.\n\n#### 3. Check\n9*2 = 18.", "#### Step 2: money\n9 * 2 = 18.\nThe answer is 18.",
])
def test_the_answer_written_last_is_extracted(text):
    assert extract_final_answer(text).strip("$") == "18"
    assert grade_math(text, "18")


@pytest.mark.parametrize("predicted, reference, right", [
    ("90°", "90^\\circ", True), ("90°", "90^{\\circ}", True),  # math_verify: no match
    ("x = 58,500", "58,500", True), ("+58,500", "58,500", True), ("58,500^\\circ", "58,500", True),  # a comma list
    ("y = 5", "x = 5", False), ("x = 5", "5", True),
    # words that change the value are no unit to drop (all graded right before)
    ("18 \\text{ or more}", "18", False), ("\\text{18 or more}", "18", False), ("2 thousand", "2", False),
    ("at least 18", "18", False), ("2 pi", "2", False), ("\\$1.5 million", "1.5", False),
    ("5 square feet", "5", True), ("\\text{18 apples}", "18", True),
    ("18 squared", "18", False), ("18 \\text{ cubed}", "18", False), ("18 squared", "324", True),
    ("18 \\text{ units squared}", "18", True), ("64 \\text{ cm cubed}", "64", True),  # an area's unit, not a power
    # a magnitude word is read as its value (math_verify cannot: "1.45 million" was not 1450000)
    ("1.45 \\text{ million}", "1450000", True), ("2 thousand", "2000", True), ("\\text{3 hundred}", "300", True),
    ("1.45 million", "1.45", False),
    # a compound or hedged answer is not its first number (math_verify read it so)
    ("3 \\text{ hours and } 20 \\text{ minutes}", "3", False), ("18 \\text{ (or 20)}", "18", False),
    ("\\frac{3}{4} \\text{ or } 0.75", "\\frac{3}{4}", True), ("2 \\text{ and } 2", "2", True),  # one value twice
    ("2^{10} \\text{ or } 1024", "1024", True), ("\\sqrt{16} \\text{ or } 4", "4", True),  # math_verify decides those
    # a count's own unit stays one: GSM8K asks "how many dozens / more hours / times / quarters"
    ("7 dozen", "7", True), ("3 more hours", "3", True), ("3 \\text{ times}", "3", True),
    ("16 \\text{ quarters}", "16", True), ("40 \\text{ fewer songs}", "40", True),
])
def test_numbers_with_degrees_signs_assignments_and_value_words(predicted, reference, right):
    assert answers_match(predicted, reference) is right


@pytest.mark.parametrize("text, reference, right", [
    ("The solutions are $\\boxed{1}$ and $\\boxed{-2}$.", "1,-2", True),  # -2 alone before
    ("\\boxed{3}, \\boxed{5}, and \\boxed{7}", "3, 5, 7", True),
    ("The solutions are $\\boxed{1}$ and $\\boxed{-2}$.", "-2", False),
    ("\\boxed{20}. Wait, recheck: \\boxed{18}", "18", True),  # a correction is not a list
    ("$$\\boxed{18}$$\n\n$$\\boxed{18}$$", "18", True),  # a box repeated is one answer ("18, 18" split votes)
    ("\\boxed{12}\n\n\\boxed{5}", "5", True),  # blanks alone: a new answer, not a list
])
def test_boxes_joined_by_and_or_commas_are_one_list_answer(text, reference, right):
    # MATH-500 rows with list answers (intermediate_algebra/1388 "1,-2") graded wrong when one box per value
    assert grade_math(text, reference) is right


def test_a_box_repeated_in_another_form_is_one_vote():
    assert canonical_answer(extract_final_answer("\\boxed{18}, \\boxed{18.00}")) == canonical_answer("18")
    assert extract_final_answer("The answer is 18 or 20.") is None  # a hedge, as "18 (or 20)" in a box


@pytest.mark.parametrize("answer", [
    "18 \\text{ dollars}", "18\\text{dollars}", "$18 a day", "18 dollars a day", "$18/day", "18 dollars/day", "18 km/h",
    "18 cm^2", "18 ft²", "€18", "£18", "18 sq. ft.", "\\$18 an hour", "18 \\mbox{ inches}^3",
    "$18/hr", "18/mo", "18 dm^2", "18 in.^2", "1.8e1", "1.8E+1",
])
def test_a_number_with_a_unit_after_it_is_the_number_and_votes_with_it(answer):
    # "18 \text{ dollars}" was its own maj@N vote beside "18"; "$18 a day", "18 km/h", "€18": graded wrong
    assert canonical_answer(answer) == "18" and answers_match(answer, "18")


@pytest.mark.parametrize("answer", ["18 \\text{ (or 20)}", "18 \\text{ or more}", "18 a", "5ab", "18 x/y", "18/x",
                                    "18 xy^2", "18/ab"])  # algebra: a square on a length unit only, a rate's word a unit's
def test_a_hedge_a_variable_or_a_product_is_no_unit(answer):
    assert not answers_match(answer, "18")


def test_a_vote_counts_a_number_with_its_text_unit_as_the_number():
    texts = ["\\boxed{18 \\text{ dollars}}"] * 2 + ["\\boxed{18}"] * 2 + ["\\boxed{20}"] * 3
    problem = Problem("p", "q", "18")
    outcome = ProblemOutcome("p", tuple(CandidateOutcome(gsm8k.extract_answer(t), gsm8k.grade(problem, t), 0.5)
                                        for t in texts))
    assert [c.answer for c in outcome.candidates] == ["18"] * 4 + ["20"] * 3
    assert problem_accuracy(outcome, 7, "majority") == 1.0


@pytest.mark.parametrize("predicted, reference, right", [
    ("52_9", "52_8", False), ("52_{10}", "52_8", False), ("4210_{6}", "4210_{5}", False),
    ("52_{8}", "52_8", True), ("052_8", "52_8", True), ("52_8", "52_8", True),
])
def test_a_number_in_another_base_is_another_answer(predicted, reference, right):
    # math_verify drops the subscript: 52_9 graded equal to 52_8 (six MATH-500 rows)
    assert answers_match(predicted, reference) is right


@pytest.mark.parametrize("text, answer", [
    ("The total is 42.\n\nAnswer:\n42", "42"), ("**Final Answer:**\n42", "42"), ("Answer:   \n\n  **42**.", "42"),
    ("Answer: 18\nthen\nAnswer:\nJanet sells 9 eggs at $2 each", "18"),  # an explanation below is no answer
    ("**Final Answer:**\n$\\frac{1}{2}$", "$\\frac{1}{2}$"), ("Answer:\n\\boxed{7}", "7"),
    # a display opener, a bullet, a bracket or a step line below is no value: the earlier answer stands
    ("makes \\boxed{18} dollars.\n\n**Final Answer:**\n\\[\n18\n\\]", "18"), ("The answer is 18.\n\nAnswer:\n$$\n18\n$$", "18"),
    ("The answer is 18.\n\nAnswer:\n- 20", "18"), ("\\boxed{18}\nAnswer:\nStep 1: 16 - 3 - 4 = 9", "18"),
    # any other value is one: a tuple, text, a letter, one-line display math (MATH-500's 108 such
    # answers were None when only numbers, inline math and boxes counted)
    ("W\n\nAnswer:\n(2, 3)", "(2, 3)"), ("W\n\n**Final Answer:**\n\\text{Evelyn}", "\\text{Evelyn}"),
    ("W\nAnswer:\nB", "B"), ("W\nAnswer:\n\\begin{pmatrix} -7 \\\\ 16 \\end{pmatrix}", "\\begin{pmatrix} -7 \\\\ 16 \\end{pmatrix}"), ("W\nAnswer:\n\\[\\frac{1}{2}\\]", "\\[\\frac{1}{2}\\]"), ("W\nAnswer:\n-18", "-18"),
])
def test_an_answer_on_the_line_after_answer_colon(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize("text, letter", [
    ("所以答案是A。\n\n不对，重新检查一下：答案应为B。", "B"), ("初步判断答案是A。但仔细分析后，正确选项是C。", "C"),
    ("The answer is A. Wait, that is wrong; the correct option is B.", "B"),
    ("The answer should be B.", "B"), ("答案是A，不应该选B。", "A"), ("Option A: 5 apples. Option B: 6 apples.", None),
    ("答案：A\n\n再检查一下，应该选B。", "B"), ("答案：A。但仔细分析后，正确选项是C。", "C"),
    # after the line the prompt asks for, "ANSWER: X", such a phrase is a remark, not a revision
    ("ANSWER: C\n有人认为应该选A，这是错误的。", "C"),
    ("ANSWER: B\n理论上答案应为A，但题目条件排除了这一点。", "B"), ("ANSWER: D\nNote: one might think the answer should be A. But no.", "D"),
    ("ANSWER: B\nThe correct option is A: wrong, because ...", "B"),
])
def test_a_revised_choice_is_the_one_stated_last(text, letter):
    # the revision was not read, so the abandoned letter graded
    assert extract_choice(text) == letter
