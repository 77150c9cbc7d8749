"""Particle filtering on scripted step trees (tests/step_tree_fakes.py) and its resampling."""
from __future__ import annotations

import math
import random

import pytest

from step_tree_fakes import (
    EndlessPolicy, ScriptedPolicy, ScriptedScorer, WidthScriptedPolicy, scripted_problem, trap_problem,
)
from treesearch.frontier import round_seed
from treesearch.frontier import Child
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering, resample, weight_logit
from treesearch.registry import run_search


def run(problems, cfg, policy=None, scorer=None):
    return particle_filtering(problems, policy or ScriptedPolicy(), scorer or ScriptedScorer(), cfg)


def particles(rewards):
    return [Child(0, i, (r,), r, False) for i, r in enumerate(rewards)]


# -- resampling ---------------------------------------------------------------------------------


def test_score_weights_follow_the_softmax_of_the_rewards():
    # rewards 1 and 0 at T = 1: a reward-1 particle is drawn with probability e / (1 + e) = 0.731
    # per draw; 4000 draws (2000 particles of each) land within 0.02 of it at this seed
    population = particles([1.0, 0.0] * 2000)
    draws = resample(population, 1.0, random.Random(0), "score")
    share = sum(population[i].reward == 1.0 for i in draws) / len(draws)
    assert len(draws) == 4000 and draws == sorted(draws)
    assert share == pytest.approx(math.e / (1 + math.e), abs=0.02)
    # T -> 0: every draw the best particle; T large: both kinds alike
    assert set(resample(particles([0.2, 0.9, 0.5]), 1e-4, random.Random(1), "score")) == {1}
    cold = resample(population, 100.0, random.Random(2), "score")
    assert sum(population[i].reward == 1.0 for i in cold) / len(cold) == pytest.approx(0.5, abs=0.03)


def test_logit_weights_follow_the_softmax_of_the_rewards_logits():
    # the authors' weighting: softmax(logit(R) / T). R = sigmoid(1) = 0.731 against R = 0.5
    # (logits 1 and 0) at T = 1: drawn with probability e / (1 + e) = 0.731, like the score
    # weights of 1 and 0 above; at T = 2 the logits halve: sigmoid(0.5) = 0.622
    high = 1 / (1 + math.exp(-1))
    population = particles([high, 0.5] * 2000)
    for temperature, expected in ((1.0, math.e / (1 + math.e)), (2.0, 1 / (1 + math.exp(-0.5)))):
        draws = resample(population, temperature, random.Random(0))
        share = sum(population[i].reward == high for i in draws) / len(draws)
        assert share == pytest.approx(expected, abs=0.02)
    # 0 / 1 scores (a verifier) keep finite logits (+-16.1: clipped to 1e-7, as the authors' code;
    # the docstring said float eps) and all but rule the 0s out, where score weights would draw them 27% of the time
    assert weight_logit(1.0, "logit") == pytest.approx(-weight_logit(0.0, "logit")) == pytest.approx(16.12, abs=0.01)
    verified = particles([1.0, 0.0] * 2000)
    assert all(verified[i].reward == 1.0 for i in resample(verified, 1.0, random.Random(3)))
    assert weight_logit(0.25, "score") == 0.25 and weight_logit(0.25, "logit") == pytest.approx(math.log(1 / 3))


# -- the search ---------------------------------------------------------------------------------


def test_a_finished_particle_stays_and_is_drawn_like_the_others():
    # root: x$ (finished, 0.9) and y (0.1); at T = 0.01 both draws take x$, which does not grow:
    # the population is x$ twice, every particle is finished and no second policy call is made
    problem = scripted_problem("p", {"": ["x$", "y"], "y": ["y1$"]}, {"x$": 0.9, "y": 0.1, "y1$": 1.0})
    policy = ScriptedPolicy()
    (r,) = run([problem], ParticleFilteringConfig(n=2, temperature=0.01, seed=5), policy)
    assert [c.text for c in r.candidates] == ["x$", "x$"]
    assert r.candidates[0].node_id == r.candidates[1].node_id  # one path, drawn twice
    assert policy.calls == [("propose", 1, 2, round_seed(5, 0, 2))]


