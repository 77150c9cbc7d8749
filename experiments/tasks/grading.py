"""Final-answer extraction and answer equivalence for the real benchmarks (GSM8K, MATH-500, AIME,
C-Eval).

Extraction reads what a completion commits to:

    last_boxed("... so \\boxed{\\frac{1}{2}}.")   -> "\\frac{1}{2}"   (last one; nested braces kept)
    hash_answer("... \\n#### 1,234")              -> "1,234"
    answer_line("...\\nAnswer: 42")               -> "42"
    extract_choice("...\\nANSWER: C")             -> "C"
    extract_final_answer(text)                   -> the last of boxed / "####" / "Answer:" (a prose line or a
                                                    "#### Heading" yields to a box), else what
                                                    follows the last "The answer is"; None if none
    canonical_answer("$18.00")                   -> "18"   (the form majority votes compare)

Equivalence (`answers_match(predicted, reference)`) tries a fast path first (equal text after
light normalisation; plain numbers such as "$1,000", "0.5" and "1/2" compared exactly as
fractions) and only then asks `math_verify` (parse + verify), with a time limit on every parse and
comparison, so a pathological answer such as 9^{9^{9^{9}}} costs seconds instead of hanging (~5 s
per parse or comparison in the main thread, up to 15 s per check in any other). math_verify's own
limit is a SIGALRM, which works only in the main thread; in any other thread (a server's worker
pool) the same check runs in a helper process that is killed when it overruns. Nothing here raises on garbage: a failed parse is "not equal".

    from experiments.tasks.grading import grade_math, grade_choice
    grade_math("\\\\boxed{0.5}", reference="\\\\frac{1}{2}")   # True

Two grading modes (a benchmark's `task.config.grading`, recorded in each Problem's meta): lenient,
the reading above (not MetaStone-S1's: on the same outputs the two differ either way), and reference, the rule of
MetaStone-S1's compute_metric.py: a math completion is right when the answer its grader reads from
the prompt + completion (the last box, else the text after the last "is " / "=" / ": " ... before
the last ". ") equals the reference (`grade_math_reference`), a C-Eval letter is the first
"答案: X" / "answer: X" alone (`extract_choice_reference`).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

THINK_CLOSE = "</think>"
_REPO_ROOT = Path(__file__).resolve().parents[2]  # for the helper process's import path
CHOICE_LETTERS = "ABCD"
# Seconds math_verify may spend on one parse and on one comparison (its limits are whole seconds).
DEFAULT_TIMEOUT_S = 5
# Answers longer than this are not worth a symbolic check (and are the usual pathological inputs).
MAX_ANSWER_CHARS = 1000
# A plain number longer than this is not read as a number (int() of a huge string is slow).
_MAX_NUMBER_CHARS = 60

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Extraction

# "\boxed{...}", or "\boxed 5" (no braces: the argument runs to the next blank or "$")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|[ \t]+(?=[^\s${}]))")
_BARE_BOXED_RE = re.compile(r"[^\s$]+")
# between boxes of one list answer: a comma, a semicolon, "and" or "or" (blanks alone: a new answer)
_BOX_JOINER_RE = re.compile(r"[\s$]*(?:[,;][\s$]*(?:(?:and|or)[\s$]+)?|(?:and|or)[\s$]+)")
_HASH_RE = re.compile(r"####[ \t]*([^\n\r]*)")  # a line ends at \n or \r (Windows line ends: "#### 7\r\n")
# "(.+)" and not "(.+?)[ \t]*": the latter backtracks quadratically on a long run of blanks.
# the value on its line (group 1), or on the next non-blank one when the line ends at the colon
# (group 2: "**Final Answer:**\n42"); each group starts at a non-blank, so a blank is never the value
_ANSWER_RE = re.compile(r"(?im)^[ \t*#>]*(?:final[ \t]+)?answer[ \t*]*[:：][ \t*]*(?:([^ \t*\n].*)|\n\s*(\S.*))$")
# "ANSWER: C", "answer is (B).", "答案：D", "**ANSWER:** $B$", "答案：B选项", "答案：选C", "故选C", "ANSWER: \\(B\\)",
# "ANSWER：Ｂ" (a full-width letter): the letter must end the statement (or close a bracket: "B) 2"; or be
# followed by a colon, "、" or a bracketed remark: "B: 2", "B、2", "B (2)"), so that "Answer: A triangle has ..." is not read as
# choice A, nor "ANSWER: A, B" as A. A revision counts as a statement: "答案应为B", "正确选项是C",
# "应该选B" (not "不应该选B"), "the correct option is B", "the answer should be B", except after
# the line the prompt asks for, "ANSWER: X", which is final ("ANSWER: C\n有人认为应该选A，这是错误的。" is C;
# "答案：A\n不对……答案应为B" is B). Each optional
# part owns the blanks after it (adjacent optional blank runs made a long run of spaces after
# "answer" take minutes of backtracking).
_CHOICE_ANSWER_RE = re.compile(
    r"(?im)(?:(?P<revision>answer[ \t]+should[ \t]+be|correct[ \t]+(?:option|choice)[ \t]+is|答案应该?[是为]|正确选项|"
    r"(?<!不)应该?选)|answer|答案|故选|所以选)"
    r"[\s*_]*(?:(?:is|为|是|选)[\s*_]*)?(?P<colon>[:：][\s*_$]*)?(?:选[\s*_]*)?"
    r"(?:\\(?:text|textbf|mathrm|mathbf|boxed)\{)?(?:\\[(\[]\s*)?(?:[(（{\[]\s*)?"
    r"(?P<letter>[A-ZＡ-Ｚ])(?:[\s)）}\]*_$]|\\[)\]])*"
    r"(?=$|[.。;；!！:：]|[,，、](?![ \t]*(?-i:[A-D])(?![A-Za-z]))|选项|(?<=[)）\]])|[ \t]*[(（])"
)
# Minerva's answer line ("Final Answer: The final answer is $5$. I hope it is correct."): its X
_MINERVA_START_RE = re.compile(r"(?i)the[ \t]+final[ \t]+answer[ \t]+is:?[ \t]*")
_MINERVA_END = "i hope it is correct"
# "The answer is 18." / "So the final answer is $\frac{1}{2}$." (lm-eval's GSM8K chain-of-thought
# format), when a completion has no box, "####" or "Answer:" line: the number, fraction or inline
# math right after the LAST such phrase, nothing more ("The answer is 6, which is ..." is 6; "The
# answer is not 20", "The answer is 2^10" and "The answer is 15 + 5 = 20" are none). Two patterns, the gap after "is" matched
# one way only: three adjacent blank runs there took 85 s on 2000 spaces.
_ANSWER_IS_RE = re.compile(r"(?i)\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b")
_NUMBER_TEXT = r"[-+]?(?:\\?\$)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # "\$18" too
# after the value: no more of a number or an expression ("15 + 5 = 20", "18 x 2", "2^10", "3:15")
_VALUE_GOES_ON = (r"[\w/^:]|[,.]\d|[ \t]*=|[ \t]*\(?(?:or|and)[ \t]+\\?\$?\d|[ \t]*(?:[-+*×÷]|\\(?:times|cdot|div)(?![A-Za-z])|[xX])"
                  r"[ \t]*(?:[\d(\\$]|[A-Za-z](?![A-Za-z])(?![ \t]+[A-Za-z]))")  # "18 - that is", "18 - a fair ..." are 18
_ANSWER_IS_VALUE_RE = re.compile(
    rf"(?:[ \t]*:)?\s*(?:\*+[ \t]*)?(\$(?:\\\$|[^$\n])+\$|\\\(.+?\\\)|{_NUMBER_TEXT}(?:/{_NUMBER_TEXT})?%?)"
    rf"(?!{_VALUE_GOES_ON})"
)
_LONE_LETTER_RE = re.compile(r"^[(（{]?\s*([A-Z])\s*[)）}]?[.。]?$")
_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$", re.S)


def _balanced_group(text: str, start: int) -> str | None:
    """Contents of the brace group opened at text[start] == "{", or None when it never closes.
    Escaped braces (\\{ \\}) are content, not grouping."""
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), nested braces kept, stripped.

    None when there is none, or when the last one never closes (a cut-off generation has not
    committed to an answer, so an earlier box is not taken in its place)."""
    if not isinstance(text, str):
        return None
    found = last_boxed_at(text)
    return None if found is None else found[1]


