"""Tests of forked decoding (`policies.decode_batch`): the rows of a context share one forward per
token until their tokens differ. Every row must sample what it samples with a slot of its own
(same tokens, finish reasons, boundaries, step scores and fed KV; log-probs within float
rounding), while the model forwards fewer rows and `ChunkOutput.fed` still sums to the decode
tokens it ran.

The tiny random Llama, word-level tokenizer and `ScriptedLM` come from test_transformers_policy.

    .venv/bin/python -m pytest tests/test_forked_decoding.py
"""
from __future__ import annotations

import pytest
import torch

from policies import decode_loop
from policies.decode_batch import DecodeBatch
from policies.decode_loop import decode_chunk
from policies.sampling_config import SamplingConfig
from policies.slot_cache import SlotCache
from policies.step_stops import StopState
from policies.transformers_policy import TransformersPolicy
from test_transformers_policy import ID, SEP, TOK, ForwardLog, ScriptedLM, make_model
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = make_model(len(TOK))
CONTEXTS = [TOK(q).input_ids for q in ("<think>1+2=", "<think>12+34=56-7", "<think>5", "9")]


class SumHead:
    """A step head reading layer 1: a sigmoid of the state's sum (any function of the state will do)."""

    feature_layer = 1

    def step_scores(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(features.float().sum(-1) / 10)


def policy_rule(model) -> TransformersPolicy:
    return TransformersPolicy(model, TOK, SamplingConfig(temperature=1.0), prompt_fn=lambda p: p.question)


def decode(model, forked: bool, shared: bool, stop: bool, budgets=None, temperature: float = 1.0, top_p: float = 1.0,
           **extra):
    """One chunk over CONTEXTS, 5 rows each, row budgets 3..14 unless given."""
    row_context = [u for u in range(len(CONTEXTS)) for _ in range(5)]
    budgets = budgets or [3 + (r * 7) % 12 for r in range(len(row_context))]
    p = policy_rule(model)
    return decode_chunk(
        model, CONTEXTS, row_context, budgets, p.rule, stop_at_boundary=stop, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(7), pad_id=0, shared_prefix=shared, forked=forked, **extra,
    )


def assert_same_rows(a, b) -> None:
    """Same tokens (up to each row's length), lengths, finishes, boundaries; log-probs, step
    scores and fed KV within float rounding (the same values summed at another batch size)."""
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finish, b.finish)
    for r, length in enumerate(a.lengths.tolist()):
        assert a.token_ids[r, :length].tolist() == b.token_ids[r, :length].tolist()
        assert a.boundary[r, :length].tolist() == b.boundary[r, :length].tolist()
        torch.testing.assert_close(a.logprobs[r, :length], b.logprobs[r, :length], atol=1e-4, rtol=1e-4)
        if a.step_scores is not None:
            torch.testing.assert_close(a.step_scores[r, :length], b.step_scores[r, :length], equal_nan=True,
                                       atol=1e-4, rtol=1e-4)
    assert [kv is None for kv in a.fed_kv] == [kv is None for kv in b.fed_kv]
    for x, y in zip(a.fed_kv, b.fed_kv):
        if x is not None:
            assert x.length == y.length
            torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("stop", [True, False])
def test_every_row_samples_what_it_would_with_a_slot_of_its_own(shared, stop):
    model = ScriptedLM(BASE, {p: ID[SEP] for p in range(6, 64, 4)})
    forked, alone = (decode(model, f, shared, stop, keep_kv=True, step_head=SumHead()) for f in (True, False))
    assert_same_rows(forked, alone)
    assert forked.step_scores is not None and bool((forked.step_scores == forked.step_scores).any())


@pytest.mark.parametrize("shared", [True, False])
def test_rows_that_decode_alike_share_one_forward_and_fork_with_their_kv(shared):
    # every row of a context is forced to the same first four tokens, then samples freely: the
    # forks copy four decoded columns, which later tokens' log-probs read
    script = {len(ids) + k: ID[c] for ids in CONTEXTS for k, c in enumerate("1+1=")}
    model = ScriptedLM(BASE, script)
    log = ForwardLog(model)
    forked = decode(model, True, shared, stop=False, budgets=[12] * 20)
    decode_calls = log.calls[1:]
    log.calls.clear()
    alone = decode(model, False, shared, stop=False, budgets=[12] * 20)
    assert_same_rows(forked, alone)
    assert [rows for rows, _ in decode_calls[:4]] == [4, 4, 4, 4]  # one row per context until they fork
    assert decode_calls[4][0] > 4  # then the rows that drew differently have their own
    assert sum(rows for rows, _ in decode_calls) < sum(rows for rows, _ in log.calls[1:])
    # ChunkOutput.fed counts each forwarded token once, on one row of the forward
    assert int(forked.fed.sum()) == sum(tokens for _, tokens in decode_calls)
    assert int(alone.fed.sum()) == int((alone.lengths - 1).sum())


