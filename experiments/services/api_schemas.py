"""The wire contract of the services: the reference's request and response bodies as pydantic
models, the JSON error format, and the optional API key, installed on a FastAPI app.

Usage:
    app = FastAPI()
    install_contract(app, api_key="secret")        # 422/413/401 as JSON errors naming the field
    request = GenerateRequest.model_validate({"prefix_prompt": "Q: 1+1?"})
    request.stop_strings()                          # () | ("a",) | ("a", "b")
    raise FieldError("response_num", "65 is over the server's limit 64")

Bodies (MetaStone-S1 / XBai-o4 `test/policy_model_queue.py` and `test/score_model_queue.py`; a
client written for those services works unchanged against ours):
    POST /generate {prefix_prompt: str, max_tokens: int = 1024, response_num: int = 8,
                    stop: list[str] | str | null = null, temperature: float = 0.8,
                    seed: int | null = null}  ->  {"results": [str, ...]}
    POST /score    {text: str, return_all_scores: bool = false}
                   ->  {"value": float} (+ "all_scores", "token_ids", "score_positions")
    a backend failure -> {"error": str} (status 500; the reference answers the same body with 200,
                   and its client treats both alike)
Unknown fields are ignored, as the reference's models do (a client's "model" or "user" passes),
except three kinds a client means something by (`check_field_names`, 422 naming the field): an
OpenAI-style name of one of ours ("n", "max_new_tokens", "prompt": use response_num, max_tokens,
prefix_prompt), an option these services do not have set to anything but off ("stream": true,
"logprobs", "echo", "best_of", "min_tokens"), and a misspelling of one of ours ("temperture": did you mean
temperature?), which silently fell back to the default before; a generate request's sampling
options the server sets for every request (top_p, repetition_penalty) or lacks (top_k, min_p,
frequency_penalty, presence_penalty) are refused too, unless null. Fields are checked more strictly than
the reference's (which only has the types): types strictly (no "4" for 4, no 1 or "yes" for true,
no bool for a number; an integer is a valid float), counts >= 1, a non-empty prompt, temperature
in [0, 2] (vLLM's and OpenAI's range) and finite, seed in [0, 2^63), stop strings non-empty (at
most MAX_STOP_STRINGS of at most MAX_STOP_CHARS characters). Limits that depend on the
model or the server's configuration (the most responses, the context length, the longest text)
are checked by the services and raised as `FieldError`.

Errors: every rejected request gets a JSON body
    {"error": "<field>: <what is wrong>", "field": "<field>", "detail": [pydantic's errors]}
with status 422 (invalid or malformed body; "field" is "body" for malformed JSON, a body that is
not UTF-8, nested too deeply or an integer of over 4300 digits, or a missing body), 413 (text over the configured length) or 401 (missing or wrong API key, when one is set:
every endpoint, /health included, needs `Authorization: Bearer KEY`, the scheme in any case).
Other HTTP errors (404, 405) answer {"error": str} with their status; a request whose client
left before its batch ran is dropped (CLIENT_GONE_STATUS, which nobody reads).
"""
from __future__ import annotations

import difflib
import secrets
from typing import Any, Awaitable, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from policies.sampling_config import VLLM_MIN_TEMPERATURE

MAX_SEED = 2**63  # exclusive; torch generators and vLLM take 64-bit seeds
MAX_TEMPERATURE = 2.0  # inclusive; vLLM rejects more (a 500 from its backend) and so does OpenAI's API
# FastAPI's HTTPException detail for a body json.loads raised on with anything but a JSONDecodeError
# (not UTF-8, nested past the recursion limit): answered as a malformed body, 422 naming "body"
_UNPARSABLE_BODY = "There was an error parsing the body"
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": the answer to a request dropped unrun
# names OpenAI-style clients use for our fields, and options these services do not have
OTHER_NAMES: dict[str, str] = {
    "n": "response_num", "num_return_sequences": "response_num", "max_new_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens", "prompt": "prefix_prompt", "stop_sequences": "stop",
}
UNSUPPORTED_OPTIONS: tuple[str, ...] = ("stream", "logprobs", "top_logprobs", "echo", "best_of", "min_tokens")
# sampling options a generate request cannot set: the server samples every request with its own
# top_p and repetition penalty (`serve policy --top-p / --repetition-penalty`, the reference's
# 0.95 / 1.05), and has none of the others; a client's top_p=0.01 got full-temperature samples
SERVER_SAMPLING_OPTIONS: tuple[str, ...] = (
    "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
# stop strings per request and characters per string: the worker checks every one after each token
# of each row, so 50,000 of them held a tiny request behind one 64-row request for 25 s
MAX_STOP_STRINGS, MAX_STOP_CHARS = 32, 512
MISSPELLING_CUTOFF = 0.8  # difflib ratio above which an unknown name is taken for a misspelt field


def check_field_names(body: Any, fields: Mapping[str, Any]) -> None:
    """FieldError for an unknown key of body that a client means something by (module
    docstring); other unknown keys pass (ignored, as the reference's models do)."""
    if not isinstance(body, dict):
        return
    for key, value in body.items():
        if not isinstance(key, str) or key in fields:
            continue
        if OTHER_NAMES.get(key) in fields:
            raise FieldError(key, f"is not a field of this request; its name here is {OTHER_NAMES[key]}")
        if key in SERVER_SAMPLING_OPTIONS and "temperature" in fields and value is not None:
            raise FieldError(key, "cannot be set per request: the server samples every request with its own top_p and "
                                  "repetition_penalty (serve policy --top-p, --repetition-penalty); leave it out")
        if key in UNSUPPORTED_OPTIONS:  # off passes, and is no misspelling ("min_tokens" of max_tokens)
            if not _is_off(key, value):
                raise FieldError(key, "is not supported by this service (one JSON answer with texts only); leave it out")
            continue
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=MISSPELLING_CUTOFF)
        if close:
            raise FieldError(key, f"is not a field of this request; did you mean {close[0]}?")


