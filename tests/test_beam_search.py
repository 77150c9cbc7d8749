"""Step-level beam search on scripted step trees (tests/step_tree_fakes.py)."""
from __future__ import annotations

import json

import pytest

from step_tree_fakes import (
    EndlessPolicy, ScriptedPolicy, ScriptedScorer, TemperatureScriptedPolicy, scripted_problem, trap_problem,
)
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.frontier import round_seed
from treesearch.registry import run_search


def run(problems, cfg, policy=None, scorer=None):
    return beam_search(problems, policy or ScriptedPolicy(), scorer or ScriptedScorer(), cfg)


def test_duplicates_fall_into_the_trap_dedup_escapes_it():
    # the root is sampled 4 times: a, b, a, b. Keeping N/M = 2 beams without dedup keeps a and
    # its copy (0.9 > 0.6), so only a's leaves are found; with dedup the beams are a and b.
    (plain,) = run([trap_problem()], BeamSearchConfig(n=4, beam_width=2, max_depth=5))
    (dedup,) = run([trap_problem()], BeamSearchConfig(n=4, beam_width=2, max_depth=5, dedup=True))
    assert plain.chosen_text == "a/a2$"
    assert dedup.chosen_text == "b/b1$"
    assert [c.text for c in dedup.candidates] == ["a/a1$", "a/a2$", "b/b1$", "b/b2$"]
    assert dedup.candidates[dedup.chosen].score == pytest.approx((0.6 * 0.95) ** 0.5)


def test_lookahead_sees_past_the_greedy_first_step():
    # one beam (N=2, M=2). Without lookahead a (0.9) beats b (0.6). With one greedy lookahead
    # step (each child's first scripted child) the ranked paths are a/a1$: sqrt(.9*.1)=0.30 and
    # b/b1$: sqrt(.6*.95)=0.755, so b is kept.
    (greedy,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5))
    policy = TemperatureScriptedPolicy()
    (look,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5, lookahead=1), policy)
    assert greedy.chosen_text == "a/a2$"
    assert look.chosen_text == "b/b1$"
    a = look.tree.nodes[look.tree.nodes[0].children[0]]
    assert a.step.text == "a/" and a.score == 0.9 and a.value == pytest.approx(0.3)  # rank includes lookahead
    # the expansion samples at the policy's temperature, the lookahead greedily (search-and-learn's)
    assert policy.temperatures == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("search", ["beam_search", "dvts"])
def test_the_last_round_ranks_its_cut_paths_without_lookahead(search):
    # as search-and-learn's last iteration: the lookahead steps of a round cut at max_depth were
    # generated, charged (10 tokens, not 4) and ranked b/ (0.6, b1$ ahead) over a/ (0.9)
    from treesearch.dvts import DVTSConfig, dvts

    policy = TemperatureScriptedPolicy()
    if search == "dvts":
        (result,) = dvts([trap_problem()], policy, ScriptedScorer(), DVTSConfig(n=2, beam_width=2, max_depth=1, lookahead=1))
    else:
        (result,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=1, lookahead=1), policy)
    assert [(c.text, c.score) for c in result.candidates] == [("a/", 0.9)]
    assert result.compute.tokens_generated == 4 and len(policy.calls) == 1


def test_a_problem_its_finished_children_fill_gets_no_lookahead():
    # round 2: a's two finished children and b/b1$ bring the problem to 5 of N=4 candidates, so
    # b/b2 is dropped: its lookahead step (z$, 2 tokens) was generated and charged for nothing
    children = {"": ["a", "b", "c$", "d$"], "a": ["a1$", "a2$"], "b": ["b1$", "b2"], "b/b2": ["z$"]}
    problem = scripted_problem("p", children, {"a": .9, "b": .8, "c$": .5, "d$": .5})
    cfg = BeamSearchConfig(n=4, beam_width=2, max_depth=10)
    (plain,) = run([problem], cfg, TemperatureScriptedPolicy())
    policy = TemperatureScriptedPolicy()
    (look,) = run([problem], BeamSearchConfig(n=4, beam_width=2, max_depth=10, lookahead=1), policy)
    assert [c.text for c in look.candidates] == [c.text for c in plain.candidates] == ["c$", "d$", "a/a1$", "a/a2$", "b/b1$"]
    assert (plain.compute.tokens_generated, look.compute.tokens_generated) == (20, 26)  # round 1's a, b: +3 each
    assert [call[1:3] for call in policy.calls] == [(1, 4), (2, 1), (2, 2)]  # round 2 has no lookahead call