def last_boxed_at(text: str) -> tuple[int, str] | None:
    """(where it starts, its contents) of the last non-empty box, as `last_boxed` reads it.
    An empty \\boxed{} is skipped: it is the prompt's "put your answer in \\boxed{}" echoed.
    Boxes joined by a comma, a semicolon, "and" or "or" (and blanks, "$") are one answer, their contents
    joined by ", " ("$\\boxed{1}$ and $\\boxed{-2}$" -> "1, -2": a list answer, one box per value;
    a box repeated counts once: "$\\boxed{18}$ $\\boxed{18}$" -> "18")."""
    run: list[tuple[int, int, str]] = []  # (start, end, contents) of the last boxes, the last first
    for match in reversed(list(_BOXED_RE.finditer(text))):
        box = _box_at(text, match)
        if box is None or not box[2]:  # never closes (a cut-off answer), or empty (skipped)
            if run or box is None:
                break
            continue
        if run and not _BOX_JOINER_RE.fullmatch(text, box[1], run[-1][0]):
            break
        run.append(box)
    if not run:
        return None
    kept: dict[str, str] = {}  # a box repeated (in any form of its value: 18, 18.00) is one answer
    for _, _, contents in reversed(run):
        kept.setdefault(canonical_answer(contents), contents)
    return run[-1][0], ", ".join(kept.values())


def _box_at(text: str, match: re.Match[str]) -> tuple[int, int, str] | None:
    """(start, end, stripped contents) of the box a _BOXED_RE match opens, None if it never closes."""
    if match.group(1) is None:  # "\boxed 5"
        bare = _BARE_BOXED_RE.match(text, match.end())  # lookahead: non-empty
        return match.start(), bare.end(), bare.group()  # type: ignore[union-attr]
    content = _balanced_group(text, match.end() - 1)
    if content is None:
        return None
    return match.start(), match.end() + len(content) + 1, content.strip()


def hash_answer(text: str) -> str | None:
    """What follows the last "####" on its line (GSM8K's format), stripped (markdown bold too:
    "#### **18**"); None if none/empty."""
    found = hash_answer_at(text) if isinstance(text, str) else None
    return None if found is None else found[1]


def hash_answer_at(text: str) -> tuple[int, str] | None:
    """(where its "####" starts, the answer) of `hash_answer`, or None. A markdown heading
    ("#### Verification", "#### Step 2: money", "#### 3. Check") is no answer line."""
    for match in reversed(list(_HASH_RE.finditer(text))):
        answer = _strip_emphasis(match.group(1))
        if answer and not _is_heading(match.group(1).strip(" \t*")):
            return match.start(), answer
    return None


