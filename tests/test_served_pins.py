"""Pins for the served path that a mutation review found unpinned elsewhere.

In process only (no server subprocess): the policy service's request limits and row batching
through FastAPI's TestClient on a fake completer; `TransformersCompleter` on a tiny random
checkpoint (the budget, top-p, repetition penalty, unseeded requests, EOS ids, stop cutting); the
scorer's token limits and BOS handling; the schema's boundaries; `serve.py`'s --max-rows; and
`OpenAIPolicy` against the scripted HTTP server of tests/test_openai_policy.py (cached tokens,
bad log-probs, the config.json window, usage totals, model choice, backoff, an empty API key, the
text fallback of token ids, a separator step that fills the path).

Run: `.venv/bin/python -m pytest tests/test_served_pins.py`
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import test_openai_policy
import test_serve
from fastapi.testclient import TestClient
from pydantic import ValidationError

from experiments.services.api_schemas import MAX_SEED, MAX_STOP_STRINGS, FieldError, GenerateRequest
from experiments.services.micro_batcher import BatcherConfig
from experiments.services.policy_service import PolicyConfig, build_policy_app, completion_request
from experiments.services.text_completer import (
    CompletionRequest, SamplingDefaults, TransformersCompleter, cut_at_stop,
)
from policies.openai_policy import OpenAIPolicy
from test_openai_policy import EOS, EOS_STEP, FAST, ID, SAMPLED, S, Script, completion_body, handler_for, ids, one_step
from treesearch.records import Prefix, Problem

PROMPT = "Q: 2+3?\n<think>"


# -- the policy service on a fake completer ------------------------------------------------------


class FakeCompleter:
    """A `TextCompleter` of one token per character; records the rows (n) of each backend call."""

    name = "fake"

    def __init__(self, max_model_len: int = 10) -> None:
        self.max_model_len = max_model_len
        self.batches: list[list[int]] = []

    def count_tokens(self, text: str) -> int:
        return len(text)

    def complete(self, requests):
        self.batches.append([r.n for r in requests])
        time.sleep(0.05)
        return [["x"] * r.n for r in requests]


def backend_request(body: dict[str, Any], config: PolicyConfig = PolicyConfig()) -> CompletionRequest:
    return completion_request(GenerateRequest.model_validate(body), FakeCompleter(), config)


def test_max_tokens_is_capped_at_the_room_the_prompt_leaves():
    request = backend_request({"prefix_prompt": "abcdefgh", "max_tokens": 1024})  # 8 of 10 tokens
    assert request.max_tokens == 2
    assert backend_request({"prefix_prompt": "abcdefgh", "max_tokens": 1}).max_tokens == 1


def test_response_num_at_the_limit_is_accepted():
    config = PolicyConfig(max_response_num=4)
    assert backend_request({"prefix_prompt": "ab", "response_num": 4}, config).n == 4
    with pytest.raises(FieldError, match="over the server's limit 4"):
        backend_request({"prefix_prompt": "ab", "response_num": 5}, config)


def test_concurrent_requests_batch_by_rows_up_to_exactly_max_weight():
    """max_weight counts rows (response_num), and a batch of exactly max_weight rows is one batch:
    four requests of 4 rows under max_weight=8 run as two backend calls of two requests each."""
    completer = FakeCompleter()
    # a wide wait: all four arrive inside it even on a loaded machine (the last batch waits it out)
    config = PolicyConfig(batch=BatcherConfig(max_batch=32, max_wait_s=2.0, max_weight=8))
    with TestClient(build_policy_app(completer, config, "fake")) as client:
        def post(n: int) -> int:
            body = {"prefix_prompt": "ab", "response_num": n, "max_tokens": 2}
            return client.post("/generate", json=body).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(post, [4, 4, 4, 4]))
    assert statuses == [200] * 4
    assert sorted(completer.batches) == [[4, 4], [4, 4]]


def test_max_rows_of_the_command_line_is_the_batchs_row_limit(tmp_path, monkeypatch):
    import experiments.services.policy_service as policy_service
    from experiments import serve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(TransformersCompleter, "from_pretrained", classmethod(lambda cls, *a, **k: FakeCompleter()))
    monkeypatch.setattr(policy_service, "build_policy_app", lambda completer, config, *a, **k: seen.setdefault("c", config))
    serve.build_policy(serve.build_parser().parse_args(["policy", "--model", str(tmp_path), "--max-rows", "16"]))
    assert seen["c"].batch.max_weight == 16


# -- the schema's boundaries ---------------------------------------------------------------------


def test_exactly_the_most_stop_strings_are_accepted_and_one_more_refused():
    strings = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert len(GenerateRequest.model_validate({"prefix_prompt": "x", "stop": strings}).stop_strings()) == 32
    with pytest.raises(ValidationError, match="stop strings"):
        GenerateRequest.model_validate({"prefix_prompt": "x", "stop": strings + ["one more"]})


def test_the_seed_range_ends_below_2_to_the_63():
    assert MAX_SEED == 2**63
    assert GenerateRequest.model_validate({"prefix_prompt": "x", "seed": 2**63 - 1}).seed == 2**63 - 1
    with pytest.raises(ValidationError, match="seed"):
        GenerateRequest.model_validate({"prefix_prompt": "x", "seed": 2**63})


# -- TransformersCompleter on a tiny random checkpoint ---------------------------------------------


tiny = test_serve.checkpoint  # the tiny random Llama + tokenizer with a seeded SPRM head beside it


@pytest.fixture(scope="module")
def loaded(tiny):
    from policies.checkpoint import load_checkpoint

    return load_checkpoint(tiny, "float32", "cpu")


def id_completer(loaded, top_p: float = 1.0, penalty: float = 1.0) -> TransformersCompleter:
    """A completer whose completions are the generated token ids (tuples) instead of text."""
    model, tokenizer = loaded
    completer = TransformersCompleter(model, tokenizer, SamplingDefaults(top_p, penalty))
    completer._text = lambda row, ids: tuple(ids)
    return completer


def test_a_row_generates_exactly_max_tokens_without_stop_strings(loaded):
    rows = id_completer(loaded).complete([CompletionRequest(PROMPT, 3, 5, 1.0, seed=1)])[0]
    assert [len(r) for r in rows] == [5, 5, 5]


def test_a_tiny_top_p_samples_only_the_greedy_token(loaded):
    greedy = id_completer(loaded).complete([CompletionRequest(PROMPT, 1, 12, 0.0)])[0][0]
    sampled = id_completer(loaded, top_p=1e-6).complete([CompletionRequest(PROMPT, 4, 12, 2.0, seed=3)])[0]
    assert len(greedy) == 12 and sampled == [greedy] * 4


def test_a_large_repetition_penalty_stops_every_repeat(loaded):
    def greedy(penalty: float) -> tuple[int, ...]:
        return id_completer(loaded, penalty=penalty).complete([CompletionRequest(PROMPT, 1, 30, 0.0)])[0][0]

    plain, penalised = greedy(1.0), greedy(1e3)
    assert penalised != plain
    assert len(set(penalised)) == len(penalised), f"repeated ids under penalty 1e3: {penalised}"
    prompt_ids = set(loaded[1](PROMPT).input_ids)
    assert not prompt_ids & set(penalised)  # the prompt's tokens are penalised too


def test_unseeded_requests_draw_fresh_seeds(loaded):
    completer = id_completer(loaded)
    first = completer.complete([CompletionRequest(PROMPT, 2, 30, 1.0)])[0]
    second = completer.complete([CompletionRequest(PROMPT, 2, 30, 1.0)])[0]
    assert first != second and first[0] != second[0]
    seeded = [completer.complete([CompletionRequest(PROMPT, 2, 30, 1.0, seed=5)])[0] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_every_eos_id_of_the_generation_config_ends_a_row(loaded):
    model, tokenizer = loaded
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, 7]
    try:
        eos_ids = TransformersCompleter(model, tokenizer).eos_ids
    finally:
        model.generation_config.eos_token_id = saved
    assert {2, 7} <= eos_ids and tokenizer.eos_token_id in eos_ids


def test_a_completion_is_cut_at_its_earliest_stop_string():
    assert cut_at_stop("2+3=5.\n\n", ["\n", ".\n\n"]) == "2+3=5.\n"
    assert cut_at_stop("2+3=5.\n\n", [".\n\n", "\n"]) == "2+3=5.\n"
    assert cut_at_stop("2+3=5", ["\n"]) == "2+3=5"


# -- the scorer service ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_sprm(tiny):
    from experiments.services.scorer_service import TextSPRM
    from policies.reflective_model import ReflectiveModel

    model, tokenizer = ReflectiveModel.from_pretrained(str(tiny), "float32", None, "cpu")
    return TextSPRM(model, tokenizer)


def test_a_text_that_starts_with_bos_gets_no_second_bos(text_sprm):
    text = "Q?\n<think>a.\n\n"
    bos = text_sprm.tokenizer.bos_token
    assert bos and text_sprm.prefix_ids
    assert text_sprm.encode(bos + text) == text_sprm.encode(text)
    assert text_sprm.encode(text)[: len(text_sprm.prefix_ids)] == list(text_sprm.prefix_ids)


def test_max_text_tokens_is_capped_at_the_models_context(text_sprm):
    from experiments.services.scorer_service import ScorerConfig, build_scorer_app

    text = "Q?\n<think>" + "a.\n\n" * 300
    tokens = len(text_sprm.encode(text))
    assert tokens > text_sprm.max_model_len
    with TestClient(build_scorer_app(text_sprm, ScorerConfig(max_text_tokens=10**6), "m")) as client:
        assert client.get("/health").json()["max_text_tokens"] == text_sprm.max_model_len
        response = client.post("/score", json={"text": text})
    assert response.status_code == 413 and "tokens" in response.text


def test_a_text_of_exactly_max_text_tokens_is_scored(text_sprm):
    from experiments.services.scorer_service import ScorerConfig, build_scorer_app

    text = "Q?\n<think>" + "a.\n\n" * 3
    tokens = len(text_sprm.encode(text))
    with TestClient(build_scorer_app(text_sprm, ScorerConfig(max_text_tokens=tokens), "m")) as client:
        assert client.post("/score", json={"text": text}).status_code == 200
        assert client.post("/score", json={"text": text + "a"}).status_code == 413


# -- OpenAIPolicy against a scripted server -------------------------------------------------------


bigram = test_openai_policy.checkpoint  # the bigram checkpoint of the scripted-server tests


serve_script = test_openai_policy.scripted  # the scripted HTTP servers, stopped at the end


def test_cached_tokens_over_the_prompt_are_clamped(serve_script, bigram):
    body = completion_body([ID["</think>"], ID["4"], EOS], [-0.1, -0.2, -0.3], cached=999)
    _, policy = one_step(serve_script(Script([(200, body)])), bigram)
    assert policy.last_usage.cached_prompt_tokens == policy.last_usage.prompt_tokens == 3
    assert policy.last_usage.cached_share == 1.0


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_a_log_prob_that_is_not_a_finite_number_is_a_clear_error(serve_script, bigram, bad):
    body = completion_body([ID["</think>"], ID["4"], EOS], [bad, -0.2, -0.3])
    with pytest.raises(ValueError, match="log-prob"):
        one_step(serve_script(Script([(200, body)])), bigram, max_retries=0)


def test_without_a_served_window_the_config_window_refuses_a_long_prompt(serve_script, bigram):
    from transformers import AutoConfig

    from policies.context_window import context_window

    window = context_window(AutoConfig.from_pretrained(bigram))
    script = Script([(200, EOS_STEP)], window=None)
    url = serve_script(script)
    with pytest.raises(ValueError, match="context window"):
        one_step(url, bigram, question="<think>" + "3" * (window + 5), max_retries=0)
    assert not script.bodies


def test_usage_adds_up_over_calls(serve_script, bigram):
    url = serve_script(Script([(200, EOS_STEP)]))
    with OpenAIPolicy(url, None, bigram, SAMPLED, lambda p: p.question, **FAST) as policy:
        for seed in range(3):
            policy.propose([Prefix(Problem("p", "<think>3"))], 1, seed=seed)
        assert policy.usage.requests == 3 and policy.last_usage.requests == 1
        assert policy.usage.prompt_tokens == 3 * policy.last_usage.prompt_tokens


def test_without_a_model_name_the_first_listed_model_is_used(serve_script, bigram):
    script = Script([(200, EOS_STEP)])

    class TwoModels(handler_for(script)):  # vLLM lists the base model before its LoRA adapters
        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "base", "max_model_len": 256}, {"id": "base-lora", "max_model_len": 256}]})

    one_step(serve_script(script, TwoModels), bigram)
    assert script.bodies[0]["model"] == "base"


class RecordedWaits(threading.Event):
    """A never-set Event that records each wait's timeout and returns at once (no real sleep)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return False


