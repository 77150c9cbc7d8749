"""Tests of the transformers backend on a CUDA GPU, and of choosing the device.

Everywhere: `policies.devices.resolve_device` accepts "cpu" and rejects unknown names, and a GPU
that torch cannot see is a ValueError naming it, raised before any weights load
(`TransformersPolicy.from_pretrained(..., device="cuda")`, `SPRMScorer.from_pretrained`, the
benchmarks' `--device`).

On a machine with a CUDA GPU (skipped elsewhere, marked `gpu`): the reflective policy of
tests/test_reflective_policy.py moved to the GPU generates greedily the very tokens it generates
on the CPU, with the same log-probs and SPRM step scores (fp32, TF32 off, within 1e-4); sampled
rounds of propose with the prefix cache on score every step as a second full forward on the GPU
does; the shared-prefix decode and the per-row copies give the same greedy steps; a beam search
runs end to end on the GPU; checkpoints load onto the GPU by `device="cuda"`; calls merged by
continuous batching sample what each samples alone. Forked decoding (`policies.decode_batch`)
samples what every row alone does, on the CPU here and on the GPU there.

    .venv/bin/pytest tests/test_cuda_backend.py
    python3 -m pytest tests/test_cuda_backend.py        # on a GPU machine
"""
from __future__ import annotations

import copy

import pytest
import torch

from policies.devices import resolve_device
from policies.prefix_cache import PrefixCacheConfig
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.sprm_head import build_sprm_head
from scorers.sprm_scorer import SPRMScorer
from scorers.step_score_reader import StepScoreReader
from test_reflective_policy import REFLECTIVE, TOL, joined, scored_prefixes
from test_transformers_policy import TOK, make_model, mixed_prefixes
from treesearch.records import Prefix, Problem, Step
from treesearch.registry import run_search

HAS_CUDA = torch.cuda.is_available()


def test_resolve_device_accepts_the_cpu_and_names_a_bad_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'meta'.*cpu or cuda"):
        resolve_device("meta")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is visible here")
def test_a_gpu_torch_cannot_see_is_named_before_loading(tmp_path):
    with pytest.raises(ValueError, match="device='cuda' but torch .* sees no CUDA GPU"):
        resolve_device("cuda")
    cfg = SamplingConfig(temperature=0.0, max_total_tokens=10)
    with pytest.raises(ValueError, match="'cuda:1'"):  # before the (missing) folder is read
        TransformersPolicy.from_pretrained(tmp_path / "nowhere", cfg, lambda x: x.question, device="cuda:1")
    with pytest.raises(ValueError, match="'cuda'"):
        SPRMScorer.from_pretrained(tmp_path / "nowhere", lambda x: x.question, device="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is visible here")
def test_a_benchmark_asked_for_a_gpu_it_cannot_see_says_so():
    from experiments.bench_workload import load_workload

    with pytest.raises(ValueError, match="device='cuda' but torch"):
        load_workload("tiny", 2, 0, device="cuda")


# ---- on a CUDA GPU -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exact_fp32():
    """fp32 matmuls without TF32 on the GPU, so its numbers match the CPU's within TOL."""
    if not HAS_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def gpu_reflective(exact_fp32) -> ReflectiveModel:
    return copy.deepcopy(REFLECTIVE).to("cuda")


def reflective_policy(model: ReflectiveModel, cache: PrefixCacheConfig | None = None, **sampling) -> TransformersPolicy:
    settings = dict(temperature=0.0, max_step_tokens=8, max_total_tokens=20, batch_size=64)
    settings.update(sampling)
    cfg = SamplingConfig(**settings)
    return TransformersPolicy.from_reflective(model, TOK, cfg, lambda p: p.question, prefix_cache=cache)


def flat_steps(rows) -> list[Step]:
    """Every step of propose's rows (per prefix, its steps) or rollout's (per prefix, its paths)."""
    flat: list[Step] = []
    for row in rows:
        for item in row:
            flat += [item] if isinstance(item, Step) else list(item)
    return flat