def _is_heading(line: str) -> bool:
    """Whether a "####" line's text is a markdown heading: it starts with a word, or is numbered
    and does not end as a sentence ("3. Check", "2) Compute the total"; "72. That is the total."
    is the answer 72 in a sentence)."""
    return bool(_HEADING_RE.match(line) or (_NUMBERED_HEADING_RE.match(line) and not line.endswith(".")))


def _strip_emphasis(answer: str) -> str:
    """answer without surrounding blanks, markdown bold / italics and final periods ("**18**." -> "18")."""
    return answer.lstrip(" \t*").rstrip(" \t*.")


def answer_line(text: str) -> str | None:
    """The rest of the last line that starts with "Answer:" or "Final Answer:" (any case), without
    a final period or markdown bold, or the next non-blank line when that line ends at its colon
    and the next is a value ("Answer:\n42", "**Final Answer:**\n(2, 3)"; not "$$", "- 18",
    "Step 1: ..." or a sentence: `_is_value_line`); Minerva's "Final Answer: The final answer is X. I hope it is correct." gives X."""
    found = answer_line_at(text) if isinstance(text, str) else None
    return None if found is None else found[1]


def answer_line_at(text: str) -> tuple[int, str] | None:
    """(where its line starts, the answer) of `answer_line`, or None."""
    # the line below counts when it is a value ("$$", "\\[", "- 18", "Step 1: ...", an
    # explanation are no answer: an earlier box or line stands)
    matches = [m for m in _ANSWER_RE.finditer(text) if m.group(1) is not None or _is_value_line(m.group(2))]
    if not matches:
        return None
    answer = _minerva_answer(_strip_emphasis(matches[-1].group(1) or matches[-1].group(2)))
    return (matches[-1].start(), answer) if answer else None


# what starts a line that is no value: a display-math opener alone ("$$", "\\["), an environment
# that does not end on the line, a bullet, a rule, a heading, a numbered step
_NOT_A_VALUE_RE = re.compile(r"(?i)^(?:(?:\$\$|\\\[)\s*$|\\begin\{(?!.*\\end\{)|[-*+•][ \t]|-{3,}|#|step[ \t]*\d)")


def _is_value_line(line: str) -> bool:
    """Whether the line below an "Answer:" that ends at its colon is its value: anything but a
    display-math opener, an environment, a bullet, a rule, a heading, a numbered step or a sentence
    (`_is_prose`); "(2, 3)", "\\text{Evelyn}", "3\\sqrt{13}", "B" and one-line display math are."""
    value = line.strip()
    return bool(value) and not _NOT_A_VALUE_RE.match(value) and not _is_prose(_strip_emphasis(value))


def _minerva_answer(answer: str) -> str:
    """X of "The final answer is X. I hope it is correct." (Minerva's format), else answer."""
    start = _MINERVA_START_RE.match(answer)
    if start is None:
        return answer
    answer = answer[start.end():]
    if answer.lower().endswith(_MINERVA_END):
        answer = answer[: -len(_MINERVA_END)]
    return _strip_emphasis(answer)


def answer_sentence(text: str) -> str | None:
    """X of the last "The answer is X." / "the final answer is X": a number, a fraction (3/4) or
    inline math ($...$, \\(...\\)) right after the last such phrase (markdown bold around it
    allowed), or None (also when the last phrase is followed by something else: a retraction)."""
    phrases = list(_ANSWER_IS_RE.finditer(text)) if isinstance(text, str) else []
    value = _ANSWER_IS_VALUE_RE.match(text, phrases[-1].end()) if phrases else None
    answer = _strip_emphasis(value.group(1)) if value else ""
    return answer or None


def _after_think(text: str) -> str:
    """The part after the last </think> when it exists, else the whole text."""
    return text.rsplit(THINK_CLOSE, 1)[-1]


def extract_final_answer(text: str) -> str | None:
    """The final answer a math completion commits to: of the last non-empty \\boxed{}, the last
    "#### N" and the last "Answer: X" line, the one written last (a "Final Answer: 18" after a
    rechecked "\\boxed{20}" is 18; "Answer: \\boxed{18}" is the box), except that a box is
    not replaced by a line that restates it in prose ("Answer: Janet makes $18 every day", at
    least PROSE_WORDS words); a markdown heading ("#### Verification", "#### 3. Check") is no
    "####" answer (`hash_answer_at`); when there is none of the three, the number, fraction or inline math
    right after the last "The answer is" (`answer_sentence`, lm-eval's GSM8K chain-of-thought format). Looked for after the last
    </think> first, then in the whole text. Never raises."""
    if not isinstance(text, str):
        return None
    for scope in (_after_think(text), text):
        boxed, hashed, stated = last_boxed_at(scope), hash_answer_at(scope), answer_line_at(scope)
        if boxed is not None:  # a later line replaces it only when it states an answer
            hashed = hashed if hashed is not None and hashed[0] > boxed[0] else None
            stated = stated if stated is not None and stated[0] > boxed[0] and not _is_prose(stated[1]) else None
        lines = [at for at in (hashed, stated) if at is not None]
        found = lines + ([boxed] if boxed is not None else [])
        if found:
            return max(found, key=lambda at: at[0])[1]
        sentence = answer_sentence(scope)
        if sentence is not None:
            return sentence
    return None


