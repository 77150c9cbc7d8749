"""Pins for vLLM-backend behaviours that a mutation review found unpinned, checked without starting
a vLLM engine (and without importing vLLM): `_engine_kwargs` passes the checkpoint's own dtype for
"auto" and every optional engine setting through (kv_cache_gib in GiB of 2**30 bytes);
`VLLMEngineConfig` takes gpu_memory_utilization=1.0 and refuses max_num_seqs / max_model_len of 0;
`build_llm` refuses a feature layer or pooling task that does not apply before `vllm.LLM` is called
(stubbed `import_vllm`); the policy service's `VLLMCompleter` sends the server's top_p and
repetition penalty and the right seeds on every row and counts the BOS its tokenizer adds; the
SPRM scorer reads a path of exactly its engine's window; `VLLMUsage` adds field by field; and
`VLLMPolicy` / `VLLMSPRMScorer.from_pretrained` start their engine on the folder given, whatever
model an `engine` config names (monkeypatched `build_llm`).

Fakes only (a tiny checkpoint from tests/tiny_checkpoint.py, recording engines): runs in about a
second after the imports.

Run: `.venv/bin/python -m pytest tests/test_vllm_pins.py`
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments.services import vllm_completer
from experiments.services.text_completer import CompletionRequest, SamplingDefaults, row_seeds
from policies import vllm_engine, vllm_policy
from policies.sampling_config import SamplingConfig
from policies.tiny_tokenizer import build_tokenizer
from policies.vllm_engine import VLLMEngineConfig, _engine_kwargs
from policies.vllm_policy import VLLMPolicy, VLLMUsage
from scorers import vllm_sprm_scorer
from scorers.sprm_head import build_sprm_head, save_score_module
from scorers.vllm_sprm_scorer import VLLMSPRMScorer
from tiny_checkpoint import TINY_SHAPE, save_tiny_checkpoint
from treesearch.records import Prefix, Problem


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random float32 checkpoint (config.json's dtype float32)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("vllm_pins") / "tiny")


class Started(Exception):
    """Raised by a fake `build_llm` once it has recorded what it was asked."""


def question(problem: Problem) -> str:
    return problem.question


def window_engine(window: int) -> SimpleNamespace:
    """A stand-in `vllm.LLM` with only a context window (what `max_model_len` reads)."""
    return SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=window)))


# -- the engine's arguments -----------------------------------------------------------------------


def test_auto_dtype_passes_the_checkpoints_own_dtype_to_vllm(checkpoint):
    # vLLM's own "auto" downcasts a float32 checkpoint (bfloat16 to generate, float16 to pool)
    assert _engine_kwargs(VLLMEngineConfig(str(checkpoint), dtype="auto"), checkpoint)["dtype"] == "float32"
    assert _engine_kwargs(VLLMEngineConfig(str(checkpoint), dtype="bfloat16"), checkpoint)["dtype"] == "bfloat16"


def test_engine_kwargs_pass_every_setting_through(checkpoint):
    config = VLLMEngineConfig(
        str(checkpoint), seed=3, block_size=64, enable_prefix_caching=False, enforce_eager=False, kv_cache_gib=1.5,
        max_model_len=1024, gpu_memory_utilization=0.5, tensor_parallel_size=2, max_num_seqs=8,
        enable_chunked_prefill=True,
    )
    kwargs = _engine_kwargs(config, checkpoint)  # no CPU/GPU gate here (check_cpu_engine refuses tp=2 on CPU)
    assert kwargs == dict(
        dtype="float32", seed=3, block_size=64, enable_prefix_caching=False, enforce_eager=False,
        gpu_memory_utilization=0.5, tensor_parallel_size=2, kv_cache_memory_bytes=1610612736,  # 1.5 * 2**30
        max_model_len=1024, max_num_seqs=8, enable_chunked_prefill=True,
    )


def test_unset_optional_settings_are_left_to_vllm(checkpoint):
    kwargs = _engine_kwargs(VLLMEngineConfig(str(checkpoint), kv_cache_gib=None), checkpoint)
    assert not {"kv_cache_memory_bytes", "max_model_len", "max_num_seqs"} & kwargs.keys()
    assert kwargs["enable_prefix_caching"] is True and kwargs["gpu_memory_utilization"] == 0.9


def test_engine_config_takes_all_gpu_memory_and_refuses_zero_limits():
    assert VLLMEngineConfig("m", gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0
    for name in ("max_num_seqs", "max_model_len"):
        with pytest.raises(ValueError, match=rf"VLLMEngineConfig.{name}=0 must be an integer >= 1"):
            VLLMEngineConfig("m", **{name: 0})


@pytest.mark.parametrize("runner, feature_layer, pooling_task, said", [
    ("generate", -2, "token_embed", "feature_layer and pooling_task only apply to runner='pooling'"),
    ("generate", -1, "token_classify", "feature_layer and pooling_task only apply to runner='pooling'"),
    ("pooling", -2, "token_classify", "feature_layer=-2: pooling_task='token_classify' reads the classifier's"),
], ids=["generate-with-a-layer", "generate-with-a-task", "classify-with-a-layer"])
def test_build_llm_refuses_a_layer_or_task_that_does_not_apply_before_vllm_starts(
        checkpoint, monkeypatch, runner, feature_layer, pooling_task, said):
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: SimpleNamespace(LLM=lambda *a, **k: pytest.fail("vLLM started")))
    # _pooling_kwargs imports vLLM's PoolerConfig: a stand-in spares the seconds of importing vLLM
    monkeypatch.setitem(sys.modules, "vllm.config", SimpleNamespace(PoolerConfig=lambda **kwargs: kwargs))
    monkeypatch.setattr(vllm_engine, "_set_environment", lambda config: {})  # no process-wide vLLM variables
    with pytest.raises(ValueError, match=said):
        vllm_engine.build_llm(VLLMEngineConfig(str(checkpoint)), runner, feature_layer, pooling_task)


# -- the policy service's completer ---------------------------------------------------------------


def recording_completer(monkeypatch, sampling: SamplingDefaults = SamplingDefaults(), tokenizer=None):
    """A VLLMCompleter over a fake engine; returns (completer, the SamplingParams kwargs it sent)."""
    monkeypatch.setattr(vllm_completer, "import_vllm", lambda: SimpleNamespace(SamplingParams=dict))
    sent: list[dict] = []

    def generate(prompts, params, use_tqdm):
        sent.extend(params)
        return [SimpleNamespace(outputs=[SimpleNamespace(text="x")]) for _ in prompts]

    engine = window_engine(64)
    engine.generate = generate
    return vllm_completer.VLLMCompleter(engine, tokenizer, sampling), sent


def test_every_row_gets_the_servers_top_p_and_repetition_penalty(monkeypatch):
    completer, sent = recording_completer(monkeypatch, SamplingDefaults(top_p=0.8, repetition_penalty=1.2))
    completer.complete([CompletionRequest("a", 2, 8, 1.0), CompletionRequest("b", 3, 8, 0.7, seed=5),
                        CompletionRequest("c", 2, 8, 0.0)])
    assert len(sent) == 2 + 3 + 1  # a greedy request is sampled once
    assert [(p["top_p"], p["repetition_penalty"]) for p in sent] == [(0.8, 1.2)] * 6


def test_an_unseeded_request_sends_no_seeds_and_a_seeded_one_its_row_seeds(monkeypatch):
    completer, sent = recording_completer(monkeypatch)
    assert completer.complete([CompletionRequest("a", 3, 8, 1.0), CompletionRequest("b", 3, 8, 1.0, seed=7)]) == [
        ["x"] * 3, ["x"] * 3]
    assert [p["seed"] for p in sent] == [None, None, None] + row_seeds(7, 3)


def test_count_tokens_counts_the_bos_the_tokenizer_adds(monkeypatch):
    tokenizer = build_tokenizer()
    completer, _ = recording_completer(monkeypatch, tokenizer=tokenizer)
    fed = tokenizer("1+2=3").input_ids  # what vLLM feeds for the prompt
    assert fed[0] == tokenizer.bos_token_id and len(fed) == len(tokenizer("1+2=3", add_special_tokens=False).input_ids) + 1
    assert completer.count_tokens("1+2=3") == len(fed)


# -- the SPRM scorer, usage and from_pretrained ----------------------------------------------------


def test_the_sprm_scorer_reads_a_path_of_exactly_its_window(monkeypatch):
    encoded = []

    def encode(llm, sequences):
        encoded.extend(sequences)
        return [torch.zeros(len(ids), 8) for ids in sequences]

    monkeypatch.setattr(vllm_sprm_scorer, "encode_hidden_states", encode)
    tokenizer, head, path = build_tokenizer(), build_sprm_head(8, seed=0), Prefix(Problem("fits", "1+2+3+4+5+6"))
    tokens = VLLMSPRMScorer(window_engine(1000), tokenizer, head, question, -1).cost([path])
    exact = VLLMSPRMScorer(window_engine(tokens), tokenizer, head, question, -1)
    assert exact.score([path]) == [[]] and [len(ids) for ids in encoded] == [tokens]
    short = VLLMSPRMScorer(window_engine(tokens - 1), tokenizer, head, question, -1)
    with pytest.raises(ValueError, match=rf"problem 'fits': the SPRM reads {tokens} tokens, more than .* of {tokens - 1}"):
        short.score([path])


def test_vllm_usage_adds_field_by_field():
    total = VLLMUsage(1, 2, 3, 4) + VLLMUsage(5, 6, 7, 8)
    assert total == VLLMUsage(requests=6, prompt_tokens=8, cached_prompt_tokens=10, generated_tokens=12)


def test_vllm_policy_starts_its_engine_on_the_folder_given(checkpoint, monkeypatch):
    asked = []

    def build_llm(config, runner):
        asked.append((config, runner))
        raise Started

    monkeypatch.setattr(vllm_policy, "build_llm", build_llm)
    engine = VLLMEngineConfig("/models/elsewhere", dtype="bfloat16", kv_cache_gib=0.5, max_num_seqs=4)
    with pytest.raises(Started):
        VLLMPolicy.from_pretrained(checkpoint, SamplingConfig(), str, engine=engine)
    assert asked == [(replace(engine, model=str(checkpoint)), "generate")]  # its other settings kept


def test_vllm_sprm_scorer_starts_its_engine_on_the_folder_given(checkpoint, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "with_head"))
    save_score_module(build_sprm_head(TINY_SHAPE.hidden, seed=0), folder)
    asked = []

    def build_llm(config, runner, feature_layer):
        asked.append((config, runner, feature_layer))
        raise Started

    monkeypatch.setattr(vllm_sprm_scorer, "build_llm", build_llm)
    engine = VLLMEngineConfig("/models/elsewhere", kv_cache_gib=0.5)
    with pytest.raises(Started):
        VLLMSPRMScorer.from_pretrained(folder, str, feature_layer=-2, engine=engine)
    assert asked == [(replace(engine, model=str(folder)), "pooling", -2)]
