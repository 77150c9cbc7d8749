"""Tests of `policies.openai_policy.OpenAIPolicy`, the client of an OpenAI-compatible completions
server.

Without vLLM: a scripted HTTP server in a thread (`http.server`) pins the request body (token-id
prompt, seed, logprobs, vLLM's extra fields, max_tokens clamped to the context window), the
response parsing (token_ids, the "token_id:N" and text fallbacks, cached tokens), retries of
500 / 429 with backoff, no retry of a 400, a timeout, and a server that is down (a ConnectionError
naming the URL and how to start a server, after the retries, in well under a second here).

With vLLM (`@pytest.mark.vllm`, skipped with the install hint when vLLM cannot be imported): vLLM's
OpenAI server started by the test as a subprocess on the bigram checkpoint of
`tests/vllm_fixtures.py` (127.0.0.1, a free port, eager, block size 32, a 0.25 GiB KV cache) and
always stopped by PID. Greedy output equals `TransformersPolicy` step for step (token ids, texts,
finish reasons, log-probs within 1e-3); seeded samples are reproducible and equal to the offline
`VLLMPolicy`'s; prefix-cache hits come back through `prompt_tokens_details`; every registered
strategy runs on it. The server takes 20-70 s to start on a busy 2-core machine; the offline
engine starts meanwhile.

Run: `.venv/bin/python -m pytest tests/test_openai_policy.py`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from policies.openai_policy import OpenAIPolicy, OpenAIServerConfig, OpenAIServerError
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from policies.vllm_policy import VLLMPolicy
from scorers.confidence import ConfidenceScorer
from treesearch.protocols import Policy, TemperaturePolicy, WidthPolicy
from treesearch.records import Prefix, Problem, Step
from treesearch.registry import STRATEGIES, run_search
from vllm_fixtures import SEP, make_char_tokenizer, require_vllm, save_bigram_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOK = make_char_tokenizer()
ID = TOK.get_vocab()
S, EOS = ID[SEP], ID["<eos>"]
GREEDY = SamplingConfig(temperature=0.0, max_step_tokens=8, max_total_tokens=20)
SAMPLED = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=20)
START_TIMEOUT_S = 240.0
FAST = dict(max_retries=2, backoff_s=0.05, timeout_s=5.0)  # retry settings of the scripted-server tests


def ids(text: str) -> tuple[int, ...]:
    return tuple(TOK(text, add_special_tokens=False).input_ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_bigram_checkpoint(tmp_path_factory.mktemp("openai_policy") / "bigram")


# -- a scripted server --------------------------------------------------------------------------


@dataclass
class Script:
    """What the scripted server answers: /v1/models lists `model` with `window`; each POST to
    /v1/completions takes the next (status, body) of `answers` (the last one repeats), after
    `delay_s`. Every completions body received is kept in `bodies`."""

    answers: list[tuple[int, dict[str, Any] | str]]
    window: int | None = 256
    model: str = "fake"
    lists_models: bool = True  # False: GET /v1/models is a 404 (servers without it)
    delay_s: float = 0.0
    cut_at: int | None = None  # bytes of each completions body sent before the connection closes
    bodies: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)


def completion_body(token_ids: list[int] | None, logprobs: list[float], text: str = "", cached: int | None = None,
                    tokens: list[str] | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": 3, "completion_tokens": len(logprobs)}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    choice = {"index": 0, "text": text, "finish_reason": "stop", "token_ids": token_ids,
              "logprobs": {"token_logprobs": logprobs, "tokens": tokens or []}}
    return {"choices": [choice], "usage": usage}


def handler_for(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict[str, Any] | str, cut_at: int | None = None) -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()  # a str: sent as it is
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data[:cut_at])
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                pass

        def do_GET(self) -> None:
            if not script.lists_models:
                self._send(404, {"detail": "Not Found"})
                return
            self._send(200, {"data": [{"id": script.model, "max_model_len": script.window}]})

        def do_POST(self) -> None:
            script.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            script.authorization.append(self.headers.get("Authorization"))
            time.sleep(script.delay_s)
            status, body = script.answers[min(len(script.bodies), len(script.answers)) - 1]
            self._send(status, body, script.cut_at)

    return Handler


@pytest.fixture
def scripted() -> Iterator[Any]:
    """start(script, handler=None) -> base URL of a scripted server on a free port (handler: a
    request handler class in place of the script's); all stopped at the end."""
    servers: list[ThreadingHTTPServer] = []

    def start(script: Script, handler: type | None = None) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler or handler_for(script))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


