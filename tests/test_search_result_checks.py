"""`python -m experiments.search`'s checks of a reviewer's three findings:

1. what a strategy returns names it and its config as the registry's contract says (`strategy` the
   registered name, `config` `dataclasses.asdict(cfg)`): results saying "other", or n=3 for a run of
   n=8, were written and filed under that (exit 0); now one `error:` line, nothing of the chunk
   written. Every built-in strategy passes (lockstep and continuous batching);
2. `-m hydra/launcher=submitit_slurm` where SLURM's sbatch / srun is not on PATH: one `error:` line
   before Hydra runs (was Hydra's warnings and submitit's RuntimeError traceback, exit 1, with
   multirun.yaml written);
3. a task module of one's own run without `'~task.config'` got arith's ArithConfig in silence and
   failed inside with an AttributeError traceback: now one line saying so.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_search_result_checks.py -q
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir

from cli_batch import Case, CliRuns, Run
from experiments import group_options
from experiments.group_options import missing_launcher_commands
from experiments.search import CONFIG_DIR, load_task
import test_search_resume
from test_search_resume import run_in_process
from treesearch.registry import STRATEGIES
from treesearch.result_checks import identity_fault, same_as_written

torch.set_num_threads(1)
ckpt = test_search_resume.ckpt  # its module fixture: a tiny policy checkpoint

TINY = ["task.count=2", "chunk=2", "policy.sampling.max_total_tokens=8", "policy.sampling.max_step_tokens=4",
        "progress=false", "num_threads=1"]
UNWRITTEN = "nothing of this chunk was written to records.jsonl"
LABEL = "strategy badwrongname (badname_strategy.ShortestConfig)"
# README's custom strategy (ShortestConfig), registered as badwrongname; `mode` breaks what it returns
STRATEGY = '''
import dataclasses
from dataclasses import dataclass
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.registry import register

@dataclass(frozen=True)
class ShortestConfig:
    n: int = 4
    seed: int = 0
    mode: str = "ok"
    ops: tuple = ("+", "-")

def shortest(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    config = {
        "ok": dataclasses.asdict(cfg),
        "lists": {**dataclasses.asdict(cfg), "ops": list(cfg.ops)},  # as JSON writes a tuple: the same row
        "n3": {"n": 3, "seed": 0},  # the reviewer's: filed under N=3
    }.get(cfg.mode, dataclasses.asdict(cfg))
    name = "other" if cfg.mode == "other" else "badwrongname"
    return [dataclasses.replace(r, strategy=name, config=config) for r in results]

register("badwrongname", shortest, ShortestConfig)
'''
BAD = ["search._target_=badname_strategy.ShortestConfig", "~search.aggregation"]
# a task module with a config of its own, optional (`cfg=None`); task.split=buggy / subscript break it
TASK = '''
from dataclasses import dataclass
from treesearch.records import Problem

@dataclass(frozen=True)
class MyConfig:
    base: int = 10

def generate_problems(split, count, seed, cfg=None):
    if split == "buggy":
        raise RuntimeError("a bug in the task")
    cfg = cfg or MyConfig()
    base = cfg["base"] if split == "subscript" else cfg.base
    if base < 0:
        raise ValueError(f"MyConfig.base={base} must be >= 0")
    return [Problem(f"p{i}", f"{i} + {base} = ?", str(i + base)) for i in range(count)]

def prompt_text(problem):
    return problem.question

def grade(problem, text):
    return text.strip() == problem.answer

def extract_answer(text):
    return text.strip() or None
'''
ARITH_HINT = ("task.module='{module}' was given arith's ArithConfig (task.config of the default task, "
              "experiments/conf/task/arith.yaml), and its generate_problems raised AttributeError: 'ArithConfig' "
              "object has no attribute 'base'; set task.config for it ('~task.config' "
              "'+task.config={{_target_:{module}.MyConfig}}') or add '~task.config' to run it without one")


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory) -> Iterator[Path]:
    """The strategy and task modules above, importable; the registry and sys.modules as they were after."""
    folder = tmp_path_factory.mktemp("result_checks_modules")
    (folder / "badname_strategy.py").write_text(STRATEGY)
    (folder / "own_cfg_task.py").write_text(TASK)
    saved = dict(STRATEGIES)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        for name in ("badname_strategy", "own_cfg_task"):
            sys.modules.pop(name, None)
        STRATEGIES.clear()
        STRATEGIES.update(saved)


# -- 1: a result's strategy name and config ----------------------------------------------------


@pytest.mark.parametrize("option", ["best_of_n", "beam", "dvts", "mcts", "rebase", "particle_filtering", "greedy"])
@pytest.mark.parametrize("batching", ["lockstep", "continuous"])
def test_every_built_in_strategy_names_itself_and_its_config_as_it_ran(ckpt, tmp_path, option, batching):
    # continuous batching: each problem's search runs with its own seed (search_each), its row says so
    out = run_in_process([f"search={option}", "budget=4", f"+batching={batching}", f"policy.path={ckpt}",
                          f"out_dir={tmp_path / 'run'}", *TINY])
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("mode, fault", [
    # ran with exit 0 before: records.jsonl and metrics.json said "other" (sweep_metrics missed its ADDED_SETTINGS)
    ("other", "strategy='other', not 'badwrongname', the name it is registered under (records.jsonl, metrics.json "
              "and the sweep tables file its rows by it)"),
    # ran with exit 0 before: the sweep tables filed the run of n=8 under N=3
    ("n3", "config n=3, seed=0, no mode, ... where its search ran with n=8, seed={seed}, mode='n3', ... (a result's "
           "config is dataclasses.asdict(cfg): records.jsonl and the sweep tables file its rows by it)"),
])
def test_a_result_naming_another_strategy_or_config_is_refused_and_nothing_written(
    ckpt, user_modules, tmp_path, mode, fault,
):
    from experiments.search import chunk_config

    out = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        run_in_process([*BAD, f"+search.mode={mode}", "budget=8", f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    problems = load_task(composed(["task.count=2"]).task)[1]
    seed = chunk_config(user_config(), 0, problems).seed
    assert str(refused.value) == f"{LABEL} gave problem {problems[0].id!r} {fault.format(seed=seed)}; {UNWRITTEN}"
    assert not out.exists()  # refused before its first row: no claim left


def user_config():
    """The user's ShortestConfig as the run above builds it (n from budget=8)."""
    return sys.modules["badname_strategy"].ShortestConfig(n=8)


