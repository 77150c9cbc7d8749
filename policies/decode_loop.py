"""The batched sampling loop of the transformers policy: prefill each context once, let its samples
share that KV, decode token by token, and drop finished rows from the batch.

The samples of a context read its prefill KV in place (`policies.shared_prefix`: one copy per
context, not per sample, read once per decode step for all of them) and write their own tokens'
KV into a `policies.slot_cache.SlotCache`: buffers of every layer allocated ahead that each token
is written into in place, where transformers' DynamicCache re-copies the whole cache at every
token. A model whose attention cannot share a prefix (sliding window, soft-capping; see
`policies.shared_prefix.supports_shared_prefix`) gets a SlotCache holding a copy of its context's KV per sample row.
Finished rows leave by moving live rows into their slots, so the batch order is not the row
order; sampling still walks the rows in row order, so the same seed draws the same tokens for the
same row. Forked decoding (`ChunkRequest.forked`, the default; `policies.decode_batch`): the rows
of a context start in one slot, forwarded once per token, each drawing its own token from the
slot's logits; rows that drew differently fork into slots of their own with a copy of its KV.

Usage (one chunk, i.e. at most `batch_size` sample rows):
    out = decode_chunk(model, contexts, row_context, budgets, rule, stop_at_boundary=True,
                       temperature=0.6, top_p=1.0, generator=gen, pad_id=0)
    out.token_ids[r, :out.lengths[r]]        # what sample row r generated
    run = ChunkRun(model, request, rule, pad_id)   # the same a step at a time (a ChunkRequest):
    while run.sample(): run.feed()                 # what policies.continuous_engine interleaves

Left padding is done with an attention mask and position ids from the cumulative mask, so a row's
tokens and log-probs do not depend on the other rows of the batch. All per-token work is tensor
ops over the batch; nothing loops over rows in Python while decoding (except to copy out the KV
of rows that end a step, when asked).

Cross-call prefix reuse (`policies.prefix_cache`): `past[u]` may give the cached KV of the first
tokens of contexts[u]; only the rest is forwarded. A row's columns are then
`[zeros | cached | pads | new tokens]`: the cached KV is left-padded to the longest cached length
P, the new tokens to the longest suffix S, and both pad runs are masked, so a row still does not
depend on the others. With `keep_kv`, each row that ends on a step separator returns the KV of
everything it fed (context + its tokens but the last) for the caller to store, as a chain that
extends the cached prefix it started from (`PrefixKV.parent`): only the new columns are copied
(with a shared prefix, a context's new columns once, then each row's own tokens;
`policies.fed_kv`).

Step scores with no extra forward (`step_head`, e.g. `policies.reflective_model.ReflectiveModel`):
every forward also gives the feature layer's hidden states, and each sampled
token that is a step boundary under the rule is scored by the head on the feature-layer state of
the position whose logits sampled it, i.e. the token just before the separator, exactly where the
reference's SPRM reads (`scorers.sprm_positions`). Cost: the head on the boundary rows only (one
[n, C] x [C, 2C] product per decode step that has any), plus the hidden states: the prefill keeps
the feature layer's alone (`policies.feature_tap`; every layer's for a model it cannot tap),
each decode step asks for every layer's one token.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from transformers import DynamicCache

from policies.decode_batch import DecodeBatch
from policies.feature_tap import tap_or_none
from policies.fed_kv import fed_kv_copier
from policies.prefix_cache import PrefixKV, pad_past
from policies.sampling import SplitDraws, sample_next_tokens
from policies.shared_prefix import SharedPrefixCache, has_sliding_window, shared_prefix_attention, worth_sharing
from policies.slot_cache import (  # noqa: F401 (re-exported)
    KV_GROWTH, KV_POOL, KV_RESERVE_LIMIT, STEP_KV_RESERVE, SlotCache, slot_cache,
)
from policies.step_stops import StepStopRule

FINISH_CODES: tuple[str, ...] = ("separator", "eos", "length")  # index = finish code in ChunkOutput
_SEPARATOR, _EOS, _LENGTH = 0, 1, 2


class StepHead(Protocol):
    """A step scorer on the policy's own hidden states (owned here, the consumer).

    feature_layer: index into the model's `hidden_states` (forward with output_hidden_states=True).
    """

    feature_layer: int

    def step_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1] of feature-layer states [N, C] -> [N] float32."""
        ...


