"""The strategy registry: every strategy has the signature
`search(problems, policy, scorer, cfg) -> list[SearchResult]` and a config dataclass.

    spec = get_strategy("best_of_n")
    results = spec.fn(problems, policy, scorer, spec.config(n=16))
    # or: run_search("best_of_n", problems, policy, scorer, n=16)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.dvts import DVTSConfig, dvts
from treesearch.mcts import MCTSConfig, mcts
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.rebase import RebaseConfig, rebase
from treesearch.records import Problem
from treesearch.result import SearchResult

SearchFn = Callable[[Sequence[Problem], Policy, Scorer, Any], list[SearchResult]]


@dataclass(frozen=True)
class StrategySpec:
    """fn: the search function, fn(problems, policy, scorer, cfg, on_round=None); config: its
    config dataclass."""

    fn: SearchFn
    config: type


STRATEGIES: dict[str, StrategySpec] = {
    "best_of_n": StrategySpec(best_of_n, BestOfNConfig),
    "beam_search": StrategySpec(beam_search, BeamSearchConfig),
    "dvts": StrategySpec(dvts, DVTSConfig),
    "mcts": StrategySpec(mcts, MCTSConfig),
    "particle_filtering": StrategySpec(particle_filtering, ParticleFilteringConfig),
    "rebase": StrategySpec(rebase, RebaseConfig),
}


def get_strategy(name: str) -> StrategySpec:
    """The registered strategy, or a ValueError that lists the valid names."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def build_config(name: str, **cfg: Any) -> Any:
    """The config of strategy `name` from keyword arguments; a setting it does not have is a
    TypeError naming it and listing the strategy's settings (MCTS has `iterations`, not `n`)."""
    spec = get_strategy(name)
    valid = [f.name for f in fields(spec.config)]
    unknown = [key for key in cfg if key not in valid]
    if unknown:
        raise TypeError(f"{name} has no setting {unknown[0]!r}; valid: {', '.join(valid)}")
    return spec.config(**cfg)


def run_search(
    name: str, problems: Sequence[Problem], policy: Policy, scorer: Scorer, on_round: RoundHook | None = None,
    **cfg: Any,
) -> list[SearchResult]:
    """Build the strategy's config from keyword arguments (`build_config`) and run it; on_round:
    called after each round with every problem's tree (`treesearch.protocols.RoundHook`)."""
    return get_strategy(name).fn(problems, policy, scorer, build_config(name, **cfg), on_round=on_round)
