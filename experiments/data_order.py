"""The order the joint trainer (`experiments.train`) draws its problems and seeds in: pure
functions of the run's seed and a position, so a resumed run draws what an uninterrupted one
would have.

    stream_indices(start=8, count=4, size=40, seed=0)   # positions 8..11 of shuffled epochs of range(40)
    derived_seed(seed, "rollout", step, rank)          # a 31-bit seed of its parts

A module of its own, not experiments/train.py's: under `hydra/launcher=local` the job function of
`python -m experiments.train` is pickled by value into joblib's workers (its module is
`__main__`), and the cached `epoch_order` there, pickled by reference to a `__main__` the
workers lack, failed every job before it started ("Can't get attribute '_epoch_order'").

Tests: `.venv/bin/pytest tests/test_train_loop.py -k stream`.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any

import torch


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed that is a pure function of parts (e.g. seed, "rollout", step, rank)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    """One epoch's shuffle of range(size), drawn from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    return tuple(torch.randperm(size, generator=generator).tolist())


def stream_indices(start: int, count: int, size: int, seed: int) -> list[int]:
    """Positions [start, start + count) of an endless stream of shuffled epochs of range(size)."""
    return [epoch_order(seed, pos // size, size)[pos % size] for pos in range(start, start + count)]