PROSE_WORDS = 3  # words of two or more letters (not LaTeX commands) that make an answer line prose
_HEADING_RE = re.compile(r"[A-Za-z]{2,}")  # "#### Summary": a markdown heading, not a "####" answer
_NUMBERED_HEADING_RE = re.compile(r"\d{1,2}[.)][ \t]+[A-Za-z]{2,}")  # "#### 3. Check"


def _is_prose(answer: str) -> bool:
    """Whether an answer line is a sentence rather than an answer ("Janet makes $18 every day")."""
    return len(_WORD_RE.findall(answer)) >= PROSE_WORDS


def _letter_in(candidate: str, letters: str) -> str | None:
    """candidate as a bare choice letter ("C", "(C)", "\\text{C}", "C.") if it is one, else None."""
    text = candidate.strip().strip("$*").strip()
    wrapped = _TEXT_WRAPPER_RE.match(text)
    if wrapped:
        text = wrapped.group(1).strip()
    match = _LONE_LETTER_RE.match(text)
    return match.group(1) if match and match.group(1) in letters else None


def extract_choice(text: str, letters: str = CHOICE_LETTERS) -> str | None:
    """The choice letter a multiple-choice completion commits to, or None. In order: the last
    "ANSWER: X" / "答案：X", the last \\boxed{X}, a last non-empty line that is only a letter.
    Looked for after the last </think> first. Letters outside `letters` are ignored."""
    if not isinstance(text, str):
        return None
    for scope in (_after_think(text), text):
        found = [m for m in _CHOICE_ANSWER_RE.finditer(scope)
                 if m.group("letter").isupper() or m.group("colon")]  # "ANSWER: b", not "answer is a."
        final_line = max((m.start() for m in found if m.group("colon") and m.group().lower().startswith("answer")),
                         default=len(scope))  # the requested "ANSWER: X" line
        stated = [unicodedata.normalize("NFKC", m.group("letter")).upper() for m in found
                  if not (m.group("revision") and m.start() > final_line)]  # a remark after the final line
        stated = [letter for letter in stated if letter in letters]
        if stated:
            return stated[-1]
        boxed = last_boxed(scope)
        if boxed is not None and _letter_in(boxed, letters):
            return _letter_in(boxed, letters)
        lines = [line for line in scope.splitlines() if line.strip()]
        if lines and _letter_in(lines[-1], letters):
            return _letter_in(lines[-1], letters)
    return None


# ---------------------------------------------------------------------------------------------
# Equivalence: fast path

