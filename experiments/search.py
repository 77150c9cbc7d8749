"""`python -m experiments.search`: run a search strategy over a task's problems, resumably (Hydra).

    python -m experiments.search                                        # Best-of-8, confidence, 100 arith problems
    python -m experiments.search search=beam search.n=16 task.count=50
    python -m experiments.search search=greedy scorer=oracle out_dir=runs/greedy
    python -m experiments.search -m search=best_of_n,beam budget=4,8 seed=0,1   # a sweep
    python -m experiments.search experiment=budget_sweep                        # strategy x budget x seed
    python -m experiments.search experiment=budget_sweep hydra/launcher=local num_threads=1  # 2 at a time
    python -m experiments.search search=beam chunk=16 +batching=continuous    # continuous batching

Configs live in `experiments/conf/` (primary: `search.yaml`); every component is built with
`hydra.utils.instantiate` from `_target_` nodes that mirror the constructors: `policy`, `scorer`,
`search` (the strategy's config dataclass; the strategy is the registry entry of that class) and
`task` (a module with generate_problems / prompt_text / grade / extract_answer, plus its config).

A run folder receives (one folder per run: `out_dir=` when given, which is then also Hydra's run
dir holding `.hydra/` and `search.log`; else outputs/search/<overrides>; a sweep's job folder):
  records.jsonl  one row per problem (`experiments.outcomes.record` + policy_parameters):
                 problem, strategy and its config, candidates (texts, answers, grades, step
                 scores, scores), chosen index, correct, compute;
  config.yaml    the resolved config; its `budget` is the one the strategy ran with (search.n, or
                 search.iterations for MCTS), so `search.n=4` is not saved beside an unused
                 `budget: 8` (MCTS with a token budget keeps `budget` as given: the N the run is
                 filed under, `experiments.sweep_metrics.run_budget`);
  metrics.json   `experiments.sweep_metrics.run_metrics` over the run's problems.

Resuming: problems run in fixed chunks of `chunk` problems; each chunk's seed is a hash of the
run seed and the chunk's problem ids, so a chunk gives the same results whenever it runs (under
batching=continuous up to float rounding, ~1e-7 in scores: thread timing decides which calls a
decode step batches). Each
finished chunk's rows are appended as complete lines with one write + fsync
(`experiments.record_log`); after a kill, rerunning the same command drops a torn last line,
reruns only chunks with a missing problem and appends only the missing rows: no duplicates,
nothing lost, the same records as an uninterrupted run. A folder whose config.yaml differs from
the current config (ignoring `IGNORED_KEYS`: out_dir, progress, num_threads, live_tree and the
policy's / scorer's connection settings) is refused, never mixed. A lock
file stops two processes from writing one folder at once.

Errors: bad input (a ValueError or FileNotFoundError: a bad value, a missing file, a task without
problems, a folder of another config; or a folder in use) prints one line `error: <message>` on
stderr and exits 2. The config's values and the task's problems are checked before the policy
loads or the run folder is written (a folder Hydra made for a refused run, holding only its own
files, is removed again); so is the strategy's config class (a `seed` field and its budget field,
`treesearch.registry`). What a strategy returns, and the rows made of it, are checked before a
chunk's rows are appended (one `SearchResult` per problem in order, `chosen` an index of its
candidates, finite scores, the task's extract_answer / grade types, `sweep_metrics.check_rows`,
`strategy` the registered name and `config` the one it ran with, `check_row_identity`; the
library's checks, `treesearch.result_checks`):
a refusal names the strategy or the task module, and nothing of that chunk is written. In a
sweep (-m) each bad job's message is printed without a traceback as `error: job #<k> (<its
overrides>): <message>`, the other jobs run, and the sweep exits 1 (Hydra's). HYDRA_FULL_ERROR=1
shows the full traceback instead; any other exception is a bug and keeps its traceback.

`run_search_experiment(cfg)` is the plain function (tests call it with `hydra.compose`); `main`
is the thin `@hydra.main` around it. Tests: `.venv/bin/pytest tests/test_experiment_configs.py
tests/test_search_resume.py tests/test_search_cli.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from experiments.startup_interrupt import quiet_start

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from experiments.broken_pipe import stdout_closed_quietly
from experiments.checkpoint_hints import (
    HEAD_FILE, check_not_a_run_folder, checkpoint_hint, hinted_checkpoint, trained_task_note,
)
from experiments.config_keys import check_known_keys
from experiments.cli_errors import (
    RunDirBusyError, check_no_chdir, error_text, hydra_rerun_hint, interrupt_reported, note_hydra_job, is_storage_error,
)
from experiments.gpu_room import VLLM_ENGINE_TARGET, check_room_for_scorer, cpu_scorer_note
from experiments.group_options import check_group_options, check_launcher_commands
from experiments.launcher_watch import launcher_watched
from experiments.model_folder_target import check_not_model_folder
from experiments.out_dir_args import check_out_dir_argument, with_experiment_job_folders
from experiments.override_keys import check_override_keys, check_plain_keys, check_refused_keys
from experiments.live_tree import LIVE_TREE_FILE, LiveTree, is_live_file
from experiments.outcomes import grade_results, record
from experiments.record_log import append_rows, check_row_questions, load_rows
from experiments.result_json import write_atomic
from experiments.run_weights import (
    WEIGHTS_FILE, check_run_weights, check_served_models, model_folders, read_saved, served_models,
)
from experiments.sweep_metrics import (
    ADDED_SETTINGS, BUDGET_FIELDS, RECORD_KEYS, RunFolderError, check_rows, read_run_config, run_metrics,
)
from experiments.tasks.benchmark_split import check_unique_ids
from policies.checkpoint import torch_dtype
from policies.devices import resolve_device
from policies.gc_freeze import freeze_long_lived
from policies.reflective_model import check_reflective_folder
from policies.sampling_config import SamplingConfig, check_vllm_temperature
from policies.openai_policy import OpenAIServerError
from policies.vllm_engine import VLLMMissingError, process_environment
from scorers.prm_loading import check_prm_folder
from scorers.sprm_scorer import check_batch_size
from treesearch.concurrent import problem_seed, search_each, seeded_for
from treesearch.config_checks import is_int, problem_fault
from treesearch.config_diff import config_differences, resume_overrides, with_added_settings
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.records import Problem
from treesearch import registry
from treesearch.registry import StrategySpec
from treesearch.result_checks import ResultError, check_results, identity_fault
from treesearch.steps import StepFormat

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
# keys that do not change what a run computes (left out of the config comparison): top-level
# ones, and a served component's connection settings (the timeout error's own advice, "raise
# timeout_s", was refused as another config; a rotated API key too; a base URL with or without
# its /v1, or a server moved to another port: the served model's id in weights.json guards the rows)
CONNECTION_KEYS: tuple[str, ...] = ("base_url", "timeout_s", "max_retries", "backoff_s", "max_concurrency", "api_key")
IGNORED_KEYS: tuple[str, ...] = ("out_dir", "progress", "num_threads", "live_tree",
                                 *(f"{node}.{key}" for node in ("policy", "scorer") for key in CONNECTION_KEYS))
# top-level settings whose absence means this value: `+batching=lockstep` resumes a run made
# without it and the other way round (the same computation)
DEFAULT_SETTINGS: dict[str, Any] = {"batching": "lockstep"}
RECORDS, CONFIG, METRICS, LOCK = "records.jsonl", "config.yaml", "metrics.json", ".lock"
HYDRA_SUBDIR = ".hydra"  # Hydra's record of the invocation, written by `save_hydra_files`
# what a run writes into its folder before its first row (`release_claim` removes them again when
# the run is refused then: a missing model folder, a scorer that does not load)
CLAIM_FILES: tuple[str, ...] = (CONFIG, WEIGHTS_FILE, HYDRA_SUBDIR, LOCK)
# what another command's run folder holds (experiments.train: last/, ckpt-*/, metrics.jsonl; train_sft:
# final/, sft_summary.json; train_head: metrics.jsonl, final/): a search there replaced its config.yaml
# and metrics.json, and the training could not resume
# (reference/ and heldout_rollouts.jsonl: a joint training run's, written before its first metrics row)
FOREIGN_RUN_FILES: tuple[str, ...] = ("last", "final", "sft_summary.json", "metrics.jsonl", "reference", "heldout_rollouts.jsonl")
# what a folder of several runs holds (a sweep: multirun.yaml, sweep_metrics.json; the demo: report.md;
# either: sub-folders of runs): a search at its root mixed its rows into the sweep's tables
RESULTS_FOLDER_FILES: tuple[str, ...] = ("multirun.yaml", "sweep_metrics.json", "report.md")
# `+batching=`: lockstep (default: every round of a chunk's problems in one policy call) or
# continuous (each problem searched in its own thread, the policy decoding whatever calls wait
# together: `policies.continuous_engine`; a problem's samples are then those of searching it alone)
BATCHING: tuple[str, ...] = ("lockstep", "continuous")
# the settings of the nodes no class is built from (the top level, task): `+budjet=16` or
# `+task.shuffle=true` composed and ran, recorded in config.yaml and never read
TASK_KEYS: tuple[str, ...] = ("module", "split", "count", "seed", "config")  # a task node's (experiments.train's too)
PLAIN_NODE_KEYS: dict[str, tuple[str, ...]] = {
    "": ("policy", "scorer", "search", "task", "seed", "budget", "chunk", "out_dir", "progress", "num_threads",
         "live_tree", "batching"),
    "task": TASK_KEYS,
}

# hydra.run.dir / hydra.sweep.subdir: the override string ("/" in a value made "_", so a path
# stays one folder), or "default" when there is none; a name longer than a file name may be
# (255 bytes) keeps its first MAX_RUN_NAME characters and a hash of the whole
MAX_RUN_NAME = 200


def run_name(overrides: str, experiment: str | None = None) -> str:
    """The run folder name of an override string (see above), e.g. "task=countdown,run.seed=1",
    led by "experiment=NAME," for a single run of an experiment file (a sweep's folder names it)."""
    if experiment:
        overrides = f"experiment={experiment}" + (f",{overrides}" if overrides else "")
    name = overrides.replace("/", "_") or "default"
    if len(name.encode("utf-8")) <= MAX_RUN_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f"{name.encode('utf-8')[:MAX_RUN_NAME].decode('utf-8', 'ignore')}...{digest}"


def run_dir(out_dir: str | None, default: str) -> str:
    """hydra.run.dir: out_dir when given (so one run leaves one folder), else default."""
    return str(out_dir) if out_dir else default


OmegaConf.register_new_resolver("ts_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("ts_run_dir", run_dir, replace=True)


class ConfigMismatchError(ValueError):
    """The run folder holds records of another config."""


class SweepJobInputError(CompactHydraException):
    """Bad input of one job of a sweep: Hydra prints the message without a traceback."""


# bad input (the message names the key and value, or the file), and a server that does not answer
# (policy=openai: the error names the URL and how to start one): `error: <message>`, exit 2;
# anything else keeps its traceback
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RunDirBusyError, ConnectionError,
                                            TimeoutError, OpenAIServerError, VLLMMissingError)
USAGE_EXIT = 2


class Task(Protocol):
    """What `task.module` must provide (experiments/tasks/arith.py does). generate_problems gets
    the built `task.config` as cfg, and no cfg at all when task.config is missing or null (a task
    without settings: `def generate_problems(split, count, seed)`); its problems' questions must
    be non-empty text and their answers text (`check_has_problems`). extract_answer returns a str
    or None, grade True or False (`experiments.outcomes.grade_result` checks them)."""

    def generate_problems(self, split: str, count: int, seed: int, cfg: Any) -> list[Problem]: ...
    def prompt_text(self, problem: Problem) -> str: ...
    def grade(self, problem: Problem, completion_text: str) -> bool: ...
    def extract_answer(self, text: str) -> str | None: ...


# -- validating the top-level keys -------------------------------------------------------------


def check_int(key: str, value: Any, minimum: int | None = None, or_else: str = "") -> int:
    """value when it is an integer (not a bool, not a string) >= minimum; else a ValueError
    naming the key and the value (or_else: the other valid values, e.g. ", or null for ...")."""
    if is_int(value) and (minimum is None or value >= minimum):
        return value
    bound = "" if minimum is None else f" >= {minimum}"
    raise ValueError(f"{key}={value!r} must be an integer{bound}{or_else}")


def check_run_scalars(cfg: DictConfig) -> None:
    """The top-level scalars, before anything is loaded or written: seed an integer (a string
    would be hashed into some seed; search.seed, its interpolation, not set apart from it), budget
    and chunk integers >= 1, num_threads null (torch's default) or an integer >= 1 (0 means
    nothing), progress and live_tree true or false."""
    check_int("seed", cfg.get("seed"))
    search_seed = cfg.get("search", {}).get("seed", cfg.get("seed"))
    check_int("search.seed", search_seed)  # 1.5 was told "pass seed=1.5 instead", which is refused
    if search_seed != cfg.get("seed"):  # run_chunk seeds every chunk from the top-level seed
        raise ValueError(f"search.seed={search_seed!r} differs from seed={cfg.get('seed')!r}: each chunk's seed derives "
                         f"from the top-level seed, so search.seed would be recorded and not used; pass seed={search_seed} "
                         "instead")
    check_int("budget", cfg.get("budget"), minimum=1)
    check_int("chunk", cfg.get("chunk"), minimum=1)
    if cfg.get("num_threads") is not None:
        check_int("num_threads", cfg.num_threads, minimum=1, or_else=", or null for torch's default")
    check_switches(cfg, ("progress", "live_tree"))


def check_switches(cfg: DictConfig, keys: Sequence[str]) -> None:
    """ValueError naming the first of the top-level `keys` (on-off settings) that is set to
    anything but true or false (tensorboard=maybe ran, was saved and read as bool("maybe"))."""
    for key in keys:
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key}={cfg[key]!r} must be true or false")


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """The named logger silenced for the block."""
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


