"""What a strategy returns, checked on the library path (`treesearch.result_checks`): a strategy
of one's own registered and run with `treesearch.registry.run_search`, or given to
`treesearch.concurrent.search_each`, that breaks the registry's contract (a wrong count of
results, another problem order, a non-SearchResult, a NaN score, a `chosen` out of range, a
compute that is no Compute, another strategy name or config) is a ValueError naming the strategy
and the fault; before, run_search returned it as it was, and search_each failed with "cannot
unpack" for 0 or 2 results. A sound strategy of one's own and every built-in one still pass.

Fakes only (tests/fakes.py); a few seconds on one CPU core.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_library_result_checks.py -q
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator

import pytest

from fakes import FakePolicy, OracleScorer
from test_library_api import SMALL  # each built-in strategy at a few samples
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.compute import Compute
from treesearch.concurrent import search_each
from treesearch.records import Problem
from treesearch.registry import STRATEGIES, register, run_search
from treesearch.result_checks import ResultError, identity_fault, same_as_written


@dataclass(frozen=True)
class MineConfig:
    n: int = 2
    seed: int = 0
    mode: str = "ok"
    ops: tuple = ("+", "-")


def broken(results: list, mode: str) -> object:
    """Best-of-N's results (named as the contract says), broken as `mode` says."""
    first = results[0]
    nan_first = dataclasses.replace(first.candidates[0], score=float("nan"))
    return {
        "ok": results,
        "tuple": tuple(results),
        "lists": [dataclasses.replace(r, config={**r.config, "ops": list(r.config["ops"])}) for r in results],
        "none": None,
        "fewer": results[:-1],
        "extra": [*results, first],
        "reversed": results[::-1],
        "dicts": [dataclasses.asdict(r.compute) for r in results],
        "nan": [dataclasses.replace(first, candidates=(nan_first, *first.candidates[1:])), *results[1:]],
        "bool_score": [dataclasses.replace(first, candidates=tuple(
            dataclasses.replace(c, score=True) for c in first.candidates)), *results[1:]],
        "cands_none": [dataclasses.replace(r, candidates=None) for r in results],
        "cand_dict": [dataclasses.replace(r, candidates=({"score": 0.5},)) for r in results],
        "chosen_neg": [dataclasses.replace(r, chosen=-1) for r in results],
        "chosen_oob": [dataclasses.replace(r, chosen=2) for r in results],
        "chosen_true": [dataclasses.replace(r, chosen=True) for r in results],
        "compute_dict": [dataclasses.replace(r, compute=r.compute.to_dict()) for r in results],
        "other_name": [dataclasses.replace(r, strategy="other") for r in results],
        "n3": [dataclasses.replace(r, config={"n": 3, "seed": 0}) for r in results],
        "config_none": [dataclasses.replace(r, config=None) for r in results],
    }[mode]


