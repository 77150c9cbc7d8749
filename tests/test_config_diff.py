"""treesearch.config_diff: the readable differences that make a run folder refuse another config."""
from treesearch.config_diff import config_differences, flatten


def test_flatten_nested():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}


def test_differences_name_keys_and_values():
    saved = {"search": {"n": 2, "seed": 0}, "out_dir": "x"}
    current = {"search": {"n": 4, "seed": 0}, "out_dir": "y", "extra": None}
    # out_dir is ignored; a key missing on one side differs even from None
    assert config_differences(saved, current, ("out_dir",)) == ["extra: <absent> -> None", "search.n: 2 -> 4"]


def test_ignored_prefix_covers_subkeys_only():
    saved = {"run": {"a": 1}, "runner": 1}
    current = {"run": {"a": 2}, "runner": 2}
    assert config_differences(saved, current, ("run",)) == ["runner: 1 -> 2"]