@dataclass(frozen=True)
class ChunkOutput:
    """What the R sample rows of one chunk generated (row order as given to `decode_chunk`).

    token_ids: [R, T] long, valid up to lengths[r] (T = the largest budget).
    logprobs: [R, T] float32, log_softmax of the raw logits at each chosen token.
    boundary: [R, T] bool, the token ends a step under the rule (see step_stops).
    lengths: [R] long, tokens generated per row (>= 1).
    finish: [R] long, index into FINISH_CODES.
    fed: [R, T] bool, True where the row's token was fed back by a forward counted on this row:
        every token but the last, except that rows decoding alike share a forward (forked
        decoding, `policies.decode_batch`), counted on the lowest of them. Its sum over all rows
        is the decode tokens the model ran.
    fed_kv: with keep_kv, per row the KV of context + token_ids[r, :lengths[r] - 1] (what the row
        fed) when it ended on a separator, else None; empty without keep_kv.
    step_scores: with a step head, [R, T] float32: the head's score where boundary is True, NaN
        elsewhere; None without a head.
    cached: per row, the tokens of its context read from the prefix cache (the prefill forwarded
        the rest): the request's past lengths, except where `gap_free_past` cut them.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    boundary: torch.Tensor
    lengths: torch.Tensor
    finish: torch.Tensor
    fed: torch.Tensor
    fed_kv: tuple[PrefixKV | None, ...] = ()
    step_scores: torch.Tensor | None = None
    cached: tuple[int, ...] = ()


# model types whose attention bias is measured in KV columns, pads included (MPT's ALiBi): as a
# sliding window, a pad between a row's cached and new tokens changed its log-probs (1e-2 with a
# longer prompt beside it); Falcon's and Bloom's ALiBi follow the attention mask, and are exact
COLUMN_BIASED_MODEL_TYPES: frozenset[str] = frozenset({"mpt"})


def gap_free_past(model: Any, contexts: Sequence[Sequence[int]], past: Sequence[PrefixKV | None] | None,
                  budget: int = 0) -> Sequence[PrefixKV | None] | None:
    """past, with each cached prefix cut so that every context with one forwards as many new
    tokens as the longest suffix, when the model has sliding-window layers and a row's columns
    (the longest cached prefix + the longest suffix + budget, the most tokens a row generates)
    can outgrow its window; else past as given.

    Why: the prefill lays a row out as [zeros | cached | pads | new] columns, and a sliding window
    is measured in KV columns, pads included: pads between a row's cached and new tokens would
    push its own context out of the window, so its samples and log-probs would depend on the
    other rows of the chunk. With equal suffixes no row has such pads (a context too short to
    keep any cached token is forwarded whole, its pads before all its tokens). A model whose
    attention bias counts KV columns (COLUMN_BIASED_MODEL_TYPES) is cut so whatever its length."""
    config = getattr(model, "config", None)
    by_column = getattr(config, "model_type", None) in COLUMN_BIASED_MODEL_TYPES
    if past is None or all(p is None for p in past) or not (has_sliding_window(config) or by_column):
        return past
    width = max(len(ids) - (0 if p is None else p.length) for ids, p in zip(contexts, past))
    window = getattr(config, "sliding_window", None)
    columns = max(0 if p is None else p.length for p in past) + width + budget
    if not by_column and isinstance(window, int) and not isinstance(window, bool) and columns <= window:
        return past  # every row attends to all its columns: pads shift no window (a column bias counts them all)
    return [None if p is None or len(ids) <= width else p.first(len(ids) - width) for ids, p in zip(contexts, past)]



@torch.inference_mode()
def prefill(
    model: Any,
    contexts: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    past: Sequence[PrefixKV | None] | None = None,
    feature_layer: int | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the left-padded contexts through the model once, each from its cached prefix if any.

    past: per context the KV of its first past[u].length tokens (shorter than the context), or
        None; without any, this is a plain left-padded prefill.
    feature_layer: also return the last token's hidden state of this layer (None: don't ask).
    Returns (cache with one row per context, last-token logits [U, V], attention_mask [U, P+L]
    over cached and new columns, next_position [U] = context lengths, last-token features
    [U, C] or None).
    """
    cached = [0] * len(contexts) if past is None else [0 if p is None else p.length for p in past]
    if any(c >= len(ids) for c, ids in zip(cached, contexts)):
        raise ValueError("a cached prefix must leave at least one context token to forward")
    suffixes = [ids[c:] for ids, c in zip(contexts, cached)]
    width = max(len(ids) for ids in suffixes)
    # left-padded in Python and made a tensor once: a step search prefills hundreds of short suffixes
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in suffixes], dtype=torch.long)  # [U, L]
    pads = torch.tensor([width - len(ids) for ids in suffixes], dtype=torch.long)  # [U]
    new_mask = (torch.arange(width) >= pads[:, None]).long()  # [U, L], 1 on the suffix's tokens
    input_ids, new_mask = input_ids.to(device), new_mask.to(device)
    offset = torch.tensor(cached, dtype=torch.long, device=device)[:, None]  # [U, 1]
    position_ids = offset + (new_mask.cumsum(-1) - 1).clamp(min=0)  # [U, L]; pads masked anyway
    cache, attention_mask = _start_cache(model, past if any(cached) else None, new_mask, device)
    # the feature layer's states alone where a hook can keep them (every layer's for a long prompt else)
    tap = None if feature_layer is None else tap_or_none(model, feature_layer)
    with tap if tap is not None else nullcontext():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **({} if tap is not None else _hidden_state_request(feature_layer)),
        )
    if out.past_key_values is None:  # an encoder (BERT's MaskedLM loaded as BertLMHeadModel): named, not an AttributeError later
        raise ValueError(f"the policy's model ({type(model).__name__}, model_type "
                         f"{getattr(getattr(model, 'config', None), 'model_type', '?')!r}) returned no KV cache: a policy "
                         "must be a causal (decoder-only) language model such as Llama, Qwen2 or SmolLM2")
    next_position = offset[:, 0] + new_mask.sum(-1)  # [U]
    # [U, C] or None; left padding: -1 is real
    features = tap.states[:, -1, :] if tap is not None else _last_features(out, feature_layer)
    return out.past_key_values, out.logits[:, -1, :], attention_mask, next_position, features


