"""Tests of continuous batching (`policies.continuous_engine`, `policies.chunk_merge`,
`policies.joint_forward`, `treesearch.concurrent`): policy calls made from many threads at once
through the engine give what each call gives alone (merged into one chunk, fed jointly with
other chunks, joining while others run; with and without the prefix cache, greedy and sampled,
with an SPRM head); a step-level search run per problem in threads equals one problem at a time;
a failing call fails alone and the engine keeps serving; split draws equal separate generators.

The tiny random Llama, word-level tokenizer and `ScriptedLM` (a separator every third position)
come from test_transformers_policy / test_prefix_cache.

    .venv/bin/python -m pytest tests/test_continuous_engine.py
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from policies.chunk_merge import merge_requests
from policies.continuous_engine import ContinuousEngine
from policies.decode_loop import ChunkRequest
from policies.prefix_cache import PrefixCacheConfig, PrefixKV
from policies.sampling import SplitDraws
from scorers.confidence import ConfidenceScorer
from test_concurrent_pins import stub_result
from test_prefix_cache import assert_same_outputs, children, policy
from test_reflective_policy import SCORER as SHARED_MODEL_SCORER, policy as reflective_policy
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from test_prefix_cache import BASE
from test_transformers_policy import TOK, ScriptedLM, mixed_prefixes
from treesearch.concurrent import problem_seed, search_each, seeded_for
from treesearch.registry import get_strategy
from treesearch.records import Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# (prefix indices into mixed_prefixes(), n, seed, stop_at_step): two kinds of call, so the engine
# runs two cohorts (propose to a step end, propose to the end) and feeds them jointly
CALLS = [([0, 1], 3, 0, True), ([2], 4, 1, True), ([3, 0], 2, 2, False), ([1, 2, 3], 3, 3, True), ([1], 5, 4, False)]


def _call(p, prefixes, spec):
    indices, n, seed, stop = spec
    return p.propose([prefixes[i] for i in indices], n, seed=seed, stop_at_step=stop)


def _in_threads(p, engine, prefixes, calls, late=()):
    """Every call in its own thread: `calls` lined up while the engine holds, so they are
    admitted together; `late` ones start once those run. Outputs in order, calls then late."""
    outputs: dict[int, object] = {}

    def worker(k, spec):
        outputs[k] = _call(p, prefixes, spec)

    threads = [threading.Thread(target=worker, args=(k, spec)) for k, spec in enumerate(calls)]
    with engine.hold():
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.queued < len(calls) and time.monotonic() < deadline:
            time.sleep(0.001)
    later = [threading.Thread(target=worker, args=(len(calls) + k, spec)) for k, spec in enumerate(late)]
    for thread in later:
        thread.start()
    for thread in threads + later:
        thread.join()
    return [outputs[k] for k in range(len(calls) + len(late))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("cache", [None, PrefixCacheConfig()])
def test_concurrent_calls_equal_each_call_alone(temperature, cache):
    prefixes = mixed_prefixes()
    alone = [_call(policy(cache, temperature=temperature), prefixes, spec) for spec in CALLS + CALLS[:2]]
    p = policy(cache, temperature=temperature)
    with ContinuousEngine.attached(p) as engine:
        together = _in_threads(p, engine, prefixes, CALLS, late=CALLS[:2])
    for a, b in zip(alone, together, strict=True):  # a dropped problem is a failure
        assert_same_outputs([a], [b])
    assert engine.most_cohorts >= 2  # the two kinds of call shared forwards
    assert p.chunk_decoder == p._decode_here  # detached again


def test_rounds_of_a_step_search_through_the_engine_reuse_prefixes_and_match():
    """Two rounds: the second extends the first's children from the prefix cache."""
    prefixes = mixed_prefixes()
    alone_policy, p = policy(PrefixCacheConfig()), policy(PrefixCacheConfig())
    first_alone = alone_policy.propose(prefixes, 3, seed=0)
    second_alone = alone_policy.propose(children(prefixes, first_alone), 2, seed=1)
    with ContinuousEngine.attached(p):
        first = p.propose(prefixes, 3, seed=0)
        second = p.propose(children(prefixes, first), 2, seed=1)
    assert_same_outputs([first_alone, second_alone], [first, second])
    assert p.prefix_cache.stats().hits > 0