_GROUPED_INT_RE = re.compile(r"^[-+]?[1-9]\d{0,2}(?:[, ]\d{3})+(?:\.\d+)?$")  # "1,000", "1\,000" (-> "1 000"); not "0,125"
_DECIMAL_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?$")  # "1e3" too (an exponent of 3 digits at most)
_FRACTION_RE = re.compile(r"^[-+]?\d+\s*/\s*\d+$")
_LATEX_FRACTION_RE = re.compile(r"^([-+]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
# One pass over the spacing commands: \left( -> (, not \rightarrow; \! and the blanks after it go
# ("11,\! 111" -> "11,111"); \, \; \: "\ " -> a space; a LaTeX row break "\\" is kept whole (its
# second backslash is not the start of "\ " or "\left").
_SPACING_RE = re.compile(r"\\\\|\\(?:left|right)(?![A-Za-z])|\\![ \t]*|\\[,;: ]|~")
_PERCENT_RE = re.compile(r"\s*(?:\\?%|percent)$")
_UNIT_WORDS_RE = re.compile(r"(?:\s+[A-Za-z]+)+$")  # " apples", " square feet"
# A unit after a number: words of two letters or more ("18 eggs"; not "2 x": a letter may be a
# variable), "a" / "an" / "per" before one ("$18 a day"), abbreviations ("18 sq. ft."), a square
# or cube ("18 cm^2", "18 ft²"), a rate ("18 km/h", "$18/day"), a unit in \text{} ("18 \text{ dollars}",
# words only: "18 \text{ (or 20)}" is a hedge, not a unit)
# (a square or cube on a length unit only: "2 xy^2" is algebra; "2/ab" too: a rate's word has 3 letters
# or more, or is a unit's abbreviation: "$18/hr", "18/mo")
_LENGTH_UNITS = r"(?:[cdkm]?m|ft|in|yd|mi|inch(?:es)?|f(?:oo|ee)t|(?:centi|milli|kilo)?met(?:er|re)s?|miles?|yards?|units?)\.?"
_RATE_WORD = r"(?:[A-Za-z]{3,}|hr|mo|yr|wk|kg|lb|oz|ft|km|mi|cm|mm|ml|[hsgml])\.?"
_SQUARED = rf"(?:\s+{_LENGTH_UNITS}|\s*\\(?:text|mbox|mathrm)\{{\s*{_LENGTH_UNITS}\s*\}})(?:\^\{{?[23]\}}?|[²³])"
_UNIT_WORD = (rf"(?:{_SQUARED}|\s+(?:(?:a|an|per)\s+)?[A-Za-z]{{2,}}\.?|\s*\\(?:text|mbox|mathrm)\{{\s*[A-Za-z][A-Za-z .]*\}})"
              r"(?:/[A-Za-z]+\.?)?")
_BARE_UNIT_WORDS_RE = re.compile(rf"(?:\s*/\s*{_RATE_WORD}|{_UNIT_WORD})+$")
_CURRENCY_SIGNS = ("\\$", "$", "€", "£", "\\euro", "\\pounds")
# Words after a number that change its value, so never a unit to drop: "2 thousand", "2 pi" (a
# magnitude or a constant), "18 or more", "at least 18" (a bound) go to math_verify instead. A
# count's own unit stays one: "7 dozen" answers "how many dozens", "3 more hours" "how many more".
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word, not a LaTeX command's name
VALUE_WORDS = frozenset("pi hundred hundreds thousand thousands million millions billion billions "
                        "trillion trillions".split())
# "1.45 million", "2 \text{ thousand}": a number times its magnitude word (parse_number reads its value)
_MAGNITUDES = {"hundred": 10**2, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_MAGNITUDE_RE = re.compile(r"(?i)^(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*(?:\\text\{\s*)?"
                           r"(?P<word>hundred|thousand|million|billion|trillion|squared|cubed)s?\s*\}?$")
_POWERS = {"squared": 2, "cubed": 3}  # "18 squared" is 324; "18 units squared" is an area of 18
# "6 and a half hours", "2 and a quarter": a whole number and its part (\text{} groups opened first)
_MIXED_RE = re.compile(r"(?i)^(?P<whole>[-+]?\d+)\s+and\s+(?:a|one)[\s-]+(?P<part>half|quarter)(?:\s+[A-Za-z]+)*$")
_PARTS = {"half": Fraction(1, 2), "quarter": Fraction(1, 4)}
# a number, words, another number: a compound quantity ("1 hour 30 minutes", "3 feet 4 inches"), no
# plain number (math_verify read its first); "10 cm^2" is none (an exponent is not a second number),
# nor a restatement in brackets ("90 minutes (1 hour 30 minutes)": those are left out first)
_COMPOUND_RE = re.compile(r"\d\s+(?:[A-Za-z]{2,}\s+)+[-+]?\d")
_BRACKETED_RE = re.compile(r"\([^()]*\)")
# two numbers joined by "and" / "or": a compound or hedged answer, one plain number only when
# every part has its value (`_joined_value`)
_TWO_NUMBERS_RE = re.compile(r"\d[^\d]{0,40}?\b(?:and|or)\b[^\d]{0,40}?\d")
_JOINER_SPLIT_RE = re.compile(r"\b(?:and|or)\b")
_TEXT_GROUP_RE = re.compile(r"\\text\{([^{}]*)\}")  # "\text{ or }" -> " or "
_BOUND_RE = re.compile(r"(?i)\b(?:or\s+(?:more|less|fewer|greater|higher|lower|so)|at\s+(?:least|most)|"
                       r"(?:more|less|fewer|greater)\s+than|up\s+to)\b")


def normalize_text(answer: str) -> str:
    """Light, meaning-preserving cleanup: surrounding $ and spaces, a trailing period, \\left /
    \\right, thin spaces, and inner whitespace runs."""
    text = answer.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    text = text.rstrip(".").strip()
    text = _SPACING_RE.sub(_respace, text)
    return " ".join(text.split())


def _respace(match: re.Match[str]) -> str:
    """What a _SPACING_RE match becomes: a row break stays, a thin space is a space, the rest goes."""
    token = match.group()
    if token == "\\\\":
        return token
    return " " if token == "~" or token[1] in ",;: " else ""


def parse_number(answer: str) -> Fraction | None:
    """answer as an exact number when it is a plain one ("42", "-3.5", "1,234", "1{,}234", "1\\,234",
    "$18", "\\$18.50", "1/2", "\\frac{1}{2}", "25\\%", "25 percent", "\\text{18 apples}", "1.45 million"),
    else None (other units and expressions go to math_verify). A number right before "squared" /
    "cubed" is raised to it ("18 squared" is 324), after a unit it is the unit's ("18 units squared").

    A trailing percent sign is dropped ("25\\%" reads as 25, not 0.25): GSM8K and MATH references
    write a percentage without it, and math_verify alone would judge "25\\%" != "25"."""
    text = normalize_text(answer)
    if len(text) > 4 * _MAX_NUMBER_CHARS:  # no plain number, however dressed (bounds the regexes below)
        return None
    for sign in _CURRENCY_SIGNS:
        text = text.replace(sign, "")
    text = text.replace("{,}", ",").strip()
    wrapped = _TEXT_WRAPPER_RE.match(text)
    magnitude = _MAGNITUDE_RE.match(wrapped.group(1).strip() if wrapped else text)  # before a unit word is dropped
    mixed = _MIXED_RE.match(_text_opened(text).strip())
    if mixed and not _value_words(text) and "dozen" not in text.lower():  # "2 and a half million" is no 2.5
        sign = -1 if mixed.group("whole").startswith("-") else 1
        return int(mixed.group("whole")) + sign * _PARTS[mixed.group("part").lower()]
    if magnitude:
        number, word = Fraction(magnitude.group("number").replace(",", "")), magnitude.group("word").lower()
        return number ** _POWERS[word] if word in _POWERS else number * _MAGNITUDES[word]
    if wrapped:  # "\text{18 apples}": words in \text{} after a number are its unit
        text = _without_unit(wrapped.group(1), _UNIT_WORDS_RE)
    else:  # "18 eggs", "#### 1,234 dollars": math_verify read the words as a product of letters
        text = _without_unit(text, _BARE_UNIT_WORDS_RE)
    # "90°", "90^\circ" are 90 (math_verify: "90°" no match; "x = 58,500": a comma list)
    text = _ASSIGNMENT_RE.sub("", _DEGREES_RE.sub("", _PERCENT_RE.sub("", text)).strip())
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _GROUPED_INT_RE.match(text):
        text = text.replace(",", "").replace(" ", "")
    try:
        if _DECIMAL_RE.match(text):
            return Fraction(text)
        if _FRACTION_RE.match(text):
            numerator, denominator = (part.strip() for part in text.split("/"))
            return Fraction(int(numerator), int(denominator)) if int(denominator) else None
        latex = _LATEX_FRACTION_RE.match(text)
        if latex and int(latex.group(3)):
            sign = -1 if latex.group(1) == "-" else 1
            return sign * Fraction(int(latex.group(2)), int(latex.group(3)))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _without_unit(text: str, unit_words: re.Pattern[str]) -> str:
    """text without the words after its number, unless they change its value (`_value_words`)."""
    unit = unit_words.search(text)
    if unit is None or _value_words(text):
        return text.strip()
    return text[: unit.start()].strip()


def _text_opened(text: str) -> str:
    """text with its \\text{...} groups opened ("6\\text{ and a half}" -> "6  and a half ")."""
    return _TEXT_GROUP_RE.sub(r" \1 ", text)


def canonical_answer(answer: str) -> str:
    """The form majority votes compare: a plain number as its exact value, in decimals where they
    end ("18", "18.00", "$18" -> "18"; "0.5", "\\frac{1}{2}", "\\frac12" -> "0.5"; "1/3" -> "1/3"),
    anything else in one notation (`notation_form`: "\\dfrac{\\sqrt3}{2}" and
    "\\frac{\\sqrt{3}}{2}" are one vote, "90^\\circ" and "90", "x=5" and "5", "\\text{(C)}" and
    "C"). Answers of one form grade alike (`fast_match`); answers equal only symbolically
    ("\\frac{\\sqrt{2}}{2}" vs "\\frac{1}{\\sqrt{2}}") keep their own forms."""
    number = parse_number(answer)
    if number is not None:
        return exact_text(number)
    form = notation_form(answer)
    # a comma in the form is a list's ("1, 100" -> "1,100"), not a thousands comma: those were read above
    number = parse_number(form) if "," not in form else None
    return form if number is None else exact_text(number)


_FRACTION_VARIANT_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SHORT_ARGUMENT_RE = re.compile(r"\\(frac|sqrt)\s*([0-9A-Za-z])(?:\s*([0-9A-Za-z]))?")  # \frac12, \sqrt3, \frac 59
_DEGREES_RE = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)$")
_ASSIGNMENT_RE = re.compile(r"^([A-Za-z])\s*=\s*(?=\S)")  # "x = 5": the value (group 1: the variable)
_CHOICE_RE = re.compile(r"^(?:\\text(?:bf)?\{\s*)?\(?([A-Z])\)?(?:\s*\})?$")  # "\text{(C)}", "(C)": "C"
_SPACE_RE = re.compile(r"(?<![0-9A-Za-z])\s+|\s+(?![0-9A-Za-z])")  # spaces not between two word characters


def notation_form(answer: str) -> str:
    """answer written one way where LaTeX offers several for the same thing (for majority votes;
    grading compares meanings itself): \\dfrac / \\tfrac as \\frac, one-character arguments of
    \\frac and \\sqrt braced, no trailing degree sign, no leading "x =", a lone choice letter bare,
    no spaces but between two word characters."""
    text = normalize_text(answer)
    text = _FRACTION_VARIANT_RE.sub(r"\\frac", text)
    text = _SHORT_ARGUMENT_RE.sub(_braced_arguments, text)
    text = _DEGREES_RE.sub("", text).strip()
    text = _ASSIGNMENT_RE.sub("", text)
    choice = _CHOICE_RE.match(text)
    if choice:
        return choice.group(1)
    return _SPACE_RE.sub("", text)


def _braced_arguments(match: re.Match[str]) -> str:
    """\\frac12 -> \\frac{1}{2}; \\sqrt3 -> \\sqrt{3} (a second character after \\sqrt is not its argument)."""
    command, first, second = match.groups()
    if command == "sqrt":
        return f"\\sqrt{{{first}}}" + (second or "")
    return f"\\frac{{{first}}}" + (f"{{{second}}}" if second else "")


def exact_text(number: Fraction) -> str:
    """number as a terminating decimal when it is one ("-3.5", "1234"), else "p/q"."""
    denominator, twos, fives = number.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return f"{number.numerator}/{number.denominator}"
    places = max(twos, fives)
    scaled = abs(number.numerator) * 10**places // number.denominator
    sign = "-" if number < 0 else ""
    whole, part = divmod(scaled, 10**places) if places else (scaled, 0)
    return f"{sign}{whole}" if not places else f"{sign}{whole}.{part:0{places}d}"


def fast_match(predicted: str, reference: str) -> bool | None:
    """True/False when the answers can be decided without a symbolic check (equal normalised text;
    two plain numbers), else None."""
    if normalize_text(predicted) == normalize_text(reference):
        return True
    bases = [_BASE_NUMBER_RE.match(normalize_text(answer).strip("$ ")) for answer in (predicted, reference)]
    if bases[0] is not None and bases[1] is not None:  # "52_8" vs "52_9": math_verify drops the subscript
        (digits, base), (reference_digits, reference_base) = bases[0].groups(), bases[1].groups()
        return digits.lstrip("0").upper() == reference_digits.lstrip("0").upper() and int(base) == int(reference_base)
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:  # "1.45 million" is 1450000
        return predicted_number == reference_number and _same_variable(predicted, reference)
    if not _value_words(predicted) <= _value_words(reference):  # "18 \text{ or more}" is not 18
        return False
    if reference_number is not None and _TWO_NUMBERS_RE.search(normalize_text(predicted)):
        # "3 \text{ hours and } 20 \text{ minutes}", "18 (or 20)": math_verify read the first number
        values = _joined_values(predicted)
        if len(values - {None}) > 1:
            return False
        if None not in values:
            return values.pop() == reference_number
    if reference_number is not None and _COMPOUND_RE.search(_BRACKETED_RE.sub(" ", _text_opened(normalize_text(predicted)))):
        return False
    return None


# a number in a base, as MATH writes one: "52_8", "4210_{5}", "A1_{16}" (group 1: digits, 2: base)
_BASE_NUMBER_RE = re.compile(r"^([0-9A-Z]+)_\{?(\d{1,2})\}?$")


def _joined_values(answer: str) -> set[Fraction | None]:
    """The values of the parts of an answer that joins numbers with "and" / "or" (None for a part
    that is no plain number): one value for "\\frac{3}{4} \\text{ or } 0.75", two for "3 hours and
    20 minutes" or "18 (or 20)"; a part such as 2^{10} leaves the comparison to math_verify."""
    text = _text_opened(normalize_text(answer))
    return {parse_number(part.strip(" ()[],;")) for part in _JOINER_SPLIT_RE.split(text)}


def _value_words(answer: str) -> set[str]:
    """The VALUE_WORDS written as words in answer (not LaTeX commands: "\\pi" is no word) and
    its bound phrases ("or more", "at least"), lower-cased."""
    words = VALUE_WORDS.intersection(word.lower() for word in _WORD_RE.findall(answer))
    return words | {" ".join(bound.group().lower().split()) for bound in _BOUND_RE.finditer(answer)}


def _same_variable(predicted: str, reference: str) -> bool:
    """False only when both answers assign their value to a variable, and not the same one
    ("y = 5" is not "x = 5"; "x = 5" is "5")."""
    assigned = [_ASSIGNMENT_RE.match(normalize_text(answer).strip("$ ")) for answer in (predicted, reference)]
    return None in assigned or assigned[0].group(1) == assigned[1].group(1)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Equivalence: math_verify with a time limit


def _as_boxed(answer: str) -> str:
    """An extracted answer in the form math_verify reads most reliably."""
    return "\\boxed{" + normalize_text(answer) + "}"


def symbolic_match(predicted: str, reference: str, timeout_s: int | None) -> bool:
    """math_verify's judgement; timeout_s None disables its SIGALRM limits (caller bounds time)."""
    from math_verify import parse, verify

    gold = parse(_as_boxed(reference), parsing_timeout=timeout_s)
    guess = parse(_as_boxed(predicted), parsing_timeout=timeout_s)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=timeout_s))


