"""Keep Python's cyclic garbage collector off the objects a search process holds for its whole
life (the modules, classes and functions of torch and transformers, the model, the tokenizer).

Generation allocates many short-lived Python objects (token lists, steps, records), so the
collector runs often, and every full collection walks every tracked object alive: after
`import torch, transformers` and a model load that is ~370k objects, each walk ~10-30 ms.
`gc.freeze()` moves the objects alive now into a permanent generation the collector skips
(reference counting still frees them). Measured on the tiny arith policy, 32 problems, 1 thread
(`python -m experiments.bench_engine_overhead`): ~10% less wall time for Best-of-32 and beam
search alike, part of it inside the model's forward (the collector also runs there).

The command-line entry points call it once at start (`experiments.search`, `.demo`, `.train`,
`.serve` and the engine benchmarks); a library user calls it after loading the model:

    from policies.gc_freeze import freeze_long_lived
    freeze_long_lived()

The price: an object frozen here that later becomes garbage inside a reference cycle is never
collected, so call it once a process has loaded what it keeps, not in a loop that loads and drops
models (`gc.unfreeze()` undoes it; the test suite does after each test).
"""
from __future__ import annotations

import gc


def freeze_long_lived() -> int:
    """Collect the garbage there is, then freeze every object still alive out of the cyclic
    collector's walks. Returns how many objects are frozen in all (`gc.get_freeze_count`)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
