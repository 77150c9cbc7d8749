"""Tests of the SPRM scorer on vLLM's pooling runner: its scores equal `SPRMScorer`'s (a
transformers forward) within 1e-3 on the same checkpoint and head, for the final layer (-1, vLLM's
own output), the reference's -2 and the embeddings (-3 of a 2-layer model), both through
`policies.vllm_layer_features`; a policy engine and a scorer engine in one process; plus the
errors that need no vLLM.

Paths come from `TransformersPolicy` rollouts and proposals on the bigram checkpoint of
`tests/vllm_fixtures.py` (steps, runs of separators, terminal steps with no separator) and one
path with no steps; they are scored on a variant with strong decoder layers, whose layers differ
visibly. vLLM tests are marked `vllm` and skip with the install hint without it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from policies.vllm_engine import VLLMEngineConfig
from policies.vllm_layer_features import feature_overrides, hidden_state_index
from scorers.sprm_head import build_sprm_head, save_score_module
from scorers.sprm_scorer import SPRMScorer
from scorers.vllm_sprm_scorer import VLLMSPRMScorer
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem
from treesearch.registry import run_search
from treesearch.steps import StepFormat
from vllm_fixtures import require_vllm, save_bigram_checkpoint

LAYERS = (-1, -2, -3)  # after the final norm; the reference's layer; the embeddings (2 layers)


def prompt(problem: Problem) -> str:
    return problem.question


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The bigram checkpoint with strong decoder layers (each layer's output differs visibly) and
    an SPRM head whose first layer is scaled up (spread-out scores), so a wrong layer or
    position shows."""
    path = save_bigram_checkpoint(tmp_path_factory.mktemp("vllm_scorer") / "bigram", layer_scale=30.0)
    head = build_sprm_head(64, seed=0)
    with torch.no_grad():
        head[0].weight.mul_(3.0)
    save_score_module(head, path)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[Prefix]:
    """Paths sampled from the plain bigram model (the scored checkpoint's strong layers would
    blur its table): many separators inside and outside the think span."""
    policy_path = save_bigram_checkpoint(tmp_path_factory.mktemp("vllm_scorer") / "policy")
    policy = TransformersPolicy.from_pretrained(
        policy_path, SamplingConfig(temperature=0.8, max_step_tokens=8, max_total_tokens=24), prompt
    )
    problems = [Problem("a", "<think>"), Problem("b", "<think>1"), Problem("c", "<think>3")]
    rollouts = policy.rollout([Prefix(p) for p in problems], 3, seed=0)
    out = [Prefix(problems[i], tuple(steps)) for i, row in enumerate(rollouts) for steps in row]
    partial = policy.propose([Prefix(problems[0])], 2, seed=1)
    out += [Prefix(problems[0], (step,)) for step in partial[0]] + [Prefix(problems[1])]
    assert sum(p.text.count("1+2.") for p in out) > 10  # separators the head reads
    return out


def reference(checkpoint: Path, layer: int) -> SPRMScorer:
    model, tokenizer = ReflectiveModel.from_pretrained(checkpoint, feature_layer=layer)
    return SPRMScorer(model, tokenizer, prompt)


@pytest.fixture(scope="module", params=LAYERS)
def vllm_scorer(request, checkpoint, vllm_cache):
    require_vllm()
    engine = VLLMEngineConfig(str(checkpoint), kv_cache_gib=0.25, cache_root=vllm_cache)
    scorer = VLLMSPRMScorer.from_pretrained(checkpoint, prompt, feature_layer=request.param, engine=engine)
    yield scorer
    scorer.close()


# -- without vLLM ---------------------------------------------------------------------------------


def test_the_layers_give_different_reference_scores(checkpoint, paths):
    # Else the equality test below could not tell the layers apart.
    scores = {layer: reference(checkpoint, layer).score(paths) for layer in LAYERS}
    flat = {layer: [x for row in s for x in row] for layer, s in scores.items()}
    for a, b in ((-1, -2), (-2, -3), (-1, -3)):
        assert max(abs(x - y) for x, y in zip(flat[a], flat[b])) > 1e-2


