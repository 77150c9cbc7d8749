"""Pins for the command-line key checks that a mutation review found unpinned elsewhere.

In process, no model and no subprocess: each test composes the real config (experiments/conf,
~0.06 s a composition) or checks a small node of classes defined here. What is pinned:
`check_known_keys` checks nested nodes with their own `_target_` (policy.prompt_fn,
policy.engine), targets in lists and below plain dicts, accepts keyword-only parameters and
`_partial_`, and leaves **kwargs targets alone; `missing_key_error` names a key a class does not
take only when it is not one (else the `+KEY=VALUE` form), treats `-m`/`--multirun` as a sweep
but leaves other flags (short ones too) and HYDRA_FULL_ERROR=1 to Hydra, names a missing key
below a `hydra.` value without listing keys, and for an override below a missing key names the whole
override (`+batching.x=1`, not `+batching`) and the class of the node it was meant for;
`check_refused_keys` refuses `~KEY`; `unknown_group_option` lists a group's yaml files only.

Run: `.venv/bin/python -m pytest tests/test_override_pins.py`
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config_keys import check_known_keys
from experiments.group_options import unknown_group_option
from experiments.override_keys import check_refused_keys, compose_config, missing_key_error

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"


class KwScorer:
    """A target whose settings are keyword-only."""

    def __init__(self, *, threshold: float = 0.5):
        self.threshold = threshold


class AnyScorer:
    """A target that takes any keyword (**options): not checked."""

    def __init__(self, reduce: str = "min", **options):
        self.reduce, self.options = reduce, options


class Inner:
    def __init__(self, a: int = 1):
        self.a = a


class Outer:
    def __init__(self, inner=None, items=None):
        self.inner, self.items = inner, items


def target(cls: type) -> str:
    """The `_target_` naming a class of this module."""
    return f"{__name__}.{cls.__qualname__}"


def refusal(node: dict) -> str | None:
    """check_known_keys' message for node, None when it is accepted."""
    try:
        check_known_keys(OmegaConf.create(node))
    except ValueError as err:
        return str(err)
    return None


# -- config_keys.check_known_keys ----------------------------------------------------------------


def test_a_nested_node_with_its_own_target_is_checked_in_the_composed_policy():
    cfg = compose_config(CONF, "search", ["+policy.prompt_fn.bogus=1"])
    with pytest.raises(ValueError, match=r"^policy.prompt_fn.bogus is not a setting of get_method; it takes: path$"):
        check_known_keys(cfg["policy"])
    cfg = compose_config(CONF, "search", ["policy=vllm", "+policy.engine.bogus=1"])
    with pytest.raises(ValueError, match=r"^policy.engine.bogus is not a setting of VLLMEngineConfig; it takes: "):
        check_known_keys(cfg["policy"])


def test_keyword_only_parameters_are_accepted_settings():
    assert refusal({"_target_": target(KwScorer), "threshold": 0.3}) is None
    assert refusal({"_target_": target(KwScorer), "treshold": 0.3}) == (
        "treshold is not a setting of KwScorer; it takes: threshold")


def test_hydras_own_keys_partial_included_are_not_settings():
    assert refusal({"_target_": target(KwScorer), "_partial_": True, "_recursive_": False, "_convert_": "all"}) is None


def test_a_target_taking_any_keyword_is_not_checked():
    assert refusal({"_target_": target(AnyScorer), "reduce": "min", "temperature": 0.7}) is None


def test_targeted_nodes_inside_lists_and_plain_dicts_are_checked():
    assert refusal({"_target_": target(Outer), "items": [{"_target_": target(Inner), "b": 2}]}) == (
        "items[0].b is not a setting of Inner; it takes: a")
    assert refusal({"_target_": target(Outer), "inner": {"x": {"_target_": target(Inner), "b": 2}}}) == (
        "inner.x.b is not a setting of Inner; it takes: a")
    assert refusal({"_target_": target(Outer), "items": [{"_target_": target(Inner), "a": 2}]}) is None


# -- override_keys.missing_key_error -------------------------------------------------------------


def test_a_setting_the_class_takes_but_the_preset_lacks_is_sent_to_plus_form():
    # TransformersPolicy.from_pretrained takes dtype, the default preset does not set it
    error = missing_key_error(["policy.dtype=bfloat16"], CONF, "search")
    assert error.endswith("only as +policy.dtype=bfloat16)"), error
    assert error.startswith("error: policy.dtype is not in the config"), error


def test_multirun_long_flag_is_a_sweep_not_a_flag_left_to_hydra():
    error = missing_key_error(["--multirun", "search=mcts", "search.n=16"], CONF, "search")
    assert error is not None and error.startswith("error: search.n is not a setting of MCTSConfig; it takes: "), error


def test_a_short_flag_other_than_m_leaves_the_command_line_to_hydra():
    assert missing_key_error(["-c", "job", "search.bogus=1"], CONF, "search") is None


def test_hydra_full_error_leaves_the_command_line_to_hydra(monkeypatch):
    assert missing_key_error(["search=mcts", "search.n=16"], CONF, "search") is not None  # checked without it
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert missing_key_error(["search=mcts", "search.n=16"], CONF, "search") is None


def test_a_missing_hydra_key_below_a_value_is_not_in_the_config():
    # hydra.verbose is a value, not a node: no keys to list (a TypeError listing them before)
    assert missing_key_error(["hydra.verbose.x=1"], CONF, "search") == (
        "error: hydra.verbose.x is not in the config (Hydra adds a new key only as +hydra.verbose.x=1)")


def test_a_missing_hydra_key_lists_its_nodes_keys_and_the_whole_override():
    # "hydra.nosuch is not in the config (... +hydra.nosuch)" before the fix: no node, no value
    error = missing_key_error(["hydra.nosuch.x=1"], CONF, "search")
    assert error is not None and error.startswith("error: hydra.nosuch is not a setting of hydra (it has: "), error
    assert "job, job_logging, launcher" in error and error.endswith("is added as +hydra.nosuch.x=1"), error


def test_an_override_below_a_missing_key_is_named_whole():
    # "+batching" (no value) before: not a working override
    assert missing_key_error(["batching.x=1"], CONF, "search") == (
        "error: batching is not in the config (Hydra adds a new key only as +batching.x=1)")


def test_an_override_below_a_missing_setting_names_the_class_of_its_node():
    # "search.foo is not in the config (... +search.foo)" before: the parent composed with the override
    error = missing_key_error(["search.foo.bar=1"], CONF, "search")
    assert error is not None and error.startswith(
        "error: search.foo is not a setting of BestOfNConfig; it takes: aggregation, n, seed"), error


# -- override_keys.check_refused_keys ------------------------------------------------------------


def test_a_refused_key_is_refused_when_deleted_with_tilde(capsys):
    with pytest.raises(SystemExit) as exit_:
        check_refused_keys(["~task.count"], {"task.count": "msg"})
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: msg\n"
    check_refused_keys(["task.config.x=1", "~task.config"], {"task.count": "msg"})  # others pass


# -- group_options.unknown_group_option ----------------------------------------------------------


def test_a_group_option_is_a_yaml_file_not_any_file_in_the_folder(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "search" / "notes.txt").write_text("my notes on beam vs rebase\n")
    error = unknown_group_option(["search=notes"], conf)
    assert error is not None and error.startswith("error: search=notes is not an option of group search; valid: "), error
    valid = error.split("valid: ", 1)[1].split(", ")
    assert "notes" not in valid and "beam" in valid and "mcts" in valid, error