def serve_stdio() -> None:
    """Helper-process loop: read JSON [predicted, reference] lines on stdin, write "true"/"false"
    lines on stdout, until stdin closes. Started by _HelperProcessVerifier, not by users."""
    import math_verify  # noqa: F401  (import before "ready", so the parent's clock is fair)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            predicted, reference = json.loads(line)
            equal = symbolic_match(predicted, reference, timeout_s=None)
        except Exception:  # a grader must never crash; the parent reads this as "not equal"
            equal = False
        print("true" if equal else "false", flush=True)


class _HelperProcessVerifier:
    """math_verify in one long-lived helper process, for threads where SIGALRM is unavailable.
    A comparison that overruns its limit kills the process; the next call starts a fresh one.

    A plain subprocess rather than multiprocessing: spawn and forkserver re-run the user's main
    script in the child, and fork is unsafe in a threaded process."""

    START_TIMEOUT_S = 120.0  # importing sympy in a fresh interpreter on a busy machine

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def _read_line(self, timeout_s: float) -> str | None:
        """The helper's next output line, or None when none comes within timeout_s."""
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        return self._process.stdout.readline().strip() if ready else None

    def _start(self) -> bool:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from experiments.tasks.grading import serve_stdio; serve_stdio()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, env=env,
        )
        if self._read_line(self.START_TIMEOUT_S) == "ready":
            return True
        self._stop()
        return False

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None

    def close(self) -> None:
        """Stop the helper process (if any)."""
        with self._lock:
            self._stop()

    def check(self, predicted: str, reference: str, timeout_s: float) -> bool:
        with self._lock:
            try:
                if (self._process is None or self._process.poll() is not None) and not self._start():
                    return False
                assert self._process is not None and self._process.stdin is not None
                self._process.stdin.write(json.dumps([predicted, reference]) + "\n")
                self._process.stdin.flush()
                reply = self._read_line(timeout_s)
                if reply in ("true", "false"):
                    return reply == "true"
                logger.warning("math_verify overran %.1f s on %r vs %r", timeout_s, predicted[:80], reference[:80])
            except (OSError, ValueError):  # the helper died or its pipe broke: start over next time
                pass
            self._stop()
            return False


