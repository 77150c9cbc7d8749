"""The batched sampling loop of the transformers policy: prefill each context once, replicate its
KV cache for its samples, decode token by token, and drop finished rows from the batch.

Usage (one chunk, i.e. at most `batch_size` sample rows):
    out = decode_chunk(model, contexts, row_context, budgets, rule, stop_at_boundary=True,
                       temperature=0.6, top_p=1.0, generator=gen, pad_id=0)
    out.token_ids[r, :out.lengths[r]]        # what sample row r generated

Left padding is done with an attention mask and position ids from the cumulative mask, so a row's
tokens and log-probs do not depend on the other rows of the batch. All per-token work is tensor
ops over the batch; nothing loops over rows in Python while decoding (except to copy out the KV
of rows that end a step, when asked).

Cross-call prefix reuse (`policies.prefix_cache`): `past[u]` may give the cached KV of the first
tokens of contexts[u]; only the rest is forwarded. A row's columns are then
`[zeros | cached | pads | new tokens]`: the cached KV is left-padded to the longest cached length
P, the new tokens to the longest suffix S, and both pad runs are masked, so a row still does not
depend on the others. With `keep_kv`, each row that ends on a step separator returns the KV of
everything it fed (context + its tokens but the last) for the caller to store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from policies.prefix_cache import PrefixKV, pad_past, row_kv
from policies.sampling import sample_next_tokens
from policies.step_stops import StepStopRule, StopState

FINISH_CODES: tuple[str, ...] = ("separator", "eos", "length")  # index = finish code in ChunkOutput
_SEPARATOR, _EOS, _LENGTH = 0, 1, 2


@dataclass(frozen=True)
class ChunkOutput:
    """What the R sample rows of one chunk generated (row order as given to `decode_chunk`).

    token_ids: [R, T] long, valid up to lengths[r] (T = the largest budget).
    logprobs: [R, T] float32, log_softmax of the raw logits at each chosen token.
    boundary: [R, T] bool, the token ends a step under the rule (see step_stops).
    lengths: [R] long, tokens generated per row (>= 1).
    finish: [R] long, index into FINISH_CODES.
    fed_kv: with keep_kv, per row the KV of context + token_ids[r, :lengths[r] - 1] (what the row
        fed) when it ended on a separator, else None; empty without keep_kv.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    boundary: torch.Tensor
    lengths: torch.Tensor
    finish: torch.Tensor
    fed_kv: tuple[PrefixKV | None, ...] = ()


@dataclass
class _Batch:
    """The rows still decoding: their cache, mask, positions and rule state (all [B, ...])."""

    rows: torch.Tensor  # [B] long, index of each active row in the chunk
    cache: Any  # transformers DynamicCache with B rows
    attention_mask: torch.Tensor  # [B, S] long, 0 on left padding
    next_position: torch.Tensor  # [B] long, position id of the next fed token
    state: StopState
    budget: torch.Tensor  # [B] long, most tokens this row may generate

    def keep(self, keep_mask: torch.Tensor) -> None:
        """Drop rows where keep_mask [B] is False, cache included, so they cost nothing more."""
        index = keep_mask.nonzero().squeeze(-1)  # [B']
        self.rows, self.budget = self.rows[index], self.budget[index]
        self.cache.batch_select_indices(index)
        self.attention_mask, self.next_position = self.attention_mask[index], self.next_position[index]
        self.state = self.state.select(index)


