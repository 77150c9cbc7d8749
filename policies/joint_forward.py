"""One decode forward for the live rows of several chunks at once, each chunk keeping its own KV
cache (a `policies.shared_prefix.SharedPrefixCache`) and sampling state.

Why: continuous batching (`policies.continuous_engine`) lets a policy call's chunk join the
batch between two decode steps of the chunks already running, instead of waiting for the
slowest row of the round. Every chunk's cache has its own prefix width and own-column count, so
the rows cannot share one padded KV tensor without copying it; instead the model runs once over
the concatenated rows (all matmuls of the projections and the MLP at full batch) and only the
attention loops over the chunks (`joint_attention_forward`, each chunk's slice through
`shared_prefix_attention_forward`, exactly as it would decode alone).

    feed_jointly(model, [run_a, run_b])    # ChunkRun's that just `sample`d True; one forward
    run_a.sample(); run_b.sample()         # each from its own rows' logits

A chunk whose rows hold their own copy of the KV (a plain `SlotCache`: models without
shared-prefix attention) is forwarded on its own (`ChunkRun.feed`).

Tests: `.venv/bin/python -m pytest tests/test_continuous_engine.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from policies.decode_loop import ChunkRun
from policies.shared_prefix import SharedPrefixCache, shared_prefix_attention, shared_prefix_attention_forward

JOINT_ATTENTION_NAME = "treesearch_joint_chunks"


class JointCache(Cache):
    """The caches of several chunks for one forward: batch rows [starts[i], starts[i] + sizes[i])
    belong to caches[i]. `update` appends each slice to its own cache and keeps what each returned
    (its rows' own columns) for `joint_attention_forward`."""

    def __init__(self, caches: Sequence[SharedPrefixCache], sizes: Sequence[int]) -> None:
        super().__init__(layers=list(caches[0].layers))  # for transformers' bookkeeping only
        self.caches = list(caches)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + int(size))
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        self.own: list[tuple[torch.Tensor, torch.Tensor]] = []  # per cache, the last update's KV

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each chunk's new columns [b_i, H, 1, D] to its cache; returns the inputs
        (the attention reads `self.own`)."""
        self.own = [
            cache.layers[layer_idx].update(key_states[rows], value_states[rows])
            for cache, rows in zip(self.caches, self.slices)
        ]
        return key_states, value_states


def joint_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: JointCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Decode attention of the concatenated rows (query [B, heads, 1, D]): each chunk's slice over
    its own prefix and columns (`shared_prefix_attention_forward`). Returns ([B, 1, heads, D], None)."""
    if not isinstance(shared_prefix, JointCache):
        raise ValueError("joint attention needs shared_prefix=<the forward's JointCache>")
    outs = [
        shared_prefix_attention_forward(module, query[rows], own_keys, own_values, None, scaling,
                                        shared_prefix=cache)[0]
        for cache, rows, (own_keys, own_values) in zip(shared_prefix.caches, shared_prefix.slices, shared_prefix.own)
    ]
    return torch.cat(outs, dim=0), None


AttentionInterface.register(JOINT_ATTENTION_NAME, joint_attention_forward)


def can_feed_jointly(runs: Sequence[ChunkRun]) -> bool:
    """Whether these chunks can share one forward: each reads its context's KV in place."""
    return all(run.shares_prefix for run in runs)


@torch.inference_mode()
def feed_jointly(model: Any, runs: Sequence[ChunkRun]) -> None:
    """Forward the live rows of every run (each after a `sample` that returned True) in one model
    call when they all share prefixes (else one call per run); each run takes its own rows'
    logits and feature-layer states."""
    if len(runs) == 1 or not can_feed_jointly(runs):
        for run in runs:
            run.feed()
        return
    inputs = [run.feed_inputs() for run in runs]
    for run in runs:
        run.batch.cache.set_slots(run.batch.rows)
    cache = JointCache([run.batch.cache for run in runs], [int(ids.shape[0]) for ids, _ in inputs])
    layer = runs[0].layer
    extra = {} if layer is None else {"output_hidden_states": True}
    with shared_prefix_attention(model, JOINT_ATTENTION_NAME):
        out = model(
            input_ids=torch.cat([ids for ids, _ in inputs]), position_ids=torch.cat([pos for _, pos in inputs]),
            past_key_values=cache, use_cache=True, shared_prefix=cache, **extra,
        )
    logits = out.logits[:, -1, :]
    features = None if layer is None else out.hidden_states[layer][:, -1, :]
    for run, rows in zip(runs, cache.slices):
        run.take_forward(logits[rows], None if features is None else features[rows])