def _hidden_state_request(feature_layer: int | None) -> dict[str, bool]:
    """The forward's extra keyword: hidden states only when a head reads them."""
    return {} if feature_layer is None else {"output_hidden_states": True}


def _last_features(out: Any, feature_layer: int | None) -> torch.Tensor | None:
    """The last position's state of the feature layer, [B, C], or None."""
    return None if feature_layer is None else out.hidden_states[feature_layer][:, -1, :]


def _start_cache(model: Any, past: Sequence[PrefixKV | None] | None, new_mask: torch.Tensor, device):
    """(an empty DynamicCache, or SlotLayers over the padded past with room for the L new
    columns, so the prefill appends in place instead of concatenating a copy of the past;
    attention mask [U, P+L] = past | new)."""
    if past is None:
        # no config: every layer keeps all its columns (the model's mask applies a sliding window);
        # DynamicCache(config=...) gave sliding layers window - 1 columns, so a prefill longer
        # than the window left them shorter than the full layers the slot buffers are cut to
        return DynamicCache(), new_mask
    keys, values, past_mask = pad_past(past, device, extra_columns=int(new_mask.shape[1]), pool=KV_POOL)  # [L, U, H, P + L, D]
    cache = SlotCache(keys, values, past_mask.shape[1])
    return cache, torch.cat([past_mask, new_mask], dim=-1)


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
    step_head: StepHead | None = None,
    shared_prefix: bool | None = None,
    forked: bool = True,
    repetition_penalty: float = 1.0,
) -> ChunkOutput:
    """Sample one sequence per row: row r continues contexts[row_context[r]] for at most
    budgets[r] tokens, stopping early at EOS or (when stop_at_boundary) at a step boundary.
    past: cached KV per context (see prefill); keep_kv: return the fed KV of rows that end on a
    separator (ChunkOutput.fed_kv); step_head: score every boundary token from the hidden state
    that sampled it (ChunkOutput.step_scores); shared_prefix: the rows of a context share its
    prefill KV (`policies.shared_prefix`) instead of each holding a copy (None: whenever the
    model supports it and the contexts have about as many rows each, `worth_sharing`); forked: the
    rows of a context share one forward per token until their tokens differ
    (`policies.decode_batch`); repetition_penalty: `SamplingConfig.repetition_penalty`."""
    request = ChunkRequest(contexts, row_context, budgets, stop_at_boundary, temperature, top_p, generator,
                           past, keep_kv, shared_prefix, forked=forked, repetition_penalty=repetition_penalty)
    return decode_request(model, request, rule, pad_id, step_head)


