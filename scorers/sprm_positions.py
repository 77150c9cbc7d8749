"""Where the SPRM head reads a sequence, and how its readings become one score per step.

The reference (MetaStone-S1 / XBai-o4) scores a step at the token just BEFORE the step's
separator: the hidden state that chose the separator. A separator counts when
  - it is the first of a run of separators (the rest of the run are not steps),
  - it does not directly follow `<think>`,
  - it lies inside `<think> ... </think>`,
  - (here) it lies in the completion, i.e. at or after `start` (the prompt's length), as the
    reference's training mask (separators of the response only).

Usage:
    markers = StepMarkers.from_tokenizer(tokenizer, vocab_size, StepFormat())
    positions = score_positions(prompt_ids + completion_ids, markers, start=len(prompt_ids))
    features = out.hidden_states[-2][0, positions]           # [K, C] -> head -> sigmoid

Think span, token by token (the same state machine as `policies.step_stops.StepStopRule`, which
ends the policy's steps, so the head scores exactly where the policy ends a step): a token is
inside the span when the latest think tag before it is `<think>`. For a well-formed trace (one
`<think>`, in the prompt or the completion, and at most one `</think>` after it) this is the
reference's span. Deviation on malformed traces: with no `<think>` at all the reference scores
from position 0 and we score nothing (our policy ends no step there either); with several tags
the reference takes the first `<think>` to the last `</think>` (training) or the whole sequence
(its score service), we follow the tags as they come. A tokenizer without single-token think
markers makes every separator count (as the policy's rule).

Feature layer: the reference reads `hidden_states[-2]` of a transformers forward with
`output_hidden_states=True`, i.e. the output of the second-to-last decoder layer, before the
final norm (`hidden_states[-1]` is after the final norm, `hidden_states[0]` the embeddings). It is
a setting of `policies.reflective_model.ReflectiveModel(feature_layer=...)`, default -2.

Step scores (`step_score`): a step scores the head's reading at its own scored position (the
geometric mean when it holds several, e.g. one whole-sequence "step" of
`propose(stop_at_step=False)`); a step with no scored position of its own (in practice the
terminal step, "</think>Answer: ..." with no separator) scores the geometric mean of the path's
earlier step scores, and 0.0 when it has none (the reference scores a path with no separator 0).
Why: the geometric mean over steps then equals the reference's path score (the geometric mean
over separator positions only) for every rollout with a scored separator, since appending the
mean G of a list to it leaves its geometric mean G; a rollout with none has step scores (0.0,),
whose geometric mean is the 1e-10 clamp (`treesearch.aggregation`), where the reference gives 0. A plain "reuse the last separator's score" would count the last
step twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from policies.step_stops import separator_mask, think_ids
from treesearch.aggregation import geometric_mean
from treesearch.steps import StepFormat


@dataclass(frozen=True)
class StepMarkers:
    """The token ids that delimit steps.

    separator_ids: every id that counts as a step separator.
    think_open_id, think_close_id: the think markers, both None when the tokenizer lacks either
        (then separators count everywhere).
    """

    separator_ids: frozenset[int]
    think_open_id: int | None = None
    think_close_id: int | None = None

    def __post_init__(self) -> None:
        if (self.think_open_id is None) != (self.think_close_id is None):
            raise ValueError(
                f"think_open_id={self.think_open_id!r} and think_close_id={self.think_close_id!r}: "
                "give both or neither"
            )
        if self.think_open_id is not None and self.think_open_id in self.separator_ids:
            raise ValueError(f"think_open_id={self.think_open_id} is also a separator id")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, fmt: StepFormat = StepFormat()) -> "StepMarkers":
        """The policy's markers: separators are the tokens of `policies.step_stops.separator_mask`
        under fmt.separator_match. With "exact" (the Qwen presets) that is the reference's id of
        tokenizer.encode('.\\n\\n') (382 in Qwen's vocabulary); with "suffix" every token whose
        text ends with fmt.separator (~30 in a Qwen vocabulary: ').\\n\\n', '...\\n\\n', ...;
        in the tiny vocabulary the single token of '.\\n\\n')."""
        ids = separator_mask(tokenizer, vocab_size, fmt.separator, fmt.separator_match).nonzero().squeeze(-1).tolist()
        open_id, close_id = think_ids(tokenizer, fmt.think_open, fmt.think_close)
        return cls(frozenset(int(i) for i in ids), open_id, close_id)


def separator_positions(token_ids: Sequence[int], markers: StepMarkers, start: int = 0) -> list[int]:
    """Positions (indices into token_ids) of the separators that end a step, at or after start."""
    think_aware = markers.think_open_id is not None
    inside, after_separator_or_open = not think_aware, False
    found = []
    for i, token in enumerate(token_ids):
        is_separator = token in markers.separator_ids
        if is_separator and inside and not after_separator_or_open and i >= start:
            found.append(i)
        is_open = think_aware and token == markers.think_open_id
        if think_aware:
            inside = (inside or is_open) and token != markers.think_close_id
        after_separator_or_open = is_separator or is_open
    return found


def score_positions(token_ids: Sequence[int], markers: StepMarkers, start: int = 0) -> list[int]:
    """Positions whose hidden state the head reads: the token just before each separator of
    `separator_positions` (a separator at position 0 has no such token and is skipped)."""
    return [p - 1 for p in separator_positions(token_ids, markers, start) if p >= 1]


def step_of_positions(separators: Sequence[int], step_lengths: Sequence[int], start: int) -> list[int]:
    """Index of the step that holds each separator position, the steps laid out from `start`
    with the given token counts. E.g. start 3, steps [2, 3]: positions 4 -> 0, 5 -> 1, 7 -> 1."""
    bounds, end = [], start
    for length in step_lengths:
        end += length
        bounds.append(end)
    out, k = [], 0
    for position in separators:
        if position < start:
            raise ValueError(f"separator position {position} lies before the completion start {start}")
        while k < len(bounds) and position >= bounds[k]:
            k += 1
        if k == len(bounds):
            raise ValueError(f"separator position {position} lies beyond the last step (end {end})")
        out.append(k)
    return out


def step_score(own: Sequence[float], previous: Sequence[float | None]) -> float | None:
    """One step's score (module docstring): its own readings, else the geometric mean of the
    path's earlier step scores (None if any of them is None, 0.0 if there are none)."""
    if len(own) == 1:
        return float(own[0])
    if own:
        return geometric_mean(own)
    if any(score is None for score in previous):
        return None
    return geometric_mean(previous) if previous else 0.0  # type: ignore[arg-type]


def path_step_scores(
    readings: Sequence[Sequence[float]], previous: Sequence[float | None] = ()
) -> list[float | None]:
    """Step scores of consecutive steps from each step's own readings, after `previous` scores."""
    scores: list[float | None] = []
    for own in readings:
        scores.append(step_score(own, [*previous, *scores]))
    return scores
