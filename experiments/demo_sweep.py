"""The demo's compute-matched comparison: Best-of-N, beam search, DVTS, MCTS, REBASE and particle
filtering at four budgets on one task, run through `experiments.search` (so every run is resumable and cached on disk), then
the scaling fit per strategy, the scaling plot and the budget table.

    from experiments.demo_sweep import SweepSpec, run_strategy_sweep
    sweep = run_strategy_sweep(SweepSpec(out_dir=Path("outputs/demo/sweep_arith"),
                                         checkpoint="outputs/checkpoints/tiny-arith/final"))
    sweep.budget_table       # [{strategy, budget, tokens, accuracy, low, high}, ...]
    sweep.slopes             # {strategy: accuracy gained per doubling of compute}

The same runs by hand: `python -m experiments.search search=beam budget=16 task.count=100
out_dir=...` for each (strategy, budget); `python -m experiments.plot scaling DIR` draws the plot
from the folder. Each strategy is scored by the scorer of `scorer` (confidence by default: the
policy's own step-token log-probs). Compute matching: Best-of-N, beam search, DVTS, REBASE and
particle filtering at the same N generate about the same tokens; MCTS at budget N gets a token budget equal to Best-of-N's
tokens per problem at N (measured in the same sweep, which runs best_of_n first) and up to
MCTS_SIMULATIONS_PER_SAMPLE x N simulations to spend it (MCTS that converges early spends
less: its tokens are in the table). The table reports tokens per problem beside each accuracy
and the scaling fit is against compute C = parameters x generated tokens; they and the plot hold
only the spec's (strategy, budget) runs, not other runs left in the folder. `out_dir/sweep.json`
keeps the settings its runs share (checkpoint, what made it, task, problems, scorer, policy, seed,
overrides):
a sweep of other settings into the same folder is refused before any run (`check_sweep_folder`).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from experiments.plot_scaling import plot_runs
from experiments.result_json import write_atomic
from experiments.run_weights import WEIGHTS_FILE, changed_folders, model_folders
from experiments.scaling import DEFAULT_THRESHOLD, SeriesScaling, scaling_by_strategy
from experiments.search import CONFIG_DIR, run_search_experiment
from experiments.sweep_metrics import RunSummary, read_run_config, sweep_summaries
from treesearch.config_diff import override_value

DEMO_STRATEGIES: tuple[str, ...] = ("best_of_n", "beam", "dvts", "mcts", "rebase", "particle_filtering")
DEMO_BUDGETS: tuple[int, ...] = (4, 8, 16, 32)
MCTS_SIMULATIONS_PER_SAMPLE = 16  # most MCTS simulations per unit of N when matched to tokens


@dataclass(frozen=True)
class SweepSpec:
    """out_dir: one sub-folder per (strategy, budget) run goes here; checkpoint: the policy's
    model directory; task: a config of the `task` group; problems: test problems per run;
    strategies: options of the `search` group; budgets: N (MCTS: see match_tokens); scorer: an option
    of the `scorer` group; policy: an option of the `policy` group (tiny, or tiny_sprm for a
    reflective model whose head scores each step while it is generated: scorer=sprm); seed:
    sampling seed and the task's (its problems are the demo table's first ones at that seed);
    overrides: extra Hydra overrides for every run (e.g.
    "policy.sampling.temperature=0.8"); match_tokens: MCTS gets Best-of-N's tokens at the
    same N as its token budget (module docstring; with mcts among the strategies, best_of_n must
    be too: refused otherwise), False: N simulations and no token budget; made_from: what made
    the checkpoint where its path alone does not say (the demo's reflective model, trained again
    in place when its SFT policy or stage config changes), so a sweep of the old model is refused
    instead of reused."""

    out_dir: Path
    checkpoint: str
    task: str = "arith"
    problems: int = 100
    strategies: tuple[str, ...] = DEMO_STRATEGIES
    budgets: tuple[int, ...] = DEMO_BUDGETS
    scorer: str = "confidence"
    policy: str = "tiny"
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)
    match_tokens: bool = True
    made_from: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.problems < 1:
            raise ValueError(f"SweepSpec.problems={self.problems!r} must be >= 1")
        if not self.strategies or not self.budgets:
            raise ValueError(f"SweepSpec needs strategies and budgets, got {self.strategies!r} and {self.budgets!r}")
        bad = [b for b in self.budgets if b < 4 or b % 4]
        if bad:  # beam search and DVTS use beam width 4
            raise ValueError(f"SweepSpec.budgets={self.budgets!r}: each must be a multiple of 4 (the beam width), got {bad}")
        if self.match_tokens and "mcts" in self.strategies and "best_of_n" not in self.strategies:
            # MCTS ran unmatched while sweep.json said matched, and a folder of matched MCTS runs failed at its first run
            raise ValueError(f"SweepSpec.strategies={self.strategies!r} has mcts but not best_of_n, whose tokens MCTS is "
                             "matched to (match_tokens=True): add best_of_n, or set match_tokens=False")


@dataclass(frozen=True)
class StrategySweep:
    """What the demo reports from a sweep: the runs, one scaling series per strategy, the table
    rows and the plot's path."""

    runs: tuple[RunSummary, ...]
    series: tuple[SeriesScaling, ...]
    plot: Path
    scorer: str = "confidence"
    checkpoint: str = ""

    @property
    def budget_table(self) -> list[dict[str, Any]]:
        """One row per run: strategy, budget, tokens generated per problem, accuracy and its CI."""
        return [
            {"strategy": r.strategy, "budget": r.budget, "tokens": r.tokens_per_problem,
             "accuracy": r.accuracy.mean, "low": r.accuracy.low, "high": r.accuracy.high}
            for r in self.runs
        ]

    @property
    def slopes(self) -> dict[str, float | None]:
        """Accuracy gained per doubling of compute, per strategy (None without a fit)."""
        return {s.name: None if s.fit is None else s.fit.slope for s in self.series}