_HELPER = _HelperProcessVerifier()
atexit.register(_HELPER.close)  # never leave the helper process behind


def answers_match(predicted: str | None, reference: str | None, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True iff the predicted final answer equals the reference: fast exact/numeric path, then
    math_verify with at most `timeout_s` seconds per parse and per comparison (in a non-main
    thread: `3 * timeout_s` for the whole check in a helper process). Never raises."""
    try:
        if not isinstance(predicted, str) or not isinstance(reference, str):
            return False
        if not predicted.strip() or not reference.strip():
            return False
        decided = fast_match(predicted, reference)
        if decided is not None:
            return decided
        if len(predicted) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
            return False
        if threading.current_thread() is threading.main_thread():
            return symbolic_match(predicted, reference, timeout_s=max(1, int(timeout_s)))
        return _HELPER.check(predicted, reference, timeout_s=3.0 * max(1, int(timeout_s)))
    except Exception:  # a grader must never crash a search run
        return False


def grade_math(completion_text: str, reference: str | None, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True iff the completion's final answer (extract_final_answer) equals the reference."""
    return answers_match(extract_final_answer(completion_text), reference, timeout_s=timeout_s)


def grade_choice(completion_text: str, reference: str | None, letters: str = CHOICE_LETTERS) -> bool:
    """True iff the completion's chosen letter (extract_choice) is the reference letter."""
    if not isinstance(reference, str) or reference.strip() not in letters:
        return False
    return extract_choice(completion_text, letters) == reference.strip()


# ---------------------------------------------------------------------------------------------
# Grading modes: this module's lenient reading, or the reference's (MetaStone-S1's compute_metric.py)

LENIENT, REFERENCE = "lenient", "reference"
GRADING_MODES: tuple[str, ...] = (LENIENT, REFERENCE)
# The words after which the reference's match_answer takes the answer, in the order it cuts at them.
_REFERENCE_MARKERS = ("be ", "is ", "are ", "=", ": ", "get ", "be\n", "is\n", "are\n", ":\n", "get\n")
# The reference's C-Eval letter: the FIRST "答案: X" / "answer: X" (any case), upper-cased.
_REFERENCE_CHOICE_RE = re.compile(r"(?i)(?:答案|answer)\s*[:：]\s*([A-Da-d])\.?")


def check_grading(owner: str, value: object) -> None:
    """ValueError naming task.config.grading and the valid modes unless value is one of them."""
    if not isinstance(value, str) or value not in GRADING_MODES:
        raise ValueError(f"task.config.grading={value!r} ({owner}.grading); valid: lenient (this module's reading: "
                         "a box, '####', 'Answer:', 'The answer is'; a choice anywhere it is stated), reference "
                         "(MetaStone-S1's: the last box, else the text after 'is ' / '=' / ': '; the first 'ANSWER: X')")


def grading_mode(meta: Mapping[str, object]) -> str:
    """The grading mode a problem's meta records ("grading"); lenient when it records none (records
    and Problems made before the setting existed). ValueError for an unknown mode."""
    mode = meta.get("grading", LENIENT)
    check_grading("Problem.meta", mode)
    return str(mode)


def reference_box(text: str) -> str | None:
    """What the reference reads as the last box: from the last "\\boxed" (or, with none, the last
    "\\fbox"), the text inside the first brace pair after it, stripped; None when there is none or
    it never closes. Unlike `last_boxed`, one box only, and an empty one is read as empty."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return None
    depth, opened = 0, None
    for at in range(start, len(text)):
        if text[at] == "{":
            depth += 1
            opened = at if opened is None else opened
        elif text[at] == "}":
            depth -= 1
            if depth == 0 and opened is not None:
                return text[opened + 1:at].strip()
    return None


def reference_math_answer(text: str) -> str:
    """The answer MetaStone-S1's grader (prime_math's match_answer) reads from `text`: the last box's
    contents when it is non-empty, else the whole text; then cut before the last ". ", then after the
    last of each marker in turn ("be ", "is ", "are ", "=", ": ", "get ", and the first four and
    "get" before a newline). No box needed: "So the answer is 204. Let me check." reads "204"