@torch.inference_mode()
def prefill(
    model: Any,
    contexts: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    past: Sequence[PrefixKV | None] | None = None,
):
    """Run the left-padded contexts through the model once, each from its cached prefix if any.

    past: per context the KV of its first past[u].length tokens (shorter than the context), or
        None; without any, this is a plain left-padded prefill.
    Returns (cache with one row per context, last-token logits [U, V], attention_mask [U, P+L]
    over cached and new columns, next_position [U] = context lengths).
    """
    cached = [0] * len(contexts) if past is None else [0 if p is None else p.length for p in past]
    if any(c >= len(ids) for c, ids in zip(cached, contexts)):
        raise ValueError("a cached prefix must leave at least one context token to forward")
    suffixes = [ids[c:] for ids, c in zip(contexts, cached)]
    width = max(len(ids) for ids in suffixes)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)  # [U, L]
    new_mask = torch.zeros((len(contexts), width), dtype=torch.long)  # [U, L]
    for row, ids in enumerate(suffixes):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        new_mask[row, width - len(ids):] = 1
    input_ids, new_mask = input_ids.to(device), new_mask.to(device)
    offset = torch.tensor(cached, dtype=torch.long, device=device)[:, None]  # [U, 1]
    position_ids = offset + (new_mask.cumsum(-1) - 1).clamp(min=0)  # [U, L]; pads masked anyway
    cache, attention_mask = _start_cache(model, past if any(cached) else None, new_mask, device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = offset[:, 0] + new_mask.sum(-1)  # [U]
    return out.past_key_values, out.logits[:, -1, :], attention_mask, next_position


def _start_cache(model: Any, past: Sequence[PrefixKV | None] | None, new_mask: torch.Tensor, device):
    """(DynamicCache holding the padded past or empty, attention mask [U, P+L] = past | new)."""
    config = getattr(model, "config", None)
    if past is None:
        return DynamicCache(config=config), new_mask
    layers, past_mask = pad_past(past, device)  # per layer [U, H, P, D]; [U, P]
    return DynamicCache(layers, config=config), torch.cat([past_mask, new_mask], dim=-1)


@torch.inference_mode()
def decode_chunk(
    model: Any,
    contexts: Sequence[Sequence[int]],
    row_context: Sequence[int],
    budgets: Sequence[int],
    rule: StepStopRule,
    stop_at_boundary: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    pad_id: int,
    past: Sequence[PrefixKV | None] | None = None,
    keep_kv: bool = False,
) -> ChunkOutput:
    """Sample one sequence per row: row r continues contexts[row_context[r]] for at most
    budgets[r] tokens, stopping early at EOS or (when stop_at_boundary) at a step boundary.
    past: cached KV per context (see prefill); keep_kv: return the fed KV of rows that end on a
    separator (ChunkOutput.fed_kv)."""
    device = rule.is_eos.device
    batch, logits = _start_batch(model, contexts, row_context, budgets, rule, pad_id, device, past)
    num_rows, width = len(row_context), max(budgets)
    token_ids = torch.zeros((num_rows, width), dtype=torch.long, device=device)  # [R, T]
    logprobs = torch.zeros((num_rows, width), dtype=torch.float32, device=device)  # [R, T]
    boundary = torch.zeros((num_rows, width), dtype=torch.bool, device=device)  # [R, T]
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)  # [R]
    finish = torch.zeros(num_rows, dtype=torch.long, device=device)  # [R]
    fed_kv: list[PrefixKV | None] = [None] * num_rows if keep_kv else []
    for t in range(width):
        tokens, token_logprobs = sample_next_tokens(logits, temperature, top_p, generator)  # [B], [B]
        is_boundary, batch.state = rule.advance(tokens, batch.state)  # [B]
        token_ids[batch.rows, t] = tokens
        logprobs[batch.rows, t] = token_logprobs
        boundary[batch.rows, t] = is_boundary
        code, done = _finish_codes(tokens, is_boundary & stop_at_boundary, t + 1 >= batch.budget, rule)
        lengths[batch.rows[done]], finish[batch.rows[done]] = t + 1, code[done]
        if keep_kv:
            _copy_fed_kv(batch, done & (code == _SEPARATOR), fed_kv)
        if bool(done.all()):
            break
        if bool(done.any()):
            batch.keep(~done)
            tokens = tokens[~done]
        logits = _decode_step(model, batch, tokens)
    return ChunkOutput(token_ids, logprobs, boundary, lengths, finish, tuple(fed_kv))


def _copy_fed_kv(batch: _Batch, rows: torch.Tensor, fed_kv: list[PrefixKV | None]) -> None:
    """Copy out the KV of the active rows where rows [B] is True: the cache holds exactly what
    each fed (the token sampled this step is not fed yet), its columns where the mask is 1."""
    for b in rows.nonzero().squeeze(-1).tolist():
        fed_kv[int(batch.rows[b])] = row_kv(batch.cache, b, batch.attention_mask[b].bool())


def _start_batch(
    model: Any,
    contexts: Sequence[Sequence[int]],
    row_context: Sequence[int],
    budgets: Sequence[int],
    rule: StepStopRule,
    pad_id: int,
    device: torch.device,
    past: Sequence[PrefixKV | None] | None = None,
) -> tuple[_Batch, torch.Tensor]:
    """Prefill each context once (from its cached prefix, if any), then replicate its cache rows
    for its samples. Returns (the batch of R rows, their next-token logits [R, V])."""
    cache, logits, attention_mask, next_position = prefill(model, contexts, pad_id, device, past)
    expand = torch.tensor(row_context, dtype=torch.long, device=device)  # [R] context of each row
    cache.batch_select_indices(expand)  # gathers (and repeats) cache rows: [U, ...] -> [R, ...]
    batch = _Batch(
        rows=torch.arange(len(row_context), device=device),
        cache=cache,
        attention_mask=attention_mask[expand],
        next_position=next_position[expand],
        state=rule.initial_state(contexts, device).select(expand),
        budget=torch.tensor(budgets, dtype=torch.long, device=device),
    )
    return batch, logits[expand]


def _finish_codes(
    tokens: torch.Tensor, at_boundary: torch.Tensor, out_of_budget: torch.Tensor, rule: StepStopRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """(finish code [B], done [B]); EOS wins over a boundary, which wins over the length cut."""
    is_eos = rule.is_eos[tokens]  # [B]
    code = torch.full_like(tokens, _LENGTH)
    code = torch.where(at_boundary, _SEPARATOR, code)
    code = torch.where(is_eos, _EOS, code)
    return code, is_eos | at_boundary | out_of_budget


def _decode_step(model: Any, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed each active row's last token [B]; return the next logits [B, V]."""
    ones = torch.ones((len(tokens), 1), dtype=batch.attention_mask.dtype, device=tokens.device)
    batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)  # [B, S+1]
    out = model(
        input_ids=tokens[:, None],
        attention_mask=batch.attention_mask,
        position_ids=batch.next_position[:, None],
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.next_position = batch.next_position + 1
    return out.logits[:, -1, :]
