"""One lock per language model object: what runs that model takes turns with whatever else does.

The decode loop switches the model's attention function for a whole chunk
(`policies.shared_prefix.shared_prefix_attention`, a setting on the model's config), so another
forward on the same model object meanwhile (a second policy built on it, `SPRMScorer` on the
reflective model a policy decodes with) would run the switched attention and fail. Both take
`model_lock(lm)` around their work:

    with model_lock(policy.model):   # TransformersPolicy: one chunk
        decode_request(...)
    with model_lock(reflective.lm):  # SPRMScorer: one forward
        reflective(...)

A continuous engine (`policies.continuous_engine`) holds it for each of its steps, so a scorer
takes its turn between two. The lock is re-entrant and kept in a table weakly keyed by the model
object (not on the object: a copy.deepcopy or pickle of the model must not meet a lock).

Tests: `.venv/bin/pytest tests/test_continuous_engine.py -k takes_turns`.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_TABLE_LOCK = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The model object's lock, made on first use (one lock even when two threads ask first at
    once); it goes when the model does."""
    with _TABLE_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock
