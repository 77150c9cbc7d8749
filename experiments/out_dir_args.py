"""Run folders on a Hydra command line, before Hydra makes them: `out_dir=` checked (a sweep given
one, a path that is a file), and a sweep over `experiment=` given job folders that name it.

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

A job's folder is named by its overrides, `experiment` left out (an experiment that sets the
sweep, budget_sweep, names the sweep's folder); `-m experiment=reasoning_low,reasoning_medium`
then put both jobs in one folder. `with_experiment_job_folders` adds
`hydra.sweep.subdir` naming the experiment to such a command line (and to no other, so the folders
of sweeps made before keep their names).

`check_out_dir_argument` also refuses a sweep over a key the config leaves out of folder names
(`-m run.max_steps=3,5`: both jobs in one folder; `experiments.sweep_folder_keys`).

    if __name__ == "__main__":
        check_out_dir_argument(sys.argv[1:], CONFIG_DIR, "search")   # experiments.search, experiments.train
        sys.argv = with_experiment_job_folders(sys.argv)
        main()
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from experiments.cli_args import EXISTING_FILE, folder_problem
from experiments.cli_errors import USAGE_EXIT
from experiments.override_keys import sweep_command
from experiments.sweep_folder_keys import shared_folder_error

OUT_DIR_ARGUMENT = re.compile(r"^\+{0,2}out_dir=(?P<value>.*)$")


SWEPT_EXPERIMENT = re.compile(r"^\+{0,2}experiment=(?:.*,|\s*(?:choice|range|glob)\()")
# the job folder of a sweep over experiments: its overrides led by experiment=NAME (search.run_name)
EXPERIMENT_SUBDIR = "hydra.sweep.subdir='${ts_run_name:${hydra.job.override_dirname},${hydra.runtime.choices.experiment}}'"


def with_experiment_job_folders(argv: Sequence[str]) -> list[str]:
    """argv (sys.argv: the program first) with EXPERIMENT_SUBDIR added when it sweeps experiment=
    and sets no hydra.sweep.subdir itself; else argv unchanged."""
    arguments = list(argv)
    swept = any(SWEPT_EXPERIMENT.match(a) for a in arguments[1:])
    if not swept or any(a.lstrip("+").startswith("hydra.sweep.subdir=") for a in arguments[1:]):
        return arguments
    return arguments + [EXPERIMENT_SUBDIR]


def out_dir_error(argv: Sequence[str], config_dir: Path, config_name: str) -> str | None:
    """The error line for a literal out_dir that is a file (or lies under one), or that a sweep
    (-m, or a config that sets Hydra's MULTIRUN mode) would give every job; else None."""
    values = [match["value"] for argument in argv if (match := OUT_DIR_ARGUMENT.match(argument))]
    value = values[-1] if values else ""
    if value in ("", "null") or "${" in value:
        return None
    problem = folder_problem(Path(unquoted(value)))
    if problem is not None:  # a file where the folder goes: "give a folder"; the other problems say what to do
        advice = "; give a folder" if problem == EXISTING_FILE or problem.startswith("lies under") else ""
        return f"error: out_dir={value} {problem}{advice}"
    if not several_jobs(argv, config_dir, config_name):
        return None  # one run, or `-m` with nothing swept (one job submitted through a launcher)
    return (f"error: out_dir={value} with a sweep sends every job to that one folder; name the sweep's folder "
            f"with hydra.sweep.dir={value} instead (each job gets a sub-folder of it)")


def unquoted(value: str) -> str:
    """An override's value without the quotes Hydra's grammar takes off (out_dir='~/x' is ~/x)."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def several_jobs(argv: Sequence[str], config_dir: Path, config_name: str) -> bool:
    """Whether the command line is a sweep of more than one job: -m (or a config setting Hydra's
    MULTIRUN mode) with a swept override of several values, or a config that sets its own sweep
    (budget_sweep's hydra.sweeper.params). False where Hydra cannot parse or compose it (its own
    message then says why)."""
    sweep = sweep_command(argv, config_dir, config_name)
    if sweep is None:
        return False
    parsed, hydra_cfg = sweep
    # the sweep's own params (budget_sweep's), each replaced by a command-line override of its key, as Hydra's sweeper does
    swept = {str(key): f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()}
    swept.update({o.key_or_group: o.input_line for o in parsed if not o.key_or_group.startswith("hydra.")})
    try:
        jobs = 1
        for override in OverridesParser.create().parse_overrides([line.lstrip("+") for line in swept.values()]):
            if override.is_sweep_override():
                jobs *= len(list(override.sweep_string_iterator()))
    except HydraException:  # a glob, an interval (a sweeper that samples it): several
        return True
    return jobs > 1


def check_out_dir_argument(argv: Sequence[str], config_dir: Path, config_name: str) -> None:
    """Print the error line of `out_dir_error`, else of `shared_folder_error` (a sweep over a key
    left out of folder names: its jobs would share one folder) on the command line as it will run
    (`with_experiment_job_folders`), on stderr and exit 2 when there is one."""
    error = (out_dir_error(argv, config_dir, config_name)
             or shared_folder_error(with_experiment_job_folders(["", *argv])[1:], config_dir, config_name))
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)
