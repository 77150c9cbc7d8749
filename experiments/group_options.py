"""Config group options on a Hydra command line, checked before Hydra composes the config.

`python -m experiments.search search=nosuch` used to end in Hydra's multi-line "Could not find
'search/nosuch'" with the config search path and exit 1; `check_group_options` prints one line
naming the option and the ones the group has, and exits 2, as the CLIs' other input errors do:

    error: search=nosuch is not an option of group search; valid: beam, best_of_n, dvts, greedy, mcts, particle_filtering, rebase

A group the command's config does not choose (a group of the other command: `python -m
experiments.train experiment=budget_sweep`, `policy=tiny`) was Hydra's "Could not override
'experiment'. No match in the defaults list ..." (exit 1; a sweep left its multirun.yaml):

    error: experiment is a config group of experiments.search, not of experiments.train (train.yaml's defaults list does not hold it)

(`+policy=tiny` adds the group, and is left as before: train refuses it, once Hydra has composed
its config, as a key it does not read, `experiments.override_keys.check_plain_keys`.)

An argument is checked when it reads `[+|++]GROUP=NAMES` with GROUP a folder of the config
directory and NAMES plain names, comma-separated for a sweep; anything else (a key with dots,
Hydra's sweep functions, an interpolation) is left to Hydra. Of Hydra's own groups,
`hydra/launcher` and `hydra/sweeper` are checked against the config directory's files and the
options the installed Hydra plugins register (`hydra/launcher=slurm`: one line naming basic,
joblib, local, submitit_local, submitit_slurm), and an option whose plugin is not installed is
named with the package to install (`hydra/launcher=local` without hydra-joblib-launcher); the
rest of hydra/... is left to Hydra. Config folders of your own count as Hydra reads them:
`--config-dir DIR` (`-cd DIR`) and the `file://` / `pkg://` entries of `hydra.searchpath=[...]`
add their groups' yaml files to the options (`--config-dir my_conf task=my_task`).

    if __name__ == "__main__":
        check_group_options(sys.argv[1:], CONFIG_DIR, "search")  # the name: +policy=tiny (already in its defaults) refused
        check_launcher_commands(sys.argv[1:], CONFIG_DIR, "search")  # after the key checks: a typo first
        main()

`check_launcher_commands` refuses `hydra/launcher=submitit_slurm` in a sweep where SLURM's sbatch
or srun is not on PATH (submitit's RuntimeError traceback after Hydra's warnings, exit 1, with
multirun.yaml left in the sweep's folder):

    error: hydra/launcher=submitit_slurm submits the sweep's jobs with SLURM's sbatch and srun, and sbatch and srun are not on PATH (no SLURM here): ...
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

from experiments.cli_errors import USAGE_EXIT

GROUP_ARGUMENT = re.compile(r"^\+{0,2}(?P<group>[A-Za-z_][\w-]*(?:/[A-Za-z_][\w-]*)?)=(?P<names>[\w.-]+(?:,[\w.-]+)*)$")
HYDRA_GROUPS: tuple[str, ...] = ("hydra/launcher", "hydra/sweeper")  # Hydra's groups this module checks
# a hydra/launcher option -> the option a plugin registers that it needs, and the plugin's package
PLUGIN_OPTIONS: dict[str, tuple[str, str]] = {
    "local": ("joblib", "hydra-joblib-launcher"),  # conf/hydra/launcher/local.yaml extends joblib
    "joblib": ("joblib", "hydra-joblib-launcher"),
    "submitit_local": ("submitit_local", "hydra-submitit-launcher"),
    "submitit_slurm": ("submitit_slurm", "hydra-submitit-launcher"),  # ours names the plugin's launcher class
}


def group_options(config_dir: Path | Sequence[Path], group: str) -> list[str]:
    """The option names of a config group (its folder's yaml files in each config folder; for
    Hydra's launcher and sweeper groups also the installed plugins' options), sorted."""
    folders = [config_dir] if isinstance(config_dir, Path) else list(config_dir)
    files = {p.stem for folder in folders for p in (folder / group).glob("*.yaml")}
    return sorted(files | plugin_options(group)) if group in HYDRA_GROUPS else sorted(files)


SEARCHPATH_ARGUMENT = re.compile(r"^\+{0,2}hydra\.searchpath=\[?(?P<entries>[^\]]*)\]?$")


def user_config_dirs(argv: Sequence[str]) -> list[Path]:
    """The config folders a command line adds to Hydra's search path: `--config-dir DIR`,
    `--config-dir=DIR`, `-cd DIR`, and each `file://PATH` or `pkg://PACKAGE` entry of
    `hydra.searchpath=[...]` (a package that cannot be found adds nothing: Hydra names it)."""
    folders: list[Path] = []
    for i, argument in enumerate(argv):
        if argument in ("--config-dir", "-cd") and i + 1 < len(argv):
            folders.append(Path(argv[i + 1]).expanduser())
        elif argument.startswith("--config-dir="):
            folders.append(Path(argument.split("=", 1)[1]).expanduser())
        match = SEARCHPATH_ARGUMENT.match(argument)
        for entry in match["entries"].split(",") if match else ():
            entry = entry.strip().strip("'\"")
            if entry.startswith("file://"):
                folders.append(Path(entry.removeprefix("file://")).expanduser())
            elif entry.startswith("pkg://"):
                folders.extend(package_folders(entry.removeprefix("pkg://")))
    return folders


def package_folders(name: str) -> list[Path]:
    """The folders of an importable package (`pkg://my_pkg.conf`), [] when it is none."""
    try:
        spec = importlib.util.find_spec(name.replace("/", "."))
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def plugin_options(group: str) -> set[str]:
    """The options Hydra and its installed plugins register in group (e.g. hydra/launcher: basic,
    joblib, submitit_local, submitit_slurm with both launcher plugins)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed plugins, which register their configs
    node: object = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return {name.removesuffix(".yaml") for name in node} if isinstance(node, dict) else set()


