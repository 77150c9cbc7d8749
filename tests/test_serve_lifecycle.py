"""The HTTP services' start and stop (`python -m experiments.serve`), and the character bound that
refuses a text too long for the context before it is tokenised (experiments/services/token_chars.py).

Pinned: SIGTERM or Ctrl-C stops a server whose client stalled mid-body within --shutdown-timeout
(uvicorn waited for every connection: the process stayed up until SIGKILL), while a request that
completes inside the grace period is still answered; Ctrl-C while it imports or loads the model is
one line and exit 130 (was a KeyboardInterrupt traceback), Ctrl-C while serving still stops it;
a prompt (`/generate`) or text (`/score`) of more characters than the context's tokens can cover
is a 413 without being tokenised (8 clients sending 960k characters held a small request 9 s),
and no text that fits is refused by it (the longest token repeated exactly max_model_len times).

Servers run as subprocesses on free ports of 127.0.0.1 (tests/test_serve.py's helpers) and are
stopped by PID. Run: `.venv/bin/python -m pytest tests/test_serve_lifecycle.py`
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from test_serve import REPO, start_service, stop_service, wait_ready
from tiny_checkpoint import save_tiny_checkpoint

from experiments import serve
from experiments.services.api_schemas import FieldError, GenerateRequest
from experiments.services.token_chars import COMPOSED_CHARS, check_fits, max_token_chars
from experiments.startup_interrupt import STARTING_LINE

pytestmark = pytest.mark.usefixtures("one_thread")

GRACE_S = 2.0  # --shutdown-timeout of the stop tests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny random Llama + tokenizer (context 512), with a seeded SPRM head beside it."""
    from scorers.sprm_head import build_sprm_head, save_score_module

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("lifecycle") / "tiny")
    save_score_module(build_sprm_head(32, seed=0), path)
    return path


# -- stopping: --shutdown-timeout ----------------------------------------------------------------


def test_shutdown_timeout_is_a_positive_number_of_seconds_default_25(capsys):
    parse = serve.build_parser().parse_args
    assert parse(["policy", "--model", "m"]).shutdown_timeout == 25.0
    assert parse(["scorer", "--model", "m", "--shutdown-timeout", "2.5"]).shutdown_timeout == 2.5
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(SystemExit) as exit_info:
            parse(["policy", "--model", "m", "--shutdown-timeout", bad])
        assert exit_info.value.code == 2
        assert "argument --shutdown-timeout:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["policy", "--help"])
    assert "in flight" in " ".join(capsys.readouterr().out.split())


