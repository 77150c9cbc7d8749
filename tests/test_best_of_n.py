"""Best-of-N and the registry on a fake policy with a known best answer."""
from __future__ import annotations

import pytest

from fakes import FakePolicy, OracleScorer
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.records import Problem
from treesearch.registry import get_strategy, run_search
from scorers.confidence import ConfidenceScorer


def problems(k: int = 5) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"q{i}", answer=str(i), meta={"answers": [str(i), "x", "y", "z"]})
            for i in range(k)]


def test_picks_the_known_best_answer_and_keeps_order():
    probs = problems()
    results = best_of_n(probs, FakePolicy(), OracleScorer(), BestOfNConfig(n=16, seed=3))
    assert [r.problem.id for r in results] == [p.id for p in probs]
    for r in results:
        assert len(r.candidates) == 16
        assert r.chosen_text.endswith(f"Answer: {r.problem.answer}")  # 16 draws of 4: P(no hit) ~ 1%


def test_first_candidate_wins_ties():
    probs = [Problem(id="a", question="q", answer="none", meta={"answers": ["1"]})]
    (r,) = best_of_n(probs, FakePolicy(), OracleScorer(), BestOfNConfig(n=4))
    assert r.chosen == 0


def test_same_seed_same_result_different_seed_differs():
    probs = problems(8)
    a = best_of_n(probs, FakePolicy(), OracleScorer(), BestOfNConfig(n=8, seed=1))
    b = best_of_n(probs, FakePolicy(), OracleScorer(), BestOfNConfig(n=8, seed=1))
    c = best_of_n(probs, FakePolicy(), OracleScorer(), BestOfNConfig(n=8, seed=2))
    texts = lambda rs: [[c.text for c in r.candidates] for r in rs]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_one_batched_policy_call_for_all_problems():
    policy = FakePolicy()
    best_of_n(problems(7), policy, OracleScorer(), BestOfNConfig(n=3))
    assert policy.calls == [("rollout", 7, 3)]


def test_compute_counts_every_generated_token():
    # each candidate: step 1 "try j.\n\n" (len 8 or 9 chars -> as many fake tokens, forwarded 10)
    # and step 2 "</think>Answer: a" (forwarded 5)
    (r,) = best_of_n(problems(1), FakePolicy(num_parameters=1000), OracleScorer(tokens_per_step=7), BestOfNConfig(n=2))
    generated = sum(c.num_tokens for c in r.candidates)
    assert r.compute.tokens_generated == generated
    assert r.compute.tokens_forwarded == 2 * (10 + 5)
    assert r.compute.scorer_tokens == 7 * 4  # 2 candidates x 2 steps x 7
    assert r.compute.flops == 2 * 1000 * 30
    assert r.compute.policy_calls == 1
    assert r.compute.wall_time_s >= 0
    assert sum([r.compute, r.compute]) == r.compute + r.compute  # sum() starts from 0
    with pytest.raises(TypeError):
        1 + r.compute


def test_tree_has_one_chain_per_candidate():
    (r,) = best_of_n(problems(1), FakePolicy(), OracleScorer(), BestOfNConfig(n=5))
    assert len(r.tree) == 1 + 5 * 2
    assert len(r.tree.leaves()) == 5
    for c in r.candidates:
        assert r.tree.path(c.node_id) == c.steps
        assert r.tree.nodes[c.node_id].score == c.step_scores[-1]


def test_registry_runs_by_name_and_rejects_unknown_names():
    results = run_search("best_of_n", problems(2), FakePolicy(), ConfidenceScorer(), n=2)
    assert len(results) == 2 and results[0].strategy == "best_of_n"
    with pytest.raises(ValueError, match="unknown strategy 'beam'.*valid: beam_search, best_of_n, dvts, mcts, particle_filtering, rebase"):
        get_strategy("beam")


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_n_names_the_value(bad):
    with pytest.raises(ValueError, match=f"n={bad}"):
        BestOfNConfig(n=bad)


def test_bad_aggregation_lists_valid_names():
    with pytest.raises(ValueError, match="BestOfNConfig.aggregation: unknown aggregation 'median'; valid: geometric_mean, last, mean, min, product"):
        BestOfNConfig(aggregation="median")
