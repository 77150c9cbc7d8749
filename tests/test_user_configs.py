"""Config folders and components of a user's own: `--config-dir DIR` / `-cd DIR` /
`hydra.searchpath=[file://DIR]` add their groups' options to the early group check, and a
`_target_` that cannot be imported is one line naming its key before anything loads or is written.

    python -m pytest tests/test_user_configs.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config_keys import check_known_keys
from experiments.group_options import unknown_group_option, user_config_dirs
from test_search_resume import ckpt  # noqa: F401 (the module-scoped tiny checkpoint)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A config folder of one's own: a task option (arith, smaller) and a scorer option."""
    conf = tmp_path / "my_conf"
    (conf / "task").mkdir(parents=True)
    (conf / "scorer").mkdir()
    (conf / "task" / "arith_small.yaml").write_text((CONF / "task" / "arith.yaml").read_text().replace("count: 100", "count: 1"))
    (conf / "scorer" / "my_random.yaml").write_text("_target_: scorers.random_scorer.RandomScorer\nseed: 7\n")
    return conf


def test_a_command_lines_config_folders_are_read_as_hydra_reads_them(user_conf):
    assert user_config_dirs(["--config-dir", str(user_conf), "task=x"]) == [user_conf]
    assert user_config_dirs([f"--config-dir={user_conf}"]) == user_config_dirs(["-cd", str(user_conf)]) == [user_conf]
    assert user_config_dirs([f"hydra.searchpath=[file://{user_conf},pkg://experiments.conf]"]) == [user_conf, CONF]
    assert user_config_dirs(["++hydra.searchpath=[pkg://no_such_package]", "task=x"]) == []


@pytest.mark.parametrize("extra", [["--config-dir", "{conf}"], ["-cd", "{conf}"], ["hydra.searchpath=[file://{conf}]"]])
def test_a_user_folders_options_pass_the_group_check_and_are_listed(user_conf, extra):
    argv = [part.format(conf=user_conf) for part in extra]
    assert unknown_group_option([*argv, "task=arith_small", "scorer=my_random"], CONF, "search") is None
    error = unknown_group_option([*argv, "task=arith_smal"], CONF, "search")
    assert error.startswith("error: task=arith_smal is not an option of group task; valid: ") and "arith_small" in error
    # without the folder, the option is unknown as before
    assert unknown_group_option(["task=arith_small"], CONF, "search").startswith("error: task=arith_small is not")


def test_a_target_that_cannot_be_imported_names_its_key():
    node = OmegaConf.create({"scorer": {"_target_": "myscorrer.LengthScorer"},
                             "policy": {"sampling": {"_target_": "policies.sampling_config.SamplingConfg"}}})
    with pytest.raises(ValueError, match=r"^scorer._target_='myscorrer.LengthScorer' cannot be imported: .*"
                                         r"No module named 'myscorrer'.*on PYTHONPATH"):
        check_known_keys(node.scorer)
    with pytest.raises(ValueError, match=r"^policy.sampling._target_='policies.sampling_config.SamplingConfg' cannot be "
                                         r"imported: .*'SamplingConfg' is importable from module 'policies.sampling_config'"):
        check_known_keys(node.policy)
    check_known_keys(OmegaConf.create({"scorer": {"_target_": "scorers.random_scorer.RandomScorer", "seed": 1}}).scorer)


def search(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "experiments.search", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_a_search_runs_on_a_user_folders_options_and_a_bad_target_writes_nothing(ckpt, user_conf, tmp_path):  # noqa: F811
    common = [f"policy.path={ckpt}", "search.n=2", "policy.sampling.max_total_tokens=8", "progress=false"]
    done = search(["--config-dir", str(user_conf), "task=arith_small", "scorer=my_random", *common,
                   f"out_dir={tmp_path / 'mine'}"], tmp_path)
    assert done.returncode == 0, done.stderr
    saved = OmegaConf.load(tmp_path / "mine" / "config.yaml")
    assert saved.task.count == 1 and saved.scorer.seed == 7
    bad = search(["scorer._target_=myscorrer.LengthScorer", "~scorer.reduce", *common, f"out_dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("error: scorer._target_='myscorrer.LengthScorer' cannot be imported")
    assert not (tmp_path / "bad").exists()
