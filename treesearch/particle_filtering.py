"""Particle filtering over reasoning steps (after Puri et al., "A Probabilistic Inference Approach
to Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods", arXiv 2502.01618,
Algorithm 1), batched across problems.

N particles per problem, each a path. The root is sampled N times; then, every round, each
particle's reward R (the `reward` aggregation of its step scores: "last", its last step's score,
by default) gives it the weight softmax(logit(R) / T) over the problem's N particles
(`weighting="logit"`, as the authors' code weighs the PRM's score: log R - log(1 - R), R clipped
to [eps, 1 - eps]; `weighting="score"`: softmax(R / T)), N particles are
drawn with replacement by those weights (multinomial resampling, a seeded RNG per problem and
round), and every drawn particle that is not finished takes one more step. A particle drawn k
times is sampled k times in one row of k samples, so its copies continue differently. Finished
particles (finish "eos" or "length") stay in the population and are drawn like the others, but
do not grow; a problem ends when every particle is finished, or at max_depth, where the particles
stand as they are. Unlike beam search, REBASE or DVTS, nothing is pruned for good by a ranking:
a particle with a low reward may still be drawn, which is the method's point (imperfect reward
models prune good paths early).

Candidates: the final population, N paths with repeats, resampled once more by the weights of
the last round's scores (as the authors' code resamples after every step, the last included: a
particle finished in the last round, or every particle finished at the root, had been counted
once whatever its score, so a vote over a low-scored majority outvoted the filter's choice); a
path drawn k times is k candidates, so majority votes over them are the filter's estimate. The
chosen one has the highest aggregated path score (`aggregation`, the geometric mean of its step
scores by default: MetaStone-S1's path score) among them; the authors' argmax picks the particle
of the largest resampling weight, which `aggregation` equal to `reward` ("last" both) gives.
Finished paths that were not drawn again are paid for
(compute) but are not candidates.

T: the resampling temperature (1 in the authors' code). With logit weights a particle scored 0.9
is 9 times as likely as one scored 0.5 at T = 1, and 0 / 1 scores (a verifier) all but rule the
0s out; with score weights T = 1 is gentle (the best particle at most e times as likely as the
worst). A lower T follows the scorer more closely (T -> 0: every draw the best particle), a
higher one resamples almost uniformly.

Batching: a round's particles of ALL problems go to the policy in one `propose_widths` call, k
samples for a particle drawn k times (a `WidthPolicy`: the three backends), or to
`policy.propose` grouped by how many times each was drawn, one call per distinct count; all new
paths go to `scorer.score` in one call.

    results = particle_filtering(problems, policy, scorer, ParticleFilteringConfig(n=16))

Tests: `.venv/bin/pytest tests/test_particle_filtering.py`.
"""
from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from treesearch.config_checks import check_aggregation_setting, check_int, check_positive, search_inputs
from treesearch.frontier import Child, Expansion, Ledger, grow_nodes, make_candidate, ranked_results
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult
from treesearch.tree import ROOT_ID, Tree


WEIGHTINGS: tuple[str, ...] = ("logit", "score")
EPS = 1e-7  # the clip of a reward before its logit (the authors' _inv_sigmoid: np.clip(x, 1e-7, 1 - 1e-7))


@dataclass(frozen=True)
class ParticleFilteringConfig:
    """n: particles per problem (N); temperature: T of the softmax that weighs the particles
    (> 0); weighting: what the softmax reads, "logit" (logit(R)) or "score" (R); max_depth: most
    steps in a path; reward: step scores -> a particle's reward R (an aggregation; "last": its
    last step's score); aggregation: step scores -> the path score that chooses among the final
    particles; seed: base of the policy seeds and of the resampling."""

    n: int = 8
    temperature: float = 1.0
    weighting: str = "logit"
    max_depth: int = 40
    reward: str = "last"
    aggregation: str = "geometric_mean"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("ParticleFilteringConfig", "n", self.n, minimum=1)
        check_positive("ParticleFilteringConfig", "temperature", self.temperature)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"ParticleFilteringConfig.weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        check_int("ParticleFilteringConfig", "max_depth", self.max_depth, minimum=1)
        check_aggregation_setting("ParticleFilteringConfig", "reward", self.reward)
        check_aggregation_setting("ParticleFilteringConfig", "aggregation", self.aggregation)
        check_int("ParticleFilteringConfig", "seed", self.seed)


