"""The policy service: the reference's `POST /generate` (response_num completions of a raw text
prompt) on a `TextCompleter` backend (transformers or vLLM), with concurrent requests batched
into one backend call.

Usage:
    python -m experiments.serve policy --model outputs/checkpoints/tiny-arith/final --port 8000
    curl -s localhost:8000/generate -H 'Content-Type: application/json' \\
        -d '{"prefix_prompt": "Q: 2+3?\\n<think>", "response_num": 2, "max_tokens": 64, "stop": [".\\n\\n"], "seed": 1}'
    # {"results": ["2+3=5.\\n\\n", "2+3=5.\\n\\n"]}

In Python:
    completer = TransformersCompleter.from_pretrained("outputs/checkpoints/tiny-arith/final")
    app = build_policy_app(completer, PolicyConfig(), model_name="tiny-arith")

Routes: `POST /generate` and, because the reference's README points its client at the bare
address ("--response_api_url http://localhost:8000", which its client POSTs to as is), the same
handler on `POST /`; `GET /health`.

Limits checked per request (422 naming the field): response_num <= config.max_response_num;
a prompt of no token (`prefix_prompt`; the schema already refuses ""); a prompt over the
model's context or config.max_prompt_chars, or a body over `api_schemas.body_limit` of it (413);
a prompt of more characters than the context's tokens can cover is refused before it is
tokenised (`token_chars`: its backend's `max_token_chars`, the longest token's characters).
max_tokens is capped at the room the prompt leaves in the context, as the reference's vLLM
`LLM.generate` ends a sequence there (its client always asks for 32768; the default 1024 too). The backend runs in one worker thread; a backend failure
answers {"error": str} with status 500.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from experiments.services.api_schemas import (
    CLIENT_GONE_STATUS, FieldError, GenerateRequest, GenerateResponse, HealthResponse, body_limit, install_contract,
)
from experiments.services.micro_batcher import BatcherConfig, ClientGone, MicroBatcher
from experiments.services.text_completer import CompletionRequest, TextCompleter
from experiments.services.token_chars import check_fits


@dataclass(frozen=True)
class PolicyConfig:
    """Serving limits of the policy service.

    max_response_num: most completions per request. max_prompt_chars: longest prompt (413).
    batch: how concurrent requests are batched; its max_weight counts completions (rows).
    """

    max_response_num: int = 64
    max_prompt_chars: int = 1_000_000
    batch: BatcherConfig = field(default_factory=lambda: BatcherConfig(max_batch=32, max_wait_s=0.005, max_weight=256))

    def __post_init__(self) -> None:
        if self.max_response_num < 1:
            raise ValueError(f"max_response_num={self.max_response_num!r} must be >= 1")
        if self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars={self.max_prompt_chars!r} must be >= 1")


def completion_request(request: GenerateRequest, completer: TextCompleter, config: PolicyConfig) -> CompletionRequest:
    """The backend request of a valid body, or FieldError naming the field over a limit."""
    if len(request.prefix_prompt) > config.max_prompt_chars:
        raise FieldError("prefix_prompt", f"has {len(request.prefix_prompt)} characters, over the limit "
                                          f"{config.max_prompt_chars}", 413)
    if request.response_num > config.max_response_num:
        raise FieldError("response_num", f"{request.response_num} is over the server's limit {config.max_response_num}")
    # a prompt of more characters than the context's tokens can cover: refused untokenised (~1 s a megabyte)
    check_fits("prefix_prompt", request.prefix_prompt, completer.max_model_len,
               getattr(completer, "max_token_chars", None), f"the model's context is {completer.max_model_len}")
    prompt_tokens = completer.count_tokens(request.prefix_prompt)
    if prompt_tokens == 0:
        raise FieldError("prefix_prompt", "is empty (no token to continue from)")
    room = completer.max_model_len - prompt_tokens
    if room < 1:
        raise FieldError("prefix_prompt", f"has {prompt_tokens} tokens, the model's context is {completer.max_model_len}", 413)
    # more than fits (the reference's client always asks 32768; the default 1024 on a shorter
    # context): as much as fits, as the reference's vLLM LLM.generate ends a sequence at the context
    return CompletionRequest(
        prompt=request.prefix_prompt, n=request.response_num, max_tokens=min(request.max_tokens, room),
        temperature=request.temperature, stop=request.stop_strings(), seed=request.seed,
    )


def build_policy_app(completer: TextCompleter, config: PolicyConfig, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: POST /generate (and /), GET /health; requests batched by a `MicroBatcher`."""
    batcher: MicroBatcher[CompletionRequest, list[str]] = MicroBatcher(
        completer.complete, config.batch, weight=lambda r: r.n
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="treesearch policy", lifespan=lifespan)
    install_contract(app, api_key, body_limit(config.max_prompt_chars))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": model_name, "service": "policy", "backend": completer.name,
            "max_model_len": completer.max_model_len, "max_response_num": config.max_response_num,
            "max_batch": config.batch.max_batch, "batches_run": batcher.batches_run,
            "requests_served": batcher.items_run,
        }

    async def generate(request: GenerateRequest, http: Request) -> Any:
        # tokenising a long prompt takes a second a megabyte: off the event loop, which keeps serving
        backend_request = await asyncio.to_thread(completion_request, request, completer, config)
        try:
            results = await batcher.submit(backend_request, gone=http.is_disconnected)
        except ClientGone:
            return JSONResponse({"error": "the client went away"}, status_code=CLIENT_GONE_STATUS)
        except Exception as exc:  # noqa: BLE001 - the reference's error body
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return {"results": results}

    app.post("/generate", response_model=GenerateResponse)(generate)
    app.post("/", response_model=GenerateResponse, include_in_schema=False)(generate)
    return app
