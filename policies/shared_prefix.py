"""Decode attention over a shared prefix: the sample rows of one context read that context's KV
once, instead of each row holding (and attention reading) its own copy.

Why: Best-of-N draws N samples of one prompt and beam search M of each kept path. With one KV
row per sample, a chunk first copies each context's KV into all of its rows (`slot_cache`), and
every decode step's attention then reads those copies: on a CPU, decode attention is bound by
memory reads, and at 256 rows of the tiny policy it took half of each step (8.4 ms of a layer's
attention vs 4.8 ms here with M = 4 rows per context, 2.4 ms with 32;
`python -m experiments.bench_shared_prefix` times whole searches both ways).

How: the prefill's cache holds one row per context (U rows, left-padded, `prefix_mask` marks the
real columns); a `SharedPrefixCache` keeps it as the prefix and holds only each sample row's own
new columns (a `SlotCache` of R rows that starts empty; every row of a chunk decodes in lockstep,
so its columns need no padding). `shared_prefix_attention` scatters each row's query into its
context's group ([U, G rows, ...]), multiplies the group by the context's prefix keys once, and
gathers the scores back per row, next to the row's own columns; softmax over both; the values
likewise. Per row this is exactly attention over [prefix | own columns].

    if worth_sharing(model, row_context):                        # the model allows it, groups are even
        cache = SharedPrefixCache.over(prefilled, prefix_mask, row_context, reserve=64)
        out = cache.forward(model, slot_rows, tokens[:, None], positions[:, None])  # one decode step
        index = cache.keep(~done)                                 # drop finished rows (slots move)
        cache.release()
`forward` says which chunk row each batch slot holds (`set_slots`), switches the model's attention
to `shared_prefix_attention_forward` for the call and passes the cache as its `shared_prefix`.

`supports_shared_prefix(model)` says whether a model can use it (plain full attention whose
modules read the model's config: Llama, Qwen2/3, SmolLM2, the tiny policy); the decode loop
falls back to one KV row per sample otherwise.

Tests: `.venv/bin/python -m pytest tests/test_shared_prefix.py`.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from collections import Counter
from typing import Any, Iterator, Sequence

import torch
from transformers import AttentionInterface

from policies.prefix_cache import PrefixKV
from policies.slot_cache import KV_POOL, SlotCache

ATTENTION_NAME = "treesearch_shared_prefix"
_PLAIN_ATTENTION = ("sdpa", "eager")  # implementations whose math this one reproduces


class SharedPrefixCache(SlotCache):
    """The KV of a chunk's sample rows: per context its prefill KV (`layer_prefix(layer)`,
    [U, kv_heads, P, head_dim], one row per context), per sample row its own decoded columns (the
    `SlotCache` part: R rows, `length` columns, the same for every row).

    prefix_mask: [U, P] bool, True on real (not left-padding) prefix columns.
    row_context: [R] long, the context of each chunk row. `set_slots` says which chunk row each
        batch slot holds now; slot_rank [B] is then each slot's index among its context's slots
        (< group, the most slots of one context), so the attention's per-context groups shrink
        as rows leave.
    keys, values: the rows' own buffers [L, R, kv_heads, capacity, head_dim] (empty at first).
    prefilled: the cache the prefix views belong to, released with this one when it is a
        pooled `SlotCache`."""

    def __init__(
        self, prefix: Sequence[tuple[torch.Tensor, torch.Tensor]], prefix_mask: torch.Tensor,
        row_context: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefilled: Any = None,
        slots: torch.Tensor | None = None,
    ) -> None:
        slots = torch.arange(int(row_context.numel()), device=row_context.device) if slots is None else slots
        super().__init__(keys, values, 0, rows=int(slots.numel()))
        self.prefix = list(prefix)
        self._prefilled = prefilled
        self.prefix_mask = prefix_mask
        self.row_context = row_context
        self.contexts = int(prefix_mask.shape[0])
        self.set_slots(slots)

    @classmethod
    def over(
        cls, prefilled: Any, prefix_mask: torch.Tensor, row_context: torch.Tensor, reserve: int,
        slots: torch.Tensor | None = None,
    ) -> "SharedPrefixCache":
        """A cache over a prefill's cache (U rows; a DynamicCache or a SlotCache, kept, not
        copied) for the rows `row_context` [R], with `reserve` columns per row allocated ahead.
        slots: the chunk rows the first slots hold (default every row, in order; fewer when rows
        that decode alike share a slot until they fork, `policies.decode_batch`)."""
        layers = prefilled.layers
        sample = layers[0].keys  # [U, H, P, D]
        shape = (len(layers), int(row_context.numel()), int(sample.shape[1]), max(int(reserve), 1), int(sample.shape[3]))
        keys, values = (KV_POOL.take(shape, sample.dtype, sample.device) for _ in range(2))
        return cls([(layer.keys, layer.values) for layer in layers], prefix_mask.bool(), row_context, keys, values, prefilled,
                   slots)

    def set_slots(self, rows: torch.Tensor) -> None:
        """Batch slot b holds chunk row rows[b] (after `move_rows` reordered them): the context,
        rank among its context's slots and prefix mask of each slot, for the next forward (nothing
        to do for the rows tensor of the last call: the decode loop replaces it when rows change)."""
        if rows is getattr(self, "_slot_rows", None):
            return
        self._slot_rows = rows
        self.slot_context = self.row_context[rows]  # [B]
        self.slot_rank, self.group = _ranks_within(self.slot_context)  # [B], the most slots of a context
        self.slot_prefix_mask = self.prefix_mask[self.slot_context]  # [B, P]

    def forward(self, model: Any, rows: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        """One decode forward of `model` over this cache: slot b holds chunk row rows[b] and feeds
        input_ids[b] [B, 1] at position_ids[b] [B, 1]; kwargs go to the model (e.g.
        output_hidden_states). Returns the model's output."""
        self.set_slots(rows)
        with shared_prefix_attention(model):
            return model(input_ids=input_ids, position_ids=position_ids, past_key_values=self, use_cache=True,
                         shared_prefix=self, **kwargs)

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prefix keys and values, [U, kv_heads, P, head_dim] each."""
        return self.prefix[layer]

    def prefix_kv(self, context: int, columns: torch.Tensor | slice, parent: PrefixKV | None = None) -> PrefixKV:
        """A PrefixKV (a copy, on the model's device) of one context's prefix columns (`columns`:
        indices [n], or a slice of one contiguous span: then, over a pooled prefill cache, one
        copy of all layers at once)."""
        if isinstance(columns, slice) and isinstance(self._prefilled, SlotCache):
            return self._prefilled.row_kv_span(context, columns, parent)
        keys = torch.stack([k[context][:, columns] for k, _ in self.prefix])  # stack copies: no views kept
        values = torch.stack([v[context][:, columns] for _, v in self.prefix])
        return PrefixKV(keys, values, parent)

    def release(self) -> None:
        """Hand the row buffers (and a pooled prefill cache's) back to KV_POOL."""
        super().release()
        if isinstance(self._prefilled, SlotCache):
            self._prefilled.release()
        self.prefix = []


def _ranks_within(row_context: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rank [R] of each row among the rows of its context, in row order; the largest group)."""
    if not row_context.numel():
        return row_context.clone(), 1
    order = torch.argsort(row_context, stable=True)
    sorted_context = row_context[order]
    counts = torch.bincount(sorted_context)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each context
    rank = torch.empty_like(row_context)
    rank[order] = torch.arange(int(row_context.numel()), device=row_context.device) - starts[sorted_context]
    return rank, int(counts.max()) if counts.numel() else 1


def shared_prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefixCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over [its context's prefix | its own columns].

    query [B, heads, 1, D]; key / value [B, kv_heads, t, D]: the rows' own columns (what the
    cache's update returned, this token's included). Returns ([B, 1, heads, D], None) as
    transformers' attention functions do. The prefix is read once per context: queries are
    grouped [U, kv_heads, G * q_per_kv, D] for one matmul per context and head."""
    if shared_prefix is None or query.shape[2] != 1:
        raise ValueError("shared_prefix attention decodes one token per row and needs shared_prefix=<its cache>")
    cache = shared_prefix
    prefix_keys, prefix_values = cache.layer_prefix(module.layer_idx)  # [U, Hkv, P, D]
    rows, heads, _, dim = query.shape
    kv_heads, width = int(key.shape[1]), int(prefix_keys.shape[2])
    per_kv = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(rows, kv_heads, per_kv, dim)  # head h reads kv head h // per_kv
    context, rank = cache.slot_context, cache.slot_rank
    grouped = _scatter_groups(q, context, rank, cache.contexts, cache.group)  # [U, Hkv, G*g, D]
    prefix_scores = _rows_of(torch.matmul(grouped, prefix_keys.transpose(-1, -2)), context, rank, cache.group, per_kv)
    prefix_scores = prefix_scores.masked_fill(~cache.slot_prefix_mask[:, None, None, :], float("-inf"))  # [B, Hkv, g, P]
    own_scores = torch.matmul(q, key.transpose(-1, -2))  # [B, Hkv, g, t]
    probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float() * scale, dim=-1).to(q.dtype)
    prefix_probs, own_probs = probs[..., :width], probs[..., width:]
    grouped_probs = _scatter_groups(prefix_probs, context, rank, cache.contexts, cache.group)  # [U, Hkv, G*g, P]
    out = _rows_of(torch.matmul(grouped_probs, prefix_values), context, rank, cache.group, per_kv)  # [B, Hkv, g, D]
    out = out + torch.matmul(own_probs, value)
    return out.reshape(rows, 1, heads, dim), None


def _scatter_groups(x: torch.Tensor, context: torch.Tensor, rank: torch.Tensor, contexts: int, group: int) -> torch.Tensor:
    """Per-row x [B, Hkv, g, n] -> per-context [U, Hkv, G * g, n] (row b at group slot rank[b] of
    context[b]; empty slots are zeros)."""
    rows, kv_heads, per_kv, n = x.shape
    out = x.new_zeros((contexts, group, kv_heads, per_kv, n))
    out[context, rank] = x
    return out.permute(0, 2, 1, 3, 4).reshape(contexts, kv_heads, group * per_kv, n)


def _rows_of(x: torch.Tensor, context: torch.Tensor, rank: torch.Tensor, group: int, per_kv: int) -> torch.Tensor:
    """Per-context [U, Hkv, G * g, n] -> per-row [B, Hkv, g, n] (the inverse of _scatter_groups)."""
    contexts, kv_heads, _, n = x.shape
    return x.view(contexts, kv_heads, group, per_kv, n).permute(0, 2, 1, 3, 4)[context, rank]


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)


