"""Unknown keys in a config node that Hydra instantiates, refused before anything is built.

`+search.bogus=1` (a typo, or a setting of another strategy) used to reach the config class as an
unexpected keyword and end in a TypeError traceback; `check_known_keys` names the key, the class
and the settings it takes instead
(`ValueError: search.bogus is not a setting of BestOfNConfig; it takes: aggregation, n, ...`).

A target that takes **kwargs is not checked. A `_target_` that cannot be imported (a typo in a
module of your own, `scorer._target_=myscorrer.LengthScorer`) is a ValueError naming the key and
the import error, before anything loads (Hydra's own error came after the policy had loaded, in
several lines, exit 1). Nested nodes with their own `_target_` (policy.sampling) are checked too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

# keys Hydra's instantiate reads itself, never passed to the target
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})

def accepted_keys(target: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names `target` takes; None when it takes any (**kwargs) or has no signature."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in named)


def located_target(node: DictConfig) -> Callable[..., Any] | None:
    """The object `node._target_` names; None when there is none or Hydra cannot locate it."""
    path = node.get("_target_")
    if not isinstance(path, str):
        return None
    try:
        return get_object(path)
    except Exception:  # noqa: BLE001 - instantiate raises its own error naming the target
        return None


def target_name(target: Callable[..., Any]) -> str:
    """BestOfNConfig, or TransformersPolicy.from_pretrained for a class method."""
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))


def check_target_located(node: DictConfig) -> None:
    """A ValueError naming `node._target_` when it is text that names no object Hydra can import."""
    path = node.get("_target_")
    if not isinstance(path, str):
        return
    hydra_log = logging.getLogger("hydra.utils")  # it logs the error in three lines before raising it
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        get_object(path)
    except Exception as err:  # noqa: BLE001 - ImportError, a module's own error on import alike
        key, cause = node._get_full_key("_target_"), err.__cause__
        if cause is not None and not isinstance(cause, (ImportError, AttributeError)):  # the module's own error
            message = " ".join(str(cause).split())
            raise ValueError(f"{key}={path!r}: importing it raised {type(cause).__name__}: {message:.400}") from None
        lines = str(err).splitlines()  # Hydra's: "Error loading 'x.y':", the cause, "Are you sure that ..."
        message = " ".join(lines[1:] if len(lines) > 1 and lines[0].startswith("Error loading") else lines)
        raise ValueError(f"{key}={path!r} cannot be imported: {message:.400} "
                         "(a module of your own must be on PYTHONPATH)") from None
    finally:
        hydra_log.setLevel(level)


def check_node_keys(node: DictConfig) -> None:
    """A ValueError for a `_target_` that cannot be imported or the first key of `node` (not
    nested nodes) its target does not take."""
    check_target_located(node)
    target = located_target(node)
    accepted = None if target is None else accepted_keys(target)
    if accepted is None:
        return
    for key in node.keys():
        if str(key) not in HYDRA_KEYS and str(key) not in accepted:
            takes = ", ".join(sorted(accepted)) or "nothing"
            raise ValueError(f"{node._get_full_key(key)} is not a setting of {target_name(target)}; it takes: {takes}")


def check_known_keys(node: DictConfig | ListConfig) -> None:
    """Check `node` and every node with a `_target_` inside it (see the module docstring)."""
    if isinstance(node, DictConfig):
        check_node_keys(node)
        children = [node._get_node(key) for key in node.keys()]
    else:
        children = [node._get_node(index) for index in range(len(node))]
    for child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            check_known_keys(child)
