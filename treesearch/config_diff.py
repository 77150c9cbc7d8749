"""What differs between two nested configs (plain dicts), as readable lines; used to refuse
resuming or appending to a run folder made by a different config.

    config_differences({"search": {"n": 2}}, {"search": {"n": 4}}, ignored=("progress",))
    # ["search.n: 2 -> 4"]
    resume_overrides({"search": {"n": 2}}, {"search": {"n": 4}})   # ["search.n=2"]: runs as saved
    with_added_settings({"search": {"n": 2}}, {"search": {"n": 2, "weighting": "logit"}},
                        {"search.weighting": "score"})
    # {"search": {"n": 2, "weighting": "score"}}: a setting added since, at its old behaviour
"""
from __future__ import annotations

import re
from typing import Any, Mapping


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignored: tuple[str, ...] = ()) -> list[str]:
    """'key: saved -> current' for every flattened key that differs (a key missing on one side
    differs from any value, None included), except the ignored ones (a key is ignored when it
    equals an ignored name or lies under it)."""
    a, b = flatten(saved), flatten(current)

    def relevant(key: str) -> bool:
        return not any(key == name or key.startswith(name + ".") for name in ignored)

    return [
        f"{key}: {a.get(key, ABSENT)!r} -> {b.get(key, ABSENT)!r}"
        for key in sorted(set(a) | set(b))
        if relevant(key) and a.get(key, ABSENT) != b.get(key, ABSENT)
    ]


PLAIN_VALUE = re.compile(r"[A-Za-z_./:+-][A-Za-z0-9_./:+-]*")  # a string Hydra's override grammar reads as itself
RESERVED = ("null", "true", "false", "nan", "inf", "-inf", "+inf")  # read as other types when unquoted


def resume_overrides(saved: dict[str, Any], current: dict[str, Any], ignored: tuple[str, ...] = ()) -> list[str]:
    """`key=value` overrides that put back the saved value of every differing flattened key, in
    key order: the command line that resumes a run folder as it ran; [] when some difference
    cannot be put back so (a key only one side has, another component's `_target_`, a value one
    override cannot write: `override_value`)."""
    a, b = flatten(saved), flatten(current)
    overrides = []
    for key in sorted(set(a) | set(b)):
        if any(key == name or key.startswith(name + ".") for name in ignored) or a.get(key, ABSENT) == b.get(key, ABSENT):
            continue
        written = override_value(a[key]) if key in a and key in b and not key.endswith("_target_") else None
        if written is None:
            return []
        overrides.append(f"{key}={written}")
    return overrides


def override_value(value: Any) -> str | None:
    """A scalar as Hydra's override grammar writes it: null, true / false, numbers as Python
    prints them, a plain string as itself, any other string in single quotes; None for what one
    override cannot write (lists, dicts, strings with control characters, backslashes or
    interpolations)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str) or "${" in value or "\\" in value or any(ord(c) < 32 for c in value):
        return None
    if PLAIN_VALUE.fullmatch(value) and value.lower() not in RESERVED and not _reads_as_number(value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def with_added_settings(saved: dict[str, Any], current: dict[str, Any], added: Mapping[str, Any]) -> dict[str, Any]:
    """saved with each setting of `added` (a flattened key -> the value that behaves as the code
    before the setting existed) filled in where saved lacks it and current has it, in a node of the
    same component (the same `_target_`, when the node names one): a folder written before the
    setting existed ran with that value. A copy; saved is unchanged."""
    out, now = _copy(saved), flatten(current)
    for key, value in added.items():
        *parents, leaf = key.split(".")
        node: Any = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        target = ".".join(parents + ["_target_"])
        same_component = not isinstance(node, dict) or node.get("_target_") == now.get(target)
        if key in now and isinstance(node, dict) and leaf not in node and same_component:
            node[leaf] = value
    return out


def _copy(data: Any) -> Any:
    return {key: _copy(value) for key, value in data.items()} if isinstance(data, dict) else data

