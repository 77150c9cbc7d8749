"""Decode the chunks of several policy calls as one chunk (each call then takes its own rows back:
`ChunkRun.rows_output`).

Why: under continuous batching (`policies.continuous_engine`) many calls arrive between two
decode steps, each a few contexts with n sample rows. Decoded as separate chunks, each would
cost its own prefill forward, its own sampling and its own pass of the attention per layer;
merged, they share one prefill, one sampling and one attention group, as a lockstep batched
round does. Each call's rows keep their own generator (`ChunkRequest.split_generators`), drawn
in their own row order, so every call samples what it would alone (up to float rounding).

    merged = merge_requests([a, b, c])                # compatible requests (`merge_key`)
    run = ChunkRun(model, merged, rule, pad_id)
    ...                                               # sample / feed; once a's rows are all done:
    out_a = run.rows_output(slice(0, len(a.row_context)))

Tests: `.venv/bin/python -m pytest tests/test_continuous_engine.py`.
"""
from __future__ import annotations

from typing import Hashable, Sequence

from policies.decode_loop import ChunkRequest


def merge_key(request: ChunkRequest) -> Hashable:
    """Requests with equal keys can decode as one chunk: the same stop rule use, sampling
    settings, KV return (and its filter), prefix sharing and forked decoding (their rows differ only in context and
    budget)."""
    return (request.stop_at_boundary, request.temperature, request.top_p, request.keep_kv, request.kv_wanted,
            request.shared_prefix, request.past is None, request.forked, request.repetition_penalty)


def merge_requests(requests: Sequence[ChunkRequest]) -> ChunkRequest:
    """One request for all rows of `requests` (equal `merge_key`, none merged already), call after
    call: contexts and rows concatenated, each call's rows drawing from its own generator."""
    if len({merge_key(r) for r in requests}) != 1 or any(r.split_generators for r in requests):
        raise ValueError("only unmerged requests with equal merge_key can be merged")
    if len(requests) == 1:
        return requests[0]
    contexts, row_context, budgets, past = [], [], [], []
    for request in requests:
        row_context.extend(len(contexts) + u for u in request.row_context)
        contexts.extend(request.contexts)
        budgets.extend(request.budgets)
        past.extend(request.past or ())
    first = requests[0]
    return ChunkRequest(
        contexts, row_context, budgets, first.stop_at_boundary, first.temperature, first.top_p, None,
        past=None if first.past is None else past, keep_kv=first.keep_kv, shared_prefix=first.shared_prefix,
        split_generators=tuple((r.generator, len(r.row_context)) for r in requests), kv_wanted=first.kv_wanted,
        forked=first.forked, repetition_penalty=first.repetition_penalty,
    )
