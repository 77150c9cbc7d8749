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
    in_flight = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            crowded = cls.in_flight > 1
        time.sleep(0.01)
        answer = scores_of(body["text"] + ("!" if cls.mixed_up and crowded else ""))
        if body.get("return_all_scores"):
            answer.update(all_scores=[answer["value"]], token_ids=[1], score_positions=[0])
        with cls.lock:
            cls.in_flight -= 1
        data = json.dumps(answer).encode()
        self.send_response(200)
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
    FakeScorer.mixed_up = False
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


@pytest.mark.parametrize("url, reason", [
    (f"http://127.0.0.1:{free_port()}", "ConnectError"), ("127.0.0.1:8001", "UnsupportedProtocol"),
])
def test_a_refused_connection_or_a_url_without_scheme_says_why(capsys, url, reason):
    assert main(["--url", url, "--service", "policy", "--clients", "2", "--requests", "2"]) == 2
    assert reason in capsys.readouterr().err


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