def default_groups(config_dir: Path, config_name: str) -> set[str]:
    """The groups the primary config's defaults list names (`- search: best_of_n`, `- experiment: null`)."""
    import yaml

    try:
        defaults = yaml.safe_load((config_dir / f"{config_name}.yaml").read_text()).get("defaults", [])
    except (OSError, AttributeError, yaml.YAMLError):
        return set()
    return {key for entry in defaults if isinstance(entry, dict) for key in entry if "/" not in key and " " not in key}


def unknown_group_option(argv: Sequence[str], config_dir: Path, config_name: str | None = None) -> str | None:
    """The error line for the first argument naming an option its group lacks (or whose Hydra
    plugin is not installed), choosing without `+` a group the primary config (config_name) does
    not hold (another command's: Hydra's "Could not override 'experiment'. No match in the
    defaults list", exit 1), or adding with `+` a group the primary config already chooses
    (Hydra: "Multiple values for experiment. To override a value use 'override experiment:
    ...'", exit 1), else None."""
    chosen = default_groups(config_dir, config_name) if config_name else set()
    folders = [config_dir, *user_config_dirs(argv)]
    for argument in argv:
        match = GROUP_ARGUMENT.match(argument)
        group = match["group"] if match else ""
        checked = group in HYDRA_GROUPS or (not group.startswith("hydra") and (config_dir / group).is_dir())
        if match is None or not checked:
            continue
        if chosen and not argument.startswith("+") and not group.startswith("hydra") and group not in chosen \
                and not names_primary_config(argv):
            return other_command_group(group, config_dir, config_name or "")
        options = group_options(folders, group)
        for name in match["names"].split(","):
            if name not in options:
                plugins = " (a Hydra plugin's options appear once its package is installed)" if group in HYDRA_GROUPS else ""
                return f"error: {group}={name} is not an option of group {group}; valid: {', '.join(options)}{plugins}"
            missing = missing_plugin(group, name)
            if missing:
                return missing
        if argument.startswith("+") and not argument.startswith("++") and group in chosen:
            return (f"error: {argument}: group {group} is already in {config_name}.yaml's defaults list, so it is "
                    f"chosen without the +: {argument[1:]}")
    return None


