"""REBASE, reward-balanced search (Wu et al., "Inference Scaling Laws: An Empirical Analysis of
Compute-Optimal Inference for Problem-Solving with Language Models", arXiv 2408.00724),
batched across problems.

N solutions per problem, a width budget B = N minus the solutions finished so far. The root is
sampled N times; each later round gives every unfinished node of the last depth a share of B by
the softmax of its reward R over the balance temperature T:

    W_j = B x exp(R_j / T) / sum_k exp(R_k / T)        (rounded so that the W_j sum to B)

and samples node j W_j times; a node whose share rounds to 0 is pruned. A child whose step is
terminal (finish "eos" or "length") is a candidate and lowers B by one; a problem stops at N
candidates (B = 0), when no node is left, or at max_depth, where the unfinished children of the
last round become candidates as they stand. R_j is the `reward` aggregation of node j's path
scores: "last", the node's own step score (the paper's PRM reward of the node), by default. A low
T spends the budget on the best nodes (T -> 0: all of B on the top node), a high T spreads it
evenly (T -> inf: sampling each node alike, Best-of-N-like).

The chosen candidate has the highest aggregated path score (`aggregation`), as in the other
strategies; the paper's weighted majority over the candidates is computed post hoc from the
records (`experiments.metrics`).

Deviation: the paper rounds each W_j on its own, so a round may sample a few more or fewer paths
than B; here the shares are rounded by largest remainder (the floors, then one more for the
largest fractional parts, the earlier node on ties), so every round samples exactly B paths and
N solutions cost about what beam search's N paths cost.

Batching: a round's nodes of ALL problems go to the policy in one `propose_widths` call (a
`WidthPolicy`: the three backends), or to `policy.propose` grouped by width, one call per
distinct width (n = W), in increasing width; all new paths go to `scorer.score` in one call.
Children join the tree in node order whatever the grouping, so the tree does not depend on it.

Node fields set: score (the scorer's score of the node's step), value (its reward R).

    results = rebase(problems, policy, scorer, RebaseConfig(n=16, balance_temperature=0.2))

Tests: `.venv/bin/pytest tests/test_rebase.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

from treesearch.config_checks import check_aggregation_setting, check_int, check_positive, search_inputs
from treesearch.frontier import Child, Expansion, Ledger, grow_nodes, make_candidate, ranked_results
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult
from treesearch.tree import ROOT_ID, Tree


@dataclass(frozen=True)
class RebaseConfig:
    """n: solutions per problem (N, the width budget); balance_temperature: T of the softmax that
    shares the budget (> 0); max_depth: most steps in a path; reward: step scores -> a node's
    reward R (an aggregation; "last": its own step's score); aggregation: step scores -> the path
    score that chooses among the candidates; seed: base of the per-round policy seeds."""

    n: int = 8
    balance_temperature: float = 0.2
    max_depth: int = 40
    reward: str = "last"
    aggregation: str = "geometric_mean"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("RebaseConfig", "n", self.n, minimum=1)
        check_positive("RebaseConfig", "balance_temperature", self.balance_temperature)
        check_int("RebaseConfig", "max_depth", self.max_depth, minimum=1)
        check_aggregation_setting("RebaseConfig", "reward", self.reward)
        check_aggregation_setting("RebaseConfig", "aggregation", self.aggregation)
        check_int("RebaseConfig", "seed", self.seed)


def balanced_widths(rewards: Sequence[float], budget: int, temperature: float) -> list[int]:
    """The budget shared by softmax(rewards / temperature), rounded by largest remainder (the
    floors, then +1 for the largest fractional parts; on a tie the higher reward, then the
    earlier node): non-negative widths that sum to budget, a higher reward never getting less
    (none for no rewards)."""
    if not rewards:
        return []
    top = max(rewards)
    weights = [math.exp((r - top) / temperature) for r in rewards]  # <= 1; the top one is 1
    total = sum(weights)
    quotas = [budget * w / total for w in weights]
    widths = [math.floor(q) for q in quotas]
    # equal fractions (rewards closer than exp can tell apart): the higher reward, then the earlier node
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - widths[i]), -rewards[i], i))
    for i in by_remainder[: budget - sum(widths)]:
        widths[i] += 1
    return widths


def settle(
    children: Sequence[Child], trees: list[Tree], candidates: list[list[Candidate]], budgets: list[int],
    cfg: RebaseConfig, last_round: bool,
) -> list[Expansion]:
    """Terminal children -> candidates (each lowers its problem's budget); the budget left is
    shared among the unfinished children by their rewards (or, in the last round, those
    children -> candidates cut by max_depth). Returns the next round's expansions."""
    by_problem: dict[int, list[Child]] = {}
    for child in children:
        by_problem.setdefault(child.problem, []).append(child)
    expansions = []
    for problem, kids in by_problem.items():
        tree, mine = trees[problem], candidates[problem]
        finished = [c for c in kids if c.terminal]
        mine.extend(make_candidate(tree, c.node, c.step_scores, cfg.aggregation) for c in finished)
        budgets[problem] = max(budgets[problem] - len(finished), 0)
        alive = [c for c in kids if not c.terminal]
        if last_round:
            mine.extend(make_candidate(tree, c.node, c.step_scores, cfg.aggregation) for c in alive)
            continue
        widths = balanced_widths([c.reward for c in alive], budgets[problem], cfg.balance_temperature)
        expansions.extend(Expansion(problem, c.node, w) for c, w in zip(alive, widths) if w > 0)
    return expansions


def rebase(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: RebaseConfig, on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """REBASE over every problem at once (module docstring); on_round: see `RoundHook`."""
    problems = search_inputs("rebase", problems, cfg, RebaseConfig, policy, scorer, on_round)
    start = time.perf_counter()
    trees = [Tree(p) for p in problems]
    ledgers = [Ledger() for _ in problems]
    candidates: list[list[Candidate]] = [[] for _ in problems]
    budgets = [cfg.n for _ in problems]
    expansions = [Expansion(i, ROOT_ID, cfg.n) for i in range(len(problems))]
    for depth in range(1, cfg.max_depth + 1):
        if not expansions:
            break
        children = [c for kids in grow_nodes(expansions, trees, policy, scorer, ledgers, cfg.seed, depth - 1, cfg.reward)
                    for c in kids]
        expansions = settle(children, trees, candidates, budgets, cfg, last_round=depth == cfg.max_depth)
        if on_round is not None:
            on_round(trees)
    return ranked_results("rebase", problems, cfg, trees, candidates, ledgers, policy, scorer, start)
