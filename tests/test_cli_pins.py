"""Pins for command-line and config checks that a mutation review found unpinned elsewhere.

Direct calls only (no search run, no subprocess, no model). What is pinned: strategy configs refuse
a zero temperature and a negative lookahead (`treesearch.config_checks`); a policy whose
num_parameters is a bool is refused; resume overrides quote saved strings that Hydra would read as
true / false / null in any case (`treesearch.config_diff`); the argparse types' bounds (torch's
seed range, TCP ports, finite floats) and the file-target checks (`experiments.cli_args`); the
last `out_dir=` on a command line is the one checked, and a sweep over experiments gets job
folders unless it names its own (`experiments.out_dir_args`); `chunk` >= 1 and run folder names
kept within their byte limit (`experiments.search`, imported lazily: it loads torch).

Run: `.venv/bin/python -m pytest tests/test_cli_pins.py`
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from experiments.cli_args import check_file_target, check_seed, file_above, finite_float, port_number, seed_int
from experiments.out_dir_args import EXPERIMENT_SUBDIR, out_dir_error, with_experiment_job_folders
from fakes import FakePolicy, OracleScorer
from treesearch.beam_search import BeamSearchConfig
from treesearch.config_checks import check_components
from treesearch.config_diff import resume_overrides
from treesearch.particle_filtering import ParticleFilteringConfig
from treesearch.rebase import RebaseConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "conf"


def read_back(override: str):
    """The value Hydra's override parser reads from one `key=value` override."""
    return OverridesParser.create().parse_overrides([override])[0].value()


# -- treesearch.config_checks ----------------------------------------------------------------------


def test_a_zero_temperature_is_refused():
    # pins: check_positive refuses value <= 0, not only value < 0
    with pytest.raises(ValueError, match=r"ParticleFilteringConfig\.temperature=0\.0 must be a finite number > 0"):
        ParticleFilteringConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"RebaseConfig\.balance_temperature=0\.0 must be a finite number > 0"):
        RebaseConfig(balance_temperature=0.0)
    assert ParticleFilteringConfig(temperature=0.5).temperature == 0.5


def test_a_negative_lookahead_is_refused_though_its_minimum_is_zero():
    # pins: check_int applies minimum=0 (a falsy minimum) too
    with pytest.raises(ValueError, match=r"BeamSearchConfig\.lookahead=-1 must be an integer >= 0"):
        BeamSearchConfig(lookahead=-1)
    assert BeamSearchConfig(lookahead=0).lookahead == 0


def test_a_policy_whose_num_parameters_is_a_bool_is_refused():
    check_components(FakePolicy(), OracleScorer())  # an int passes
    # pins: True (an Integral) is no parameter count
    with pytest.raises(TypeError, match=r"the policy's num_parameters must be an integer >= 0.*got True"):
        check_components(FakePolicy(num_parameters=True), OracleScorer())


# -- treesearch.config_diff ------------------------------------------------------------------------


@pytest.mark.parametrize("saved", ["True", "NULL", "False", "Null", "TRUE"])
def test_a_saved_string_hydra_reads_as_a_keyword_in_any_case_is_written_back_as_that_string(saved):
    overrides = resume_overrides({"task": {"name": saved}}, {"task": {"name": "x"}})
    assert len(overrides) == 1 and overrides[0].startswith("task.name=")
    # pins: Hydra reads True / NULL case-insensitively: unquoted they came back a bool or None
    value = read_back(overrides[0])
    assert value == saved and type(value) is str


# -- experiments.cli_args --------------------------------------------------------------------------


def test_check_seed_refuses_a_seed_torch_does_not_take():
    check_seed("seed", 2**64 - 1)
    check_seed("seed", -2**63)
    for bad in (2**70, 2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=rf"seed={bad} must be an integer from"):
            check_seed("seed", bad)


