"""How an external PRM's forwards are planned (`scorers.lm_prm_scorer`): paths that start with the
same tokens (the children of one beam, all the samples of one question) share one forward of
those tokens, and only the rest of each path is forwarded per row.

A step-level search scores each round's new paths whole, so without sharing the PRM forwards every
earlier step again at every depth (quadratic in the depth) and the question once per sample.
`plan_batches` sorts the sequences by their tokens, so paths with a common start lie side by side,
and grows a group while sharing saves tokens: a group of n rows whose common start is L tokens
saves (n - 1) * L; the next sequence joins when n * L' >= (n - 1) * L for the new common start L'
and L' >= min_shared. Each group is forwarded in near-equal batches of at most batch_size rows,
each batch forwarding the shared start once; sequences in no group are batched by length as before. Every
row keeps at least one token of its own (the shared start stops one short of the shortest row).

    batches = plan_batches([ids_a, ids_b, ids_c], batch_size=8)
    forwarded_tokens(batches, [len(ids_a), len(ids_b), len(ids_c)])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MIN_SHARED = 16  # a common start shorter than this is forwarded per row (a separate forward costs more)


@dataclass(frozen=True)
class PRMBatch:
    """One forward of the PRM: rows (indices into the call's sequences) and shared, the number of
    tokens at the start of every row that are forwarded once for all of them (0: none)."""

    rows: tuple[int, ...]
    shared: int = 0


def plan_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, min_shared: int = MIN_SHARED, share: bool = True
) -> list[PRMBatch]:
    """The forwards for sequences (module docstring); empty sequences get none. share=False: batches
    of similar length only, every token forwarded per row."""
    order = sorted((i for i, ids in enumerate(sequences) if ids), key=lambda i: tuple(sequences[i]))
    groups = _groups(sequences, order, min_shared) if share else [([i], 0) for i in order]
    batches, alone = [], []
    for group, shared in groups:
        if len(group) == 1:
            alone.extend(group)
            continue
        parts = -(-len(group) // batch_size)
        for k in range(parts):  # near-equal batches: none of one row while others share
            rows = group[k * len(group) // parts : (k + 1) * len(group) // parts]
            batches.append(PRMBatch(tuple(rows), shared if len(rows) > 1 else 0))
    alone.sort(key=lambda i: len(sequences[i]))
    batches.extend(PRMBatch(tuple(alone[k : k + batch_size])) for k in range(0, len(alone), batch_size))
    return batches


def forwarded_tokens(batches: Sequence[PRMBatch], lengths: Sequence[int]) -> int:
    """Tokens the PRM forwards for batches: each shared start once, each row's rest."""
    return sum(b.shared + sum(lengths[r] - b.shared for r in b.rows) for b in batches)


def _groups(sequences: Sequence[Sequence[int]], order: list[int], min_shared: int) -> list[tuple[list[int], int]]:
    """Runs of the sorted order that share a start, grown while sharing saves tokens, each with
    the tokens its rows all start with (capped one short of its shortest row)."""
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups:
            group, start = groups[-1]
            after = min(start, _prefix_length(sequences[group[-1]], sequences[i]), len(sequences[i]) - 1)
            if after >= min_shared and len(group) * after >= (len(group) - 1) * start:
                group.append(i)
                groups[-1] = (group, after)
                continue
        groups.append(([i], len(sequences[i]) - 1))
    return groups


def _prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