def test_retry_backoff_doubles_from_backoff_s(serve_script, bigram):
    script = Script([(503, {"error": {"message": "busy"}}), (503, {}), (200, EOS_STEP)])
    url = serve_script(script)
    with OpenAIPolicy(url, None, bigram, SAMPLED, lambda p: p.question, max_retries=2, backoff_s=0.3,
                      timeout_s=5.0) as policy:
        waits = policy.client._closed = RecordedWaits()
        policy.propose([Prefix(Problem("p", "<think>3"))], 1, seed=7)
    assert len(script.bodies) == 3
    assert waits.timeouts == pytest.approx([0.3, 0.6])  # backoff_s, then doubled


def test_an_empty_api_key_sends_no_authorization_even_with_the_env_key(serve_script, bigram, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    script = Script([(200, EOS_STEP)])
    one_step(serve_script(script), bigram, api_key="")
    assert script.authorization == [None]


def test_token_ids_come_from_the_text_unless_every_logprob_token_is_an_id(serve_script, bigram):
    body = completion_body(None, [-0.1, -0.2], text="34", tokens=["token_id:3", "4"])
    step, _ = one_step(serve_script(Script([(200, body)])), bigram, max_retries=0)
    assert step.token_ids == ids("34") and step.text == "34"


def test_a_step_of_max_step_tokens_that_fills_the_path_on_a_separator_ends_it(serve_script, bigram):
    sampling = replace(SAMPLED, max_step_tokens=2, max_total_tokens=2)  # room 2 == max_step_tokens
    step, _ = one_step(serve_script(Script([(200, completion_body([ID["4"], S], [-0.1, -0.2]))])), bigram, sampling)
    assert step.token_ids == (ID["4"], S) and step.finish == "length"
