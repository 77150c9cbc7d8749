"""Every Hydra config of `experiments/conf` composes and instantiates; config errors are clear; the
search entry runs every strategy at a tiny budget; every experiment file sweeps valid configs.

A tiny random checkpoint in tmp stands in for the trained policy (`tests/tiny_checkpoint.py`).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from experiments.search import CONFIG_DIR, ConfigMismatchError, build, build_frozen, load_task, run_search_experiment, strategy_of
from experiments.tasks import arith
from policies.transformers_policy import TransformersPolicy
from scorers.outcome_oracle import OutcomeOracleScorer
from tiny_checkpoint import save_tiny_checkpoint
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Step

torch.set_num_threads(1)

GROUPS = ("policy", "scorer", "search", "task")
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# a budget every strategy accepts at tiny size (beam / dvts: n divisible by beam_width)
TINY = ["task.count=2", "chunk=2", "budget=2", "policy.sampling.max_total_tokens=8",
        "policy.sampling.max_step_tokens=4", "progress=false"]
TINY_BY_STRATEGY = {
    "best_of_n": [], "greedy": [],
    "beam": ["search.beam_width=2", "search.max_depth=3"],
    "dvts": ["search.beam_width=2", "search.max_depth=3"],
    "mcts": ["search.expand_width=2", "search.leaves_per_round=2", "search.max_depth=3"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


def composed(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides, return_hydra_config=hydra_node)


def test_every_group_has_the_promised_options():
    assert options("search") == ["beam", "best_of_n", "dvts", "greedy", "mcts"]
    assert options("scorer") == ["confidence", "oracle", "random"]
    assert options("policy") == ["tiny"] and options("task") == ["arith"]
    assert EXPERIMENTS == ["budget_sweep", "scorer_sweep"]


def test_default_checkpoint_path_is_the_trained_tiny_policy():
    assert composed([]).policy.path == "outputs/checkpoints/tiny-arith/final"


@pytest.mark.parametrize("option", options("policy"))
def test_policy_options_instantiate(option, ckpt):
    policy = build(composed([f"policy={option}", f"policy.path={ckpt}"]).policy)
    assert isinstance(policy, TransformersPolicy) and policy.num_parameters > 0
    assert policy.prompt_fn is arith.prompt_text and policy.sampling.temperature == arith.DEFAULT_TEMPERATURE


@pytest.mark.parametrize("option", options("scorer"))
def test_scorer_options_instantiate(option):
    scorer = build(composed([f"scorer={option}"]).scorer)
    assert isinstance(scorer, Scorer)


@pytest.mark.parametrize("option", options("search"))
def test_search_options_instantiate_registered_configs(option):
    cfg = composed([f"search={option}", "budget=8", "seed=3"])
    name, _ = strategy_of(build_frozen(cfg.search))
    assert name == {"beam": "beam_search", "greedy": "best_of_n"}.get(option, option)
    assert cfg.search.seed == 3


def test_greedy_is_best_of_one_at_temperature_zero():
    cfg = composed(["search=greedy"])
    assert build_frozen(cfg.search).n == 1 and cfg.policy.sampling.temperature == 0.0


@pytest.mark.parametrize("option", options("task"))
def test_task_options_make_problems(option):
    cfg = composed([f"task={option}", "task.count=3", "task.config.max_ops=2"])
    task, problems = load_task(cfg.task)
    assert len(problems) == 3 and all(p.meta["num_ops"] == 2 for p in problems)
    assert build_frozen(cfg.task.config).operations == ("+", "-", "*")  # a tuple, as the dataclass wants
    assert task.grade(problems[0], arith.solution_text(problems[0]))


@pytest.mark.parametrize("launcher", ["basic", "local", "joblib"])
def test_launcher_options_compose(launcher):
    cfg = composed([f"hydra/launcher={launcher}"], hydra_node=True)
    assert launcher.replace("local", "joblib") in cfg.hydra.launcher._target_.lower()
    if launcher == "local":
        assert cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_sweeps_only_valid_configs(experiment):
    """Compose every job of the experiment's sweep and build its components (a bad combination,
    e.g. a budget the beam width does not divide, fails here rather than mid-sweep)."""
    cfg = composed([f"experiment={experiment}"], hydra_node=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweep.dir == f"outputs/sweeps/{experiment}"
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert len(params) >= 2
    for combo in itertools.product(*params.values()):
        job = composed([f"experiment={experiment}"] + [f"{k}={v}" for k, v in zip(params, combo)])
        strategy_of(build_frozen(job.search))
        build(job.scorer)


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        composed(["search=nope"])
    for name in options("search"):
        assert name in str(err.value)


def test_impossible_strategy_config_names_the_values(tmp_path):
    cfg = composed(["search=beam", "search.n=4", "search.beam_width=8", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"BeamSearchConfig.beam_width=8 must be <= n=4"):
        run_search_experiment(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_checkpoint_names_the_folder(tmp_path):
    cfg = composed([f"policy.path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        build(cfg.policy)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build(composed([f"policy.path={tmp_path / 'half'}"]).policy)
    # through the entry point the error also says how to make the default checkpoint
    with pytest.raises(FileNotFoundError, match=r"nope does not exist\. Train the default tiny policy"):
        run_search_experiment(composed([f"policy.path={tmp_path / 'nope'}", f"out_dir={tmp_path / 'run'}"] + TINY))
    assert not (tmp_path / "run" / "records.jsonl").exists()


def _step(text: str, finish: str) -> Step:
    return Step(text, (1,), (-0.1,), finish)


def test_outcome_oracle_scores_finished_paths_by_grade():
    (problem,) = arith.generate_problems("test", 1, seed=0)
    oracle = OutcomeOracleScorer(grade=arith.grade)
    right = Prefix(problem, (_step("x.\n\n", "separator"), _step(f"</think>Answer: {problem.answer}", "eos")))
    wrong = Prefix(problem, (_step("x.\n\n", "separator"), _step("</think>Answer: -1", "eos")))
    open_ = Prefix(problem, (_step("x.\n\n", "separator"),))
    assert oracle.score([right, wrong, open_, Prefix(problem)]) == [[1.0, 1.0], [0.0, 0.0], [0.5], []]
    assert oracle.cost([right]) == 0
    with pytest.raises(ValueError, match="unfinished=2"):
        OutcomeOracleScorer(grade=arith.grade, unfinished=2)


@pytest.mark.parametrize("strategy", sorted(TINY_BY_STRATEGY))
def test_search_entry_smoke_runs_every_strategy(strategy, ckpt, tmp_path):
    out = tmp_path / strategy
    overrides = [f"search={strategy}", f"policy.path={ckpt}", f"out_dir={out}"] + TINY + TINY_BY_STRATEGY[strategy]
    assert run_search_experiment(composed(overrides)) == out
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len({r["problem_id"] for r in rows}) == 2
    expected = {"beam": "beam_search", "greedy": "best_of_n"}.get(strategy, strategy)
    for row in rows:
        assert row["strategy"] == expected and row["candidates"] and row["chosen"] is not None
        assert row["compute"]["tokens_generated"] > 0 and row["policy_parameters"] > 0
        assert {"text", "answer", "correct", "score", "step_scores"} <= row["candidates"][0].keys()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems"] == 2 and 0.0 <= metrics["accuracy"]["mean"] <= 1.0
    assert metrics["compute"]["C"] == pytest.approx(metrics["compute"]["policy_parameters"] * metrics["compute"]["tokens_generated"])
    assert (out / "config.yaml").is_file()


def test_search_entry_with_the_oracle_scorer(ckpt, tmp_path):
    out = tmp_path / "oracle"
    run_search_experiment(composed(["scorer=oracle", f"policy.path={ckpt}", f"out_dir={out}"] + TINY))
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for row in rows:  # a finished candidate's score is its grade (0 clamps to 1e-10 in the geometric mean)
        for c in row["candidates"]:
            assert c["finish"] == "separator" or abs(c["score"] - (1.0 if c["correct"] else 0.0)) < 1e-9


def test_out_dir_with_another_config_is_refused(ckpt, tmp_path):
    out = tmp_path / "run"
    base = [f"policy.path={ckpt}", f"out_dir={out}"] + TINY
    with pytest.raises(FileNotFoundError):  # fails before its first row: the folder stays free
        run_search_experiment(composed(base[1:] + [f"policy.path={tmp_path / 'nope'}", "search.n=4"]))
    run_search_experiment(composed(base))
    run_search_experiment(composed(base + ["progress=true", "num_threads=1"]))  # ignored keys: resumes
    with pytest.raises(ConfigMismatchError, match=r"search.n: 2 -> 4") as err:
        run_search_experiment(composed(base + ["search.n=4"]))
    assert "refusing to mix" in str(err.value)
    with pytest.raises(ConfigMismatchError, match=r"scorer._target_"):
        run_search_experiment(composed(base + ["scorer=random"]))
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigMismatchError, match="no config.yaml"):
        run_search_experiment(composed(base))
