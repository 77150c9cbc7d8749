"""Tests of the HTTP services (`python -m experiments.serve`): each service runs as a real
subprocess on a free port of 127.0.0.1 with a tiny model made here, and is always stopped by PID.

Pinned: the reference's JSON formats exactly (`/generate` -> {"results"}, `/score` -> {"value"}
plus the three lists when asked); the scorer's value equals `SPRMScorer`'s path score of the same
sequence; concurrent requests get their own answers (equal to the answer sent alone) and are
batched; bad input gets a 4xx JSON error naming the field and the server keeps serving; the API
key; the micro-batcher's routing and failure isolation in-process; the vLLM backend (marked
`vllm`). Run: `.venv/bin/python -m pytest tests/test_serve.py`.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from experiments.services.micro_batcher import BatcherConfig, MicroBatcher
from tiny_checkpoint import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Service:
    """A service subprocess: its process, base URL, log file and the headers it needs."""

    process: subprocess.Popen
    url: str
    log: Path
    headers: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(args: list[str], log: Path, headers: dict[str, str] | None = None) -> Service:
    """Launch `python -m experiments.serve ARGS --port P` (output to log); does not wait."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TREESEARCH_API_KEY", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.serve", *args, "--port", str(port), "--threads", "1"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return Service(process, f"http://127.0.0.1:{port}", log, headers or {})


def wait_ready(service: Service) -> None:
    """Poll /health until it answers 200; fail with the log if the process dies or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            pytest.fail(f"service exited with {service.process.returncode}:\n{service.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{service.url}/health", headers=service.headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"service not ready after {START_TIMEOUT_S} s:\n{service.log.read_text()[-3000:]}")


def stop_service(service: Service) -> None:
    """Terminate the subprocess by its PID (kill if it does not exit)."""
    if service.process.poll() is None:
        os.kill(service.process.pid, 15)
        try:
            service.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(service.process.pid, 9)
            service.process.wait(timeout=15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny random Llama + tokenizer, with a seeded SPRM head (score_module.pt) beside it."""
    from scorers.sprm_head import build_sprm_head, save_score_module

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")
    save_score_module(build_sprm_head(32, seed=0), path)
    return path


@pytest.fixture(scope="module")
def services(checkpoint, tmp_path_factory) -> Iterator[dict[str, Service]]:
    """The scorer (with an API key and small text limits) and the transformers policy, started
    together; both stopped by PID at the end."""
    logs = tmp_path_factory.mktemp("logs")
    started: dict[str, Service] = {}
    try:
        started["scorer"] = start_service(
            ["scorer", "--model", str(checkpoint), "--api-key", API_KEY, "--max-text-chars", "3000",
             "--max-text-tokens", "200", "--max-wait-ms", "30"], logs / "scorer.log", AUTH)
        started["policy"] = start_service(
            ["policy", "--model", str(checkpoint), "--max-response-num", "8", "--max-wait-ms", "30"],
            logs / "policy.log")
        for service in started.values():
            wait_ready(service)
        yield started
    finally:
        for service in started.values():
            stop_service(service)