# scorers that hold settings only (nothing loaded): built once up front to check them
LIGHT_SCORERS: tuple[str, ...] = (
    "scorers.confidence.ConfidenceScorer", "scorers.random_scorer.RandomScorer",
    "scorers.outcome_oracle.OutcomeOracleScorer", "scorers.step_score_reader.StepScoreReader",
    "scorers.step_oracle.StepOracleScorer.for_task",  # a task without step labels was named after the policy loaded
)


def check_light_scorer(node: DictConfig) -> None:
    """Build the scorer once now when it is one of LIGHT_SCORERS, so a bad setting of it
    (`scorer.reduce=median`) is named before the policy loads and the run folder is written;
    any other scorer (a model of its own, a user's class that may load one) is built once, with
    the policy."""
    if node.get("_target_") not in LIGHT_SCORERS:
        return
    close = getattr(build_scorer(node), "close", None)
    if callable(close):
        close()


# external PRMs of a model folder (scorer=math_shepherd, qwen_prm, rlhflow_prm, vllm_prm, served_prm)
PRM_SCORERS: tuple[str, ...] = (
    "scorers.lm_prm_scorer.LMPRMScorer.from_pretrained", "scorers.vllm_lm_prm_scorer.VLLMLMPRMScorer.from_pretrained",
    "scorers.served_prm_scorer.ServedPRMScorer.from_pretrained",
)


def check_prm_scorer(node: DictConfig) -> None:
    """For an external PRM: its folder (config.json, damaged files) and its device, named before
    the policy loads (they were found after it: a GPU preset's engine first, with $QWEN_PRM_PATH unset)."""
    if node.get("_target_") not in PRM_SCORERS or not isinstance(node.get("path"), str):
        return
    if isinstance(node.get("device"), str):
        resolve_device(node.device)
    with hinted_checkpoint(node.path, "scorer.path"):  # with how to get one, as when the scorer is built
        check_prm_folder(Path(node.path))


SPRM_FORWARD = "scorers.sprm_scorer.SPRMScorer.from_pretrained"  # scorer=sprm_forward (and orm)
HEAD_SCORERS: tuple[str, ...] = (SPRM_FORWARD, "scorers.vllm_sprm_scorer.VLLMSPRMScorer.from_pretrained")