def test_lookahead_at_the_policys_own_temperature_or_another():
    # the root's children a, b each extended by 2 lookahead samples: at temperature 0 the first
    # child (a1$, b1$), at the policy's own temperature the sample index's (j = 0 here too);
    # a policy without with_temperature is refused unless lookahead_temperature is None
    cfg = BeamSearchConfig(n=2, beam_width=2, max_depth=5, lookahead=1, lookahead_temperature=None)
    policy = TemperatureScriptedPolicy(temperature=0.7)
    run([trap_problem()], cfg, policy)
    assert set(policy.temperatures) == {0.7}
    warm = TemperatureScriptedPolicy()
    run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5, lookahead=1, lookahead_temperature=0.5), warm)
    assert warm.temperatures == [1.0, 0.5, 1.0]
    (plain,) = run([trap_problem()], cfg, ScriptedPolicy())
    assert plain.chosen_text == "b/b1$"
    with pytest.raises(ValueError, match=r"lookahead_temperature=0.0 needs a policy with with_temperature.*ScriptedPolicy"
                                         r".*search.lookahead_temperature=null"):
        run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5, lookahead=1))
    # no lookahead: nothing to sample greedily, any policy
    (none,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5))
    assert none.chosen_text == "a/a2$"


def test_many_problems_one_policy_and_one_scorer_call_per_round_order_kept():
    probs = [trap_problem(f"p{i}", swapped=i % 2 == 1) for i in range(6)]
    policy, scorer = ScriptedPolicy(), ScriptedScorer()
    results = run(probs, BeamSearchConfig(n=4, beam_width=2, max_depth=5, dedup=True, seed=7), policy, scorer)
    assert [r.problem.id for r in results] == [p.id for p in probs]
    assert all(r.chosen_text == "b/b1$" for r in results)
    # round 0: 6 roots x 4 samples; round 1: 6 problems x 2 beams x 2 samples; then all finished
    assert policy.calls == [("propose", 6, 4, round_seed(7, 0)), ("propose", 12, 2, round_seed(7, 1))]
    assert scorer.calls == [24, 24]
    assert all(r.compute.policy_calls == 2 for r in results)


def test_compute_matches_hand_counted_tokens():
    # N=2, M=2, no lookahead. round 0: "a/" "b/" = 2+2 tokens; round 1 (beam a): "a1$" "a2$" = 3+3.
    # generated 10; forwarded = generated + 1 per step (4 steps) = 14; flops 2*100*14.
    # scorer: round 0 scores 2 one-step paths, round 1 two 2-step paths: 6 steps x 3 tokens.
    (r,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5),
               ScriptedPolicy(num_parameters=100), ScriptedScorer(tokens_per_step=3))
    c = r.compute
    assert (c.tokens_generated, c.tokens_forwarded, c.scorer_tokens, c.policy_calls) == (10, 14, 18, 2)
    assert c.flops == 2 * 100 * 14 and c.wall_time_s >= 0
    # with lookahead 1: + "a1$" "b1$" (lookahead, 6 tokens), round 1 expands b: "b1$" "b2$" (6).
    # generated 4+6+6 = 16, forwarded 16+6 = 22, 3 policy calls (expand, lookahead, expand);
    # scorer: round 0 two 2-step lookahead paths + round 1 two 2-step paths = 8 steps x 3.
    (r,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=2, max_depth=5, lookahead=1),
               TemperatureScriptedPolicy(num_parameters=100), ScriptedScorer(tokens_per_step=3))
    c = r.compute
    assert (c.tokens_generated, c.tokens_forwarded, c.scorer_tokens, c.policy_calls) == (16, 22, 24, 3)


def test_candidates_match_the_tree():
    (r,) = run([trap_problem()], BeamSearchConfig(n=4, beam_width=2, max_depth=5, dedup=True))
    assert len(r.tree) == 1 + 4 + 4  # 4 root samples (duplicates included) + 2 beams x 2
    for c in r.candidates:
        assert r.tree.path(c.node_id) == c.steps
        assert r.tree.nodes[c.node_id].score == c.step_scores[-1]
        assert len(c.step_scores) == len(c.steps)