def run_overrides(spec: SweepSpec, strategy: str, budget: int, token_budget: int | None = None) -> list[str]:
    """The Hydra overrides of one run of the sweep; token_budget: MCTS's, when matched."""
    matched = [] if token_budget is None else [
        f"search.token_budget={token_budget}", f"search.iterations={MCTS_SIMULATIONS_PER_SAMPLE * budget}",
    ]
    return [  # task.seed: the demo draws its problems with its seed too, so the sweep's are the table's first ones
        f"policy={spec.policy}", f"search={strategy}", f"budget={budget}", f"seed={spec.seed}", f"scorer={spec.scorer}",
        f"task={spec.task}", f"task.count={spec.problems}", f"task.seed={spec.seed}", f"policy.path={hydra_path(spec.checkpoint)}",
        f"out_dir={hydra_path(spec.out_dir / f'{strategy}_{budget}')}", *matched, *spec.overrides,
    ]


def hydra_path(path: Path | str) -> str:
    """path as one Hydra override value, quoted where it holds ',', '=', a quote or a space (a
    folder "runs,v2" failed the sweep after every other stage of the demo); a ValueError for a
    path no override can write (a backslash, a control character, "${")."""
    value = override_value(str(path))
    if value is None:
        raise ValueError(f"{path}: a folder with a backslash, a control character or '${{' cannot be passed to the "
                         "sweep's Hydra runs; use another folder")
    return value


def token_budgets(spec: SweepSpec, strategy: str) -> dict[int, int]:
    """{N: MCTS's token budget} (Best-of-N's tokens per problem at N, rounded up, from the spec's
    own best_of_n runs: `spec_runs`, not another Best-of-N run left in the folder) when the
    strategy is MCTS and the sweep matches tokens; else {}."""
    if strategy != "mcts" or not spec.match_tokens or "best_of_n" not in spec.strategies:
        return {}
    runs = spec_runs(spec, sweep_summaries(spec.out_dir))
    tokens = {r.budget: r.tokens_per_problem for r in runs if r.strategy == "best_of_n"}
    return {n: max(1, math.ceil(t)) for n, t in tokens.items()}


SWEEP_STAMP = "sweep.json"  # in out_dir: the settings its runs were made with
IDENTITY = ("checkpoint", "task", "problems", "scorer", "policy", "seed", "overrides", "match_tokens", "made_from")
ADDED_KEYS = ("made_from",)  # absent from sweeps saved before it existed: those are not refused for it


def check_sweep_folder(spec: SweepSpec) -> None:
    """A ValueError naming what differs when spec.out_dir holds a sweep made with other settings
    (its SWEEP_STAMP) that has written records: each of its runs would refuse the new config only
    when reached, after every stage before it had run."""
    path = spec.out_dir / SWEEP_STAMP
    if not path.is_file() or not has_rows(spec.out_dir):  # a sweep that wrote no row yet binds nothing
        return
    saved, now = json.loads(path.read_text()), _identity(spec)
    keys = [key for key in IDENTITY if key in saved or key not in ADDED_KEYS]
    diffs = [f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in keys if saved.get(key) != now[key]]
    if diffs:
        raise ValueError(f"{spec.out_dir} holds a strategy sweep of other settings ({'; '.join(diffs)}); "
                         "use another output folder (--out-dir) or delete that one")