EOS_STEP = completion_body([ID["</think>"], ID["4"], EOS], [-0.1, -0.2, -0.3], cached=1)


def one_step(url: str, checkpoint: Path, sampling: SamplingConfig = SAMPLED, question: str = "<think>3",
             model: str | None = None, **client):
    with OpenAIPolicy(url, model, checkpoint, sampling, lambda p: p.question, **{**FAST, **client}) as policy:
        (row,) = policy.propose([Prefix(Problem("p", question))], 1, seed=7)
        return row[0], policy


def test_request_body_and_parsing(scripted, checkpoint):
    script = Script([(200, EOS_STEP)])
    step, policy = one_step(scripted(script), checkpoint)
    assert step.token_ids == (ID["</think>"], ID["4"], EOS) and step.text == "</think>4" and step.finish == "eos"
    assert step.token_logprobs == (-0.1, -0.2, -0.3)
    # prompt 3 tokens, 1 cached; 2 of the 3 generated tokens fed back: 2 + 2
    assert step.tokens_forwarded == 4
    assert (policy.last_usage.requests, policy.last_usage.cached_prompt_tokens) == (1, 1)
    (body,) = script.bodies
    assert body["prompt"] == list(TOK("<think>3").input_ids) and body["model"] == "fake" and body["n"] == 1
    assert body["max_tokens"] == 8 and body["temperature"] == 1.0 and body["top_p"] == 1.0
    assert body["logprobs"] == 0 and body["stop_token_ids"] == [S] and isinstance(body["seed"], int)
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"] and body["skip_special_tokens"] is False
    assert body["top_k"] == 0 and body["repetition_penalty"] == 1.0  # not the server's generation_config
    assert isinstance(policy, Policy) and policy.num_parameters > 0
    script.bodies.clear()  # the sampling's own penalty (the reference's 1.05) goes with the request
    one_step(scripted(script), checkpoint, SamplingConfig(temperature=1.0, max_step_tokens=8, repetition_penalty=1.05))
    assert script.bodies[0]["repetition_penalty"] == 1.05


def test_greedy_sends_no_seed_and_the_window_clamps_max_tokens(scripted, checkpoint):
    script = Script([(200, EOS_STEP)], window=5)
    one_step(scripted(script), checkpoint, GREEDY)  # prompt <bos><think>3: room for 2 tokens
    assert "seed" not in script.bodies[0] and script.bodies[0]["max_tokens"] == 2
    full = Script([(200, EOS_STEP)], window=3)  # the prompt fills the window: nothing is sent
    step, policy = one_step(scripted(full), checkpoint, GREEDY)
    assert step.token_ids == () and step.finish == "length" and step.tokens_forwarded == 0
    assert not full.bodies and policy.last_usage.prompt_tokens == 0


def test_a_step_that_fills_the_path_or_the_window_on_a_separator_ends_the_path(scripted, checkpoint):
    # "4" + separator: the last tokens max_total_tokens (or the window) allows, so the path ends
    # "length" (the next round could only return empty steps, n copies of one dead path)
    sep_step = completion_body([ID["4"], S], [-0.1, -0.2])
    short = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=2)
    step, _ = one_step(scripted(Script([(200, sep_step)])), checkpoint, short)
    assert step.token_ids == (ID["4"], S) and step.finish == "length"
    step, _ = one_step(scripted(Script([(200, sep_step)], window=5)), checkpoint)  # prompt 3 tokens
    assert step.token_ids == (ID["4"], S) and step.finish == "length"
    step, _ = one_step(scripted(Script([(200, sep_step)])), checkpoint)  # room left: the path goes on
    assert step.finish == "separator"


