"""MCTS and PUCT on scripted step trees (tests/step_tree_fakes.py).

The golden tree tests/golden/mcts_small_tree.json was written once from this implementation and
checked by hand (the arithmetic is in test_golden_small_tree). To rewrite it after an intended
change, check the new numbers the same way, then run:
    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_mcts.py -k golden
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dataclasses import dataclass, replace
from typing import Sequence

import pytest

from step_tree_fakes import (TRAP_CHILDREN, TRAP_SCORES, EndlessPolicy, ScriptedPolicy, ScriptedScorer,
                             scripted_problem, step_named, trap_problem)
from treesearch.frontier import round_seed
from treesearch.mcts import MCTSConfig, mcts
from treesearch.records import Prefix, Problem, Step
from treesearch.puct import puct_score, sibling_priors, step_prior_logit, with_virtual_loss
from treesearch.registry import run_search

GOLDEN = Path(__file__).parent / "golden" / "mcts_small_tree.json"


def run(problems, cfg, policy=None, scorer=None):
    return mcts(problems, policy or ScriptedPolicy(), scorer or ScriptedScorer(), cfg)


# --- PUCT, closed form ---------------------------------------------------------------------

def test_puct_score_closed_form():
    assert puct_score(0.5, 0.25, 4, 1, 2.0) == pytest.approx(1.0)  # 0.5 + 2*0.25*sqrt(4)/(1+1) = 0.5 + 0.5
    assert puct_score(0.0, 1.0, 9, 2, 1.0) == pytest.approx(1.0)   # 0 + 1*1*sqrt(9)/(1+2) = 3/3
    assert puct_score(0.7, 0.9, 0, 0, 5.0) == pytest.approx(0.7)   # no parent visits: no exploration


def test_puct_priors_softmax_of_per_token_mean_logprob():
    assert sibling_priors([0.0, math.log(3.0)]) == pytest.approx([0.25, 0.75])  # 1/(1+3), 3/(1+3)
    assert sibling_priors([1000.0, 1000.0]) == pytest.approx([0.5, 0.5])        # max-shifted: no overflow
    assert sibling_priors([]) == []
    short, long = step_named("x", -1.0), step_named("xyz", -1.0)  # 2 and 4 tokens at -1.0 each
    assert (step_prior_logit(short), step_prior_logit(long)) == (-1.0, -1.0)
    # the mean gives equal priors; a summed log-prob would give e^-2/(e^-2+e^-4) = 0.881 to the short one
    assert sibling_priors([step_prior_logit(short), step_prior_logit(long)]) == pytest.approx([0.5, 0.5])


def test_priors_of_steps_without_log_probs_are_uniform_and_a_nan_is_named():
    # all -inf (a policy reporting no log-probs) gave NaN priors: PUCT took the first child every
    # time and the search became one greedy chain, silently
    inf = math.inf
    assert sibling_priors([-inf, -inf, -inf]) == pytest.approx([1 / 3] * 3)
    assert sibling_priors([-inf, 0.0]) == pytest.approx([0.0, 1.0])
    for bad in ([math.nan, 0.0], [inf, 0.0]):
        with pytest.raises(ValueError, match="a step's token log-probs must be numbers <= 0"):
            sibling_priors(bad)


def test_puct_virtual_loss_closed_form():
    assert with_virtual_loss(0.8, 2, 1, 2.0) == pytest.approx((0.4, 4.0))  # N_eff = 2 + 2*1 = 4, Q_eff = 0.8*2/4
    assert with_virtual_loss(0.8, 2, 0, 2.0) == pytest.approx((0.8, 2.0))
    assert with_virtual_loss(0.0, 0, 0, 1.0) == (0.0, 0.0)


# --- search ----------------------------------------------------------------------------------

def test_trap_tree_by_hand():
    # Equal priors (0.5). Path values: a .9, b .6, a1$ .3, a2$ .42426, b1$ .75498, b2$ .42426.
    # round 0: the root is the only leaf; a and b are backed up: root N=2.
    # round 1: a: .9+1*.5*sqrt2/2 = 1.254 > b: .6+.354 = .954 -> a. With virtual loss on a
    #   (N_eff 2, Q_eff .45, parent N_eff 3): a .45+.5*sqrt3/3 = .739 < b .6+.5*sqrt3/2 = 1.033 -> b,
    #   so ONE propose call expands both. a: N3 Q(.9+.3+.42426)/3=.54142; b: N3 Q .59308; root N6.
    # round 2 (3 sims left): b .59308+.5*sqrt6/4=.899 > a .848 -> b -> b1$ 1.188 > b2$ .857 -> b1$;
    #   then a (.872 vs b .709) -> a2$ (.857 > a1$ .733); then b (.728 vs a .689) -> b2$
    #   (.924 > b1$ .711). Each closed leaf backs up its own value once more.
    policy = ScriptedPolicy()
    (r,) = run([trap_problem()], MCTSConfig(iterations=6, expand_width=2, leaves_per_round=4,
                                            c_puct=1.0, virtual_loss=1.0), policy)
    nodes = {("" if n.step is None else n.step.text): n for n in r.tree.nodes}
    assert {k: n.visits for k, n in nodes.items()} == {"": 9, "a/": 4, "b/": 5, "a1$": 1, "a2$": 2, "b1$": 2, "b2$": 2}
    assert nodes["a/"].value == pytest.approx((0.9 + 0.3 + 2 * 0.18 ** 0.5) / 4)
    assert nodes["b/"].value == pytest.approx((0.6 + 2 * 0.57 ** 0.5 + 2 * 0.18 ** 0.5) / 5)
    assert [c[:3] for c in policy.calls] == [("propose", 1, 2), ("propose", 2, 2)]
    # final by visits: a2$, b1$, b2$ tie at 2 visits; b1$ has the highest value
    assert r.chosen_text == "b/b1$"
    assert [c.text for c in r.candidates] == ["a/a1$", "a/a2$", "b/b1$", "b/b2$"]


def test_golden_small_tree():
    # Trap tree with priors: a/b logprobs -1.0/-0.5 -> softmax .37754/.62246; b1$/b2$ -0.2/-1.0
    # -> .68997/.31003. c_puct 1.5, 2 leaves per round, 8 simulations. Checked by hand:
    # r0 root. r1: a 1.300 > b 1.260 -> a; VL: a .777 < b 1.409 -> b. (a N3 .54142, b N3 .59308)
    # r2: b 1.165 -> b1$ 1.651 (closed); VL: b .939 > a .916 -> b1$ again -> stop (1 sim).
    # r3: same twice -> 1 sim (b1$). r4: b 1.098 -> b1$; VL: a .966 > b .948 -> a2$ (1.074 > .950).
    # r5: 1 sim left: b 1.096 -> b1$ 1.262. Visits: root 11, a 4, b 7, a1$ 1, a2$ 2, b1$ 5, b2$ 1;
    # b: (.6 + 4*.75498 + .42426)/7 = .68559; root: (.9+.3+2*.42426 + 4.79916)/11 = .62252.
    prob = scripted_problem("golden", TRAP_CHILDREN, TRAP_SCORES, {"a": -1.0, "b": -0.5, "b1$": -0.2})
    (r,) = run([prob], MCTSConfig(iterations=8, expand_width=2, leaves_per_round=2, c_puct=1.5, virtual_loss=1.0))
    got = _rounded(json.loads(json.dumps(r.tree.to_json())))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    assert [n["visits"] for n in got["nodes"]] == [11, 4, 7, 1, 2, 5, 1]
    assert r.chosen_text == "b/b1$"


def _rounded(x):
    """Floats to 9 decimals so the golden compare ignores last-bit differences between libms."""
    if isinstance(x, float):
        return round(x, 9)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def test_many_problems_one_policy_and_one_scorer_call_per_round_order_kept():
    probs = [trap_problem(f"p{i}", swapped=i % 2 == 1) for i in range(5)]
    policy, scorer = ScriptedPolicy(), ScriptedScorer()
    results = run(probs, MCTSConfig(iterations=6, expand_width=2, leaves_per_round=4, seed=4), policy, scorer)
    assert [r.problem.id for r in results] == [p.id for p in probs]
    assert all(r.chosen_text == "b/b1$" for r in results)
    # round 0: 5 roots; round 1: a and b of every problem; later rounds only revisit closed leaves
    assert policy.calls == [("propose", 5, 2, round_seed(4, 0)), ("propose", 10, 2, round_seed(4, 1))]
    assert scorer.calls == [10, 20]


def test_compute_matches_hand_counted_tokens():
    # round 0: a/ b/ (2+2 tokens); round 1: a1$ a2$ b1$ b2$ (4x3). generated 16, forwarded 16 + 6
    # steps = 22. scorer: 2 one-step paths + 4 two-step paths = 10 steps x 1 token.
    (r,) = run([trap_problem()], MCTSConfig(iterations=6, expand_width=2),
               ScriptedPolicy(num_parameters=100), ScriptedScorer(tokens_per_step=1))
    c = r.compute
    assert (c.tokens_generated, c.tokens_forwarded, c.scorer_tokens, c.policy_calls) == (16, 22, 10, 2)
    assert c.flops == 2 * 100 * 22


def test_rollout_values_new_nodes_by_a_completed_path():
    # rollouts follow the first child: a -> a/a1$ (value sqrt(.9*.1) = .3), b -> b/b1$ (.755), so
    # b is expanded first; the node keeps its own step score. Terminal children are not rolled out.
    policy = ScriptedPolicy()
    (r,) = run([trap_problem()], MCTSConfig(iterations=3, expand_width=2, rollout=True), policy)
    a, b = (r.tree.nodes[i] for i in r.tree.nodes[0].children)
    assert (a.score, b.score) == (0.9, 0.6)
    assert [c[:3] for c in policy.calls] == [("propose", 1, 2), ("rollout", 2, 1), ("propose", 2, 2)]
    assert r.tree.nodes[b.children[0]].id < r.tree.nodes[a.children[0]].id  # b expanded first
    assert r.chosen_text == "b/b1$"
    assert r.compute.tokens_generated == 4 + 6 + 12  # expansion, rollouts a1$ b1$, second expansion


def test_max_backup_and_final_by_value():
    (r,) = run([trap_problem()], MCTSConfig(iterations=6, expand_width=2, backup="max", final="value"))
    root, a, b = r.tree.nodes[0], *(r.tree.nodes[i] for i in r.tree.nodes[0].children)
    assert (root.value, a.value) == (0.9, 0.9)           # max over a's own .9 and its leaves
    assert b.value == pytest.approx(0.57 ** 0.5)          # b1$ .755 beats b's own .6
    assert r.chosen_text == "b/b1$"


def test_token_budget_stops_and_keeps_the_cut_leaves():
    # round 0 generates a/ and b/ = 4 tokens = the budget: no closed leaf yet, so the candidates
    # are the leaves cut by the budget; both have 1 visit, a has the higher value.
    policy = ScriptedPolicy()
    (r,) = run([trap_problem()], MCTSConfig(iterations=50, expand_width=2, token_budget=4), policy)
    assert len(policy.calls) == 1 and r.compute.tokens_generated == 4
    assert [c.text for c in r.candidates] == ["a/", "b/"] and r.chosen_text == "a/"


def test_a_token_budget_caps_the_leaves_a_round_may_expand():
    """Tokens left / the mean tokens of a leaf's expansion so far, at least 1, at most
    leaves_per_round: the last round of a compute-matched MCTS overshoots by about one leaf."""
    from treesearch.frontier import Ledger
    from treesearch.mcts import leaves_within_budget

    def ledger(step_tokens: list[int]) -> Ledger:
        out = Ledger()
        out.add_steps([Step("x", tuple(range(k)), tuple(-0.1 for _ in range(k)), "separator") for k in step_tokens])
        return out

    cfg = MCTSConfig(iterations=64, expand_width=2, leaves_per_round=4, token_budget=40)
    assert leaves_within_budget(Ledger(), 0, cfg) == 4  # nothing generated yet: no estimate, no cap
    assert leaves_within_budget(ledger([3, 3, 2, 2]), 2, cfg) == 4  # 30 left, 5 a leaf: 6 -> 4
    assert leaves_within_budget(ledger([3, 3, 3, 3, 3, 3, 2, 2, 2, 2]), 5, cfg) == 2  # 14 left, 5 a leaf
    assert leaves_within_budget(ledger([5] * 7), 3, cfg) == 1  # 5 left, 35 / 3 a leaf: still one
    assert leaves_within_budget(ledger([5] * 7), 3, MCTSConfig(leaves_per_round=4)) == 4  # no budget
    # with rollouts a leaf costs its children's steps and their rollouts: 2 leaves, 6 steps of 3 tokens
    assert leaves_within_budget(ledger([3] * 6), 2, MCTSConfig(leaves_per_round=8, token_budget=100)) == 8  # 82 / 9
    assert leaves_within_budget(ledger([3] * 6), 1, MCTSConfig(leaves_per_round=8, token_budget=100)) == 4  # 82 / 18


@dataclass
class RolloutHeavyPolicy:
    """Distinct 5-token steps, each rollout `rollout_steps` more: a leaf's expansion costs
    expand_width x 5 tokens and its children's rollouts expand_width x rollout_steps x 5."""

    rollout_steps: int = 10
    num_parameters: int = 10

    @staticmethod
    def _step(text: str, finish: str = "separator") -> Step:
        return Step(text, tuple(range(5)), tuple(-0.5 for _ in range(5)), finish, tokens_forwarded=5)

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        return [[self._step(f"{len(p.steps)}.{j}.{seed}") for j in range(n)] for p in prefixes]

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        last = self.rollout_steps - 1  # a rollout ends on a terminal step: here cut by the length limit
        return [[[self._step(f"r{k}", "length" if k == last else "separator") for k in range(self.rollout_steps)]
                 for _ in range(n)] for _ in prefixes]


