"""Config group options on a Hydra command line, checked before Hydra composes the config.

`python -m experiments.search search=nosuch` used to end in Hydra's multi-line "Could not find
'search/nosuch'" with the config search path and exit 1; `check_group_options` prints one line
naming the option and the ones the group has, and exits 2, as the CLIs' other input errors do:

    error: search=nosuch is not an option of group search; valid: beam, best_of_n, dvts, greedy, mcts, particle_filtering, rebase

An argument is checked when it reads `[+|++]GROUP=NAMES` with GROUP a folder of the config
directory (hydra/... groups belong to Hydra too and are left to it) and NAMES plain names,
comma-separated for a sweep; anything else (a key with dots, Hydra's sweep functions, an
interpolation) is left to Hydra.

    if __name__ == "__main__":
        check_group_options(sys.argv[1:], CONFIG_DIR)
        main()
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

from experiments.cli_errors import USAGE_EXIT

GROUP_ARGUMENT = re.compile(r"^\+{0,2}(?P<group>[A-Za-z_][\w-]*)=(?P<names>[\w.-]+(?:,[\w.-]+)*)$")


def group_options(config_dir: Path, group: str) -> list[str]:
    """The option names of a config group (its folder's yaml files), sorted."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def unknown_group_option(argv: Sequence[str], config_dir: Path) -> str | None:
    """The error line for the first argument naming an option its group lacks, else None."""
    for argument in argv:
        match = GROUP_ARGUMENT.match(argument)
        if match is None or match["group"] == "hydra" or not (config_dir / match["group"]).is_dir():
            continue
        options = group_options(config_dir, match["group"])
        for name in match["names"].split(","):
            if name not in options:
                return (f"error: {match['group']}={name} is not an option of group {match['group']}; "
                        f"valid: {', '.join(options)}")
    return None


def check_group_options(argv: Sequence[str], config_dir: Path) -> None:
    """Print the error line of `unknown_group_option` on stderr and exit 2 when there is one."""
    error = unknown_group_option(argv, config_dir)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)
