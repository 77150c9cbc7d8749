"""Post-hoc metrics from saved search records: one run, or every run of a sweep.

Reads only what `python -m experiments.search` wrote (`records.jsonl`, `config.yaml`), never a
model. For one run (`run_metrics`), all with 95% bootstrap intervals over problems:
  accuracy            the strategy's chosen answer is correct (a problem with no candidate: wrong);
  accuracy_by_<key>   the same per difficulty (arith: meta "num_ops");
  all_candidates      maj / wmaj / pass over ALL of a problem's candidates (any strategy);
  best_of_n           for Best-of-N runs only (candidates are independent samples in order): every
                      smaller N from the one large-N run by the reference's disjoint-group metric
                      (`experiments.metrics`): bon@N (argmax score, first on ties), maj@N,
                      wmaj@N (score-weighted vote), pass@N (oracle), for N = 1, 2, 4, ..., n;
  compute             mean per problem of every `Compute` field, the policy's parameter count and
                      C = policy parameters x tokens generated (the scaling law's x axis).
For a sweep folder (`sweep_summaries`): one row per run folder below it (any depth) holding
records.jsonl: strategy, scorer, N, seed, tokens generated per problem, C, FLOPs, accuracy + CI.

    python -m experiments.sweep_metrics outputs/search/RUN          # prints the run's metrics JSON
    python -m experiments.sweep_metrics outputs/sweeps/budget_sweep # table; writes sweep_metrics.csv/.json

Tests: `.venv/bin/pytest tests/test_scaling.py`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from experiments.metrics import CandidateOutcome, Estimate, ProblemOutcome, bootstrap, problem_accuracy
from experiments.record_log import load_rows

RECORDS = "records.jsonl"
CONFIG = "config.yaml"
# the strategy config field that is its budget (the N of a sweep); "n" for the others
BUDGET_FIELDS: dict[str, str] = {"mcts": "iterations"}
# name in metrics -> selector of experiments.metrics
CURVE_SELECTORS: dict[str, str] = {"bon": "best_score", "maj": "majority", "wmaj": "weighted_majority", "pass": "oracle"}
SWEEP_COLUMNS = ("run", "strategy", "scorer", "budget", "seed", "problems", "tokens_per_problem",
                 "compute_C", "flops_per_problem", "accuracy", "accuracy_low", "accuracy_high")


class RunFolderError(ValueError):
    """A run folder without usable records or config."""


def estimate_dict(est: Estimate) -> dict[str, float]:
    return {"mean": est.mean, "low": est.low, "high": est.high}


# -- one run ------------------------------------------------------------------------------------


def unique_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each problem id, in file order (a resumed run never writes twice, but a
    reader should not double count if someone concatenated files)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        if row["problem_id"] not in seen:
            seen.add(row["problem_id"])
            out.append(row)
    return out


def problem_outcome(row: dict[str, Any]) -> ProblemOutcome:
    cands = tuple(CandidateOutcome(c["answer"], bool(c["correct"]), float(c["score"])) for c in row["candidates"])
    return ProblemOutcome(row["problem_id"], cands)


def chosen_correct(row: dict[str, Any]) -> float:
    """1.0 when the strategy's chosen candidate is correct (no candidate counts as wrong)."""
    return 1.0 if row.get("correct") else 0.0


def all_candidates_accuracy(outcomes: Sequence[ProblemOutcome], selector: str, seed: int = 0) -> Estimate:
    """The selector over each problem's whole candidate list (0 for a problem with none)."""
    values = [problem_accuracy(o, len(o.candidates), selector) if o.candidates else 0.0 for o in outcomes]
    return bootstrap(values, seed=seed)


def budget_ladder(count: int) -> list[int]:
    """1, 2, 4, ... below count, then count itself: the Ns computable from count samples."""
    ladder, n = [], 1
    while n < count:
        ladder.append(n)
        n *= 2
    return ladder + [count]