def test_seed_int_takes_torch_s_whole_seed_range_and_no_more():
    assert seed_int(str(2**64 - 1)) == 2**64 - 1
    assert seed_int(str(-2**63)) == -2**63
    for bad in (str(2**64), str(-2**63 - 1), "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="torch's seeds"):
            seed_int(bad)


def test_port_number_takes_1_to_65535():
    assert port_number("65535") == 65535 and port_number("1") == 1
    for bad in ("65536", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a port number in 1-65535"):
            port_number(bad)


def test_finite_float_refuses_infinities_and_nan():
    assert finite_float("-2.5") == -2.5
    for bad in ("inf", "-inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
            finite_float(bad)


def test_file_above_finds_an_existing_file_several_levels_up(tmp_path):
    (tmp_path / "file").write_text("x")
    assert file_above(tmp_path / "file" / "b" / "c.json") == tmp_path / "file"
    assert file_above(tmp_path / "file" / "c.json") == tmp_path / "file"
    assert file_above(tmp_path / "folder" / "c.json") is None


def test_a_folder_given_as_a_file_target_is_refused_with_a_file_name_inside_it(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a file path such as") as err:
        check_file_target(tmp_path, "--out")
    assert str(tmp_path / "out.json") in str(err.value) and str(err.value).startswith("--out ")
    check_file_target(tmp_path / "new.json", "--out")  # a new file in a folder passes


# -- experiments.out_dir_args ----------------------------------------------------------------------


def test_the_last_out_dir_on_a_command_line_is_the_one_checked(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    ok = tmp_path / "ok"
    # pins: Hydra keeps the last of repeated overrides, so out_dir_error reads values[-1]
    assert out_dir_error([f"out_dir={file}", f"out_dir={ok}"], CONFIG_DIR, "search") is None
    assert out_dir_error([f"out_dir={ok}", f"out_dir={file}"], CONFIG_DIR, "search") == (
        f"error: out_dir={file} is an existing file; give a folder")


def test_a_sweep_over_experiments_gets_job_folders_unless_it_names_its_own():
    argv = ["search", "-m", "experiment=a,b"]
    assert with_experiment_job_folders(argv) == argv + [EXPERIMENT_SUBDIR]
    for own in ("hydra.sweep.subdir=x", "+hydra.sweep.subdir=x"):
        given = argv + [own]
        assert with_experiment_job_folders(given) == given
    single = ["search", "-m", "experiment=a", "seed=0,1"]
    assert with_experiment_job_folders(single) == single


# -- experiments.search ----------------------------------------------------------------------------


def test_check_run_scalars_refuses_chunk_zero():
    from omegaconf import OmegaConf

    from experiments.search import check_run_scalars

    check_run_scalars(OmegaConf.create({"seed": 0, "budget": 1, "chunk": 1}))
    with pytest.raises(ValueError, match=r"chunk=0 must be an integer >= 1"):
        check_run_scalars(OmegaConf.create({"seed": 0, "budget": 1, "chunk": 0}))


def test_a_multibyte_run_name_is_cut_by_its_bytes():
    from experiments.search import MAX_RUN_NAME, run_name

    overrides = "task.name=" + "é" * 150  # 160 characters, 310 bytes
    name = run_name(overrides)
    # pins: the limit is on bytes (a file name's), not characters
    assert len(name.encode("utf-8")) <= MAX_RUN_NAME + 15 < 255
    assert name.startswith("task.name=é") and name != overrides


def test_a_folder_a_run_cannot_write_is_named_before_the_work(tmp_path, monkeypatch):
    # a dangling symlink or a loop passed the checks (exists() is False) and failed with "File exists"
    # at the first checkpoint or after the work; an unwritable place with a PermissionError after it
    from experiments.cli_args import check_folder_target, folder_problem
    from experiments.out_dir_args import out_dir_error

    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for name in ("dangling", "loop"):
        assert folder_problem(tmp_path / name) == "is a symbolic link to nothing (a missing folder, or a loop)"
    assert folder_problem(tmp_path / "file") == "is an existing file"
    assert folder_problem(tmp_path / "file" / "run") == f"lies under {tmp_path / 'file'}, an existing file"
    assert folder_problem(tmp_path / "new" / "run") is None
    with pytest.raises(ValueError, match=r"--out .*dangling is a symbolic link to nothing"):
        check_folder_target(tmp_path / "dangling", "--out")
    assert out_dir_error([f"out_dir={tmp_path / 'loop'}"], Path("unused"), "search") == (
        f"error: out_dir={tmp_path / 'loop'} is a symbolic link to nothing (a missing folder, or a loop)")
    assert out_dir_error(["out_dir='~/x'"], Path("unused"), "search") == (
        "error: out_dir='~/x' starts with '~', which no shell expanded here (it would be a folder named '~'): give "
        "$HOME/... or the full path")
    with pytest.raises(ValueError, match=r"--out ~/cache.pt starts with '~', which no shell expanded here"):
        check_file_target(Path("~/cache.pt"), "--out")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as a user without write permission
    assert folder_problem(tmp_path / "new" / "run") == f"cannot be written (no write permission on {tmp_path})"


def test_train_sft_refuses_a_dangling_out_link_before_training(tmp_path, capsys):
    from experiments import train_sft

    (tmp_path / "out").symlink_to(tmp_path / "missing")
    assert train_sft.main(["--out", str(tmp_path / "out"), "--max-steps", "1", "--eval-problems", "0"]) == 2
    assert "is a symbolic link to nothing" in capsys.readouterr().err