def test_a_particle_drawn_k_times_is_sampled_k_times_in_one_row():
    # the root's 4 samples are a, b, a, b; at T = 0.01 the 4 draws take the two a's only (equal
    # weights: how they split is the RNG's); each a is then one row of propose(n=times drawn),
    # one call per distinct count, and the 4 children are a's leaves
    policy = ScriptedPolicy()
    (r,) = run([trap_problem()], ParticleFilteringConfig(n=4, temperature=0.01, max_depth=5), policy)
    later = policy.calls[1:]
    assert sum(rows * n for _, rows, n, _ in later) == 4 and len({n for _, _, n, _ in later}) == len(later)
    assert len(r.candidates) == 4 and all(c.text.startswith("a/") for c in r.candidates)
    assert r.chosen_text == "a/a2$"  # one of the two a's was drawn twice or more: its second sample is a2$


def test_a_width_policy_grows_a_round_of_several_counts_in_one_call():
    # six particles over a 3-way tree at T = 1: draws of several counts in a round; a policy
    # with propose_widths makes one call per round whose widths sum to the particles grown
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}" for y in "12"] for x in "abc"},
                **{f"{x}/{x}{y}": ["e$"] for x in "abc" for y in "12"}}
    problem = scripted_problem("p", children, {"a": 0.9, "b": 0.5, "c": 0.1})
    policy = WidthScriptedPolicy()
    (r,) = run([problem], ParticleFilteringConfig(n=6, seed=4), policy)
    assert [call[0] for call in policy.calls] == ["propose_widths"] * 3
    assert [sum(call[2]) for call in policy.calls] == [6, 6, 6]
    assert any(len(set(call[2])) > 1 for call in policy.calls)  # a round of several counts
    assert r.compute.policy_calls == 3 and len(r.candidates) == 6 and all(c.text.endswith("e$") for c in r.candidates)


def test_a_warm_filter_keeps_the_low_reward_branch_alive():
    # at T = 100 the draws are nearly uniform, so over seeds b (0.6 < a's 0.9) survives the first
    # resampling and its leaf b1$, the optimum (sqrt(.6 x .95) = 0.755), is chosen at least once;
    # at T = 0.01 b never survives
    def chosen(temperature, seed):
        (r,) = run([trap_problem()], ParticleFilteringConfig(n=4, temperature=temperature, seed=seed))
        return r.chosen_text

    assert any(chosen(100.0, seed) == "b/b1$" for seed in range(6))
    assert all(chosen(0.01, seed) == "a/a2$" for seed in range(6))


def test_each_round_grows_at_most_n_particles_by_one_step():
    children = {"": ["a", "b"], "a": ["c", "d"], "b": ["c", "d"], "a/c": ["e$"], "a/d": ["e$"], "b/c": ["e$"],
                "b/d": ["e$"]}
    problem = scripted_problem("p", children, {})
    policy = ScriptedPolicy()
    (r,) = run([problem], ParticleFilteringConfig(n=6, seed=1), policy)
    rounds = {}
    for _, rows, n, seed in policy.calls:
        rounds[seed] = rounds.get(seed, 0) + rows * n
    assert len(r.candidates) == 6 and all(c.text.endswith("e$") for c in r.candidates)
    # a round's calls share nothing but their counts; in all: 6 first steps, 6 second, 6 third
    assert sum(rounds.values()) == 18 and r.compute.policy_calls == len(policy.calls)


def test_max_depth_leaves_the_particles_as_they_stand():
    policy = EndlessPolicy(text="go")
    (r,) = particle_filtering([scripted_problem("p", {}, {})], policy, ScriptedScorer(),
                              ParticleFilteringConfig(n=3, max_depth=2))
    assert len(r.candidates) == 3 and all(len(c.steps) == 2 and c.steps[-1].finish == "separator" for c in r.candidates)


def test_a_policy_that_returns_nothing_ends_the_search_with_no_candidate():
    policy = EndlessPolicy(rows_empty=True)
    (r,) = particle_filtering([scripted_problem("p", {}, {})], policy, ScriptedScorer(), ParticleFilteringConfig(n=3))
    assert len(policy.calls) == 1 and r.candidates == () and r.chosen is None