def test_top_p_samples_the_same_forked_or_not():
    model = ScriptedLM(BASE, {p: ID[SEP] for p in range(6, 64, 4)})
    assert_same_rows(*(decode(model, f, True, stop=False, top_p=0.8) for f in (True, False)))


def test_kv_growth_keeps_room_for_rows_that_fork_later(monkeypatch):
    monkeypatch.setattr(decode_loop, "STEP_KV_RESERVE", 1)  # every chunk grows its buffers while decoding
    model = ScriptedLM(BASE, {len(ids) + k: ID["7"] for ids in CONTEXTS for k in range(3)})
    assert_same_rows(*(decode(model, f, True, stop=True, budgets=[10] * 20) for f in (True, False)))


def test_greedy_rows_of_a_context_never_fork():
    log = ForwardLog(BASE)
    out = decode(BASE, True, True, stop=False, budgets=[6] * 20, temperature=0.0)
    assert {rows for rows, _ in log.calls[1:]} == {4}
    for u in range(4):
        rows = out.token_ids[5 * u: 5 * u + 5, :6]
        assert (rows == rows[0]).all()


def test_the_policy_counts_each_shared_forward_once():
    model = ScriptedLM(BASE, {p: ID[SEP] for p in range(6, 64, 4)})
    p = TransformersPolicy(model, TOK, SamplingConfig(temperature=0.7, max_step_tokens=8, max_total_tokens=24),
                           prompt_fn=lambda x: x.question)
    log = ForwardLog(model)
    prefixes = [Prefix(Problem(str(k), "<think>" + q)) for k, q in enumerate(("1+2=", "3x4=", "12-5="))]
    for call in (p.propose, p.rollout):
        log.calls.clear()
        out = call(prefixes, 6, seed=1)
        steps = [s for row in out for sample in row for s in (sample if isinstance(sample, list) else [sample])]
        assert sum(s.tokens_forwarded for s in steps) == sum(tokens for _, tokens in log.calls)


# -- the batch's bookkeeping ----------------------------------------------------------------------


def small_batch(row_slot: list[int], budget: list[int]) -> DecodeBatch:
    """A DecodeBatch of len(row_slot) live rows over max(row_slot) + 1 slots of a 1-layer cache
    whose slot s holds the value s in its one decoded column."""
    rows, slots = len(row_slot), max(row_slot) + 1
    keys = torch.zeros(1, rows, 1, 4, 1)
    keys[0, :slots, 0, 0, 0] = torch.arange(slots, dtype=torch.float32)
    cache = SlotCache(keys, keys.clone(), length=1, rows=slots)
    slot_of = torch.tensor(row_slot)
    rep = torch.tensor([row_slot.index(s) for s in range(slots)])
    return DecodeBatch(rows=rep.clone(), cache=cache, attention_mask=None, next_position=torch.arange(slots) + 10,
                       state=StopState(torch.zeros(slots, dtype=torch.long)), live=torch.arange(rows),
                       budget=torch.tensor(budget), row_slot=slot_of, rep=rep)


def test_a_fork_gives_each_new_token_of_a_slot_a_copy_of_its_kv():
    batch = small_batch([0, 0, 0, 1, 1], [5, 5, 5, 5, 5])
    batch.fork(torch.tensor([4, 6, 6, 9, 8]), vocab_size=10)  # slot 0 splits in two, slot 1 in two
    assert batch.row_slot.tolist() == [0, 2, 2, 1, 3]
    assert batch.rows.tolist() == [0, 3, 1, 4]  # each slot named by its lowest row
    assert batch.slot_tokens(torch.tensor([4, 6, 6, 9, 8])).tolist() == [4, 9, 6, 8]
    assert batch.next_position.tolist() == [10, 11, 10, 11]
    assert batch.cache.layers[0].keys[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]  # copies of slots 0 and 1


def test_keep_drops_rows_and_empty_slots_and_folds_back_to_one_row_per_slot():
    batch = small_batch([0, 0, 1, 2], [5, 3, 5, 5])
    index = batch.keep(torch.tensor([True, True, False, True]))  # slot 1 loses its only row
    assert index.tolist() == [0, 2] and batch.forked and batch.row_slot.tolist() == [0, 0, 1]
    assert batch.min_budget == 3
    index = batch.keep(torch.tensor([False, True, True]))  # row 0 leaves: one row per slot again
    assert not batch.forked and batch.live.tolist() == batch.rows.tolist() == [1, 3]
    assert batch.budget.tolist() == [3, 5] and batch.draw_slots is not None
