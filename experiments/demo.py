"""`make demo`: the main job on the embedded default, from a fresh clone.

1. Loads the tiny arith policy from `outputs/checkpoints/tiny-arith`, or trains it there first
   (SFT, 8 minutes on 2 CPU cores) when no checkpoint is cached.
2. Greedy decoding and Best-of-N sampling (N = 32) on the arith test split, batched, with a
   progress bar.
3. The compute-matched comparison (`experiments.demo_sweep`): Best-of-N, beam search, DVTS and
   MCTS at N = 4, 8, 16, 32 on the first 100 test problems, each run resumable and cached in
   `outputs/demo/sweep_arith/`; the scaling fit per strategy and its plot `scaling_arith.png`.
4. Writes `outputs/demo/report.md`, `outputs/demo/metrics.json` (keys documented in the README),
   `outputs/demo/records.jsonl` (every candidate with its scores) and one example tree: a
   step-level beam search on the first problem (`tree_example.json`, `.png`, `.html`).

    python -m experiments.demo                       # the default
    python -m experiments.demo --problems 50 --n 8   # smaller
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from experiments.demo_report import TaskOutcomes, write_report
from experiments.demo_sweep import DEMO_BUDGETS, DEMO_STRATEGIES, StrategySweep, SweepSpec, run_strategy_sweep
from experiments.metrics import ProblemOutcome
from experiments.outcomes import grade_results, write_records
from experiments.plot import render_tree
from experiments.result_json import save_result
from experiments.tasks import arith
from experiments.tiny_policy import ensure_policy
from policies.sampling_config import SamplingConfig
from policies.sft import SFTConfig
from policies.tiny_model import TinyModelConfig
from policies.transformers_policy import TransformersPolicy
from scorers.confidence import ConfidenceScorer
from scorers.random_scorer import RandomScorer
from treesearch.aggregation import aggregate
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.compute import Compute
from treesearch.protocols import Policy, Scorer
from treesearch.records import Prefix, Problem
from treesearch.result import SearchResult


@dataclass(frozen=True)
class DemoConfig:
    """out_dir: where the report goes; checkpoint: the cached policy (trained when missing);
    problems: arith test problems; n: samples per problem (largest Best-of-N); chunk: problems per
    policy call (one progress tick each); temperature: sampling temperature; seed: problems and
    sampling seed; max_total_tokens: generation cap per solution; sweep_problems,
    sweep_strategies, sweep_budgets: the compute-matched strategy comparison (0 problems: skip it)."""

    out_dir: str = "outputs/demo"
    checkpoint: str = "outputs/checkpoints/tiny-arith"  # run folder; the model is <checkpoint>/final
    problems: int = 200
    n: int = 32
    chunk: int = 16
    temperature: float = arith.DEFAULT_TEMPERATURE
    seed: int = 0
    max_total_tokens: int = 160
    train_problems: int = 100_000
    sweep_problems: int = 100
    sweep_strategies: tuple[str, ...] = DEMO_STRATEGIES
    sweep_budgets: tuple[int, ...] = DEMO_BUDGETS
    task: arith.ArithConfig = field(default_factory=arith.ArithConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        if self.sweep_problems < 0:
            raise ValueError(f"DemoConfig.sweep_problems={self.sweep_problems!r} must be >= 0")
        for name in ("problems", "n", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"DemoConfig.temperature={self.temperature!r} must be >= 0")


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


def write_example_tree(out: Path, problem: Problem, policy: Policy, scorer: Scorer, cfg: DemoConfig) -> None:
    """A step-level beam search on one problem, saved as a result JSON with its PNG and HTML."""
    width = 4 if cfg.n >= 4 else 1
    beam_cfg = BeamSearchConfig(n=min(cfg.n, 8) // width * width, beam_width=width, seed=cfg.seed)
    (result,) = beam_search([problem], policy, scorer, beam_cfg)
    path = save_result(out / "tree_example.json", result)
    render_tree(path)


def strategy_sweep(cfg: DemoConfig, ckpt: Path) -> StrategySweep | None:
    """The compute-matched comparison on arith (None when cfg.sweep_problems is 0)."""
    if cfg.sweep_problems == 0:
        return None
    spec = SweepSpec(
        out_dir=Path(cfg.out_dir) / "sweep_arith", checkpoint=str(ckpt), task="arith",
        problems=cfg.sweep_problems, strategies=cfg.sweep_strategies, budgets=cfg.sweep_budgets, seed=cfg.seed,
        overrides=(f"policy.sampling.temperature={cfg.temperature}", f"policy.sampling.max_total_tokens={cfg.max_total_tokens}"),
    )
    return run_strategy_sweep(spec)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; return the metrics written to metrics.json."""
    out = Path(cfg.out_dir)
    ckpt = ensure_policy(Path(cfg.checkpoint), cfg.sft, cfg.model, cfg.task, cfg.train_problems)
    problems = arith.generate_problems("test", cfg.problems, cfg.seed, cfg.task)
    sampling = SamplingConfig(temperature=cfg.temperature, max_total_tokens=cfg.max_total_tokens)
    policy = TransformersPolicy.from_pretrained(ckpt, sampling, arith.prompt_text)
    greedy = TransformersPolicy(policy.model, policy.tokenizer, replace(sampling, temperature=0.0), arith.prompt_text)
    scorer = ConfidenceScorer()

    start = time.perf_counter()
    greedy_results = search_in_chunks(problems, greedy, scorer, BestOfNConfig(n=1), cfg.chunk * cfg.n, "greedy")
    sampled = search_in_chunks(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), cfg.chunk, f"best-of-{cfg.n}")
    elapsed = time.perf_counter() - start

    conf = grade_results(sampled, arith.grade, arith.extract_answer)
    task = TaskOutcomes(
        task="arith",
        greedy=grade_results(greedy_results, arith.grade, arith.extract_answer),
        conf=conf,
        random=rescored(sampled, conf, RandomScorer(seed=cfg.seed)),
        compute=mean_compute(sampled),
    )
    write_records(out / "records.jsonl", sampled, conf)
    write_example_tree(out, problems[0], policy, scorer, cfg)
    tokens = sum(r.compute.tokens_generated for r in sampled + greedy_results)
    header = (
        "# treesearch demo report\n\n"
        f"Policy: `{ckpt}` ({policy.num_parameters / 1e6:.2f}M parameters), sampling temperature "
        f"{cfg.temperature}. Generation took {elapsed:.0f} s for {tokens} tokens "
        f"({tokens / elapsed:.0f} tokens/s). Config: `{json.dumps(asdict(cfg), default=str)}`"
    )
    sweep = strategy_sweep(cfg, ckpt)
    write_report(out, [task], header, {"arith": sweep} if sweep else {})
    return json.loads((out / "metrics.json").read_text())


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    d = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=d.out_dir)
    ap.add_argument("--checkpoint", default=d.checkpoint)
    ap.add_argument("--problems", type=int, default=d.problems)
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--chunk", type=int, default=d.chunk)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    return DemoConfig(out_dir=a.out_dir, checkpoint=a.checkpoint, problems=a.problems, n=a.n,
                      chunk=a.chunk, temperature=a.temperature, seed=a.seed)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    metrics = run_demo(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    keys = ["arith.greedy", "arith.pass@1", f"arith.maj@{cfg.n}", f"arith.conf_bon@{cfg.n}", f"arith.pass@{cfg.n}"]
    print({k: round(metrics[k], 3) for k in keys if k in metrics})


if __name__ == "__main__":
    main()
