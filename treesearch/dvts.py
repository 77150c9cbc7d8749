"""DVTS, diverse verifier tree search (search-and-learn's `dvts`), batched across subtrees and
problems.

N candidates, width M: N/M independent subtrees per problem. The root is sampled N times and
sample j seeds subtree j // M, so the subtrees start from different first steps; every later
round samples M next steps for each subtree's path. Each subtree is greedy: it follows its best
child by aggregated path score (the earlier child on ties); when that child is terminal the
subtree is finished. Every terminal child (a subtree's best or not) is recorded as a candidate:
it is a finished solution already paid for (search-and-learn returns the M children of each
subtree's last round, finished or not, and drops the finished non-best children of earlier
rounds). At
max_depth each unfinished subtree's best child becomes a candidate as it stands.

lookahead k (search-and-learn's, default 0): each unfinished child is ranked by its path
extended by up to k more steps, greedy by default (lookahead_temperature, as beam search's
lookahead); the lookahead steps are counted in compute but are not tree nodes. The last round
(max_depth) has none, as search-and-learn's last iteration.

Batching: each round sends the paths of all subtrees of ALL problems to `policy.propose` in one
call and all new paths to `scorer.score` in one call (`beam_search.expand_beams`).

    results = dvts(problems, policy, scorer, DVTSConfig(n=16, beam_width=4, max_depth=20))

Tests: `.venv/bin/pytest tests/test_dvts.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from treesearch.beam_search import (
    Beam, ScoredChild, check_beam_shape, check_lookahead, expand_beams, lookahead_policy_of, top_by_rank,
)
from treesearch.config_checks import check_aggregation_setting, check_int, search_inputs
from treesearch.frontier import Ledger, make_candidate, ranked_results
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult
from treesearch.tree import ROOT_ID, Tree


@dataclass(frozen=True)
class DVTSConfig:
    """n: total samples per round per problem (N); beam_width: samples per subtree per round (M),
    so N/M subtrees; max_depth: most steps in a path; aggregation: step scores -> path score;
    lookahead: extra steps sampled to rank a child; lookahead_temperature: their sampling
    temperature (0: greedy; None: the policy's own); seed: base of the per-round policy seeds."""

    n: int = 8
    beam_width: int = 4
    max_depth: int = 40
    aggregation: str = "geometric_mean"
    lookahead: int = 0
    lookahead_temperature: float | None = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_beam_shape("DVTSConfig", self.n, self.beam_width, self.max_depth)
        check_aggregation_setting("DVTSConfig", "aggregation", self.aggregation)
        check_lookahead("DVTSConfig", self.lookahead, self.lookahead_temperature)
        check_int("DVTSConfig", "seed", self.seed)


def _group_by_subtree(
    children: list[ScoredChild], beams: Sequence[Beam], beam_width: int, first_round: bool
) -> dict[tuple[int, int], list[ScoredChild]]:
    """Children keyed by (problem, subtree), in generation order."""
    groups: dict[tuple[int, int], list[ScoredChild]] = {}
    for child in children:
        subtree = child.sample // beam_width if first_round else beams[child.beam].subtree
        groups.setdefault((child.problem, subtree), []).append(child)
    return groups


def _advance_subtrees(
    groups: dict[tuple[int, int], list[ScoredChild]], trees: list[Tree],
    candidates: list[list[Candidate]], cfg: DVTSConfig, last_round: bool,
) -> list[Beam]:
    """Terminal children -> candidates; each subtree follows its best child, unless that child
    is terminal (subtree finished) or this is the last round (the child is a cut candidate)."""
    beams = []
    for (problem, subtree), kids in groups.items():
        tree = trees[problem]
        candidates[problem].extend(
            make_candidate(tree, c.node, c.step_scores, cfg.aggregation) for c in kids if c.terminal)
        (best,) = top_by_rank(kids, 1)
        if best.terminal:
            continue
        if last_round:
            candidates[problem].append(make_candidate(tree, best.node, best.step_scores, cfg.aggregation))
        else:
            beams.append(Beam(problem, best.node, subtree))
    return beams


def dvts(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: DVTSConfig, on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """DVTS over every problem at once (module docstring); on_round: see `RoundHook`."""
    problems = search_inputs("dvts", problems, cfg, DVTSConfig, policy, scorer, on_round)
    start = time.perf_counter()
    trees = [Tree(p) for p in problems]
    ledgers = [Ledger() for _ in problems]
    candidates: list[list[Candidate]] = [[] for _ in problems]
    beams = [Beam(i, ROOT_ID) for i in range(len(problems))]
    lookahead_policy = lookahead_policy_of(policy, "DVTSConfig", cfg.lookahead, cfg.lookahead_temperature)
    for depth in range(1, cfg.max_depth + 1):
        if not beams:
            break
        first = depth == 1
        # the root is sampled N times once (not N/M times M), so the subtrees' first steps are N
        # distinct samples even for a policy whose draws depend only on (prefix, seed, index)
        children = expand_beams(beams, trees, policy, scorer, ledgers, n=cfg.n if first else cfg.beam_width,
                                lookahead=cfg.lookahead if depth < cfg.max_depth else 0,  # as search-and-learn
                                aggregation=cfg.aggregation, seed=cfg.seed, round_index=depth - 1,
                                lookahead_policy=lookahead_policy)
        groups = _group_by_subtree(children, beams, cfg.beam_width, first)
        beams = _advance_subtrees(groups, trees, candidates, cfg, last_round=depth == cfg.max_depth)
        if on_round is not None:
            on_round(trees)
    return ranked_results("dvts", problems, cfg, trees, candidates, ledgers, policy, scorer, start)
