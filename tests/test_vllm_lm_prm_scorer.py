"""The external PRM on vLLM (`scorers/vllm_lm_prm_scorer.py`): its scores equal the transformers
scorer's (`scorers/lm_prm_scorer.py`) within 1e-5 (float32) for the three layouts, on the same tokens and
positions (reader "lm": a tiny random Llama in safetensors shards, hidden states from vLLM and the
good / bad rows read from its weight files; reader "head": a tiny folder shaped as Qwen2.5-Math-PRM's, run by vLLM's own
`Qwen2ForProcessRewardModel`); a repeated path is forwarded once; cost and FLOPs count what it
forwards; bad settings are named before the engine starts; `scorer=vllm_prm` runs a search.

    .venv/bin/python -m pytest tests/test_vllm_lm_prm_scorer.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from policies.tiny_model import TinyModelConfig
from policies.vllm_engine import VLLMEngineConfig
from scorers.lm_prm_scorer import LMPRMScorer
from test_lm_prm_scorer import CHILDREN, PATHS
from test_search_resume import run_in_process
from tiny_checkpoint import resaved, save_tiny_checkpoint, save_tiny_qwen_prm, with_chat_template
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem
from vllm_fixtures import require_vllm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# heads of 32: the smallest vLLM's CPU attention takes; grouped-query attention
LLAMA_SHAPE = TinyModelConfig(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=64)
ENGINE = VLLMEngineConfig("replaced-by-the-folder", kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A random causal LM with a chat template (the tag and chat layouts' PRM), laid out as a hub
    model: safetensors shards with an index, no generation_config.json."""
    base = save_tiny_checkpoint(tmp_path_factory.mktemp("vprm") / "base", LLAMA_SHAPE)
    chat = with_chat_template(base, tmp_path_factory.mktemp("vprm") / "chat")
    sharded = resaved(chat, tmp_path_factory.mktemp("vprm") / "sharded")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return sharded


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen_prm(tmp_path_factory.mktemp("vprm") / "qwen")


@pytest.fixture(scope="module")
def engines(llama_dir, qwen_dir):
    """One vLLM scorer per layout, closed at the end."""
    require_vllm()
    from scorers.vllm_lm_prm_scorer import VLLMLMPRMScorer

    folders = {"math_shepherd": llama_dir, "rlhflow": llama_dir, "qwen_prm": qwen_dir}
    scorers = {name: VLLMLMPRMScorer.from_pretrained(folder, name, engine=ENGINE) for name, folder in folders.items()}
    yield {name: (scorers[name], folders[name]) for name in folders}
    for scorer in scorers.values():
        scorer.close()


@pytest.mark.parametrize("layout", ["math_shepherd", "rlhflow", "qwen_prm"])
def test_scores_equal_the_transformers_scorer_on_the_same_tokens(engines, layout):
    scorer, folder = engines[layout]
    reference = LMPRMScorer.from_pretrained(folder, layout, dtype="float32", cache_bytes=0)
    assert isinstance(scorer, Scorer) and scorer.num_parameters == reference.num_parameters > 0
    paths = PATHS + CHILDREN
    got, want = scorer.read(paths), reference.read(paths)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.positions for r in got] == [r.positions for r in want]
    for mine, theirs in zip(got, want):
        assert len(mine.step_scores) == len(theirs.step_scores)
        assert mine.step_scores == pytest.approx(theirs.step_scores, abs=1e-5)
    spread = [s for r in got for s in r.step_scores]
    assert max(spread) - min(spread) > 0.01  # the random PRM's scores differ across steps: a real check
    assert scorer.score(paths) == [list(r.step_scores) for r in got]


def test_each_distinct_path_is_forwarded_once_whole(engines):
    scorer, _ = engines["math_shepherd"]
    twice = [CHILDREN[0], CHILDREN[1], CHILDREN[0], PATHS[1]]  # a repeat, and a path without steps
    readings = scorer.read(twice)
    assert readings[2] == readings[0] and readings[3].token_ids == () and readings[3].step_scores == ()
    assert scorer.cost(twice) == len(readings[0].token_ids) + len(readings[1].token_ids)
    assert scorer.cost([PATHS[1]]) == 0 and scorer.read([]) == []


