"""Splitting a solution text into reasoning steps.

A step ends with the separator (default ".\\n\\n", kept in the step). Only separators inside the
think span count: the span starts after `<think>` (or at the start of the text when the text has
no `<think>` before its first `</think>`, because the prompt opened it) and ends at `</think>` (or
the end of the text). As in the reference, only the first separator of a run ends a step (the rest
stay attached to it), and a separator right after `<think>` does not end a step. Text before the
span joins the first step; `</think>` and everything after it is the last step. Joining the steps
gives the text back.

The policies and the SPRM apply the same rule to tokens, prompt included, following the tags in
order (`scorers.sprm_positions.separator_positions`). A text alone cannot tell a prompt's
`<think>` from a stray one a completion wrote after a step ("3.\\n\\n<think>4.\\n\\n"): here the
first one opens the span, so the step before it joins the first step, where the policy, which
saw its prompt open the span, ended a step there.

    >>> split_steps("<think>1 + 2 = 3.\\n\\n3 * 2 = 6.\\n\\n</think>Answer: 6")
    ['<think>1 + 2 = 3.\\n\\n', '3 * 2 = 6.\\n\\n', '</think>Answer: 6']
"""
from __future__ import annotations

from dataclasses import dataclass


# How a token counts as a separator (`policies.step_stops.separator_mask`): "suffix", its decoded
# text ends with the separator (a Qwen vocabulary holds ~30 such tokens for '.\n\n': ').\n\n',
# '...\n\n', ...); "exact", its text is the separator alone (the MetaStone-S1 reference's rule:
# the id of tokenizer.encode('.\n\n'), 382 in Qwen's vocabulary).
SEPARATOR_MATCHES: tuple[str, ...] = ("suffix", "exact")


def check_separator_match(value: object, owner: str) -> None:
    """ValueError naming owner unless value is one of SEPARATOR_MATCHES."""
    if not isinstance(value, str) or value not in SEPARATOR_MATCHES:
        raise ValueError(f"{owner}={value!r} must be one of {', '.join(SEPARATOR_MATCHES)}")


@dataclass(frozen=True)
class StepFormat:
    """separator: ends a step; think_open / think_close: the think span markers ("" for none);
    separator_match: which tokens count as the separator (SEPARATOR_MATCHES), read by the token
    rules only: the text split here finds the separator's text wherever it is."""

    separator: str = ".\n\n"
    think_open: str = "<think>"
    think_close: str = "</think>"
    separator_match: str = "suffix"

    def __post_init__(self) -> None:
        if not self.separator:
            raise ValueError(f"StepFormat.separator={self.separator!r} must be a non-empty string")
        check_separator_match(self.separator_match, "StepFormat.separator_match")


def think_span(text: str, fmt: StepFormat = StepFormat()) -> tuple[int, int]:
    """[start, end) character span in which separators end steps (a `<think>` after the first
    `</think>` opens nothing: "...</think>Answer: 3<think>" was one step)."""
    start = 0
    first_close = text.find(fmt.think_close) if fmt.think_close else -1
    opener = text.find(fmt.think_open) if fmt.think_open else -1
    if opener >= 0 and (first_close < 0 or opener < first_close):
        start = opener + len(fmt.think_open)
    end = len(text)
    if fmt.think_close:
        close = text.find(fmt.think_close, start)
        if close >= 0:
            end = close
    return start, end


def step_end_offsets(text: str, fmt: StepFormat = StepFormat()) -> list[int]:
    """Character offsets just after each separator that ends a step."""
    start, end = think_span(text, fmt)
    sep = fmt.separator
    ends: list[int] = []
    pos = start
    while True:
        hit = text.find(sep, pos, end)
        if hit < 0:
            return ends
        stop = hit + len(sep)
        while text.startswith(sep, stop) and stop + len(sep) <= end:  # swallow a run
            stop += len(sep)
        if hit != start:  # a separator right after <think> is not a step
            ends.append(stop)
        pos = stop


def split_steps(text: str, fmt: StepFormat = StepFormat()) -> list[str]:
    """The steps of text (see the module docstring); [] for an empty text."""
    cuts = [0] + step_end_offsets(text, fmt) + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
