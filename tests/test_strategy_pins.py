"""Pins for strategy behaviours that a mutation review found unpinned elsewhere.

Scripted step trees only (tests/step_tree_fakes.py), no model: each test runs in milliseconds on
CPU. What is pinned: tree strategies honour `aggregation` (candidate scores) and `reward` (REBASE /
particle-filtering node values and widths); beam search stops at N candidates, does not refill
beams, repeats deduplicated beams up (ceil), breaks ties by generation order and returns beams in
generation order, dedups whole paths, keeps step_scores the length of the path under lookahead;
tree node scores match each candidate's step_scores (MCTS rollouts included); MCTS candidates are
the closed leaves when there are any; compute is attributed per problem (scorer tokens, wall time)
and an over-long policy row is refused; policy seeds within one search are distinct.

Run: `.venv/bin/python -m pytest tests/test_strategy_pins.py`
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from step_tree_fakes import ScriptedPolicy, ScriptedScorer, scripted_problem, step_named
from treesearch.aggregation import aggregate
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.dvts import DVTSConfig, dvts
from treesearch.mcts import MCTSConfig, mcts
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering
from treesearch.rebase import RebaseConfig, rebase


def node_scores(tree, node_id):
    """The scores of the nodes on the path root -> node_id (root excluded), in path order."""
    out = []
    while tree.nodes[node_id].parent is not None:
        out.append(tree.nodes[node_id].score)
        node_id = tree.nodes[node_id].parent
    return out[::-1]


def path_names(tree, node_id):
    """The step texts on the path root -> node_id, joined."""
    return "".join(s.text for s in tree.path(node_id))


# a two-step tree whose only answer scores (0.1, 0.9): min 0.1, geometric mean 0.3, last 0.9 (REBASE
# and particle filtering rank by `reward`, "last" by default: a candidate scored by it reads 0.9)
TWO_STEP = ({"": ["a"], "a": ["a1$"]}, {"a": 0.1, "a1$": 0.9})
# a three-step tree with a distinct score per depth
THREE_STEP = ({"": ["a", "b"], "a": ["a2"], "b": ["b2"], "a/a2": ["a3$"], "b/b2": ["b3$"]},
              {"a": 0.3, "b": 0.4, "a2": 0.7, "b2": 0.8, "a3$": 0.95, "b3$": 0.6})


def tree_runs(problem, aggregation="geometric_mean"):
    """(name, result) for every tree strategy on one problem (small configs)."""
    return [
        ("beam_search", beam_search([problem], ScriptedPolicy(), ScriptedScorer(),
                                    BeamSearchConfig(n=2, beam_width=1, max_depth=4, aggregation=aggregation))[0]),
        ("dvts", dvts([problem], ScriptedPolicy(), ScriptedScorer(),
                      DVTSConfig(n=2, beam_width=1, max_depth=4, aggregation=aggregation))[0]),
        ("rebase", rebase([problem], ScriptedPolicy(), ScriptedScorer(),
                          RebaseConfig(n=2, max_depth=4, aggregation=aggregation))[0]),
        ("particle_filtering", particle_filtering([problem], ScriptedPolicy(), ScriptedScorer(),
                                                  ParticleFilteringConfig(n=2, max_depth=4, aggregation=aggregation))[0]),
        ("mcts", mcts([problem], ScriptedPolicy(), ScriptedScorer(),
                      MCTSConfig(iterations=6, expand_width=2, aggregation=aggregation))[0]),
    ]


# -- 1. aggregation -------------------------------------------------------------------------------


def test_tree_strategies_score_candidates_by_the_configured_aggregation():
    problem = scripted_problem("agg", *TWO_STEP)
    for name, r in tree_runs(problem, aggregation="min"):
        assert r.candidates, name
        for c in r.candidates:
            assert c.step_scores == (0.1, 0.9), name
            # pins: a candidate's score is aggregation="min" of its step scores (not the default geometric mean)
            assert c.score == pytest.approx(min(c.step_scores)), name


# -- 2. reward ------------------------------------------------------------------------------------


def test_rebase_and_particle_filtering_node_values_follow_reward():
    problem = scripted_problem("rew", *THREE_STEP)
    runs = [("rebase", rebase([problem], ScriptedPolicy(), ScriptedScorer(),
                              RebaseConfig(n=2, max_depth=4, reward="min", balance_temperature=10.0))[0]),
            ("particle_filtering", particle_filtering([problem], ScriptedPolicy(), ScriptedScorer(),
                                                      ParticleFilteringConfig(n=2, max_depth=4, reward="min"))[0])]
    for name, r in runs:
        deep = [n for n in r.tree.nodes if n.depth >= 2]
        assert deep, name
        for n in r.tree.nodes:
            if n.step is not None:
                # pins: a grown node's value is reward="min" of its path's step scores (not its last score)
                assert n.value == pytest.approx(min(node_scores(r.tree, n.id))), (name, n.id)


def test_rebase_widths_follow_reward():
    # depth 1: a and b tie (0.5) and get one sample each; depth 2: a/a2 scores 0.6, b/b2 0.9. Under
    # reward="min" both depth-2 nodes have R = 0.5 (a tie: one sample each); under "last" b/b2 takes
    # the whole budget at T = 0.1 and a/a2 is pruned.
    children = {"": ["a", "b"], "a": ["a2"], "b": ["b2"], "a/a2": ["a3$"], "b/b2": ["b3$"]}
    problem = scripted_problem("widths", children, {"a": 0.5, "b": 0.5, "a2": 0.6, "b2": 0.9})
    widths = {}
    for reward in ("min", "last"):
        (r,) = rebase([problem], ScriptedPolicy(), ScriptedScorer(),
                      RebaseConfig(n=2, max_depth=4, reward=reward, balance_temperature=0.1))
        depth2 = {path_names(r.tree, n.id): len(n.children) for n in r.tree.nodes if n.depth == 2}
        widths[reward] = depth2
    # pins: REBASE shares the width by the configured reward
    assert widths["min"] == {"a/a2/": 1, "b/b2/": 1}
    assert widths["last"] == {"a/a2/": 0, "b/b2/": 2}


# -- 3. beam search stops at N and does not refill ------------------------------------------------


def test_beam_search_docstring_example_three_finish_at_the_root():
    # N = 4, M = 2: three root samples finish, the one beam left adds two (module docstring: 5)
    problem = scripted_problem("doc", {"": ["x1$", "x2$", "x3$", "y"], "y": ["y1$", "y2$"]}, {})
    policy = ScriptedPolicy()
    (r,) = beam_search([problem], policy, ScriptedScorer(), BeamSearchConfig(n=4, beam_width=2, max_depth=3))
    # pins: the docstring's candidate count
    assert len(r.candidates) == 5
    # pins: round 2 samples the one beam left M times (no refill to N/M beams)
    assert [c[:3] for c in policy.calls] == [("propose", 1, 4), ("propose", 1, 2)]


def test_beam_search_stops_at_exactly_n_candidates_with_beams_alive():
    # N = 4, M = 2: the root gives 2 answers and beams y, z; each beam adds one answer (4 = N) and
    # one open child: the search stops although beams are alive
    children = {"": ["x1$", "x2$", "y", "z"], "y": ["y1$", "y2"], "z": ["z1$", "z2"],
                "y/y2": ["y3$"], "z/z2": ["z3$"]}
    problem = scripted_problem("exact", children, {})
    policy = ScriptedPolicy()
    (r,) = beam_search([problem], policy, ScriptedScorer(), BeamSearchConfig(n=4, beam_width=2, max_depth=5))
    # pins: no third policy call once a problem has N candidates
    assert len(policy.calls) == 2
    assert len(r.candidates) == 4


def test_beam_search_dedup_repeats_distinct_beams_up_to_n_over_m():
    # n = 6, M = 2: 3 beams; the root's 6 samples are a, b, a, b, a, b (2 distinct texts)
    problem = scripted_problem("ceil", {"": ["a", "b"], "a": ["a1$"], "b": ["b1$"]}, {})
    policy = ScriptedPolicy()
    beam_search([problem], policy, ScriptedScorer(), BeamSearchConfig(n=6, beam_width=2, max_depth=3, dedup=True))
    # pins: the 2 distinct beams are repeated up to 3 (ceil), so round 2 sends 3 prefixes
    assert [c[:3] for c in policy.calls] == [("propose", 1, 6), ("propose", 3, 2)]


# -- 4. ties and beam order ----------------------------------------------------------------------


def test_beam_search_ties_go_to_the_earlier_child():
    children = {"": ["a", "b", "c", "d"], "a": ["a1$"], "b": ["b1$"], "c": ["c1$"], "d": ["d1$"]}
    problem = scripted_problem("tie", children, {})  # every step 0.5: all four root children tie
    (r,) = beam_search([problem], ScriptedPolicy(), ScriptedScorer(), BeamSearchConfig(n=4, beam_width=2, max_depth=3))
    # pins: of four tied children the two earliest-generated (a, b) become the beams
    assert [c.text for c in r.candidates] == ["a/a1$", "a/a1$", "b/b1$", "b/b1$"]


def test_beam_search_beams_come_back_in_generation_order():
    children = {"": ["a", "b", "c", "d"], "a": ["a1$"], "b": ["b1$"], "c": ["c1$"], "d": ["d1$"]}
    problem = scripted_problem("order", children, {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4})
    (r,) = beam_search([problem], ScriptedPolicy(), ScriptedScorer(), BeamSearchConfig(n=4, beam_width=2, max_depth=3))
    # pins: the kept beams d > c are expanded in generation order (c first), not rank order
    assert [c.text for c in r.candidates] == ["c/c1$", "c/c1$", "d/d1$", "d/d1$"]


# -- 5. dedup compares whole paths ---------------------------------------------------------------


def test_beam_search_dedup_keeps_different_paths_ending_in_the_same_step():
    # beams a and b both propose "S" (0.9): a/S and b/S are different paths and both stay
    children = {"": ["a", "b"], "a": ["S", "a2"], "b": ["S", "b2"],
                "a/S": ["e$"], "b/S": ["f$"], "a/a2": ["g$"], "b/b2": ["h$"]}
    problem = scripted_problem("dedup", children, {"S": 0.9, "a2": 0.1, "b2": 0.1})
    (r,) = beam_search([problem], ScriptedPolicy(), ScriptedScorer(),
                       BeamSearchConfig(n=4, beam_width=2, max_depth=4, dedup=True))
    # pins: dedup compares path texts, so b/S is not dropped as a duplicate of a/S
    assert sorted({c.text for c in r.candidates}) == ["a/S/e$", "b/S/f$"]


# -- 6. lookahead at max_depth -------------------------------------------------------------------


def test_lookahead_cut_candidates_keep_one_score_per_step():
    problem = scripted_problem("look", {"": ["a", "b"], "a": ["a1"], "b": ["b1"]},
                               {"a": 0.8, "b": 0.7, "a1": 0.2, "b1": 0.3})
    runs = [beam_search([problem], ScriptedPolicy(), ScriptedScorer(),
                        BeamSearchConfig(n=2, beam_width=2, max_depth=1, lookahead=1, lookahead_temperature=None))[0],
            dvts([problem], ScriptedPolicy(), ScriptedScorer(),
                 DVTSConfig(n=2, beam_width=2, max_depth=1, lookahead=1, lookahead_temperature=None))[0]]
    for r in runs:
        assert r.candidates
        for c in r.candidates:
            # pins: a candidate cut at max_depth has one step score per step (lookahead scores dropped)
            assert len(c.step_scores) == len(c.steps) == 1
            assert c.score == pytest.approx(aggregate(c.step_scores))


# -- 7. tree node scores match candidate step scores ---------------------------------------------


def test_tree_node_scores_match_candidate_step_scores_for_every_strategy():
    problem = scripted_problem("scores", *THREE_STEP)
    runs = tree_runs(problem) + [
        ("best_of_n", best_of_n([problem], ScriptedPolicy(), ScriptedScorer(), BestOfNConfig(n=2))[0])]
    for name, r in runs:
        assert any(len(c.steps) == 3 for c in r.candidates), name
        for c in r.candidates:
            # pins: each node on a candidate's path holds that step's own score
            assert node_scores(r.tree, c.node_id) == pytest.approx(list(c.step_scores)), name


def test_mcts_rollout_completion_nodes_hold_their_own_scores():
    # one simulation: the root's child a is rolled out (a2, a3$) and, open, becomes the candidate
    # completed by its rollout; the rollout's nodes must hold the rollout steps' scores
    problem = scripted_problem("roll", *THREE_STEP)
    (r,) = mcts([problem], ScriptedPolicy(), ScriptedScorer(),
                MCTSConfig(iterations=1, expand_width=1, leaves_per_round=1, rollout=True))
    (c,) = r.candidates
    assert c.text == "a/a2/a3$" and c.step_scores == (0.3, 0.7, 0.95)
    # pins: rollout nodes added under the leaf take the tail of the scored row
    assert node_scores(r.tree, c.node_id) == pytest.approx([0.3, 0.7, 0.95])


# -- 8. MCTS candidates ---------------------------------------------------------------------------


def test_mcts_candidates_are_the_closed_leaves_when_any():
    problem = scripted_problem("closed", {"": ["a$", "b"], "b": ["b1$"]}, {})
    (r,) = mcts([problem], ScriptedPolicy(), ScriptedScorer(), MCTSConfig(iterations=1, expand_width=2))
    # pins: the open leaf b is not a candidate while a closed leaf (a$) exists
    assert [c.text for c in r.candidates] == ["a$"]


# -- 9. compute per problem ----------------------------------------------------------------------


def all_strategies():
    return [
        ("best_of_n", best_of_n, BestOfNConfig(n=2)),
        ("beam_search", beam_search, BeamSearchConfig(n=2, beam_width=1, max_depth=4)),
        ("dvts", dvts, DVTSConfig(n=2, beam_width=1, max_depth=4)),
        ("rebase", rebase, RebaseConfig(n=2, max_depth=4)),
        ("particle_filtering", particle_filtering, ParticleFilteringConfig(n=2, max_depth=4)),
        ("mcts", mcts, MCTSConfig(iterations=6, expand_width=2)),
    ]


def test_scorer_tokens_are_charged_per_problem_in_a_batch():
    problems = [scripted_problem(f"p{i}", *THREE_STEP) for i in range(4)]
    scorer = ScriptedScorer(tokens_per_step=1)
    for name, fn, cfg in all_strategies():
        alone = [fn([p], ScriptedPolicy(), scorer, cfg)[0].compute.scorer_tokens for p in problems]
        batch = [r.compute.scorer_tokens for r in fn(problems, ScriptedPolicy(), scorer, cfg)]
        assert alone[0] > 0, name
        # pins: a problem's scorer tokens in a batch of 4 equal its single-problem run
        assert batch == alone, name


@dataclass
class SlowPolicy(ScriptedPolicy):
    """ScriptedPolicy whose every call sleeps, so a search's time is mostly policy time."""

    delay: float = 0.02

    def propose(self, prefixes, n, seed, stop_at_step=True):
        time.sleep(self.delay)
        return super().propose(prefixes, n, seed, stop_at_step)

    def rollout(self, prefixes, n, seed):
        time.sleep(self.delay)
        return super().rollout(prefixes, n, seed)