def post(service: Service, path: str, body: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    merged = {**service.headers, **(headers or {})}
    if content is not None:
        return httpx.post(service.url + path, content=content, headers={**merged, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(service.url + path, json=body, headers=merged, timeout=60)


def in_parallel(fn, items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def trace(i: int) -> str:
    """A distinct well-formed think trace with 1-4 steps."""
    steps = [f"step {i} part {k} adds {i * k % 17}" for k in range(1 + i % 4)]
    return f"Question {i}?\n<think>" + ".\n\n".join(steps) + f".\n\n</think>Answer: {i}"


# -- scorer ---------------------------------------------------------------------------------------

def test_scorer_health_and_reference_format(services):
    scorer = services["scorer"]
    health = httpx.get(scorer.url + "/health", headers=AUTH).json()
    assert health["status"] == "ok" and health["service"] == "scorer" and health["feature_layer"] == -2
    plain = post(scorer, "/score", {"text": trace(3)})
    assert plain.status_code == 200 and set(plain.json()) == {"value"}
    full = post(scorer, "/score", {"text": trace(3), "return_all_scores": True}).json()
    assert set(full) == {"value", "all_scores", "token_ids", "score_positions"}
    assert full["value"] == pytest.approx(plain.json()["value"], abs=1e-6)
    assert len(full["all_scores"]) == len(full["score_positions"]) == 4  # 4 steps inside <think>
    # value = geometric mean of the readings; no separator at all -> 0 (the reference's rule)
    gm = 1.0
    for s in full["all_scores"]:
        gm *= s
    assert full["value"] == pytest.approx(gm ** (1 / 4), rel=1e-6)
    assert post(scorer, "/score", {"text": "no steps here"}).json() == {"value": 0.0}


def test_scorer_value_equals_sprm_scorer(services, checkpoint):
    """The service's value and readings equal `SPRMScorer` on prompt (BOS added) + completion ids."""
    from policies.reflective_model import ReflectiveModel
    from scorers.sprm_scorer import SPRMScorer
    from treesearch.records import Prefix, Problem, Step

    model, tokenizer = ReflectiveModel.from_pretrained(checkpoint)
    prompt = "Question: 12 + 30?\n<think>"
    completion = "12 plus 30 is 42.\n\nSo we have 42.\n\n.\n\nCheck 42.\n\n</think>Answer: 42"
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    path = Prefix(Problem("p", "q"), (Step(completion, tuple(completion_ids), (0.0,) * len(completion_ids), "eos"),))
    expected = SPRMScorer(model, tokenizer, prompt_fn=lambda _: prompt).read([path])[0]
    got = post(services["scorer"], "/score", {"text": prompt + completion, "return_all_scores": True}).json()
    assert got["token_ids"] == list(expected.token_ids)  # BOS + prompt + completion, as the policy saw it
    assert got["score_positions"] == list(expected.positions) and len(expected.positions) == 3  # a run counts once
    assert got["all_scores"] == pytest.approx(list(expected.position_scores), abs=1e-4)
    assert got["value"] == pytest.approx(expected.value, abs=1e-4)


def test_scorer_concurrent_requests_get_their_own_answers_batched(services):
    scorer = services["scorer"]
    texts = [trace(i) for i in range(24)]
    alone = [post(scorer, "/score", {"text": t}).json()["value"] for t in texts]
    before = httpx.get(scorer.url + "/health", headers=AUTH).json()["batches_run"]
    together = in_parallel(lambda t: post(scorer, "/score", {"text": t}).json()["value"], texts)
    after = httpx.get(scorer.url + "/health", headers=AUTH).json()["batches_run"]
    assert together == pytest.approx(alone, abs=1e-4)
    assert len(set(round(v, 6) for v in alone)) > 10  # distinct answers, so a mix-up would show
    assert after - before < len(texts)  # some requests shared a forward


@pytest.mark.parametrize("body, content, status, field", [
    (None, b'{"text": "a"', 422, "body"),                      # malformed JSON
    (None, b"[1, 2]", 422, "body"),                             # not an object
    ({"txt": "a"}, None, 422, "txt"),                           # a misspelt field: "did you mean text?"
    ({"text_": 1}, None, 422, "text_"),
    ({"body": "a"}, None, 422, "text"),                         # missing field
    ({"text": 5}, None, 422, "text"),                           # wrong type
    ({"text": "a", "return_all_scores": "maybe"}, None, 422, "return_all_scores"),
    ({"text": "a", "return_all_scores": 1}, None, 422, "return_all_scores"),   # strict: not a bool
    (None, b'{"text": "\xff\xfe"}', 422, "body"),               # not UTF-8
    (None, b'{"text": "a \\ud800 b"}', 422, "text"),          # a lone surrogate: a plain-text 500 before
    (None, b'{"text": "a", "tex\\ud800t": 1}', 422, "tex\\ud800t"),  # ... in a misspelt field's name
    (None, b'{"text": ' + b"[" * 100_000, 422, "body"),          # nested past the recursion limit
    ({"text": "x" * 3001}, None, 413, "text"),                  # over --max-text-chars
    ({"text": "1 " * 150}, None, 413, "text"),                  # over --max-text-tokens (300 digits + spaces)
])
def test_scorer_rejects_bad_input_and_keeps_serving(services, body, content, status, field):
    scorer = services["scorer"]
    response = post(scorer, "/score", body, content=content)
    assert response.status_code == status
    assert response.json()["field"] == field and response.json()["error"].startswith(field)
    assert post(scorer, "/score", {"text": trace(1)}).status_code == 200


def test_policy_names_a_meant_field_and_ignores_the_rest(services):
    policy = services["policy"]
    renamed = post(policy, "/generate", {"prefix_prompt": "a", "n": 1}).json()
    assert renamed["error"] == "n: is not a field of this request; its name here is response_num"
    assert post(policy, "/generate", {"prefix_prompt": "a", "temperture": 0}).json()["error"] == (
        "temperture: is not a field of this request; did you mean temperature?")
    plain = post(policy, "/generate", generate_body(2, model="tiny", user="me", stream=False, logprobs=None,
                                                    min_tokens=0, best_of=1, top_p=None))  # best_of 1 (its off) refused before
    assert plain.status_code == 200 and len(plain.json()["results"]) == 2  # the reference's clients: unchanged


def test_scorer_api_key(services):
    scorer = services["scorer"]
    assert httpx.post(scorer.url + "/score", json={"text": "a"},
                      headers={"Authorization": AUTH["Authorization"].replace("Bearer", "bearer")}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(scorer.url + "/score", json={"text": "a"}, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]
        assert httpx.get(scorer.url + "/health", headers=headers).status_code == 401
    # 401 comes before the body is read: a malformed body without the key is still 401
    assert httpx.post(scorer.url + "/score", content=b"{", headers={"Content-Type": "application/json"}).status_code == 401
    assert httpx.post(scorer.url + "/score", json={"text": "a"}, headers=AUTH).status_code == 200


# -- policy (transformers backend) ----------------------------------------------------------------

def generate_body(i: int, **overrides: Any) -> dict[str, Any]:
    body = {"prefix_prompt": f"Question {i}: what is {i} + 1?\n<think>", "max_tokens": 12, "response_num": 2,
            "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": 100 + i}
    return {**body, **overrides}


def test_policy_health_and_reference_format(services):
    policy = services["policy"]
    health = httpx.get(policy.url + "/health").json()
    assert health["status"] == "ok" and health["service"] == "policy" and health["backend"] == "transformers"
    # at the default log level warning nothing told that the model had loaded
    assert f"model loaded; starting the policy service of {policy.process.args[5]} on http://127.0.0.1:" in policy.log.read_text()
    response = post(policy, "/generate", {"prefix_prompt": "Question: 1 + 1?\n<think>", "response_num": 3, "max_tokens": 8})
    assert response.status_code == 200 and set(response.json()) == {"results"}
    results = response.json()["results"]
    assert len(results) == 3 and all(isinstance(r, str) for r in results)
    # the reference's client posts to the bare address given on its command line
    assert post(policy, "/", generate_body(4)).json() == post(policy, "/generate", generate_body(4)).json()
    # a body without max_tokens (default 1024) on a 512-token model: as much as fits, not an error;
    # and the reference's client, which always asks for 32768 (a 422 made its run die)
    assert len(post(policy, "/generate", {"prefix_prompt": "Hi", "response_num": 1, "seed": 0}).json()["results"]) == 1
    asked = post(policy, "/generate", {"prefix_prompt": "Hi", "response_num": 2, "seed": 0, "max_tokens": 32768})
    assert asked.status_code == 200 and len(asked.json()["results"]) == 2


def test_policy_seeds_and_stop_strings(services):
    policy = services["policy"]
    sampled = generate_body(1, response_num=4, max_tokens=10)
    first = post(policy, "/generate", sampled).json()["results"]
    assert post(policy, "/generate", sampled).json()["results"] == first  # same seed, same completions
    assert len(set(first)) > 1  # four samples differ
    assert post(policy, "/generate", {**sampled, "seed": 7}).json()["results"] != first
    greedy = post(policy, "/generate", generate_body(0, max_tokens=16, response_num=1)).json()["results"][0]
    start = next(k for k in range(len(greedy) // 2, len(greedy) - 1) if "\ufffd" not in greedy[k : k + 2])
    stop = greedy[start : start + 2]  # a stop string from the middle (no partial-byte character)
    cut = post(policy, "/generate", generate_body(0, max_tokens=16, response_num=1, stop=stop)).json()["results"][0]
    assert cut == greedy[: greedy.index(stop) + len(stop)]  # ends at the first stop string, kept
    assert post(policy, "/generate", generate_body(0, max_tokens=16, response_num=1, stop=[stop])).json()["results"] == [cut]


def test_policy_concurrent_requests_get_their_own_answers_batched(services):
    policy = services["policy"]
    bodies = [generate_body(i) for i in range(16)]
    alone = [post(policy, "/generate", b).json()["results"] for b in bodies]
    before = httpx.get(policy.url + "/health").json()["batches_run"]
    together = in_parallel(lambda b: post(policy, "/generate", b).json()["results"], bodies)
    after = httpx.get(policy.url + "/health").json()["batches_run"]
    assert together == alone
    sampled = [tuple(r) for r, b in zip(alone, bodies) if b["temperature"] > 0]
    assert len(set(sampled)) == len(sampled)  # distinct seeds, distinct answers: a mix-up would show
    assert after - before < len(bodies)


@pytest.mark.parametrize("body, content, field", [
    (None, b'{"prefix_prompt": ', "body"),                       # malformed JSON
    ({"response_num": 2}, None, "prefix_prompt"),                 # missing field
    ({"prefix_prompt": ["a"]}, None, "prefix_prompt"),            # wrong type
    ({"prefix_prompt": "a", "response_num": "two"}, None, "response_num"),
    ({"prefix_prompt": "a", "response_num": 0}, None, "response_num"),
    ({"prefix_prompt": "a", "response_num": 9}, None, "response_num"),   # over --max-response-num 8
    ({"prefix_prompt": "a", "response_num": True}, None, "response_num"),
    ({"prefix_prompt": "a", "max_tokens": 0}, None, "max_tokens"),
    ({"prefix_prompt": "a", "temperature": -0.1}, None, "temperature"),
    ({"prefix_prompt": "a", "temperature": 2.5}, None, "temperature"),   # vLLM's and OpenAI's range is [0, 2]
    ({"prefix_prompt": "a", "temperature": 0.005}, None, "temperature"),  # vLLM would sample at 0.01
    ({"prefix_prompt": ""}, None, "prefix_prompt"),                     # empty: nothing to continue
    ({"prefix_prompt": "a", "max_tokens": "4"}, None, "max_tokens"),     # strict: a string is not a count
    (None, b'{"prefix_prompt": "\xff"}', "body"),                       # not UTF-8
    ({"prefix_prompt": "a", "stop": [""]}, None, "stop"),
    (None, b'{"prefix_prompt": "a \\udc00"}', "prefix_prompt"),         # a lone surrogate
    (None, b'{"prefix_prompt": "a", "stop": ["\\ud83d"]}', "stop"),
    ({"prefix_prompt": "a", "stop": [3]}, None, "stop[0]"),
    ({"prefix_prompt": "a", "seed": -1}, None, "seed"),
    # what a client means something by fell back to the defaults in silence (8 samples, full length)
    ({"prefix_prompt": "a", "n": 1}, None, "n"),                         # OpenAI's name of response_num
    ({"prefix_prompt": "a", "max_new_tokens": 4}, None, "max_new_tokens"),
    ({"prefix_prompt": "a", "temperture": 0}, None, "temperture"),       # misspelt
    ({"prefix_prompt": "a", "stream": True}, None, "stream"),            # no streaming here
    ({"prefix_prompt": "a", "logprobs": 1}, None, "logprobs"),
    ({"prefix_prompt": "a", "logprobs": 0}, None, "logprobs"),  # the completions API's "the sampled token's": 200 without it
    ({"prefix_prompt": "a", "min_tokens": 1}, None, "min_tokens"),      # vLLM's option: "did you mean max_tokens?" before
    ({"prefix_prompt": "a", "best_of": 2}, None, "best_of"),
    ({"prefix_prompt": "a", "best_of": True}, None, "best_of"),
    # the server's own top_p / repetition penalty sampled them in silence
    ({"prefix_prompt": "a", "top_p": 0.01}, None, "top_p"),
    ({"prefix_prompt": "a", "top_k": 1}, None, "top_k"),
    ({"prefix_prompt": "a", "frequency_penalty": 2}, None, "frequency_penalty"),
    ({"prefix_prompt": "a", "repetition_penalty": 1.05}, None, "repetition_penalty"),
    # each stop string is checked after every token of every row: 50,000 held the worker for 25 s
    ({"prefix_prompt": "a", "stop": [f"s{i}" for i in range(33)]}, None, "stop"),
    ({"prefix_prompt": "a", "stop": "x" * 513}, None, "stop"),
])
def test_policy_rejects_bad_input_and_keeps_serving(services, body, content, field):
    policy = services["policy"]
    response = post(policy, "/generate", body, content=content)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and response.json()["error"].startswith(field)
    assert len(post(policy, "/generate", generate_body(2)).json()["results"]) == 2


@pytest.mark.parametrize("temperature", [1e-40, 0.005, -1.0, float("inf"), float("nan")])
def test_a_completion_request_takes_only_the_services_temperatures(temperature):
    """The service's own sampler met 1e-40 with an IndexError (softmax of an overflowed division)."""
    from experiments.services.text_completer import CompletionRequest

    with pytest.raises(ValueError, match="must be 0 or a finite number >= 0.01"):
        CompletionRequest("3", 2, 8, temperature)
    assert CompletionRequest("3", 2, 8, 0.01).temperature == 0.01


# -- micro-batcher in-process ---------------------------------------------------------------------

def test_micro_batcher_routes_results_and_isolates_failures():
    calls: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("13 is unlucky")
        return [10 * x for x in items]

    async def main() -> list[Any]:
        batcher = MicroBatcher(run_batch, BatcherConfig(max_batch=8, max_wait_s=0.05, max_weight=20), weight=lambda x: x)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in [1, 2, 3, 13, 5, 6, 7]), return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[:3] == [10, 20, 30] and results[4:] == [50, 60, 70]
    assert isinstance(results[3], ValueError)  # only the bad item failed
    assert all(sum(c) <= 20 or len(c) == 1 for c in calls)  # max_weight held
    assert len(calls[0]) > 1  # concurrent submits were batched


def test_micro_batcher_drops_a_request_whose_client_left_before_its_batch_ran():
    """8 clients that gave up on 64 samples each held a later 2-token request 41 s: the work of a
    request whose client is gone is skipped unless its batch already runs."""
    from experiments.services.micro_batcher import ClientGone

    ran: list[list[str]] = []
    release = threading.Event()

    def run_batch(items: list[str]) -> list[str]:
        ran.append(list(items))
        release.wait(5)
        return [item.upper() for item in items]

    async def main() -> list[Any]:
        batcher = MicroBatcher(run_batch, BatcherConfig(max_batch=1, max_wait_s=0.0))
        await batcher.start()
        left = asyncio.Event()

        async def gone() -> bool:
            return left.is_set()

        try:
            first = asyncio.create_task(batcher.submit("running", gone=gone))
            await asyncio.sleep(0.1)  # its batch runs (and waits for release)
            queued = [asyncio.create_task(batcher.submit(f"left{i}", gone=gone)) for i in range(3)]
            await asyncio.sleep(0.1)
            left.set()  # every client leaves
            await asyncio.sleep(0.4)  # > GONE_POLL_S: the waiting ones noticed
            release.set()
            kept = asyncio.create_task(batcher.submit("later"))
            return await asyncio.gather(first, *queued, kept, return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert all(isinstance(r, ClientGone) for r in results[:4]) and results[4] == "LATER"
    assert ran == [["running"], ["later"]]  # the running batch finished; the three queued were never run


def test_micro_batcher_drops_a_request_whose_client_left_while_its_batch_gathered():
    # a lone request in a batch still gathering (max_wait_s 2 s) whose client left at 0.2 s ran at 2 s
    from experiments.services.micro_batcher import ClientGone

    ran: list[list[str]] = []

    def run_batch(items: list[str]) -> list[str]:
        ran.append(list(items))
        return [item.upper() for item in items]

    async def main() -> list[Any]:
        batcher = MicroBatcher(run_batch, BatcherConfig(max_batch=4, max_wait_s=0.6))
        await batcher.start()
        left = asyncio.Event()

        async def gone() -> bool:
            return left.is_set()

        try:
            lone = asyncio.create_task(batcher.submit("left", gone=gone))
            await asyncio.sleep(0.05)
            left.set()  # its client leaves while the batch still gathers
            result = await asyncio.gather(lone, return_exceptions=True)
            await asyncio.sleep(0.8)  # past the gathering's deadline
            return [*result, await batcher.submit("later")]
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert isinstance(results[0], ClientGone) and results[1] == "LATER"
    assert ran == [["later"]]  # the gathered batch of the one who left never ran


def test_micro_batcher_retries_alone_only_the_requests_still_waiting():
    # a failed batch retried each item alone, also those whose client had left (4 s of backend time)
    from experiments.services.micro_batcher import ClientGone

    calls: list[list[int]] = []
    noticed: list[int] = []
    all_noticed = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(items) > 1:
            all_noticed.wait(5)  # the batch fails once every leaving client has seen it is gone
            raise ValueError("only one at a time")
        return items

    async def main() -> list[Any]:
        batcher = MicroBatcher(run_batch, BatcherConfig(max_batch=4, max_wait_s=0.05))
        await batcher.start()
        left = asyncio.Event()

        async def gone() -> bool:
            if left.is_set():
                noticed.append(1)
                if len(noticed) == 3:
                    all_noticed.set()
            return left.is_set()

        try:
            tasks = [asyncio.create_task(batcher.submit(i, gone=gone if i else None)) for i in range(4)]
            await asyncio.sleep(0.2)
            left.set()  # three of the four leave while their batch runs
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[0] == 0 and all(isinstance(r, ClientGone) for r in results[1:])
    assert calls == [[0, 1, 2, 3], [0]]


def test_micro_batcher_stop_fails_running_and_later_requests():
    # stop() cancelled the collector while a batch ran: that batch's requests, and any submit
    # after it, waited forever
    release = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    async def main() -> tuple[Any, Any]:
        batcher = MicroBatcher(run_batch, BatcherConfig(max_batch=4, max_wait_s=0.0))
        await batcher.start()
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(batcher.stop(), 2)
        release.set()
        late = await asyncio.wait_for(asyncio.gather(batcher.submit(2), return_exceptions=True), 2)
        return (await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 2))[0], late[0]

    running, late = asyncio.run(main())
    assert isinstance(running, RuntimeError) and "shutting down" in str(running)
    assert isinstance(late, RuntimeError) and "shutting down" in str(late)


def test_micro_batcher_stop_fails_a_request_of_the_batch_being_gathered():
    # the collector held it in a local list for max_wait_s: stop() failed the queue and the
    # running batch, and this one waited forever
    async def main() -> Any:
        batcher = MicroBatcher(lambda items: items, BatcherConfig(max_batch=4, max_wait_s=5.0))
        await batcher.start()
        gathered = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.1)  # taken off the queue; the batch waits for more until 5 s
        await asyncio.wait_for(batcher.stop(), 2)
        return (await asyncio.wait_for(asyncio.gather(gathered, return_exceptions=True), 2))[0]

    failed = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and "shutting down" in str(failed)


# -- vLLM backend ---------------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_policy_service(tmp_path):
    """The policy service on vLLM: the reference format, seeds, stop strings kept, concurrent
    answers equal lone ones, bad input rejected, and greedy text equal to the transformers backend
    on the bigram model (whose next token is far ahead of the rest, so float noise cannot flip it)."""
    from vllm_fixtures import require_vllm, save_bigram_checkpoint

    require_vllm()
    from experiments.services.text_completer import CompletionRequest, TransformersCompleter

    path = save_bigram_checkpoint(tmp_path / "bigram")
    service = start_service(["policy", "--model", str(path), "--backend", "vllm", "--kv-cache-gib", "0.25",
                             "--max-wait-ms", "30"], tmp_path / "vllm.log")
    try:
        wait_ready(service)
        assert httpx.get(service.url + "/health").json()["backend"] == "vllm"
        greedy = post(service, "/generate", {"prefix_prompt": "3", "max_tokens": 8, "response_num": 2, "temperature": 0})
        assert greedy.status_code == 200 and set(greedy.json()) == {"results"}
        expected = TransformersCompleter.from_pretrained(path).complete([CompletionRequest("3", 2, 8, 0.0)])[0]
        assert greedy.json()["results"] == expected == ["</think>4", "</think>4"]
        sampled = {"prefix_prompt": "1", "max_tokens": 12, "response_num": 4, "temperature": 1.0, "seed": 3, "stop": "="}
        first = post(service, "/generate", sampled).json()["results"]
        assert len(first) == 4 and post(service, "/generate", sampled).json()["results"] == first
        assert all(r.endswith("=") or "=" not in r for r in first)  # ends at the stop string, kept
        bodies = [{**sampled, "prefix_prompt": p, "seed": s} for p in ("1", "2", "1+", "3") for s in range(4)]
        alone = [post(service, "/generate", b).json()["results"] for b in bodies]
        assert in_parallel(lambda b: post(service, "/generate", b).json()["results"], bodies) == alone
        capped = post(service, "/generate", {"prefix_prompt": "1", "max_tokens": 1000, "response_num": 1})
        assert capped.status_code == 200 and len(capped.json()["results"]) == 1  # context is 256: as much as fits
        assert post(service, "/generate", sampled).json()["results"] == first
    finally:
        stop_service(service)


def test_counting_a_prompt_does_not_wait_for_the_decode_loops_tokenizer(checkpoint):
    """A 1 MB prompt being counted (then refused, 413) held the lock the decode loop takes for its
    stop strings every token: a normal request under a stream of them took 129 s instead of 0.04 s."""
    from experiments.services.text_completer import TransformersCompleter

    completer = TransformersCompleter.from_pretrained(checkpoint)
    counted: list[int] = []
    with completer._tokenizer_lock:  # the decode loop mid-step
        worker = threading.Thread(target=lambda: counted.append(completer.count_tokens("1+2=3")))
        worker.start()
        worker.join(timeout=10)
        assert counted, "count_tokens waited for the decode loop's tokenizer lock"
    assert counted == [len(completer.tokenizer("1+2=3").input_ids)]


@pytest.mark.vllm
def test_the_vllm_backend_seeds_each_sample_row_from_the_requests_seed(checkpoint):
    """vLLM's n > 1 seeds child j with seed + j: requests of seeds 1 and 2 shared 3 of their 4
    samples. Each row is now its own prompt, seeded as the transformers backend seeds its rows."""
    from types import SimpleNamespace

    from experiments.services.text_completer import CompletionRequest, row_seeds
    from experiments.services.vllm_completer import VLLMCompleter
    from vllm_fixtures import require_vllm

    require_vllm()
    asked: list[tuple[str, Any]] = []

    def generate(prompts, params, use_tqdm):
        asked.extend(zip(prompts, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"{p}:{q.seed}")]) for p, q in zip(prompts, params)]

    llm = SimpleNamespace(generate=generate, llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=64)))
    completer = VLLMCompleter(llm, object())
    requests = [CompletionRequest("a", 4, 8, 1.0, seed=1), CompletionRequest("b", 4, 8, 1.0, seed=2),
                CompletionRequest("c", 3, 8, 0.0, seed=5)]
    texts = completer.complete(requests)
    assert texts[0] == [f"a:{s}" for s in row_seeds(1, 4)] and texts[1] == [f"b:{s}" for s in row_seeds(2, 4)]
    assert not set(row_seeds(1, 4)) & set(row_seeds(2, 4))
    assert texts[2] == ["c:None"] * 3  # greedy: one sample, copied
    assert all(params.n == 1 for _, params in asked) and len(asked) == 9


def test_completer_gives_the_same_text_with_a_shared_prefix_and_with_copied_rows(checkpoint, monkeypatch):
    """In-process: several prompts x n samples, rows finishing at different times (stop strings,
    budgets): the rows of a prompt reading its KV in place give what copied rows give."""
    from experiments.services import text_completer
    from experiments.services.text_completer import CompletionRequest, TransformersCompleter

    completer = TransformersCompleter.from_pretrained(checkpoint)
    requests = [CompletionRequest(prompt, 4, tokens, 1.0, (".",), seed)
                for prompt, tokens, seed in (("1+2=", 12, 0), ("3", 6, 1), ("12+34=5", 16, 2))]
    shared = completer.complete(requests)
    monkeypatch.setattr(text_completer, "worth_sharing", lambda model, row_context: False)
    copied = completer.complete(requests)
    assert shared == copied and len({t for texts in shared for t in texts}) > 3


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--port", "70000", "argument --port: '70000' must be a port number in 1-65535"),  # it bound 70000 - 65536
    ("--port", "-5", "argument --port: '-5' must be a port number in 1-65535"),
    ("--threads", "0", "argument --threads: '0' must be an integer >= 1"),  # a traceback from torch before
    ("--max-batch", "0", "argument --max-batch: '0' must be an integer >= 1"),
    ("--log-level", "verbose", "argument --log-level: invalid choice: 'verbose' (choose from 'critical', 'error', "
                               "'warning', 'info', 'debug', 'trace')"),  # uvicorn's KeyError after loading before
    ("--kv-cache-gib", "0", "argument --kv-cache-gib: '0' must be a finite number > 0"),
    ("--gpu-memory-utilization", "1.5", "argument --gpu-memory-utilization: '1.5' must be in (0, 1]"),
    # inf: the batcher waited forever for a full batch, answered nothing and blocked shutdown
    ("--max-wait-ms", "inf", "argument --max-wait-ms: 'inf' must be a number of milliseconds in [0, 60000]"),
    # inf set every seen positive logit to 0 (NaN at a logit of 0); vLLM refuses it at each request
    ("--repetition-penalty", "inf", "argument --repetition-penalty: 'inf' must be a finite number > 0"),
])
def test_a_bad_number_is_a_usage_error_before_the_model_loads(flag, value, message, tmp_path, capsys):
    from experiments import serve

    with pytest.raises(SystemExit) as caught:
        serve.main(["policy", "--model", str(tmp_path / "nowhere"), flag, value])
    assert caught.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_an_api_key_that_is_not_printable_ascii_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """HTTP headers carry non-ASCII text each client its own way (Starlette reads them as Latin-1,
    curl sends UTF-8): a key 'clé' matched no UTF-8 client, '密钥' no client at all."""
    from experiments import serve

    for key in ("clé", "密钥", "tab\tkey", "secret ", " secret"):  # blanks at an end: stripped or refused by clients
        assert serve.main(["policy", "--model", str(tmp_path / "nowhere"), "--api-key", key]) == 2
        assert capsys.readouterr().err.startswith("error: the API key (--api-key or $TREESEARCH_API_KEY) must be printable "
                                                  "ASCII without blanks at either end")
    monkeypatch.setenv(serve.API_KEY_ENV, "clé")
    assert serve.main(["policy", "--model", str(tmp_path / "nowhere")]) == 2
    assert "must be printable ASCII" in capsys.readouterr().err
    monkeypatch.delenv(serve.API_KEY_ENV)
    assert serve.main(["policy", "--model", str(tmp_path / "nowhere"), "--api-key", "s3cret-KEY_1",
                       "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint folder {tmp_path / 'nowhere'} does not exist"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is visible here")
@pytest.mark.parametrize("service", ["policy", "scorer"])
def test_a_gpu_torch_cannot_see_is_named_before_the_model_loads(service, tmp_path):
    from experiments import serve

    args = serve.build_parser().parse_args([service, "--model", str(tmp_path / "nowhere"), "--device", "cuda"])
    build = serve.build_policy if service == "policy" else serve.build_scorer
    with pytest.raises(ValueError, match="device='cuda' but torch .* sees no CUDA GPU"):
        build(args)  # the missing folder would be a FileNotFoundError: the device is checked first


def test_the_vllm_backends_engine_takes_gpu_settings(tmp_path, monkeypatch):
    """On a GPU the service's engine was fixed at a 1 GiB KV cache (too small for one long
    sequence of a 7B model) in eager mode: --kv-cache-gib auto and --cuda-graphs reach it."""
    from experiments import serve
    from experiments.services import vllm_completer

    class EngineBuilt(Exception):
        pass

    engines: list = []

    def build_llm(config):
        engines.append(config)
        raise EngineBuilt

    monkeypatch.setattr(vllm_completer, "build_llm", build_llm)
    parse = serve.build_parser().parse_args
    with pytest.raises(EngineBuilt):
        serve.build_policy(parse(["policy", "--model", str(tmp_path), "--backend", "vllm"]))
    with pytest.raises(EngineBuilt):
        serve.build_policy(parse(["policy", "--model", str(tmp_path), "--backend", "vllm", "--kv-cache-gib", "auto",
                                  "--gpu-memory-utilization", "0.5", "--cuda-graphs"]))
    cpu, gpu = engines
    assert (cpu.kv_cache_gib, cpu.enforce_eager, cpu.gpu_memory_utilization) == (1.0, True, 0.9)
    assert (gpu.kv_cache_gib, gpu.enforce_eager, gpu.gpu_memory_utilization) == (None, False, 0.5)


def test_the_vllm_flags_are_refused_for_the_transformers_backend(tmp_path):
    from experiments import serve

    args = serve.build_parser().parse_args(["policy", "--model", str(tmp_path), "--cuda-graphs", "--kv-cache-gib", "auto"])
    with pytest.raises(ValueError, match="--kv-cache-gib, --cuda-graphs: for --backend vllm only"):
        serve.build_policy(args)  # parsed and dropped before


def test_device_is_refused_for_the_vllm_backend(tmp_path, capsys):
    from experiments import serve

    args = serve.build_parser().parse_args(
        ["policy", "--model", str(tmp_path), "--backend", "vllm", "--device", "cuda"])
    with pytest.raises(ValueError, match="--device is for --backend transformers"):
        serve.build_policy(args)
    # the command line: one `error:` line and exit 2, as any bad input (a bare message and exit 1 before)
    assert serve.main(["policy", "--model", str(tmp_path), "--backend", "vllm", "--device", "cuda",
                       "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == "error: --device is for --backend transformers: vLLM uses the GPU it finds\n"


@pytest.mark.parametrize("service", ["policy", "scorer"])
def test_a_missing_model_folder_is_one_error_line_and_exit_2(service, tmp_path, capsys):
    from experiments import serve

    missing = tmp_path / "nowhere"
    assert serve.main([service, "--model", str(missing), "--port", str(free_port())]) == 2  # before any server starts
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint folder {missing} does not exist"]


@pytest.mark.parametrize("service", ["policy", "scorer"])
def test_a_port_in_use_is_named_before_the_model_loads(service, tmp_path, capsys):
    # the model loaded first (minutes for a large one), then uvicorn's "[Errno 98] ... address already in use"
    from experiments import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main([service, "--model", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot serve on 127.0.0.1:{port}: Address already in use; another server is listening there: "
        "choose another --port"]
    assert serve.address_problem("127.0.0.1", port) is None  # free again once closed


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is visible here")
def test_the_command_line_names_a_device_torch_cannot_see_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.serve", "scorer", "--model", str(tmp_path), "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: device='cuda' but torch") and "Traceback" not in result.stderr


def test_a_head_that_answers_nan_is_a_named_500_and_the_server_keeps_serving(checkpoint, tmp_path):
    """A diverged head (NaN weights): /score said 200 with "value": null, against its schema."""
    import shutil

    import torch
    from fastapi.testclient import TestClient

    from experiments.services.scorer_service import ScorerConfig, TextSPRM, build_scorer_app
    from policies.reflective_model import ReflectiveModel
    from scorers.sprm_head import build_sprm_head, save_score_module

    folder = Path(shutil.copytree(checkpoint, tmp_path / "diverged"))
    head = build_sprm_head(32, seed=0)
    with torch.no_grad():
        head[0].weight.fill_(float("nan"))
    save_score_module(head, folder)
    model, tokenizer = ReflectiveModel.from_pretrained(str(folder))
    app = build_scorer_app(TextSPRM(model, tokenizer), ScorerConfig(), "runs/head")
    with TestClient(app) as client:
        answer = client.post("/score", json={"text": trace(3), "return_all_scores": True})
        assert answer.status_code == 500
        assert answer.json() == {"error": "the SPRM head gave 4 of its 4 scores as NaN (diverged or damaged weights in runs/head?)"}
        assert client.get("/health").status_code == 200


def test_a_stop_string_of_multi_byte_characters_ends_its_row(checkpoint):
    # the window of decoded tokens counted one token a character: "😀" is 4 byte tokens, the stop
    # was missed and the row decoded on to max_tokens (the text was cut right afterwards)
    from experiments.services.text_completer import TransformersCompleter

    completer = TransformersCompleter.from_pretrained(checkpoint)
    for stop in ("😀", "。", "é", "ab"):
        ids = completer.tokenizer("xy" + stop, add_special_tokens=False).input_ids
        assert completer._stopped((stop,), ids), stop
        assert not completer._stopped((stop,), ids[:-1]), stop


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole():
    # a 200 MB body was read and parsed (+270 MiB of server memory) before the text's limit said 413
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from experiments.services.api_schemas import body_limit, install_contract

    app = FastAPI()
    install_contract(app, None, max_body_bytes=100)
    seen: list[int] = []

    async def echo(request):
        seen.append(len(await request.body()))
        return JSONResponse({"bytes": seen[-1]})

    app.add_route("/echo", echo, methods=["POST"])

    with TestClient(app) as client:
        assert client.post("/echo", content=b"x" * 100).json() == {"bytes": 100}
        over = client.post("/echo", content=b"x" * 101)
        assert over.status_code == 413 and over.json()["field"] == "body"
        assert over.json()["error"] == "body: is over the limit of 100 bytes"
        streamed = client.post("/echo", content=iter([b"x" * 60, b"x" * 60]))  # chunked: no Content-Length
        assert streamed.status_code == 413 and seen == [100]
    assert body_limit(1_000_000) > 12 * 1_000_000  # a text of 1e6 characters JSON-escaped outside the BMP still fits
    # through a route with a pydantic body (FastAPI reads it, and wrapped the stop as a 400: a 422
    # "could not be parsed as JSON")
    from experiments.services.api_schemas import GenerateRequest

    typed = FastAPI()
    install_contract(typed, None, max_body_bytes=100)

    async def generate(request):
        return {"results": [request.prefix_prompt]}

    generate.__annotations__ = {"request": GenerateRequest}  # this module's annotations are strings
    typed.post("/generate")(generate)

    with TestClient(typed) as client:
        assert client.post("/generate", json={"prefix_prompt": "hi"}).json() == {"results": ["hi"]}
        for content in (b'{"prefix_prompt": "' + b"x" * 200 + b'"}', iter([b'{"prefix_prompt": "', b"x" * 200, b'"}'])):
            over = client.post("/generate", content=content, headers={"Content-Type": "application/json"})
            assert over.status_code == 413 and over.json()["error"] == "body: is over the limit of 100 bytes"
