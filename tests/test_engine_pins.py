"""Pins for continuous-engine, buffer-pool and rollout-batch behaviours that a mutation review
found unpinned elsewhere.

What is pinned: the continuous engine never feeds more live rows in one forward than max_rows
when several held calls are queued (only the first call is admitted past the limit, and only
when nothing runs), admits a call whose rows exactly fill what is free, admits queued calls
first come first served, and refuses max_rows=0; `BufferPool.take` only reuses a free buffer of
the requested dtype; `RolloutBatch.groups` keeps exactly the steps of its rows; a rollout's
finish is its last step's, and its path score is None unless every step is scored.

The engine tests use the scripted tiny Llama policy of test_prefix_cache (separator every third
position), calls lined up with `engine.hold()` as test_continuous_engine does; the rest build
records by hand. Each test runs in well under a second on one CPU core.

Run: `.venv/bin/python -m pytest tests/test_engine_pins.py`
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

import policies.continuous_engine as continuous_engine
from policies.continuous_engine import ContinuousEngine
from policies.kv_pool import BufferPool
from policies.rollout_batch import RolloutBatch, _rollout, outcome_reward
from test_prefix_cache import policy
from test_transformers_policy import mixed_prefixes
from treesearch.records import Step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def record_peak_rows(monkeypatch) -> list[int]:
    """The live rows of every joint forward the engine makes from now on (one entry a forward)."""
    fed: list[int] = []
    feed = continuous_engine.feed_jointly

    def recording(model, runs):
        fed.append(sum(run.live_rows for run in runs))
        return feed(model, runs)

    monkeypatch.setattr(continuous_engine, "feed_jointly", recording)
    return fed


def queue_while_held(engine: ContinuousEngine, work, count: int) -> None:
    """work(k) for k < count, each in its own thread, queued one after another (in order k) while
    the engine holds, so they are admitted together on release; returns when all have returned.
    Thread k is named str(k)."""
    threads = [threading.Thread(target=work, args=(k,), name=str(k)) for k in range(count)]
    with engine.hold():
        for k, thread in enumerate(threads):
            thread.start()
            deadline = time.monotonic() + 30  # a bound on a broken engine, not a synchronisation
            while engine.queued < k + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert engine.queued == k + 1
    for thread in threads:
        thread.join()


def propose_rows(p, rows: int):
    """work(k): one propose call of `rows` sample rows from mixed prefix k, to the end."""
    prefixes = mixed_prefixes()
    outputs: dict[int, object] = {}

    def work(k: int) -> None:
        outputs[k] = p.propose([prefixes[k]], rows, seed=k, stop_at_step=False)

    return work, outputs


def test_held_calls_never_feed_more_live_rows_than_max_rows(monkeypatch):
    """Three calls of 3 rows with max_rows (batch_size) 4: one runs at a time, so no forward feeds
    more than 3 rows (admitting beside the running rows without counting them, or admitting every
    queued call while nothing runs, fed all 9 at once)."""
    fed = record_peak_rows(monkeypatch)
    p = policy(None, batch_size=4, temperature=1.0)
    work, outputs = propose_rows(p, 3)
    with ContinuousEngine.attached(p) as engine:
        queue_while_held(engine, work, 3)
    assert sorted(outputs) == [0, 1, 2]
    assert fed and max(fed) == 3


def test_calls_whose_rows_exactly_fill_max_rows_run_in_one_forward(monkeypatch):
    """Two calls of 2 rows with max_rows 4: both are admitted at once (2 <= 2 free), so the first
    forward feeds all 4 rows."""
    fed = record_peak_rows(monkeypatch)
    p = policy(None, batch_size=4, temperature=1.0)
    work, outputs = propose_rows(p, 2)
    with ContinuousEngine.attached(p) as engine:
        queue_while_held(engine, work, 2)
    assert sorted(outputs) == [0, 1]
    assert fed[0] == 4 and max(fed) == 4


def test_queued_calls_are_admitted_first_come_first_served():
    """Four calls of 3 rows queued in order 0..3 with max_rows 3 (one call at a time): the engine
    starts (and so finishes) them in the order they were queued."""
    p = policy(None, batch_size=3, temperature=1.0)
    prefixes = mixed_prefixes()
    sent: list[tuple[int, object]] = []  # (call, its chunk request), in the callers' threads
    started: list[int] = []  # calls in the order the engine merged (started) their chunks
    merge = continuous_engine.merge_requests

    def recording_merge(requests):
        started.extend(next(k for k, sent_request in sent if sent_request is r) for r in requests)
        return merge(requests)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(continuous_engine, "merge_requests", recording_merge)
        with ContinuousEngine.attached(p) as engine:
            decode = p.chunk_decoder

            def tagging_decoder(request):
                sent.append((int(threading.current_thread().name), request))
                return decode(request)

            p.chunk_decoder = tagging_decoder

            def work(k: int) -> None:
                p.propose([prefixes[k]], 3, seed=k, stop_at_step=False)

            queue_while_held(engine, work, 4)
    assert started == [0, 1, 2, 3]


def test_an_engine_of_zero_rows_is_refused_naming_max_rows():
    p = policy(None)
    with pytest.raises(ValueError, match="max_rows"):
        engine = ContinuousEngine(p.model, p.rule, p.pad_id, None, 0)
        engine.close()


def test_take_never_serves_a_free_buffer_of_another_dtype():
    """A pooled float32 buffer large enough is not reused for a bfloat16 request (and is still
    there for the next float32 one)."""
    pool = BufferPool()
    pool.give(pool.take((2, 8), torch.float32, "cpu"))
    half = pool.take((2, 4), torch.bfloat16, "cpu")
    assert half.dtype == torch.bfloat16 and half.shape == (2, 4)
    assert pool.allocations == 2
    again = pool.take((2, 8), torch.float32, "cpu")
    assert again.dtype == torch.float32 and pool.allocations == 2


def test_groups_keep_exactly_their_rows_steps():
    """Four rollouts in groups of 2, one step each: every group's step_rows lie inside its rows,
    and the groups together give every step exactly once."""
    rows, width, group_size = 4, 5, 2
    batch = RolloutBatch(
        torch.zeros(rows, width, dtype=torch.long), torch.ones(rows, width, dtype=torch.long),
        torch.ones(rows, width - 1), None,
        torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size,
    )
    steps = []
    for g in range(batch.num_groups):
        part = batch.groups(g, g + 1)
        assert all(0 <= r < part.num_rows for r in part.step_rows.tolist())
        steps += [(r + g * group_size, c) for r, c in zip(part.step_rows.tolist(), part.step_cols.tolist())]
    assert steps == list(zip(batch.step_rows.tolist(), batch.step_cols.tolist()))


def two_steps(last_finish: str = "length") -> list[Step]:
    return [
        Step("1+2=3\n\n", (5, 6), (-0.1, -0.2), "separator"),
        Step("The answer is 3", (7, 8), (-0.1, -0.2), last_finish),
    ]


def test_a_rollout_finishes_as_its_last_step_does():
    """Steps ending separator then length: the rollout was cut at the limit ("length"), so a
    wrong final answer earns the truncated-wrong reward, 0.1."""
    r = _rollout("p", [1, 2], two_steps("length"))
    assert r.finish == "length"
    assert outcome_reward(False, r, True) == pytest.approx(0.1)
    assert _rollout("p", [1, 2], two_steps("eos")).finish == "eos"


def test_a_path_with_an_unscored_step_has_no_path_score():
    first, last = two_steps("eos")
    assert _rollout("p", [1, 2], [replace(first, score=0.8), last]).path_score is None
    assert _rollout("p", [1, 2], [first, replace(last, score=0.8)]).path_score is None
    scored = _rollout("p", [1, 2], [replace(first, score=0.8), replace(last, score=0.8)])
    assert scored.path_score == pytest.approx(0.8)