def other_command_group(group: str, config_dir: Path, config_name: str) -> str:
    """The error line for `group=option` given to a command whose primary config (config_name)
    does not choose group: the command that does (another primary config of config_dir whose
    defaults list holds it) is named, e.g. experiment=budget_sweep given to experiments.train."""
    primaries = sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem != config_name)
    others = [name for name in primaries if group in default_groups(config_dir, name)]
    owner = f"a config group of {', '.join(f'experiments.{name}' for name in others)}, not" if others else "not a config group"
    return f"error: {group} is {owner} of experiments.{config_name} ({config_name}.yaml's defaults list does not hold it)"


def names_primary_config(argv: Sequence[str]) -> bool:
    """Whether the command line picks another primary config (--config-name / -cn), whose
    defaults list is not the one read here."""
    return any(a in ("--config-name", "-cn") or a.startswith("--config-name=") for a in argv)


def missing_plugin(group: str, name: str) -> str | None:
    """The error line for a launcher option whose Hydra plugin is not installed, else None."""
    if group != "hydra/launcher" or name not in PLUGIN_OPTIONS:
        return None
    needed, package = PLUGIN_OPTIONS[name]
    if needed in plugin_options(group):
        return None
    return f"error: {group}={name} needs Hydra's {package} plugin, which is not installed: pip install {package}"


# hydra/launcher=submitit_slurm runs SLURM's commands: submitit's SlurmExecutor refuses to start
# without srun on PATH ('Could not detect "srun", are you indeed on a slurm cluster?', a traceback
# after Hydra had written the sweep's multirun.yaml) and submits each job array with sbatch
SLURM_LAUNCHER = "submitit_slurm"
SLURM_COMMANDS: tuple[str, ...] = ("sbatch", "srun")
SWEEP_FLAGS = frozenset({"-m", "--multirun"})
# Hydra's flags that print something and launch no job (`--cfg job`, `--help`), or run one job in process (`--run`)
NOT_LAUNCHING = frozenset({"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info",
                           "-sc", "--shell-completion", "-r", "--run"})


def missing_launcher_commands(argv: Sequence[str], config_dir: Path, config_name: str) -> str | None:
    """The error line for `hydra/launcher=submitit_slurm` in a sweep (-m, or a config that sets
    Hydra's MULTIRUN mode: experiment=budget_sweep) on a machine where SLURM's sbatch or srun is
    not on PATH, naming what is missing; else None (a single run uses no launcher)."""
    chosen = [m for a in argv if (m := GROUP_ARGUMENT.match(a)) and m["group"] == "hydra/launcher"]
    if not any(SLURM_LAUNCHER in m["names"].split(",") for m in chosen):
        return None
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if not missing or any(a.split("=", 1)[0] in NOT_LAUNCHING for a in argv) or not is_multirun(argv, config_dir, config_name):
        return None
    return (f"error: hydra/launcher={SLURM_LAUNCHER} submits the sweep's jobs with SLURM's {' and '.join(SLURM_COMMANDS)}, "
            f"and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH (no SLURM here): run it "
            "on the cluster's login node, or leave the launcher out to run the jobs here (hydra/launcher=local: "
            "two at a time)")


def is_multirun(argv: Sequence[str], config_dir: Path, config_name: str) -> bool:
    """Whether the command line runs a sweep, through the launcher: -m / --multirun, or a config
    that sets Hydra's MULTIRUN mode (composed without the swept overrides); False where Hydra
    cannot parse or compose it (its own message then says why)."""
    if SWEEP_FLAGS & set(argv):
        return True
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode

    from experiments.override_keys import compose_config  # it imports Hydra's compose API: only when asked

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]  # compose takes no sweep
        return compose_config(config_dir, config_name, fixed, hydra=True).hydra.mode == RunMode.MULTIRUN
    except HydraException:
        return False


def check_launcher_commands(argv: Sequence[str], config_dir: Path, config_name: str) -> None:
    """Print the error line of `missing_launcher_commands` on stderr and exit 2 when there is one."""
    error = missing_launcher_commands(argv, config_dir, config_name)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


def check_group_options(argv: Sequence[str], config_dir: Path, config_name: str | None = None) -> None:
    """Print the error line of `unknown_group_option` on stderr and exit 2 when there is one."""
    error = unknown_group_option(argv, config_dir, config_name)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)
