"""Command lines whose jobs would share a folder, or that name another command's config group,
refused with one `error:` line and exit 2 before Hydra runs.

A sweep over a key the config leaves out of folder names (train.yaml's run.max_steps,
num_threads, device, ...; search.yaml's num_threads, live_tree, progress) put every value's job in
one folder: `-m run.max_steps=3,5` resumed the 3-step run to 5 steps (`experiments.sweep_folder_keys`,
reached through `experiments.out_dir_args.check_out_dir_argument`, which both commands call). A
group of the other command (`python -m experiments.train experiment=budget_sweep`) was Hydra's
multi-line "Could not override 'experiment'. No match in the defaults list" and exit 1
(`experiments.group_options.unknown_group_option`). Direct calls, and one real
`python -m experiments.train -m ... run.max_steps=3,5`.

Run: `.venv/bin/python -m pytest tests/test_sweep_folder_keys.py`
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_batch import command_env
from experiments.group_options import default_groups, group_options, unknown_group_option
from experiments.out_dir_args import check_out_dir_argument

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"
ADVICE = "run each value as its own sweep with its own hydra.sweep.dir, or as single runs with their own out_dir"


def refusal(argv: list[str], config_name: str, capsys, conf: Path = CONF) -> str | None:
    """The one stderr line check_out_dir_argument exits 2 with, None when it passes argv."""
    try:
        check_out_dir_argument(argv, conf, config_name)
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        assert exit_info.code == 2 and len(err.splitlines()) == 1, err
        return err.strip()
    return None


SHARED_FOLDER_SWEEPS = [
    ("train", ["-m", "run.max_steps=3,5"], "run.max_steps over 3, 5"),
    ("train", ["-m", "run.seed=0,1", "num_threads=range(1,3)"], "num_threads over 1, 2"),
    ("train", ["-m", "device=choice(cpu,auto)", "run.max_minutes=5"], "device over cpu, auto"),
    ("train", ["-m", "run.checkpoint_every=interval(1,5)"], "run.checkpoint_every over interval(1,5)"),
    ("search", ["-m", "budget=2,4", "num_threads=1,2"], "num_threads over 1, 2"),
    ("search", ["-m", "live_tree=true,false"], "live_tree over True, False"),
    ("search", ["experiment=budget_sweep", "progress=true,false"], "progress over True, False"),  # a sweep by its config
]


@pytest.mark.parametrize("config_name, argv, swept", SHARED_FOLDER_SWEEPS)
def test_a_sweep_over_a_key_left_out_of_folder_names_is_one_error_line(config_name, argv, swept, capsys):
    # every job went to one folder: the 3-step job's weights were resumed to 5 steps, num_threads=2 did nothing
    key = swept.split(" over ")[0]
    assert refusal(argv, config_name, capsys) == (
        f"error: the sweep runs {swept}, and jobs that differ only in {key} would share one folder (the config leaves "
        f"{key} out of folder names, so that a run resumes under another value): {ADVICE}")


def test_a_key_left_out_of_folder_names_may_take_one_value_in_a_sweep(capsys):
    fine = [
        ("train", ["-m", "run.seed=0,1", "run.max_steps=5"]),  # the documented resume with a longer max_steps
        ("train", ["-m", "run.seed=0,1", "num_threads=range(1,2)"]),  # a range of one value
        ("train", ["run.max_steps=5", "num_threads=1"]),  # no sweep
        ("train", ["-m", "run.max_steps=3,5", "hydra.sweep.subdir=${hydra.job.num}"]),  # a folder per job
        ("train", ["-m", "run.max_steps=3,5", "hydra.sweep.subdir=s${run.max_steps}"]),  # a folder per value
        ("train", ["-m", "run.max_steps=3,5", "out_dir=runs/${hydra:job.num}"]),  # the user's own job folders
        ("train", ["--cfg", "job", "-m", "run.max_steps=3,5"]),  # launches nothing
        ("search", ["-m", "experiment=reasoning_low,reasoning_medium"]),  # out_dir_args names the experiment
        ("search", ["experiment=budget_sweep", "num_threads=2"]),
    ]
    for config_name, argv in fine:
        assert refusal(argv, config_name, capsys) is None, argv
    assert refusal(["-m", "run.seed=0,1", "run.max_steps=3,5"], "train", capsys).startswith(
        "error: the sweep runs run.max_steps over 3, 5, ")


def test_the_keys_left_out_are_read_from_the_composed_config(tmp_path, capsys):
    # an exclude list of the command line's own, or a config folder's, not a copy of train.yaml's
    assert refusal(["-m", "run.max_steps=3,5", "hydra.job.config.override_dirname.exclude_keys=[out_dir]"], "train", capsys) is None
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    train = conf / "train.yaml"
    train.write_text(train.read_text().replace("exclude_keys: [out_dir,", "exclude_keys: [out_dir, run.seed,"))
    assert refusal(["-m", "run.seed=0,1"], "train", capsys, conf).startswith("error: the sweep runs run.seed over 0, 1, ")
    assert refusal(["-m", "run.seed=0,1"], "train", capsys) is None


def test_an_experiment_that_sweeps_such_a_key_is_refused_unless_the_command_line_narrows_it(tmp_path, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "thread_sweep.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      budget: 2,4\n      num_threads: 1,2\n")
    assert refusal(["experiment=thread_sweep"], "search", capsys, conf) == (
        "error: the sweep runs num_threads over 1, 2 (hydra.sweeper.params: num_threads=1,2), and jobs that differ "
        "only in num_threads would share one folder (the config leaves num_threads out of folder names, so that a "
        f"run resumes under another value): {ADVICE}")
    assert refusal(["experiment=thread_sweep", "num_threads=1"], "search", capsys, conf) is None


def test_a_swept_key_left_out_of_folder_names_is_refused_before_hydra_writes_anything(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "run.max_steps=3,5", "run.prompts_per_step=2",
         "progress=false", "tensorboard=false", "num_threads=1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=command_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(
        "error: the sweep runs run.max_steps over 3, 5, and jobs that differ only in run.max_steps would share one folder"), done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []  # no sweep folder, no multirun.yaml, no outputs/


OTHER_COMMANDS_GROUPS = [
    ("train", ["experiment=budget_sweep"], "experiment", "search"),
    ("train", ["policy=tiny"], "policy", "search"),
    ("train", ["run.max_steps=5", "search=beam"], "search", "search"),
    ("train", ["-m", "scorer=sprm,confidence"], "scorer", "search"),
    ("train", ["experiment=nosuch"], "experiment", "search"),  # the group is what is wrong, not the option
    ("search", ["recipe=grpo_countdown"], "recipe", "train"),
    ("search", ["-m", "train_loss=bce,reference"], "train_loss", "train"),
]


@pytest.mark.parametrize("config_name, argv, group, owner", OTHER_COMMANDS_GROUPS)
def test_a_group_of_the_other_command_is_one_error_line(config_name, argv, group, owner):
    # Hydra's "Could not override 'experiment'. No match in the defaults list." (exit 1; a sweep left multirun.yaml)
    assert unknown_group_option(argv, CONF, config_name) == (
        f"error: {group} is a config group of experiments.{owner}, not of experiments.{config_name} "
        f"({config_name}.yaml's defaults list does not hold it)")


def test_every_group_a_command_takes_passes_and_plus_keeps_its_own_message():
    for config_name in ("train", "search"):
        for group in default_groups(CONF, config_name):
            for option in group_options(CONF, group):
                assert unknown_group_option([f"{group}={option}"], CONF, config_name) is None, (config_name, group, option)
    assert unknown_group_option(["recipe=grpo_countdown", "task=countdown", "train_loss=bce"], CONF, "train") is None
    # +policy=tiny adds a group train's config lacks: left as before, to train's check of the keys it reads
    # (experiments.override_keys.check_plain_keys: "policy is not a setting at the top level of experiments.train")
    assert unknown_group_option(["+policy=tiny"], CONF, "train") is None
    assert unknown_group_option(["policy=tiny"], CONF, "train").startswith("error: policy is a config group of ")
    assert unknown_group_option(["-cn", "search", "policy=tiny"], CONF, "train") is None  # another primary config
