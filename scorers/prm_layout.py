"""`PRMLayout`: a path as an external PRM reads it, token ids and the positions its steps are read
at, and `PRMReading`, what the PRM read there, shared by the external PRM's scorers (transformers
`scorers.lm_prm_scorer`, vLLM `scorers.vllm_lm_prm_scorer`, a server `scorers.served_prm_scorer`),
so all read the same tokens at the same places.

    layout = PRMLayout(resolve_prm_format("math_shepherd"), tokenizer, good_id, context_window=4096)
    ids, positions = layout.sequences(paths)[0]     # ([], []) for a path without steps
    layout.check_window(paths, layout.sequences(paths))   # ValueError naming a path too long
    work = whole_paths(sequences)                     # each distinct path with steps once
    readings_of(sequences, work, scores)              # a PRMReading per asked path

The text comes from `scorers.prm_format.prm_text`; it is tokenised whole, once (as the PRMs' own
code does), and each reading's character offset is mapped to its token through the tokenizer's
offset mapping: tag layouts read at the tag's last token, the chat layout at the token before the
step's answer (whose logits predict it). The layouts of the paths asked for lately are kept
(`LAID_OUT_KEPT` paths, `LAID_OUT_TOKENS` tokens): a scorer asks for a path's layout for its score, its cost and its children's
parent lookups, and a chat layout renders the template once per step.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from scorers.prm_format import PRMFormat, PRMText, prm_text, tokenizer_name
from treesearch.records import Prefix

LAID_OUT_KEPT = 65536  # paths whose PRM tokens and positions are kept for the next ask (oldest dropped)
# and at most this many of their tokens (~36 bytes each as Python ints: ~150 MB; 65536 paths of
# 2000 tokens were ~4.7 GB beside the KV budget)
LAID_OUT_TOKENS = 4_000_000

Sequences = list[tuple[list[int], list[int]]]  # per path: (token ids, read positions)


@dataclass(frozen=True)
class PRMReading:
    """What the PRM read on one path.

    token_ids: the PRM's tokens of the path's text (`scorers.prm_format`).
    positions: the index into token_ids of each step's reading.
    step_scores: the score read at each position (P(good) / (P(good) + P(bad)), or the score
        head's probability of its "right" class), one per step.
    """

    token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    step_scores: tuple[float, ...]


class PRMLayout:
    """Lays paths out for one PRM (module docstring).

    fmt: the PRM's format. tokenizer: its fast tokenizer. good_id: the chat layout's answer token
    (a reading sits on the token before it). context_window: the PRM's longest sequence (None:
    unchecked); window_source: where that number comes from, for the error."""

    def __init__(self, fmt: PRMFormat, tokenizer: Any, good_id: int, context_window: int | None,
                 window_source: str = "max_position_embeddings") -> None:
        self.format, self.tokenizer, self.good_id = fmt, tokenizer, good_id
        self.context_window, self.window_source = context_window, window_source
        self._laid_out: OrderedDict[tuple, tuple[list[int], list[int]]] = OrderedDict()
        self._laid_out_tokens = 0  # tokens of the kept layouts

    def sequences(self, paths: Sequence[Prefix]) -> Sequences:
        """(token ids, read positions) of each path; ([], []) for a path without steps."""
        result = []
        for path in paths:
            if not path.steps:
                result.append(([], []))
                continue
            key = (path.problem.question, tuple(step.text for step in path.steps))
            laid = self._laid_out.get(key)
            if laid is not None:
                self._laid_out.move_to_end(key)
            else:
                laid = self._laid_out[key] = self._positions(prm_text(self.format, self.tokenizer, path))
                self._laid_out_tokens += len(laid[0])
                while len(self._laid_out) > LAID_OUT_KEPT or self._laid_out_tokens > LAID_OUT_TOKENS:
                    self._laid_out_tokens -= len(self._laid_out.popitem(last=False)[1][0])
            result.append(laid)
        return result

    def check_window(self, paths: Sequence[Prefix], sequences: Sequences) -> None:
        """ValueError naming the first path longer than the PRM's context window."""
        if self.context_window is None:
            return
        for path, (ids, _) in zip(paths, sequences):
            if len(ids) > self.context_window:
                raise ValueError(
                    f"problem {path.problem.id!r}: the PRM reads {len(ids)} tokens, more than its "
                    f"context window of {self.context_window} ({self.window_source})"
                )

    def _positions(self, laid_out: PRMText) -> tuple[list[int], list[int]]:
        """Tokenise the whole text once and map each reading's character offset to its token."""
        encoded = self.tokenizer(
            laid_out.text, add_special_tokens=self.format.layout == "tag", return_offsets_mapping=True
        )
        ids, spans = list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]]
        if self.format.layout != "chat":  # read at each tag
            return ids, [last_token_before(spans, end) for end in laid_out.read_ends]
        return ids, [self._answer_position(ids, spans, start) for start in laid_out.read_ends]

    def _answer_position(self, ids: list[int], spans: list[tuple[int, int]], start: int) -> int:
        """The token before the answer that starts at character start (its logits predict it)."""
        index = next((i for i, (s, e) in enumerate(spans) if e > s and s == start), None)
        if index is None or ids[index] != self.good_id:
            found = "no token starts there" if index is None else f"it is token {ids[index]}"
            raise ValueError(
                f"the chat template of {tokenizer_name(self.tokenizer)} does not render the answer "
                f"{self.format.good!r} as its own token {self.good_id} ({found}): give good_id / bad_id "
                "or use a tag layout"
            )
        return index - 1


def last_token_before(spans: list[tuple[int, int]], end: int) -> int:
    """The index of the last real token (non-empty span) that starts before character end: the
    token holding the character before end."""
    return max(i for i, (s, e) in enumerate(spans) if e > s and s < end)


def distinct(sequences: Sequences) -> Sequences:
    """sequences with every repeat of an earlier one (and every empty one) as ([], []): a search
    that keeps equal beams asks for the same path several times, and one forward serves them all.
    A repeat has the same tokens and the same read positions (paths whose steps split the same
    text differently, a step holding the tag, are read apart)."""
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    result: Sequences = []
    for ids, positions in sequences:
        key = (tuple(ids), tuple(positions))
        result.append(([], []) if key in seen or not ids else (ids, positions))
        seen.add(key)
    return result


def whole_paths(sequences: Sequences) -> Sequences:
    """Each distinct path with steps once, in first-seen order: what a scorer that forwards every
    path whole (vLLM's engine, a served PRM) runs."""
    return [(ids, positions) for ids, positions in distinct(sequences) if ids]


def whole_path_tokens(sequences: Sequences) -> int:
    """Tokens such a scorer forwards for these sequences (`whole_paths`)."""
    return sum(len(ids) for ids, _ in whole_paths(sequences))


def readings_of(sequences: Sequences, work: Sequences, scores: list[list[float]]) -> list[PRMReading]:
    """Per asked path its reading: the scores of `work` (`whole_paths`), a repeat its first's, a
    path without steps none."""
    readings = {reading_key(ids, pos): PRMReading(tuple(ids), tuple(pos), ()) for ids, pos in sequences}
    for (ids, pos), row_scores in zip(work, scores):
        readings[reading_key(ids, pos)] = PRMReading(tuple(ids), tuple(pos), tuple(row_scores))
    return [readings[reading_key(ids, pos)] for ids, pos in sequences]


def reading_key(ids: Sequence[int], positions: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What makes two asked paths one reading: their tokens and their read positions."""
    return tuple(ids), tuple(positions)

