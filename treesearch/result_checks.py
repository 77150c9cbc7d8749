"""What a strategy returns, checked against the registry's contract (`treesearch/registry.py`):
one `SearchResult` per problem, in the problems' order, each with candidates that score finite
numbers, a `chosen` that is None or an index of them and a `Compute`; its `strategy` the name
it is registered under and its `config` `dataclasses.asdict` of the config it ran with. A
`ResultError` (a ValueError) names the strategy (`label`), the problem and the fault.

    check_results(results, problems, "strategy mine")
        # ResultError: strategy mine returned 1 results for 2 problems: one SearchResult per problem, ...
    check_identity(results, "mine", cfg, "strategy mine")
        # ResultError: strategy mine gave problem 'p0' strategy='other', not 'mine', the name it is ...
    result_fault(result, problem)   # "gave candidate 0 of problem 'p0' score=nan, not a finite number"
    chosen_fault(result)            # "chosen=-1, not None or an index of its 2 candidates (0 to 1)"

`treesearch.registry.run_search` runs both checks on what a strategy returns, and
`treesearch.concurrent.search_each` `check_results` on each problem's single result;
`experiments.search` uses them before a chunk's rows are written.

Tests: `.venv/bin/python -m pytest tests/test_library_result_checks.py`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

from treesearch.compute import Compute
from treesearch.config_checks import is_finite_number
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult


class ResultError(ValueError):
    """What a strategy returned breaks its contract (the message names the strategy and the fault)."""


def check_results(results: Any, problems: Sequence[Problem], label: str) -> None:
    """A `ResultError` naming the strategy (`label`, e.g. "strategy mine") unless results is a list
    or tuple of one `SearchResult` per problem, in the problems' order, each sound (`result_fault`)."""
    fault = results_fault(results, problems)
    if fault is not None:
        raise ResultError(f"{label} {fault}")


def results_fault(results: Any, problems: Sequence[Problem]) -> str | None:
    """What is wrong with what a strategy returned for problems (phrased to follow its name:
    "returned ...", "gave ..."), else None; the problem is named when it searched one."""
    one = f" for problem {problems[0].id!r}" if len(problems) == 1 else ""
    if not isinstance(results, (list, tuple)):
        return f"returned {type(results).__name__} {results!r:.60}{one}, not a list of SearchResult (one per problem)"
    if len(results) != len(problems):
        searched = f"1 problem ({problems[0].id!r})" if one else f"{len(problems)} problems"
        return (f"returned {len(results)} results for {searched}: one SearchResult per problem, in the problems' "
                "order")
    for result, problem in zip(results, problems):
        fault = result_fault(result, problem)
        if fault is not None:
            return fault
    return None


def result_fault(result: Any, problem: Problem) -> str | None:
    """What is wrong with the result a strategy returned for `problem` (phrased to follow the
    strategy's name: "gave ..."), else None: not a SearchResult, another problem, a candidate that
    is no Candidate or scores no finite number, a `chosen` that is no index of the candidates
    (`chosen_fault`), a compute that is no Compute."""
    if not isinstance(result, SearchResult):
        return f"gave a {type(result).__name__} for problem {problem.id!r}, not a SearchResult"
    got = getattr(result.problem, "id", result.problem)
    if got != problem.id:
        return f"gave a result of problem {got!r:.60} where problem {problem.id!r} was due (the problems' order)"
    where = f"problem {problem.id!r}"
    if not isinstance(result.candidates, (list, tuple)):
        return f"gave {where} candidates={result.candidates!r:.60}, not a tuple of Candidate"
    for index, cand in enumerate(result.candidates):
        if not isinstance(cand, Candidate):
            return f"gave candidate {index} of {where} as a {type(cand).__name__}, not a Candidate"
        if not is_finite_number(cand.score):
            return f"gave candidate {index} of {where} score={cand.score!r:.40}, not a finite number"
    fault = chosen_fault(result)
    if fault is not None:
        return f"gave {where} {fault}"
    if not isinstance(result.compute, Compute):
        return f"gave {where} compute={result.compute!r:.60}, not a treesearch.compute.Compute"
    return None