class HalfScorer:
    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [[0.5] * len(p.steps) for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0


@pytest.mark.parametrize("rollout", [False, True])
def test_a_token_budget_overshoots_by_at_most_one_leaf_with_or_without_rollouts(rollout):
    cfg = MCTSConfig(iterations=1000, expand_width=2, leaves_per_round=16, token_budget=3000, rollout=rollout,
                     max_depth=40)
    (r,) = run([Problem("p", "q", "1")], cfg, RolloutHeavyPolicy(), HalfScorer())
    one_leaf = 2 * 5 + (2 * 10 * 5 if rollout else 0)
    assert 3000 <= r.compute.tokens_generated <= 3000 + one_leaf


def test_same_seed_same_tree_other_seed_other_tree():
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}" for y in "123"] for x in "abc"}}
    children.update({f"{x}/{x}{y}": [f"{x}{y}$", f"{x}{y}!$"] for x in "abc" for y in "123"})
    prob = scripted_problem("r", children, {"a": 0.3, "b2": 0.8, "c1!$": 0.9})

    def tree(seed: int) -> str:
        cfg = MCTSConfig(iterations=12, expand_width=3, leaves_per_round=3, seed=seed)
        return json.dumps(run([prob], cfg, ScriptedPolicy(random_draws=True))[0].tree.to_json())

    assert tree(1) == tree(1)
    assert tree(1) != tree(2)