def test_a_prompt_longer_than_the_servers_window_is_an_error_naming_it(scripted, checkpoint):
    script = Script([(200, EOS_STEP)], window=2)
    with pytest.raises(ValueError, match=r"'p'.* 3 tokens.*context window of 2 tokens.*max_model_len"):
        one_step(scripted(script), checkpoint, GREEDY)  # <bos><think>3
    assert not script.bodies


def test_a_server_without_a_model_list_needs_the_model_name(scripted, checkpoint):
    script = Script([(200, EOS_STEP)], lists_models=False)
    url = scripted(script)
    step, _ = one_step(url, checkpoint, model="served-name")
    assert step.finish == "eos" and script.bodies[0]["model"] == "served-name"
    with pytest.raises(OpenAIServerError, match="answered 404"):
        one_step(url, checkpoint)


def test_the_api_key_is_sent_as_a_bearer_token(scripted, checkpoint, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = Script([(200, EOS_STEP)])
    url = scripted(script)
    one_step(url, checkpoint)
    one_step(url, checkpoint, api_key="given")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    one_step(url, checkpoint)
    assert script.authorization == [None, "Bearer given", "Bearer from-env"]


def test_token_ids_from_logprob_tokens_or_the_text(scripted, checkpoint):
    as_ids = completion_body(None, [-0.1, -0.2, -0.3], tokens=[f"token_id:{t}" for t in (5, 11, 2)])
    step, policy = one_step(scripted(Script([(200, as_ids)])), checkpoint)
    assert step.token_ids == (5, 11, 2) and step.finish == "eos" and policy.last_usage.cached_prompt_tokens == 0
    as_text = completion_body(None, [-0.1, -0.2, -0.3], text="</think>4<eos>", tokens=["</think>", "4", "<eos>"])
    step, _ = one_step(scripted(Script([(200, as_text)])), checkpoint)
    assert step.token_ids == (5, 11, 2) and step.text == "</think>4"
    no_logprobs = completion_body([5, 11, 2], [])
    with pytest.raises(ValueError, match="one sampled-token log-prob per generated token"):
        one_step(scripted(Script([(200, no_logprobs)])), checkpoint)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_an_error_status_is_retried_with_backoff(scripted, checkpoint, status):
    script = Script([(status, {"error": {"message": "busy"}}), (status, {}), (200, EOS_STEP)])
    start = time.monotonic()
    step, _ = one_step(scripted(script), checkpoint)
    assert step.finish == "eos" and len(script.bodies) == 3
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff_s, then twice that
    with pytest.raises(OpenAIServerError, match=f"answered {status} on all 3 tries: busy") as error:
        one_step(scripted(Script([(status, {"error": {"message": "busy"}})])), checkpoint)
    assert error.value.status == status


def test_a_200_that_is_not_a_json_object_is_retried_then_named(scripted, checkpoint):
    """A proxy's HTML page or a body cut short on a 200 raised a bare JSONDecodeError at once."""
    page = "<html><body>502 Bad Gateway</body></html>"
    script = Script([(200, page), (200, EOS_STEP)])
    step, _ = one_step(scripted(script), checkpoint)
    assert step.finish == "eos" and len(script.bodies) == 2
    with pytest.raises(OpenAIServerError, match=r"/v1/completions answered 200 with a body that is not a JSON object "
                                                r"on all 3 tries: '<html><body>502 Bad Gateway") as error:
        one_step(scripted(Script([(200, page)])), checkpoint)
    assert error.value.status == 200
    with pytest.raises(OpenAIServerError, match=r"/v1/completions answered without a choice: \{\"object\""):
        one_step(scripted(Script([(200, {"object": "text_completion", "choices": []})])), checkpoint)


@pytest.mark.parametrize("choice, usage", [
    ({"token_ids": ["a"], "logprobs": {"token_logprobs": [-0.1]}}, {}),
    ({"token_ids": [5], "logprobs": [-0.1]}, {}),
    ({"token_ids": [5], "logprobs": {"token_logprobs": [-0.1]}}, {"prompt_tokens_details": {"cached_tokens": "x"}}),
    ({"text": ["1"], "logprobs": {"token_logprobs": [-0.1]}}, {}),  # a list of token lists came back in silence
])
def test_a_choice_with_fields_of_other_types_is_named(scripted, checkpoint, choice, usage):
    # a bare ValueError / AttributeError ("'list' object has no attribute 'get'") naming no server before
    url = scripted(Script([(200, {"choices": [{"index": 0, "text": "", **choice}], "usage": usage})]))
    with pytest.raises(OpenAIServerError, match=f"{url}/v1/completions answered a malformed choice"):
        one_step(url, checkpoint)


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_a_choice_the_server_gave_up_on_is_an_error_not_an_empty_step(scripted, checkpoint, reason):
    # vLLM answers the requests its dying engine aborted with 200 and no tokens: they were read as
    # finished empty paths (finish "length", score 1.0 under confidence) and kept on resume
    aborted = completion_body([], [])
    aborted["choices"][0]["finish_reason"] = reason
    url = scripted(Script([(200, aborted)]))
    with pytest.raises(OpenAIServerError, match=rf"{url}/v1/completions answered finish_reason='{reason}': the server "
                                                r"gave the request up .*restart the server and rerun the same command") as error:
        one_step(url, checkpoint)
    assert error.value.status == 200


def test_a_server_that_breaks_off_its_answer_is_not_called_absent(scripted, checkpoint):
    # "no OpenAI-compatible server answers ... Start one" before, for a server that had answered
    url = scripted(Script([(200, EOS_STEP)], cut_at=20))
    with pytest.raises(ConnectionError, match=r"the server took the request but broke off its answer on all 3 tries "
                                              r"\(RemoteProtocolError") as error:
        one_step(url, checkpoint)
    assert "Start one" not in str(error.value)


def test_a_listener_that_closes_at_once_is_no_server(checkpoint):
    # a port forward with nothing behind it accepts and closes: "the server took the request" was said
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop_flag = threading.Event()

    def close_each() -> None:
        listener.settimeout(0.2)
        while not stop_flag.is_set():
            try:
                listener.accept()[0].close()
            except OSError:
                continue

    threading.Thread(target=close_each, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="no OpenAI-compatible server answers"):
            one_step(f"http://127.0.0.1:{listener.getsockname()[1]}", checkpoint)
    finally:
        stop_flag.set()
        listener.close()


def test_an_infinite_timeout_or_backoff_is_refused(checkpoint):
    # both passed, then the first request died in httpx's settimeout / time.sleep (OverflowError)
    for setting in ({"timeout_s": float("inf")}, {"backoff_s": float("inf")}):
        with pytest.raises(ValueError, match=f"OpenAIServerConfig.{next(iter(setting))}=inf must be a finite number"):
            OpenAIServerConfig("http://127.0.0.1:9", **setting)


def test_a_temperature_vllm_would_raise_to_its_smallest_is_refused(checkpoint):
    """vLLM samples a temperature in (0, 0.01) at 0.01 with a log line only; transformers as given."""
    with pytest.raises(ValueError, match=r"OpenAIPolicy: temperature=0.005 is below vLLM's smallest, 0.01"):
        OpenAIPolicy("http://127.0.0.1:9", None, checkpoint, SamplingConfig(temperature=0.005), str)
    with OpenAIPolicy("http://127.0.0.1:9", None, checkpoint, SamplingConfig(temperature=0.6), str) as policy:
        with pytest.raises(ValueError, match="below vLLM's smallest"):
            policy.with_temperature(0.001)
        assert policy.with_temperature(0.0).sampling.temperature == 0.0
        assert policy.with_temperature(0.01).sampling.temperature == 0.01
    with pytest.raises(ValueError, match=r"VLLMPolicy: temperature=0.005 is below vLLM's smallest"):
        VLLMPolicy(None, None, SamplingConfig(temperature=0.005), str, 0, [0], 8)


def test_vllm_policy_refuses_the_temperature_before_its_engine_loads(checkpoint, monkeypatch):
    from policies import vllm_policy

    monkeypatch.setattr(vllm_policy, "build_llm", lambda *a, **k: pytest.fail("the engine started"))
    with pytest.raises(ValueError, match=r"VLLMPolicy: temperature=0.005 is below vLLM's smallest"):
        VLLMPolicy.from_pretrained(checkpoint, SamplingConfig(temperature=0.005), str)


def test_a_client_error_is_not_retried_and_names_the_servers_message(scripted, checkpoint):
    script = Script([(400, {"error": {"message": "max_tokens=300 cannot be greater than max_model_len"}})])
    with pytest.raises(OpenAIServerError, match="answered 400: max_tokens=300") as error:
        one_step(scripted(script), checkpoint)
    assert len(script.bodies) == 1 and error.value.status == 400


def test_a_slow_server_is_a_timeout_error(scripted, checkpoint):
    script = Script([(200, EOS_STEP)], delay_s=1.0)
    with pytest.raises(TimeoutError, match=r"timeout_s=0\.2 on all 2 tries"):
        one_step(scripted(script), checkpoint, timeout_s=0.2, max_retries=1)


def test_a_server_that_is_down_is_a_clear_connection_error_after_the_retries(checkpoint):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        one_step(url, checkpoint)
    message = str(error.value)
    assert url in message and "3 tries" in message
    assert "python -m vllm.entrypoints.openai.api_server" in message and str(checkpoint) in message
    # without a KV size vLLM's CPU backend reserves 92% of RAM and the suggested server never started
    assert "--kv-cache-memory-bytes 1073741824" in message
    assert 0.05 + 0.1 <= time.monotonic() - start < 5


def test_base_url_reaches_the_server_root_with_or_without_v1():
    roots = {OpenAIServerConfig(url).root for url in (
        "http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/")}
    assert roots == {"http://127.0.0.1:8000"}
    assert OpenAIServerConfig("https://host/api/v1").root == "https://host/api"
    assert OpenAIServerConfig("https://host/v1beta").root == "https://host/v1beta"  # only a whole /v1 segment


def test_bad_settings_name_the_value(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="base_url='127.0.0.1:8000'"):
        OpenAIServerConfig("127.0.0.1:8000")
    with pytest.raises(ValueError, match="max_concurrency=0"):
        OpenAIServerConfig("http://x", max_concurrency=0)
    with pytest.raises(ValueError, match="max_retries=-1"):
        OpenAIServerConfig("http://x", max_retries=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenAIPolicy("http://x", None, tmp_path / "nope", GREEDY, str)
    with pytest.raises(TypeError, match="not a SamplingConfig"):
        OpenAIPolicy("http://x", None, checkpoint, {"temperature": 0}, str)  # type: ignore[arg-type]


# -- a real vLLM server -------------------------------------------------------------------------


@dataclass(frozen=True)
class Engines:
    """The vLLM server (its URL) and, for comparison, the offline VLLMPolicy."""

    url: str
    offline: Any


def server_command(checkpoint: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(checkpoint), "--dtype", "float32", "--enforce-eager", "--block-size", "32",
        "--enable-prefix-caching", "--kv-cache-memory-bytes", str(2**28), "--seed", "0",
        "--enable-prompt-tokens-details", "--generation-config", "vllm", "--disable-log-stats",
        "--uvicorn-log-level", "warning", "--no-enable-chunked-prefill",  # (policies/openai_policy.py)
    ]


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"vLLM server not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Terminate by PID (kill if it does not exit); its engine-core child exits with it."""
    if process.poll() is None:
        os.kill(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory, vllm_cache) -> Iterator[Engines]:
    """Start the server, build the offline engine while it boots, wait for /health; stop both."""
    require_vllm()
    from policies.vllm_engine import VLLMEngineConfig
    from policies.vllm_policy import VLLMPolicy

    folder = tmp_path_factory.mktemp("vllm_server")
    port, log = free_port(), folder / "server.log"
    # the server always runs its engine core in a child process (vLLM's async client has no
    # in-process mode), so VLLM_ENABLE_V1_MULTIPROCESSING does not speed its start up
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CACHE_ROOT": str(folder / "cache")}
    with open(log, "wb") as out:
        process = subprocess.Popen(server_command(checkpoint, port), cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    offline = None
    try:
        engine = VLLMEngineConfig(str(checkpoint), kv_cache_gib=0.25, cache_root=vllm_cache)
        offline = VLLMPolicy.from_pretrained(checkpoint, SAMPLED, lambda p: p.question, engine=engine)
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, url, log)
        yield Engines(url, offline)
    finally:
        stop(process)
        if offline is not None:
            offline.close()


@pytest.fixture(scope="module")
def hf_policy(checkpoint):
    return TransformersPolicy.from_pretrained(checkpoint, GREEDY, lambda p: p.question)


def served(engines: Engines, checkpoint: Path, sampling: SamplingConfig) -> OpenAIPolicy:
    return OpenAIPolicy(engines.url, None, checkpoint, sampling, lambda p: p.question, max_concurrency=8)


def step_of(text: str) -> Step:
    tokens = ids(text)
    return Step(text, tokens, (0.0,) * len(tokens), "separator")


LONG_QUESTION = "<think>" + "1+2=3 4-5=x " * 4  # 50 tokens: one whole 32-token cache block


def prefixes() -> list[Prefix]:
    """As tests/test_vllm_policy.py: right after <think>, EOS soon, after a separator, after
    </think>, a long one, and one with no budget left."""
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


def drawn(nested) -> list:
    """Token ids and finish of every step (without the cache-dependent tokens_forwarded)."""
    if isinstance(nested, Step):
        return [nested.token_ids, nested.finish]
    return [drawn(item) for item in nested]


@pytest.mark.vllm
def test_greedy_output_equals_transformers_step_for_step(engines, checkpoint, hf_policy):
    with served(engines, checkpoint, GREEDY) as policy:
        assert policy.num_parameters == hf_policy.num_parameters
        for stop_at_step in (True, False):
            got = policy.propose(prefixes(), 2, seed=0, stop_at_step=stop_at_step)
            expected = hf_policy.propose(prefixes(), 2, seed=0, stop_at_step=stop_at_step)
            for got_row, expected_row in zip(got, expected):
                assert_same_steps(got_row, expected_row)
        assert [row[0].finish for row in got] == ["length", "eos", "length", "eos", "length", "length"]
        steps = policy.propose(prefixes(), 1, seed=0)
        assert [row[0].text for row in steps[:4]] == [SEP + "1+2" + SEP, "</think>4", "1+2" + SEP, "4"]
        rollouts = zip(policy.rollout(prefixes(), 1, seed=0), hf_policy.rollout(prefixes(), 1, seed=0))
        for got_row, expected_row in rollouts:
            assert_same_steps(got_row[0], expected_row[0])


@pytest.mark.vllm
def test_seeded_samples_are_reproducible_and_equal_the_offline_engines(engines, checkpoint):
    with served(engines, checkpoint, SAMPLED) as policy:
        first = policy.propose(prefixes(), 6, seed=3)
        assert drawn(policy.propose(prefixes(), 6, seed=3)) == drawn(first)
        assert drawn(policy.propose(prefixes(), 6, seed=4)) != drawn(first)
        assert drawn(first) == drawn(engines.offline.propose(prefixes(), 6, seed=3))
        assert {s.finish for row in first for s in row} == {"separator", "eos", "length"}
        assert policy.last_usage.requests > 6 * len(prefixes())  # continuations after non-boundary separators
        rollouts = policy.rollout(prefixes(), 3, seed=5)
        assert drawn(rollouts) == drawn(engines.offline.rollout(prefixes(), 3, seed=5))


@pytest.mark.vllm
def test_propose_widths_draws_the_first_samples_of_each_prefixs_propose_row(engines, checkpoint):
    with served(engines, checkpoint, SAMPLED) as policy:
        assert isinstance(policy, WidthPolicy)
        widths = [1, 4, 2, 3, 1, 2]
        rows = policy.propose_widths(prefixes(), widths, seed=3)
        assert [len(row) for row in rows] == widths
        assert drawn(rows) == [drawn(row[:width]) for row, width in zip(policy.propose(prefixes(), 4, seed=3), widths)]
        assert drawn(rows) == drawn(engines.offline.propose_widths(prefixes(), widths, seed=3))


@pytest.mark.vllm
def test_with_temperature_samples_on_the_same_server(engines, checkpoint):
    with served(engines, checkpoint, SAMPLED) as policy:
        greedy = policy.with_temperature(0.0)
        assert isinstance(policy, TemperaturePolicy) and greedy.client is policy.client
        assert greedy.sampling.temperature == 0.0 and policy.sampling.temperature == SAMPLED.temperature
        expected = engines.offline.with_sampling(GREEDY).propose(prefixes(), 1, seed=0)
        assert drawn(greedy.propose(prefixes(), 1, seed=4)) == drawn(expected)
        assert greedy.usage.requests > 0 and policy.usage.requests == 0  # each counts its own


def forwarded(rows) -> int:
    """Tokens forwarded over every step of every sample."""
    return sum(step.tokens_forwarded for row in rows for step in row)


@pytest.mark.vllm
def test_prefix_cache_hits_come_back_as_cached_tokens(engines, checkpoint):
    with served(engines, checkpoint, SAMPLED) as policy:
        prefix = [Prefix(Problem("cache", "<think>" + "x=5-4 3=2+1 " * 4))]  # a first block no other test sends
        first = policy.propose(prefix, 4, seed=0)
        second = policy.propose(prefix, 4, seed=0)
        warm = policy.last_usage
        assert drawn(second) == drawn(first)
        assert warm.cached_prompt_tokens >= 4 * 32 and warm.cached_share > 0.5
        # Which of the first call's requests computes the prompt and which hit the cache depends on
        # arrival order, so compare the whole call: at least one first request computed every block.
        assert forwarded(second) <= forwarded(first) - 32


@pytest.mark.vllm
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_on_the_served_policy(engines, checkpoint, name):
    budgets = {
        "best_of_n": dict(n=4),
        "beam_search": dict(n=4, beam_width=2, max_depth=4),
        "dvts": dict(n=4, beam_width=2, max_depth=4),
        "mcts": dict(iterations=4, expand_width=2, max_depth=4, rollout=True),
        "rebase": dict(n=4, max_depth=4),
        "particle_filtering": dict(n=4, max_depth=4),
    }
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=24)
    with served(engines, checkpoint, sampling) as policy:
        results = run_search(name, [Problem("p0", "<think>"), Problem("p1", "<think>1")], policy,
                             ConfidenceScorer(), **budgets[name])
    assert len(results) == 2
    for result in results:
        assert result.candidates and result.compute.tokens_generated > 0 and result.compute.tokens_forwarded > 0


def test_close_stops_the_requests_in_flight_and_refuses_later_calls(scripted, checkpoint):
    # Ctrl-C / SIGTERM of a run against a stalled server waited out every in-flight request's
    # retries (~40 s at timeout_s=10); a call after close said "cannot schedule new futures after shutdown"
    script = Script([(200, EOS_STEP)], delay_s=30)
    url = scripted(script)
    policy = OpenAIPolicy(url, None, checkpoint, SAMPLED, lambda p: p.question, timeout_s=2, max_retries=3, backoff_s=0.1)
    failures: list[BaseException] = []

    def propose() -> None:
        try:
            policy.propose([Prefix(Problem("p", "<think>3"))], 2, seed=7)
        except BaseException as err:  # noqa: BLE001 - what the caller sees
            failures.append(err)

    caller = threading.Thread(target=propose)
    caller.start()
    time.sleep(0.5)
    start, sent = time.monotonic(), len(script.bodies)
    policy.close()
    caller.join(timeout=30)
    # the requests in flight end at their read timeout (2 s), none is tried again (4 tries x 2 s before)
    assert not caller.is_alive() and time.monotonic() - start < 3.5 and failures
    time.sleep(0.3)
    assert len(script.bodies) == sent
    with pytest.raises(RuntimeError, match="client was closed .*build a new policy"):
        policy.propose([Prefix(Problem("p", "<think>3"))], 1, seed=7)
    with pytest.raises(RuntimeError, match="client was closed"):
        policy.with_temperature(0.5).propose([Prefix(Problem("p", "<think>3"))], 1, seed=7)
