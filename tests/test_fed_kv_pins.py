"""Pins of the fed KV (`policies.fed_kv`) and of forked decoding's step scores
(`policies.decode_batch`), found by a mutation review of the in-process decode path:

- `decode_chunk(..., keep_kv=True)` with a context that has no rows (row_context=[1, 1]: context 0
  unused) copies out the fed KV of the rows that ended on a separator, as it does with every
  context used (it raised IndexError when `fed_kv_copier` sized its past by the contexts in use);
- a PrefixKV chain never grows past MAX_CHAIN segments, on the copy path (`copy_fed_kv`, rows
  without a shared prefix) and on the shared-prefix path (`ContextEntries.entry`);
- where the rows of one slot draw different tokens at the step a step head scores (one a
  separator), each row's score is read from the slot it drew in, as with a slot of its own
  (`DecodeBatch.fork` must not renumber the mapping the scoring still reads).

The tiny random Llama, tokenizer and `ScriptedLM` come from test_transformers_policy; the
step-search helpers from test_prefix_cache; the step head and row comparison from
test_forked_decoding.

    .venv/bin/python -m pytest tests/test_fed_kv_pins.py
"""
from __future__ import annotations

import pytest
import torch

import policies.fed_kv as fed_kv
from policies.decode_loop import _SEPARATOR, decode_chunk
from policies.prefix_cache import MAX_CHAIN, PrefixCacheConfig
from test_forked_decoding import BASE, SumHead, assert_same_rows, policy_rule
from test_prefix_cache import assert_same_outputs, policy, run_rounds
from test_transformers_policy import ID, SEP, TOK, ScriptedLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RULE = policy_rule(BASE).rule  # the tokenizer's step rule (the model does not enter it)


def decode(model, contexts, row_context, keep_kv: bool, shared: bool, forked: bool = True, budget: int = 8,
           stop: bool = True, step_head=None):
    return decode_chunk(
        model, contexts, row_context, [budget] * len(row_context), RULE, stop_at_boundary=stop, temperature=1.0,
        top_p=1.0, generator=torch.Generator().manual_seed(3), pad_id=0, keep_kv=keep_kv, step_head=step_head,
        shared_prefix=shared, forked=forked,
    )


# -- keep_kv with a context that has no rows -------------------------------------------------------

CONTEXTS = [TOK(q).input_ids for q in ("<think>1+2=", "<think>12+34=56-7", "<think>5")]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("row_context", [[1, 1, 1], [0, 2, 2]], ids=["first-unused", "middle-unused"])
def test_keep_kv_with_a_context_without_rows_copies_the_fed_kv_of_rows_ending_on_a_separator(row_context, shared):
    # a separator forced at the 4th token of every used context: most rows end on one (a row may end otherwise first)
    model = ScriptedLM(BASE, {len(CONTEXTS[u]) + 3: ID[SEP] for u in set(row_context)})
    plain = decode(model, CONTEXTS, row_context, keep_kv=False, shared=shared)
    kept = decode(model, CONTEXTS, row_context, keep_kv=True, shared=shared)
    assert torch.equal(kept.token_ids, plain.token_ids) and torch.equal(kept.finish, plain.finish)
    assert torch.equal(kept.lengths, plain.lengths)
    ended = (kept.finish == _SEPARATOR).tolist()
    assert sum(ended) >= 2
    # the fed KV of the first row of each (context, fed tokens) that ended on a separator: the KV of
    # its context + its tokens but the last
    keys = [(row_context[r], tuple(kept.token_ids[r, : int(kept.lengths[r]) - 1].tolist())) if ended[r] else None
            for r in range(len(ended))]
    assert [kv is not None for kv in kept.fed_kv] == [k is not None and keys.index(k) == r for r, k in enumerate(keys)]
    for r, kv in enumerate(kept.fed_kv):
        if kv is not None:
            assert kv.length == len(CONTEXTS[row_context[r]]) + int(kept.lengths[r]) - 1
    # the same KV as a chunk of the used contexts alone (no unused context in the request)
    used = sorted(set(row_context))
    alone = decode(model, [CONTEXTS[u] for u in used], [used.index(u) for u in row_context], keep_kv=True,
                   shared=shared)
    assert torch.equal(alone.token_ids, kept.token_ids)
    for x, y in zip(kept.fed_kv, alone.fed_kv):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(torch.cat([s.keys for s in x.segments()], 2),
                                       torch.cat([s.keys for s in y.segments()], 2), atol=1e-5, rtol=1e-5)