def _half_body(port: int, path: str, body: bytes) -> socket.socket:
    """A client that sent the headers and the first half of body, then stalls."""
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                   % (path.encode(), len(body)) + body[: len(body) // 2])
    return client


@pytest.mark.parametrize("service, signum", [("policy", signal.SIGTERM), ("scorer", signal.SIGINT)])
def test_a_stopped_server_exits_within_the_shutdown_timeout_despite_a_stalled_client(checkpoint, tmp_path, service,
                                                                                     signum):
    path, body = ("/generate", {"prefix_prompt": "Q: 1+1?\n<think>", "max_tokens": 2, "temperature": 0}) \
        if service == "policy" else ("/score", {"text": "Q: 1+1?\n<think>1+1=2.\n\n"})
    payload = json.dumps(body).encode()
    running = start_service([service, "--model", str(checkpoint), "--shutdown-timeout", str(GRACE_S)],
                            tmp_path / "server.log")
    try:
        wait_ready(running)
        port = urlsplit(running.url).port
        stalled, finishing = _half_body(port, path, payload), _half_body(port, path, payload)
        time.sleep(0.5)  # both requests reached the app
        signalled = time.monotonic()
        running.process.send_signal(signum)
        time.sleep(0.3)
        finishing.sendall(payload[len(payload) // 2 :])  # in flight when stopped: answered within the grace
        answer = finishing.recv(65536).decode()
        try:
            running.process.wait(timeout=GRACE_S + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_S + 20} s after the signal, with a client stalled mid-body")
        took = time.monotonic() - signalled
        stalled.close()
        finishing.close()
    finally:
        stop_service(running)
    log = running.log.read_text()
    assert answer.startswith("HTTP/1.1 200"), answer
    assert GRACE_S - 0.5 < took < GRACE_S + 10, took  # the stalled one had its grace, then was cut
    # one line for the cut request, not the CancelledError's traceback through the app
    assert "timeout graceful shutdown exceeded" in log and "was cut" in log and "Traceback" not in log, log
    # Ctrl-C while serving is uvicorn's graceful stop (exit 0), not the start-up's line; SIGTERM ends as SIGTERM
    assert running.process.returncode == (0 if signum == signal.SIGINT else -signal.SIGTERM)
    assert STARTING_LINE not in log


# -- Ctrl-C while starting ------------------------------------------------------------------------

# the child sends itself SIGINT at a chosen point of the start-up, then runs the command as
# `python -m experiments.serve` would (runpy, "__main__"): deterministic, no race with the load
INTERRUPT_AT = """
import importlib, importlib.abc, runpy, signal, sys

point = {point!r}
if point == "import torch":
    class InterruptAtTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                signal.raise_signal(signal.SIGINT)  # as a Ctrl-C during the import
            return None
    sys.meta_path.insert(0, InterruptAtTorch())
else:  # "module:Class": Ctrl-C as the model starts loading
    module, name = point.split(":")
    owner = getattr(importlib.import_module(module), name)
    load = owner.from_pretrained
    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return load(*args, **kwargs)
    owner.from_pretrained = staticmethod(interrupted)
sys.argv = ["experiments.serve", *{args!r}]
runpy.run_module("experiments.serve", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("service, point", [
    ("policy", "import torch"), ("scorer", "policies.reflective_model:ReflectiveModel"),
])
def test_ctrl_c_while_the_service_starts_is_one_line_and_exit_130(checkpoint, service, point):
    args = [service, "--model", str(checkpoint), "--port", str(_free_port()), "--threads", "1"]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT.format(point=point, args=args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.strip() == STARTING_LINE, done.stderr[-3000:]  # no traceback, no "model loaded"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/PID/maps")
def test_ctrl_c_from_outside_while_the_command_loads_torch_is_one_line_and_exit_130(checkpoint, tmp_path):
    """The real command, signalled from outside once torch's library is mapped (after the handler is
    taken, seconds before the model is loaded): the Ctrl-C of a user watching it start."""
    log = tmp_path / "start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.serve", "policy", "--model", str(checkpoint), "--port",
             str(_free_port()), "--threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    text = log.read_text()
    assert returncode == 130, text[-3000:]
    assert text.strip() == STARTING_LINE, text[-3000:]


def test_the_service_command_takes_ctrl_c_before_any_heavy_import():
    lines = (REPO / "experiments" / "serve.py").read_text().splitlines()
    taken = next(i for i, line in enumerate(lines) if line.startswith("quiet_start(__name__)"))
    later = [i for i, line in enumerate(lines) if line.startswith(("from experiments.cli", "from experiments.services",
                                                                   "from policies", "from treesearch", "import torch"))]
    assert later and taken < min(later)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a text too long for the context: refused by its characters, before tokenising ----------------


@pytest.fixture(scope="module")
def completer(checkpoint):
    from experiments.services.text_completer import TransformersCompleter

    return TransformersCompleter.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def text_sprm(checkpoint):
    from experiments.services.scorer_service import TextSPRM
    from policies.reflective_model import ReflectiveModel

    model, tokenizer = ReflectiveModel.from_pretrained(str(checkpoint), "float32", None, "cpu")
    return TextSPRM(model, tokenizer)


def _longest_token(tokenizer) -> str:
    backend = tokenizer.backend_tokenizer
    return max((backend.decode([i], skip_special_tokens=False) for i in backend.get_vocab(True).values()), key=len)


def test_the_span_is_the_longest_token_and_bounds_the_characters_of_any_text(completer):
    span = completer.max_token_chars
    assert span == len(_longest_token(completer.tokenizer)) > 1
    texts = ["Q: 12+34?\n<think>12+34=46.\n\n</think>Answer: 46", _longest_token(completer.tokenizer) * 50,
             "é😀 中文\t\n" * 40, "<bos><eos>.\n\n" * 20, "".join(chr(c) for c in range(32, 2000))]
    for text in texts:  # each token covers at most span characters
        assert len(text) <= span * len(completer.tokenizer(text, add_special_tokens=False).input_ids), text[:40]


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenised(completer, monkeypatch):
    from experiments.services.policy_service import PolicyConfig, completion_request

    context, span = completer.max_model_len, completer.max_token_chars
    counted: list[int] = []
    real_count = completer.count_tokens
    monkeypatch.setattr(completer, "count_tokens", lambda text: counted.append(len(text)) or real_count(text))

    def request(prompt: str):
        return completion_request(GenerateRequest.model_validate({"prefix_prompt": prompt}), completer, PolicyConfig())

    with pytest.raises(FieldError) as refused:
        request("1" * (context * span + 1))
    assert refused.value.status_code == 413 and counted == []
    assert str(refused.value) == (f"prefix_prompt: has {context * span + 1} characters, so more than {context} tokens "
                                  f"(a token covers at most {span} characters), the model's context is {context}")
    # exactly the bound: not refused by its characters (it is by its tokens: 512 + the BOS)
    with pytest.raises(FieldError, match=r"prefix_prompt: has \d+ tokens, the model's context is"):
        request(_longest_token(completer.tokenizer) * context)
    assert counted == [context * span]
    assert request("Q: 1+1?\n<think>").max_tokens >= 1


def test_a_text_too_long_for_the_scorer_is_a_413_before_it_is_tokenised(text_sprm, monkeypatch):
    from experiments.services.scorer_service import ScorerConfig, build_scorer_app

    limit, span = 100, text_sprm.max_token_chars
    assert span == len(_longest_token(text_sprm.tokenizer))
    encoded: list[int] = []
    real_encode = text_sprm.encode
    monkeypatch.setattr(text_sprm, "encode", lambda text: encoded.append(len(text)) or real_encode(text))
    with TestClient(build_scorer_app(text_sprm, ScorerConfig(max_text_tokens=limit), "m")) as client:
        over = client.post("/score", json={"text": "a" * (limit * span + 1)})
        assert over.status_code == 413 and encoded == []
        assert over.json()["error"] == (f"text: has {limit * span + 1} characters, so more than {limit} tokens "
                                        f"(a token covers at most {span} characters), over the limit {limit}")
        at_bound = client.post("/score", json={"text": _longest_token(text_sprm.tokenizer) * limit})
        assert at_bound.status_code == 413 and "tokens, over the limit" in at_bound.json()["error"]  # its token count
        assert encoded == [limit * span]
        assert client.post("/score", json={"text": "Q?\n<think>a.\n\n"}).status_code == 200


def test_no_span_where_the_tokenizer_may_drop_or_merge_characters(checkpoint):
    """The bound holds only where every character lands in a token: a pipeline that strips,
    splits blanks away or swallows them gets no character check (None); a composing normaliser
    (NFC: Qwen's) widens it by COMPOSED_CHARS; a slow tokenizer is not read."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(str(checkpoint))
    span = max_token_chars(base)

    def changed(edit) -> int | None:
        raw = Tokenizer.from_str(base.backend_tokenizer.to_str())
        edit(raw)
        return max_token_chars(PreTrainedTokenizerFast(tokenizer_object=raw))

    assert changed(lambda raw: None) == span
    assert changed(lambda raw: setattr(raw, "normalizer", normalizers.NFC())) == COMPOSED_CHARS * span
    keeping = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
    assert changed(lambda raw: setattr(raw, "normalizer", keeping)) == span
    assert changed(lambda raw: setattr(raw, "normalizer", normalizers.Strip())) is None
    assert changed(lambda raw: setattr(raw, "normalizer", normalizers.Replace("  ", " "))) is None
    assert changed(lambda raw: setattr(raw, "pre_tokenizer", pre_tokenizers.Whitespace())) is None
    assert changed(lambda raw: raw.add_tokens([AddedToken("<x>", rstrip=True)])) is None
    assert changed(lambda raw: raw.add_tokens([AddedToken("<a-long-added-token>")])) == len("<a-long-added-token>")
    assert max_token_chars(object()) is None
    check_fits("text", "x" * 10**6, 4, None, "over the limit 4")  # no span: left to the token count
