"""The strategy registry: every strategy has the signature
`search(problems, policy, scorer, cfg, on_round=None) -> list[SearchResult]` and a config
dataclass (`run_search` always passes on_round, the hook called after each round, or None).

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
    name: str, problems: Sequence[Problem], policy: Policy, scorer: Scorer, config: Any = None, *,
    on_round: RoundHook | None = None, **cfg: Any,
) -> list[SearchResult]:
    """Run the strategy with its config object (`config`, e.g. `BestOfNConfig(n=16)`, as the
    strategy's own `search(problems, policy, scorer, cfg, on_round=None)` takes it) or with one built from keyword
    arguments (`build_config`), not both; on_round (keyword only): called after each round with
    every problem's tree (`treesearch.protocols.RoundHook`). A config object given where a hook was
    expected ran the default config and failed at the first round end."""
    if config is not None and cfg:
        raise TypeError(f"run_search({name!r}, ...) takes the strategy's config object or its settings as keywords, "
                        f"not both (got {type(config).__name__} and {', '.join(cfg)})")
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be callable (a RoundHook: trees -> None), not a {type(on_round).__name__}")
    built = build_config(name, **cfg) if config is None else config
    return get_strategy(name).fn(problems, policy, scorer, built, on_round=on_round)