def test_same_seed_same_tree_other_seed_other_tree():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}" for y in "123"] for x in "abc"}}
    children.update({f"{x}/{x}{y}": [f"{x}{y}$", f"{x}{y}!$"] for x in "abc" for y in "123"})
    prob = scripted_problem("r", children, {})

    def tree(seed: int) -> str:
        cfg = BeamSearchConfig(n=6, beam_width=3, max_depth=4, seed=seed)
        return json.dumps(run([prob], cfg, ScriptedPolicy(random_draws=True))[0].tree.to_json())

    assert tree(1) == tree(1)
    assert tree(1) != tree(2)


def test_stop_once_n_candidates_are_complete():
    # every root child is terminal: N candidates after round 0, no second call
    prob = scripted_problem("t", {"": ["x$", "y$"]}, {"x$": 0.2, "y$": 0.7})
    policy = ScriptedPolicy()
    (r,) = run([prob], BeamSearchConfig(n=4, beam_width=2, max_depth=9), policy)
    assert len(policy.calls) == 1 and len(r.candidates) == 4 and r.chosen_text == "y$"


def test_endless_empty_steps_stop_at_max_depth_with_their_finish():
    policy = EndlessPolicy(text="")
    (r,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=1, max_depth=3), policy)
    assert len(policy.calls) == 3
    assert len(r.candidates) == 2  # the N/M beams alive at max_depth
    assert all(len(c.steps) == 3 and c.steps[-1].finish == "separator" for c in r.candidates)
    assert r.chosen == 0 and r.compute.tokens_generated == 0


def test_length_cut_steps_are_candidates_and_empty_rows_end_the_search():
    (cut,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=1, max_depth=9), EndlessPolicy("xx", "length"))
    assert [c.steps[-1].finish for c in cut.candidates] == ["length", "length"]
    policy = EndlessPolicy(rows_empty=True)
    (none,) = run([trap_problem()], BeamSearchConfig(n=2, beam_width=1, max_depth=9), policy)
    assert none.candidates == () and none.chosen is None and len(policy.calls) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 4, "beam_width": 5}, r"beam_width=5 must be <= n=4 \(n is the budget N; in experiments.search: raise budget= or lower "),
    ({"n": 6, "beam_width": 4}, "n=6 must be divisible by beam_width=4"),
    ({"n": 0, "beam_width": 1}, r"n=0 must be an integer >= 1"),
    ({"max_depth": 0}, r"max_depth=0 must be an integer >= 1"),
    ({"lookahead": -1}, r"lookahead=-1 must be an integer >= 0"),
    ({"lookahead_temperature": -0.5}, r"lookahead_temperature=-0.5 must be a finite number >= 0"),
    ({"lookahead_temperature": float("nan")}, r"lookahead_temperature=nan must be a finite number"),
    ({"lookahead_temperature": "0"}, r"lookahead_temperature='0' must be a finite number"),
    ({"aggregation": "median"}, "BeamSearchConfig.aggregation: unknown aggregation 'median'"),
])
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchConfig(**kwargs)


def test_registered_by_name():
    (r,) = run_search("beam_search", [trap_problem()], ScriptedPolicy(), ScriptedScorer(),
                      n=4, beam_width=2, max_depth=5, dedup=True)
    assert r.strategy == "beam_search" and r.config["dedup"] is True and r.chosen_text == "b/b1$"


def test_dedup_repeats_the_distinct_beams_so_a_round_still_samples_n():
    # the root's 8 samples hold 2 distinct texts: dedup kept 2 beams of N/M = 4, the next round
    # sampled 4 paths, not 8 (search-and-learn repeats its active beams back up to N)
    children = {"": ["a", "a", "a", "b"] * 2, "a": ["a1", "a2"], "b": ["b1", "b2"], "a/a1": ["x$"], "a/a2": ["y$"],
                "b/b1": ["z$"], "b/b2": ["w$"]}
    for dedup in (False, True):
        policy = ScriptedPolicy()
        (r,) = beam_search([scripted_problem("p", children, {})], policy, ScriptedScorer(),
                           BeamSearchConfig(n=8, beam_width=2, dedup=dedup))
        assert [call[1] * call[2] for call in policy.calls] == [8, 8, 8], (dedup, policy.calls)