def test_a_path_longer_than_the_engine_window_is_named(engines):
    scorer, _ = engines["rlhflow"]
    window = scorer.layout.context_window
    assert window == 512  # the engine's max_model_len (the folder's max_position_embeddings)
    long = Prefix(Problem("long", "What is 1 + 1?", "2"), tuple(PATHS[0].steps) * 40)
    # named the folder's max_position_embeddings, which an engine's max_model_len may undercut
    with pytest.raises(ValueError, match=r"problem 'long': the PRM reads \d+ tokens, more than its context window of 512 "
                                         r"\(scorer.engine.max_model_len\)"):
        scorer.score([PATHS[0], long])
    assert scorer.score([PATHS[2]])[0]  # the engine still serves


def test_bad_settings_are_named_before_the_engine_starts(llama_dir, qwen_dir, tmp_path, monkeypatch):
    require_vllm()
    from scorers import vllm_lm_prm_scorer
    from scorers.vllm_lm_prm_scorer import VLLMLMPRMScorer

    monkeypatch.setattr(vllm_lm_prm_scorer, "build_llm", lambda *a, **k: pytest.fail("the engine started"))
    with pytest.raises(ValueError, match=r"reader 'head' on vLLM needs a reward model class vLLM runs \(Qwen2ForProcessRewardModel\); its config.json names \['LlamaForCausalLM'\]"):
        VLLMLMPRMScorer.from_pretrained(llama_dir, "qwen_prm")
    with pytest.raises(FileNotFoundError, match="has no output layer"):
        VLLMLMPRMScorer.from_pretrained(qwen_dir, "math_shepherd")
    with pytest.raises(FileNotFoundError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        VLLMLMPRMScorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="good and bad are the same token id"):
        VLLMLMPRMScorer.from_pretrained(llama_dir, good_id=5, bad_id=5)


def test_a_closed_scorer_says_so(llama_dir):
    require_vllm()
    from scorers.vllm_lm_prm_scorer import VLLMLMPRMScorer

    scorer = VLLMLMPRMScorer.from_pretrained(llama_dir, engine=ENGINE)
    scorer.close()
    scorer.close()  # twice is fine
    with pytest.raises(RuntimeError, match="was closed"):
        scorer.score(PATHS)


def test_a_search_ranks_steps_with_the_vllm_prm_preset(engines, llama_dir, tmp_path):
    out = tmp_path / "run"
    run_in_process([
        f"policy.path={llama_dir}", "search=beam", "scorer=vllm_prm", f"scorer.path={llama_dir}",
        "scorer.engine.kv_cache_gib=0.25", "task.count=2", "chunk=2", "budget=4",
        "policy.sampling.max_total_tokens=12", "policy.sampling.max_step_tokens=4", "progress=false",
        "num_threads=1", f"out_dir={out}",
    ])
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["compute"]["scorer_tokens"] > 0 for row in rows)
    # the run closed its engine (not left to vLLM's finalizer, whose teardown breaks the others)
    assert engines["qwen_prm"][0].score([PATHS[0]])[0]
    policy_params = AutoModelForCausalLM.from_pretrained(str(llama_dir)).num_parameters()
    prm_params = engines["math_shepherd"][0].num_parameters  # the same folder, base model only
    for row in rows:
        compute = row["compute"]
        want = 2.0 * policy_params * compute["tokens_forwarded"] + 2.0 * prm_params * compute["scorer_tokens"]
        assert compute["flops"] == pytest.approx(want)


def test_threads_scoring_at_once_get_what_each_alone_gets(engines):
    from concurrent.futures import ThreadPoolExecutor

    scorer, _ = engines["qwen_prm"]
    groups = [[PATHS[0], CHILDREN[k]] for k in range(len(CHILDREN))]
    alone = [scorer.score(group) for group in groups]
    with ThreadPoolExecutor(len(groups)) as pool:
        together = list(pool.map(scorer.score, groups))
    assert together == alone