def test_a_config_that_differs_only_as_json_does_not_is_accepted(ckpt, user_modules, tmp_path):
    # a tuple returned as the list it is written as: the same row, so no refusal
    out = run_in_process([*BAD, "+search.mode=lists", "budget=2", f"policy.path={ckpt}", f"out_dir={tmp_path / 'run'}",
                          *TINY])
    assert '"ops": ["+", "-"]' in (out / "records.jsonl").read_text()


def test_configs_are_compared_as_records_write_them():
    assert same_as_written({"a": (1, 2), "b": math.nan}, {"b": math.nan, "a": [1, 2]})  # key order, tuple, NaN
    assert not same_as_written({"t": 1}, {"t": 1.0}) and not same_as_written({"f": True}, {"f": 1})  # written apart
    assert same_as_written({"p": Path("x")}, {"p": Path("x")})  # not JSON: compared as it is
    row = {"strategy": "s", "config": {"n": 2, "seed": 0}}
    assert identity_fault(row["strategy"], row["config"], "s", {"n": 2, "seed": 0}) is None
    assert identity_fault(row["strategy"], row["config"], "s", {"n": 2, "seed": 0, "depth": 3}).startswith(
        "config no depth where its search ran with depth=3 (")
    assert identity_fault(row["strategy"], None, "s", {"n": 2}).startswith("config=None, not the config its search ran")


# -- 2: the SLURM launcher where SLURM is not ------------------------------------------------


def test_submitit_slurm_without_sbatch_or_srun_is_named_for_a_sweep_only(monkeypatch):
    conf = CONFIG_DIR
    sweep = ["-m", "hydra/launcher=submitit_slurm", "budget=2,4"]
    monkeypatch.setattr(group_options.shutil, "which", lambda command: None)
    assert missing_launcher_commands(sweep, conf, "search") == (
        "error: hydra/launcher=submitit_slurm submits the sweep's jobs with SLURM's sbatch and srun, and sbatch and "
        "srun are not on PATH (no SLURM here): run it on the cluster's login node, or leave the launcher out to run "
        "the jobs here (hydra/launcher=local: two at a time)")
    # a sweep set by its experiment's config (hydra.mode: MULTIRUN) goes through the launcher too
    assert missing_launcher_commands(["experiment=budget_sweep", "hydra/launcher=submitit_slurm"], conf, "search")
    # no launcher runs: a single run, --run, or a flag that only prints
    for fine in (["hydra/launcher=submitit_slurm", "task.count=2"], [*sweep, "--cfg", "hydra"], [*sweep, "--help"],
                 ["-m", "hydra/launcher=local", "budget=2,4"], ["-m", "budget=2,4"]):
        assert missing_launcher_commands(fine, conf, "search") is None, fine
    monkeypatch.setattr(group_options.shutil, "which", lambda command: None if command == "srun" else f"/bin/{command}")
    assert ", and srun is not on PATH (no SLURM here)" in missing_launcher_commands(sweep, conf, "search")
    monkeypatch.setattr(group_options.shutil, "which", lambda command: f"/bin/{command}")  # on the cluster
    assert missing_launcher_commands(sweep, conf, "search") is None


# -- 3: a task module given the default task's config ------------------------------------------


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides)


