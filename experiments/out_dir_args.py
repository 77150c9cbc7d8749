"""`out_dir=` on a Hydra command line, checked before Hydra makes its folder: a sweep given one, a
path that is a file.

`out_dir` is one run's folder: `python -m experiments.search -m budget=2,4 out_dir=X` (or
`experiment=budget_sweep out_dir=X`, a sweep by its own config) sent every job to X, and each job
after the first was refused as "a different config" with advice no sweep can follow.
`check_out_dir_argument` prints one line naming hydra.sweep.dir, which gives each job a sub-folder,
and exits 2:

    error: out_dir=X with a sweep sends every job to that one folder; name the sweep's folder with hydra.sweep.dir=X instead (each job gets a sub-folder of it)

An out_dir holding an interpolation (`out_dir=runs/${hydra:job.num}`) is the user's own per-job
folder and passes. An out_dir that is an existing file, or lies under one, ended in Hydra's
FileExistsError traceback (Hydra makes the folder before the command runs):

    error: out_dir=notes.txt is an existing file; give a folder

    if __name__ == "__main__":
        check_out_dir_argument(sys.argv[1:], CONFIG_DIR, "search")   # experiments.search, experiments.train
        main()
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.types import RunMode

from experiments.cli_args import file_above
from experiments.cli_errors import USAGE_EXIT

OUT_DIR_ARGUMENT = re.compile(r"^\+{0,2}out_dir=(?P<value>.*)$")
SWEEP_FLAGS = frozenset({"-m", "--multirun"})


def out_dir_error(argv: Sequence[str], config_dir: Path, config_name: str) -> str | None:
    """The error line for a literal out_dir that is a file (or lies under one), or that a sweep
    (-m, or a config that sets Hydra's MULTIRUN mode) would give every job; else None."""
    values = [match["value"] for argument in argv if (match := OUT_DIR_ARGUMENT.match(argument))]
    value = values[-1] if values else ""
    if value in ("", "null") or "${" in value:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        return f"error: out_dir={value} is an existing file; give a folder"
    above = file_above(path)
    if above is not None:
        return f"error: out_dir={value} lies under {above}, an existing file; give a folder"
    if not (SWEEP_FLAGS & set(argv) or composed_mode(argv, config_dir, config_name) == RunMode.MULTIRUN):
        return None
    return (f"error: out_dir={value} with a sweep sends every job to that one folder; name the sweep's folder "
            f"with hydra.sweep.dir={value} instead (each job gets a sub-folder of it)")


def composed_mode(argv: Sequence[str], config_dir: Path, config_name: str) -> RunMode | None:
    """hydra.mode of the composed config (None when it does not compose: Hydra's own message says why)."""
    overrides = [argument for argument in argv if not argument.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compose(config_name, overrides=overrides, return_hydra_config=True).hydra.mode
    except HydraException:
        return None


def check_out_dir_argument(argv: Sequence[str], config_dir: Path, config_name: str) -> None:
    """Print the error line of `out_dir_error` on stderr and exit 2 when there is one."""
    error = out_dir_error(argv, config_dir, config_name)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)
