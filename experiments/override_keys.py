"""Overrides of keys the composed config lacks, checked before Hydra runs the command.

`python -m experiments.search search=mcts search.n=16` (MCTS takes `iterations`, not `n`) used to
end in Hydra's multi-line "Could not override 'search.n'. ... Key 'n' is not in struct" and exit
1; `check_override_keys` composes the config (Hydra's compose API, ~0.06 s a composition) and prints one
line naming the key and, where the node builds a known class, the settings it takes, and exits 2,
as the CLIs' other input errors do:

    error: search.n is not a setting of MCTSConfig; it takes: aggregation, c_puct, ...

A sweep (`-m`) is checked once per combination of the config groups it sweeps
(`search=beam,rebase`: both), with the first value of every other swept key; the sweeps an
`experiment=` config sets for itself are not. Any other flag (`--cfg`, `--help`, ...) or
HYDRA_FULL_ERROR=1 leaves the command line to Hydra as it is, and so do other composition errors
(Hydra's own messages name them).

    if __name__ == "__main__":
        check_group_options(sys.argv[1:], CONFIG_DIR, "search")
        check_override_keys(sys.argv[1:], CONFIG_DIR, "search", PLAIN_NODE_KEYS)  # +num_thread=2: a top-level typo
        main()
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import ConfigCompositionException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from experiments.cli_errors import USAGE_EXIT
from experiments.config_keys import accepted_keys, located_target, target_name


SWEEP_FLAGS = frozenset({"-m", "--multirun"})
_APPEND_RE = re.compile(r"Could not append to config\. An item is already at '([^']+)'")


def runs_to_check(argv: Sequence[str], config_dir: Path) -> list[list[str]]:
    """The override lists to compose: one per combination of the swept config group options,
    other swept keys at their first value; none when the command line is not one this module
    checks (a flag other than -m, HYDRA_FULL_ERROR=1, overrides Hydra cannot parse)."""
    overrides = _parsed(argv)
    return [] if overrides is None else _runs(overrides, config_dir)


def missing_key_error(
    argv: Sequence[str], config_dir: Path, config_name: str, plain_keys: Mapping[str, Sequence[str]] | None = None,
) -> str | None:
    """The error line for the first override of a key the composed config lacks (in a job, or
    in the composition a sweep starts from: the overrides that sweep nothing), else None.
    plain_keys: {node path ("" for the top level): the keys the command reads there} for nodes
    no class is built from; a key outside them is named with that list, not sent to `+KEY`
    (one the command reads that the config does not hold, `batching`, still is)."""
    overrides = _parsed(argv)
    if overrides is None:
        return None
    for run in _runs(overrides, config_dir):
        error = _composition_error(config_dir, config_name, run)  # composed once for both checks
        appended = _appended_existing_key(error, [o.input_line for o in overrides])
        if appended is not None:
            return appended
        missing = _missing_key(error, run)
        if missing is not None:
            full_key, override = missing
            parent_path = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            name = full_key.rsplit(".", 1)[-1]
            if plain_keys is not None and parent_path in plain_keys and name not in plain_keys[parent_path]:
                return f"error: {plain_key_message(full_key, plain_keys[parent_path], f'experiments.{config_name}')}"
            return _message(full_key, override, _parent_node(config_dir, config_name, run, override, full_key))
    if not SWEEP_FLAGS & set(argv):
        return None
    base = [o.input_line for o in overrides if not o.is_sweep_override()]
    missing = _missing_key(_composition_error(config_dir, config_name, base), base)
    if missing is None:
        return None
    full_key, override = missing  # every job has the key, the swept groups' defaults do not
    value = override.split("=", 1)[1] if "=" in override else ""
    return (f"error: {full_key} is not in the config a sweep starts from (Hydra composes it with every "
            f"swept group at its default before the jobs); write ++{full_key}={value} to set it in every job")


def plain_key_message(full_key: str, known: Sequence[str], command: str) -> str:
    """`task.shuffle is not a setting of task of experiments.search; it takes: ...`: a key of a
    node no class is built from, which `+KEY` would add and nothing would read."""
    where = f"of {full_key.rsplit('.', 1)[0]}" if "." in full_key else "at the top level"
    return f"{full_key} is not a setting {where} of {command}; it takes: {', '.join(sorted(known))}"


def check_plain_keys(cfg: DictConfig, plain_keys: Mapping[str, Sequence[str]], command: str) -> None:
    """A ValueError (`plain_key_message`) for the first key of a node in plain_keys ({node path,
    "" for the top level: the keys the command reads there}) that the command does not read: an
    override with `+` composes, is saved with the run and is never read."""
    for path, known in plain_keys.items():
        node = OmegaConf.select(cfg, path) if path else cfg
        unknown = [str(key) for key in node.keys() if key not in known] if isinstance(node, DictConfig) else []
        if unknown:
            raise ValueError(plain_key_message(f"{path}.{unknown[0]}" if path else unknown[0], known, command))


def _parsed(argv: Sequence[str]) -> list[Override] | None:
    """argv's overrides as Hydra parses them; None when this module leaves argv to Hydra (a flag
    other than -m, HYDRA_FULL_ERROR=1, overrides Hydra cannot parse)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a.startswith("-") and a not in SWEEP_FLAGS for a in argv):
        return None
    try:
        return OverridesParser.create().parse_overrides([a for a in argv if a not in SWEEP_FLAGS])
    except HydraException:
        return None


def _runs(overrides: Sequence[Override], config_dir: Path) -> list[list[str]]:
    """`runs_to_check` of parsed overrides; none when a sweep cannot be listed here (an
    interval, a glob over something other than a config group): Hydra judges those itself."""
    choices = []
    for override in overrides:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        group = config_dir / override.key_or_group
        try:
            swept = swept_values(override, group)
        except HydraException:
            return []
        values = [f"{override.get_key_element()}={value}" for value in swept]
        choices.append(values if group.is_dir() else values[:1])
    return [list(run) for run in itertools.product(*choices)]


