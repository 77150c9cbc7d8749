"""REBASE on scripted step trees (tests/step_tree_fakes.py) and its width rounding."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from step_tree_fakes import (
    EndlessPolicy, ScriptedPolicy, ScriptedScorer, WidthScriptedPolicy, scripted_problem, trap_problem,
)
from treesearch.frontier import round_seed
from treesearch.rebase import RebaseConfig, balanced_widths, rebase
from treesearch.registry import run_search


def run(problems, cfg, policy=None, scorer=None):
    return rebase(problems, policy or ScriptedPolicy(), scorer or ScriptedScorer(), cfg)


# -- sharing the width --------------------------------------------------------------------------


def test_widths_by_hand():
    # equal rewards: an even split, the remainder to the earlier nodes
    assert balanced_widths([0.5, 0.5, 0.5, 0.5], 8, 0.2) == [2, 2, 2, 2]
    assert balanced_widths([0.5, 0.5, 0.5], 7, 0.2) == [3, 2, 2]
    # [0.9, 0.6] at T = 0.2: weights 1 and exp(-1.5) = 0.2231, quotas 4 x 1/1.2231 = 3.270 and
    # 0.730: floors 3 and 0, the one left goes to the larger fraction (0.730)
    assert balanced_widths([0.9, 0.6], 4, 0.2) == [3, 1]
    # a colder softmax gives the top node all of it: quotas 3.9999 and 1e-4
    assert balanced_widths([0.9, 0.6], 4, 0.03) == [4, 0]
    assert balanced_widths([], 4, 0.2) == []


@settings(max_examples=200, deadline=None)
@given(rewards=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), budget=st.integers(0, 64),
       temperature=st.floats(1e-3, 100.0))
def test_widths_sum_to_the_budget_and_follow_the_rewards(rewards, budget, temperature):
    widths = balanced_widths(rewards, budget, temperature)
    assert len(widths) == len(rewards) and sum(widths) == budget and min(widths) >= 0
    for i, j in ((i, j) for i in range(len(rewards)) for j in range(len(rewards))):
        if rewards[i] > rewards[j]:
            assert widths[i] >= widths[j]  # a better node never gets less


# -- the search ---------------------------------------------------------------------------------


def test_a_cold_share_prunes_the_trap_a_warm_one_keeps_exploring():
    # the root is sampled 4 times: a, b, a, b (rewards 0.9, 0.6, 0.9, 0.6). At T = 0.2 the
    # quotas are 1.635 / 0.365 / 1.635 / 0.365: widths 2, 0, 2, 0, b is pruned and only a's
    # leaves are found (best a/a2$: sqrt(.9 x .2) = 0.424). At T = 10 the weights are nearly equal:
    # widths 1, 1, 1, 1, and b's first child b1$ is the optimum (sqrt(.6 x .95) = 0.755).
    (cold,) = run([trap_problem()], RebaseConfig(n=4, balance_temperature=0.2, max_depth=5))
    (warm,) = run([trap_problem()], RebaseConfig(n=4, balance_temperature=10.0, max_depth=5))
    assert sorted(c.text for c in cold.candidates) == ["a/a1$", "a/a1$", "a/a2$", "a/a2$"]
    assert cold.chosen_text == "a/a2$"
    assert sorted(c.text for c in warm.candidates) == ["a/a1$", "a/a1$", "b/b1$", "b/b1$"]
    assert warm.chosen_text == "b/b1$"
    assert warm.candidates[warm.chosen].score == pytest.approx(math.sqrt(0.6 * 0.95))
    b = warm.tree.nodes[warm.tree.nodes[0].children[1]]
    assert b.step.text == "b/" and b.score == 0.6 and b.value == 0.6  # value: the node's reward


def test_finished_solutions_use_up_the_budget():
    # root: x$ (finished) and y, y, y -> budget 4 - 1 = 3 shared by the three y; each y has one
    # child y1$, so round 2 finishes 3 more: N = 4 candidates in all, 4 + 3 = 7 steps generated
    problem = scripted_problem("p", {"": ["x$", "y", "y", "y"], "y": ["y1$"]}, {"x$": 0.2, "y": 0.5, "y1$": 0.9})
    policy = ScriptedPolicy()
    (r,) = run([problem], RebaseConfig(n=4, max_depth=9, seed=3), policy)
    assert sorted(c.text for c in r.candidates) == ["x$", "y/y1$", "y/y1$", "y/y1$"]
    assert policy.calls == [("propose", 1, 4, round_seed(3, 0, 4)), ("propose", 3, 1, round_seed(3, 1, 1))]
    assert len(r.tree) == 1 + 4 + 3


def test_one_policy_call_per_width_one_scorer_call_per_round_order_kept():
    probs = [trap_problem(f"p{i}", swapped=i % 2 == 1) for i in range(4)]
    policy, scorer = ScriptedPolicy(), ScriptedScorer()
    results = run(probs, RebaseConfig(n=4, balance_temperature=0.2, max_depth=5, seed=7), policy, scorer)
    assert [r.problem.id for r in results] == [p.id for p in probs]
    # round 0: 4 roots x 4 samples; round 1: each problem's two copies of its greedy step at width 2
    # (the pruned ones cost nothing): one call of 8 prefixes, n = 2
    assert policy.calls == [("propose", 4, 4, round_seed(7, 0, 4)), ("propose", 8, 2, round_seed(7, 1, 2))]
    assert scorer.calls == [16, 16]
    assert all(r.compute.policy_calls == 2 and len(r.candidates) == 4 for r in results)


def test_nodes_of_several_widths_are_sampled_in_one_call_per_width():
    # the root's 6 samples are a, b, c, a, b, c (rewards .9, .6, .3) at T = 0.2: weights 1, .2231,
    # .0498 (each twice, total 2.5458), quotas 2.357, 0.526, 0.117 (twice): floors 2, 0, 0, 2, 0, 0
    # and the 2 left to the largest fractions (the b's): widths 2, 1, 0, 2, 1, 0, so round 1 makes
    # two calls, n = 1 (the b's) and n = 2 (the a's)
    problem = scripted_problem("p", {"": ["a", "b", "c"], "a": ["a1$"], "b": ["b1$"], "c": ["c1$"]},
                               {"a": 0.9, "b": 0.6, "c": 0.3})
    policy = ScriptedPolicy()
    (r,) = run([problem], RebaseConfig(n=6, max_depth=4), policy)
    assert balanced_widths([0.9, 0.6, 0.3, 0.9, 0.6, 0.3], 6, 0.2) == [2, 1, 0, 2, 1, 0]
    assert [call[1:3] for call in policy.calls] == [(1, 6), (2, 1), (2, 2)]
    assert sorted(c.text for c in r.candidates) == ["a/a1$"] * 4 + ["b/b1$"] * 2
    # the children join the tree in node order (a's, then b's, ...), not in call order
    first_a, first_b = r.tree.nodes[0].children[0], r.tree.nodes[0].children[1]
    assert [r.tree.nodes[c].step.text for c in r.tree.nodes[first_a].children] == ["a1$", "a1$"]
    assert [r.tree.nodes[c].step.text for c in r.tree.nodes[first_b].children] == ["b1$"]
    assert r.tree.nodes[first_a].children[0] < r.tree.nodes[first_b].children[0]


def test_a_width_policy_samples_a_round_of_several_widths_in_one_call():
    # the same search as above on a policy with propose_widths: round 1 is one call with the
    # widths of the nodes kept (2, 1, 2, 1), and the tree is the same
    problem = scripted_problem("p", {"": ["a", "b", "c"], "a": ["a1$"], "b": ["b1$"], "c": ["c1$"]},
                               {"a": 0.9, "b": 0.6, "c": 0.3})
    grouped, policy = ScriptedPolicy(), WidthScriptedPolicy()
    (expected,) = run([problem], RebaseConfig(n=6, max_depth=4, seed=2), grouped)
    (r,) = run([problem], RebaseConfig(n=6, max_depth=4, seed=2), policy)
    assert policy.calls == [("propose_widths", 1, (6,), round_seed(2, 0)), ("propose_widths", 4, (2, 1, 2, 1), round_seed(2, 1))]
    assert r.compute.policy_calls == 2 and expected.compute.policy_calls == 3
    assert [(n.parent, n.step.text) for n in r.tree.nodes[1:]] == [(n.parent, n.step.text) for n in expected.tree.nodes[1:]]
    assert r.chosen_text == expected.chosen_text and r.compute.tokens_generated == expected.compute.tokens_generated


def test_compute_matches_hand_counted_tokens():
    # N = 2, T = 10 on the trap: round 0 "a/" "b/" (2 + 2 tokens), round 1 widths 1, 1: "a1$" "b1$"
    # (3 + 3); generated 10, forwarded 10 + 1 per step = 14; scorer: 2 one-step + 2 two-step paths
    # = 6 steps x 3 tokens
    (r,) = run([trap_problem()], RebaseConfig(n=2, balance_temperature=10.0, max_depth=5),
               ScriptedPolicy(num_parameters=100), ScriptedScorer(tokens_per_step=3))
    c = r.compute
    assert (c.tokens_generated, c.tokens_forwarded, c.scorer_tokens, c.policy_calls) == (10, 14, 18, 2)
    assert c.flops == 2 * 100 * 14


def test_max_depth_cuts_the_unfinished_paths_into_candidates():
    policy = EndlessPolicy(text="go")
    (r,) = rebase([scripted_problem("p", {}, {})], policy, ScriptedScorer(), RebaseConfig(n=3, max_depth=2))
    assert len(policy.calls) == 2 and len(r.candidates) == 3
    assert all(len(c.steps) == 2 and c.steps[-1].finish == "separator" for c in r.candidates)


def test_a_policy_that_returns_nothing_ends_the_search_with_no_candidate():
    policy = EndlessPolicy(rows_empty=True)
    (r,) = rebase([scripted_problem("p", {}, {})], policy, ScriptedScorer(), RebaseConfig(n=3, max_depth=5))
    assert len(policy.calls) == 1 and r.candidates == () and r.chosen is None


def test_same_seed_same_tree_other_seed_other_tree():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}$" for y in "123"] for x in "abc"}}
    problem = scripted_problem("p", children, {"a": 0.5, "b": 0.6, "c": 0.4})

    def texts(seed):
        (r,) = run([problem], RebaseConfig(n=6, balance_temperature=1.0, seed=seed), ScriptedPolicy(random_draws=True))
        return [c.text for c in r.candidates]

    assert texts(1) == texts(1)
    assert any(texts(1) != texts(s) for s in (2, 3, 4))


def test_the_registry_runs_it_and_names_its_settings():
    (r,) = run_search("rebase", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=4, balance_temperature=10.0)
    assert r.strategy == "rebase" and r.chosen_text == "b/b1$"
    with pytest.raises(TypeError, match="rebase has no setting 'beam_width'; valid: n, balance_temperature"):
        run_search("rebase", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), beam_width=2)


@pytest.mark.parametrize("settings_, message", [
    ({"n": 0}, r"RebaseConfig.n=0 must be an integer >= 1"),
    ({"max_depth": 0}, r"RebaseConfig.max_depth=0 must be an integer >= 1"),
    ({"balance_temperature": 0.0}, r"RebaseConfig.balance_temperature=0.0 must be a finite number > 0"),
    ({"balance_temperature": math.nan}, r"RebaseConfig.balance_temperature=nan must be a finite number > 0"),
    ({"balance_temperature": "0.2"}, r"RebaseConfig.balance_temperature='0.2' must be a finite number > 0"),
    ({"reward": "best"}, r"RebaseConfig.reward: unknown aggregation 'best'"),
    ({"aggregation": "best"}, r"Config.aggregation: unknown aggregation 'best'"),
    ({"seed": "1"}, r"RebaseConfig.seed='1' must be an integer"),
])
def test_a_bad_setting_is_named(settings_, message):
    with pytest.raises(ValueError, match=message):
        RebaseConfig(**settings_)
