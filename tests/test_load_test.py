"""The load-test client (`python -m experiments.load_test`) against small fake services on
127.0.0.1 (each stopped when its test ends): a consistent scorer passes, one that mixes answers up
under load fails, and a dead or silent service is one error line after its first request.

    .venv/bin/pytest tests/test_load_test.py
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from experiments.load_test import main


def scores_of(text: str) -> dict:
    """A scorer's answer that depends on the request's text only."""
    value = (sum(text.encode()) % 1000) / 1000
    return {"value": value}


class FakeScorer(BaseHTTPRequestHandler):
    mixed_up = False  # True: answers a request with another request's score once two are in flight
    # once two are in flight: "short" answers all_scores [], "null" a null value, "fast_503" a 503 at once
    crowded_answer: str | None = None
    in_flight = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            crowded = cls.in_flight > 1
        odd = cls.crowded_answer if crowded else None
        if odd != "fast_503":
            time.sleep(0.05)
        answer = scores_of(body["text"] + ("!" if cls.mixed_up and crowded else ""))
        if body.get("return_all_scores"):
            answer.update(all_scores=[] if odd == "short" else [answer["value"]], token_ids=[1], score_positions=[0])
        if odd == "null":
            answer["value"] = None
        with cls.lock:
            cls.in_flight -= 1
        data = json.dumps({"error": "busy"} if odd == "fast_503" else answer).encode()
        self.send_response(503 if odd == "fast_503" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def serve(handler: type) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def scorer_url() -> Iterator[str]:
    FakeScorer.mixed_up, FakeScorer.crowded_answer = False, None
    yield from serve(FakeScorer)


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_consistent_scorer_passes_and_one_that_mixes_answers_fails(scorer_url, capsys):
    args = ["--url", scorer_url, "--service", "scorer", "--clients", "4", "--requests", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "requests 12  dropped 0  errored 0  mismatched 0" in out and "OK:" in out
    FakeScorer.mixed_up = True
    assert main(args) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_silent_service_is_one_error_line_after_its_first_request(silent_url, capsys):
    # every request waited its full --timeout alone (640 x 300 s by default), then "status None, None"
    started = time.perf_counter()
    assert main(["--url", silent_url, "--service", "scorer", "--clients", "4", "--requests", "5",
                 "--timeout", "0.5"]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("error: request 0 of 20 failed when sent alone (status None): ") and "Timeout" in err
    assert err.count("\n") == 1


def test_a_refused_connection_says_why(capsys):
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--service", "policy", "--clients", "2", "--requests", "2"]) == 2
    assert "ConnectError" in capsys.readouterr().err


@pytest.mark.parametrize("url, message", [
    ("127.0.0.1:8001", "must be an http:// or https:// address"),  # an error only after the first request
    ("http://[::1", "is not a URL: Invalid port"),  # an InvalidURL traceback
    ("http://127.0.0.1:99999", "the port must be in 1-65535"),  # an OverflowError traceback
])
def test_a_url_httpx_cannot_send_to_is_a_usage_error(capsys, url, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--url", url, "--service", "policy"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_latencies_and_throughput_are_of_answers_and_a_failure_says_its_cause(scorer_url, capsys):
    # a 503 answered at once counted in p50 and throughput: 44 ms and 41 req/s where every answer took 200 ms
    FakeScorer.crowded_answer = "fast_503"
    assert main(["--url", scorer_url, "--service", "scorer", "--clients", "4", "--requests", "5"]) == 1
    out = capsys.readouterr().out
    errored = int(out.split("errored ")[1].split()[0])
    assert errored > 0 and f"FAILED: {errored} errored of 20 requests" in out and "did not match" not in out
    assert f"latency of the {20 - errored} answers: p50 " in out
    assert float(out.split("p50 ")[1].split(" ms")[0]) >= 50  # every answer slept 50 ms; the 503s none


@pytest.mark.parametrize("crowded_answer", ["short", "null"])
def test_a_truncated_or_null_answer_is_a_mismatch(scorer_url, capsys, crowded_answer):
    # all_scores [] against [0.5] passed (zip stopped at the shorter); a null value was a TypeError traceback
    FakeScorer.crowded_answer = crowded_answer
    assert main(["--url", scorer_url, "--service", "scorer", "--clients", "4", "--requests", "5"]) == 1
    out = capsys.readouterr().out
    assert "did not match the answer to the same request sent alone of 20 requests" in out and "mismatched 0" not in out


@pytest.mark.parametrize("flag", ["--clients", "--requests", "--max-tokens", "--response-num", "--timeout"])
def test_counts_below_one_are_usage_errors(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["--url", "http://127.0.0.1:1", "--service", "scorer", flag, "0"])
    assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_the_api_key_defaults_to_the_one_serve_reads(monkeypatch):
    # a service started with TREESEARCH_API_KEY answered the load test's requests with 401
    from experiments import load_test, serve

    assert load_test.API_KEY_ENV == serve.API_KEY_ENV
    monkeypatch.setenv(serve.API_KEY_ENV, "sekret")
    assert load_test.build_parser().parse_args(["--url", "http://x", "--service", "scorer"]).api_key == "sekret"
    monkeypatch.delenv(serve.API_KEY_ENV)
    assert load_test.build_parser().parse_args(["--url", "http://x", "--service", "scorer"]).api_key is None
