"""The rows still decoding in one chunk (`policies.decode_loop`): their KV slots, and which sample
rows each slot feeds.

Forked decoding: the sample rows of one context start as one slot and are forwarded once, not
once per row; every row draws its own token from its slot's logits, and a slot whose rows drew
different tokens forks: the rows that drew another token move to new slots holding a copy of
its decoded KV (`SlotCache.move_rows`), one per distinct token. A row's tokens, log-probs and
step scores are what they would be with a slot of its own (the same logits, the same uniforms
in the same order), but a confident policy forwards far fewer rows: in a tiny beam search only
~6% of the decode row-forwards fed a distinct (context, tokens so far).

    batch = DecodeBatch(rows=first_rows, cache=cache, attention_mask=None, next_position=positions,
                        state=state, live=torch.arange(R), budget=budgets, row_slot=slot_of_row, rep=first_rows)
    tokens = ...                      # [A] one per live row (`batch.live`), from the slots' logits
                                      # (`sample_next_tokens(logits, ..., row_slot=batch.row_slot)`)
    batch.fork(tokens, vocab_size)    # rows that drew differently get their own slots
    slot_tokens = batch.slot_tokens(tokens)   # [B] the token each slot feeds next
    index = batch.keep(~done)         # drop finished rows and the slots left without one

Without forking (`row_slot` None) each live row has a slot of its own and `live` is `rows`, in
slot order (which `keep` permutes).

Tests: `.venv/bin/python -m pytest tests/test_forked_decoding.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policies.slot_cache import SlotCache
from policies.step_stops import StopState


@dataclass
class DecodeBatch:
    """The live rows of a chunk and the slots that forward them.

    rows: [B] long, the chunk row that names each slot (with forking its lowest live row): the
        shared-prefix attention reads a slot's context and rank from it.
    cache: B slots (a SharedPrefixCache: each slot's own columns, its context's prefix shared).
    attention_mask: [B, S] long, 0 on left padding; None with a shared prefix.
    next_position: [B] long, position id of each slot's next fed token.
    state: the stop rule's state per slot.
    live: [A] long, the chunk rows still decoding (A >= B); `rows` itself without forking.
    budget: [A] long, most tokens each live row may generate.
    row_slot: [A] long, the slot of each live row, or None: one row per slot (live is rows).
    rep: [B] long, with row_slot: the position in `live` of each slot's naming row.
    """

    rows: torch.Tensor
    cache: SlotCache
    attention_mask: torch.Tensor | None
    next_position: torch.Tensor
    state: StopState
    live: torch.Tensor
    budget: torch.Tensor
    row_slot: torch.Tensor | None = None
    rep: torch.Tensor | None = None
    # [A] the live row that takes the generator's k-th draw, i.e. the position of the k-th live row
    # in chunk-row order, so a row gets the same draw whatever slot `keep` moved it to; None while
    # the live rows are in chunk order
    draw_slots: torch.Tensor | None = field(init=False)
    # the smallest budget: no row can run out before token index min_budget - 1, so the decode
    # loop compares t with the budgets only from there on (each torch op costs 10-25 us right
    # after a forward has evicted the caches)
    min_budget: int = field(init=False)

    def __post_init__(self) -> None:
        self._settle()

    @property
    def forked(self) -> bool:
        """Whether some slot may feed more than one row (then rows map to slots by `row_slot`)."""
        return self.row_slot is not None

    def slot_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token each slot feeds [B], from the live rows' tokens [A] (after `fork`)."""
        return tokens if self.rep is None else tokens[self.rep]

    def per_row(self, per_slot: torch.Tensor) -> torch.Tensor:
        """A per-slot tensor [B, ...] as one per live row [A, ...]."""
        return per_slot if self.row_slot is None else per_slot[self.row_slot]

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The slots of the live rows at `positions` [k]."""
        return positions if self.row_slot is None else self.row_slot[positions]

    def fork(self, tokens: torch.Tensor, vocab_size: int) -> None:
        """Give the live rows whose token [A] differs from their slot's naming row's a slot per
        (old slot, token): new slots at the end, each with a copy of its old slot's KV, position,
        mask and stop state. The live rows stay as they are (`keep` folds a slot per row back
        to the plain layout)."""
        if self.row_slot is None:
            return
        moved = (tokens != tokens[self.rep][self.row_slot]).nonzero().squeeze(-1)  # [k] live positions
        if not moved.numel():
            return
        old = self.row_slot[moved]
        keys, inverse = torch.unique(old * vocab_size + tokens[moved], return_inverse=True)  # [n] (slot, token)
        sources = torch.div(keys, vocab_size, rounding_mode="floor")  # [n] the slot each new one copies
        slots = int(self.rows.numel())
        new = torch.arange(slots, slots + int(keys.numel()), device=moved.device)
        self.row_slot = self.row_slot.clone()  # the caller may still index the old mapping
        self.row_slot[moved] = new[inverse]
        first = torch.full_like(keys, int(self.live.numel())).scatter_reduce_(0, inverse, moved, "amin")
        self.rep = torch.cat([self.rep, first])
        self.rows = torch.cat([self.rows, self.live[first]])
        self.cache.move_rows(new, sources, int(self.rows.numel()))
        self._copy_slot_state(torch.cat([torch.arange(slots, device=moved.device), sources]))

    def keep(self, keep_rows: torch.Tensor) -> torch.Tensor:
        """Drop the live rows where keep_rows [A] is False, and the slots left with no row, so
        they cost nothing more (`SlotCache.keep`). Returns the old slot of each new slot [B']
        (to reorder other per-slot tensors the same way)."""
        if self.row_slot is None:
            index = self.cache.keep(keep_rows)
            self.rows = self.live = self.rows[index]
            self.budget = self.budget[index]
            self._copy_slot_state(index)
            self._settle(check_order=False)
            return index
        self.live, self.budget = self.live[keep_rows], self.budget[keep_rows]
        row_slot = self.row_slot[keep_rows]
        slots = int(self.rows.numel())
        index = self.cache.keep(torch.bincount(row_slot, minlength=slots) > 0)
        renumber = torch.empty(slots, dtype=torch.long, device=index.device)
        renumber[index] = torch.arange(int(index.numel()), device=index.device)
        self.row_slot = renumber[row_slot]
        positions = torch.arange(int(self.live.numel()), device=index.device)
        self.rep = torch.full_like(index, int(self.live.numel())).scatter_reduce_(0, self.row_slot, positions, "amin")
        self.rows = self.live[self.rep]
        self._copy_slot_state(index)
        self._settle(check_order=False)
        return index

    def _copy_slot_state(self, index: torch.Tensor) -> None:
        """Per-slot state of the slots `index` [B'] (old slot of each new slot; repeats allowed)."""
        self.next_position = self.next_position[index]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[index]
        self.state = self.state.select(index)

    def _settle(self, check_order: bool = True) -> None:
        """After the live rows changed (at the start, after `keep`): with one row per slot again,
        drop the mapping (rows then stay in slot order); the draw order and smallest budget of
        the live rows. check_order: whether the rows may be in chunk order without forking."""
        if self.row_slot is not None and self.live.numel() == self.rows.numel():
            self.budget, self.live = self.budget[self.rep], self.rows
            self.row_slot = self.rep = None
            check_order = True
        if self.row_slot is not None:  # live rows stay in chunk order (`keep` filters them)
            self.draw_slots = None
        elif check_order:
            in_order = bool(torch.equal(self.live, torch.arange(len(self.live), device=self.live.device)))
            self.draw_slots = None if in_order else self.live.argsort()
        else:
            self.draw_slots = self.live.argsort()
        self.min_budget = int(self.budget.min()) if len(self.budget) else 0
        self.cache.keep_spare_rows(0 if self.row_slot is None else int(self.live.numel() - self.rows.numel()))
