"""Load test of a running policy or scorer service: many concurrent clients, every request
distinct, every answer checked against the answer to the same request sent alone.

Usage:
    python -m experiments.load_test --url http://127.0.0.1:8001 --service scorer --clients 32 --requests 20
    python -m experiments.load_test --url http://127.0.0.1:8000 --service policy --clients 32 --requests 20 \\
        [--api-key KEY (default: $TREESEARCH_API_KEY)] [--max-tokens 16] [--response-num 2]

How: first every request is sent alone, one at a time (the expected answers); then `clients`
coroutines each send their `requests` requests back to back over one shared connection pool
(httpx, async), and each answer is compared with the expected one of its own request:
  - scorer: a distinct text per request (its own steps); value within 1e-4 of the lone value,
    and, for the requests that ask return_all_scores, the same token_ids and positions;
  - policy: a distinct prompt and seed per request, half greedy (temperature 0) and half sampled
    with the seed; the completions must equal the lone ones exactly (seed determinism), so a
    response delivered to the wrong request, or mixed up, shows as a mismatch.
Counted: dropped (no HTTP answer: connection error or timeout), errored (status != 200 or an
"error" body), mismatched (200 with a different answer, or one that is not an answer: a value
that is no number, fewer all_scores). Printed: these counts, latency p50 / p99 / max and
throughput of the concurrent phase's answers (200 with a body that is not an error: a fast 503
or a refused connection is no answer and would make the service look faster), and (from the
services' /health counters) how many backend calls served it. Exit status 1 when any request
is dropped, errored or mismatched.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from experiments.broken_pipe import stdout_closed_quietly
from experiments.cli_args import positive_float, positive_int

API_KEY_ENV = "TREESEARCH_API_KEY"  # experiments.serve.API_KEY_ENV (not imported: it loads the services)

SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    """One request of the test: its path ("/score" or "/generate") and JSON body."""

    index: int
    path: str
    body: dict[str, Any]


class ServiceError(Exception):
    """The service failed a request sent alone: nothing to compare the concurrent answers with."""


@dataclass(frozen=True)
class Outcome:
    """What one request got: latency_s, HTTP status (None when dropped), the JSON body or None."""

    case: Case
    latency_s: float
    status: int | None
    body: Any


@dataclass(frozen=True)
class Summary:
    """Counts and latencies of the concurrent phase (latencies in seconds)."""

    requests: int
    dropped: int
    errored: int
    mismatched: int
    p50_s: float  # the latencies of the answers (status 200, no error body) alone
    p99_s: float
    max_s: float
    wall_s: float
    backend_calls: int | None = None  # batches the service ran for the concurrent phase (/health)

    @property
    def answered(self) -> int:
        """Requests that got an answer (status 200, no error body), matching or not."""
        return self.requests - self.dropped - self.errored

    @property
    def throughput(self) -> float:
        """Answers per second of the concurrent phase."""
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.dropped == self.errored == self.mismatched == 0


# -- the requests ---------------------------------------------------------------------------------

_WORDS = ("add", "the", "coins", "then", "take", "away", "so", "we", "have", "left", "each", "box")


def scorer_cases(count: int) -> list[Case]:
    """A distinct think trace per request (1-5 steps of seeded words and numbers)."""
    cases = []
    for i in range(count):
        rng = random.Random(i)
        steps = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6))) + f" {rng.randint(0, 999)}"
                 for _ in range(rng.randint(1, 5))]
        text = f"Question {i}: how many?\n<think>" + ".\n\n".join(steps) + f".\n\n</think>Answer: {i}"
        cases.append(Case(i, "/score", {"text": text, "return_all_scores": i % 2 == 0}))
    return cases


def policy_cases(count: int, max_tokens: int, response_num: int) -> list[Case]:
    """A distinct prompt and seed per request; even requests greedy, odd ones sampled at 0.8."""
    return [
        Case(i, "/generate", {
            "prefix_prompt": f"Question {i}: what is {i % 97} + {i // 97}?\n<think>",
            "max_tokens": max_tokens, "response_num": response_num, "stop": [".\n\n"],
            "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": 1000 + i,
        })
        for i in range(count)
    ]


def matches(service: str, got: Any, expected: Any) -> bool:
    """Whether an answer equals the lone answer of the same request."""
    if not isinstance(got, dict) or not isinstance(expected, dict):
        return False
    if service == "policy":
        return got.get("results") == expected.get("results")
    if set(got) != set(expected) or not _close(got["value"], expected["value"]):
        return False
    if "all_scores" in expected:
        scores, alone = got["all_scores"], expected["all_scores"]
        if not isinstance(scores, list) or not isinstance(alone, list) or len(scores) != len(alone):
            return False  # zip stopped at the shorter: an empty all_scores passed
        return (all(_close(a, b) for a, b in zip(scores, alone)) and got["token_ids"] == expected["token_ids"]
                and got["score_positions"] == expected["score_positions"])
    return True


def _close(got: Any, expected: Any) -> bool:
    """Two scores within SCORE_TOLERANCE; a score that is no number (null) is not close."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (got, expected))
    return numbers and abs(float(got) - float(expected)) <= SCORE_TOLERANCE


# -- sending --------------------------------------------------------------------------------------