def test_a_problem_draws_the_same_alone_or_beside_others():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}$" for y in "123"] for x in "abc"}}
    probs = [scripted_problem(f"p{i}", children, {"a": 0.5, "b": 0.6, "c": 0.4}) for i in range(3)]
    cfg = ParticleFilteringConfig(n=6, seed=3)
    together = run(probs, cfg, ScriptedPolicy(random_draws=True))
    alone = [run([p], cfg, ScriptedPolicy(random_draws=True))[0] for p in probs]
    assert [[c.text for c in r.candidates] for r in together] == [[c.text for c in r.candidates] for r in alone]
    # a problem that finishes at the root beside one that runs on: its final resample is its own
    short = scripted_problem("short", {"": ["x$", "y$", "z$"]}, {"x$": 0.2, "y$": 0.5, "z$": 0.8})
    together = run([short, probs[0]], cfg, ScriptedPolicy(random_draws=True))
    alone = [run([p], cfg, ScriptedPolicy(random_draws=True))[0] for p in (short, probs[0])]
    assert [[c.text for c in r.candidates] for r in together] == [[c.text for c in r.candidates] for r in alone]


def test_same_seed_same_particles_other_seed_other_particles():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}$" for y in "123"] for x in "abc"}}
    problem = scripted_problem("p", children, {"a": 0.5, "b": 0.6, "c": 0.4})

    def texts(seed):
        (r,) = run([problem], ParticleFilteringConfig(n=6, seed=seed), ScriptedPolicy(random_draws=True))
        return [c.text for c in r.candidates]

    assert texts(1) == texts(1)
    assert any(texts(1) != texts(s) for s in (2, 3, 4))


def test_the_registry_runs_it_and_names_its_settings():
    (r,) = run_search("particle_filtering", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=4, temperature=0.01)
    assert r.strategy == "particle_filtering" and r.chosen_text == "a/a2$"
    with pytest.raises(TypeError, match="particle_filtering has no setting 'beam_width'; valid: n, temperature"):
        run_search("particle_filtering", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), beam_width=2)


@pytest.mark.parametrize("settings_, message", [
    ({"n": 0}, r"ParticleFilteringConfig.n=0 must be an integer >= 1"),
    ({"max_depth": 0}, r"ParticleFilteringConfig.max_depth=0 must be an integer >= 1"),
    ({"temperature": 0.0}, r"ParticleFilteringConfig.temperature=0.0 must be a finite number > 0"),
    ({"temperature": math.inf}, r"ParticleFilteringConfig.temperature=inf must be a finite number > 0"),
    ({"temperature": True}, r"ParticleFilteringConfig.temperature=True must be a finite number > 0"),
    ({"weighting": "softmax"}, r"ParticleFilteringConfig.weighting='softmax' must be one of logit, score"),
    ({"reward": "best"}, r"ParticleFilteringConfig.reward: unknown aggregation 'best'"),
    ({"aggregation": "best"}, r"Config.aggregation: unknown aggregation 'best'"),
    ({"seed": 1.5}, r"ParticleFilteringConfig.seed=1.5 must be an integer"),
])
def test_a_bad_setting_is_named(settings_, message):
    with pytest.raises(ValueError, match=message):
        ParticleFilteringConfig(**settings_)


def test_the_final_population_is_resampled_by_the_last_scores():
    # three of four root samples end badly (0.01) and one well (0.99): without the authors' last
    # resample the final population held each once, and its majority was "bad" in 190 of 200 seeds
    from collections import Counter

    children = {"": ["x1", "x2", "x3", "y"], "x1": ["bad$"], "x2": ["bad$"], "x3": ["bad$"], "y": ["good$"]}
    scores = {"x1": .5, "x2": .5, "x3": .5, "y": .5, "bad$": .01, "good$": .99}
    votes, chosen_good = Counter(), 0
    for seed in range(50):
        (r,) = particle_filtering([scripted_problem("p", children, scores)], WidthScriptedPolicy(), ScriptedScorer(),
                                  ParticleFilteringConfig(n=4, seed=seed))
        endings = [c.text.rsplit("/", 1)[-1] for c in r.candidates]
        assert len(endings) == 4 and r.chosen_text.endswith(Counter(endings).most_common(1)[0][0])
        votes[Counter(endings).most_common(1)[0][0]] += 1
        chosen_good += r.chosen_text.endswith("good$")
    assert votes["good$"] == chosen_good > 25  # the vote follows the filter's choice