@pytest.mark.parametrize("cache", [None, PrefixCacheConfig()])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_greedy_steps_logprobs_and_scores_on_the_gpu_equal_the_cpu(gpu_reflective, cache):
    prefixes = scored_prefixes()
    cpu = reflective_policy(REFLECTIVE, cache, batch_size=5)  # prefixes split over chunks
    gpu = reflective_policy(gpu_reflective, cache, batch_size=5)
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    for call in ("propose", "rollout", "rollout"):  # the second rollout prefills from the cache
        here = flat_steps(getattr(cpu, call)(prefixes, 2, seed=0))
        there = flat_steps(getattr(gpu, call)(prefixes, 2, seed=0))
        assert [s.token_ids for s in there] == [s.token_ids for s in here]
        assert [s.finish for s in there] == [s.finish for s in here]
        assert [s.score for s in there] == pytest.approx([s.score for s in here], abs=TOL)
        logprobs = [[x for s in steps for x in s.token_logprobs] for steps in (there, here)]
        assert logprobs[0] == pytest.approx(logprobs[1], abs=TOL)
    if cache is not None:
        assert gpu.prefix_cache.stats().hits == cpu.prefix_cache.stats().hits > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_sampled_rounds_on_the_gpu_score_as_a_second_forward_does(gpu_reflective):
    p = reflective_policy(gpu_reflective, PrefixCacheConfig(), temperature=1.0)
    frontier, finished = scored_prefixes(), []
    for r in range(3):
        children = [x.extend(s) for x, row in zip(frontier, p.propose(frontier, 3, seed=r)) for s in row]
        finished += children
        frontier = [x for x in children if not x.is_terminal][:8]
    assert p.prefix_cache.stats().hits > 0 and len(finished) >= 20
    scorer = SPRMScorer(gpu_reflective, TOK, prompt_fn=lambda x: x.question)
    for path, row in zip(finished, scorer.score(finished)):
        assert [s.score for s in path.steps] == pytest.approx(row, abs=TOL), path


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_shared_prefix_and_copied_rows_agree_on_the_gpu(gpu_reflective):
    roots = [x for x in mixed_prefixes() if not x.steps]
    cfg = SamplingConfig(temperature=0.0, max_step_tokens=8, max_total_tokens=20)
    make = lambda shared: TransformersPolicy(  # noqa: E731
        gpu_reflective.lm, TOK, cfg, lambda x: x.question, step_head=gpu_reflective, shared_prefix=shared
    )
    shared, copied = make(True), make(False)
    a, b = flat_steps(shared.propose(roots, 4, seed=1)), flat_steps(copied.propose(roots, 4, seed=1))
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_beam_search_runs_on_the_gpu_with_scores_read_from_generation(gpu_reflective):
    problems = [Problem("a", "<think>1+2="), Problem("b", "<think>12+34=56-7"), Problem("c", "<think>5")]
    p = reflective_policy(gpu_reflective, PrefixCacheConfig(), temperature=1.0, max_total_tokens=24)
    results = run_search("beam_search", problems, p, StepScoreReader(), n=8, beam_width=2, max_depth=4, seed=0)
    assert [r.problem.id for r in results] == ["a", "b", "c"]
    for result in results:
        assert result.candidates and result.compute.scorer_tokens == 0
        assert all(s.score is not None for c in result.candidates for s in c.steps)
    paths = [Prefix(r.problem, c.steps) for r in results for c in r.candidates]
    expected = SPRMScorer(gpu_reflective, TOK, prompt_fn=lambda x: x.question).score(paths)
    for path, row in zip(paths, expected):
        assert [s.score for s in path.steps] == pytest.approx(row, abs=TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_checkpoints_load_onto_the_gpu(tmp_path, exact_fp32):
    model = ReflectiveModel(make_model(len(TOK), seed=2), build_sprm_head(64, seed=5), feature_layer=-1)
    model.save_pretrained(tmp_path / "ckpt", TOK)
    cfg = SamplingConfig(temperature=0.0, max_total_tokens=10)
    prompt = lambda x: x.question  # noqa: E731
    on_gpu = TransformersPolicy.from_pretrained(tmp_path / "ckpt", cfg, prompt, with_step_head=True, device="cuda")
    plain = TransformersPolicy.from_pretrained(tmp_path / "ckpt", cfg, prompt, device="cuda:0")
    on_cpu = TransformersPolicy.from_pretrained(tmp_path / "ckpt", cfg, prompt, with_step_head=True)
    assert on_gpu.device.type == plain.device.type == "cuda"
    assert {p.device.type for p in on_gpu.step_head.parameters()} == {"cuda"}  # the LM's and the head's
    prefixes = mixed_prefixes()[:2]
    gpu_steps = flat_steps(on_gpu.rollout(prefixes, 1, seed=0))
    cpu_steps = flat_steps(on_cpu.rollout(prefixes, 1, seed=0))
    assert [s.token_ids for s in gpu_steps] == [s.token_ids for s in cpu_steps]
    assert [s.score for s in gpu_steps] == pytest.approx([s.score for s in cpu_steps], abs=TOL)
    assert [s.token_ids for s in flat_steps(plain.rollout(prefixes, 1, seed=0))] == [s.token_ids for s in gpu_steps]
    scorer = SPRMScorer.from_pretrained(tmp_path / "ckpt", prompt, device="cuda")
    assert scorer.device.type == "cuda"
    paths = joined(prefixes, on_gpu.rollout(prefixes, 1, seed=0))  # roots without steps: every score is generated
    for path, row in zip(paths, scorer.score(paths)):
        assert [s.score for s in path.steps] == pytest.approx(row, abs=TOL)
    with pytest.raises(ValueError, match=f"torch sees {torch.cuda.device_count()} CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")
def test_continuous_batching_on_the_gpu_equals_each_call_alone(gpu_reflective):
    from policies.continuous_engine import ContinuousEngine
    from test_continuous_engine import CALLS, _call, _in_threads
    from test_prefix_cache import assert_same_outputs

    prefixes = mixed_prefixes()
    make = lambda: reflective_policy(gpu_reflective, PrefixCacheConfig(), temperature=1.0)  # noqa: E731
    alone = [_call(make(), prefixes, spec) for spec in CALLS]
    p = make()
    with ContinuousEngine.attached(p) as engine:
        together = _in_threads(p, engine, prefixes, CALLS)  # merged chunks: each call's own generator
    for a, b in zip(alone, together):
        assert_same_outputs([a], [b])
        assert [s.score for row in a for s in row] == pytest.approx([s.score for row in b for s in row], abs=TOL)
    assert engine.most_cohorts >= 2


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU visible to torch")]),
])
def test_forked_decoding_samples_what_every_row_alone_does_on_the_device(device, exact_fp32):
    # temperature 1 over a random policy: the rows of a context fork often; their tokens, finishes,
    # step scores and log-probs are what each row samples with a slot of its own on that device
    model = REFLECTIVE if device == "cpu" else copy.deepcopy(REFLECTIVE).to(device)
    cfg = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=20, batch_size=64)
    make = lambda forked: TransformersPolicy.from_reflective(  # noqa: E731
        model, TOK, cfg, lambda p: p.question, prefix_cache=PrefixCacheConfig(), forked=forked
    )
    forked, alone = make(True), make(False)
    assert forked.device.type == device
    for call, seed in (("propose", 0), ("rollout", 1), ("propose", 2)):  # the later calls prefill from the cache
        a = flat_steps(getattr(forked, call)(mixed_prefixes(), 6, seed=seed))
        b = flat_steps(getattr(alone, call)(mixed_prefixes(), 6, seed=seed))
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        assert [s.finish for s in a] == [s.finish for s in b]
        assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=TOL)
        assert [x for s in a for x in s.token_logprobs] == pytest.approx([x for s in b for x in s.token_logprobs], abs=TOL)
    assert len({s.token_ids for s in a}) > 4  # the rows did fork: more distinct steps than prefixes
    # the forked policy forwarded fewer decode tokens for the same samples
    assert sum(s.tokens_forwarded for s in a) < sum(s.tokens_forwarded for s in b)