def weight_logit(reward: float, weighting: str) -> float:
    """What the resampling softmax reads for a reward: logit(reward) (clipped to [eps, 1 - eps],
    so 0 and 1 stay finite) for "logit", the reward itself for "score"."""
    if weighting == "score":
        return reward
    r = min(max(reward, EPS), 1.0 - EPS)
    return math.log(r) - math.log1p(-r)


def resample(particles: Sequence[Child], temperature: float, rng: random.Random, weighting: str = "logit") -> list[int]:
    """len(particles) indices drawn with replacement, index i with probability
    softmax(weight_logit(reward) / temperature)_i; sorted, so the new population keeps the old order."""
    logits = [weight_logit(p.reward, weighting) for p in particles]
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]  # the top one is 1
    return sorted(rng.choices(range(len(particles)), weights=weights, k=len(particles)))


def resampling_rng(seed: int, problem: Problem, round_index: int | str) -> random.Random:
    """The RNG of one problem's resampling in one round ("final": the last resample): the same
    draws whatever else is searched."""
    return random.Random(f"{seed}|{problem.id}|{round_index}")


def step_populations(
    populations: list[list[Child]], problems: Sequence[Problem], trees: list[Tree], policy: Policy,
    scorer: Scorer, ledgers: list[Ledger], cfg: ParticleFilteringConfig, round_index: int,
) -> list[list[Child]]:
    """One round: resample every unfinished problem's population, grow each unfinished particle
    drawn k times by k samples of one step (`frontier.grow_nodes`); finished draws stay as they
    are, in the population's order. A problem whose particles are all finished is left as it is."""
    drawn: list[Expansion] = []  # the unfinished draws, each as wide as the times it was drawn
    plans: list[list[tuple[Child, int] | int]] = []  # per problem: (finished particle, times drawn) or a draw's entry
    for problem, population in enumerate(populations):
        plan: list[tuple[Child, int] | int] = []
        if all(p.terminal for p in population):
            plan = [(p, 1) for p in population]
        else:
            rng = resampling_rng(cfg.seed, problems[problem], round_index)
            picks = Counter(resample(population, cfg.temperature, rng, cfg.weighting))
            for index, count in sorted(picks.items()):
                if population[index].terminal:
                    plan.append((population[index], count))
                else:
                    plan.append(len(drawn))
                    drawn.append(Expansion(problem, population[index].node, count))
        plans.append(plan)
    grown = grow_nodes(drawn, trees, policy, scorer, ledgers, cfg.seed, round_index, cfg.reward)
    return [[p for entry in plan for p in ([entry[0]] * entry[1] if isinstance(entry, tuple) else grown[entry])]
            for plan in plans]


def final_population(population: list[Child], problem: Problem, cfg: ParticleFilteringConfig) -> list[Child]:
    """The population resampled by the weights of its last scores (module docstring), in order
    (an empty one, from a policy that returned nothing, stays empty). Its RNG is the problem's
    own "final" one: the rounds a batch runs depend on its other problems, a problem's draws not."""
    if not population:
        return population
    rng = resampling_rng(cfg.seed, problem, "final")
    return [population[i] for i in resample(population, cfg.temperature, rng, cfg.weighting)]


def particle_filtering(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: ParticleFilteringConfig,
    on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """Particle filtering over every problem at once (module docstring); on_round: see `RoundHook`."""
    problems = search_inputs("particle_filtering", problems, cfg, ParticleFilteringConfig, policy, scorer, on_round)
    start = time.perf_counter()
    trees = [Tree(p) for p in problems]
    ledgers = [Ledger() for _ in problems]
    populations = grow_nodes([Expansion(i, ROOT_ID, cfg.n) for i in range(len(problems))], trees, policy, scorer,
                             ledgers, cfg.seed, 0, cfg.reward)
    if on_round is not None:
        on_round(trees)
    rounds = 1
    while rounds < cfg.max_depth and not all(p.terminal for population in populations for p in population):
        populations = step_populations(populations, problems, trees, policy, scorer, ledgers, cfg, rounds)
        rounds += 1
        if on_round is not None:
            on_round(trees)
    populations = [final_population(population, problem, cfg) for population, problem in zip(populations, problems)]
    candidates: list[list[Candidate]] = [
        [make_candidate(tree, p.node, p.step_scores, cfg.aggregation) for p in population]
        for tree, population in zip(trees, populations)
    ]
    return ranked_results("particle_filtering", problems, cfg, trees, candidates, ledgers, policy, scorer, start)