def test_an_engine_gives_its_threads_memory_back_when_it_stops(monkeypatch):
    # attached once per chunk, the engine's new threads each kept a malloc arena of freed memory:
    # RSS grew 412 -> 892 MiB over 160 searches (~470, level, with the trim)
    from policies import allocator, continuous_engine

    trims: list[bool] = []
    monkeypatch.setattr(continuous_engine, "release_freed_memory", lambda: trims.append(True) or True)
    p = policy(PrefixCacheConfig())
    with ContinuousEngine.attached(p):
        p.propose(mixed_prefixes(), 2, seed=0)
        assert trims == []
    assert trims == [True]
    assert isinstance(allocator.release_freed_memory(), bool)


def test_two_engines_attached_at_once_restore_the_pool_when_the_last_one_stops():
    from policies.slot_cache import KV_POOL

    settings = (KV_POOL.max_free, KV_POOL.drop_smaller)
    first = ContinuousEngine.attached(policy(PrefixCacheConfig()))
    second = ContinuousEngine.attached(policy(PrefixCacheConfig()))
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the second engine still runs: its pool keeps every size
    assert KV_POOL.drop_smaller is False
    second.__exit__(None, None, None)
    assert (KV_POOL.max_free, KV_POOL.drop_smaller) == settings


def test_blocks_on_one_policy_that_end_out_of_order_leave_it_on_a_live_engine():
    # each block restored the decoder it found: A ends, B's searches went on without B's engine;
    # B ends and the policy was left on A's closed engine ("the continuous engine is closed")
    shared = policy(PrefixCacheConfig())
    own = shared.chunk_decoder
    first, second = ContinuousEngine.attached(shared), ContinuousEngine.attached(shared)
    a = first.__enter__()
    b = second.__enter__()
    first.__exit__(None, None, None)
    assert shared.chunk_decoder == b.decode  # the block still open decodes
    second.__exit__(None, None, None)
    assert shared.chunk_decoder == own
    spec = get_strategy("beam_search")
    assert spec.fn([Problem("p", "1+2=")], shared, ConfidenceScorer(), spec.config(seed=1, n=2, beam_width=1))
    assert a.decode != b.decode


def test_step_head_scores_through_the_engine_equal_alone():
    prefixes = mixed_prefixes()
    alone = [_call(reflective_policy(temperature=1.0), prefixes, spec) for spec in CALLS]
    p = reflective_policy(temperature=1.0)
    with ContinuousEngine.attached(p) as engine:
        together = _in_threads(p, engine, prefixes, CALLS)
    for a, b in zip(alone, together, strict=True):  # a dropped problem is a failure
        assert_same_outputs([a], [b])
        scores_a = [s.score for row in a for s in row]
        scores_b = [s.score for row in b for s in row]
        assert scores_a == pytest.approx(scores_b, abs=1e-4) and any(x is not None for x in scores_a)


@pytest.mark.parametrize("strategy,settings", [
    ("beam_search", dict(n=4, beam_width=2, max_depth=4)),
    ("mcts", dict(iterations=6, expand_width=2, leaves_per_round=2, max_depth=4)),
    ("best_of_n", dict(n=4)),
    ("rebase", dict(n=4, max_depth=4)),  # rounds of several widths: one propose_widths call
    ("particle_filtering", dict(n=4, max_depth=4)),
    ("dvts", dict(n=4, beam_width=2, max_depth=4, lookahead=1)),  # greedy lookahead: with_temperature's copy
])
def test_a_search_per_problem_in_threads_equals_one_problem_at_a_time(strategy, settings):
    problems = [Problem(f"p{i}", f"<think>{i}+{i + 1}=") for i in range(5)]
    spec = get_strategy(strategy)
    cfg = spec.config(seed=3, **settings)
    alone = [spec.fn([q], policy(PrefixCacheConfig()), ConfidenceScorer(), seeded_for(cfg, q))[0] for q in problems]
    p = policy(PrefixCacheConfig())
    with ContinuousEngine.attached(p) as engine:
        together = search_each(spec.fn, problems, p, ConfidenceScorer(), cfg)
    assert [r.problem.id for r in together] == [q.id for q in problems]
    for a, b in zip(alone, together, strict=True):  # a dropped problem is a failure
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert a.chosen == b.chosen
        assert a.compute.tokens_generated == b.compute.tokens_generated
    assert engine.forwards > 0


