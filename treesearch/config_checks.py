"""Checks shared by the strategies: their config settings and what a search call is given. Each
error names the setting (or the argument) and what is valid, before any policy call is made.

    check_int("BestOfNConfig", "n", n, minimum=1)          # ValueError: BestOfNConfig.n=0 must be ...
    check_flag("JointLossConfig", "bf16", bf16)            # a bool: "no" is no false
    check_finite("MCTSConfig", "c_puct", c_puct, minimum=0.0)
    problems = search_inputs("beam_search", problems, cfg, BeamSearchConfig, policy, scorer, on_round)
    problem_fault(Problem("p1", "", "3"))                  # "has question='', not a non-empty str"

Tests: `.venv/bin/python -m pytest tests/test_library_api.py`.
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Any, Iterable, Mapping

from treesearch.aggregation import check_aggregation
from treesearch.records import Problem


def is_int(value: object) -> bool:
    """A Python int that is not a bool (configs are written to JSON records as they are)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(owner: str, name: str, value: object, minimum: int | None = None) -> None:
    """ValueError naming `owner.name` unless value is an int (>= minimum when given)."""
    if not is_int(value) or (minimum is not None and value < minimum):  # type: ignore[operator]
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{owner}.{name}={value!r} must be an integer{bound}{_python_number_hint(value)}")


def check_flag(owner: str, name: str, value: object, or_none: bool = False) -> None:
    """ValueError naming `owner.name` unless value is a bool (or None with or_none): a YAML 'no'
    string or a 0 / 1 would pass an `if value:` silently, as true."""
    if not (isinstance(value, bool) or (or_none and value is None)):
        raise ValueError(f"{owner}.{name}={value!r} must be true or false{' (or null)' if or_none else ''}")


def _python_number_hint(value: object) -> str:
    """" (a Python int / float: ...)" for a numpy or torch number, which configs do not take (they
    are written to JSON records as they are), else ""."""
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return ""
    kind = "int" if isinstance(value, numbers.Integral) else "float"
    return f" (a Python {kind}: {kind}(value), not {type(value).__module__}.{type(value).__name__})"