def test_visit_counts_add_up_and_candidates_are_closed_leaves():
    # a node gets one visit when it is created and evaluated, and one per value backed up through
    # it; only leaves are ever re-selected, so an inner node's visits = 1 + its children's (the
    # root: just its children's).
    children = {"": ["a", "b", "c"], **{x: [f"{x}{y}" for y in "123"] for x in "abc"}}
    children.update({f"{x}/{x}{y}": [f"{x}{y}$", f"{x}{y}!$"] for x in "abc" for y in "123"})
    prob = scripted_problem("r", children, {"a": 0.3, "b2": 0.8, "c1!$": 0.9})
    (r,) = run([prob], MCTSConfig(iterations=20, expand_width=3, leaves_per_round=3),
               ScriptedPolicy(random_draws=True))
    for node in r.tree.nodes:
        if node.children:
            assert node.visits == (node.id != 0) + sum(r.tree.nodes[c].visits for c in node.children)
    assert r.candidates and all(r.tree.nodes[c.node_id].is_terminal for c in r.candidates)
    inner = sum(1 for n in r.tree.nodes[1:] if n.children)
    assert sum(n.visits for n in r.tree.nodes if not n.children) + inner == r.tree.nodes[0].visits


def test_identical_siblings_are_merged_but_paid_for():
    prob = scripted_problem("d", {"": ["x$", "x$", "y$"]}, {"y$": 0.8})
    (r,) = run([prob], MCTSConfig(iterations=4, expand_width=3))
    assert [r.tree.nodes[i].step.text for i in r.tree.nodes[0].children] == ["x$", "y$"]
    assert r.compute.tokens_generated == 6  # three 2-token steps generated
    assert r.chosen_text == "y$"