def test_each_problem_draws_with_its_own_seed():
    # with the call's seed itself, a repeated question got the same candidates under each id
    twins = [Problem("a", "<think>3+4="), Problem("b", "<think>3+4=")]
    cfg = get_strategy("best_of_n").config(seed=3, n=4)
    p = policy(PrefixCacheConfig())
    with ContinuousEngine.attached(p):
        a, b = search_each(get_strategy("best_of_n").fn, twins, p, ConfidenceScorer(), cfg)
    assert [c.text for c in a.candidates] != [c.text for c in b.candidates]
    assert seeded_for(cfg, twins[0]).seed == problem_seed(3, "a") != problem_seed(3, "b")
    assert seeded_for(None, twins[0]) is None and seeded_for({"seed": 3}, twins[0]) == {"seed": 3}


@pytest.mark.parametrize("strategy,settings", [
    ("beam_search", dict(n=4, beam_width=2, max_depth=4)),
    ("best_of_n", dict(n=4)),
])
def test_a_search_per_problem_in_threads_without_an_engine_equals_one_problem_at_a_time(strategy, settings):
    """Without an engine the threads' chunks decode one at a time on the shared model
    (`policies.model_lock`), so the results are those of one problem at a time."""
    problems = [Problem(f"p{i}", f"<think>{i}+{i + 1}=") for i in range(6)]
    spec = get_strategy(strategy)
    cfg = spec.config(seed=3, **settings)
    alone = [spec.fn([q], policy(PrefixCacheConfig()), ConfidenceScorer(), seeded_for(cfg, q))[0] for q in problems]
    together = search_each(spec.fn, problems, policy(PrefixCacheConfig()), ConfidenceScorer(), cfg)
    for a, b in zip(alone, together, strict=True):  # a dropped problem is a failure
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert a.chosen == b.chosen


@pytest.mark.parametrize("engine", [False, True])
def test_a_scorer_on_the_policys_own_model_object_takes_turns_with_its_decoding(engine):
    """SPRMScorer on the reflective model a policy decodes with (a second forward, e.g. to check
    in-generation scores): its forwards ran the policy's switched attention from another thread
    and failed ("shared_prefix attention decodes one token per row ..."); they now take turns
    (`policies.model_lock`), so the results are those of one problem at a time."""
    problems = [Problem(f"p{i}", f"<think>{i}+{i + 1}=") for i in range(6)]
    spec = get_strategy("beam_search")
    cfg = spec.config(seed=3, n=4, beam_width=2, max_depth=4)
    alone = [spec.fn([q], reflective_policy(PrefixCacheConfig()), SHARED_MODEL_SCORER, seeded_for(cfg, q))[0] for q in problems]
    p = reflective_policy(PrefixCacheConfig())
    if engine:
        with ContinuousEngine.attached(p):
            together = search_each(spec.fn, problems, p, SHARED_MODEL_SCORER, cfg)
    else:
        together = search_each(spec.fn, problems, p, SHARED_MODEL_SCORER, cfg)
    for a, b in zip(alone, together, strict=True):  # a dropped problem is a failure
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-5)


class GatedLM(ScriptedLM):
    """Decode forwards past position 8 wait (up to 10 s) for `gate`, recording whether it opened."""

    def __init__(self, inner, gate: threading.Event) -> None:
        super().__init__(inner, {})
        self.gate, self.opened = gate, []

    def forward(self, **kwargs):
        if kwargs["input_ids"].shape[1] == 1 and int(kwargs["position_ids"].max()) > 8:
            self.opened.append(self.gate.wait(10))
        return super().forward(**kwargs)