@torch.inference_mode()
def decode_request(
    model: Any, request: "ChunkRequest", rule: StepStopRule, pad_id: int, step_head: StepHead | None = None
) -> ChunkOutput:
    """`decode_chunk` of a `ChunkRequest`: one chunk decoded to the end in this thread (with a
    shared prefix, the model's attention switched once for all its decode steps)."""
    run = ChunkRun(model, request, rule, pad_id, step_head)
    with shared_prefix_attention(model) if run.shares_prefix else nullcontext():
        while run.sample():
            run.feed()
    return run.output()


@dataclass(frozen=True)
class ChunkRequest:
    """What one chunk asks of the decode loop (the arguments of `decode_chunk`, as a record that
    `policies.continuous_engine` can queue): contexts, the context of each sample row, each row's
    token budget, whether a step boundary ends a row, sampling settings, the call's generator,
    the cached prefix per context, whether to return the fed KV and whether rows share their
    context's prefill KV (None: `worth_sharing`).

    split_generators: for the chunks of several calls decoded as one (`policies.chunk_merge`),
    (generator, rows) of each call in row order: each call's rows draw from its own generator, in
    their own row order, as they would alone (`generator` is then unused); empty: one generator.
    kv_wanted: with keep_kv, whether the fed KV of a row that ended on a separator is worth
        copying out, given its key (its context's ids + the tokens it fed, a tuple): False (the
        caller has it, e.g. in its prefix cache) leaves that row's fed_kv None. None: every row's.
        Either way only the first row (lowest) of each key in a chunk is copied: rows that
        sampled the same step from the same context have the same KV (a tiny beam search,
        32 problems, N = 32: 3190 rows ended on a separator, 253 keys were new to the cache).
    forked: the rows of a context share one forward until their tokens differ
        (`policies.decode_batch`); False: every row is forwarded on its own from the start.
    repetition_penalty: `SamplingConfig.repetition_penalty` (1: none), over each row's context
        and the tokens it drew.
    """

    contexts: Sequence[Sequence[int]]
    row_context: Sequence[int]
    budgets: Sequence[int]
    stop_at_boundary: bool
    temperature: float
    top_p: float
    generator: torch.Generator | None
    past: Sequence[PrefixKV | None] | None = None
    keep_kv: bool = False
    shared_prefix: bool | None = None
    split_generators: tuple[tuple[torch.Generator | None, int], ...] = ()
    kv_wanted: Callable[[tuple[int, ...]], bool] | None = None
    forked: bool = True
    repetition_penalty: float = 1.0