def test_endless_empty_steps_stop_at_max_depth_with_their_finish():
    policy = EndlessPolicy(text="")
    (r,) = run([trap_problem()], MCTSConfig(iterations=10, expand_width=3, max_depth=3), policy)
    assert len(policy.calls) == 3  # one merged child per expansion, closed at depth 3
    (cand,) = r.candidates
    assert len(cand.steps) == 3 and cand.steps[-1].finish == "separator"
    assert r.tree.nodes[0].visits == 10  # every simulation backed up exactly one value here


def test_length_cut_steps_and_empty_rows():
    (cut,) = run([trap_problem()], MCTSConfig(iterations=5, expand_width=2), EndlessPolicy("xx", "length"))
    assert [c.steps[-1].finish for c in cut.candidates] == ["length"]
    policy = EndlessPolicy(rows_empty=True)
    (none,) = run([trap_problem()], MCTSConfig(iterations=5, expand_width=2), policy)
    assert none.candidates == () and none.chosen is None and len(policy.calls) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, r"MCTSConfig.iterations=0 must be an integer >= 1"),
    ({"expand_width": 0}, r"MCTSConfig.expand_width=0 must be an integer >= 1"),
    ({"leaves_per_round": 0}, r"MCTSConfig.leaves_per_round=0 must be an integer >= 1"),
    ({"max_depth": 0}, r"MCTSConfig.max_depth=0 must be an integer >= 1"),
    ({"c_puct": -1.0}, r"MCTSConfig.c_puct=-1.0 must be a finite number >= 0"),
    ({"virtual_loss": -0.5}, r"MCTSConfig.virtual_loss=-0.5 must be a finite number >= 0"),
    ({"backup": "sum"}, "MCTSConfig.backup='sum'; valid: mean, max"),
    ({"final": "score"}, "MCTSConfig.final='score'; valid: visits, value"),
    ({"rollout": "yes"}, "MCTSConfig.rollout='yes' must be a bool"),
    ({"token_budget": 0}, r"MCTSConfig.token_budget=0 must be None or an integer >= 1"),
    ({"aggregation": "median"}, "MCTSConfig.aggregation: unknown aggregation 'median'"),
])
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MCTSConfig(**kwargs)


