"""A sweep over a key the config leaves out of its jobs' folder names, refused before Hydra runs.

A sweep job's folder is named by its overrides (hydra.sweep.subdir reads
`${hydra.job.override_dirname}`) less the keys of `hydra.job.config.override_dirname.exclude_keys`:
train.yaml leaves out run.max_steps, num_threads, device, progress, ... so that rerunning a run
with another value (a longer run.max_steps) resumes it; search.yaml leaves out num_threads,
progress, live_tree. Sweeping such a key put every value's job in one folder:
`python -m experiments.train -m run.max_steps=3,5` trained the 3-step job, then resumed the same
folder to 5 steps ("changed on resume: run.max_steps: 3 -> 5", the 3-step weights gone),
`-m num_threads=1,2` left the second job nothing to do, and under hydra/launcher=local the second
job was refused ("another process is writing into ..."). `shared_folder_error` names the key:

    error: the sweep runs run.max_steps over 3, 5, and jobs that differ only in run.max_steps would share one folder (the config leaves run.max_steps out of folder names, so that a run resumes under another value): run each value as its own sweep with its own hydra.sweep.dir, or as single runs with their own out_dir

The exclude list is read from the composed config (a command line or experiment that changes it
counts), and so are the sweeps an `experiment=` config sets (`hydra.sweeper.params`). Sweeps are
comma lists, range(), choice(), glob() (and interval(), counted as several values). A key given
one value (`-m run.seed=0,1 run.max_steps=5`) passes, as do out_dir (each job's own folder), a
sweep whose hydra.sweep.subdir names the key or the job number, a command line that gives an
out_dir (`experiments.out_dir_args` judges it), one Hydra cannot parse or compose (its own
message says why) and one with a flag that launches nothing (--cfg, --help).
`experiments.out_dir_args.check_out_dir_argument` runs this check on the command line as it
will run (with `with_experiment_job_folders`: `-m experiment=a,b` gets folders naming the
experiment, so that sweep passes):

    if __name__ == "__main__":
        check_sweep_folder_keys(sys.argv[1:], CONFIG_DIR, "train")   # or through check_out_dir_argument
        main()

Tests: `.venv/bin/python -m pytest tests/test_sweep_folder_keys.py`
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from experiments.cli_errors import USAGE_EXIT
from experiments.group_options import NOT_LAUNCHING
from experiments.override_keys import swept_values, sweep_command

FOLDER_KEYS = frozenset({"out_dir"})  # the run folder itself: a sweep over it gives each job its own
PER_JOB = re.compile(r"job[.:](?:num|id)\b")  # a hydra.sweep.subdir naming the job: a folder per job


def shared_folder_error(argv: Sequence[str], config_dir: Path, config_name: str) -> str | None:
    """The error line for a sweep (-m, or a config setting Hydra's MULTIRUN mode) that gives a
    key its config leaves out of folder names (exclude_keys) more than one value, else None."""
    if any(a.split("=", 1)[0] in NOT_LAUNCHING for a in argv):
        return None
    sweep = sweep_command(argv, config_dir, config_name)
    if sweep is None or gives_out_dir(sweep[0]):
        return None
    parsed, hydra_cfg = sweep
    excluded = set(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys", default=None) or ()) - FOLDER_KEYS
    subdir = str(OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir", ""))
    if PER_JOB.search(subdir):
        return None
    for key, (override, from_params) in swept_overrides(parsed, hydra_cfg).items():
        if key not in excluded or names_key(subdir, key) or not override.is_sweep_override():
            continue
        values = listed_values(override, config_dir)
        if values is None or len(values) > 1:
            where = f" (hydra.sweeper.params: {override.input_line})" if from_params else ""
            listed = override.input_line.split("=", 1)[1] if values is None else ", ".join(values)
            return (f"error: the sweep runs {key} over {listed}{where}, and jobs that differ only in {key} "
                    f"would share one folder (the config leaves {key} out of folder names, so that a run resumes under "
                    "another value): run each value as its own sweep with its own hydra.sweep.dir, or as single runs "
                    "with their own out_dir")
    return None


def swept_overrides(parsed: Sequence[Override], hydra_cfg: DictConfig) -> dict[str, tuple[Override, bool]]:
    """{key: (its override, whether it is the config's hydra.sweeper.params')}: the sweep's own
    params, each replaced by a command-line override of its key, as Hydra's sweeper does."""
    params = hydra_cfg.sweeper.get("params") or {}
    lines = {str(key): (f"{key}={value}", True) for key, value in params.items()}
    lines.update({o.key_or_group: (o.input_line, False) for o in parsed if not o.key_or_group.startswith("hydra")})
    swept: dict[str, tuple[Override, bool]] = {}
    for key, (line, from_params) in lines.items():
        try:
            swept[key] = (OverridesParser.create().parse_overrides([line.lstrip("+")])[0], from_params)
        except HydraException:
            continue  # Hydra's sweeper names it
    return swept


def listed_values(override: Override, config_dir: Path) -> list[str] | None:
    """The values a sweep override takes (a glob over a config group: its matching options); None
    for an interval, or a glob outside a group (several values a sweeper picks, not listable)."""
    try:
        return swept_values(override, config_dir / override.key_or_group)
    except HydraException:
        return None


def names_key(subdir: str, key: str) -> bool:
    """Whether a hydra.sweep.subdir interpolates the key itself (`${run.max_steps}`) or its group's
    choice (`${hydra.runtime.choices.experiment}`, with_experiment_job_folders' subdir)."""
    return re.search(r"\$\{(?:hydra[.:]runtime\.choices\.)?" + re.escape(key) + r"\}", subdir) is not None


def gives_out_dir(parsed: Sequence[Override]) -> bool:
    """Whether the command line names the run folder (out_dir other than null): a per-job
    interpolation is the user's own folder, a literal one `out_dir_error` refuses in a sweep."""
    return any(o.key_or_group == "out_dir" and o.value() not in (None, "null") for o in parsed)


def check_sweep_folder_keys(argv: Sequence[str], config_dir: Path, config_name: str) -> None:
    """Print the error line of `shared_folder_error` on stderr and exit 2 when there is one."""
    error = shared_folder_error(argv, config_dir, config_name)
    if error is not None:
        print(error, file=sys.stderr)
        raise SystemExit(USAGE_EXIT)
