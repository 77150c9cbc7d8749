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


STRATEGY = '''
import dataclasses
from dataclasses import dataclass
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.registry import register

@dataclass(frozen=True)
class ShortestConfig:
    n: int = 2
    seed: int = 0

def shortest(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    return [dataclasses.replace(r, strategy="shortest", config=dataclasses.asdict(cfg)) for r in results]

register("shortest", shortest, ShortestConfig)
'''


def test_a_registered_strategy_runs_in_a_joblib_sweep(ckpt, tmp_path):  # noqa: F811
    # the workers got experiments.search's functions by value, with a copy of the registry taken
    # before the user's module was imported: every job was "not a registered strategy config"
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    (tmp_path / "mystrategy.py").write_text(STRATEGY)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.search", "-m", "search._target_=mystrategy.ShortestConfig",
         "~search.aggregation", f"policy.path={ckpt}", "task.count=1", "budget=2", "policy.sampling.max_total_tokens=8",
         "progress=false", "num_threads=1", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    (records,) = (tmp_path / "sweep").rglob("records.jsonl")
    assert '"strategy": "shortest"' in records.read_text()


def test_a_task_module_of_the_wrong_shape_is_named_before_anything_loads(tmp_path, monkeypatch):
    from omegaconf import OmegaConf as Conf

    from experiments.search import load_task

    monkeypatch.syspath_prepend(str(tmp_path))
    common = "def prompt_text(p): return p.question\ndef grade(p, t): return False\ndef extract_answer(t): return None\n"
    (tmp_path / "nocfg_task.py").write_text(
        "from treesearch.records import Problem\n" + common +
        "def generate_problems(split, count, seed):\n    yield from (Problem(f'p{i}', 'q', '1') for i in range(count))\n")
    (tmp_path / "nograde_task.py").write_text(common.replace("def grade(p, t): return False\n", "") +
                                              "def generate_problems(split, count, seed): return []\n")
    task = {"module": "nocfg_task", "split": "test", "count": 2, "seed": 0}
    _, problems = load_task(Conf.create(task))
    assert [p.id for p in problems] == ["p0", "p1"]  # a generator's problems, as a list
    with pytest.raises(ValueError, match=r"^task.module='nocfg_task': generate_problems\(split, count, seed\) cannot "
                                         r"be called with split, count, seed, config; it takes no config: add '~task.config'"):
        load_task(Conf.create({**task, "config": {"_target_": "experiments.tasks.arith.ArithConfig"}}))
    with pytest.raises(ValueError, match=r"^task.module='nograde_task' has no function grade: a task module provides"):
        load_task(Conf.create({**task, "module": "nograde_task"}))
    (tmp_path / "cfg_task.py").write_text(common + "def generate_problems(split, count, seed, cfg): return []\n")
    with pytest.raises(ValueError, match=r"^task.module='cfg_task': generate_problems\(split, count, seed, cfg\) cannot "
                                         r"be called with split, count, seed; it needs a config: task.config is missing"):
        load_task(Conf.create({**task, "module": "cfg_task"}))
    assert load_task(Conf.create({**task, "module": "experiments.tasks.arith"}))[1]  # a default config: none needed


def test_a_module_that_raises_on_import_is_named_with_its_own_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "raising_scorer.py").write_text("raise ValueError('my scorer module is broken')\n")
    node = OmegaConf.create({"scorer": {"_target_": "raising_scorer.Scorer"}})
    with pytest.raises(ValueError, match=r"^scorer._target_='raising_scorer.Scorer': importing it raised ValueError: "
                                         r"my scorer module is broken$"):
        check_known_keys(node.scorer)