(a text whose last ". " comes before its answer is read there instead)."""
    answer = reference_box(text) or text
    cut = answer.lower().rfind(". ")
    if cut != -1:
        answer = answer[:cut].strip()
    for marker in _REFERENCE_MARKERS:
        at = answer.lower().rfind(marker)
        if at != -1:
            answer = answer[at + len(marker):].strip()
    return answer


def grade_math_reference(completion_text: str, reference: str | None, prompt: str = "",
                         timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """The reference's rule (compute_metric.get_res on AIME): the answer `reference_math_answer`
    reads from prompt + completion (the reference grades the question and the output together, so
    a completion without ". " or a marker is read back into the prompt) equals the reference
    (`answers_match`, with its time limits, standing in for prime_math's grade_answer / math_equal).
    The reference's "\\box" term only gates its second comparison and is met by every benchmark
    prompt's boxed instruction, so it refuses nothing here."""
    if not isinstance(completion_text, str) or not isinstance(prompt, str):
        return False
    return answers_match(reference_math_answer(prompt + completion_text), reference, timeout_s=timeout_s)


def extract_choice_reference(text: str) -> str | None:
    """The reference's C-Eval letter: the first "答案: X" / "answer: X" (any case, a full- or
    half-width colon, A-D), upper-cased; None when there is none. Nothing else counts (no box, no
    "故选C", no lone letter line) and a later answer does not replace the first."""
    found = _REFERENCE_CHOICE_RE.search(text) if isinstance(text, str) else None
    return None if found is None else found.group(1).upper()


def grade_choice_reference(completion_text: str, reference: str | None) -> bool:
    """True iff the reference's letter (`extract_choice_reference`) is the reference letter."""
    if not isinstance(reference, str) or reference.strip() not in CHOICE_LETTERS:
        return False
    return extract_choice_reference(completion_text) == reference.strip()