def test_registered_by_name():
    (r,) = run_search("mcts", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), iterations=6, expand_width=2)
    assert r.strategy == "mcts" and r.config["iterations"] == 6 and r.chosen_text == "b/b1$"


def test_leaves_cut_by_the_budget_are_completed_by_their_paid_for_rollouts():
    # round 0 expands the root into two open leaves and rolls each out (10 steps to a "length"
    # finish): the budget stops there; the candidates were the partial one-step paths (no answer
    # although two complete, scored rollouts had been generated and charged)
    cfg = MCTSConfig(iterations=50, expand_width=2, token_budget=10, rollout=True)
    (r,) = run([Problem("p", "q", "1")], cfg, RolloutHeavyPolicy(), HalfScorer())
    assert r.compute.tokens_generated == 2 * 5 + 2 * 10 * 5
    assert len(r.candidates) == 2 and all(len(c.steps) == 11 and c.steps[-1].is_terminal for c in r.candidates)
    assert all(c.step_scores == (0.5,) * 11 for c in r.candidates)
    first = r.tree.nodes[0].children[0]
    assert r.tree.path(r.candidates[0].node_id)[0] is r.tree.nodes[first].step  # grafted under its leaf
    assert r.chosen is not None and r.candidates[r.chosen].steps[-1].text == "r9"
    # leaves closed at max_depth were rolled out and charged too: answered by their rollouts
    (deep,) = run([Problem("p", "q", "1")], MCTSConfig(iterations=8, expand_width=2, max_depth=2, rollout=True),
                  RolloutHeavyPolicy(), HalfScorer())
    assert deep.candidates and all(c.steps[-1].is_terminal and len(c.steps) == 12 for c in deep.candidates)
    # without rollouts the open leaves stay the candidates
    (plain,) = run([Problem("p", "q", "1")], replace(cfg, rollout=False), RolloutHeavyPolicy(), HalfScorer())
    assert [len(c.steps) for c in plain.candidates] == [1, 1]
