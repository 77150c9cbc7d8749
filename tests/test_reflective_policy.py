"""Tests of scoring with no extra forward pass: a `TransformersPolicy` with a `ReflectiveModel` as
step head attaches `Step.score` while generating, and those scores equal `SPRMScorer`'s separate
full forward over the finished text (fp32, within 1e-4): rollout and propose, greedy and sampled,
mixed-length batches split over chunks, the prefix cache on and off, whole-sequence steps, the
terminal-step rule; the forwards are exactly those of the head-less policy; Best-of-N through
`StepScoreReader` costs no scorer tokens and picks what the reference's path score picks; the
reflective checkpoint round trip.

The tiny random Llama and word-level tokenizer come from test_transformers_policy; a
`ScriptedLM` forces the separator at every third position (so steps end often), every other
token is sampled from the real model (which also samples separators, runs of them, EOS and
</think> on its own).

    .venv/bin/pytest tests/test_reflective_policy.py
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from policies.prefix_cache import PrefixCacheConfig
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.sprm_head import SCORE_MODULE_FILE, build_sprm_head
from scorers.sprm_scorer import SPRMScorer
from scorers.step_score_reader import StepScoreReader
from test_transformers_policy import ID, SEP, TOK, ForwardLog, ScriptedLM, make_model, mixed_prefixes
from treesearch.aggregation import aggregate
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.records import Prefix, Problem, Step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


BASE = make_model(len(TOK))
HEAD = build_sprm_head(64, seed=1)
with torch.no_grad():
    HEAD[3].weight.mul_(8)  # spread the scores over (0, 1) rather than ~0.5
SEPARATOR_EVERY_THIRD = {p: ID[SEP] for p in range(4, 64, 3)}
REFLECTIVE = ReflectiveModel(ScriptedLM(BASE, SEPARATOR_EVERY_THIRD), HEAD)
SCORER = SPRMScorer(REFLECTIVE, TOK, prompt_fn=lambda p: p.question)
TOL = 1e-4


def policy(cache: PrefixCacheConfig | None = None, **sampling) -> TransformersPolicy:
    settings = dict(temperature=1.0, max_step_tokens=8, max_total_tokens=20, batch_size=64)
    settings.update(sampling)
    cfg = SamplingConfig(**settings)
    return TransformersPolicy.from_reflective(REFLECTIVE, TOK, cfg, lambda p: p.question, prefix_cache=cache)


def scored_prefixes() -> list[Prefix]:
    """Roots of different prompt lengths (one without <think>), the hand-made step of "c" scored
    by the scorer, and children from one propose round of the reflective policy."""
    roots = mixed_prefixes()
    c = roots[2]
    roots[2] = Prefix(c.problem, (dataclasses.replace(c.steps[0], score=SCORER.score([c])[0][0]),))
    first = policy(temperature=1.0).propose(roots, 2, seed=11)
    children = [x.extend(s) for x, row in zip(roots, first) for s in row if not s.is_terminal]
    assert len(children) >= 3
    return roots + children


def assert_scores_match(paths: list[Prefix]) -> None:
    """Every step's generation-time score equals the scorer's full-forward score."""
    expected = SCORER.score(paths)
    for path, row in zip(paths, expected):
        got = [s.score for s in path.steps]
        assert None not in got, path
        assert got == pytest.approx(row, abs=TOL), path


def joined(prefixes: list[Prefix], rows: list[list[list[Step]]]) -> list[Prefix]:
    return [Prefix(x.problem, x.steps + tuple(path)) for x, row in zip(prefixes, rows) for path in row]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("cache", [None, PrefixCacheConfig()])
def test_rollout_scores_equal_a_second_forward(temperature, cache):
    prefixes = scored_prefixes()
    p = policy(cache, temperature=temperature, batch_size=5)  # prefixes split over chunks
    if cache is not None:
        p.propose(prefixes, 1, seed=0)  # fill the cache, so the rollout prefills from it
    paths = joined(prefixes, p.rollout(prefixes, 3, seed=0))
    assert_scores_match(paths)
    steps = [s for path in paths for s in path.steps]
    assert sum(s.finish == "separator" for s in steps) >= 20  # plenty of scored separators
    assert any(s.is_terminal and SEP not in s.text for s in steps)  # the terminal-step rule is exercised
    assert len({len(x.steps) for x in prefixes}) >= 2 and len({x.problem.question for x in prefixes}) >= 4
    if cache is not None:
        assert p.prefix_cache.stats().hits > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_propose_over_rounds_equals_a_second_forward_with_and_without_the_cache(temperature):
    def rounds(p: TransformersPolicy) -> list[Prefix]:
        frontier, finished = scored_prefixes(), []
        for r in range(3):
            children = [x.extend(s) for x, row in zip(frontier, p.propose(frontier, 2, seed=r)) for s in row]
            finished += children
            frontier = [x for x in children if not x.is_terminal][:8]
        return finished

    cached = policy(PrefixCacheConfig(), temperature=temperature)
    on, off = rounds(cached), rounds(policy(None, temperature=temperature))
    assert cached.prefix_cache.stats().hits > 0
    assert [x.steps[-1].token_ids for x in on] == [x.steps[-1].token_ids for x in off]
    assert [x.steps[-1].score for x in on] == pytest.approx([x.steps[-1].score for x in off], abs=TOL)
    assert_scores_match(on)
    assert any(x.steps[-1].is_terminal for x in on) and any(not x.steps[-1].is_terminal for x in on)


def test_a_whole_sequence_step_scores_the_geometric_mean_of_its_separators():
    roots = [x for x in mixed_prefixes() if not x.steps]
    rows = policy(max_total_tokens=24).propose(roots, 3, seed=4, stop_at_step=False)
    paths = joined(roots, [[[s] for s in row] for row in rows])
    readings = SCORER.read(paths)
    assert max(len(r.positions) for r in readings) >= 3
    for path, reading in zip(paths, readings):
        assert path.steps[0].score == pytest.approx(reading.value, abs=TOL)  # the reference's value


def test_the_head_adds_no_forward_and_changes_no_token():
    prefixes = scored_prefixes()
    cfg = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=20)
    own_lm = ScriptedLM(BASE, SEPARATOR_EVERY_THIRD)  # fresh wrappers: each hook sees one policy
    with_head = TransformersPolicy.from_reflective(ReflectiveModel(own_lm, HEAD), TOK, cfg, lambda x: x.question)
    without = TransformersPolicy(ScriptedLM(BASE, SEPARATOR_EVERY_THIRD), TOK, cfg, lambda x: x.question)
    log_with, log_without = ForwardLog(with_head.model), ForwardLog(without.model)
    scored = with_head.rollout(prefixes, 2, seed=3)
    plain = without.rollout(prefixes, 2, seed=3)
    assert log_with.calls == log_without.calls  # the very same forwards, nothing extra
    flat = lambda rows: [s for row in rows for path in row for s in path]  # noqa: E731
    assert [s.token_ids for s in flat(scored)] == [s.token_ids for s in flat(plain)]
    assert all(s.score is None for s in flat(plain)) and all(s.score is not None for s in flat(scored))
    assert sum(s.tokens_forwarded for s in flat(scored)) == log_with.tokens


def test_terminal_step_rules_at_generation_time():
    # script after "<bos><think>": SEP (right after <think>: no step), 1, SEP (ends step 1), SEP
    # (a run), </think>, 2, SEP (outside think), <eos>
    script = [SEP, "1", SEP, SEP, "</think>", "2", SEP, "<eos>"]
    lm = ScriptedLM(BASE, {2 + k: ID[t] for k, t in enumerate(script)})
    p = TransformersPolicy.from_reflective(
        ReflectiveModel(lm, HEAD), TOK, SamplingConfig(max_total_tokens=12), lambda x: x.question
    )
    root = Prefix(Problem("a", "<think>"))
    path = p.rollout([root], 1, seed=0)[0][0]
    assert [(s.text, s.finish) for s in path] == [(SEP + "1" + SEP + SEP, "separator"), ("</think>2" + SEP, "eos")]
    first = path[0].score
    assert path[1].score == pytest.approx(first)  # no separator of its own: the path's geometric mean
    assert [s.score for s in path] == pytest.approx(SCORER.score([Prefix(root.problem, tuple(path))])[0], abs=TOL)
    # a prefix step without a score (hand-made) leaves a terminal step's score unknown (None);
    # a step with its own separator is still scored
    bare = Prefix(root.problem, (dataclasses.replace(path[0], score=None),))
    assert p.propose([bare], 1, seed=0)[0][0].score is None
    direct = TransformersPolicy.from_reflective(
        ReflectiveModel(ScriptedLM(BASE, {2: ID["</think>"], 3: ID["<eos>"]}), HEAD), TOK,
        SamplingConfig(max_total_tokens=4), lambda x: x.question,
    )
    assert direct.propose([root], 1, seed=0)[0][0].score == 0.0  # no separator at all: 0 as the reference


@pytest.mark.parametrize("cache", [None, PrefixCacheConfig()])
def test_a_separator_sampled_first_is_read_from_the_prefill_state(cache):
    # "<bos><think>1" fills positions 0-2; the separator forced at 3 is read at the prompt's
    # last token (2), whose state only the prefill computed; then a child forwards its last token
    lm = ScriptedLM(BASE, {3: ID[SEP], 6: ID[SEP]})
    p = TransformersPolicy.from_reflective(
        ReflectiveModel(lm, HEAD), TOK, SamplingConfig(max_total_tokens=10), lambda x: x.question, prefix_cache=cache
    )
    root = Prefix(Problem("a", "<think>1"))
    first = p.propose([root], 2, seed=0)[0]
    assert [(s.text, s.finish) for s in first] == [(SEP, "separator")] * 2
    assert SCORER.read([root.extend(first[0])])[0].positions == (2,)
    child = root.extend(first[0])
    second = p.propose([child], 2, seed=0)[0]
    assert_scores_match([child.extend(s) for s in second] + [root.extend(s) for s in first])


def test_best_of_n_reads_the_scores_at_no_scorer_cost():
    problems = [Problem("a", "<think>1+2="), Problem("b", "<think>12+34=56-7"), Problem("c", "<think>5")]
    results = best_of_n(problems, policy(max_total_tokens=16), StepScoreReader(), BestOfNConfig(n=6, seed=2))
    paths = [Prefix(r.problem, c.steps) for r in results for c in r.candidates]
    readings = SCORER.read(paths)
    assert all(r.compute.scorer_tokens == 0 for r in results) and SCORER.cost(paths) > 0
    k = 0
    for result in results:
        values = [reading.value for reading in readings[k : k + len(result.candidates)]]
        k += len(result.candidates)
        ours = [c.score for c in result.candidates]
        assert ours == pytest.approx(values, abs=TOL)  # geometric mean over steps = the reference's value
        assert result.chosen == max(range(len(values)), key=lambda i: (values[i], -i))
        for candidate in result.candidates:
            assert candidate.step_scores == tuple(s.score for s in candidate.steps)
            assert candidate.score == aggregate(candidate.step_scores)


def test_reflective_checkpoint_round_trip(tmp_path):
    model = ReflectiveModel(make_model(len(TOK), seed=2), build_sprm_head(64, seed=5), feature_layer=-1)
    model.save_pretrained(tmp_path / "ckpt", TOK)
    assert (tmp_path / "ckpt" / SCORE_MODULE_FILE).is_file()
    cfg = SamplingConfig(temperature=0.0, max_total_tokens=10)
    loaded = TransformersPolicy.from_pretrained(tmp_path / "ckpt", cfg, lambda x: x.question, with_step_head=True)
    assert loaded.step_head.feature_layer == -1
    fresh = TransformersPolicy.from_reflective(model, TOK, cfg, lambda x: x.question)
    prefixes = mixed_prefixes()[:2]
    assert loaded.rollout(prefixes, 1, seed=0) == fresh.rollout(prefixes, 1, seed=0)
    (tmp_path / "ckpt" / SCORE_MODULE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="score_module.pt"):
        ReflectiveModel.from_pretrained(tmp_path / "ckpt")


def test_rows_of_one_slot_share_the_heads_one_reading():
    """Forked siblings that drew the same step share a slot: the head reads it once, so they tie
    exactly (a copy per row sat at another place in one matmul, rounding ~1e-7 apart, and a
    strategy's tie-break between identical steps followed the batch's layout)."""
    from policies.decode_loop import _score_boundaries

    class PlaceDependentHead:  # a score that, like a matmul's rounding, depends on the row's place
        def __init__(self) -> None:
            self.calls: list[int] = []

        def step_scores(self, features: torch.Tensor) -> torch.Tensor:
            self.calls.append(len(features))
            return features[:, 0] + 1e-7 * torch.arange(len(features))

    head, features = PlaceDependentHead(), torch.tensor([[0.1], [0.5], [0.9]])
    scores = torch.full((5, 2), -1.0)
    row_slot = torch.tensor([1, 1, 2, 1, 0])  # rows 0, 1, 3 share slot 1
    _score_boundaries(head, features, torch.tensor([True, True, True, True, False]), torch.arange(5), 1, scores, row_slot)
    assert scores[:, 1].tolist() == pytest.approx([0.5, 0.5, 0.9, 0.5, -1.0], abs=1e-6)
    assert scores[0, 1] == scores[1, 1] == scores[3, 1]  # exactly
    assert head.calls == [2]  # slots 1 and 2, once each
    unforked = torch.full((2, 2), -1.0)
    _score_boundaries(head, features[:2], torch.tensor([False, True]), torch.tensor([1, 0]), 0, unforked)
    assert unforked[:, 0].tolist() == pytest.approx([0.5, -1.0]) and head.calls == [2, 1]  # row 1's state -> row 0