def test_feature_layers_vllm_cannot_return_are_named():
    llama = LlamaConfig(num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    assert feature_overrides(llama, -1) is None and feature_overrides(llama, 2) is None
    gpt2 = GPT2Config(n_layer=2, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"feature_layer=-2 .*GPT2LMHeadModel"):
        feature_overrides(gpt2, -2)
    with pytest.raises(ValueError, match=r"feature_layer=-4 must index the 3 hidden states"):
        hidden_state_index(-4, 2)
    assert [hidden_state_index(k, 2) for k in (-1, -2, -3, 0, 2)] == [2, 1, 0, 0, 2]


def test_a_path_longer_than_the_engines_window_names_its_problem():
    # vLLM's own VLLMValidationError ended the run with a traceback naming no problem
    from types import SimpleNamespace

    from policies.tiny_tokenizer import build_tokenizer

    engine = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=4)))
    scorer = VLLMSPRMScorer(engine, build_tokenizer(), build_sprm_head(8, seed=0), prompt, -1)
    with pytest.raises(ValueError, match=r"problem 'long': the SPRM reads \d+ tokens, more than the scorer engine's "
                                         r"context window of 4 \(scorer.engine.max_model_len\)"):
        scorer.score([Prefix(Problem("long", "1+2+3+4+5+6"))])


def test_a_folder_without_a_head_is_named(tmp_path):
    path = save_bigram_checkpoint(tmp_path / "no-head")
    with pytest.raises(FileNotFoundError, match="score_module.pt"):
        VLLMSPRMScorer.from_pretrained(path, prompt)


@pytest.mark.parametrize("content", ["[-2]", '{"feature_layer": "x"}', '{"feature_layer": -2'])
def test_a_damaged_sprm_json_is_named_before_the_engine_starts(checkpoint, tmp_path, monkeypatch, content):
    import shutil

    from policies import checkpoint as checkpoints
    from scorers import vllm_sprm_scorer

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint, folder)
    (folder / "sprm.json").write_text(content)
    monkeypatch.setattr(vllm_sprm_scorer, "build_llm", lambda *a, **k: pytest.fail("the engine started"))
    with pytest.raises(checkpoints.DamagedCheckpointError, match="sprm.json"):
        VLLMSPRMScorer.from_pretrained(folder, prompt)
    with pytest.raises(checkpoints.DamagedCheckpointError, match="sprm.json"):
        ReflectiveModel.from_pretrained(folder)  # the transformers head reads it the same way


# -- with vLLM ------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_scores_equal_the_transformers_sprm_scorer(vllm_scorer, checkpoint, paths):
    expected = reference(checkpoint, vllm_scorer.feature_layer)
    assert isinstance(vllm_scorer, Scorer)
    got, want = vllm_scorer.read(paths), expected.read(paths)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.positions == w.positions and g.prompt_length == w.prompt_length
        assert g.position_scores == pytest.approx(w.position_scores, abs=1e-3)
        assert g.step_scores == pytest.approx(w.step_scores, abs=1e-3)
        assert g.value == pytest.approx(w.value, abs=1e-3)
    assert vllm_scorer.score(paths) == [list(r.step_scores) for r in got]
    assert vllm_scorer.path_scores(paths) == [r.value for r in got]
    assert vllm_scorer.cost(paths) == expected.cost(paths)
    # FLOPs of the ledger: the same parameters as the transformers scorer (before: none, so a
    # search's scorer FLOPs were 0 on vLLM)
    assert vllm_scorer.num_parameters == expected.num_parameters > 0
    assert vllm_scorer.score([]) == [] and vllm_scorer.score([Prefix(Problem("z", "<think>"))]) == [[]]




@pytest.mark.vllm
def test_policy_and_scorer_engines_share_a_process(checkpoint, vllm_cache):
    # A search with a VLLMPolicy and a VLLMSPRMScorer alive together; closing the scorer first
    # must leave the policy's engine working (vLLM's distributed state is shared).
    require_vllm()
    from policies.vllm_policy import VLLMPolicy

    engine = VLLMEngineConfig(str(checkpoint), kv_cache_gib=0.25, cache_root=vllm_cache)
    sampling = SamplingConfig(max_step_tokens=8, max_total_tokens=24)
    policy = VLLMPolicy.from_pretrained(checkpoint, sampling, prompt, engine=engine)
    scorer = VLLMSPRMScorer.from_pretrained(checkpoint, prompt, feature_layer=-2, engine=engine)
    try:
        (result,) = run_search("beam_search", [Problem("a", "<think>")], policy, scorer, n=4, beam_width=2, max_depth=3)
        assert result.candidates and result.compute.scorer_tokens > 0
        scorer.close()
        assert len(policy.propose([Prefix(Problem("a", "<think>"))], 2, seed=0)[0]) == 2
    finally:
        scorer.close()
        policy.close()