def arrive_together(engine: ContinuousEngine, call: Any, items: list[tuple[str, ChunkRequest]]) -> None:
    """call(name, request) for every item in its own thread, all queued while the engine is held
    (so they are admitted, and merged, together); returns when every call has returned."""
    threads = [threading.Thread(target=call, args=item) for item in items]
    with engine.hold():
        for thread in threads:
            thread.start()
        while engine.queued < len(items):
            time.sleep(0.001)
    for thread in threads:
        thread.join()


def test_a_merged_call_is_handed_back_when_its_own_rows_end():
    """Two calls merged into one chunk: the short one returns while the long one still decodes
    (the long one's forwards wait for the short one's caller to have its result)."""
    gate = threading.Event()
    lm = GatedLM(BASE, gate)
    p = TransformersPolicy(lm, TOK, SamplingConfig(temperature=1.0, max_total_tokens=24), prompt_fn=lambda q: q.question)
    short = ChunkRequest([[1, 5, 6]], [0, 0], [1, 1], False, 1.0, 1.0, torch.Generator().manual_seed(0))
    long = ChunkRequest([[1, 7, 8]], [0, 0], [12, 12], False, 1.0, 1.0, torch.Generator().manual_seed(1))
    outputs = {}

    def call(name, request):
        outputs[name] = p.chunk_decoder(request)
        if name == "short":
            gate.set()

    with ContinuousEngine.attached(p) as engine:
        arrive_together(engine, call, [("short", short), ("long", long)])
    assert outputs["short"].lengths.tolist() == [1, 1] and outputs["long"].lengths.tolist() == [12, 12]
    assert lm.opened and all(lm.opened)  # every gated forward found the short call handed back


def test_a_failing_call_fails_alone_and_the_engine_keeps_serving():
    p = policy(PrefixCacheConfig())
    ids = [1, 5, 6]
    whole = PrefixKV(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16))  # as long as the context: invalid
    bad = ChunkRequest([ids], [0, 0], [4, 4], True, 1.0, 1.0, torch.Generator().manual_seed(0), past=[whole])
    with ContinuousEngine.attached(p) as engine:
        with pytest.raises(ValueError, match="cached prefix must leave at least one context token"):
            engine.decode(bad)
        out = p.propose(mixed_prefixes(), 2, seed=0)
    assert_same_outputs([out], [policy(PrefixCacheConfig()).propose(mixed_prefixes(), 2, seed=0)])
    with pytest.raises(RuntimeError, match="closed"):
        engine.decode(bad)


def test_a_failing_call_merged_with_others_fails_alone():
    """Calls that arrive together are prefilled as one chunk; when that fails, each is started
    alone, so only the call at fault gets the error (every call of the chunk got it before)."""
    p = policy(PrefixCacheConfig())
    whole = PrefixKV(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16))  # as long as its context: invalid
    good_past = PrefixKV(torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 16))  # 2 of 3 tokens: valid
    bad = ChunkRequest([[1, 5, 6]], [0, 0], [4, 4], True, 1.0, 1.0, torch.Generator().manual_seed(0), past=[whole])

    def good() -> ChunkRequest:
        return ChunkRequest([[1, 7, 8]], [0, 0], [4, 4], True, 1.0, 1.0, torch.Generator().manual_seed(1),
                            past=[good_past])

    outputs: dict[str, object] = {}

    def call(name: str, request: ChunkRequest) -> None:
        try:
            outputs[name] = p.chunk_decoder(request).lengths.tolist()
        except ValueError as error:
            outputs[name] = error

    with ContinuousEngine.attached(p) as engine:
        alone = engine.decode(good()).lengths.tolist()
        arrive_together(engine, call, [("bad", bad), ("good", good())])
    assert outputs["good"] == alone
    assert isinstance(outputs["bad"], ValueError) and "cached prefix must leave" in str(outputs["bad"])


