"""A user's own strategy and task module in `python -m experiments.search`, and what breaks them:
a row the records' readers would refuse is refused before it is written (the folder stays
resumable); what a strategy returns is checked; a strategy config without `seed` or its budget
field is named before the policy loads (`treesearch.registry.register` checks the first);
a task's problems without question or answer are refused up front; a task without a config
runs (its generate_problems gets no cfg). Each error names the strategy or task module at fault.

    .venv/bin/python -m pytest tests/test_extension_errors.py -q
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from experiments.tasks import arith, countdown
import test_search_resume
from test_search_resume import run_in_process
from treesearch.registry import STRATEGIES, StrategySpec, register

torch.set_num_threads(1)
ckpt = test_search_resume.ckpt  # its module fixture: a tiny policy checkpoint

TINY = ["task.count=2", "chunk=2", "budget=2", "policy.sampling.max_total_tokens=8",
        "policy.sampling.max_step_tokens=4", "progress=false", "num_threads=1"]
EXT = ["search._target_=ext_strategy.ExtConfig", "~search.aggregation"]  # the default search node's extra key
LABEL = r"strategy ext \(ext_strategy\.ExtConfig\)"
UNWRITTEN = "nothing of this chunk was written to records.jsonl"

# a user's strategy: Best-of-N that can be told to break what it returns (`mode`), or to score
# one problem (`bad`) NaN
STRATEGY = '''
import dataclasses
import functools
from dataclasses import dataclass
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.registry import STRATEGIES, StrategySpec, register

@dataclass(frozen=True)
class ExtConfig:
    n: int = 2
    seed: int = 0
    mode: str = "ok"
    bad: str = ""

def ext_search(problems, policy, scorer, cfg, on_round=None, name="ext"):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    results = [dataclasses.replace(r, strategy=name, config=dataclasses.asdict(cfg)) for r in results]
    if cfg.bad:
        results = [r if r.problem.id != cfg.bad else dataclasses.replace(
            r, candidates=(dataclasses.replace(r.candidates[0], score=float("nan")), *r.candidates[1:]))
            for r in results]
    if cfg.mode == "noconfig":
        results = [dataclasses.replace(r, config={}) for r in results]
    return {
        "ok": results, "noconfig": results, "fewer": results[:-1], "reversed": results[::-1], "none": None,
        "dicts": [dataclasses.asdict(r.compute) for r in results],
        "chosen_neg": [dataclasses.replace(r, chosen=-1) for r in results],
        "chosen_oob": [dataclasses.replace(r, chosen=99) for r in results],
    }[cfg.mode]

register("ext", ext_search, ExtConfig)

@dataclass(frozen=True)
class NoSeedConfig:
    n: int = 2

@dataclass(frozen=True)
class ItersConfig:
    iterations: int = 2
    seed: int = 0

STRATEGIES["ext_noseed"] = StrategySpec(ext_search, NoSeedConfig)  # the old way in: no check
register("ext_iters", ext_search, ItersConfig)  # register cannot know experiments.search's budget field

@dataclass(frozen=True)
class PartialConfig(ExtConfig):
    pass

# a function without __name__ (its results named as registered: experiments.search checks that)
register("ext_partial", functools.partial(ext_search, name="ext_partial"), PartialConfig)
'''
TASKS = {
    # extract_answer returns an int: every reader of the records refused the run's rows
    "ext_task_int": '''
from experiments.tasks.arith import generate_problems, prompt_text, grade
def extract_answer(text):
    return 0
''',
    # a task without settings: generate_problems takes no cfg
    "ext_task_plain": '''
from experiments.tasks import arith
from experiments.tasks.arith import prompt_text, grade, extract_answer
def generate_problems(split, count, seed):
    return arith.generate_problems(split, count, seed)
''',
    # problems that cannot be searched or graded; task.split picks which
    "ext_task_bad": '''
import dataclasses
from experiments.tasks import arith
from experiments.tasks.arith import prompt_text, grade, extract_answer
import numpy as np
def generate_problems(split, count, seed, cfg=None):
    problems = arith.generate_problems("test", count, seed)
    broken = {"no_answer": {"answer": None}, "int_question": {"question": 42}, "blank_question": {"question": " "},
              "numpy_meta": {"meta": {**problems[1].meta, "level": np.int64(3)}}}  # a pandas / parquet loader's
    return [problems[0], dataclasses.replace(problems[1], **broken[split]), *problems[2:]]
''',
}


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory) -> Iterator[Path]:
    """The user's strategy and task modules, importable; the registry and sys.modules as they were after."""
    folder = tmp_path_factory.mktemp("user_modules")
    (folder / "ext_strategy.py").write_text(STRATEGY)
    for name, text in TASKS.items():
        (folder / f"{name}.py").write_text(text)
    saved = dict(STRATEGIES)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        for name in ("ext_strategy", *TASKS):
            sys.modules.pop(name, None)
        STRATEGIES.clear()
        STRATEGIES.update(saved)


