"""The external PRM served by vLLM's OpenAI-compatible server (`scorers/served_prm_scorer.py`):
against real servers (a tiny folder shaped as Qwen2.5-Math-PRM's, its tokenizer with the tag
"<extra_0>" as one token, run by vLLM's `Qwen2ForProcessRewardModel` with pooling type ALL, one row
a token, and STEP at the tag's id, one row a tag, as vLLM serves the real PRM by default; started
and stopped by PID), its scores equal the transformers scorer's within 1e-5 on the same tokens and
positions, from a client folder without weights, in concurrent requests; the server's window (not
the folder's) bounds the paths; `scorer=served_prm` runs a search. Without a server: wrong shapes,
a STEP server at another tag, a causal-LM format and an absent server are named.

    .venv/bin/python -m pytest tests/test_served_prm_scorer.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from transformers import AutoTokenizer

from policies.openai_policy import OpenAIServerConfig
from scorers.lm_prm_scorer import LMPRMScorer
from scorers.served_prm_scorer import ServedPRMScorer, step_scores
from test_lm_prm_scorer import CHILDREN, PATHS
from test_openai_policy import free_port, stop, wait_ready
from test_search_resume import run_in_process
from tiny_checkpoint import save_tiny_checkpoint, save_tiny_qwen_prm
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem
from vllm_fixtures import require_vllm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]
STEP_TAG = "<extra_0>"  # qwen_prm's tag


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen_prm(tmp_path_factory.mktemp("served") / "qwen", seed=1, step_tag=STEP_TAG)  # scores 0.87-0.97


@pytest.fixture(scope="module")
def client_dir(prm_dir, tmp_path_factory) -> Path:
    """The served PRM's config and tokenizer only: what the client needs."""
    out = tmp_path_factory.mktemp("served") / "client"
    out.mkdir()
    for file in prm_dir.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, out / file.name)
    return out


def pooler_config(pooling: str, prm_dir: Path) -> str:
    """ALL: the head's logits at every token; STEP: at each token of the tag's id only."""
    if pooling == "ALL":
        return json.dumps({"pooling_type": "ALL"})
    tag_id = AutoTokenizer.from_pretrained(str(prm_dir)).convert_tokens_to_ids(STEP_TAG)
    return json.dumps({"pooling_type": "STEP", "step_tag_id": tag_id})


@pytest.fixture(scope="module", params=["ALL", "STEP"])
def server(request, prm_dir, tmp_path_factory) -> Iterator[str]:
    """vLLM's server on the PRM, pooling type ALL or STEP at the tag (`pooler_config`); stopped by PID."""
    require_vllm()
    folder = tmp_path_factory.mktemp("served_server")
    port, log = free_port(), folder / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(prm_dir), "--max-model-len", "384", "--runner", "pooling",
        "--pooler-config", pooler_config(request.param, prm_dir),
        "--dtype", "float32", "--enforce-eager", "--block-size", "32", "--no-enable-prefix-caching",
        "--kv-cache-memory-bytes", str(2**28), "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CACHE_ROOT": str(folder / "cache")}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log)
        yield url
    finally:
        stop(process)


@pytest.mark.vllm
def test_served_scores_equal_the_transformers_scorer(server, prm_dir, client_dir, request):
    scorer = ServedPRMScorer(client_dir, OpenAIServerConfig(server), batch_size=3)  # several requests at once
    reference = LMPRMScorer.from_pretrained(prm_dir, "qwen_prm", dtype="float32", cache_bytes=0)
    try:
        assert isinstance(scorer, Scorer) and scorer.num_parameters == reference.num_parameters > 0
        assert scorer.tag_id == AutoTokenizer.from_pretrained(str(client_dir)).convert_tokens_to_ids(STEP_TAG)
        paths = PATHS + CHILDREN + [CHILDREN[0]]  # a repeat is sent once
        got, want = scorer.read(paths), reference.read(paths)
        # the server answers in its own form: a row a token (ALL) or a row a tag (STEP)
        body = {"model": scorer.client.served_model().name, "input": [list(got[0].token_ids)],
                "task": "token_classify", "use_activation": False, "add_special_tokens": False}
        rows = scorer.client.request("POST", "/pooling", body)["data"][0]["data"]
        per_tag = request.node.callspec.params["server"] == "STEP"
        assert len(rows) == len(got[0].positions if per_tag else got[0].token_ids) and len(got[0].positions) > 1
        assert [(r.token_ids, r.positions) for r in got] == [(r.token_ids, r.positions) for r in want]
        for mine, theirs in zip(got, want):
            assert mine.step_scores == pytest.approx(theirs.step_scores, abs=1e-5)
        spread = [s for r in got for s in r.step_scores]
        assert max(spread) - min(spread) > 0.01
        assert scorer.cost(paths) == sum(len(ids) for ids in {r.token_ids for r in got}) and scorer.cost([PATHS[1]]) == 0
        # the server's window (its max_model_len 384, not the folder's 512) bounds a path
        assert scorer.layout.context_window == 384
        long = Prefix(Problem("long", "What is 1 + 1?", "2"), tuple(PATHS[0].steps) * 40)
        with pytest.raises(ValueError, match=r"problem 'long': the PRM reads \d+ tokens, more than its context window of 384 \(the server's max_model_len\)"):
            scorer.score([long])
    finally:
        scorer.close()