def _is_off(option: str, value: Any) -> bool:
    """Whether an unsupported option's value leaves it off: null, false or 0, and best_of 1 (one
    sample per answer, OpenAI's default); logprobs only null or false (the completions API's
    logprobs=0 asks for the sampled token's log-prob: an answer without it would be wrong)."""
    if option == "logprobs":
        return value is None or value is False
    return value in (None, False, 0) or (option == "best_of" and value == 1 and not isinstance(value, bool))


def _no_bool(value: Any) -> Any:
    """pydantic's lax mode reads true as 1; a bool given for a number is a client bug."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a bool")
    return value


def _unicode_text(value: Any) -> Any:
    """value, or a ValueError for a string (or a list's string) holding a lone surrogate: JSON's
    "\\ud800" escape parses, but no tokenizer encodes it (a client that cut a string inside an
    emoji got a plain-text 500 from the scorer)."""
    for text in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"must be Unicode text: a lone surrogate {text[exc.start]!r} at character "
                                 f"{exc.start} (a string cut inside a character?)") from None
    return value


class ServiceRequest(BaseModel):
    """What the request bodies share: frozen, strict types, unknown fields ignored but for the
    ones a client means something by (`check_field_names`)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _meant_fields(cls, body: Any) -> Any:
        check_field_names(body, cls.model_fields)
        return body


class GenerateRequest(ServiceRequest):
    """`POST /generate`: response_num completions of the raw text prompt.

    prefix_prompt: the text to continue, sent to the model as is (no chat template).
    max_tokens: most new tokens per completion (>= 1; the service caps it at the model's context
        minus the prompt, as the reference's vLLM does: its client always asks for 32768).
    response_num: completions to sample (>= 1; at most the server's --max-response-num).
    stop: stop string(s); a completion ends at the first one and keeps it (the reference sets
        include_stop_str_in_output=True). null or [] for none; at most MAX_STOP_STRINGS, each at
        most MAX_STOP_CHARS characters.
    temperature: 0 (greedy; the reference reads 0 as "unset" and samples at 0.8) or in [0.01, 2]
        (vLLM would sample a smaller one at 0.01, the transformers backend as given).
    seed: makes the completions reproducible (null: a fresh draw per request).
    """

    prefix_prompt: str = Field(min_length=1)
    max_tokens: int = Field(1024, ge=1)
    response_num: int = Field(8, ge=1)
    stop: list[str] | str | None = None
    temperature: float = Field(0.8, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)

    @field_validator("max_tokens", "response_num", "temperature", "seed", mode="before")
    @classmethod
    def _numbers_not_bools(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("prefix_prompt", "stop", mode="before")
    @classmethod
    def _texts_encode(cls, value: Any) -> Any:
        return _unicode_text(value)

    @field_validator("temperature")
    @classmethod
    def _temperature_both_backends_sample(cls, value: float) -> float:
        if 0 < value < VLLM_MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {VLLM_MIN_TEMPERATURE}: vLLM samples a smaller "
                             f"one at {VLLM_MIN_TEMPERATURE}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str] | str | None) -> list[str] | str | None:
        strings = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in strings):
            raise ValueError("stop strings must be non-empty")
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"a stop string may hold at most {MAX_STOP_CHARS} characters")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (a single string is one stop string)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateResponse(BaseModel):
    """results: the response_num completions (text after the prompt), in sample order."""

    results: list[str]


