"""treesearch.config_diff: the readable differences that make a run folder refuse another config."""
from treesearch.config_diff import config_differences, flatten, resume_overrides, with_added_settings


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


def test_resume_overrides_write_each_saved_scalar_as_hydra_reads_it_back():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = [None, True, 0.6, 1e-05, 3, "score", "a b", "it's", "outputs/x-1/final", "-1", "", "null", "1e3", "-x"]
    saved = {"s": {f"k{i}": v for i, v in enumerate(values)}}
    current = {"s": {f"k{i}": "changed" for i in range(len(values))}}
    overrides = resume_overrides(saved, current)
    assert len(overrides) == len(values)
    for unwritable in ([1], ".\n\n", "a\\b", "${x}"):  # a list, control characters, a backslash, an interpolation
        assert resume_overrides({"s": {"k": unwritable}}, {"s": {"k": "changed"}}) == []
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    for i, value in enumerate(values):
        assert parsed[f"s.k{i}"] == value and type(parsed[f"s.k{i}"]) is type(value)
    assert resume_overrides(saved, saved) == [] and resume_overrides({"out": 1}, {"out": 2}, ("out",)) == []


def test_added_settings_fill_a_saved_config_only_where_the_current_one_has_them():
    saved = {"search": {"n": 2}, "policy": {"path": "p"}}
    current = {"search": {"n": 2, "weighting": "logit"}, "policy": {"path": "p"}}
    added = {"search.weighting": "score", "search.lookahead": 0, "task.extra": 1}
    filled = with_added_settings(saved, current, added)
    assert filled == {"search": {"n": 2, "weighting": "score"}, "policy": {"path": "p"}}
    assert saved == {"search": {"n": 2}, "policy": {"path": "p"}}  # a copy
    kept = with_added_settings({"search": {"weighting": "logit"}}, current, added)
    assert kept["search"]["weighting"] == "logit"  # a saved value is never replaced
    assert config_differences(filled, current) == ["search.weighting: 'score' -> 'logit'"]


def test_no_overrides_when_a_difference_cannot_be_put_back():
    # another component (its _target_), a key only one side has, a value no override writes
    assert resume_overrides({"s": {"_target_": "A", "n": 2}}, {"s": {"_target_": "B", "n": 4}}) == []
    assert resume_overrides({"s": {"n": 2}}, {"s": {"n": 4, "m": 1}}) == []
    assert resume_overrides({"s": {"n": 2, "l": [1]}}, {"s": {"n": 4, "l": [2]}}) == []
    assert resume_overrides({"s": {"n": 2, "x": 1}}, {"s": {"n": 4, "x": 1}}) == ["s.n=2"]


def test_added_settings_stay_out_of_another_component():
    saved = {"search": {"_target_": "BestOfN", "n": 2}}
    current = {"search": {"_target_": "Beam", "n": 2, "lookahead_temperature": 0.0}}
    assert with_added_settings(saved, current, {"search.lookahead_temperature": None}) == saved
