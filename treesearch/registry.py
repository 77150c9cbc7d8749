"""The strategy registry: every strategy has the signature
`search(problems, policy, scorer, cfg, on_round=None) -> list[SearchResult]` and a config
dataclass (`run_search` always passes on_round, the hook called after each round, or None).

    spec = get_strategy("best_of_n")
    results = spec.fn(problems, policy, scorer, spec.config(n=16))
    # or: run_search("best_of_n", problems, policy, scorer, n=16)

Adding a strategy: call `register(name, fn, config)` when your module is imported. The contract:
  - fn(problems, policy, scorer, cfg, on_round=None) returns a list of exactly one
    `SearchResult` per problem, in the problems' order; each result's `chosen` is None or an
    index of its candidates, each candidate's `score` a finite number; `strategy` is the
    registry name and `config` the config as a dict (`dataclasses.asdict(cfg)`);
    on_round, when given, is called with every problem's tree after each round;
  - config is a dataclass with a `seed` field (`experiments.search` sets each chunk's seed
    through it, `dataclasses.replace(cfg, seed=...)`) and, for `experiments.search` and its
    sweeps, the budget field `n` (the N a run is filed under; MCTS's `iterations` is the one
    other name, `experiments.sweep_metrics.BUDGET_FIELDS`); each strategy its own config class
    (`experiments.search` finds the strategy by its config's class).

    # mystrategy.py
    @dataclass(frozen=True)
    class ShortestConfig:
        n: int = 4
        seed: int = 0

    def shortest(problems, policy, scorer, cfg, on_round=None) -> list[SearchResult]: ...

    register("shortest", shortest, ShortestConfig)

    PYTHONPATH=<mystrategy.py's folder> python -m experiments.search search._target_=mystrategy.ShortestConfig \\
        '~search.aggregation'

(`~search.aggregation`: a setting of the default search=best_of_n that ShortestConfig lacks.)
`run_search` checks what fn returns (`treesearch.result_checks`: a ValueError naming the strategy
and the fault); experiments.search checks a strategy's config before the policy loads and what fn
returns before a row is written: a broken one is one `error:` line naming the strategy, nothing
written.

Tests: `.venv/bin/python -m pytest tests/test_library_api.py tests/test_library_result_checks.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Iterator, Sequence

from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.config_checks import check_round_hook, problem_list
from treesearch.dvts import DVTSConfig, dvts
from treesearch.mcts import MCTSConfig, mcts
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.rebase import RebaseConfig, rebase
from treesearch.records import Problem
from treesearch.result import SearchResult
from treesearch.result_checks import check_identity, check_results

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


def register(name: str, fn: SearchFn, config: type) -> StrategySpec:
    """Add strategy `name` (module docstring: the contract) and return its spec; registering the
    same fn and config again (a module imported twice) is a no-op, and an fn and config defined
    anew where the held ones were (the same module and qualified names: a notebook cell run
    again, a module reloaded) replace them. A ValueError names what is wrong: a name of another
    strategy, a config that is no dataclass or lacks `seed`, a config class registered under
    another name, an fn that is not callable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a strategy's name must be a non-empty str, not {name!r}")
    if not callable(fn):
        raise ValueError(f"strategy {name}: fn={fn!r:.80} is not callable")
    check_strategy_config(name, config)
    spec = StrategySpec(fn, config)
    if STRATEGIES.get(name, spec) != spec and not is_redefinition(STRATEGIES[name], spec):
        held = STRATEGIES[name]
        held_fn = getattr(held.fn, "__qualname__", repr(held.fn))  # a functools.partial has no name
        raise ValueError(f"strategy {name} is registered already (fn {held_fn:.80}, config "
                         f"{held.config.__qualname__}); pick another name")
    other = [key for key, entry in STRATEGIES.items() if entry.config is config and key != name]
    if other:
        raise ValueError(f"strategy {name}: config {config.__qualname__} is strategy {other[0]}'s already; give each "
                         "strategy a config class of its own (experiments.search finds a strategy by its config's class)")
    STRATEGIES[name] = spec
    return spec


def is_redefinition(held: StrategySpec, new: StrategySpec) -> bool:
    """Whether new's fn and config are defined where held's were: each pair has one module and one
    qualified name (a cell run again makes new function and class objects of the same names). An
    object without a qualified name (a functools.partial) is no redefinition of anything."""
    return all(_definition(old) is not None and _definition(old) == _definition(now)
               for old, now in ((held.fn, new.fn), (held.config, new.config)))


def _definition(obj: Any) -> tuple[Any, str] | None:
    """(module, qualified name) of a function or class, None for an object without a qualified
    name (the module is None for a function exec'd without a `__name__`)."""
    qualname = getattr(obj, "__qualname__", None)
    return None if not isinstance(qualname, str) else (getattr(obj, "__module__", None), qualname)


def check_strategy_config(name: str, config: Any) -> None:
    """A ValueError unless config is a dataclass (the class, not an instance) with a `seed` field."""
    if not isinstance(config, type) or not is_dataclass(config):
        raise ValueError(f"strategy {name}: config={config!r:.80} must be a dataclass (the class, not an instance)")
    if "seed" not in {f.name for f in fields(config)}:
        raise ValueError(f"strategy {name}: config {config.__qualname__} has no field 'seed' (each search's sampling "
                         "seed: experiments.search sets every chunk's seed through it)")


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
    expected ran the default config and failed at the first round end. What the strategy returns
    is checked (`check_search_results`): a strategy of one's own that breaks the contract is a
    ValueError naming it and the fault, not a confusing failure later."""
    if config is not None and cfg:
        raise TypeError(f"run_search({name!r}, ...) takes the strategy's config object or its settings as keywords, "
                        f"not both (got {type(config).__name__} and {', '.join(cfg)})")
    check_round_hook(on_round)  # a strategy of one's own need not check it
    built = build_config(name, **cfg) if config is None else config
    if isinstance(problems, Iterator):  # a generator: read once here, to check the results against
        problems = list(problems)
    results = get_strategy(name).fn(problems, policy, scorer, built, on_round=on_round)
    check_search_results(results, problem_list(problems), name, built)
    return results


def check_search_results(results: Any, problems: Sequence[Problem], name: str, config: Any) -> None:
    """A ValueError (`treesearch.result_checks.ResultError`) naming strategy `name` and the fault
    unless results keep the contract (module docstring): one sound `SearchResult` per problem in
    order (`check_results`), each naming `name` and `dataclasses.asdict(config)` (`check_identity`)."""
    label = f"strategy {name}"
    check_results(results, problems, label)
    check_identity(results, name, config, label)