class ScoreRequest(ServiceRequest):
    """`POST /score`: the SPRM path score of a whole text (prompt + response, as the reference's
    client sends it). return_all_scores adds the per-position readings."""

    text: str
    return_all_scores: bool = False

    @field_validator("text", mode="before")
    @classmethod
    def _text_encodes(cls, value: Any) -> Any:
        return _unicode_text(value)


class ScoreResponse(BaseModel):
    """value: geometric mean of the step scores (clamped at 1e-10), 0.0 with no step.
    With return_all_scores: all_scores (sigmoid of the head at each position), token_ids (the
    forwarded sequence), score_positions (indices into token_ids the head read: the token just
    before each counted separator). Absent fields are left out of the JSON."""

    value: float
    all_scores: list[float] | None = None
    token_ids: list[int] | None = None
    score_positions: list[int] | None = None


class HealthResponse(BaseModel):
    """`GET /health`: status "ok" once the model is loaded, the model folder, the service kind,
    the backend and the limits a client may want to know."""

    model_config = ConfigDict(extra="allow")

    status: str
    model: str
    service: str
    backend: str


class FieldError(Exception):
    """A request field over a limit the schema cannot know (model context, server config).

    field: the body field's name; message: what is wrong; status_code: 422, or 413 for a text
    over the configured length.
    """

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status_code = field, message, status_code


def error_body(field: str, message: str, detail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON error body of every rejected request; a lone surrogate in the field's name (a key
    the client cut inside a character) is written as its escape, which JSON can encode (the body
    was a plain-text 500)."""
    field, message = _encodable(field), _encodable(message)
    return {"error": f"{field}: {message}", "field": field, "detail": detail or []}


def _encodable(text: str) -> str:
    """text with each character UTF-8 cannot encode (a lone surrogate) as its backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field_name(loc: tuple[Any, ...]) -> str:
    """("body", "stop", "list[str]", 0) -> "stop[0]" (a union's branch name dropped); ("body",)
    or ("body", 17) (a JSON decode position) -> "body"."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    if not parts or isinstance(parts[0], int):
        return "body"
    return str(parts[0]) + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _field_name(tuple(first.get("loc", ("body",))))
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        message = f"malformed JSON ({first.get('ctx', {}).get('error', message)})"
    elif field == "body" and first.get("type") == "model_attributes_type":
        message = "must be a JSON object (send it with Content-Type: application/json)"
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in errors]
    return JSONResponse(error_body(field, message, detail), status_code=422)


def body_limit(max_chars: int) -> int:
    """The most bytes of a body whose text field may hold max_chars characters: JSON writes a
    character in up to 6 bytes (\\uXXXX), two for one outside the BMP (12), plus 1 MiB for the
    other fields (32 stop strings of 512 such characters are 196 KB)."""
    return 12 * max_chars + 2**20


class _BodyTooLarge(Exception):
    """Raised from a counted `receive` once a streamed body passes the limit (its message: the 413's)."""


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before it is read whole (by its
    Content-Length, or counted as it streams in): a 200 MB body was read and parsed (+270 MiB of
    server memory) before the text's own limit refused it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit
        self.message = f"is over the limit of {limit} bytes"  # the 413's, however the body was stopped

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0
        started = False

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.message)
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        response = JSONResponse(error_body("body", self.message), status_code=413)
        await response(scope, receive, send)


def install_contract(app: FastAPI, api_key: str | None = None, max_body_bytes: int | None = None) -> None:
    """Add the JSON error handlers, a `BodyLimit` of max_body_bytes when given, and, when api_key
    is given, the bearer-key check (run before the body is read, so an unauthenticated request
    gets 401 whatever its body)."""
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _BodyTooLarge):  # FastAPI's body reading wraps BodyLimit's stop as a 400
            return JSONResponse(error_body("body", str(exc.__cause__)), status_code=413)
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            return JSONResponse(error_body("body", "could not be parsed as JSON (not UTF-8, nested too deeply, or an integer of over 4300 digits)"), 422)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(FieldError)
    async def _over_limit(_: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(error_body(exc.field, exc.message), status_code=exc.status_code)

    if api_key:
        expected = api_key.encode()

        @app.middleware("http")
        async def _check_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # the scheme name is case-insensitive (RFC 7235: "bearer KEY" is the same); the key is not
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), expected):
                return JSONResponse(
                    error_body("Authorization", "missing or wrong API key (send 'Authorization: Bearer KEY')"),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )
            return await call_next(request)