def _context_tokens(request: ChunkRequest, vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] bool: the tokens of each row's context."""
    per_context = torch.zeros((len(request.contexts), vocab), dtype=torch.bool, device=device)  # [U, V]
    for u, ids in enumerate(request.contexts):
        per_context[u, torch.tensor([i for i in ids if i < vocab], dtype=torch.long, device=device)] = True
    return per_context[torch.tensor(list(request.row_context), dtype=torch.long, device=device)]


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """float32 logits [B, V] with the repetition penalty on the tokens seen [B, V] holds (vLLM's
    and transformers' rule: a positive logit divided by it, a negative one multiplied). Computed
    in float32, as vLLM does (bf16 logits / 1.05 would round to bf16's steps), capped at float32's
    largest value and shifted by each row's maximum (the same distribution, every entry <= 0): a
    penalty of 1e-40 divides a logit to inf, and a temperature below 1 divided float32's largest
    value to inf again: NaN, the last token drawn in silence. NaN logits stay NaN."""
    logits = logits.float()
    out = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    out.clamp_(max=torch.finfo(torch.float32).max)
    return out.sub_(out.amax(dim=-1, keepdim=True))


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, row_slot: torch.Tensor | None) -> torch.Tensor:
    """[A] float32: log_softmax of the unpenalised logits [B, V] at each drawn token (row a read
    the logits of slot row_slot[a], or of row a)."""
    slots = row_slot if row_slot is not None else torch.arange(len(tokens), device=tokens.device)
    return torch.log_softmax(logits.float(), dim=-1)[slots, tokens]


