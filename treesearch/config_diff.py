"""What differs between two nested configs (plain dicts), as readable lines; used to refuse
resuming or appending to a run folder made by a different config.

    config_differences({"search": {"n": 2}}, {"search": {"n": 4}}, ignored=("progress",))
    # ["search.n: 2 -> 4"]
"""
from __future__ import annotations

from typing import Any


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
