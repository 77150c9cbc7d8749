"""Where a reasoning step ends: the separator/EOS/think lookup over the vocabulary, the
think-aware boundary rule applied token by token during decoding, and the split of a finished
sequence into steps.

Usage:
    rule = StepStopRule.from_tokenizer(tokenizer, vocab_size, ".\\n\\n", "<think>", "</think>", eos_ids,
                                       separator_match="exact")
    state = rule.initial_state([context_ids, ...], device)      # per row, from prompt + prefix
    boundary, state = rule.advance(tokens, state)               # per decoded token, tensors only
    ends = split_step_ends(boundary_flags, separator_flags)     # after decoding, per row

The rule, as in the MetaStone-S1 reference: a separator token ends a step only while the path
is inside <think> ... </think> (always, when the tokenizer lacks the think tokens), and not when
it directly follows another separator or <think>, so a run of separators counts once. Which
tokens are separators is `separator_match` (`treesearch.steps.SEPARATOR_MATCHES`): "exact", the
token whose decoded text is the separator alone, as the reference takes the token of '.\n\n'
itself (id 382 in a Qwen vocabulary; the Qwen presets use it); "suffix" (the default), every
token whose text ends with it, ~30 in a Qwen vocabulary (').\n\n', '...\n\n', ...), for a
vocabulary that writes the separator glued to what precedes it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from treesearch.steps import check_separator_match

# A token's class: which of separator / <think> / </think> it is (bits; 8 classes). A row's state:
# inside <think> (bit 0) and after a separator or <think> (bit 1), stored times the number of
# classes, so state + class indexes the rule's transition table: one lookup per decoded token
# instead of a few boolean ops (each torch op costs 10-25 us right after a forward).
_SEPARATOR, _OPEN, _CLOSE = 1, 2, 4
_CLASSES = 8
_INSIDE, _AFTER = 1, 2
_STATES = 4


@dataclass(frozen=True)
class StopState:
    """Per-row decoding state the boundary rule needs: code [B] long, (inside_think + 2 x
    after_separator_or_open) x 8, where inside_think says the path is inside <think> ... </think>
    (always True when the rule is not think-aware) and after_separator_or_open that the last token
    was a separator or <think>."""

    code: torch.Tensor

    @classmethod
    def of(cls, inside_think: torch.Tensor, after_separator_or_open: torch.Tensor) -> "StopState":
        """The state of rows [B] given as two bool tensors."""
        return cls((inside_think.long() * _INSIDE + after_separator_or_open.long() * _AFTER) * _CLASSES)

    def select(self, rows: torch.Tensor) -> "StopState":
        """Keep only `rows` [B'] (long indices), e.g. after finished rows leave the batch."""
        return StopState(self.code[rows])


@dataclass(frozen=True)
class StepStopRule:
    """Token-id lookups for step and sequence ends.

    is_separator: [V] bool, the token is a separator (`separator_mask`).
    is_eos: [V] bool, the token ends the sequence.
    think_open_id, think_close_id: ids of the single-token think markers, or None when the
        tokenizer lacks either (then separators end steps everywhere).
    """

    is_separator: torch.Tensor
    is_eos: torch.Tensor
    think_open_id: int | None
    think_close_id: int | None
    # made from the above: each token's class [V] long, and per (state code + class) [32] the
    # next state code (long) and whether the token ends a step (bool)
    token_class: torch.Tensor = field(init=False, repr=False, compare=False)
    next_code: torch.Tensor = field(init=False, repr=False, compare=False)
    ends_step: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        classes = self.is_separator.long() * _SEPARATOR
        if self.think_aware:
            classes[self.think_open_id] += _OPEN
            classes[self.think_close_id] += _CLOSE
        next_code, ends_step = _transitions(self.think_aware)
        device = self.is_separator.device
        object.__setattr__(self, "token_class", classes)
        object.__setattr__(self, "next_code", next_code.to(device))
        object.__setattr__(self, "ends_step", ends_step.to(device))

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: int,
        separator: str,
        think_open: str,
        think_close: str,
        eos_ids: Iterable[int],
        device: torch.device | str = "cpu",
        separator_match: str = "suffix",
    ) -> "StepStopRule":
        """Build the lookups once: decode every token id on its own (one batched call) and mark
        the separators (`separator_mask`). `vocab_size` is the model's logit width (it may exceed
        the tokenizer's, the extra ids are never separators)."""
        is_separator = separator_mask(tokenizer, vocab_size, separator, separator_match)
        is_eos = torch.zeros(vocab_size, dtype=torch.bool)
        eos_list = [i for i in eos_ids if 0 <= i < vocab_size]
        if not eos_list:
            raise ValueError(f"no EOS token id within the vocabulary of size {vocab_size}: {list(eos_ids)}")
        is_eos[eos_list] = True
        open_id, close_id = think_ids(tokenizer, think_open, think_close)
        return cls(is_separator.to(device), is_eos.to(device), open_id, close_id)

    @property
    def think_aware(self) -> bool:
        return self.think_open_id is not None

    def initial_state(self, contexts: Sequence[Sequence[int]], device: torch.device | str) -> StopState:
        """The state after reading each context (prompt + prefix tokens), one row per context."""
        inside, after = [], []
        separators = self.is_separator.tolist()
        for ids in contexts:
            inside.append(self._inside_think_after(ids))
            last = ids[-1] if ids else None
            after.append(last is not None and (separators[last] or last == self.think_open_id))
        return StopState.of(
            torch.tensor(inside, dtype=torch.bool, device=device),
            torch.tensor(after, dtype=torch.bool, device=device),
        )

    def advance(self, tokens: torch.Tensor, state: StopState) -> tuple[torch.Tensor, StopState]:
        """Apply the rule to the next token of each row, `tokens` [B] long.
        Returns (boundary [B] bool: the token ends a step, the state after the token)."""
        index = state.code + self.token_class[tokens]  # [B] state x class
        return self.ends_step[index], StopState(self.next_code[index])

    def _inside_think_after(self, ids: Sequence[int]) -> bool:
        if not self.think_aware:
            return True
        for token in reversed(ids):
            if token == self.think_open_id:
                return True
            if token == self.think_close_id:
                return False
        return False