@pytest.mark.vllm
def test_the_vllm_sprm_preset_reads_the_policy_prompt_and_format(checkpoint, paths):
    # scorer=vllm_sprm: the policy's folder, prompt and step format, scored as SPRMScorer scores
    require_vllm()
    from hydra.utils import instantiate

    from experiments.search import build_scorer
    from test_experiment_configs import composed

    cfg = composed([f"policy.path={checkpoint}", "scorer=vllm_sprm", "scorer.engine.kv_cache_gib=0.25",
                    "scorer.feature_layer=-2"])
    scorer = build_scorer(cfg.scorer)
    try:
        assert isinstance(scorer, VLLMSPRMScorer) and scorer.feature_layer == -2
        problem = Problem("q", "3 + 4")
        assert scorer.prompt_fn(problem) == instantiate(cfg.policy.prompt_fn)(problem) != problem.question
        model, tokenizer = ReflectiveModel.from_pretrained(checkpoint, feature_layer=-2)
        sampling = cfg.policy.sampling
        policy_format = StepFormat(sampling.separator, sampling.think_open, sampling.think_close)
        expected = SPRMScorer(model, tokenizer, scorer.prompt_fn, step_format=policy_format)
        assert scorer.markers == expected.markers and scorer.markers.separator_ids
        for got, want in zip(scorer.score(paths), expected.score(paths)):
            assert got == pytest.approx(want, abs=1e-3)
    finally:
        scorer.close()


def test_auto_dtype_is_the_checkpoints_own_for_every_engine(tmp_path):
    # vLLM's "auto" ran a float32 checkpoint's policy in bfloat16 and its SPRM engine in float16
    import json

    from policies.vllm_engine import resolved_dtype

    path = save_bigram_checkpoint(tmp_path / "bigram")
    saved = json.loads((path / "config.json").read_text())
    own = saved.get("torch_dtype", saved.get("dtype"))
    assert own == "float32" and resolved_dtype(VLLMEngineConfig(str(path), dtype="auto"), path) == "float32"
    assert resolved_dtype(VLLMEngineConfig(str(path), dtype="bfloat16"), path) == "bfloat16"


def test_a_kv_cache_too_small_names_kv_cache_gib_not_gpu_memory_utilization():
    from policies.vllm_engine import _with_kv_hint

    said = ValueError("To serve at least one request with the model's max seq len (512), (0.0 GiB KV cache is needed, "
                      "which is larger than the available KV cache memory (0.0 GiB). Try increasing "
                      "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.")
    hinted = _with_kv_hint(said, VLLMEngineConfig("m", kv_cache_gib=0.001))
    assert str(hinted).startswith("kv_cache_gib=0.001 GiB is too small for one sequence of this model's context: "
                                  "raise the engine's kv_cache_gib")
    assert _with_kv_hint(said, VLLMEngineConfig("m", kv_cache_gib=None)) is said  # sized from gpu_memory_utilization
    below_a_block = ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                               "when initializing the engine.")  # kv_cache_gib=0.0001 said only this before
    assert str(_with_kv_hint(below_a_block, VLLMEngineConfig("m", kv_cache_gib=0.0001))).startswith(
        "kv_cache_gib=0.0001 GiB is too small")


def test_a_feature_layer_engine_in_a_child_process_is_refused_before_it_starts(checkpoint, monkeypatch):
    require_vllm()
    from policies import vllm_engine

    from types import SimpleNamespace

    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: SimpleNamespace(LLM=lambda *a, **k: pytest.fail("vLLM started")))
    config = VLLMEngineConfig(str(checkpoint), multiprocessing=True)
    with pytest.raises(ValueError, match=r"multiprocessing=true cannot read feature_layer=-2: its model class"):
        vllm_engine.build_llm(config, runner="pooling", feature_layer=-2)