class ChunkRun:
    """One chunk being decoded a step at a time: `__init__` prefills it, `sample` draws every
    live row's next token from the last logits (and drops the rows that finished), `feed`
    forwards the new tokens; `output` hands back what the rows generated. `decode_chunk` runs one
    chunk to the end; `policies.continuous_engine` runs several at once and feeds all their rows
    in one forward (`feed_inputs` / `take_forward`).

        run = ChunkRun(model, request, rule, pad_id)
        while run.sample():
            run.feed()
        out = run.output()
    """

    @torch.inference_mode()
    def __init__(self, model: Any, request: ChunkRequest, rule: StepStopRule, pad_id: int,
                 step_head: StepHead | None = None) -> None:
        self.model, self.request, self.rule, self.step_head = model, request, rule, step_head
        device = rule.is_eos.device
        self.layer = None if step_head is None else step_head.feature_layer
        shared = request.shared_prefix
        if shared is None:
            shared = worth_sharing(model, request.row_context)
        past = gap_free_past(model, request.contexts, request.past, max(request.budgets))
        self.batch, self.logits, self.features = _start_batch(
            model, request.contexts, request.row_context, request.budgets, rule, pad_id, device, past,
            self.layer, shared, request.stop_at_boundary, request.forked,
        )
        self.cached = tuple(0 if past is None or past[u] is None else past[u].length for u in request.row_context)
        num_rows, width = len(request.row_context), max(request.budgets)
        self.token_ids = torch.zeros((num_rows, width), dtype=torch.long, device=device)  # [R, T]
        self.logprobs = torch.zeros((num_rows, width), dtype=torch.float32, device=device)  # [R, T]
        self.boundary = torch.zeros((num_rows, width), dtype=torch.bool, device=device)  # [R, T]
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=device)  # [R]
        self.finish = torch.zeros(num_rows, dtype=torch.long, device=device)  # [R]
        self.fed = torch.zeros((num_rows, width), dtype=torch.bool, device=device)  # [R, T] (ChunkOutput.fed)
        self.fed_kv: list[PrefixKV | None] = [None] * num_rows if request.keep_kv else []
        self.copy_out = fed_kv_copier(self.batch, request.row_context, past)
        self.scores = None if step_head is None else torch.full((num_rows, width), float("nan"), device=device)
        self.row_group = _row_groups(request.split_generators, device)  # [R] call of each row, or None
        self.group_ids = torch.arange(len(request.split_generators), device=device)  # [G]
        self.t = 0  # index of the token the next `sample` draws
        self._context_keys: list[tuple[int, ...]] | None = None  # each context's ids, made when first needed
        self.tokens: torch.Tensor | None = None  # [B] the live rows' last sampled tokens, to feed
        # [R, V] the tokens each row's sequence holds so far (the repetition penalty's), or None without one
        self.seen = _context_tokens(request, int(self.logits.shape[-1]), device) if request.repetition_penalty != 1 else None

    @property
    def shares_prefix(self) -> bool:
        """Whether the rows read their context's KV in place (a `SharedPrefixCache`)."""
        return isinstance(self.batch.cache, SharedPrefixCache)

    @torch.inference_mode()
    def sample(self) -> bool:
        """Draw token t of every live row, record it, copy out the KV of rows that ended on a
        separator (keep_kv) and drop the finished rows. Returns whether any row is still live
        (then `feed` its slots' tokens next); every row ends by its budget at the latest."""
        request, batch, t = self.request, self.batch, self.t
        row_slot = batch.row_slot  # [A] the slot whose logits and features each live row reads, or None
        logits = self.logits if self.seen is None else penalised(self.logits, self.seen[batch.rows], request.repetition_penalty)
        tokens, token_logprobs = sample_next_tokens(
            logits, request.temperature, request.top_p, self._draws(), draw_slots=batch.draw_slots,
            row_slot=row_slot,
        )  # [A], [A]
        if self.seen is not None:  # log-probs without the penalty (vLLM's raw ones); the drawn tokens are seen
            token_logprobs = raw_logprobs(self.logits, tokens, row_slot)
            self.seen[batch.live, tokens] = True
        batch.fork(tokens, int(self.logits.shape[-1]))
        slot_tokens = batch.slot_tokens(tokens)  # [B]
        slot_boundary, batch.state = self.rule.advance(slot_tokens, batch.state)  # [B]
        is_boundary = batch.per_row(slot_boundary)  # [A]
        live = batch.live
        self.token_ids[live, t] = tokens
        self.logprobs[live, t] = token_logprobs
        self.boundary[live, t] = is_boundary
        if self.step_head is not None:
            _score_boundaries(self.step_head, self.features, is_boundary, live, t, self.scores, row_slot)
        at_boundary = is_boundary if request.stop_at_boundary else None
        is_eos, done = _ended(tokens, at_boundary, t, batch, self.rule)
        if not bool(done.any()):  # most steps: every row goes on, nothing to record or drop
            self.t, self.tokens = t + 1, slot_tokens
            self.fed[batch.rows, t] = True  # each slot's forward of token t counted on its naming row
            return True
        code = _finish_codes(is_eos, at_boundary)
        ended = live[done]
        self.lengths[ended], self.finish[ended] = t + 1, code[done]
        if request.keep_kv:  # (before t moves on: the rows fed tokens 0..t-1)
            self.copy_out(batch, self._new_kv_rows(done & (code == _SEPARATOR)), self.fed_kv)
        self.t = t + 1
        if ended.numel() == done.numel():
            self.tokens = None
            return False
        self.tokens = slot_tokens[batch.keep(~done)]
        self.fed[batch.rows, t] = True
        return True

    def _new_kv_rows(self, candidates: torch.Tensor) -> list[tuple[int, int]]:
        """Of the live rows where candidates [A] is True (rows that just ended on a separator),
        those whose fed KV to copy out: the lowest row of each key that `kv_wanted` wants (see
        `ChunkRequest`); (slot, chunk row) of each, by row."""
        positions = candidates.nonzero().squeeze(-1)
        if not positions.numel():
            return []
        rows, slots = self.batch.live[positions], self.batch.slot_of(positions)
        fed = self.token_ids[rows, : self.t].tolist()  # the tokens each fed (token t is not fed)
        if self._context_keys is None:
            self._context_keys = [tuple(ids) for ids in self.request.contexts]
        wanted, row_context, seen, chosen = self.request.kv_wanted, self.request.row_context, set(), []
        for row, slot, ids in sorted(zip(rows.tolist(), slots.tolist(), fed)):
            key = self._context_keys[row_context[row]] + tuple(ids)
            if key not in seen and (wanted is None or wanted(key)):
                chosen.append((slot, row))
            seen.add(key)
        return chosen

    def _draws(self) -> torch.Generator | SplitDraws | None:
        """The request's generator, or each call's for its live rows (`ChunkRequest.split_generators`)."""
        if self.row_group is None:
            return self.request.generator
        generators = [g for g, _ in self.request.split_generators]
        counts = (self.row_group[self.batch.live, None] == self.group_ids).sum(0).tolist()
        return SplitDraws(generators, counts)

    @torch.inference_mode()
    def feed(self) -> None:
        """Forward the live slots' last tokens (after a `sample` that returned True)."""
        self.logits, self.features = _decode_step(self.model, self.batch, self.tokens, self.layer)

    def feed_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [B, 1], position ids [B, 1]) of the next forward of this chunk's live slots,
        for a caller that forwards several chunks at once (then `take_forward`)."""
        return self.tokens[:, None], self.batch.next_position[:, None]

    def take_forward(self, logits: torch.Tensor, features: torch.Tensor | None) -> None:
        """The next-token logits [B, V] (and feature-layer states [B, C]) a joint forward computed
        for this chunk's slots from `feed_inputs`."""
        self.batch.next_position = self.batch.next_position + 1
        self.logits, self.features = logits, features

    @property
    def live_rows(self) -> int:
        """Rows still decoding (forked decoding forwards them in as many slots or fewer)."""
        return int(self.batch.live.numel())

    def release(self) -> None:
        """Hand the KV buffers back to the pool (when done, or abandoned after an error)."""
        self.batch.cache.release()

    @torch.inference_mode()
    def output(self) -> ChunkOutput:
        """What the rows generated (after `sample` returned False); the KV buffers go back to the pool."""
        self.release()
        return ChunkOutput(self.token_ids, self.logprobs, self.boundary, self.lengths, self.finish, self.fed,
                           tuple(self.fed_kv), self.scores, self.cached)

    def rows_done(self, rows: slice) -> bool:
        """Whether every row in `rows` has finished (each row generates at least one token)."""
        return bool((self.lengths[rows] > 0).all())

    @torch.inference_mode()
    def rows_output(self, rows: slice) -> ChunkOutput:
        """What the finished rows `rows` generated, copied out while the others still decode (the
        continuous engine hands each merged call its rows as soon as they are all done)."""
        scores = None if self.scores is None else self.scores[rows].clone()
        return ChunkOutput(self.token_ids[rows].clone(), self.logprobs[rows].clone(), self.boundary[rows].clone(),
                           self.lengths[rows].clone(), self.finish[rows].clone(), self.fed[rows].clone(),
                           tuple(self.fed_kv[rows]), scores, self.cached[rows])