def check_positive(owner: str, name: str, value: object) -> None:
    """ValueError naming `owner.name` unless value is a finite number > 0 (a temperature)."""
    if not is_finite_number(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number > 0{_python_number_hint(value)}")


def check_aggregation_setting(owner: str, name: str, value: object) -> None:
    """ValueError naming `owner.name` unless value names an aggregation (`treesearch.aggregation`)."""
    try:
        check_aggregation(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{owner}.{name}: {err}") from None


def check_finite(owner: str, name: str, value: object, minimum: float) -> None:
    """ValueError naming `owner.name` unless value is a finite number >= minimum."""
    if not is_finite_number(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number >= {minimum:g}{_python_number_hint(value)}")


def search_inputs(
    strategy: str, problems: Iterable[Problem], cfg: Any, config_type: type, policy: Any, scorer: Any,
    on_round: Any = None,
) -> list[Problem]:
    """The problems as a list, after checking that cfg is the strategy's own config, that the
    policy and the scorer have what a search reads (`check_components`) and that on_round is None
    or callable (`check_round_hook`): TypeError naming what is not; and that every problem is a
    `Problem` a search can use (`problem_list`), all before any policy call."""
    if not isinstance(cfg, config_type):
        raise TypeError(f"{strategy} takes a {config_type.__name__}, not a {type(cfg).__name__}")
    check_components(policy, scorer)
    check_round_hook(on_round)
    return problem_list(problems)


def check_round_hook(on_round: Any) -> None:
    """TypeError naming on_round unless it is None or callable (a `RoundHook`): a strategy called
    with on_round=5 ran the whole first round, then failed with "'int' object is not callable"."""
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be callable (a RoundHook: trees -> None), not a {type(on_round).__name__}")


def problem_list(problems: Iterable[Problem]) -> list[Problem]:
    """The problems as a list (any iterable of them); TypeError naming a lone Problem, a str or an
    item that is no Problem, ValueError naming `problems[i]` and its fault for a Problem a search
    cannot use (`problem_fault`: question=None was searched as the prompt "None", a meta of numpy
    numbers failed save_result after the search)."""
    if isinstance(problems, Problem):
        raise TypeError("problems must be a list of Problem, not a Problem (wrap it: [problem])")
    if isinstance(problems, str):
        raise TypeError("problems must be a list of Problem, not a str")
    out = list(problems)
    for i, problem in enumerate(out):
        if not isinstance(problem, Problem):
            raise TypeError(f"problems[{i}] is a {type(problem).__name__}, not a Problem")
        fault = problem_fault(problem)
        if fault is not None:
            named = f" (problem {problem.id!r})" if isinstance(problem.id, str) else ""
            raise ValueError(f"problems[{i}]{named} {fault}")
    return out


def problem_fault(problem: Problem, answer_required: bool = False) -> str | None:
    """What makes `problem` unusable by a search, as "has <field>=<value>, not ...", else None:
    an id that is not a str, a question that is not a non-empty str (the policy's prompt), an
    answer that is not a str or None (None: unknown; refused too with answer_required, where the
    answer is graded against) or a meta that is not a mapping of JSON values (`meta_fault`).
    Shared by the strategies (`problem_list`) and `experiments.search`, which names the task module."""
    if not isinstance(problem.id, str):
        return f"has id={problem.id!r:.60}, not a str"
    if not isinstance(problem.question, str) or not problem.question.strip():
        return f"has question={problem.question!r:.60}, not a non-empty str"
    if not isinstance(problem.answer, str) and (answer_required or problem.answer is not None):
        if answer_required:
            return f"has answer={problem.answer!r:.60}, not a str (the reference answer grade compares with)"
        return f"has answer={problem.answer!r:.60}, not a str or None (the reference answer; None: unknown)"
    return meta_fault(problem.meta)


def meta_fault(meta: Any) -> str | None:
    """What makes a problem's meta unwritable, naming the key, else None: result JSON (and
    experiments.search's rows) hold it, so a numpy number, a set or a Path in it failed
    save_result after the search, naming no key."""
    if not isinstance(meta, Mapping):
        return f"has meta={meta!r:.60}, not a dict"
    for key, value in meta.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as err:  # ValueError: a circular reference
            return (f"has meta[{key!r}]={value!r:.60}, not JSON ({err}): rows and result JSON hold meta; "
                    "use str, int, float, bool, None, lists and dicts of them")
    return None


def check_components(policy: Any, scorer: Any) -> None:
    """TypeError naming what the policy or the scorer lacks: the policy's `propose` and `rollout`
    and an integer `num_parameters` >= 0 (compute is tallied from it at the end of a search, so
    a missing one, or Hugging Face's `num_parameters` method left uncalled, failed after every
    policy call had been made), the scorer's `score` and `cost`, and its `num_parameters`, when it
    has one, an integer >= 0 too."""
    for method in ("propose", "rollout"):
        if not callable(getattr(policy, method, None)):
            raise TypeError(f"the policy ({type(policy).__name__}) has no method {method}(prefixes, n, seed)")
    for method in ("score", "cost"):
        if not callable(getattr(scorer, method, None)):
            raise TypeError(f"the scorer ({type(scorer).__name__}) has no method {method}(paths)")
    for role, component, required in (("policy", policy, True), ("scorer", scorer, False)):
        if not required and not hasattr(component, "num_parameters"):
            continue
        value = getattr(component, "num_parameters", None)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:  # numpy ints too
            raise TypeError(f"the {role}'s num_parameters must be an integer >= 0 (its parameter count, for compute), "
                            f"got {value!r}" + (" (a method: call it)" if callable(value) else ""))