def rows_of(out: Path) -> list[dict]:
    path = out / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def first_ids(count: int) -> list[str]:
    return [p.id for p in arith.generate_problems("test", count, 0)]


# -- A: a row the readers refuse is never written ----------------------------------------------


def test_a_bad_row_is_refused_before_it_is_written_and_the_folder_still_resumes(ckpt, user_modules, tmp_path):
    """A NaN score on the second chunk: the first chunk's row stays, the second is not appended
    (the next load refused the folder on every rerun); a rerun names the strategy again."""
    out, second = tmp_path / "run", first_ids(2)[1]
    one_per_chunk = [arg if not arg.startswith("chunk=") else "chunk=1" for arg in TINY]
    args = [*EXT, f"+search.bad={second}", f"policy.path={ckpt}", f"out_dir={out}", *one_per_chunk]
    message = rf"^{LABEL} gave candidate 0 of problem '{second}' score=nan, not a finite number; {UNWRITTEN}$"
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            run_in_process(args)
        assert [row["problem_id"] for row in rows_of(out)] == first_ids(1)


@pytest.mark.parametrize("overrides, message", [
    (["task.module=ext_task_int"],  # rows with answer=0: "candidates[0] has answer=0, not text or null" at the next load
     r"^task module ext_task_int: extract_answer returned int 0 for candidate 0 of problem '[^']+', not a str or None; "),
    ([*EXT, "+search.mode=noconfig"],  # a result whose config lacks the budget: "has config.n=None" at the next load
     rf"^{LABEL} on task module experiments.tasks.arith made a row records.jsonl cannot hold: the row of problem "
     r"'[^']+' has config.n=None, not a strategy's name and a config with an integer budget >= 1; "),
])
def test_a_row_of_a_broken_task_or_strategy_is_refused_naming_it_and_nothing_is_written(
    ckpt, user_modules, tmp_path, overrides, message,
):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message + UNWRITTEN):
        run_in_process([*overrides, f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    assert not (out / "records.jsonl").exists() and not out.exists()  # refused before its first row: no claim left


# -- B: what a strategy returns ----------------------------------------------------------------


@pytest.mark.parametrize("mode, fault", [
    ("fewer", r"returned 1 results for 2 problems: one SearchResult per problem, in the problems' order"),
    ("none", r"returned NoneType None, not a list of SearchResult \(one per problem\)"),
    ("dicts", r"gave a dict for problem '[^']+', not a SearchResult"),
    ("reversed", r"gave a result of problem '[^']+' where problem '[^']+' was due \(the problems' order\)"),
    ("chosen_neg", r"gave problem '[^']+' chosen=-1, not None or an index of its 2 candidates \(0 to 1\)"),
    ("chosen_oob", r"gave problem '[^']+' chosen=99, not None or an index of its 2 candidates \(0 to 1\)"),
])
def test_what_a_strategy_returns_is_checked_naming_it(ckpt, user_modules, tmp_path, mode, fault):
    """A dropped problem was accepted (exit 0, never filled in), chosen=-1 graded as the last
    candidate; 99, None and dicts were tracebacks."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^{LABEL} {fault}; {UNWRITTEN}$"):
        run_in_process([*EXT, f"+search.mode={mode}", f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    assert not out.exists()


# -- C: the strategy contract ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["search._target_=ext_strategy.NoSeedConfig", "~search.aggregation", "~search.seed"],
     r"^strategy ext_noseed \(ext_strategy\.NoSeedConfig\) has no field 'seed': a strategy's config needs `seed`"),
    (["search._target_=ext_strategy.ItersConfig", "~search.aggregation", "~search.n", "+search.iterations=2"],
     r"^strategy ext_iters \(ext_strategy\.ItersConfig\) has no field 'n': a strategy's config needs `n`"),
])
def test_a_strategy_config_without_seed_or_budget_field_is_named_before_the_policy_loads(
    user_modules, tmp_path, overrides, message,
):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):  # the policy folder does not exist: never loaded
        run_in_process([*overrides, f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


def test_register_checks_the_contract_and_a_registered_strategy_runs_end_to_end(ckpt, user_modules, tmp_path):
    import ext_strategy  # registered itself with register() on import

    fn, config = ext_strategy.ext_search, ext_strategy.ExtConfig
    assert register("ext", fn, config) == StrategySpec(fn, config)  # the same again (imported twice): a no-op
    with pytest.raises(ValueError, match=r"^strategy ext is registered already"):
        register("ext", ext_strategy.ext_search, ext_strategy.ItersConfig)
    with pytest.raises(ValueError, match=r"^strategy ext_partial is registered already \(fn functools\.partial\("):
        register("ext_partial", ext_strategy.ext_search, ext_strategy.ItersConfig)  # the held fn has no name
    with pytest.raises(ValueError, match=r"^strategy ext2: config ExtConfig is strategy ext's already"):
        register("ext2", fn, config)
    with pytest.raises(ValueError, match=r"^strategy ext3: config NoSeedConfig has no field 'seed'"):
        register("ext3", fn, ext_strategy.NoSeedConfig)
    with pytest.raises(ValueError, match=r"^strategy ext3: config=.* must be a dataclass"):
        register("ext3", fn, config())  # an instance, not the class
    with pytest.raises(ValueError, match=r"^strategy ext3: fn=None is not callable"):
        register("ext3", None, dataclasses.make_dataclass("Other", [("n", int), ("seed", int)]))
    assert "ext2" not in STRATEGIES and "ext3" not in STRATEGIES

    out = tmp_path / "run"
    run_in_process([*EXT, f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    rows = rows_of(out)
    assert [row["problem_id"] for row in rows] == first_ids(2)
    assert {row["strategy"] for row in rows} == {"ext"} and all(row["config"]["n"] == 2 for row in rows)


def test_the_live_tree_and_progress_bar_name_a_strategy_by_its_registered_name(
    ckpt, user_modules, tmp_path, monkeypatch, capsys,
):
    """They took the function's name: ext_search for ext, an AttributeError for a functools.partial."""
    from experiments.live_tree import LiveTree
    from experiments.search import strategy_name

    followed = []
    real_follow = LiveTree.follow

    def follow(self, problem_id, strategy, config, problem=None):
        followed.append(strategy)
        return real_follow(self, problem_id, strategy, config, problem)

    monkeypatch.setattr(LiveTree, "follow", follow)
    out = tmp_path / "run"
    progress = [arg if arg != "progress=false" else "progress=true" for arg in TINY]
    run_in_process(["search._target_=ext_strategy.PartialConfig", "~search.aggregation", f"policy.path={ckpt}",
                    f"out_dir={out}", "live_tree=true", *progress])
    assert followed == ["ext_partial"] and (out / "live_tree.json").exists()
    assert "ext_partial: 100%" in capsys.readouterr().err
    assert strategy_name(STRATEGIES["ext"]) == "ext" and strategy_name(STRATEGIES["best_of_n"]) == "best_of_n"


# -- D: a task's problems ----------------------------------------------------------------------


@pytest.mark.parametrize("split, message", [
    ("no_answer", r"has answer=None, not a str \(the reference answer grade compares with\)$"),
    ("int_question", r"has question=42, not a non-empty str$"),
    ("blank_question", r"has question=' ', not a non-empty str$"),
    ("numpy_meta", r"has meta\['level'\]=\S*3\)?, not JSON \(Object of type int64 is not JSON serializable\): rows "
                   r"and result JSON hold meta; use str, int, float, bool, None, lists and dicts of them$"),
])
def test_a_problem_without_question_or_answer_is_refused_before_the_policy_loads(user_modules, tmp_path, split, message):
    """An answer of None was searched and counted wrong; question=42 searched and recorded; a
    numpy number in meta was a TypeError traceback once the chunk had been searched."""
    out, second = tmp_path / "run", first_ids(2)[1]
    with pytest.raises(ValueError, match=rf"^task module ext_task_bad: problem '{second}' \(#2\) {message}"):
        run_in_process(["task.module=ext_task_bad", f"task.split={split}", "~task.config", "task.count=2",
                        f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


def test_the_built_in_generated_tasks_pass_the_problem_check():
    from experiments.search import check_problem_fields

    check_problem_fields("experiments.tasks.arith", arith.generate_problems("test", 300, 0))
    check_problem_fields("experiments.tasks.countdown", countdown.generate_problems("test", 30, 0))


def test_the_problem_check_is_the_strategies_own_with_the_task_module_named():
    # one check (treesearch.config_checks.problem_fault) for both paths; the task's answer must be a str
    from experiments.search import check_problem_fields

    good = arith.generate_problems("test", 1, 0)[0]
    cases = [
        (dataclasses.replace(good, id=7), r"^task module m: problem 2 has id=7, not a str$"),
        (dataclasses.replace(good, meta=None), r"^task module m: problem '[^']+' \(#2\) has meta=None, not a dict$"),
        (dataclasses.replace(good, meta={"tags": {"a"}}),
         r"^task module m: problem '[^']+' \(#2\) has meta\['tags'\]=\{'a'\}, not JSON \(Object of type set"),
        (dataclasses.replace(good, answer=3), r"has answer=3, not a str \(the reference answer grade compares with\)$"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            check_problem_fields("m", [good, bad])


# -- E: a task without a config ----------------------------------------------------------------


@pytest.mark.parametrize("module, config", [
    ("ext_task_plain", "~task.config"),  # omegaconf's ConfigAttributeError
    ("ext_task_plain", "task.config=null"),  # a TypeError
    ("experiments.tasks.arith", "task.config=null"),  # arith's default ArithConfig
])
def test_a_task_without_config_gets_no_cfg_and_runs(ckpt, user_modules, tmp_path, module, config):
    out = tmp_path / "run"
    run_in_process([f"task.module={module}", config, f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    assert [row["problem_id"] for row in rows_of(out)] == first_ids(2)


@pytest.mark.parametrize("mode, fault", [
    ("dicts", r"gave a dict for problem '[^']+', not a SearchResult"),
    ("none", r"returned NoneType None for problem '[^']+', not a list of SearchResult \(one per problem\)"),
])
def test_under_continuous_batching_what_a_strategy_returns_is_checked_naming_it(ckpt, user_modules, tmp_path, mode,
                                                                                 fault):
    # each problem's search runs in search_each, which names the strategy as experiments.search does
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^{LABEL} {fault}; {UNWRITTEN}$"):
        run_in_process([*EXT, f"+search.mode={mode}", f"policy.path={ckpt}", f"out_dir={out}", *TINY,
                        "+batching=continuous"])
    assert not out.exists()