@pytest.mark.vllm
def test_a_search_ranks_steps_with_the_served_prm_preset(server, client_dir, tmp_path):
    policy = save_tiny_checkpoint(tmp_path / "policy")
    out = tmp_path / "run"
    run_in_process([
        f"policy.path={policy}", "search=beam", "scorer=served_prm", f"scorer.path={client_dir}",
        f"scorer.base_url={server}", "task.count=2", "chunk=2", "budget=4", "policy.sampling.max_total_tokens=12",
        "policy.sampling.max_step_tokens=4", "progress=false", "num_threads=1", f"out_dir={out}",
    ])
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["compute"]["scorer_tokens"] > 0 for row in rows)


# -- without a server ------------------------------------------------------------------------------


def test_per_tag_answers_are_read_in_order_and_other_shapes_are_named():
    per_token = [[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]  # (class 0, class 1) at 4 tokens
    ids, positions = [7, 8, 9, 10], [1, 3]
    expected = step_scores(per_token, ids, positions)
    assert expected == pytest.approx([0.1192, 0.9526], abs=1e-4)  # softmax's class 1
    assert step_scores([per_token[1], per_token[3]], ids, positions) == expected  # STEP pooling: one row a tag
    with pytest.raises(ValueError, match=r"returned 3 rows for a path of 4 tokens and 2 steps: serve it with"):
        step_scores(per_token[:3], ids, positions)
    # a step whose text holds the tag token (id 9 at index 2): STEP pooling answers at every tag
    assert step_scores(per_token[1:], [7, 9, 9, 9], positions, tag_id=9) == expected
    with pytest.raises(ValueError, match=r"rows of shape \(4, 3\)"):
        step_scores([[0.0, 0.0, 0.0]] * 4, ids, positions)
    with pytest.raises(ValueError, match=r"no rows for a path of 4 tokens \(a STEP pooling server whose step_tag_id "
                       r"is not this tokenizer's step tag.*'\{\"pooling_type\": \"ALL\"\}' or "
                       r"'\{\"pooling_type\": \"STEP\", \"step_tag_id\": 9\}'"):
        step_scores([], ids, positions, tag_id=9)  # a STEP server at another tag (vLLM's default, 151651, here)
    with pytest.raises(ValueError, match=r"\"ALL\"\}'$"):
        step_scores([], ids, positions)  # a tag of several tokens: ALL only


def test_a_chat_layout_served_with_its_head_lays_out_every_path(client_dir, prm_dir):
    # the layout got answer token -1: every path failed "does not render the answer '+' as its own token -1"
    from scorers.prm_format import PRMFormat

    chat = PRMFormat(layout="chat", reader="head")
    served = ServedPRMScorer(client_dir, OpenAIServerConfig("http://127.0.0.1:9"), chat)
    try:
        local = LMPRMScorer.from_pretrained(prm_dir, chat)
        assert served.layout.sequences(PATHS) == local.layout.sequences(PATHS)
        assert [len(positions) for _, positions in served.layout.sequences(PATHS)] == [len(p.steps) for p in PATHS]
    finally:
        served.close()


def test_a_causal_lm_format_and_an_absent_server_are_named(client_dir):
    with pytest.raises(ValueError, match=r"reader='lm': a served PRM must carry its head"):
        ServedPRMScorer(client_dir, OpenAIServerConfig("http://127.0.0.1:9"), "math_shepherd")
    scorer = ServedPRMScorer.from_pretrained(client_dir, base_url=f"http://127.0.0.1:{free_port()}", max_retries=0)
    try:
        with pytest.raises(ConnectionError, match=r"no OpenAI-compatible server answers .*--runner pooling"):
            scorer.score(PATHS)
    finally:
        scorer.close()
