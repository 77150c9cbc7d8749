"""Checks shared by the strategies: their config settings and what a search call is given. Each
error names the setting (or the argument) and what is valid, before any policy call is made.

    check_int("BestOfNConfig", "n", n, minimum=1)          # ValueError: BestOfNConfig.n=0 must be ...
    check_finite("MCTSConfig", "c_puct", c_puct, minimum=0.0)
    problems = search_inputs("beam_search", problems, cfg, BeamSearchConfig)

Tests: `.venv/bin/python -m pytest tests/test_library_api.py`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

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
        raise ValueError(f"{owner}.{name}={value!r} must be an integer{bound}")


def check_positive(owner: str, name: str, value: object) -> None:
    """ValueError naming `owner.name` unless value is a finite number > 0 (a temperature)."""
    if not is_finite_number(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number > 0")


def check_aggregation_setting(owner: str, name: str, value: object) -> None:
    """ValueError naming `owner.name` unless value names an aggregation (`treesearch.aggregation`)."""
    try:
        check_aggregation(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{owner}.{name}: {err}") from None


def check_finite(owner: str, name: str, value: object, minimum: float) -> None:
    """ValueError naming `owner.name` unless value is a finite number >= minimum."""
    if not is_finite_number(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number >= {minimum:g}")


def search_inputs(strategy: str, problems: Iterable[Problem], cfg: Any, config_type: type) -> list[Problem]:
    """The problems as a list, after checking that cfg is the strategy's own config and that every
    problem is a `Problem` (TypeError naming what is not)."""
    if not isinstance(cfg, config_type):
        raise TypeError(f"{strategy} takes a {config_type.__name__}, not a {type(cfg).__name__}")
    if isinstance(problems, Problem):
        raise TypeError("problems must be a list of Problem, not a Problem (wrap it: [problem])")
    if isinstance(problems, str):
        raise TypeError("problems must be a list of Problem, not a str")
    out = list(problems)
    for i, problem in enumerate(out):
        if not isinstance(problem, Problem):
            raise TypeError(f"problems[{i}] is a {type(problem).__name__}, not a Problem")
    return out