def has_rows(out_dir: Path) -> bool:
    """Whether any run under out_dir wrote a record (a sweep that failed at once on bad input did
    not: its stamp alone refused the corrected sweep)."""
    return any(path.stat().st_size > 0 for path in out_dir.rglob("records.jsonl"))


def _identity(spec: SweepSpec) -> dict[str, Any]:
    """The settings every run of the sweep shares, as read back from JSON (tuples as lists)."""
    return json.loads(json.dumps({key: str(getattr(spec, key)) if key == "checkpoint" else getattr(spec, key)
                                  for key in IDENTITY}))


def drop_runs_of_other_weights(spec: SweepSpec) -> list[Path]:
    """Remove the sweep's runs whose rows came from other weights than the sweep's checkpoint
    holds now (the policy trained again in place: `experiments.run_weights`), so they are searched
    again rather than refused, and a run of another budget left by a larger sweep does not join
    the table with old rows; returns them, each named in a note on stderr. A run is the sweep's
    when it is a real folder (not a link) in out_dir whose config searched spec.checkpoint; any
    other folder (a run of another model, the user's files) stays."""
    dropped, checkpoint = [], Path(spec.checkpoint).resolve()
    for record in sorted(spec.out_dir.glob(f"*/{WEIGHTS_FILE}")):
        run_dir = record.parent
        if run_dir.is_symlink():
            continue
        try:
            folders = model_folders(read_run_config(run_dir))
            if folders.get("policy.path") != checkpoint:
                continue
            changed = changed_folders(run_dir, folders)
        except ValueError:  # a damaged config or record: the run itself names it
            continue
        if changed:
            print(f"note: {run_dir} holds rows of other weights of {', '.join(changed)} (trained again): "
                  "searched again", file=sys.stderr)
            shutil.rmtree(run_dir)
            dropped.append(run_dir)
    return dropped


def run_strategy_sweep(spec: SweepSpec) -> StrategySweep:
    """Run (or resume; finished runs cost nothing) every (strategy, budget) of the spec and
    summarise them: the budget table, the scaling fit and the plot hold only the spec's runs
    (`spec_runs`), not other runs left in out_dir (a larger sweep's, the user's); runs of a model
    trained again since are searched again (`drop_runs_of_other_weights`)."""
    check_sweep_folder(spec)
    drop_runs_of_other_weights(spec)
    write_atomic(spec.out_dir / SWEEP_STAMP, json.dumps(_identity(spec), indent=1) + "\n")
    order = sorted(spec.strategies, key=lambda s: s != "best_of_n")  # Best-of-N's tokens first
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for strategy in order:
            budgets = token_budgets(spec, strategy)
            for budget in spec.budgets:
                overrides = run_overrides(spec, strategy, budget, budgets.get(budget))
                run_search_experiment(compose("search", overrides=overrides))
    runs = spec_runs(spec, sweep_summaries(spec.out_dir))
    series = tuple(scaling_by_strategy(runs, DEFAULT_THRESHOLD))
    plot = plot_runs(runs, spec.out_dir.resolve().name, spec.out_dir.parent / f"scaling_{spec.task}.png")
    return StrategySweep(runs, series, plot, spec.scorer, spec.checkpoint)


def spec_runs(spec: SweepSpec, runs: list[RunSummary]) -> tuple[RunSummary, ...]:
    """The runs of spec.strategies x spec.budgets among runs (out_dir's): those in the folders
    `run_overrides` names (`<strategy>_<N>`, each made at the spec's seed: `check_sweep_folder`);
    the folder, not the strategy column, says which run is the spec's (that column holds registry
    names such as beam_search, and a labelled series its settings)."""
    own = {f"{strategy}_{budget}" for strategy in spec.strategies for budget in spec.budgets}
    return tuple(r for r in runs if r.run in own)


def budget_markdown(sweep: StrategySweep) -> str:
    """The budget table as markdown: one row per budget, one accuracy [CI] (tokens) per strategy."""
    strategies = list(dict.fromkeys(r.strategy for r in sweep.runs))
    budgets = sorted({r.budget for r in sweep.runs})
    cell = {(r.strategy, r.budget): r for r in sweep.runs}
    lines = ["| N | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for b in budgets:
        cells = [
            f"{cell[s, b].accuracy.fmt()} ({cell[s, b].tokens_per_problem:.0f} tok)" if (s, b) in cell else "-"
            for s in strategies
        ]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    slopes = ", ".join(f"{k} {v:+.3f}" if v is not None else f"{k} n/a" for k, v in sweep.slopes.items())
    return "\n".join(lines) + f"\n\nFit accuracy = a + b log2 C per strategy; b (gain per doubling of compute): {slopes}."