def check_head_scorer(node: DictConfig) -> None:
    """For a scorer that loads a reflective folder's head (scorer=sprm_forward, vllm_sprm): its
    folder, score_module.pt and feature_layer, and a vLLM engine that can read that layer, named
    before the policy loads (they were found after it: minutes of a vLLM engine on a GPU)."""
    if node.get("_target_") not in HEAD_SCORERS or not isinstance(node.get("path"), str):
        return
    if node.get("_target_") == SPRM_FORWARD:  # its own settings, found after the policy loaded
        check_batch_size(node.get("batch_size", 16))
        torch_dtype(node.get("dtype", "float32"))
        if isinstance(node.get("device"), str):
            resolve_device(node.device)
    try:
        layer, states = check_reflective_folder(node.path, node.get("feature_layer"))
    except FileNotFoundError as err:  # with how to get one, as when the scorer is built
        raise FileNotFoundError(f"{err}. {checkpoint_hint(node.path, err, 'scorer.path')}") from err
    last = layer == -1 or (states is not None and layer == states - 1)  # vLLM's own output: no class of ours
    if node.get("_target_") != SPRM_FORWARD and not last:  # an architecture vLLM cannot stop early: named now
        from transformers import AutoConfig

        from policies.vllm_layer_features import feature_overrides

        feature_overrides(AutoConfig.from_pretrained(node.path), layer)
    if OmegaConf.select(node, "engine.multiprocessing", default=False) and not last:
        raise ValueError("scorer.engine.multiprocessing=true: the SPRM's feature layer is read through a model class "
                         "registered in this process only (policies/vllm_layer_features.py); set it false (and "
                         "policy.engine.multiprocessing=false, which it must match)")


# the engine settings vLLM reads from its process environment (`policies.vllm_engine.process_environment`)
PROCESS_WIDE_ENGINE_KEYS: dict[str, str] = {"multiprocessing": "VLLM_ENABLE_V1_MULTIPROCESSING", "cache_root": "VLLM_CACHE_ROOT"}


def check_engines_agree(cfg: DictConfig) -> None:
    """A vLLM policy and a vLLM scorer (scorer=vllm_sprm, vllm_prm) must share the settings vLLM
    reads once per process, and fit on one GPU together (`check_engine_shares`): a ValueError
    naming both keys before any engine loads (the scorer's engine refused them after the policy's
    had loaded: minutes of a GPU preset)."""
    nodes = {name: OmegaConf.select(cfg, f"{name}.engine", default=None) for name in ("policy", "scorer")}
    if not all(isinstance(node, DictConfig) and node.get("_target_") == VLLM_ENGINE_TARGET for node in nodes.values()):
        return
    check_engine_shares(nodes["policy"], nodes["scorer"])
    wanted = {name: process_environment(node) for name, node in nodes.items()}  # type: ignore[arg-type]
    for key, variable in PROCESS_WIDE_ENGINE_KEYS.items():
        if wanted["policy"][variable] != wanted["scorer"][variable]:
            raise ValueError(
                f"policy.engine.{key}={nodes['policy'].get(key)!r} and scorer.engine.{key}={nodes['scorer'].get(key)!r}: "
                f"vLLM reads {variable} once per process, so both engines of a run need the same {key}; set them alike")


def note_cpu_scorer(cfg: DictConfig) -> None:
    """`gpu_room.cpu_scorer_note` on stderr: a vLLM policy on this machine's GPU, its scorer's model on the CPU."""
    import torch  # loaded by the policy anyway; not at import time

    note = cpu_scorer_note(cfg, torch.cuda.is_available())
    if note is not None:
        print(note, file=sys.stderr)


def check_engine_shares(policy: DictConfig, scorer: DictConfig) -> None:
    """Two vLLM engines on one GPU (each GPU worker asks for gpu_memory_utilization x the GPU's
    memory free when it starts, whatever its kv_cache_gib), or two that size their KV cache from
    it (kv_cache_gib null; vLLM's CPU worker checks that too): their shares must sum to at most 1
    (both at the presets' 0.9, the second engine failed to start after the first had loaded:
    minutes of a 32B model)."""
    import torch  # loaded by the policy anyway; not at import time (`--help`, config checks)

    sized_from_share = policy.get("kv_cache_gib") is None and scorer.get("kv_cache_gib") is None
    if not (sized_from_share or torch.cuda.is_available()):
        return
    shares = [float(node.get("gpu_memory_utilization", 0.9)) for node in (policy, scorer)]
    if sum(shares) > 1:
        raise ValueError(
            f"policy.engine.gpu_memory_utilization={shares[0]:g} and scorer.engine.gpu_memory_utilization={shares[1]:g} "
            "sum above 1: the two vLLM engines share the GPU; give them shares that fit, e.g. "
            "policy.engine.gpu_memory_utilization=0.55 scorer.engine.gpu_memory_utilization=0.3")


def check_method_paths(node: Any, where: str = "") -> None:
    """A ValueError naming the first `hydra.utils.get_method` node under node whose `path` names no
    function (`policy.prompt_fn.path=experiments.tasks.arith.nosuch`: Hydra's multi-line
    InstantiationException once the policy was being built)."""
    if isinstance(node, DictConfig):
        if node.get("_target_") == "hydra.utils.get_method" and isinstance(node.get("path"), str):
            try:
                with quiet_logger("hydra.utils"):  # it logs the failure as an ERROR line before raising
                    get_method(node.path)
            except Exception as err:  # noqa: BLE001 - Hydra's ImportError / ValueError / AttributeError alike
                message = " ".join(str(err).split())
                raise ValueError(f"{where}path={node.path!r} names no function ({message:.300})") from None
        for key in node.keys():
            check_method_paths(node.get(key), f"{where}{key}.")


def check_component_keys(cfg: DictConfig) -> None:
    """Every key of search / task / policy / scorer is one its target takes (`+search.bogus=1`,
    `policy.sampling.temprature=0.5` refused naming the key), and every key of the top level and
    of task one the search reads (PLAIN_NODE_KEYS: `+budjet=16`), before anything loads or is written."""
    for section in ("search", "task", "policy", "scorer"):
        node = cfg.get(section)
        if isinstance(node, DictConfig):
            check_known_keys(node)
    check_plain_keys(cfg, PLAIN_NODE_KEYS, "experiments.search")


def set_num_threads(num_threads: int | None) -> None:
    """torch's CPU threads (None: torch's default, left alone)."""
    if num_threads is not None:
        import torch  # only to set threads; the policy imports it anyway

        torch.set_num_threads(num_threads)


# -- building components ------------------------------------------------------------------------


def strategy_of(strategy_cfg: Any) -> tuple[str, StrategySpec]:
    """The registry entry whose config class `strategy_cfg` is an instance of."""
    for name, spec in registry.STRATEGIES.items():  # through the module: a sweep's joblib workers
        # get `__main__`'s functions by value, with a copy of a dict read as a global of theirs
        if type(strategy_cfg) is spec.config:
            return name, spec
    valid = ", ".join(f"{spec.config.__name__} ({name})" for name, spec in registry.STRATEGIES.items())
    raise ValueError(f"search config {type(strategy_cfg).__name__} is not a registered strategy config; valid: {valid}")


def strategy_label(spec: StrategySpec) -> str:
    """How an error names a strategy: `strategy shortest (mystrategy.ShortestConfig)`."""
    name = registered_name(spec)
    config = f"{spec.config.__module__}.{spec.config.__qualname__}"
    return f"strategy {name} ({config})" if name else f"strategy {config}"


def registered_name(spec: StrategySpec) -> str | None:
    """The name the strategy is registered under (`shortest`), None when it is not registered."""
    names = [name for name, entry in registry.STRATEGIES.items() if entry == spec]
    return names[0] if names else None


def strategy_name(spec: StrategySpec) -> str:
    """How the live tree and the progress bar name a strategy: its registered name (not its
    function's: a functools.partial has none), else its config class's name."""
    return registered_name(spec) or spec.config.__qualname__


def check_strategy_fields(name: str, spec: StrategySpec) -> None:
    """A ValueError, before the policy loads, when the strategy's config class lacks `seed` (each
    chunk's seed is set through it: a TypeError after the policy had loaded) or its budget field
    (`n`, MCTS's `iterations`: BUDGET_FIELDS; every row records it and the run is filed under it)."""
    have = {field.name for field in dataclasses.fields(spec.config)} if dataclasses.is_dataclass(spec.config) else set()
    budget = BUDGET_FIELDS.get(name, "n")
    for field, why in (("seed", "each chunk's sampling seed is set through it"),
                       (budget, "the budget each row records and a sweep files the run under")):
        if field not in have:
            raise ValueError(f"{strategy_label(spec)} has no field {field!r}: a strategy's config needs `{field}` "
                             f"({why}; see treesearch/registry.py)")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """instantiate a component; a key its target does not take is a ValueError naming it
    (`check_known_keys`), and a constructor's own ValueError / TypeError / FileNotFoundError
    (which name the bad value or the missing file) is raised as itself, not wrapped by Hydra."""
    check_known_keys(node)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError, VLLMMissingError)):
            raise cause from None
        raise