def _transitions(think_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(next state code [32] long, ends a step [32] bool) for every (state code + token class):
    a separator ends a step inside <think> unless it follows a separator or <think>; <think>
    enters, </think> leaves (both only when think-aware; otherwise the path is always inside)."""
    next_code, ends_step = [], []
    for state in range(_STATES):
        inside, after = bool(state & _INSIDE), bool(state & _AFTER)
        for token in range(_CLASSES):
            is_sep, is_open, is_close = bool(token & _SEPARATOR), bool(token & _OPEN), bool(token & _CLOSE)
            ends_step.append(is_sep and inside and not after)
            if think_aware:
                inside_next, after_next = (inside or is_open) and not is_close, is_sep or is_open
            else:
                inside_next, after_next = inside, is_sep
            next_code.append((inside_next * _INSIDE + after_next * _AFTER) * _CLASSES)
    return torch.tensor(next_code, dtype=torch.long), torch.tensor(ends_step, dtype=torch.bool)


def split_step_ends(boundary: Sequence[bool], is_separator: Sequence[bool]) -> list[int]:
    """End positions (exclusive) of the steps of one generated sequence.

    A step ends after a boundary token and after any separators that directly follow it (a run of
    separators stays attached to the step it ends); the last step ends at the sequence's end.
    E.g. tokens `a . . b . c` with boundaries at 1 and 4 (the `.` at 2 follows a separator) give
    ends [3, 5, 6]: `a . .`, `b .`, `c`.
    """
    num_tokens, ends, t = len(boundary), [], 0
    while t < num_tokens:
        if boundary[t]:
            t += 1
            while t < num_tokens and is_separator[t]:
                t += 1
            ends.append(t)
        else:
            t += 1
    if not ends or ends[-1] != num_tokens:
        ends.append(num_tokens)
    return ends


def separator_mask(tokenizer: Any, vocab_size: int, separator: str, match: str = "suffix") -> torch.Tensor:
    """[vocab_size] bool on CPU: the token's text, decoded on its own (one batched call), ends
    with `separator` (match "suffix") or is `separator` (match "exact"). Ids beyond the
    tokenizer's size (a wider logit layer) are never separators."""
    check_separator_match(match, "separator_match")
    num_tokens = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode(
        [[i] for i in range(num_tokens)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    is_separator = torch.zeros(vocab_size, dtype=torch.bool)
    exact = match == "exact"
    is_separator[[i for i, text in enumerate(texts) if (text == separator if exact else text.endswith(separator))]] = True
    if not is_separator.any():
        # e.g. a vocabulary that spells ".\n\n" as "." + "\n\n": steps then never end on a
        # separator (a text-level stop would be needed); whole sequences still work.
        which = "is" if exact else "ends with"
        warnings.warn(f"no token's text {which} separator={separator!r}; steps will not end on it")
    return is_separator


def think_ids(tokenizer: Any, think_open: str, think_close: str) -> tuple[int | None, int | None]:
    """(open id, close id) of the single-token think markers, or (None, None) when the tokenizer
    lacks either one (then the rule is not think-aware)."""
    open_id, close_id = _single_token_id(tokenizer, think_open), _single_token_id(tokenizer, think_close)
    if open_id is None or close_id is None:
        return None, None
    return open_id, close_id


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one token, else None."""
    token_id = tokenizer.get_vocab().get(text)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(token_id)
