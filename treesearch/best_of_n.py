"""Best-of-N: sample N complete solutions per problem, score every step, return the best path.

One batched `policy.rollout` call serves all problems; one `scorer.score` call scores all
candidates. Ties go to the first candidate (as the reference's metric). A problem whose row of
completions is shorter than n (a policy may return fewer) has that many candidates; a rollout
that returns more or fewer rows than problems, or a scorer whose rows do not match the paths or
whose scores leave [0, 1], is refused with a ValueError (`treesearch.frontier`).

    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=32))
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from treesearch.aggregation import aggregate
from treesearch.compute import Compute, step_compute
from treesearch.config_checks import check_aggregation_setting, check_int, search_inputs
from treesearch.frontier import check_rows, checked_scores, scorer_cost
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Prefix, Problem, Step
from treesearch.result import Candidate, SearchResult, argmax_first
from treesearch.tree import Tree


@dataclass(frozen=True)
class BestOfNConfig:
    """n: candidates per problem (>= 1); aggregation: how step scores make a path score;
    seed: sampling seed for the policy call."""

    n: int = 8
    aggregation: str = "geometric_mean"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("BestOfNConfig", "n", self.n, minimum=1)
        check_aggregation_setting("BestOfNConfig", "aggregation", self.aggregation)
        check_int("BestOfNConfig", "seed", self.seed)


def best_of_n(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: BestOfNConfig,
    on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """Best-of-N over every problem at once (module docstring); on_round (`RoundHook`) is called
    once, with the finished trees: the search has one round."""
    problems = search_inputs("best_of_n", problems, cfg, BestOfNConfig, policy, scorer, on_round)
    start = time.perf_counter()
    rollouts = policy.rollout([Prefix(p) for p in problems], n=cfg.n, seed=cfg.seed)
    check_rows(rollouts, [cfg.n] * len(problems), "rollout", completions=True)
    by_problem = [[Prefix(p, tuple(r)) for r in rs] for p, rs in zip(problems, rollouts)]
    paths = [path for mine in by_problem for path in mine]
    flat_scores = checked_scores(paths, scorer.score(paths))
    wall = (time.perf_counter() - start) / max(len(problems), 1)
    results, first = [], 0
    for problem, mine in zip(problems, by_problem):  # rows may differ in length: slice by each
        scores = flat_scores[first : first + len(mine)]
        first += len(mine)
        results.append(_result(problem, mine, scores, policy, scorer, cfg, wall))
    if on_round is not None:
        on_round([r.tree for r in results])
    return results


def _result(
    problem: Problem,
    paths: list[Prefix],
    scores: list[list[float]],
    policy: Policy,
    scorer: Scorer,
    cfg: BestOfNConfig,
    wall: float,
) -> SearchResult:
    tree = Tree(problem)
    candidates = []
    for path, step_scores in zip(paths, scores):
        leaf = tree.add_path(path.steps, list(step_scores))
        score = aggregate(step_scores, cfg.aggregation)
        candidates.append(Candidate(path.steps, tuple(step_scores), score, leaf))
    steps: list[Step] = [s for p in paths for s in p.steps]
    compute = step_compute(steps, policy.num_parameters, scorer_cost(scorer, paths),
                           getattr(scorer, "num_parameters", 0))
    compute = compute + Compute(policy_calls=1, wall_time_s=wall)
    chosen = argmax_first([c.score for c in candidates])
    return SearchResult(problem, "best_of_n", asdict(cfg), tuple(candidates), chosen, tree, compute)
