"""DVTS on scripted step trees (tests/step_tree_fakes.py)."""
from __future__ import annotations

import json

import pytest

from step_tree_fakes import (
    EndlessPolicy, ScriptedPolicy, ScriptedScorer, TemperatureScriptedPolicy, scripted_problem, trap_problem,
)
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.dvts import DVTSConfig, dvts
from treesearch.frontier import round_seed
from treesearch.registry import run_search


def run(problems, cfg, policy=None, scorer=None):
    return dvts(problems, policy or ScriptedPolicy(), scorer or ScriptedScorer(), cfg)


def test_diverse_subtrees_escape_the_trap_one_beam_falls_into():
    # same budget (4 samples per round): one beam of width 4 keeps the greedy "a"; four
    # subtrees of width 1 start from the root samples a, b, a, b and two of them follow b.
    (beam,) = beam_search([trap_problem()], ScriptedPolicy(), ScriptedScorer(),
                          BeamSearchConfig(n=4, beam_width=4, max_depth=5))
    (d,) = run([trap_problem()], DVTSConfig(n=4, beam_width=1, max_depth=5))
    assert beam.chosen_text == "a/a2$"
    assert d.chosen_text == "b/b1$"
    assert [c.text for c in d.candidates] == ["a/a1$", "b/b1$", "a/a1$", "b/b1$"]


def test_each_subtree_is_greedy_and_keeps_its_terminal_children():
    # N=4, M=2: both subtrees get root samples {a, b} and follow a (0.9); a's children are both
    # terminal, so each subtree ends with a1$ and a2$ as candidates.
    (d,) = run([trap_problem()], DVTSConfig(n=4, beam_width=2, max_depth=5))
    assert [c.text for c in d.candidates] == ["a/a1$", "a/a2$", "a/a1$", "a/a2$"]
    assert d.chosen_text == "a/a2$"
    assert len(d.tree) == 1 + 4 + 2 * 2


def test_many_problems_one_call_per_round_order_kept():
    probs = [trap_problem(f"p{i}", swapped=i % 2 == 1) for i in range(5)]
    policy, scorer = ScriptedPolicy(), ScriptedScorer()
    results = run(probs, DVTSConfig(n=4, beam_width=1, max_depth=5, seed=3), policy, scorer)
    assert [r.problem.id for r in results] == [p.id for p in probs]
    assert all(r.chosen_text == "b/b1$" for r in results)
    # round 0: 5 roots x 4 samples; round 1: 5 problems x 4 subtrees x 1 sample
    assert policy.calls == [("propose", 5, 4, round_seed(3, 0)), ("propose", 20, 1, round_seed(3, 1))]
    assert scorer.calls == [20, 20]


def test_compute_matches_hand_counted_tokens():
    # N=4, M=1. round 0: a/ b/ a/ b/ = 8 tokens; round 1: a1$ b1$ a1$ b1$ = 12 tokens.
    # generated 20; forwarded 20 + 8 steps = 28; scorer 4 one-step + 4 two-step paths = 12 steps.
    (d,) = run([trap_problem()], DVTSConfig(n=4, beam_width=1, max_depth=5),
               ScriptedPolicy(num_parameters=50), ScriptedScorer(tokens_per_step=2))
    c = d.compute
    assert (c.tokens_generated, c.tokens_forwarded, c.scorer_tokens, c.policy_calls) == (20, 28, 24, 2)
    assert c.flops == 2 * 50 * 28


def test_same_seed_same_tree_other_seed_other_tree():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}" for y in "12"] for x in "abc"}}
    children.update({f"{x}/{x}{y}": [f"{x}{y}$", f"{x}{y}!$"] for x in "abc" for y in "12"})
    prob = scripted_problem("r", children, {})

    def tree(seed: int) -> str:
        cfg = DVTSConfig(n=6, beam_width=2, max_depth=4, seed=seed)
        return json.dumps(run([prob], cfg, ScriptedPolicy(random_draws=True))[0].tree.to_json())

    assert tree(5) == tree(5)
    assert tree(5) != tree(6)


def test_endless_policy_stops_at_max_depth_one_candidate_per_subtree():
    policy = EndlessPolicy(text="")
    (d,) = run([trap_problem()], DVTSConfig(n=4, beam_width=2, max_depth=3), policy)
    assert len(policy.calls) == 3
    assert len(d.candidates) == 2
    assert all(len(c.steps) == 3 and c.steps[-1].finish == "separator" for c in d.candidates)


def test_empty_rows_end_the_search():
    policy = EndlessPolicy(rows_empty=True)
    (d,) = run([trap_problem()], DVTSConfig(n=4, beam_width=2, max_depth=3), policy)
    assert d.candidates == () and d.chosen is None and len(policy.calls) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 4, "beam_width": 8}, "DVTSConfig.beam_width=8 must be <= n=4"),
    ({"n": 9, "beam_width": 2}, "DVTSConfig.n=9 must be divisible by beam_width=2"),
    ({"n": -1}, r"DVTSConfig.n=-1 must be an integer >= 1"),
    ({"max_depth": 0}, r"DVTSConfig.max_depth=0 must be an integer >= 1"),
    ({"aggregation": "median"}, "DVTSConfig.aggregation: unknown aggregation 'median'"),
    ({"lookahead": -2}, r"DVTSConfig.lookahead=-2 must be an integer >= 0"),
    ({"lookahead_temperature": -1.0}, r"DVTSConfig.lookahead_temperature=-1.0 must be a finite number >= 0"),
])
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DVTSConfig(**kwargs)


def test_lookahead_lets_a_subtree_see_past_the_greedy_first_step():
    # one subtree (N = M = 2): without lookahead it follows a (0.9 > 0.6) into a's bad leaves;
    # with one greedy lookahead step it ranks a/a1$ (sqrt(.9 x .1) = 0.30) under b/b1$ (0.755)
    policy = TemperatureScriptedPolicy()
    (plain,) = run([trap_problem()], DVTSConfig(n=2, beam_width=2, max_depth=5))
    (look,) = run([trap_problem()], DVTSConfig(n=2, beam_width=2, max_depth=5, lookahead=1), policy)
    assert plain.chosen_text == "a/a2$" and look.chosen_text == "b/b1$"
    assert policy.temperatures == [1.0, 0.0, 1.0]  # expansion, greedy lookahead, expansion
    # tokens: first steps a/ b/ (4), then a's leaves (6) without lookahead; with it the lookahead
    # steps a1$ b1$ (6) and b's leaves (6)
    assert (plain.compute.tokens_generated, look.compute.tokens_generated) == (4 + 6, 4 + 6 + 6)
    with pytest.raises(ValueError, match=r"DVTSConfig.lookahead_temperature=0.0 needs a policy with with_temperature"):
        run([trap_problem()], DVTSConfig(n=2, beam_width=2, max_depth=5, lookahead=1))


def test_registered_by_name():
    (r,) = run_search("dvts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=4, beam_width=1, max_depth=5)
    assert r.strategy == "dvts" and r.chosen_text == "b/b1$"