def mine(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    named = [dataclasses.replace(r, strategy="mine", config=dataclasses.asdict(cfg)) for r in results]
    return broken(named, cfg.mode)


@pytest.fixture
def registered() -> Iterator[None]:
    """`mine` registered; the registry as it was after."""
    saved = dict(STRATEGIES)
    register("mine", mine, MineConfig)
    try:
        yield
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(saved)


def problems(k: int = 2) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", str(i), {"answers": [str(i), "x"]}) for i in range(k)]


ORDER = "one SearchResult per problem, in the problems' order"
BAD = [
    ("none", r"returned NoneType None, not a list of SearchResult \(one per problem\)"),
    ("fewer", rf"returned 1 results for 2 problems: {ORDER}"),
    ("extra", rf"returned 3 results for 2 problems: {ORDER}"),
    ("reversed", r"gave a result of problem 'p1' where problem 'p0' was due \(the problems' order\)"),
    ("dicts", r"gave a dict for problem 'p0', not a SearchResult"),
    ("nan", r"gave candidate 0 of problem 'p0' score=nan, not a finite number"),
    ("bool_score", r"gave candidate 0 of problem 'p0' score=True, not a finite number"),
    ("cands_none", r"gave problem 'p0' candidates=None, not a tuple of Candidate"),
    ("cand_dict", r"gave candidate 0 of problem 'p0' as a dict, not a Candidate"),
    ("chosen_neg", r"gave problem 'p0' chosen=-1, not None or an index of its 2 candidates \(0 to 1\)"),
    ("chosen_oob", r"gave problem 'p0' chosen=2, not None or an index of its 2 candidates \(0 to 1\)"),
    ("chosen_true", r"gave problem 'p0' chosen=True, not None or an index of its 2 candidates \(0 to 1\)"),
    ("compute_dict", r"gave problem 'p0' compute=\{'tokens_generated': .*, not a treesearch\.compute\.Compute"),
    ("other_name", r"gave problem 'p0' strategy='other', not 'mine', the name it is registered under \(.*"),
    ("n3", r"gave problem 'p0' config n=3, no mode, no ops where its search ran with n=2, mode='n3', "
           r"ops=\('\+', '-'\) \(a result's config is dataclasses\.asdict\(cfg\).*"),
    ("config_none", r"gave problem 'p0' config=None, not the config its search ran with as a dict .*"),
]


@pytest.mark.parametrize("mode, fault", BAD, ids=[mode for mode, _ in BAD])
def test_run_search_refuses_a_broken_result_of_a_strategy_of_ones_own_naming_it(registered, mode, fault):
    with pytest.raises(ResultError) as refused:
        run_search("mine", problems(2), FakePolicy(), OracleScorer(), mode=mode)
    assert isinstance(refused.value, ValueError)
    assert re.fullmatch(rf"strategy mine {fault}", str(refused.value)), str(refused.value)


def test_run_search_checks_the_config_object_it_was_given(registered):
    # the config as given (not built from keywords): a result of n=3 for a run of n=2
    with pytest.raises(ValueError, match=r"^strategy mine gave problem 'p0' config n=3, no mode, no ops where"):
        run_search("mine", problems(1), FakePolicy(), OracleScorer(), MineConfig(mode="n3"))


@pytest.mark.parametrize("mode", ["ok", "tuple", "lists"])
def test_a_sound_strategy_of_ones_own_passes(registered, mode):
    # a tuple of results, and a config tuple returned as the list JSON writes it, keep the contract
    results = run_search("mine", problems(2), FakePolicy(), OracleScorer(), mode=mode)
    assert [r.problem.id for r in results] == ["p0", "p1"]
    generated = run_search("mine", (p for p in problems(2)), FakePolicy(), OracleScorer(), mode=mode)
    assert [r.problem.id for r in generated] == ["p0", "p1"]  # checked against the problems the generator gave


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_built_in_strategy_passes_the_checks(name):
    results = run_search(name, problems(3), FakePolicy(), OracleScorer(), **SMALL[name])
    assert [r.problem.id for r in results] == ["p0", "p1", "p2"]
    assert all(r.strategy == name and isinstance(r.compute, Compute) for r in results)


# -- search_each: each problem's single result -----------------------------------------------------


def none_for_p1(problems, policy, scorer, cfg, on_round=None):
    return [] if problems[0].id == "p1" else best_of_n(problems, policy, scorer, cfg, on_round)


def twice_for_p1(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, cfg, on_round)
    return results * 2 if problems[0].id == "p1" else results


def nan_for_p1(problems, policy, scorer, cfg, on_round=None):
    (result,) = best_of_n(problems, policy, scorer, cfg, on_round)
    if problems[0].id != "p1":
        return [result]
    return [dataclasses.replace(result, candidates=tuple(
        dataclasses.replace(c, score=float("nan")) for c in result.candidates))]


def dict_for_p1(problems, policy, scorer, cfg, on_round=None):
    (result,) = best_of_n(problems, policy, scorer, cfg, on_round)
    return result.compute.to_dict() if problems[0].id == "p1" else [result]


@pytest.mark.parametrize("fn, fault", [
    # "not enough values to unpack (expected 1, got 0)" before, naming no problem
    (none_for_p1, rf"strategy none_for_p1 returned 0 results for 1 problem \('p1'\): {ORDER}"),
    (twice_for_p1, rf"strategy twice_for_p1 returned 2 results for 1 problem \('p1'\): {ORDER}"),
    (nan_for_p1, r"strategy nan_for_p1 gave candidate 0 of problem 'p1' score=nan, not a finite number"),
    (dict_for_p1, r"strategy dict_for_p1 returned dict \{'tokens_generated': .* for problem 'p1', not a list of "
                  r"SearchResult \(one per problem\)"),
], ids=["none", "twice", "nan", "dict"])
def test_search_each_refuses_a_broken_result_naming_the_strategy_and_the_problem(fn, fault):
    with pytest.raises(ResultError) as refused:
        search_each(fn, problems(3), FakePolicy(), OracleScorer(), BestOfNConfig(n=2), workers=1)
    assert re.fullmatch(fault, str(refused.value)), str(refused.value)
    with pytest.raises(ValueError, match=r"^strategy mine gave candidate 0 of problem 'p1'"):  # a label of one's own
        search_each(nan_for_p1, problems(3), FakePolicy(), OracleScorer(), BestOfNConfig(n=2), label="strategy mine")


def test_search_each_passes_a_sound_strategy():
    results = search_each(best_of_n, problems(3), FakePolicy(), OracleScorer(), BestOfNConfig(n=2))
    assert [r.problem.id for r in results] == ["p0", "p1", "p2"]


# -- the identity rule, as records.jsonl writes a config ------------------------------------------


def test_a_config_is_compared_as_records_write_it():
    assert same_as_written({"a": (1, 2)}, {"a": [1, 2]}) and not same_as_written({"t": 1}, {"t": 1.0})
    assert identity_fault("s", {"n": 2}, "s", {"n": 2}) is None
    assert identity_fault("s", {"n": 3}, "s", None) is None  # no dataclass config: the name only
    assert identity_fault("t", {"n": 2}, "s", {"n": 2}).startswith("strategy='t', not 's'")
    # a key the search did not run with is named (not a KeyError)
    assert identity_fault("s", {"n": 2, "extra": 1}, "s", {"n": 2}).startswith("config extra=1 where its search ran with "
                                                                               "no extra")


class Weights:  # a config value without value equality: asdict deep-copies it
    def __init__(self, values: list[float]) -> None:
        self.values = values


@dataclass(frozen=True)
class ObjConfig:
    n: int = 2
    seed: int = 0
    weights: object = None


def objsearch(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    return [dataclasses.replace(r, strategy="objsearch", config=dataclasses.asdict(cfg)) for r in results]


@pytest.mark.parametrize("weights", [Weights([1.0, 2.0]), pytest.param("numpy", id="array")])
def test_a_sound_strategy_whose_config_holds_values_json_cannot_hold_passes(weights):
    # asdict's deep copy of an object without __eq__ never equals the original, and an array's ==
    # is no bool: run_search refused the strategy after its whole search (or raised numpy's error)
    if weights == "numpy":
        weights = pytest.importorskip("numpy").array([0.5, 0.5])
    saved = dict(STRATEGIES)
    register("objsearch", objsearch, ObjConfig)
    try:
        results = run_search("objsearch", problems(), FakePolicy(), OracleScorer(), ObjConfig(weights=weights))
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(saved)
    assert [r.problem.id for r in results] == ["p0", "p1"]