def test_a_broken_engine_loop_fails_the_waiting_calls_instead_of_hanging(monkeypatch):
    p = policy(None)
    with ContinuousEngine.attached(p) as engine:
        monkeypatch.setattr(engine, "_sample", lambda cohort: 1 / 0)  # a bug inside the loop
        with pytest.raises(ZeroDivisionError):
            p.propose(mixed_prefixes(), 2, seed=0)
        with pytest.raises(RuntimeError, match="closed") as closed:
            p.propose(mixed_prefixes(), 2, seed=0)
        assert isinstance(closed.value.__cause__, ZeroDivisionError)  # says why


def test_split_draws_equal_each_generator_drawn_alone():
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    split = SplitDraws([a, b], [3, 2]).rand(5, torch.device("cpu"))
    expected = torch.cat([torch.rand(3, 1, generator=torch.Generator().manual_seed(1)),
                          torch.rand(2, 1, generator=torch.Generator().manual_seed(2))])
    assert torch.equal(split, expected)
    with pytest.raises(ValueError, match="do not sum to 4 rows"):
        SplitDraws([a, b], [3, 2]).rand(4, torch.device("cpu"))


def test_only_requests_of_one_kind_merge():
    gen = torch.Generator()
    propose = ChunkRequest([[1, 2]], [0], [4], True, 1.0, 1.0, gen)
    to_end = ChunkRequest([[1, 3]], [0], [4], False, 1.0, 1.0, gen)
    merged = merge_requests([propose, propose])
    assert merged.row_context == [0, 1] and [n for _, n in merged.split_generators] == [1, 1]
    with pytest.raises(ValueError, match="equal merge_key"):
        merge_requests([propose, to_end])


def test_search_each_raises_a_problems_error_and_checks_workers():
    def fails_on_b(problems, policy, scorer, cfg, on_round=None):
        if problems[0].id == "b":
            raise RuntimeError("problem 'b' broke")
        return [stub_result(problems[0])]

    problems = [Problem("a", "1"), Problem("b", "2")]
    with pytest.raises(RuntimeError, match="problem 'b' broke") as caught:
        search_each(fails_on_b, problems, None, None, None)
    assert not getattr(caught.value, "__notes__", None)  # the message names it already

    def scorer_fails_on_b(problems, policy, scorer, cfg, on_round=None):
        if problems[0].id == "b":
            raise RuntimeError("scorer boom")  # no id: which of 500 problems was it?
        return [stub_result(problems[0])]

    with pytest.raises(RuntimeError, match="scorer boom") as caught:
        search_each(scorer_fails_on_b, problems, None, None, None)
    assert caught.value.__notes__ == ["in the search of problem 'b'"]
    with pytest.raises(ValueError, match="workers=0"):
        search_each(fails_on_b, problems, None, None, None, workers=0)
    assert search_each(fails_on_b, [], None, None, None) == []


@pytest.mark.parametrize("error", [RuntimeError("problem b broke"), KeyboardInterrupt()])
def test_an_error_or_interrupt_stops_the_other_searches_at_their_next_round(error):
    """The others used to run to their end (and the problems not started yet started) before an
    error or Ctrl-C reached the caller: now they stop at the end of their current round."""
    import threading
    import time

    from treesearch.concurrent import SearchCancelled

    rounds: dict[str, int] = {}
    started: list[str] = []
    first_round = threading.Event()
    ended: dict[str, BaseException] = {}

    def searches(problems, policy, scorer, cfg, on_round=None):
        pid = problems[0].id
        started.append(pid)
        if pid == "b":
            first_round.wait(timeout=30)  # "a" is mid-search when "b" fails
            raise error
        try:
            for k in range(10_000):  # 10 s of rounds: stopped within a few once "b" fails
                rounds[pid] = k + 1
                first_round.set()
                time.sleep(0.001)
                on_round([])
        except BaseException as stopped:
            ended[pid] = stopped
            raise
        return [stub_result(problems[0])]

    problems = [Problem(pid, "q") for pid in "abcde"]
    with pytest.raises(type(error)):
        search_each(searches, problems, None, None, None, workers=2)
    assert started == ["a", "b"]  # c, d and e never start
    assert rounds["a"] < 10_000 and isinstance(ended["a"], SearchCancelled)