def test_a_task_module_given_the_default_task_config_is_told_so_in_one_line(user_modules):
    # an AttributeError traceback before ('ArithConfig' object has no attribute 'base')
    with pytest.raises(ValueError) as refused:
        load_task(composed(["task.module=own_cfg_task", "task.count=4"]).task)
    assert str(refused.value) == ARITH_HINT.format(module="own_cfg_task")
    assert isinstance(refused.value.__cause__, AttributeError)
    # as the message says: without a config, or with its own
    assert len(load_task(composed(["task.module=own_cfg_task", "task.count=4", "~task.config"]).task)[1]) == 4
    own = ["~task.config", "+task.config={_target_:own_cfg_task.MyConfig,base:3}"]
    assert load_task(composed(["task.module=own_cfg_task", "task.count=1", *own]).task)[1][0].answer == "3"
    # another misuse of the config that Python's error names it in
    with pytest.raises(ValueError, match=r"^task.module='own_cfg_task' was given arith's ArithConfig \(.*raised "
                                         r"TypeError: 'ArithConfig' object is not subscriptable; set task.config"):
        load_task(composed(["task.module=own_cfg_task", "task.split=subscript"]).task)


def test_other_errors_of_generate_problems_pass_as_they_are(user_modules):
    # a bug of the module's own, given arith's config: not about the config, its traceback kept
    with pytest.raises(RuntimeError, match=r"^a bug in the task$"):
        load_task(composed(["task.module=own_cfg_task", "task.split=buggy"]).task)
    # its own config, raising: its own message
    own = ["~task.config", "+task.config={_target_:own_cfg_task.MyConfig,base:-1}"]
    with pytest.raises(ValueError, match=r"^MyConfig.base=-1 must be >= 0$"):
        load_task(composed(["task.module=own_cfg_task", *own]).task)
    # another task's config (countdown's, not the default one): what it raised, as before
    with pytest.raises(AttributeError, match="no attribute 'base'"):
        load_task(composed(["task=countdown", "task.module=own_cfg_task", "task.count=2"]).task)
    # arith itself, with its own config: its own error
    with pytest.raises(ValueError, match=r"^split='bogus'; valid: 'train', 'test'$"):
        load_task(composed(["task.count=2", "task.split=bogus"]).task)


# -- the command line: one error line, exit 2, nothing written -----------------------------------


def cli_cases(ckpt: Path) -> dict[str, Case]:
    """One `python -m experiments.search` case per finding (their modules written in the case's folder)."""
    return {
        "strategy": Case("experiments.search", (*BAD, "+search.mode=other", "budget=2", f"policy.path={ckpt}",
                                                "out_dir={cwd}/run", *TINY), (("badname_strategy.py", STRATEGY),)),
        "launcher": Case("experiments.search", ("-m", "hydra/launcher=submitit_slurm", "budget=2,4", "task.count=4",
                                                "hydra.sweep.dir={cwd}/sweep")),
        "train_launcher": Case("experiments.train", ("-m", "hydra/launcher=submitit_slurm", "run.max_steps=1,2",
                                                     "hydra.sweep.dir={cwd}/sweep")),
        "task": Case("experiments.search", ("task.module=cli_cfg_task", "task.count=4", "out_dir={cwd}/run"),
                     (("cli_cfg_task.py", TASK),)),
    }


@pytest.fixture(scope="module")
def cli_runs(ckpt, tmp_path_factory) -> dict[str, Run]:
    """The cases of `cli_cases`, run in one child Python (tests/cli_batch.py)."""
    cases = cli_cases(ckpt)
    runs = CliRuns(cases.values(), tmp_path_factory.mktemp("cli_runs"))
    return {name: runs[case] for name, case in cases.items()}


def assert_one_error_line(done: Run, start: str) -> None:
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(start), done.stderr


def test_a_misnamed_result_is_one_error_line_on_the_command_line(cli_runs):
    done = cli_runs["strategy"]
    assert_one_error_line(done, f"error: {LABEL} gave problem ")
    assert "strategy='other', not 'badwrongname'" in done.stderr and not (done.cwd / "run").exists()


@pytest.mark.parametrize("case", ["launcher", "train_launcher"])  # experiments.search and experiments.train
def test_a_slurm_sweep_without_slurm_is_one_error_line_before_hydra_runs(cli_runs, case):
    if shutil.which("sbatch") and shutil.which("srun"):
        pytest.skip("SLURM's sbatch and srun are on PATH here")
    done = cli_runs[case]
    assert_one_error_line(done, "error: hydra/launcher=submitit_slurm submits the sweep's jobs with SLURM's sbatch "
                                "and srun, and ")
    assert not (done.cwd / "sweep").exists()  # multirun.yaml was written there before


def test_a_task_module_given_arith_config_is_one_error_line_on_the_command_line(cli_runs):
    done = cli_runs["task"]
    assert_one_error_line(done, "error: " + ARITH_HINT.format(module="cli_cfg_task"))
    assert not (done.cwd / "run").exists()
