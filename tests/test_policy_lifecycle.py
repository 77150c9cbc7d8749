"""Tests of how the in-process and client policies, and the SPRM scorer, are made and let go.

- Freeing: a `TransformersPolicy` holds no reference back to itself (its default `chunk_decoder`
  was a bound method of the policy, a cycle), so dropping it frees it and its model by reference
  counting alone, with the cyclic collector off (what `gc.freeze()`, `freeze_long_lived`, leaves a
  re-run notebook cell), after calls, a `with_temperature` copy and an attached continuous engine.
- `close()` / `with`: the model, step head and prefix cache's entries are dropped; later calls on
  the policy or its copies are a RuntimeError saying it was closed.
- Arguments: `sampling` not a SamplingConfig (a dict, or swapped with prompt_fn) and a prompt_fn
  that is not callable are TypeErrors naming the argument before anything loads (a folder that
  does not exist shows it: loading first was a FileNotFoundError); `SPRMScorer` names the
  ReflectiveModel it takes when given a plain LM.
- A closed `OpenAIPolicy` never used refuses a call with the project's closed-client message,
  not httpx's internal one.

All on the tiny random checkpoint of `tests/tiny_checkpoint.py`, on CPU, in a few seconds; no server.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_policy_lifecycle.py -p no:cacheprovider`.
"""
from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Iterator

import pytest

from policies.checkpoint import load_checkpoint
from policies.continuous_engine import ContinuousEngine
from policies.openai_policy import OpenAIPolicy
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.sprm_scorer import SPRMScorer
from test_prefix_cache import kv
from tiny_checkpoint import save_tiny_checkpoint
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SAMPLING = SamplingConfig(temperature=0.8, max_step_tokens=6, max_total_tokens=16)
PREFIXES = [Prefix(Problem("p", "<think>3"))]
NO_SERVER = "http://127.0.0.1:9"  # nothing listens there; a closed client must not try


def question(problem: Problem) -> str:
    return problem.question


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off for the test: only reference counting frees objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def load(ckpt: Path) -> TransformersPolicy:
    return TransformersPolicy.from_pretrained(ckpt, SAMPLING, question)


# -- freeing ------------------------------------------------------------------------------------


def test_a_dropped_policy_and_its_model_are_freed_by_reference_counting(ckpt, collector_off):
    policy = load(ckpt)
    assert policy.chunk_decoder == policy._decode_here  # the default decoder, as before
    policy.propose(PREFIXES, 2, seed=0)
    greedy = policy.with_temperature(0.0)
    greedy.rollout(PREFIXES, 1, seed=0)
    with ContinuousEngine.attached(policy):
        policy.propose(PREFIXES, 2, seed=1)
    assert policy.chunk_decoder == policy._decode_here  # detached: the default again
    freed_policy, freed_model = weakref.ref(policy), weakref.ref(policy.model)
    del policy, greedy
    assert freed_policy() is None and freed_model() is None


# -- close --------------------------------------------------------------------------------------


def test_close_drops_the_model_and_the_prefix_cache_and_refuses_later_calls(ckpt, collector_off):
    with load(ckpt) as policy:
        policy.propose(PREFIXES, 2, seed=0)
        cache = policy.prefix_cache
        cache.store([1, 2, 3], kv(3))
        copy_closed_with_it = policy.with_temperature(0.0)
        freed_model = weakref.ref(policy.model)
    assert policy.model is None and policy.step_head is None and policy.prefix_cache is None and len(cache) == 0
    with pytest.raises(RuntimeError, match="TransformersPolicy was closed .*build a new one"):
        policy.propose(PREFIXES, 1, seed=0)
    with pytest.raises(RuntimeError, match="TransformersPolicy was closed"):
        copy_closed_with_it.propose_widths(PREFIXES, [1], seed=0)
    with pytest.raises(RuntimeError, match="TransformersPolicy was closed"):
        policy.rollout(PREFIXES, 1, seed=0)
    policy.close()  # again: nothing to do
    del copy_closed_with_it  # a copy alive still holds the model; the closed policy does not
    assert freed_model() is None


# -- arguments checked before loading -------------------------------------------------------------


@pytest.mark.parametrize(("sampling", "prompt_fn", "message"), [
    (question, SamplingConfig(), "sampling is a function, not a SamplingConfig"),  # swapped
    ({"temperature": 0.6}, question, "sampling is a dict, not a SamplingConfig"),
    (SamplingConfig(), "x", "prompt_fn is a str, not a callable"),
])
@pytest.mark.parametrize("with_step_head", [False, True])
def test_from_pretrained_names_a_wrong_argument_before_it_loads(tmp_path, sampling, prompt_fn, message, with_step_head):
    never_loaded = tmp_path / "missing"  # loading first was a FileNotFoundError
    with pytest.raises(TypeError, match=message):
        TransformersPolicy.from_pretrained(never_loaded, sampling, prompt_fn, with_step_head=with_step_head)


def test_the_constructor_names_a_wrong_argument_before_it_touches_the_model():
    not_a_model = object()  # .eval() on it was the first error
    with pytest.raises(TypeError, match="sampling is a dict"):
        TransformersPolicy(not_a_model, None, {"temperature": 0.6}, question)
    with pytest.raises(TypeError, match="prompt_fn is a str"):
        TransformersPolicy(not_a_model, None, SamplingConfig(), "x")


def test_sprm_scorer_names_the_model_and_prompt_fn_it_takes(ckpt, tmp_path):
    lm, tokenizer = load_checkpoint(ckpt)
    with pytest.raises(TypeError, match="SPRMScorer takes a ReflectiveModel .*not a LlamaForCausalLM"):
        SPRMScorer(lm, tokenizer, question)  # an AttributeError 'no attribute lm' before
    with pytest.raises(TypeError, match="prompt_fn is a str"):
        SPRMScorer(ReflectiveModel(lm), tokenizer, "x")
    with pytest.raises(TypeError, match="prompt_fn is a str"):
        SPRMScorer.from_pretrained(tmp_path / "missing", "x")


def test_openai_policy_names_a_prompt_fn_that_is_not_callable(ckpt):
    with pytest.raises(TypeError, match="prompt_fn is a str"):
        OpenAIPolicy(NO_SERVER, None, ckpt, SamplingConfig(temperature=0.6), "x")


# -- a closed OpenAI-compatible client -------------------------------------------------------------


def test_a_closed_openai_policy_never_used_says_it_was_closed(ckpt):
    closed = OpenAIPolicy(NO_SERVER, None, ckpt, SamplingConfig(temperature=0.6), question, max_retries=0)
    closed.close()
    with OpenAIPolicy(NO_SERVER, None, ckpt, SamplingConfig(temperature=0.6), question, max_retries=0) as ended:
        pass
    # httpx's "Cannot send a request, as the client has been closed" before (GET /v1/models first)
    for policy in (closed, ended, closed.with_temperature(0.5)):
        with pytest.raises(RuntimeError, match="client was closed .*build a new policy"):
            policy.propose(PREFIXES, 1, seed=0)
    with pytest.raises(RuntimeError, match="client was closed"):
        closed.client.served_model()
    with pytest.raises(RuntimeError, match="client was closed"):
        closed.client.request("POST", "/v1/completions", {})