def _row_groups(split: Sequence[tuple[Any, int]], device: torch.device) -> torch.Tensor | None:
    """[R] index of the call each row belongs to (rows of a call are contiguous), or None."""
    if not split:
        return None
    counts = torch.tensor([n for _, n in split], device=device)  # on the rows' device: a GPU's too
    return torch.repeat_interleave(torch.arange(len(split), device=device), counts)


def _score_boundaries(
    head: StepHead, features: torch.Tensor, is_boundary: torch.Tensor, rows: torch.Tensor, t: int,
    scores: torch.Tensor, row_slot: torch.Tensor | None = None,
) -> None:
    """Write the head's score of the rows [A] whose token t is a boundary (is_boundary [A]) into
    scores [R, T]; features [B, C] are the states that sampled token t (same forward as its
    logits), row a's at row_slot[a] (None: at a). The head reads each slot once and its rows
    share that score: a slot's rows (forked siblings that drew the same step) then tie exactly,
    as their log-probs do; a copy per row put them at different places in one matmul, whose
    rounding differs by place (~1e-7), so a strategy's tie-break between identical steps, and
    with it the search, changed with the batch (the prefix cache, continuous batching)."""
    hit = is_boundary.nonzero().squeeze(-1)  # [n]
    if not hit.numel():
        return
    if row_slot is None:
        scores[rows[hit], t] = head.step_scores(features[hit]).to(scores.dtype)
        return
    slots, inverse = torch.unique(row_slot[hit], return_inverse=True)  # [u], [n]
    scores[rows[hit], t] = head.step_scores(features[slots]).to(scores.dtype)[inverse]