# -- MAX_CHAIN on both fed-KV paths ----------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_no_chain_grows_past_max_chain_on_either_fed_kv_path(monkeypatch, shared):
    def search(cap: int):
        monkeypatch.setattr(fed_kv, "MAX_CHAIN", cap)  # the name fed_kv reads (imported from prefix_cache)
        p = policy(PrefixCacheConfig())
        p.shared_prefix = shared
        return p, run_rounds(p, rounds=6, n=2)

    default_policy, default = search(MAX_CHAIN)
    capped_policy, capped = search(3)
    depths = [e.depth for e in capped_policy.prefix_cache._entries.values()]
    assert max(depths) <= 3, f"a chain of {max(depths)} segments with MAX_CHAIN=3"
    assert max(depths) >= 2  # entries do extend earlier ones
    assert max(e.depth for e in default_policy.prefix_cache._entries.values()) > 3  # the cap did cut chains
    assert_same_outputs(capped, default)  # where the KV lives changes nothing generated


# -- step scores where a slot's rows fork --------------------------------------------------------

SAME_LENGTH = [TOK(q).input_ids for q in ("<think>1+2=", "<think>3+4=")]  # 6 tokens each


class EvenSplitLM(ScriptedLM):
    """A `ScriptedLM` whose script names the tokens allowed at a position (an int or a list): they
    keep the same logit, 0, every other token -1e4 there, so a list is drawn evenly."""

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        for row, position in enumerate((kwargs["position_ids"][:, -1] + 1).tolist()):
            if position in self.script:
                logits[row, -1] = -1e4
                logits[row, -1, self.script[position]] = 0.0
        out.logits = logits
        return out


@pytest.mark.parametrize("shared", [True, False])
def test_rows_of_a_slot_forking_at_a_scored_separator_score_as_with_slots_of_their_own(shared):
    # the rows of a context draw 1, then a separator or a 7 (evenly), then 1, then a separator or
    # a 7: the rows of a slot split at tokens 1 and 3, some of them on a boundary the head scores
    length = len(SAME_LENGTH[0])
    split = [ID[SEP], ID["7"]]
    model = EvenSplitLM(BASE, {length: ID["1"], length + 1: split, length + 2: ID["1"], length + 3: split})
    row_context = [u for u in range(len(SAME_LENGTH)) for _ in range(6)]
    forked, alone = (decode(model, SAME_LENGTH, row_context, keep_kv=True, shared=shared, forked=f, budget=6,
                            stop=False, step_head=SumHead()) for f in (True, False))
    assert_same_rows(forked, alone)  # step scores included
    drawn, moved = forked.token_ids.tolist(), []
    for t in (1, 3):
        # the slots (the rows of a context that drew alike so far) whose naming row, their first,
        # drew a 7 and another row a separator: that row moved to a new slot at the step it is scored
        slots: dict[tuple, list[int]] = {}
        for r, u in enumerate(row_context):
            slots.setdefault((u, *drawn[r][:t]), []).append(drawn[r][t])
        moved += [t for tokens in slots.values() if tokens[0] == ID["7"] and ID[SEP] in tokens]
        scored = forked.boundary[:, t]
        assert bool(scored.any()) and bool(torch.isfinite(forked.step_scores[scored, t]).all())
    assert moved, "no separator row left its slot's naming row at a split"