def build_frozen(node: DictConfig) -> Any:
    """Build a config dataclass; list fields become tuples (frozen configs hold tuples; a kwarg
    given to `instantiate` would be turned back into a ListConfig, so the tuples are put in after)."""
    built = build(node, _convert_="all")
    lists = {key: tuple(value) for key, value in node.items() if isinstance(value, ListConfig)}
    return dataclasses.replace(built, **lists) if lists else built


def check_policy_sampling(policy_cfg: DictConfig) -> None:
    """Build the policy's sampling settings (`policy.sampling`, a small validated record) before
    the policy loads or the run folder is written, so a bad value is refused up front, named by
    its key (`policy.sampling.top_p=2 must be in (0, 1]`)."""
    sampling = policy_cfg.get("sampling")
    if isinstance(sampling, DictConfig) and "_target_" in sampling:
        with named_settings("policy.sampling."):
            build(sampling)


@contextlib.contextmanager
def named_settings(prefix: str) -> Iterator[None]:
    """A record's ValueError that names a field as `field=value ...` (or `Record.field=value ...`)
    re-raised naming the key (prefix + field), so `scorer.step_format.` and `policy.sampling.`
    errors tell apart."""
    try:
        yield
    except ValueError as err:
        named = re.match(r"(?:[A-Z]\w*\.)?(?=[a-z_]+=)", str(err))
        if named is None:
            raise
        raise ValueError(prefix + str(err)[named.end():]) from None


# the policy modules whose backend samples no temperature in (0, VLLM_MIN_TEMPERATURE)
VLLM_SAMPLED_POLICIES = ("policies.vllm_policy.", "policies.openai_policy.")


def check_lookahead_temperature(strategy_cfg: Any, policy_target: str | None) -> None:
    """A beam search / DVTS lookahead_temperature the vLLM or OpenAI backend cannot sample at
    (in (0, 0.01)) refused before the policy loads, named by its key: it was refused by
    `with_temperature` once the engine had started (minutes on a GPU), naming VLLMPolicy's
    temperature, which the user had not set."""
    temperature = getattr(strategy_cfg, "lookahead_temperature", None)
    if temperature is None or not getattr(strategy_cfg, "lookahead", 0):
        return
    if str(policy_target or "").startswith(VLLM_SAMPLED_POLICIES):
        check_vllm_temperature(temperature, "search.lookahead_temperature")


# the fields of a head scorer's step_format that must equal the policy's sampling fields
STEP_FORMAT_FIELDS: tuple[str, ...] = ("separator", "think_open", "think_close", "separator_match")


def check_head_step_format(cfg: DictConfig) -> None:
    """A head scorer's (scorer=sprm_forward, vllm_sprm) step_format is valid and ends steps where
    the policy's do, before the policy loads: another separator_match read the head at positions
    inside the policy's steps (an exact policy step holding ').\\n\\n' read twice), and a bad
    value was found after the policy had loaded."""
    node, sampling = OmegaConf.select(cfg, "scorer.step_format"), OmegaConf.select(cfg, "policy.sampling")
    if cfg.scorer.get("_target_") not in HEAD_SCORERS or not isinstance(node, DictConfig):
        return
    values = {key: node.get(key) for key in STEP_FORMAT_FIELDS if key in node}
    with named_settings("scorer.step_format."):
        StepFormat(**values)
    if not isinstance(sampling, DictConfig):
        return
    for key, value in values.items():
        policy_value = sampling.get(key, SamplingConfig.__dataclass_fields__[key].default)
        if value != policy_value:
            raise ValueError(f"scorer.step_format.{key}={value!r} differs from policy.sampling.{key}={policy_value!r}: "
                             "the head would read its scores where the policy's steps do not end; give both the same "
                             "value (the scorer's follows the policy's unless set)")


def build_policy(node: DictConfig) -> Policy:
    """The policy; a missing or incomplete checkpoint says how to get it (`checkpoint_hint`)."""
    try:
        return build(node)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. {checkpoint_hint(node.get('path'), err, 'policy.path')}") from err


def build_scorer(node: DictConfig) -> Scorer:
    """The scorer; one that loads a checkpoint (scorer=sprm_forward) says how to get a missing one."""
    try:
        return build(node)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. {checkpoint_hint(node.get('path'), err, 'scorer.path')}") from err


TASK_FUNCTIONS: tuple[str, ...] = ("generate_problems", "prompt_text", "grade", "extract_answer")  # `Task`