def _start_batch(
    model: Any,
    contexts: Sequence[Sequence[int]],
    row_context: Sequence[int],
    budgets: Sequence[int],
    rule: StepStopRule,
    pad_id: int,
    device: torch.device,
    past: Sequence[PrefixKV | None] | None = None,
    feature_layer: int | None = None,
    shared_prefix: bool = False,
    stop_at_boundary: bool = False,
    forked: bool = False,
) -> tuple[DecodeBatch, torch.Tensor, torch.Tensor | None]:
    """Prefill each context once (from its cached prefix, if any); its samples then share that
    KV (shared_prefix) or each get a copy of it, with columns reserved for the largest budget (up
    to KV_RESERVE_LIMIT, or STEP_KV_RESERVE when the rows stop at a step boundary). forked: the
    rows of a context start in one slot (`policies.decode_batch`), else in one each. Returns (the
    batch of R rows, its slots' next-token logits [B, V], the feature-layer states that produced
    them [B, C] or None)."""
    cache, logits, attention_mask, next_position, features = prefill(
        model, contexts, pad_id, device, past, feature_layer
    )
    expand = torch.tensor(row_context, dtype=torch.long, device=device)  # [R] context of each row
    live = torch.arange(len(row_context), device=device)
    row_slot = rep = None
    slot_context = expand  # [B] context of each slot
    if forked:
        slot_context, row_slot = torch.unique(expand, return_inverse=True)  # one slot per context with rows
        rep = torch.full_like(slot_context, len(row_context)).scatter_reduce_(0, row_slot, live, "amin")
    slot_rows = live if rep is None else rep  # the chunk row naming each slot
    room = len(row_context) - int(slot_context.numel())  # spare slots for rows that fork off
    reserve = min(max(budgets), STEP_KV_RESERVE if stop_at_boundary else KV_RESERVE_LIMIT)
    if shared_prefix:
        rows_cache = SharedPrefixCache.over(cache, attention_mask, expand, reserve, slot_rows)
    else:
        rows_cache = slot_cache(cache, slot_context, reserve, room)  # gathers (and repeats) rows: [U, ...] -> [B, ...]
        if isinstance(cache, SlotCache):
            cache.release()  # the padded past's buffers serve the next chunk
    batch = DecodeBatch(
        rows=slot_rows,
        cache=rows_cache,
        attention_mask=None if shared_prefix else attention_mask[slot_context],
        next_position=next_position[slot_context],
        state=rule.initial_state(contexts, device).select(slot_context),
        live=live,
        budget=torch.tensor(budgets, dtype=torch.long, device=device),
        row_slot=row_slot,
        rep=rep,
    )
    return batch, logits[slot_context], None if features is None else features[slot_context]


def _ended(
    tokens: torch.Tensor, at_boundary: torch.Tensor | None, t: int, batch: DecodeBatch, rule: StepStopRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_eos [B], done [B]) after token t of each row: done at EOS, at a step boundary
    (at_boundary [B], None when the rows do not stop there) or at the row's budget (only compared
    once t reaches the smallest budget)."""
    is_eos = rule.is_eos[tokens]  # [B]
    done = is_eos if at_boundary is None else is_eos | at_boundary
    if t + 1 >= batch.min_budget:
        done = done | (t + 1 >= batch.budget)
    return is_eos, done


def _finish_codes(is_eos: torch.Tensor, at_boundary: torch.Tensor | None) -> torch.Tensor:
    """Finish code [B] of rows that ended: EOS wins over a boundary, which wins over the length cut."""
    code = torch.full_like(is_eos, _LENGTH, dtype=torch.long)
    if at_boundary is not None:
        code = torch.where(at_boundary, _SEPARATOR, code)
    return torch.where(is_eos, _EOS, code)


def _decode_step(
    model: Any, batch: DecodeBatch, tokens: torch.Tensor, feature_layer: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed each active row's last token [B]; return the next logits [B, V] and, with a
    feature layer, the states that produced them [B, C] (else None)."""
    if isinstance(batch.cache, SharedPrefixCache):
        out = batch.cache.forward(
            model, batch.rows, tokens[:, None], batch.next_position[:, None], **_hidden_state_request(feature_layer)
        )
    else:
        ones = torch.ones((len(tokens), 1), dtype=batch.attention_mask.dtype, device=tokens.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)  # [B, S+1]
        out = model(
            input_ids=tokens[:, None],
            attention_mask=batch.attention_mask,
            position_ids=batch.next_position[:, None],
            past_key_values=batch.cache,
            use_cache=True,
            **_hidden_state_request(feature_layer),
        )
    batch.next_position = batch.next_position + 1
    return out.logits[:, -1, :], _last_features(out, feature_layer)