def worth_sharing(model: Any, row_context: Sequence[int]) -> bool:
    """Whether rows with these contexts should decode over a shared prefix: the model supports it
    and the groups are even."""
    return supports_shared_prefix(model) and groups_are_even(row_context)


def groups_are_even(row_context: Sequence[int], slack: float = 2.0) -> bool:
    """Whether contexts x the most rows of one context is at most `slack` x the rows: shared-prefix
    attention pads every context's group of queries to the largest, so one context with many
    rows among many with few would multiply its prefix work (Best-of-N, beam search and MCTS ask
    the same n of every context; a chunk boundary leaves one group short)."""
    counts = Counter(row_context)
    return len(counts) * max(counts.values(), default=0) <= slack * max(len(row_context), 1)


def supports_shared_prefix(model: Any) -> bool:
    """Whether `model` can decode with `shared_prefix_attention`: its attention is plain full
    attention (sdpa or eager; no sliding window, logit soft-capping or sinks) over keys and values
    of one width (not MLA's), every attention module reads the model's own config (where the
    context manager switches the implementation), and its type is none of UNSHARED_MODEL_TYPES."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in _PLAIN_ATTENTION:
        return False
    if getattr(config, "model_type", None) in UNSHARED_MODEL_TYPES or has_latent_attention(config):
        return False
    if getattr(config, "attn_logit_softcapping", None) or has_sliding_window(config):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    return _attention_reads_config(model, config)


# model types whose layers cannot take the shared prefix, found by comparing log-probs with a plain
# forward (transformers 5.19): StableLM's and Nemotron's decoder layers do not pass attention's
# keyword arguments on (their first decode step failed); DiffLlama splits the values in halves
# before attending (its log-probs were wrong, in silence)
UNSHARED_MODEL_TYPES: frozenset[str] = frozenset({"stablelm", "nemotron", "diffllama"})


def has_latent_attention(config: Any) -> bool:
    """Whether a model config caches compressed attention (DeepSeek-V2/V3's MLA: kv_lora_rank),
    whose cached keys and values differ in width: no shared prefix, no prefix cache."""
    return bool(getattr(config, "kv_lora_rank", None))


def has_sliding_window(config: Any) -> bool:
    """Whether a model config has layers that attend within a sliding window (Qwen2's
    use_sliding_window, Gemma-2's sliding layers, Mistral's sliding_window): its attention is then
    measured in KV columns, so a pad between two tokens shifts the window."""
    if getattr(config, "use_sliding_window", None):
        return True
    if any(kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or ()):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


# model -> (id of the config checked, result): the module walk costs ~0.4 ms on a small model,
# paid once per model instead of once per chunk (tiny beam search: 17 chunks, 0.2% of its wall)
_READS_CONFIG: "weakref.WeakKeyDictionary[Any, tuple[int, bool]]" = weakref.WeakKeyDictionary()


def _attention_reads_config(model: Any, config: Any) -> bool:
    """Whether the model has attention modules and each reads `config` (the model's own)."""
    known = _READS_CONFIG.get(model)
    if known is not None and known[0] == id(config):
        return known[1]
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "o_proj")]
    result = bool(attention) and all(m.config is config for m in attention)
    _READS_CONFIG[model] = (id(config), result)
    return result


@contextmanager
def shared_prefix_attention(model: Any, name: str = ATTENTION_NAME) -> Iterator[None]:
    """Within the block, the model's attention is the registered function `name` (by default
    `shared_prefix_attention_forward`; `policies.joint_forward` passes its own) (and
    transformers builds no mask: the function masks the prefix itself). The switch is on the
    model's config, so no other thread may run the same model meanwhile (the decode loop and the
    policy service's single worker thread do not). Within a block that switched to `name`
    already (`policies.decode_loop.decode_request` holds it for a whole chunk), this one does
    nothing: the switch runs transformers' config setter, ~50 us a time on a CPU."""
    config = model.config
    previous = config._attn_implementation
    if previous == name:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