def import_task(module_name: str) -> Task:
    """The task module; a ValueError naming task.module when it (or one it imports) is not there
    (a ModuleNotFoundError traceback before) or it lacks a function of `Task` (a missing grade
    was an AttributeError after the policy had loaded and searched)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"task.module={module_name!r} cannot be imported: {err}") from None
    missing = [name for name in TASK_FUNCTIONS if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f"task.module={module_name!r} has no function {', '.join(missing)}: a task module provides "
                         f"{', '.join(TASK_FUNCTIONS)} (the Task protocol in experiments/search.py)")
    return module  # type: ignore[return-value]


def load_task(task_cfg: DictConfig) -> tuple[Task, list[Problem]]:
    """(the task module, its problems for split / count / seed / config); task.seed must be an
    integer (1.5 or "abc" drew some problems, true those of 1, filed under another name). A
    missing or null task.config is no config: generate_problems(split, count, seed) without cfg. A
    module of one's own given the default task's config (no `'~task.config'`) that fails on it is a
    ValueError saying so (`default_config_hint`)."""
    check_int("task.seed", task_cfg.get("seed"))
    module = import_task(task_cfg.module)
    config = task_cfg.get("config")
    args = (task_cfg.split, task_cfg.count, task_cfg.seed) + (() if config is None else (build_frozen(config),))
    check_generate_arity(str(task_cfg.module), module.generate_problems, args)
    try:
        return module, list(module.generate_problems(*args))  # type: ignore[call-arg]  # a generator's too
    except Exception as err:
        hint = default_config_hint(task_cfg, args[3] if len(args) == 4 else None, err)
        if hint is None:
            raise
        raise ValueError(hint) from err


DEFAULT_TASK = ("search", "task")  # the primary config and group whose default gives task.config when none is set


def default_task_config(config_dir: Path = CONFIG_DIR) -> tuple[str, str | None]:
    """(the default task option, its config's `_target_`): search.yaml's defaults list names the
    task (`task: arith`), whose yaml holds the config (`experiments.tasks.arith.ArithConfig`);
    ("", None) when either cannot be read."""
    primary, group = DEFAULT_TASK
    try:
        defaults = OmegaConf.load(config_dir / f"{primary}.yaml").get("defaults", [])
        option = next(str(entry[group]) for entry in defaults if isinstance(entry, DictConfig) and group in entry)
        return option, OmegaConf.select(OmegaConf.load(config_dir / group / f"{option}.yaml"), "config._target_")
    except (OSError, StopIteration, ValueError):
        return "", None


def default_config_hint(task_cfg: DictConfig, config: Any, err: Exception) -> str | None:
    """The one-line message for generate_problems raising `err` about the config it was given
    (`blames_config`) when that was the default task's config (its `_target_` is the default task
    yaml's) and task.module is another module than the config's: a module of one's own run without
    `'~task.config'` got arith's ArithConfig in silence and failed inside (an AttributeError
    traceback); else None (the error is the module's own, a bug in it keeps its traceback)."""
    option, target = default_task_config()
    given = OmegaConf.select(task_cfg, "config._target_", default=None)
    module = str(task_cfg.module)
    if config is None or target is None or given != target or type(config).__module__ == module:
        return None
    if not blames_config(err, config):
        return None
    raised = (str(err).splitlines() or [""])[0][:200]
    return (f"task.module={module!r} was given {option}'s {type(config).__name__} (task.config of the default task, "
            f"experiments/conf/task/{option}.yaml), and its generate_problems raised {type(err).__name__}: {raised}; "
            f"set task.config for it ('~task.config' '+task.config={{_target_:{module}.MyConfig}}') or add "
            "'~task.config' to run it without one")


def blames_config(err: Exception, config: Any) -> bool:
    """Whether err is about the config object: an AttributeError on it (`'ArithConfig' object has
    no attribute 'base'`) or a message naming its class as Python's own errors do (`'ArithConfig'
    object is not subscriptable`, `argument of type 'ArithConfig' is not iterable`)."""
    on_config = isinstance(err, AttributeError) and getattr(err, "obj", None) is config
    return on_config or f"'{type(config).__name__}'" in str(err)


def check_generate_arity(module: str, generate: Any, args: tuple[Any, ...]) -> None:
    """A ValueError, before it is called, when generate_problems cannot take these arguments: a
    config where it takes none (add `'~task.config'`) or none where it needs one."""
    try:
        inspect.signature(generate).bind(*args)
    except TypeError:
        fix = ("it takes no config: add '~task.config'" if len(args) == 4 else
               "it needs a config: task.config is missing or null ('+task.config={_target_:...}')")
        raise ValueError(f"task.module={module!r}: generate_problems{inspect.signature(generate)} cannot be called "
                         f"with split, count, seed{', config' if len(args) == 4 else ''}; {fix}") from None
    except ValueError:  # no signature to read (a builtin): left to the call
        return


def check_has_problems(task_cfg: DictConfig, problems: Sequence[Problem]) -> None:
    """A ValueError naming the task when it gives no problems (count 0, an empty file), a problem
    that cannot be searched and graded (`check_problem_fields`) or two of one id (a task module of
    one's own; the benchmarks check their whole file): refused before the policy loads or the run
    folder is written, not after with "no records", rows of one id or a problem counted wrong."""
    name = str(task_cfg.module).rsplit(".", 1)[-1]
    if not problems:
        raise ValueError(
            f"task {name} (split={task_cfg.split!r}, count={task_cfg.count!r}) has no problems: nothing to search; "
            "pass task.count >= 1 or a task / file with problems"
        )
    check_problem_fields(str(task_cfg.module), problems)
    check_unique_ids(problems, f"task {name}")


def check_problem_fields(module: str, problems: Sequence[Problem]) -> None:
    """A ValueError naming the task module and the problem for one that is not a `Problem` a
    search can use (`treesearch.config_checks.problem_fault`: a str id, a non-empty str question,
    what the policy is prompted with, and a meta of JSON values, which every row and the live tree
    write: a numpy number was a TypeError traceback after the chunk had been searched) or whose
    answer is not a str (what grade compares with: None was searched and counted wrong)."""
    for index, problem in enumerate(problems, start=1):
        if not isinstance(problem, Problem):
            raise ValueError(f"task module {module}: problem {index} is a {type(problem).__name__}, "
                             "not a treesearch.records.Problem")
        fault = problem_fault(problem, answer_required=True)
        if fault is not None:
            named = f"{problem.id!r} (#{index})" if isinstance(problem.id, str) else f"{index}"
            raise ValueError(f"task module {module}: problem {named} {fault}")


def chunk_seed(seed: int, problem_ids: Sequence[str]) -> int:
    """The strategy seed of one chunk: a hash of the run seed and the chunk's problem ids, so a
    chunk draws the same samples whether it runs first, last or after a restart."""
    return problem_seed(seed, "|".join(problem_ids))  # one hash for both: a chunk of one problem seeds as it


def chunks(problems: Sequence[Problem], size: int) -> list[Sequence[Problem]]:
    if size < 1:
        raise ValueError(f"chunk={size} must be >= 1")
    return [problems[i : i + size] for i in range(0, len(problems), size)]


# -- the run folder -----------------------------------------------------------------------------


def resolve_out_dir(cfg: DictConfig) -> Path:
    """out_dir when set, else the Hydra run dir (an error outside Hydra)."""
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("out_dir is not set and no Hydra run dir exists: pass out_dir=... (e.g. under hydra.compose)")


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data with every interpolation resolved (without the hydra node)."""
    keys = [key for key in cfg.keys() if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)  # type: ignore[return-value]


def with_run_budget(config: dict[str, Any], field: str) -> dict[str, Any]:
    """config with its top-level `budget` set to the budget the strategy ran with (search.<field>:
    `n`, or `iterations` for MCTS), so an override such as `search.n=4` is not saved beside a
    `budget: 8` it replaced; unchanged when the search node has no such field, and for MCTS with
    a token budget, whose `budget` is a separate knob (the N the run is filed under,
    `experiments.sweep_metrics.run_budget`)."""
    search = config.get("search")
    if not isinstance(search, dict) or field not in search or search.get("token_budget") is not None:
        return config
    return {**config, "budget": search[field]}


def plus_default(override: str) -> str:
    """A resume override of a DEFAULT_SETTINGS key as Hydra takes it whether or not the command
    has one already (`++batching=lockstep`: the key is not in search.yaml, and `+` would clash
    with the command's own `+batching=continuous`); other overrides as they are."""
    key = override.split("=", 1)[0]
    return f"++{override}" if key in DEFAULT_SETTINGS else override


def has_records(out: Path) -> bool:
    """Whether out's records.jsonl holds anything (a run that failed before its first row left none)."""
    records = out / RECORDS
    return records.exists() and records.stat().st_size > 0


REDACTED = "<redacted>"
API_KEY_SETTINGS: tuple[str, ...] = ("policy.api_key", "scorer.api_key")


def without_api_keys(config: dict[str, Any]) -> dict[str, Any]:
    """config with the API key of policy and scorer (one a config file of the user's sets) as
    REDACTED: the run's files keep no key (a text replace of the key rewrote any text it occurs in)."""
    out = dict(config)
    for node in ("policy", "scorer"):
        if isinstance(out.get(node), dict) and out[node].get("api_key") is not None:
            out[node] = {**out[node], "api_key": REDACTED}
    return out


def check_no_api_key_argument(argv: Sequence[str]) -> None:
    """Exit 2 with one line for an API key given on the command line: Hydra itself writes the
    command line into its files (a sweep's multirun.yaml) and logs; $OPENAI_API_KEY keeps it out."""
    check_refused_keys(argv, {key: f"{key} on the command line would be written into the run's files (Hydra keeps "
                                   "the command line in multirun.yaml and its logs): set $OPENAI_API_KEY instead, which "
                                   "policy=openai and scorer=served_prm read" for key in API_KEY_SETTINGS})


def resume_ignored_keys(out: Path) -> tuple[str, ...]:
    """IGNORED_KEYS for resuming out's rows, less a served component's base_url where out's
    weights.json keeps no id of its served model (rows made before the ids were kept: the URL is
    all that names their server, `run_weights.check_served_models`)."""
    path = out / WEIGHTS_FILE
    saved = read_saved(path) if path.is_file() else {}
    return tuple(key for key in IGNORED_KEYS
                 if not key.endswith(".base_url") or f"{key.split('.')[0]}.served_model" in saved)


def claim_run_dir(out: Path, config: dict[str, Any], budget_field: str = "n") -> None:
    """Save config.yaml in a folder without records; in one with records, refuse unless the
    saved config matches (a folder whose run failed before its first row is simply reused).
    The saved config's budget is read as `with_run_budget` records it (budget_field: the
    strategy's), so folders saved before it recorded the budget that ran still resume. A folder of
    another command's run (FOREIGN_RUN_FILES, ckpt-*) or of several runs (RESULTS_FOLDER_FILES, a
    sub-folder with records) is refused before anything is written."""
    foreign = [name for name in FOREIGN_RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("ckpt-*"))[:1]
    if foreign:
        raise ConfigMismatchError(f"{out} holds {', '.join(foreign)} of another command's run (experiments.train, "
                                  "train_sft or train_head), whose files a search there would replace; use another out_dir")
    try:  # <run>/last: replaced whole at that run's next checkpoint, this search's rows with it
        check_not_model_folder(out, "out_dir")
    except ValueError as err:
        raise ConfigMismatchError(str(err)) from None
    runs = [name for name in RESULTS_FOLDER_FILES if (out / name).exists()] + sorted(
        f"{p.name}/" for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / RECORDS).exists())[:1]
    if runs:
        raise ConfigMismatchError(f"{out} holds {', '.join(runs)}: the results of several runs (a sweep, the demo), which "
                                  "a search at its top would mix its rows into; use another out_dir (a new sub-folder of it)")
    path = out / CONFIG
    if has_records(out) and not path.exists():
        raise ConfigMismatchError(f"{out} has {RECORDS} but no {CONFIG}: cannot tell what made them; use another out_dir")
    if has_records(out):
        saved = with_run_budget(read_run_config(out), budget_field)
        saved = {**DEFAULT_SETTINGS, **with_added_settings(saved, config, ADDED_SETTINGS)}
        current = {**DEFAULT_SETTINGS, **config}
        ignored = resume_ignored_keys(out)
        diffs = config_differences(saved, current, ignored)  # type: ignore[arg-type]
        if diffs:
            overrides = [plus_default(o) for o in resume_overrides(saved, current, ignored)]
            raise ConfigMismatchError(
                f"{out} holds records of a different config ({'; '.join(diffs)}); refusing to mix them: "
                + mismatch_advice(out, overrides))
        return
    write_atomic(path, OmegaConf.to_yaml(OmegaConf.create(without_api_keys(config))))


def mismatch_advice(out: Path, overrides: list[str]) -> str:
    """What to do about a run folder of another config: another folder, or the overrides that go on
    with it as it ran. In a sweep those overrides would rename every job's folder (the refused one
    untouched, every other job searched again): there the job is rerun alone into its folder."""
    resume = " ".join(overrides)
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return "use another out_dir (or delete that folder)" + (f", or add `{resume}` to go on with it as it ran" if resume else "")
    alone = (f"; or go on with it as it ran by running that job alone with `out_dir={out} {resume}` (added to the sweep, "
             "they would rename every job's folder)") if resume else ""
    return f"use another hydra.sweep.dir (or delete that job's folder){alone}"


def save_hydra_files(out: Path, cfg: DictConfig) -> None:
    """Hydra's record of this invocation (config.yaml, hydra.yaml, overrides.yaml in out/.hydra),
    written once the run folder is claimed. `hydra.output_subdir: null` keeps Hydra from writing
    them before the run starts, where a refused command (a folder of another config, one another
    process is running) overwrote the accepted run's. Nothing outside a Hydra app (composed configs)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = out / HYDRA_SUBDIR
    folder.mkdir(exist_ok=True)
    plain = without_api_keys(OmegaConf.to_container(cfg))  # type: ignore[arg-type]
    write_atomic(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))
    write_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on the run folder (released by the OS if the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirBusyError(f"another process is writing into {out}; wait for it or use another out_dir") from err
            raise
        yield


# -- running ------------------------------------------------------------------------------------


def check_batching(batching: str, policy_target: object = None) -> str:
    """The `+batching=` value, validated (BATCHING lists the valid ones); policy_target: the
    policy config's _target_, when known, for continuous batching's refusal of another backend
    before anything loads (a vLLM engine started for 10 s first)."""
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r}; valid: {', '.join(BATCHING)}")
    if batching == "continuous" and str(policy_target).rsplit(".", 2)[0] in NOT_CONTINUOUS:
        raise ValueError(f"batching=continuous needs the in-process transformers policy (policy=tiny, tiny_sprm, "
                         f"smollm2), not {policy_target}")
    return batching


NOT_CONTINUOUS = ("policies.vllm_policy", "policies.openai_policy")  # backends continuous batching cannot drive


def search_chunk(
    part: Sequence[Problem], spec: StrategySpec, cfg: Any, policy: Policy, scorer: Scorer, batching: str,
    on_round: RoundHook | None = None,
) -> list[Any]:
    """The strategy over one chunk: in lockstep (one call per round for all problems) or with
    continuous batching (each problem's search in its own thread, the policy's calls decoded
    together by a `policies.continuous_engine.ContinuousEngine`; transformers policy only; each
    problem with its own seed, `treesearch.concurrent.problem_seed`).
    on_round: passed to the strategy (`treesearch.protocols.RoundHook`). What it returns is
    checked once (`treesearch.result_checks.check_results`: here in lockstep, by `search_each` for
    each problem under continuous batching), a ValueError naming the strategy; nothing written."""
    label = strategy_label(spec)
    try:
        if check_batching(batching) == "lockstep":
            results = spec.fn(part, policy, scorer, cfg, on_round=on_round)
            check_results(results, part, label)
        elif not hasattr(policy, "chunk_decoder"):
            raise ValueError(f"batching=continuous needs the in-process transformers policy, not {type(policy).__name__}")
        else:
            from policies.continuous_engine import ContinuousEngine  # torch: only when asked for

            with ContinuousEngine.attached(policy):
                results = search_each(spec.fn, part, policy, scorer, cfg, on_round=on_round, label=label)
    except ResultError as err:
        raise ValueError(f"{err}; {UNWRITTEN}") from None
    return results


UNWRITTEN = "nothing of this chunk was written to records.jsonl"


def run_chunk(
    part: Sequence[Problem], spec: StrategySpec, strategy_cfg: Any, policy: Policy, scorer: Scorer,
    task: Task, seed: int, skip: set[str], batching: str = "lockstep", live: LiveTree | None = None,
) -> list[dict[str, Any]]:
    """Search one chunk (all of it, so its samples do not depend on what was done before) and
    return the rows of the problems not in skip. live: follows the chunk's first problem."""
    cfg = chunk_config(strategy_cfg, seed, part)
    if live is None:
        results = search_chunk(part, spec, cfg, policy, scorer, batching)
    else:
        live.follow(part[0].id, strategy_name(spec), dataclasses.asdict(cfg), problem=part[0])
        with live.marking_stops():  # a Ctrl-C'd or failed search's file says so, or its final write's
            results = search_chunk(part, spec, cfg, policy, scorer, batching, on_round=live)
            live.finish(results)
    try:
        outcomes = grade_results(results, task.grade, task.extract_answer, task=f"task module {task_name(task)}")
    except ValueError as err:  # a task's extract_answer / grade that returned what no row can hold
        raise ValueError(f"{err}; {UNWRITTEN}") from None
    return [
        {**record(result, outcome), "policy_parameters": policy.num_parameters}
        for result, outcome in zip(results, outcomes) if result.problem.id not in skip
    ]


def chunk_config(strategy_cfg: Any, seed: int, part: Sequence[Problem]) -> Any:
    """The strategy config one chunk is searched with: its seed a hash of the run seed and the
    chunk's problem ids (`chunk_seed`)."""
    return dataclasses.replace(strategy_cfg, seed=chunk_seed(seed, [p.id for p in part]))


def ran_configs(part: Sequence[Problem], strategy_cfg: Any, seed: int, batching: str) -> dict[str, dict[str, Any]]:
    """{problem id: `dataclasses.asdict` of the config its search ran with}: the chunk's config
    (`chunk_config`), under continuous batching with each problem's own seed (`seeded_for`, as
    `search_each` gives it)."""
    cfg = chunk_config(strategy_cfg, seed, part)
    return {p.id: dataclasses.asdict(cfg if batching == "lockstep" else seeded_for(cfg, p)) for p in part}


def check_row_identity(rows: Sequence[dict[str, Any]], spec: StrategySpec, ran: dict[str, dict[str, Any]]) -> None:
    """A ValueError naming the strategy when a row's `strategy` is not the name the strategy is
    registered under or its `config` is not the config its search ran with (`ran`: the registry's
    contract, `dataclasses.asdict(cfg)`), compared as records.jsonl writes them
    (`treesearch.result_checks.identity_fault`). Run after `check_new_rows`, whose refusals of a
    config the readers cannot hold come first."""
    name = registered_name(spec)
    for row in rows:
        fault = identity_fault(row["strategy"], row["config"], name, ran[row["problem_id"]])
        if fault is not None:
            raise ValueError(f"{strategy_label(spec)} gave problem {row['problem_id']!r} {fault}; {UNWRITTEN}")


def task_name(task: Task) -> str:
    """The task module's import name (errors name it)."""
    return getattr(task, "__name__", type(task).__name__)


def check_new_rows(rows: Sequence[dict[str, Any]], records: Path, spec: StrategySpec, task: Task) -> None:
    """The check every reader of records makes (`sweep_metrics.check_rows`), on a chunk's rows
    before they are appended: a row it would refuse made the folder refuse every rerun. A
    ValueError naming the strategy and the task module; nothing of the chunk is written."""
    try:
        check_rows(rows, records)
    except RunFolderError as err:
        what = str(err).removeprefix(f"{records}: ")
        raise ValueError(f"{strategy_label(spec)} on task module {task_name(task)} made a row records.jsonl cannot "
                         f"hold: {what}; {UNWRITTEN}") from None


def drop_stale_live_tree(out: Path) -> None:
    """A run without live_tree=true removes the folder's live_tree.json when it is a live one
    (`experiments.live_tree.is_live_file`: an earlier live run's, marked stopped or searching),
    which nothing would rewrite: `plot tree` showed the resumed run as stopped for ever. It says
    so in one line on stderr. A final result (the last tree an earlier live run finished) is
    kept: it stays true of the run, and only a live run rewrites it."""
    path = out / LIVE_TREE_FILE
    if is_live_file(path):
        path.unlink(missing_ok=True)
        print(f"note: removed {path}: an earlier live_tree=true run's tree as it stood when it stopped; "
              "this run does not update it (live_tree=false)", file=sys.stderr)


def search_missing(
    cfg: DictConfig, out: Path, task: Task, parts: Sequence[Sequence[Problem]], strategy_cfg: Any, spec: StrategySpec,
) -> None:
    """Run every chunk that has a problem without a row; append its missing rows."""
    rows = load_rows(out / RECORDS, keys=RECORD_KEYS)
    check_rows(rows, out / RECORDS)  # a hand-edited correct of "false" counted as right on resume
    check_row_questions(out / RECORDS, rows, [p for part in parts for p in part])
    done = {row["problem_id"] for row in rows}
    todo = [part for part in parts if any(p.id not in done for p in part)]
    live_tree = cfg.get("live_tree", False)
    if not live_tree:
        drop_stale_live_tree(out)
    if not todo:
        return
    live = LiveTree(out / LIVE_TREE_FILE) if live_tree else None
    total = sum(len(part) for part in parts)
    with contextlib.ExitStack() as built:  # closed when done: the scorer first, then the policy
        policy = built.enter_context(closing_component(build_policy(cfg.policy)))  # loaded only when there is work
        scorer = built.enter_context(closing_component(build_scorer(cfg.scorer)))
        check_served_models(out, served_models({"policy": policy, "scorer": scorer}), has_records(out))
        warning = prm_window_warning(cfg.policy.get("sampling", {}).get("max_total_tokens"), scorer)
        if warning:
            print(warning, file=sys.stderr)
        with tqdm(total=total, initial=total - sum(p.id not in done for part in todo for p in part), unit="problem",
                  disable=not cfg.progress, desc=strategy_name(spec)) as bar:
            for part in todo:
                rows = run_chunk(part, spec, strategy_cfg, policy, scorer, task, cfg.seed, done,
                                 cfg.get("batching", "lockstep"), live)
                check_new_rows(rows, out / RECORDS, spec, task)
                check_row_identity(rows, spec, ran_configs(part, strategy_cfg, cfg.seed, cfg.get("batching", "lockstep")))
                append_rows(out / RECORDS, rows)
                bar.update(len(rows))
            if live is not None:
                live.close()


def prm_window_warning(max_total_tokens: Any, scorer: Scorer) -> str | None:
    """A warning line when the policy may write paths longer than an external PRM's context window
    (`scorers.prm_layout.PRMLayout.context_window`): such a path stops the run with a ValueError
    naming its problem, perhaps hours in; None when the window is unknown or roomy. The PRM
    counts its own tokens of the question and steps, so this compares orders of magnitude."""
    window = getattr(getattr(scorer, "layout", None), "context_window", None)
    if not isinstance(window, int) or not isinstance(max_total_tokens, int) or max_total_tokens <= window:
        return None
    return (f"warning: policy.sampling.max_total_tokens={max_total_tokens} is more than the PRM's context window of "
            f"{window} tokens: a path that long stops the run with an error naming its problem; lower "
            "max_total_tokens or use a PRM with a longer context")


@contextlib.contextmanager
def closing_component(component: Any) -> Iterator[Any]:
    """The component, its `close` called on the way out when it has one (a vLLM engine, an HTTP
    client): an engine left to vLLM's finalizer tears down the state the process's other engines
    share (`policies.vllm_engine.shutdown_llm`), and a sweep's jobs run one after another in one
    process."""
    try:
        yield component
    finally:
        close = getattr(component, "close", None)
        if callable(close):
            close()


def run_rows(out: Path, problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """The checked rows of this run's problems in out's records."""
    wanted = {p.id for p in problems}
    rows = load_rows(out / RECORDS, keys=RECORD_KEYS)
    check_rows(rows, out / RECORDS)
    return [row for row in rows if row["problem_id"] in wanted]


def write_metrics(out: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json over rows (`run_rows`)."""
    metrics = run_metrics(list(rows), run_config=read_run_config(out))
    write_atomic(out / METRICS, json.dumps(metrics, indent=2))
    return metrics


def depth_cut_note(rows: Sequence[dict[str, Any]], max_depth: Any) -> str | None:
    """A note when chosen paths stopped at the strategy's max_depth before their answer (their last
    step ended on the separator): a thinking model's trace split at its separator takes far more
    steps than the presets' 40, and such a path is graded without an answer; None otherwise."""
    if not is_int(max_depth):
        return None
    cut = 0
    for row in rows:
        chosen = row.get("chosen")
        candidate = row["candidates"][chosen] if is_int(chosen) else None
        if candidate and candidate.get("finish") == "separator" and len(candidate.get("step_scores") or ()) >= max_depth:
            cut += 1
    if not cut:
        return None
    return (f"note: the chosen path of {cut} of {len(rows)} problems stopped at search.max_depth={max_depth} steps "
            "before its answer; raise search.max_depth (a thinking model's trace takes hundreds of steps)")


CONFIDENCE_SCORER = "scorers.confidence.ConfidenceScorer"
STEP_SCORE_READER = "scorers.step_score_reader.StepScoreReader"


def unread_head_note(cfg: DictConfig) -> str | None:
    """A note when the policy attaches its SPRM head's step scores, or its folder holds one (the
    vLLM presets of MetaStone-S1 / XBai-o4), and the default confidence scorer ranks instead
    (experiment=reasoning_* ranked by log-probs, not by the head as the reference's modes do), else None."""
    if OmegaConf.select(cfg, "scorer._target_", default=None) != CONFIDENCE_SCORER:
        return None
    if OmegaConf.select(cfg, "policy.with_step_head", default=False) is True:
        return ("note: the policy attaches its SPRM head's step scores (policy.with_step_head=true), but scorer=confidence "
                "ranks by token log-probs; add scorer=sprm to rank by the head, as the reference's reasoning modes do")
    path = OmegaConf.select(cfg, "policy.path", default=None)
    if isinstance(path, str) and (Path(path) / HEAD_FILE).is_file():
        better = "scorer=vllm_sprm" if is_vllm_policy(cfg) else "scorer=sprm_forward (or +policy.with_step_head=true scorer=sprm)"
        return (f"note: {path} holds an SPRM head ({HEAD_FILE}), but scorer=confidence ranks by token log-probs; "
                f"add {better} to rank by the head, as the reference's reasoning modes do")
    return None


def is_vllm_policy(cfg: DictConfig) -> bool:
    """Whether cfg's policy is built on vLLM's offline engine."""
    return str(OmegaConf.select(cfg, "policy._target_", default="")).startswith("policies.vllm_policy.")


def check_step_score_reader(cfg: DictConfig) -> None:
    """A ValueError, before the policy loads, for scorer=sprm (it reads the step scores a policy
    attaches while generating) on a policy that attaches none: it was found after the first chunk
    (a vLLM engine's start and 32k-token traces on a GPU), blaming a head the model has."""
    if OmegaConf.select(cfg, "scorer._target_", default=None) != STEP_SCORE_READER:
        return
    if OmegaConf.select(cfg, "policy.with_step_head", default=False) is True:
        return
    better = ("scorer=vllm_sprm (the SPRM's forward on vLLM)" if is_vllm_policy(cfg)
              else "+policy.with_step_head=true (a transformers policy of a reflective folder), or scorer=sprm_forward")
    raise ValueError(f"scorer=sprm reads the step scores the policy attaches while generating, and this policy "
                     f"attaches none (policy.with_step_head is not true): use {better}")


def run_search_experiment(cfg: DictConfig) -> Path:
    """Run (or resume) the search the config describes; return the run folder."""
    check_run_scalars(cfg)  # validates before anything is loaded or written
    check_component_keys(cfg)
    import_task(cfg.task.module)  # named as task.module, before the prompt paths that interpolate it
    check_method_paths(cfg)
    check_light_scorer(cfg.scorer)
    check_head_scorer(cfg.scorer)
    check_head_step_format(cfg)
    check_engines_agree(cfg)
    check_room_for_scorer(cfg)
    note_cpu_scorer(cfg)
    check_prm_scorer(cfg.scorer)
    check_step_score_reader(cfg)
    set_num_threads(cfg.get("num_threads"))
    strategy_cfg = build_frozen(cfg.search)
    check_policy_sampling(cfg.policy)
    check_lookahead_temperature(strategy_cfg, OmegaConf.select(cfg, "policy._target_", default=None))
    check_batching(cfg.get("batching", "lockstep"), OmegaConf.select(cfg, "policy._target_", default=None))
    name, spec = strategy_of(strategy_cfg)
    check_strategy_fields(name, spec)
    task, problems = load_task(cfg.task)
    check_has_problems(cfg.task, problems)
    for note in (trained_task_note(OmegaConf.select(cfg, "policy.path", default=None), str(cfg.task.module)),
                 unread_head_note(cfg)):
        if note:
            print(note, file=sys.stderr)
    parts = chunks(problems, cfg.chunk)
    for node in ("policy", "scorer"):  # a run folder given for its final/: named before the run folder is written
        check_not_a_run_folder(OmegaConf.select(cfg, f"{node}.path", default=None), f"{node}.path")
    out = resolve_out_dir(cfg)
    budget_field = BUDGET_FIELDS.get(name, "n")
    lock_before = (out / LOCK).exists()
    with run_lock(out):  # held while the claim is made, and undone: another process's claim is never touched
        before = {name for name in CLAIM_FILES if name != LOCK and (out / name).exists()} | ({LOCK} if lock_before else set())
        try:
            config = resolved_config(cfg)
            claim_run_dir(out, with_run_budget(config, budget_field), budget_field)
            check_run_weights(out, model_folders(config), has_records(out))
            save_hydra_files(out, cfg)
            search_missing(cfg, out, task, parts, strategy_cfg, spec)
            rows = run_rows(out, problems)
            write_metrics(out, rows)
        except USER_ERRORS:
            if not has_records(out):  # refused before its first row (a missing model folder): leave no claim
                release_claim(out, before)
            raise
    note = depth_cut_note(rows, getattr(strategy_cfg, "max_depth", None))
    if note:
        print(note, file=sys.stderr)
    return out


def release_claim(out: Path, before: set[str]) -> None:
    """Remove the claim files (CLAIM_FILES) this run wrote into a folder that got no row, keeping
    any that were there before it; Hydra's own files go with `discard_hydra_only_dir` (its empty
    job log stays in a folder that holds the user's files, as after any run there)."""
    for name in set(CLAIM_FILES) - before:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()  # out_dir given and left empty


# -- the command line ---------------------------------------------------------------------------


def full_error_wanted() -> bool:
    """HYDRA_FULL_ERROR=1 (Hydra's own switch): show every error's full traceback."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def job_log() -> Path:
    """The log file Hydra's job logging writes in the run folder: <run dir>/<job name>.log."""
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"


def is_own_empty_log(log: Path | None, err: BaseException) -> bool:
    """Whether a refused job's log (None outside a Hydra job) is its own and empty: not while
    another process runs in the folder (RunDirBusyError: the log is that run's), nor once it
    holds lines (an earlier run's, or this job's own before it failed: logs only grow)."""
    if log is None or isinstance(err, RunDirBusyError):
        return False
    try:
        return log.stat().st_size == 0
    except OSError:
        return False


def discard_hydra_only_dir(run_dir: Path, job_name: str) -> None:
    """Remove the folder Hydra made for a run refused on bad input, when it holds nothing but
    Hydra's own files (.hydra/ with its three yaml files, an empty <job>.log); anything else in
    it (records, a config.yaml, the user's files) keeps it all."""
    hydra_dir, log = run_dir / HYDRA_SUBDIR, run_dir / f"{job_name}.log"
    if not run_dir.is_dir() or not set(run_dir.iterdir()) <= {hydra_dir, log}:
        return
    if log.exists() and log.stat().st_size > 0:
        return
    if hydra_dir.exists() and not {p.name for p in hydra_dir.iterdir()} <= {"config.yaml", "hydra.yaml", "overrides.yaml"}:
        return
    shutil.rmtree(hydra_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        remove_empty_parents(run_dir)


def remove_empty_parents(folder: Path) -> None:
    """Remove the empty folders above `folder` inside the current directory, nearest first, up to
    the first that holds anything (Hydra made `outputs/search/` for the run folder of a refused
    first run in a new directory, and it stayed)."""
    cwd = Path.cwd().resolve()
    for parent in folder.resolve().parents:
        if cwd not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:  # not empty (or not ours to remove)
            return


@contextlib.contextmanager
def user_errors_reported(kept: str = "the rows already in records.jsonl are kept") -> Iterator[None]:
    """Bad input (USER_ERRORS) and an out_dir that cannot be written (`is_storage_error`: a full
    disk, a read-only file system; `kept`: what the message says is kept) as one line:
    `error: <message>` on stderr and exit 2 for a single run; in a sweep, `error: job #<k>
    (<overrides>): <message>` and an error Hydra prints without a traceback (the other jobs still
    run; Hydra names only the first failed job at the end). Either way the folder Hydra made for the job
    goes when it holds only Hydra's files, and Hydra's log of the job when it is its own and
    empty (`is_own_empty_log`: a refused search left a search.log in a training run's folder). Other
    exceptions, and all of them under HYDRA_FULL_ERROR=1, pass through with their traceback."""
    own_log = job_log() if HydraConfig.initialized() else None
    try:
        yield
    except (*USER_ERRORS, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, USER_ERRORS) and not is_storage_error(err):
            raise  # a storage error (full disk, read-only folder) is the user's to fix; other OSErrors are bugs
        hydra_cfg = HydraConfig.get()
        discard_hydra_only_dir(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)
        if is_own_empty_log(own_log, err) and hydra_cfg.mode != RunMode.MULTIRUN:
            own_log.unlink(missing_ok=True)  # type: ignore[union-attr]  # not None: is_own_empty_log
        if full_error_wanted():
            raise
        message = error_text(err) if isinstance(err, USER_ERRORS) else storage_message(err, hydra_cfg.runtime.output_dir, kept)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # Hydra names only the first failed job at the end: each says so here
            job = f"job #{hydra_cfg.job.num} ({','.join(hydra_cfg.overrides.task)})"
            print(f"error: {job}: {message}", file=sys.stderr, flush=True)
            raise SweepJobInputError("error: a job of the sweep was refused (the error line of each refused job is "
                                     "above, where it ran); every job not refused ran") from err
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT) from None


def storage_message(err: OSError, out_dir: str, kept: str) -> str:
    """`cannot write <file or run folder>: <reason> (<kept>; what to do)`."""
    where = err.filename or out_dir
    return (f"cannot write {where}: {err.strerror or err} ({kept}; free space or pick a writable out_dir, "
            "then rerun the command to go on)")


def check_greedy_temperature(search_option: str | None, cfg: DictConfig) -> None:
    """search=greedy sets the policy's temperature to 0, and a temperature override beats it:
    such a run sampled at that temperature in silence (its rows then read as Best-of-1, whose
    budget copies the scaling fit refuses). ValueError naming both."""
    temperature = OmegaConf.select(cfg, "policy.sampling.temperature", default=0.0)
    if search_option == "greedy" and temperature != 0:
        raise ValueError(f"search=greedy decodes at temperature 0, but policy.sampling.temperature={temperature}: "
                         "drop the temperature override for greedy runs (sweep it with search=best_of_n search.n=1)")


@hydra.main(config_path=str(CONFIG_DIR), config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> None:
    note_hydra_job(cfg.get("out_dir"))  # a sweep's folder, for the Ctrl-C hint
    freeze_long_lived()  # the imports' objects: out of the garbage collector's walks (policies/gc_freeze.py)
    # a hydra/launcher=local worker whose launcher was killed stops its job (experiments/launcher_watch.py)
    with launcher_watched(lambda: hydra_rerun_hint("the rows of finished chunks are kept in records.jsonl")), \
            user_errors_reported():
        check_no_chdir()
        check_greedy_temperature(HydraConfig.get().runtime.choices.get("search"), cfg)
        out = run_search_experiment(cfg)
    metrics = json.loads((out / METRICS).read_text())
    acc = metrics["accuracy"]
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback (a sweep stops there, as yes | head)
        print(f"{out}: accuracy {acc['mean']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] over {metrics['problems']} problems")


if __name__ == "__main__":
    check_group_options(sys.argv[1:], CONFIG_DIR, "search")  # search=nosuch: one line, exit 2, before Hydra composes
    check_no_api_key_argument(sys.argv[1:])  # before Hydra writes it into its files
    check_override_keys(sys.argv[1:], CONFIG_DIR, "search", PLAIN_NODE_KEYS)  # search.bogus=1: one line, exit 2
    check_launcher_commands(sys.argv[1:], CONFIG_DIR, "search")  # -m hydra/launcher=submitit_slurm without SLURM
    check_out_dir_argument(sys.argv[1:], CONFIG_DIR, "search")  # a file; -m ... out_dir=X or num_threads=1,2: one folder for every job
    sys.argv = with_experiment_job_folders(sys.argv)  # -m experiment=a,b: a folder per experiment
    with interrupt_reported(lambda: hydra_rerun_hint("the rows of finished chunks are kept in records.jsonl")):
        main()