def best_of_n_curve(outcomes: Sequence[ProblemOutcome], seed: int = 0) -> dict[str, dict[str, float]]:
    """{"bon@N": est, "maj@N": ..., "wmaj@N": ..., "pass@N": ...} for every N of the ladder, by
    disjoint groups of N in generation order (the reference's metric)."""
    count = min(len(o.candidates) for o in outcomes)
    out: dict[str, dict[str, float]] = {}
    for n in budget_ladder(count):
        for name, selector in CURVE_SELECTORS.items():
            values = [problem_accuracy(o, n, selector) for o in outcomes]
            out[f"{name}@{n}"] = estimate_dict(bootstrap(values, seed=seed))
    return out


def accuracy_by(rows: Sequence[dict[str, Any]], key: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Chosen-answer accuracy per value of meta[key] (rows without it are left out)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if key in row.get("meta", {}):
            groups[str(row["meta"][key])].append(chosen_correct(row))
    return {
        value: {**estimate_dict(bootstrap(groups[value], seed=seed)), "problems": len(groups[value])}
        for value in sorted(groups, key=lambda v: (len(v), v))
    }


def mean_compute(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean per problem of each compute field, plus policy_parameters and C = params x tokens."""
    fields = rows[0]["compute"].keys()
    out = {name: sum(r["compute"][name] for r in rows) / len(rows) for name in fields}
    params = float(rows[0].get("policy_parameters", 0))
    out["policy_parameters"] = params
    out["C"] = params * out["tokens_generated"]
    return out


def budget_of(strategy: str, config: dict[str, Any]) -> int:
    """The run's budget N: its strategy config's `n` (`iterations` for MCTS)."""
    return int(config[BUDGET_FIELDS.get(strategy, "n")])


def run_budget(strategy: str, strategy_config: dict[str, Any], run_config: dict[str, Any]) -> int:
    """The N a sweep row is filed under: `budget_of`, except for an MCTS run with a token budget
    (compute-matched by `experiments.demo_sweep`: its iterations are only a cap), which takes the
    run config's top-level `budget`."""
    if strategy == "mcts" and strategy_config.get("token_budget") is not None and isinstance(run_config.get("budget"), int):
        return int(run_config["budget"])
    return budget_of(strategy, strategy_config)


def run_metrics(rows: Sequence[dict[str, Any]], difficulty_key: str = "num_ops", seed: int = 0) -> dict[str, Any]:
    """Every metric of one run's rows (see the module docstring)."""
    rows = unique_rows(rows)
    if not rows:
        raise ValueError("no records: nothing to compute metrics from")
    strategy = rows[0]["strategy"]
    outcomes = [problem_outcome(r) for r in rows]
    metrics: dict[str, Any] = {
        "problems": len(rows),
        "strategy": strategy,
        "budget": budget_of(strategy, rows[0]["config"]),
        "accuracy": estimate_dict(bootstrap([chosen_correct(r) for r in rows], seed=seed)),
        f"accuracy_by_{difficulty_key}": accuracy_by(rows, difficulty_key, seed),
        "all_candidates": {
            f"{name}@all": estimate_dict(all_candidates_accuracy(outcomes, selector, seed))
            for name, selector in CURVE_SELECTORS.items() if name != "bon"
        },
        "compute": mean_compute(rows),
    }
    if strategy == "best_of_n" and all(o.candidates for o in outcomes):
        metrics["best_of_n"] = best_of_n_curve(outcomes, seed)
    return metrics


# -- a sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One run of a sweep.

    run: the run folder relative to the sweep folder; strategy: registry name, or "greedy" for
    Best-of-1 at temperature 0; scorer: the scorer's class name; budget: N (MCTS: iterations);
    seed: the run's top-level seed; problems: problems with records; tokens_per_problem: mean
    tokens generated; compute_C: policy parameters x tokens_per_problem; flops_per_problem: mean
    FLOPs estimate; accuracy: chosen-answer accuracy with its CI; per_problem: (problem id,
    correct) pairs, for pooling seeds of one budget.
    """

    run: str
    strategy: str
    scorer: str
    budget: int
    seed: int
    problems: int
    tokens_per_problem: float
    compute_C: float
    flops_per_problem: float
    accuracy: Estimate
    per_problem: tuple[tuple[str, float], ...]

    def table_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k not in ("accuracy", "per_problem")}
        row.update(accuracy=self.accuracy.mean, accuracy_low=self.accuracy.low, accuracy_high=self.accuracy.high)
        return row


def strategy_label(strategy: str, strategy_config: dict[str, Any], temperature: float | None) -> str:
    """The registry name, except Best-of-1 at temperature 0, which is greedy decoding."""
    if strategy == "best_of_n" and strategy_config.get("n") == 1 and temperature == 0:
        return "greedy"
    return strategy


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: no {CONFIG} beside {RECORDS}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def summarize_run(run_dir: Path, root: Path, seed: int = 0) -> RunSummary:
    """The sweep row of one run folder."""
    rows = unique_rows(load_rows(run_dir / RECORDS))
    if not rows:
        raise RunFolderError(f"{run_dir}: {RECORDS} has no complete rows")
    config = read_run_config(run_dir)
    strategy = rows[0]["strategy"]
    temperature = config.get("policy", {}).get("sampling", {}).get("temperature")
    compute = mean_compute(rows)
    correct = [chosen_correct(r) for r in rows]
    return RunSummary(
        run=str(run_dir.relative_to(root)) if run_dir != root else ".",
        strategy=strategy_label(strategy, rows[0]["config"], temperature),
        scorer=str(config.get("scorer", {}).get("_target_", "?")).rsplit(".", 1)[-1],
        budget=run_budget(strategy, rows[0]["config"], config),
        seed=int(config.get("seed", 0)),
        problems=len(rows),
        tokens_per_problem=compute["tokens_generated"],
        compute_C=compute["C"],
        flops_per_problem=compute["flops"],
        accuracy=bootstrap(correct, seed=seed),
        per_problem=tuple((r["problem_id"], c) for r, c in zip(rows, correct)),
    )


def run_folders(sweep_dir: Path) -> list[Path]:
    """Every folder at or below sweep_dir that holds records.jsonl, sorted."""
    return sorted(p.parent for p in Path(sweep_dir).rglob(RECORDS))


def sweep_summaries(sweep_dir: str | Path) -> list[RunSummary]:
    """One RunSummary per run folder, ordered by strategy, scorer, budget, seed."""
    root = Path(sweep_dir)
    folders = run_folders(root)
    if not folders:
        raise RunFolderError(f"{root}: no {RECORDS} found at or below it")
    summaries = [summarize_run(folder, root) for folder in folders]
    return sorted(summaries, key=lambda s: (s.strategy, s.scorer, s.budget, s.seed, s.run))


def write_sweep_table(summaries: Sequence[RunSummary], out_dir: Path) -> tuple[Path, Path]:
    """sweep_metrics.csv (one row per run) and sweep_metrics.json (the same rows) in out_dir."""
    rows = [s.table_row() for s in summaries]
    csv_path, json_path = out_dir / "sweep_metrics.csv", out_dir / "sweep_metrics.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2))
    return csv_path, json_path


def format_table(summaries: Sequence[RunSummary]) -> str:
    lines = [f"{'strategy':<12} {'scorer':<20} {'N':>4} {'seed':>4} {'probs':>5} {'tok/prob':>9} "
             f"{'C':>10} {'accuracy [95% CI]':>24}"]
    for s in summaries:
        lines.append(f"{s.strategy:<12} {s.scorer:<20} {s.budget:>4} {s.seed:>4} {s.problems:>5} "
                     f"{s.tokens_per_problem:>9.1f} {s.compute_C:>10.3g} {s.accuracy.fmt():>24}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a run folder (holds records.jsonl) or a sweep folder")
    args = ap.parse_args(argv)
    try:
        if (args.path / RECORDS).is_file():
            print(json.dumps(run_metrics(load_rows(args.path / RECORDS)), indent=2))
            return 0
        summaries = sweep_summaries(args.path)
    except (RunFolderError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    csv_path, _ = write_sweep_table(summaries, args.path)
    print(format_table(summaries))
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
