"""`make demo`: the main job on the embedded default, from a fresh clone.

For each embedded task (`arith`, and `countdown`: the task with a generator-verifier gap):
1. Loads its tiny policy from `outputs/checkpoints/tiny-<task>/final`, or trains it there first
   when no checkpoint is cached (SFT: 1400 steps for arith, ~17 min, and 4800 for countdown,
   27-39 min on 2 CPU cores).
2. Greedy decoding and Best-of-N sampling (N = 32) on the test split, batched, with a progress
   bar; every smaller N post hoc from the same samples.
3. The compute-matched comparison (`experiments.demo_sweep`): Best-of-N, beam search, DVTS, MCTS,
   REBASE and particle filtering at N = 4, 8, 16, 32 on the first 100 test problems, each run resumable and cached in
   `outputs/demo/sweep_<task>/`; the scaling fit per strategy and its plot `scaling_<task>.png`.
   Ranked by the SFT policy's confidence, or (countdown: `DemoTask.sweep_scorer="sprm"`) by the
   reflective model's head, each step scored while generated (`outputs/demo/sweep_<task>_sprm/`).
4. Writes `outputs/demo/report.md`, `outputs/demo/metrics.json` (keys documented in the README),
   `outputs/demo/records_<task>.jsonl` (every candidate with its scores) and one example tree per
   task: a step-level beam search on the first problem (`tree_<task>.json`, `.png`, `.html`).
5. Before sampling, each task's SPRM stage (`experiments.demo_reflective`): the reflective model
   (policy + SPRM head on one backbone) trained from the SFT policy on its cached train rollouts
   (30-45 min on 2 cores for countdown, ~15 for arith; cached), the aha plot `aha_<task>.png`; the
   task's table is then the reflective model's own Best-of-N samples, each step scored by its head
   while it is generated (`sprm_bon@N`, `sprm_wmaj@N`), `<task>.sft_*` keeps the SFT policy's
   numbers, and an ablation table (`experiments.demo_ablation`) ranks the same candidates by heads
   on frozen features, confidence and majority. `sprm_task` (countdown, the task where
   verification pays) names the task whose held-out aha numbers are `aha.diff_prob_first` /
   `_last`. (`experiments.demo_sprm`, a head trained on a frozen policy's features, is the other
   option of `DemoTask`: `sprm=`.)

    python -m experiments.demo                       # the default
    python -m experiments.demo --problems 50 --n 8   # smaller
    python -m experiments.demo --tasks countdown --sweep-problems 0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from experiments.startup_interrupt import quiet_start

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

from tqdm import tqdm

from experiments.cli_args import seed_int
from experiments.cli_errors import interrupt_reported, run_command
from experiments.demo_ablation import (ABLATION_SIZES, FROZEN_HEADS, ablation_markdown, ablation_metrics, ablation_rows,
                                      frozen_head)
from experiments.demo_reflective import ARITH_TUNE, ReflectiveStage, run_reflective_stage, stage_dir, stage_identity
from experiments.demo_report import TaskOutcomes, estimates, write_report
from experiments.demo_sprm import SPRMResult, SPRMStage, run_sprm_stage
from experiments.demo_sweep import (DEMO_BUDGETS, DEMO_STRATEGIES, StrategySweep, SweepSpec, check_sweep_folder,
                                   hydra_path, run_strategy_sweep)
from experiments.metrics import ProblemOutcome
from experiments.outcomes import grade_results, write_records
from experiments.plot import render_tree
from experiments.result_json import save_result
from experiments.sft_tasks import get_sft_task
from experiments.tiny_policy import ensure_policy
from policies.gc_freeze import freeze_long_lived
from policies.sampling_config import SamplingConfig
from policies.sft import SFTConfig
from policies.tiny_model import TinyModelConfig
from policies.transformers_policy import TransformersPolicy
from scorers.confidence import ConfidenceScorer
from scorers.random_scorer import RandomScorer
from scorers.sprm_scorer import SPRMScorer
from scorers.step_score_reader import StepScoreReader
from treesearch.aggregation import aggregate
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.compute import Compute
from treesearch.protocols import Policy, Scorer
from treesearch.records import Prefix, Problem
from treesearch.result import SearchResult


SWEEP_SCORERS = ("confidence", "sprm")


@dataclass(frozen=True)
class DemoTask:
    """One embedded task of the demo: its name (an `experiments.sft_tasks` entry and the metric
    prefix), its difficulty config (None: the task's default), the sampling temperature (None:
    the task's DEFAULT_TEMPERATURE), the generation cap per solution, its SFT budget (None: the
    demo's) and its SPRM stage: `reflective` (policy and head trained together; the task's
    table is then the reflective model's) or `sprm` (a head on the frozen policy's features),
    at most one; None: none. sweep_scorer: what ranks candidates and steps in the strategy sweep:
    "confidence" (the SFT policy's own step confidence) or "sprm" (the reflective model, its
    head scoring each step while generating; needs the reflective stage)."""

    name: str
    config: Any = None
    temperature: float | None = None
    max_total_tokens: int = 160
    sft: SFTConfig | None = None  # None: DemoConfig.sft
    sprm: SPRMStage | None = None  # train an SPRM head on this task (cached) and score with it
    reflective: ReflectiveStage | None = None  # train the reflective model (cached) and search with it
    sweep_scorer: str = "confidence"  # the strategy sweep's scorer: confidence (SFT policy) | sprm (reflective model)

    def __post_init__(self) -> None:
        get_sft_task(self.name)  # a ValueError naming the valid tasks
        if self.sprm is not None and self.reflective is not None:
            raise ValueError(f"DemoTask({self.name}) has both an sprm and a reflective stage: choose one")
        for kind, stage in (("sprm", self.sprm), ("reflective", self.reflective)):
            if stage is not None and stage.task != self.name:  # its head was trained on the other task's rollouts
                raise ValueError(f"DemoTask({self.name}).{kind} trains on task {stage.task!r}: give "
                                 f"{type(stage).__name__}(task={self.name!r})")
        if self.temperature is not None and not 0 <= self.temperature < math.inf:  # also refuses NaN
            raise ValueError(f"DemoTask({self.name}).temperature={self.temperature!r} must be a finite number >= 0")
        if self.sweep_scorer not in SWEEP_SCORERS:
            raise ValueError(f"DemoTask({self.name}).sweep_scorer={self.sweep_scorer!r}; valid: {', '.join(SWEEP_SCORERS)}")
        if self.sweep_scorer == "sprm" and self.reflective is None:
            raise ValueError(f"DemoTask({self.name}).sweep_scorer='sprm' needs a reflective stage (its head scores the steps)")
        if self.other_difficulty and (self.sprm is not None or self.reflective is not None):
            # its rollout caches drew default-difficulty problems: a head trained and measured on them
            raise ValueError(f"DemoTask({self.name}).config is another difficulty than the task's default, which the "
                             "SFT policy and the demo's table take but its sprm / reflective stage does not (its "
                             "rollouts are of default problems): leave the stage out")

    @property
    def module(self) -> ModuleType:
        return get_sft_task(self.name).module

    @property
    def other_difficulty(self) -> bool:
        """Whether config is another difficulty than the task's default."""
        return self.config is not None and self.config != get_sft_task(self.name).default_config

    @property
    def task_config(self) -> Any:
        return get_sft_task(self.name).default_config if self.config is None else self.config

    @property
    def sampling_temperature(self) -> float:
        return self.module.DEFAULT_TEMPERATURE if self.temperature is None else self.temperature