def chosen_fault(result: SearchResult) -> str | None:
    """What is wrong with the result's `chosen` (None, or an int index of its candidates: -1
    was graded as the last one), else None."""
    chosen, count = result.chosen, len(result.candidates)
    if chosen is None or (isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < count):
        return None
    if not count:
        return f"chosen={chosen!r:.40} and no candidates (chosen must be None then)"
    return f"chosen={chosen!r:.40}, not None or an index of its {count} candidates (0 to {count - 1})"


def check_identity(results: Sequence[SearchResult], name: str, config: Any, label: str) -> None:
    """A `ResultError` naming the strategy (`label`) and the problem when a result's `strategy` is
    not `name` (the name it is registered under) or its `config` is not `dataclasses.asdict(config)`
    (`identity_fault`); the config is not compared when it is no dataclass instance. Call it
    after `check_results` (results are SearchResults)."""
    ran = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else None
    for result in results:
        fault = identity_fault(result.strategy, result.config, name, ran)
        if fault is not None:
            raise ResultError(f"{label} gave problem {result.problem.id!r} {fault}")


def identity_fault(strategy: Any, config: Any, name: str | None, ran: dict[str, Any] | None) -> str | None:
    """What is wrong with a result's (or a row's) strategy name and config, else None: a strategy
    other than `name`, a config other than `ran` (`dataclasses.asdict` of the config its search ran
    with; None: not compared) as records.jsonl writes them (`same_as_written`). records.jsonl,
    metrics.json and the sweep tables file a run by both: results saying "other" missed the
    strategy's settings, a config of n=3 filed a run of n=8 under N=3."""
    if strategy != name:
        return (f"strategy={strategy!r:.60}, not {name!r}, the name it is registered under (records.jsonl, "
                "metrics.json and the sweep tables file its rows by it)")
    if ran is None or same_as_written(config, ran):
        return None
    if not isinstance(config, dict):
        return f"config={config!r:.60}, not the config its search ran with as a dict (dataclasses.asdict(cfg))"
    keys = [key for key in [*ran, *(key for key in config if key not in ran)]
            if key not in config or key not in ran or not same_as_written(config[key], ran[key])]
    shown = keys[:3] + (["..."] if len(keys) > 3 else [])
    if not keys:  # equal key by key, apart as a whole: values JSON cannot hold
        return f"config={config!r:.80} where its search ran with {ran!r:.80} (dataclasses.asdict(cfg))"
    return (f"config {setting_list(config, shown)} where its search ran with {setting_list(ran, shown)} (a result's "
            "config is dataclasses.asdict(cfg): records.jsonl and the sweep tables file its rows by it)")


def setting_list(config: dict[str, Any], keys: Sequence[str]) -> str:
    """`n=3, seed=0` of config's keys (`no lookahead` for a key it lacks; "..." as it is)."""
    return ", ".join(key if key == "..." else f"{key}={config[key]!r:.40}" if key in config else f"no {key}"
                     for key in keys)


def same_as_written(got: Any, want: Any) -> bool:
    """Whether two values are the same as a row of records.jsonl holds them: their JSON text, keys
    sorted (a tuple is the list it is written as, a NaN equals NaN; 1 and 1.0, True and 1 are
    written apart and differ); values JSON cannot hold are compared as they are, and taken as
    the same when that comparison cannot tell (an object without `__eq__`, which `asdict`
    deep-copies, or a numpy array) but their types agree."""
    try:
        return json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    except (TypeError, ValueError):  # a Path, keys of mixed types to sort, a circular reference
        return loosely_equal(got, want)


def loosely_equal(got: Any, want: Any) -> bool:
    """got == want where that is True; else whether their types agree (a copy of an object
    without value equality, an array whose == is not one bool)."""
    try:
        if bool(got == want):
            return True
    except Exception:  # noqa: BLE001 (an array's "truth value ... is ambiguous", a user's __eq__)
        pass
    return type(got) is type(want)


def fn_label(fn: Callable[..., Any]) -> str:
    """How an error names a strategy known only by its function: `strategy beam_search` (a
    functools.partial, which has no name, by its repr)."""
    name = getattr(fn, "__qualname__", None)
    return f"strategy {name}" if isinstance(name, str) else f"strategy {fn!r:.60}"