def swept_values(override: Override, group: Path) -> list[str]:
    """The values a sweep override takes: a glob over a config group (`search=glob(*,exclude=mcts)`)
    filtered from the group's options, as Hydra's sweeper lists them; choice and range sweeps as
    Hydra enumerates them (HydraException for the rest)."""
    value = override.value()
    if isinstance(value, Glob):
        if not group.is_dir():
            raise HydraException(f"{override.input_line}: a glob outside a config group")
        return value.filter(sorted(path.stem for path in group.glob("*.yaml")))
    return list(override.sweep_string_iterator())


def _composition_error(config_dir: Path, config_name: str, overrides: Sequence[str]) -> ConfigCompositionException | None:
    """Hydra's error composing the config with overrides, None when it composes."""
    try:
        compose_config(config_dir, config_name, overrides)
    except ConfigCompositionException as err:
        return err
    return None


def _appended_existing_key(error: ConfigCompositionException | None, typed: Sequence[str]) -> str | None:
    """The error line when the composition failed on a `+KEY=VALUE` override of a key the config
    holds already (Hydra's multi-line "Could not append to config. An item is already at ..." and
    exit 1 before), else None; typed: the overrides as the command line gave them (a sweep's
    values whole: +search.n=1,2)."""
    found = _APPEND_RE.search(str(error)) if error is not None else None
    if found is None:
        return None
    key = found.group(1)
    override = next((arg for arg in typed if arg.lstrip("+").split("=", 1)[0] == key), f"+{key}=")
    value = override.split("=", 1)[1] if "=" in override else ""
    return f"error: {override.split('=', 1)[0]}: {key} is in the config already; set it without the + ({key}={value})"


def _missing_key(error: ConfigCompositionException | None, overrides: Sequence[str]) -> tuple[str, str] | None:
    """(full key, its override) when the composition failed on a key the config lacks; None when it
    composed, or failed for another reason (Hydra's own message names that)."""
    if error is None or not isinstance(error.__cause__, (ConfigAttributeError, ConfigKeyError)) or not error.__cause__.full_key:
        return None
    full_key = str(error.__cause__.full_key)
    keys = [(arg, arg.lstrip("+~").split("=", 1)[0]) for arg in overrides]
    # the override of the key itself, else one below it (search.foo.bar=1 fails on search.foo: suggest +search.foo.bar=1)
    return full_key, next((arg for arg, key in keys if key == full_key),
                          next((arg for arg, key in keys if key.startswith(full_key + ".")), full_key))


def check_override_keys(
    argv: Sequence[str], config_dir: Path, config_name: str, plain_keys: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Print the error line of `missing_key_error` on stderr and exit 2 when there is one."""
    error = missing_key_error(argv, config_dir, config_name, plain_keys)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


def check_refused_keys(argv: Sequence[str], messages: Mapping[str, str]) -> None:
    """Exit 2 with `error: <messages[key]>` on stderr for the first override of a key in messages
    (`key=v`, `+key=v`, `++key=v`, `~key`): a setting a command must not take on its command line."""
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in messages:
            print(f"error: {messages[key]}", file=sys.stderr)
            raise SystemExit(USAGE_EXIT)


def compose_config(config_dir: Path, config_name: str, overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """The composed config (hydra: with Hydra's own node, where launcher and sweeper settings live)."""
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself gives Hydra's warnings (submitit's schema match), once
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def sweep_command(argv: Sequence[str], config_dir: Path, config_name: str) -> tuple[list[Override], DictConfig] | None:
    """(the parsed overrides, Hydra's composed node) when the command line launches a sweep (-m, or
    a config setting Hydra's MULTIRUN mode), else None; None too where Hydra cannot parse or
    compose it (its own message then says why). The swept overrides are left out of the
    composition, which takes none."""
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        hydra_cfg = compose_config(config_dir, config_name, fixed, hydra=True).hydra
    except HydraException:
        return None
    if not (SWEEP_FLAGS & set(argv) or hydra_cfg.mode == RunMode.MULTIRUN):
        return None
    return parsed, hydra_cfg


def _parent_node(
    config_dir: Path, config_name: str, argv: Sequence[str], override: str, full_key: str
) -> DictConfig | None:
    """The node the key was meant for, composed without the override (None: none there)."""
    try:
        cfg = compose_config(config_dir, config_name, [arg for arg in argv if arg != override], full_key.startswith("hydra."))
    except ConfigCompositionException:
        return None
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return node if isinstance(node, DictConfig) else None


def _message(full_key: str, override: str, parent: DictConfig | None) -> str:
    """`<key> is not a setting of <Class>; it takes: ...` when the node builds a class whose
    keywords are known and the key is not one, else `<key> is not in the config` with the `+`
    form that adds it (Hydra appends keys only with `+`)."""
    target = None if parent is None else located_target(parent)
    accepted = None if target is None else accepted_keys(target)
    name = full_key.rsplit(".", 1)[-1]
    if full_key.startswith("hydra.") and parent is not None:  # a launcher's settings: a typo, or a keyword passed on
        node = full_key.rsplit(".", 1)[0]
        return (f"error: {full_key} is not a setting of {node} (it has: {', '.join(sorted(str(k) for k in parent))}); "
                f"a key {node} passes on unchecked is added as +{override}")
    if accepted is not None and name not in accepted:
        takes = ", ".join(sorted(accepted)) or "nothing"
        return f"error: {full_key} is not a setting of {target_name(target)}; it takes: {takes}"
    return f"error: {full_key} is not in the config (Hydra adds a new key only as +{override})"