def test_wall_time_is_split_over_a_batchs_problems():
    problems = [scripted_problem(f"w{i}", *THREE_STEP) for i in range(4)]
    for name, fn, cfg in all_strategies():
        start = time.perf_counter()
        results = fn(problems, SlowPolicy(), ScriptedScorer(), cfg)
        elapsed = time.perf_counter() - start
        # pins: the problems' wall times add up to at most the call's elapsed time (split, not copied)
        assert sum(r.compute.wall_time_s for r in results) <= elapsed, name


@dataclass
class OneTooManyPolicy(ScriptedPolicy):
    """ScriptedPolicy whose propose returns n + 1 samples per prefix."""

    def propose(self, prefixes, n, seed, stop_at_step=True):
        self.calls.append(("propose", len(prefixes), n, seed))
        return [[step_named(f"s{j}") for j in range(n + 1)] for _ in prefixes]


def test_a_policy_returning_one_sample_too_many_is_refused():
    problem = scripted_problem("extra", *THREE_STEP)
    for name, fn, cfg in all_strategies()[1:]:  # best_of_n calls rollout, not propose
        # pins: n + 1 samples for a prefix asked for n is a ValueError, not silently taken
        with pytest.raises(ValueError, match=r"returned \d+ samples for prefix 0, asked for \d+"):
            fn([problem], OneTooManyPolicy(), ScriptedScorer(), cfg)


# -- 10. seeds -----------------------------------------------------------------------------------


def test_policy_seeds_within_one_search_are_distinct():
    problem = scripted_problem("seeds", *THREE_STEP)
    beam_policy = ScriptedPolicy()
    beam_search([problem], beam_policy, ScriptedScorer(),
                BeamSearchConfig(n=2, beam_width=2, max_depth=4, lookahead=1, lookahead_temperature=None))
    mcts_policy = ScriptedPolicy()
    mcts([problem], mcts_policy, ScriptedScorer(),
         MCTSConfig(iterations=4, expand_width=2, leaves_per_round=2, rollout=True))
    for policy in (beam_policy, mcts_policy):
        seeds = [call[3] for call in policy.calls]
        assert len(seeds) >= 3
        # pins: expansion, lookahead and rollout calls of one search never share a seed
        assert len(set(seeds)) == len(seeds), policy.calls
    assert any(call[0] == "rollout" for call in mcts_policy.calls)