# Fixed step budgets, so that the demo's policies (and every number after them) do not depend on
# how busy the machine is: arith's 1400 steps are what 8 minutes gave on 2 free cores of the first
# machine (~17 min on 2 shared cores since); countdown's
# policy must learn more (legal moves, the "left" lists, and two-digit arithmetic, which 1600
# steps left mostly wrong: 2-digit "+" right 19% of the time at the last step, "-" 13%, so that the
# last step's arithmetic had to be checked, `experiments.countdown_failures`): 4800 (~27 min on 2
# free cores; its two-digit arithmetic is right 94-98% of the time, "/" 58-64%)
ARITH_SFT = SFTConfig(max_minutes=None, max_steps=1400)
COUNTDOWN_SFT = SFTConfig(max_minutes=None, max_steps=4800)
DEFAULT_TASKS: tuple[DemoTask, ...] = (
    DemoTask("arith", sft=ARITH_SFT, reflective=ReflectiveStage("arith", tune=ARITH_TUNE)),
    DemoTask("countdown", max_total_tokens=128, sft=COUNTDOWN_SFT, reflective=ReflectiveStage("countdown"),
             sweep_scorer="sprm"),
)


@dataclass(frozen=True)
class DemoConfig:
    """out_dir: where the report goes; checkpoints: the cached policies, one run folder
    tiny-<task> each (trained when missing); tasks: the embedded tasks; problems: test problems
    per task; n: samples per problem (largest Best-of-N); chunk: problems per policy call (one
    progress tick each; each call draws from its own seed, so another chunk gives other samples
    and other numbers, as experiments.search's chunk does); seed: problems and sampling seed; train_problems: SFT pairs to draw;
    sweep_problems, sweep_strategies, sweep_budgets: the compute-matched strategy comparison
    (0 problems: skip it); sprm_task: the task whose SPRM stage gives the top-level `aha.*` keys
    (when it runs; else the last task with a stage)."""

    out_dir: str = "outputs/demo"
    checkpoints: str = "outputs/checkpoints"
    tasks: tuple[DemoTask, ...] = DEFAULT_TASKS
    problems: int = 200
    n: int = 32
    chunk: int = 16
    seed: int = 0
    train_problems: int = 100_000
    sweep_problems: int = 100
    sweep_strategies: tuple[str, ...] = DEMO_STRATEGIES
    sweep_budgets: tuple[int, ...] = DEMO_BUDGETS
    sft: SFTConfig = field(default_factory=SFTConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    sprm_task: str = "countdown"

    def __post_init__(self) -> None:
        if self.sweep_problems < 0:
            raise ValueError(f"DemoConfig.sweep_problems={self.sweep_problems!r} must be >= 0")
        for name in ("problems", "n", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not self.tasks:
            raise ValueError("DemoConfig.tasks is empty: name at least one task")
        other = [task.name for task in self.tasks if task.other_difficulty]
        if other and self.sweep_problems:  # the sweep searched default-difficulty problems
            raise ValueError(f"DemoTask({other[0]}).config is another difficulty than the task's default, which the "
                             "strategy sweep does not take (it searches default problems): give sweep_problems=0")

    def run_dir(self, task: DemoTask) -> Path:
        return Path(self.checkpoints) / f"tiny-{task.name}"


def search_in_chunks(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: BestOfNConfig, chunk: int, desc: str
) -> list[SearchResult]:
    """Best-of-N over problems, `chunk` problems per batched call, with a progress bar."""
    results: list[SearchResult] = []
    with tqdm(total=len(problems), desc=desc, unit="problem") as bar:
        for start in range(0, len(problems), chunk):
            part = problems[start : start + chunk]
            results += best_of_n(part, policy, scorer, replace(cfg, seed=cfg.seed + start))
            bar.update(len(part))
    return results


def rescored(results: Sequence[SearchResult], outcomes: Sequence[ProblemOutcome], scorer: Scorer) -> list[ProblemOutcome]:
    """The same graded candidates with path scores from another scorer (no new generation)."""
    out = []
    for r, o in zip(results, outcomes):
        step_scores = scorer.score([Prefix(r.problem, c.steps) for c in r.candidates])
        cands = tuple(replace(co, score=aggregate(s)) for co, s in zip(o.candidates, step_scores))
        out.append(ProblemOutcome(o.problem_id, cands))
    return out


def mean_compute(results: Sequence[SearchResult]) -> dict[str, float]:
    total = sum((r.compute for r in results), Compute())
    return {k: v / len(results) for k, v in total.to_dict().items()}


def write_example_tree(out: Path, problem: Problem, policy: Policy, scorer: Scorer, cfg: DemoConfig, task: str) -> None:
    """A step-level beam search on one problem, saved as a result JSON with its PNG and HTML."""
    width = 4 if cfg.n >= 4 else 1
    beam_cfg = BeamSearchConfig(n=min(cfg.n, 8) // width * width, beam_width=width, seed=cfg.seed)
    (result,) = beam_search([problem], policy, scorer, beam_cfg)
    path = save_result(out / f"tree_{task}.json", result)
    render_tree(path)


def sweep_spec(cfg: DemoConfig, task: DemoTask) -> SweepSpec | None:
    """The compute-matched comparison on one task (None when cfg.sweep_problems is 0): the SFT
    policy ranked by its confidence, or the reflective model ranked by its head (sweep_scorer)."""
    if cfg.sweep_problems == 0:
        return None
    sprm = task.sweep_scorer == "sprm"
    assert task.reflective is not None or not sprm  # DemoTask: sweep_scorer="sprm" needs the reflective stage
    sft_dir = cfg.run_dir(task) / "final"
    policy_dir = stage_dir(task.reflective, Path(cfg.out_dir)) / "model" if sprm else sft_dir
    made_from = stage_identity(task.reflective, sft_dir) if sprm else {}  # type: ignore[arg-type]
    return SweepSpec(
        out_dir=Path(cfg.out_dir) / (f"sweep_{task.name}_sprm" if sprm else f"sweep_{task.name}"),
        checkpoint=str(policy_dir), made_from=made_from, task=task.name, problems=cfg.sweep_problems,
        strategies=cfg.sweep_strategies, budgets=cfg.sweep_budgets, seed=cfg.seed,
        scorer=task.sweep_scorer, policy="tiny_sprm" if sprm else "tiny",
        overrides=(f"policy.sampling.temperature={task.sampling_temperature}",
                   f"policy.sampling.max_total_tokens={task.max_total_tokens}"),
    )


def strategy_sweep(cfg: DemoConfig, task: DemoTask) -> StrategySweep | None:
    """Run the task's `sweep_spec` (None: no sweep); its policy folder is the one the earlier stages made."""
    spec = sweep_spec(cfg, task)
    return None if spec is None else run_strategy_sweep(spec)


def sprm_scorer(sprm: SPRMResult, module: ModuleType, sampling: SamplingConfig) -> SPRMScorer:
    """The trained head as a scorer of the demo's candidates (a second forward: they were sampled
    without the head)."""
    return SPRMScorer.from_pretrained(sprm.head_dir, module.prompt_text, sampling.step_format, batch_size=64)


@dataclass(frozen=True)
class TaskRun:
    """What one task adds to the report: its outcomes, its sweep and a line for the header."""

    outcomes: TaskOutcomes
    sweep: StrategySweep | None
    summary: str
    seconds: dict[str, float]


@dataclass(frozen=True)
class Samples:
    """One model's greedy and Best-of-N results on the demo's problems."""

    policy: TransformersPolicy
    greedy: list[SearchResult]
    sampled: list[SearchResult]


def sample_problems(model_dir: Path, problems: Sequence[Problem], cfg: DemoConfig, task: DemoTask,
                    with_step_head: bool = False) -> Samples:
    """Greedy and Best-of-cfg.n of the model on the problems, batched, with progress bars.
    with_step_head: the model's SPRM head scores each step while it is generated (Step.score)."""
    sampling = SamplingConfig(temperature=task.sampling_temperature, max_total_tokens=task.max_total_tokens)
    policy = TransformersPolicy.from_pretrained(model_dir, sampling, task.module.prompt_text,
                                                with_step_head=with_step_head)
    greedy = TransformersPolicy(policy.model, policy.tokenizer, replace(sampling, temperature=0.0),
                                task.module.prompt_text, step_head=policy.step_head)
    label = f"{task.name}{' reflective' if with_step_head else ''}"
    scorer = ConfidenceScorer()
    greedy_results = search_in_chunks(problems, greedy, scorer, BestOfNConfig(n=1), cfg.chunk * cfg.n, f"{label} greedy")
    sampled = search_in_chunks(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), cfg.chunk,
                               f"{label} best-of-{cfg.n}")
    return Samples(policy, greedy_results, sampled)


def sft_baseline(samples: Samples, task: DemoTask, n: int) -> dict[str, float]:
    """`<task>.sft_<metric>`: the SFT policy's greedy, pass@1, maj@n, conf_bon@n and pass@n, kept
    beside the reflective model's table."""
    module = task.module
    conf = grade_results(samples.sampled, module.grade, module.extract_answer)
    outcomes = TaskOutcomes(task.name, grade_results(samples.greedy, module.grade, module.extract_answer), conf, conf, {})
    est = estimates(outcomes)
    return {f"{task.name}.sft_{k}": est[k].mean for k in ("greedy", "pass@1", f"maj@{n}", f"conf_bon@{n}", f"pass@{n}")}


def frozen_heads_outcomes(reflective: SPRMResult, task: DemoTask, samples: Samples, conf: Sequence[ProblemOutcome]
                          ) -> dict[str, list[ProblemOutcome]]:
    """The ablation's heads on the SFT policy's frozen features (`experiments.demo_ablation`),
    trained on the reflective stage's caches, each scoring the candidates with a second forward."""
    assert reflective.train_cache is not None and reflective.heldout_cache is not None
    work = reflective.train_cache.parent
    layer = task.reflective.feature_layer if task.reflective else -2
    out = {}
    for name, labels in FROZEN_HEADS:
        folder = frozen_head(reflective.train_cache, reflective.heldout_cache, labels, layer, work)
        head = SPRMResult(folder, {}, reflective.aha_plot)
        out[name] = rescored(samples.sampled, conf, sprm_scorer(head, task.module, samples.policy.sampling))
    return out


def run_task(cfg: DemoConfig, task: DemoTask, out: Path) -> TaskRun:
    """Train-or-load the task's policy (and its reflective model, for a task with that stage),
    sample greedy and Best-of-N, grade, sweep the strategies. TaskRun.seconds: wall time of each
    stage (policy, sprm, sampling, sweep; a cached stage is ~0 s)."""
    module = task.module
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    ckpt = ensure_policy(cfg.run_dir(task), task.sft or cfg.sft, cfg.model, task.task_config, cfg.train_problems,
                         task=task.name)
    problems = module.generate_problems("test", cfg.problems, cfg.seed, task.task_config)
    seconds["policy"] = time.perf_counter() - start

    start = time.perf_counter()
    reflective = None if task.reflective is None else run_reflective_stage(task.reflective, ckpt, out)
    seconds["sprm"] = time.perf_counter() - start

    start = time.perf_counter()
    base = sample_problems(ckpt, problems, cfg, task)
    own_start = time.perf_counter()  # the reported model's own pass (the reflective model's, when there is one)
    samples = base if reflective is None else sample_problems(reflective.head_dir, problems, cfg, task, True)
    end = time.perf_counter()
    seconds["sampling"] = end - start
    elapsed = end - (start if reflective is None else own_start)
    policy, sampled = samples.policy, samples.sampled

    conf = grade_results(sampled, module.grade, module.extract_answer)
    start = time.perf_counter()
    head = None if task.sprm is None else run_sprm_stage(task.sprm, ckpt, out)
    ablation = None
    if reflective is not None:
        sprm = rescored(sampled, conf, StepScoreReader())  # the scores the head attached while generating
        rows = ablation_rows(conf, {"sprm (joint)": sprm, **frozen_heads_outcomes(reflective, task, samples, conf)},
                             ABLATION_SIZES)
        ablation = ablation_markdown(rows)
        extra = {**reflective.metrics, **sft_baseline(base, task, cfg.n), **ablation_metrics(task.name, rows)}
    elif head is not None:
        sprm, extra = rescored(sampled, conf, sprm_scorer(head, module, policy.sampling)), head.metrics
    else:
        sprm, extra = None, {}
    outcomes = TaskOutcomes(
        task=task.name,
        greedy=grade_results(samples.greedy, module.grade, module.extract_answer),
        conf=conf,
        random=rescored(sampled, conf, RandomScorer(seed=cfg.seed)),
        compute=mean_compute(sampled),
        sprm=sprm,
        extra=extra,
        ablation=ablation,
    )
    seconds["sprm"] += time.perf_counter() - start
    write_records(out / f"records_{task.name}.jsonl", sampled, conf)
    write_example_tree(out, problems[0], policy, ConfidenceScorer(), cfg, task.name)
    tokens = sum(r.compute.tokens_generated for r in sampled + samples.greedy)
    model = ckpt if reflective is None else reflective.head_dir
    summary = (
        f"- {task.name}: policy `{model}` ({policy.num_parameters / 1e6:.2f}M parameters), temperature "
        f"{task.sampling_temperature}; greedy + Best-of-{cfg.n} took {elapsed:.1f} s for {tokens} tokens "
        f"({tokens / elapsed:.0f} tokens/s)."
    )
    start = time.perf_counter()
    sweep = strategy_sweep(cfg, task)
    seconds["sweep"] = time.perf_counter() - start
    return TaskRun(outcomes, sweep, summary, seconds)


def timing_lines(runs: Sequence[TaskRun]) -> list[str]:
    """The report's stage-time table (seconds this run spent; cached stages cost ~0)."""
    stages = ("policy", "sprm", "sampling", "sweep")
    lines = ["| task | " + " | ".join(stages) + " | total |", "|---" * (len(stages) + 2) + "|"]
    for r in runs:
        cells = [f"{r.seconds.get(s, 0.0):.0f} s" for s in stages]
        lines.append(f"| {r.outcomes.task} | " + " | ".join(cells) + f" | {sum(r.seconds.values()):.0f} s |")
    return lines


def timing_metrics(runs: Sequence[TaskRun]) -> dict[str, float]:
    """`timing.<task>.<stage>_s` and `timing.total_s` for metrics.json."""
    out = {f"timing.{r.outcomes.task}.{stage}_s": round(s, 1) for r in runs for stage, s in r.seconds.items()}
    out["timing.total_s"] = round(sum(sum(r.seconds.values()) for r in runs), 1)
    return out


def sprm_task_metrics(runs: Sequence[TaskRun], preferred: str) -> dict[str, Any]:
    """`sprm_task` and the top-level `aha.diff_prob_first` / `_last` of that task (the preferred
    one when its stage ran, else the last task with a stage); {} when no task has a stage."""
    staged = [r.outcomes.task for r in runs if f"{r.outcomes.task}.aha.diff_prob_last" in r.outcomes.extra]
    if not staged:
        return {}
    task = preferred if preferred in staged else staged[-1]
    extra = next(r.outcomes.extra for r in runs if r.outcomes.task == task)
    return {"sprm_task": task, **{f"aha.{k}": extra[f"{task}.aha.{k}"] for k in ("diff_prob_first", "diff_prob_last")}}


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; return the metrics written to metrics.json."""
    out = Path(cfg.out_dir)
    runs = [run_task(cfg, task, out) for task in cfg.tasks]
    header = "\n".join(
        ["# treesearch demo report", ""] + [r.summary for r in runs]
        + ["", "Wall time of this run by stage (a stage reused from disk costs ~0 s):", ""] + timing_lines(runs)
        + ["", f"Config: `{json.dumps(asdict(cfg), default=str)}`"]
    )
    sweeps = {r.outcomes.task: r.sweep for r in runs if r.sweep is not None}
    extra = timing_metrics(runs) | sprm_task_metrics(runs, cfg.sprm_task)
    write_report(out, [r.outcomes for r in runs], header, sweeps, extra=extra)
    return json.loads((out / "metrics.json").read_text())


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    d = DemoConfig()
    ap = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=d.out_dir)
    ap.add_argument("--checkpoints", default=d.checkpoints, help="folder of the cached tiny-<task> policies")
    ap.add_argument("--tasks", default=",".join(t.name for t in d.tasks), help="comma-separated: arith,countdown")
    ap.add_argument("--problems", type=int, default=d.problems)
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--chunk", type=int, default=d.chunk,
                    help="problems per policy call (each call draws from its own seed: another chunk, other samples)")
    ap.add_argument("--temperature", type=float, default=None, help="default: each task's own")
    ap.add_argument("--sweep-problems", type=int, default=d.sweep_problems, help="0 skips the strategy sweep")
    ap.add_argument("--seed", type=seed_int, default=d.seed)
    a = ap.parse_args(argv)
    defaults = {t.name: t for t in d.tasks}
    names = [name for name in a.tasks.split(",") if name]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # ran the task twice, one report section over the other's metrics
        raise ValueError(f"--tasks {a.tasks!r} names {', '.join(twice)} more than once")
    tasks = tuple(replace(defaults.get(name, DemoTask(name)), temperature=a.temperature) for name in names)
    return DemoConfig(out_dir=a.out_dir, checkpoints=a.checkpoints, tasks=tasks, problems=a.problems, n=a.n,
                      chunk=a.chunk, seed=a.seed, sweep_problems=a.sweep_problems)


def check_output_folders(cfg: DemoConfig) -> None:
    """A ValueError naming --out-dir or --checkpoints when it, or a folder above it, is a file, a
    sweep folder of other settings, or a problem count a test split cannot give: refused before
    anything trains, not when first written."""
    for flag, folder in (("--out-dir", cfg.out_dir), ("--checkpoints", cfg.checkpoints)):
        existing = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{flag} {folder}: {existing} is a file, not a folder")
    specs = [spec for spec in (sweep_spec(cfg, task) for task in cfg.tasks) if spec is not None]
    for flag, folder in (("--out-dir", cfg.out_dir), ("--checkpoints", cfg.checkpoints)) if specs else ():
        try:  # a sweep passes both to Hydra as override values
            hydra_path(folder)
        except ValueError as err:
            raise ValueError(f"{flag} {err}") from None
    for spec in specs:  # a sweep folder of other settings (--seed, --sweep-problems, ...)
        check_sweep_folder(spec)
    check_problem_counts(cfg)


def check_problem_counts(cfg: DemoConfig) -> None:
    """A ValueError naming --problems or --sweep-problems when a task's test split holds fewer
    (countdown: 2325): found after the SFT stage, or after every stage but the sweep, before."""
    for task in cfg.tasks:
        for flag, count in (("--problems", cfg.problems), ("--sweep-problems", cfg.sweep_problems)):
            if count:
                try:
                    task.module.generate_problems("test", count, cfg.seed, task.task_config)
                except ValueError as err:
                    raise ValueError(f"{flag} {count}: {task.name}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a bad setting (an unknown task, a count below 1, an output folder that is
    a file) prints one line `error: ...` before anything runs and exits 2."""
    with interrupt_reported("the finished stages and runs are kept under the output folder (an SFT policy resumes "
                            "from its last/; a stage stopped midway, such as the reflective model's training, starts "
                            "over); rerun the same command to go on from them"):
        return run_command(demo_command, argv)


def demo_command(argv: Sequence[str] | None = None) -> int:
    """Parse and check argv, run the demo, print the report and each task's headline numbers."""
    cfg = parse_args(argv)
    check_output_folders(cfg)
    freeze_long_lived()  # the imports' objects: out of the garbage collector's walks (policies/gc_freeze.py)
    metrics = run_demo(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    for task in cfg.tasks:
        keys = ["greedy", "pass@1", f"maj@{cfg.n}", f"conf_bon@{cfg.n}", f"pass@{cfg.n}"]
        print(task.name, {k: round(metrics[f"{task.name}.{k}"], 3) for k in keys if f"{task.name}.{k}" in metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