async def send(client: httpx.AsyncClient, case: Case) -> Outcome:
    start = time.perf_counter()
    try:
        response = await client.post(case.path, json=case.body)
    except httpx.HTTPError as error:  # dropped: no status; the body says why (refused, timed out, no scheme, ...)
        return Outcome(case, time.perf_counter() - start, None, {"error": f"{type(error).__name__}: {error}"})
    latency = time.perf_counter() - start
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    return Outcome(case, latency, response.status_code, body)


async def alone(client: httpx.AsyncClient, cases: Sequence[Case]) -> list[Outcome]:
    """Every request on its own, one at a time, up to the first that fails (a service that never
    answers would hold each request for --timeout: 640 x 300 s by default)."""
    outcomes = []
    for case in cases:
        outcomes.append(await send(client, case))
        if failed(outcomes[-1]):
            break
    return outcomes


def failed(outcome: Outcome) -> bool:
    """Dropped, a status other than 200, or an error body."""
    return outcome.status != 200 or _is_error(outcome.body)


async def concurrently(client: httpx.AsyncClient, cases: Sequence[Case], clients: int) -> tuple[list[Outcome], float]:
    """`clients` workers, worker w sending cases w, w + clients, ... back to back; (outcomes, wall s)."""
    async def worker(w: int) -> list[Outcome]:
        return [await send(client, case) for case in cases[w::clients]]

    start = time.perf_counter()
    per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - start
    return sorted((o for outs in per_worker for o in outs), key=lambda o: o.case.index), wall


def summarize(service: str, outcomes: Sequence[Outcome], expected: Sequence[Outcome], wall_s: float) -> Summary:
    dropped = sum(o.status is None for o in outcomes)
    errored = sum(o.status is not None and (o.status != 200 or _is_error(o.body)) for o in outcomes)
    mismatched = sum(
        o.status == 200 and not _is_error(o.body) and not matches(service, o.body, e.body)
        for o, e in zip(outcomes, expected)
    )
    latencies = sorted(o.latency_s for o in outcomes if not failed(o))
    return Summary(len(outcomes), dropped, errored, mismatched, _quantile(latencies, 0.5),
                   _quantile(latencies, 0.99), latencies[-1] if latencies else 0.0, wall_s)


def _is_error(body: Any) -> bool:
    return not isinstance(body, dict) or "error" in body


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(len(sorted_values) * q))
    return sorted_values[rank - 1]


async def run(args: argparse.Namespace) -> Summary:
    total = args.clients * args.requests
    cases = scorer_cases(total) if args.service == "scorer" else policy_cases(total, args.max_tokens, args.response_num)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        expected = await alone(client, cases)
        if failed(expected[-1]):
            bad = expected[-1]
            raise ServiceError(f"request {bad.case.index} of {total} failed when sent alone "
                               f"(status {bad.status}): {bad.body}")
        before = await batches_run(client)
        outcomes, wall = await concurrently(client, cases, args.clients)
        after = await batches_run(client)
    calls = after - before if before is not None and after is not None else None
    return dataclasses.replace(summarize(args.service, outcomes, expected, wall), backend_calls=calls)


async def batches_run(client: httpx.AsyncClient) -> int | None:
    """The service's batch counter from /health (None when it has none)."""
    try:
        value = (await client.get("/health")).json().get("batches_run")
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def report(args: argparse.Namespace, summary: Summary) -> str:
    return "\n".join([
        f"load test: {args.service} at {args.url}, {args.clients} concurrent clients x {args.requests} requests",
        f"  requests {summary.requests}  dropped {summary.dropped}  errored {summary.errored}  "
        f"mismatched {summary.mismatched}",
        f"  latency of the {summary.answered} answers: p50 {summary.p50_s * 1000:.1f} ms  "
        f"p99 {summary.p99_s * 1000:.1f} ms  max {summary.max_s * 1000:.1f} ms",
        f"  wall {summary.wall_s:.2f} s  throughput {summary.throughput:.1f} answers/s",
        *([f"  batching: {summary.requests} requests in {summary.backend_calls} backend calls "
           f"({summary.requests / max(summary.backend_calls, 1):.1f} per call)"] if summary.backend_calls else []),
        "  OK: every answer matched the answer to the same request sent alone" if summary.ok else
        f"  FAILED: {_failures(summary)} of {summary.requests} requests",
    ])


def _failures(summary: Summary) -> str:
    """What went wrong, by cause: "3 dropped, 1 mismatched"."""
    counts = (("dropped", summary.dropped), ("errored", summary.errored),
              ("did not match the answer to the same request sent alone", summary.mismatched))
    return ", ".join(f"{n} {what}" for what, n in counts if n)


def service_url(text: str) -> str:
    """An argparse type: an http(s) address httpx can send to ("http://[::1" was an InvalidURL
    traceback, port 99999 an OverflowError one, no scheme an error only after the first request)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {err}") from err
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} must be an http:// or https:// address, e.g. http://127.0.0.1:8001")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be in 1-65535")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", type=service_url, required=True, help="service base address, e.g. http://127.0.0.1:8001")
    parser.add_argument("--service", choices=("policy", "scorer"), required=True)
    parser.add_argument("--clients", type=positive_int, default=32)
    parser.add_argument("--requests", type=positive_int, default=20, help="requests per client")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"the service's key (default: ${API_KEY_ENV}, as `experiments.serve` reads it)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per request before it counts as dropped")
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="policy: max_tokens per request")
    parser.add_argument("--response-num", type=positive_int, default=2, help="policy: response_num per request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(args, summary))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        sys.exit(main())
