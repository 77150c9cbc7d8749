"""Post-hoc metrics from saved search records: one run, or every run of a sweep.

Reads only what `python -m experiments.search` wrote (`records.jsonl`, `config.yaml`), never a
model. For one run (`run_metrics`), all with 95% intervals over problems (`experiments.metrics.interval`):
  accuracy            the strategy's chosen answer is correct (a problem with no candidate: wrong);
  accuracy_by_<key>   the same per difficulty (arith: meta "num_ops");
  all_candidates      maj / wmaj / pass over ALL of a problem's candidates (any strategy);
  best_of_n           for Best-of-N runs only (candidates are independent samples in order): every
                      smaller N from the one large-N run by the reference's disjoint-group metric
                      (`experiments.metrics`): bon@N (argmax score, first on ties), maj@N,
                      wmaj@N (score-weighted vote), pass@N (oracle), for N = 1, 2, 4, ..., n;
                      a problem with fewer than N candidates (a policy may return fewer) counts
                      its whole list, none counts wrong, and best_of_n_short_problems says how
                      many problems had fewer than n;
  compute             mean per problem of every `Compute` field, the policy's parameter count and
                      C = policy parameters x tokens generated (the scaling law's x axis).
For a sweep folder (`sweep_summaries`): one row per run folder below it (any depth) holding
records.jsonl: workload, strategy, scorer, N, seed, tokens generated per problem, C, FLOPs,
accuracy + CI.

Workload: what a run measured, apart from the method: its config.yaml's `task` (name, split,
count, seed, config: path, shuffle, ...) and `policy` (checkpoint, sampling, backend). Greedy's
temperature 0 belongs to its strategy: a greedy run joins the sampled runs' workload that differs
from its own only in the temperature (`attach_greedy`). A sweep folder can hold several (a
rerun of `experiment=budget_sweep` with another `task.count` or `task=` writes beside the old
runs): rows, scaling series and plot lines are then kept apart per workload, never pooled as if
they were seeds, each labelled by its task and the keys that tell it apart (`arith
(task.count=2)`), and the commands print a one-line note on stderr (`workload_note`). A run with
fewer problems than its workload asks (its task.count, and at least the largest run of the
workload: still running, or stopped) is named in another note (`partial_note`): its point
covers only the problems it has done; a folder with no complete row yet (a job not started, or
whose first write met a full disk) is left out, named in a third (`empty_note`), rather than
failing every reader of the sweep.

Weights: a run folder's weights.json (`experiments.run_weights`) records which weights its rows
came from (a model folder's sha256 fingerprint, a served model's id); a policy trained again in
place keeps its `policy.path`, and runs before and after it were pooled as seeds of one workload.
The policy's record is part of the workload (`run_weights`: the first WEIGHTS_CHARS of a
fingerprint), the scorer's part of the scorer; where weights alone tell runs apart, the labels
show them (`arith (weights.policy.path=3f2a9c8d1e0b)`, `weights_labels`) and the workload note
names them as the reason. A run that records less (no weights.json: a folder saved before it
existed) pools with the runs equal to it but for weights when they recorded one set of weights,
and keeps its own (`weights.policy.path=unset`) when they recorded several
(`attach_unrecorded_weights`).

Scorer: the scorer's class (`SPRMScorer` for `scorers.sprm_scorer.SPRMScorer.from_pretrained`);
runs of one workload whose scorers share a class but differ in a setting (`scorer=sprm_forward,orm`
are both SPRMScorer heads, at different paths; `scorer.reduce=mean,min`) are told apart by it
(`SPRMScorer (scorer.path=outputs/heads/arith_orm/final)`) and never pooled. A scorer's `seed` is
the run's (`${seed}`), a draw like the strategy's, not a different scorer (`SCORER_DRAW_KEYS`).
Strategies likewise: runs of one strategy with other settings (`search.temperature=0.2,1.0`,
`search.beam_width=2,4`) are labelled by them (`particle_filtering (temperature=0.2)`) and kept
apart; the budget, seed and MCTS's token budget follow the run (`STRATEGY_RUN_KEYS`). So do
runs with another `+batching=` or `chunk` (`beam_search (batching=continuous)`, `RUN_SETTINGS`).

    python -m experiments.sweep_metrics outputs/search/RUN          # prints the run's metrics JSON
    python -m experiments.sweep_metrics outputs/sweeps/budget_sweep # table; writes sweep_metrics.csv/.json

Tests: `.venv/bin/pytest tests/test_scaling.py`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from experiments.broken_pipe import stdout_closed_quietly
from experiments.metrics import CandidateOutcome, Estimate, ProblemOutcome, interval, problem_accuracy
from experiments.record_log import load_rows
from experiments.run_weights import WEIGHTS_FILE, read_saved
from treesearch.config_checks import is_finite_number, is_int
from treesearch.config_diff import flatten, with_added_settings
from treesearch.registry import STRATEGIES

RECORDS = "records.jsonl"
RECORD_KEYS = ("problem_id", "strategy", "config", "candidates", "compute")  # what every row of a search's records holds (`load_rows` checks it)
CANDIDATE_KEYS = ("answer", "correct", "score")  # what the metrics read of a row's candidates (`check_rows`)
COMPUTE_KEYS = ("tokens_generated", "flops")  # ... and of its compute (besides every field the first row has)
CONFIG = "config.yaml"
SEARCH_CONFIG_NODES: tuple[str, ...] = ("task", "policy", "scorer")  # a config.yaml with these is a search run's
# the strategy config field that is its budget (the N of a sweep); "n" for the others
BUDGET_FIELDS: dict[str, str] = {"mcts": "iterations"}
# settings of a search run added after run folders existed, each with the value that behaves as the
# code before it: a folder saved without one ran with that value (`config_diff.with_added_settings`),
# so experiments.search resumes it under a config that sets it so (and the refusal of any other
# value says which to set), and the sweep files its rows under it (`with_added_strategy_settings`,
# `settled_keys`)
ADDED_SETTINGS: dict[str, Any] = {
    "task.config.grading": "lenient",  # aime, math500, ceval, gsm8k (2026-12-07): lenient grading before
    "search.lookahead": 0,  # DVTS (2026-12-05): no lookahead steps before
    "search.lookahead_temperature": None,  # beam search, DVTS (2026-12-05): the policy's temperature
    "search.weighting": "score",  # particle filtering (2026-12-05): softmax(score / T)
    "scorer.dtype": "float32",  # scorer=sprm_forward (2026-12-06): the model loaded in float32 before
    "policy.sampling.separator_match": "suffix",  # 2026-12-07: every token ending with the separator before
    "scorer.step_format.separator_match": "suffix",  # sprm_forward, vllm_sprm (2026-12-07): likewise
}
# name in metrics -> selector of experiments.metrics
CURVE_SELECTORS: dict[str, str] = {"bon": "best_score", "maj": "majority", "wmaj": "weighted_majority", "pass": "oracle"}
SWEEP_COLUMNS = ("run", "workload", "strategy", "scorer", "budget", "seed", "problems", "tokens_per_problem",
                 "compute_C", "flops_per_problem", "accuracy", "accuracy_low", "accuracy_high")
# the run config's nodes that say which problems were searched with which policy
WORKLOAD_NODES: tuple[str, ...] = ("task", "policy")
# the node of a workload or scorer key holding the weights.json records of its component (`run_weights`)
WEIGHTS_NODE = "weights"
WEIGHTS_CHARS = 12  # hex digits of a sha256 fingerprint kept in the key and its label
# scorer settings that are a run's draw, not which scorer it is (RandomScorer's seed is ${seed})
SCORER_DRAW_KEYS: tuple[str, ...] = ("seed",)
# strategy settings that follow the run, not the series it belongs to: the budget (n, MCTS's
# iterations), the chunk's seed and MCTS's token budget (the demo gives it Best-of-N's tokens at N)
STRATEGY_RUN_KEYS: tuple[str, ...] = ("n", "iterations", "seed", "token_budget")
# top-level run settings that change what a strategy computes, with the value of a run config
# that lacks them: `+batching=continuous` draws each problem's samples alone, `chunk` fixes the
# chunks' seeds; runs that differ in them are their own series (`beam_search (batching=continuous)`)
RUN_SETTINGS: dict[str, Any] = {"batching": "lockstep", "chunk": None}
LABEL_KEYS = 3  # most differing keys a workload (or scorer) label names
LABEL_VALUE_CHARS = 40  # a longer value is shown by its end ("…" + tail)


class RunFolderError(ValueError):
    """A run folder without usable records or config."""


class EmptyRunError(RunFolderError):
    """A run folder whose records.jsonl holds no complete row yet (a job that has not finished
    its first chunk, or whose first append met a full disk)."""


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


def check_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """RunFolderError naming the file and problem when a row lacks what the metrics read, or holds
    it as another type (a hand-edited or foreign file gave a bare KeyError or TypeError with no
    file named, and a `correct` of "false" counted as right): a text problem_id, an object meta,
    finite numbers in compute, candidates with an answer (text or null), a true / false correct
    and a finite number for score; the row's own correct true, false or null."""
    fields = set(COMPUTE_KEYS) | (set(rows[0]["compute"]) if rows and isinstance(rows[0]["compute"], dict) else set())
    for row in rows:
        if not isinstance(row["problem_id"], str):
            raise RunFolderError(f"{path}: a row has problem_id={row['problem_id']!r}, not a text id")
        where = f"{path}: the row of problem {row['problem_id']!r}"
        compute = row["compute"]
        if not isinstance(compute, dict):
            raise RunFolderError(f"{where} has compute={compute!r}, not an object")
        missing = sorted(k for k in fields if not is_finite_number(compute.get(k)))
        if missing:
            raise RunFolderError(f"{where} lacks a finite number for compute.{missing[0]}")
        if not isinstance(row.get("meta", {}), dict) or row.get("correct") not in (True, False, None):
            field = "meta" if not isinstance(row.get("meta", {}), dict) else "correct"
            raise RunFolderError(f"{where} has {field}={row[field]!r}, not {'an object' if field == 'meta' else 'true or false'}")
        params = row.get("policy_parameters", 0)
        if not is_finite_number(params) or params < 0:
            raise RunFolderError(f"{where} has policy_parameters={params!r}, not a number >= 0")
        budget = _row_budget(row)
        if budget is not None:
            raise RunFolderError(f"{where} has {budget}, not a strategy's name and a config with an integer budget >= 1")
        if not isinstance(row["candidates"], list):
            raise RunFolderError(f"{where} has candidates={row['candidates']!r}, not a list")
        for i, cand in enumerate(row["candidates"]):
            lacking = [k for k in CANDIDATE_KEYS if not isinstance(cand, dict) or k not in cand]
            if lacking:
                raise RunFolderError(f"{where}: candidates[{i}] lacks {lacking[0]!r}")
            wrong = _wrong_candidate_field(cand)
            if wrong is not None:
                raise RunFolderError(f"{where}: candidates[{i}] has {wrong}={cand[wrong]!r}, not "
                                     + {"answer": "text or null", "correct": "true or false",
                                        "score": "a finite number"}[wrong])


def _row_budget(row: dict[str, Any]) -> str | None:
    """What is wrong with a row's strategy and its config's budget field (`budget_of`), else None."""
    strategy, config = row["strategy"], row["config"]
    if not isinstance(strategy, str):
        return f"strategy={strategy!r}"
    if not isinstance(config, dict):
        return f"config={config!r:.80}"
    field = BUDGET_FIELDS.get(strategy, "n")
    if not is_int(config.get(field)) or config[field] < 1:
        return f"config.{field}={config.get(field)!r}"
    return None


def _wrong_candidate_field(cand: dict[str, Any]) -> str | None:
    """The first of a candidate's answer, correct, score whose type the metrics cannot read, else None."""
    if cand["answer"] is not None and not isinstance(cand["answer"], str):
        return "answer"
    if not isinstance(cand["correct"], bool):
        return "correct"
    if not is_finite_number(cand["score"]):
        return "score"
    return None


def problem_outcome(row: dict[str, Any]) -> ProblemOutcome:
    cands = tuple(CandidateOutcome(c["answer"], bool(c["correct"]), float(c["score"])) for c in row["candidates"])
    return ProblemOutcome(row["problem_id"], cands)


def chosen_correct(row: dict[str, Any]) -> float:
    """1.0 when the strategy's chosen candidate is correct (no candidate counts as wrong)."""
    return 1.0 if row.get("correct") else 0.0


def all_candidates_accuracy(outcomes: Sequence[ProblemOutcome], selector: str, seed: int = 0) -> Estimate:
    """The selector over each problem's whole candidate list (0 for a problem with none)."""
    values = [problem_accuracy(o, len(o.candidates), selector) if o.candidates else 0.0 for o in outcomes]
    return interval(values, seed=seed)


def budget_ladder(count: int) -> list[int]:
    """1, 2, 4, ... below count, then count itself: the Ns computable from count samples."""
    ladder, n = [], 1
    while n < count:
        ladder.append(n)
        n *= 2
    return ladder + [count]


def curve_value(outcome: ProblemOutcome, n: int, selector: str) -> float:
    """A problem's value at N = n: the disjoint groups of n; a problem with fewer candidates than n
    (a policy may return fewer) is its whole list, the pick the run itself made; none is 0."""
    count = len(outcome.candidates)
    return problem_accuracy(outcome, min(n, count), selector) if count else 0.0


def best_of_n_curve(outcomes: Sequence[ProblemOutcome], n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"bon@N": est, "maj@N": ..., "wmaj@N": ..., "pass@N": ...} for every N of the run's ladder
    (`budget_ladder(n)`, n its configured N), by disjoint groups of N in generation order (the
    reference's metric; `curve_value` for a problem with fewer candidates)."""
    out: dict[str, dict[str, float]] = {}
    for size in budget_ladder(n):
        for name, selector in CURVE_SELECTORS.items():
            values = [curve_value(o, size, selector) for o in outcomes]
            out[f"{name}@{size}"] = estimate_dict(interval(values, seed=seed))
    return out


def accuracy_by(rows: Sequence[dict[str, Any]], key: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Chosen-answer accuracy per value of meta[key] (rows without it are left out)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if key in row.get("meta", {}):
            groups[str(row["meta"][key])].append(chosen_correct(row))
    return {
        value: {**estimate_dict(interval(groups[value], seed=seed)), "problems": len(groups[value])}
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


def with_added_strategy_settings(strategy: str, config: dict[str, Any]) -> dict[str, Any]:
    """A run's strategy config (its rows') with the search settings of ADDED_SETTINGS its strategy
    has filled in where the rows lack them: a run saved before `search.lookahead_temperature`
    existed and a newer one of the same settings were two series ("unset" against its value)."""
    spec = STRATEGIES.get(strategy)
    if spec is None:
        return config
    fields = {f.name for f in dataclass_fields(spec.config)}
    added = {key.removeprefix("search."): value for key, value in ADDED_SETTINGS.items() if key.startswith("search.")}
    return {**{key: value for key, value in added.items() if key in fields and key not in config}, **config}


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


def run_metrics(
    rows: Sequence[dict[str, Any]], difficulty_key: str = "num_ops", seed: int = 0,
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric of one run's rows (see the module docstring); run_config (its config.yaml)
    files a compute-matched MCTS run under its N, as the sweep table does (`run_budget`)."""
    rows = unique_rows(rows)
    if not rows:
        raise ValueError("no records: nothing to compute metrics from")
    strategy = rows[0]["strategy"]
    outcomes = [problem_outcome(r) for r in rows]
    metrics: dict[str, Any] = {
        "problems": len(rows),
        "strategy": strategy,
        "budget": run_budget(strategy, rows[0]["config"], run_config or {}),
        "accuracy": estimate_dict(interval([chosen_correct(r) for r in rows], seed=seed)),
        f"accuracy_by_{difficulty_key}": accuracy_by(rows, difficulty_key, seed),
        "all_candidates": {
            f"{name}@all": estimate_dict(all_candidates_accuracy(outcomes, selector, seed))
            for name, selector in CURVE_SELECTORS.items() if name != "bon"
        },
        "compute": mean_compute(rows),
    }
    if strategy == "best_of_n":
        n = budget_of(strategy, rows[0]["config"])
        metrics["best_of_n"] = best_of_n_curve(outcomes, n, seed)
        short = sum(len(o.candidates) < n for o in outcomes)
        if short:
            metrics["best_of_n_short_problems"] = short
    return metrics


# -- a sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One run of a sweep.

    run: the run folder relative to the sweep folder; workload: label of the problems and policy
    it measured (the task name; in a sweep of several workloads also the keys that tell them
    apart, `workload_labels`); strategy: registry name, or "greedy" for Best-of-1 at temperature
    0; scorer: the scorer's class name (in a sweep, with the settings that tell apart scorers of
    one class, `scorer_labels`); budget: N (MCTS: iterations); seed: the run's top-level
    seed; problems: problems with records; tokens_per_problem: mean tokens generated; compute_C:
    policy parameters x tokens_per_problem; flops_per_problem: mean FLOPs estimate; accuracy:
    chosen-answer accuracy with its CI; per_problem: (problem id, correct) pairs, for pooling
    seeds of one budget; workload_key: canonical JSON of `run_workload` and the policy's
    `run_weights` (equal for runs of one workload; not a table column); scorer_key: canonical
    JSON of `run_scorer` and the scorer's `run_weights` (likewise).
    """

    run: str
    workload: str
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
    workload_key: str = "{}"
    scorer_key: str = "{}"
    strategy_key: str = "{}"

    def table_row(self) -> dict[str, Any]:
        hidden = ("accuracy", "per_problem", "workload_key", "scorer_key", "strategy_key")
        row = {k: v for k, v in asdict(self).items() if k not in hidden}
        row.update(accuracy=self.accuracy.mean, accuracy_low=self.accuracy.low, accuracy_high=self.accuracy.high)
        return row


def strategy_label(strategy: str, strategy_config: dict[str, Any], temperature: float | None) -> str:
    """The registry name, except Best-of-1 at temperature 0, which is greedy decoding."""
    if strategy == "best_of_n" and strategy_config.get("n") == 1 and temperature == 0:
        return "greedy"
    return strategy


def run_workload(config: dict[str, Any]) -> dict[str, Any]:
    """The run config's WORKLOAD_NODES (absent ones left out): which problems, which policy."""
    return {node: config[node] for node in WORKLOAD_NODES if node in config}


def run_strategy(label: str, strategy_config: dict[str, Any], run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"strategy": its label, then its settings but STRATEGY_RUN_KEYS, then the run config's
    RUN_SETTINGS}: which series a run is. Without lookahead (lookahead=0) the lookahead's
    temperature samples nothing, so it is left out: an old beam / DVTS folder (null, ADDED_SETTINGS)
    and a newer run of the default 0.0 are one series."""
    settings = {k: (run_config or {}).get(k, default) for k, default in RUN_SETTINGS.items()}
    unused = {"lookahead_temperature"} if strategy_config.get("lookahead") == 0 else set()
    return {"strategy": label, **{k: v for k, v in strategy_config.items() if k not in STRATEGY_RUN_KEYS and k not in unused},
            **settings}


def run_scorer(config: dict[str, Any]) -> dict[str, Any]:
    """{"scorer": the run config's scorer node without its draw keys (SCORER_DRAW_KEYS)}."""
    scorer = config.get("scorer", {})
    if not isinstance(scorer, dict):
        return {"scorer": scorer}
    return {"scorer": {k: v for k, v in scorer.items() if k not in SCORER_DRAW_KEYS}}


def run_weights(run_dir: Path) -> dict[str, dict[str, str]]:
    """{"policy": {"policy.path": fingerprint, "policy.served_model": model id}, "scorer": {...}}:
    what the run folder's weights.json records of each component (a model folder's fingerprint cut
    to WEIGHTS_CHARS, a served model's id), a component it records nothing of left out; {} without
    the file (a folder saved before it existed). RunFolderError naming a damaged one."""
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        return {}
    try:
        saved = read_saved(path)
    except ValueError as err:
        raise RunFolderError(str(err)) from None
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key, record in sorted(saved.items()):
        fingerprint, model = record.get("fingerprint"), record.get("model")
        if isinstance(fingerprint, str):
            out[key.split(".", 1)[0]][key] = fingerprint[:WEIGHTS_CHARS]
        elif isinstance(model, str):
            out[key.split(".", 1)[0]][key] = model
    return dict(out)


def with_weights(key: dict[str, Any], weights: dict[str, str]) -> dict[str, Any]:
    """A workload or scorer key with its component's weights (`run_weights`) in WEIGHTS_NODE."""
    return {**key, WEIGHTS_NODE: weights} if weights else key


def without_weights(key: str) -> str:
    """A workload or scorer key (canonical JSON) with its weights left out."""
    nodes = json.loads(key)
    nodes.pop(WEIGHTS_NODE, None)
    return json.dumps(nodes, sort_keys=True)


def attach_unrecorded_weights(keys: Sequence[str]) -> dict[str, str]:
    """Each workload or scorer key -> itself, or, when it records less of its weights than others
    equal to it but for their weights (no weights.json: a folder saved before it existed; a
    served model's id not kept yet) and exactly one such key agrees with all it records, -> that
    key: it pools with those runs, as before weights were recorded. With several it keeps its own
    (labelled `weights...=unset`): which of them it ran is not known."""
    weights = {key: json.loads(key).get(WEIGHTS_NODE, {}) for key in set(keys)}
    out = {}
    for key, own in weights.items():
        match = [other for other, more in weights.items()
                 if len(more) > len(own) and own.items() <= more.items() and without_weights(other) == without_weights(key)]
        out[key] = match[0] if len(match) == 1 else key
    return out


def scorer_name(scorer_config: dict[str, Any]) -> str:
    """The class its `_target_` names: the last dotted part that starts with a capital
    (`SPRMScorer` for `scorers.sprm_scorer.SPRMScorer.from_pretrained`), "?" when not recorded."""
    scorer = scorer_config.get("scorer", {})
    parts = str(scorer.get("_target_", "?") if isinstance(scorer, dict) else "?").split(".")
    classes = [part for part in parts if part[:1].isupper()]
    return classes[-1] if classes else parts[-1]


def without_temperature(workload_key: str) -> str:
    """The workload key with the policy's sampling temperature left out."""
    workload = json.loads(workload_key)
    sampling = workload.get("policy", {}).get("sampling")
    if isinstance(sampling, dict):
        sampling.pop("temperature", None)
    return json.dumps(workload, sort_keys=True)


def attach_greedy(summaries: Sequence[RunSummary]) -> list[RunSummary]:
    """Greedy runs (temperature 0 is part of their strategy) take the workload key of the sampled
    runs whose workload differs from theirs only in the temperature, when exactly one such key
    exists; otherwise they keep their own (its label then shows the temperature)."""
    by_base: dict[str, set[str]] = defaultdict(set)
    for s in summaries:
        if s.strategy != "greedy":
            by_base[without_temperature(s.workload_key)].add(s.workload_key)
    out = []
    for s in summaries:
        match = by_base.get(without_temperature(s.workload_key), set())
        out.append(replace(s, workload_key=next(iter(match))) if s.strategy == "greedy" and len(match) == 1 else s)
    return out


def task_name(workload: dict[str, Any]) -> str:
    """The task module's last part ("arith" for experiments.tasks.arith), "?" when not recorded."""
    return str(workload.get("task", {}).get("module", "?")).rsplit(".", 1)[-1]


def value_text(value: Any) -> str:
    """A config value for a label: strings as they are, else JSON; long ones by their end."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= LABEL_VALUE_CHARS else "…" + text[-(LABEL_VALUE_CHARS - 1):]


def differing_keys(workloads: Sequence[dict[str, Any]]) -> list[str]:
    """Flattened keys (task.count, policy.path, ...) whose value is not the same in all the
    workloads (a key missing from some differs), task keys first."""
    flat = [flatten(w) for w in workloads]
    keys = set().union(*flat) if flat else set()
    differ = [k for k in keys if len({json.dumps(f[k], sort_keys=True) if k in f else None for f in flat}) > 1]
    return sorted(differ, key=lambda k: (not k.startswith("task."), k))


def config_label(config: dict[str, Any], keys: Sequence[str], name: str, limit: int = LABEL_KEYS) -> str:
    """name, then `key=value` of up to limit of keys ("+k more" for the rest)."""
    flat = flatten(config)
    shown = [f"{k}={value_text(flat[k]) if k in flat else 'unset'}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"+{len(keys) - limit} more")
    return name + (f" ({', '.join(shown)})" if shown else "")


def distinct_labels(config_keys: Sequence[str], name_of: Callable[[dict[str, Any]], str]) -> dict[str, str]:
    """{config_key: label} for the distinct configs (canonical JSON): name_of(config), plus the
    keys that differ between the configs of that name: the first LABEL_KEYS, or every one for
    configs whose labels would clash (the key telling two apart hid behind "+1 more"). Labels are
    unique (a clash left by shortened values gets " #2", " #3", ...)."""
    distinct = sorted(set(config_keys))
    configs = {key: json.loads(key) for key in distinct}
    by_name: dict[str, list[str]] = defaultdict(list)
    for key in distinct:
        by_name[name_of(configs[key])].append(key)
    labels: dict[str, str] = {}
    for name, keys in by_name.items():
        differ = differing_keys([configs[k] for k in keys])
        short = {k: config_label(configs[k], differ, name) for k in keys}
        counts = Counter(short.values())
        labels.update({k: label if counts[label] == 1 else config_label(configs[k], differ, name, len(differ))
                       for k, label in short.items()})
    seen: dict[str, int] = defaultdict(int)
    for key in distinct:
        seen[labels[key]] += 1
        if seen[labels[key]] > 1:
            labels[key] = f"{labels[key]} #{seen[labels[key]]}"
    return labels


def split_by_weights(keys: Sequence[str]) -> set[str]:
    """The keys (canonical JSON) equal to another of keys but for their weights (`run_weights`)."""
    bases: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        bases[without_weights(key)].add(key)
    return {key for group in bases.values() if len(group) > 1 for key in group}


def weights_labels(keys: Sequence[str], name_of: Callable[[dict[str, Any]], str]) -> dict[str, str]:
    """`distinct_labels`, the weights shown only when they tell apart configs that are otherwise
    equal (`arith (weights.policy.path=3f2a9c8d1e0b)`; then every label shows them, `unset` for a
    run that recorded none): two policies at other paths differ in their weights anyway, and
    their path says so."""
    split = bool(split_by_weights(keys))
    shown = {key: key if split else without_weights(key) for key in sorted(set(keys))}
    labels = distinct_labels(list(shown.values()), name_of)
    return {key: labels[shown[key]] for key in shown}


def workload_labels(workload_keys: Sequence[str]) -> dict[str, str]:
    """{workload_key: label} for the distinct workloads (canonical JSON of `run_workload` and
    `run_weights`): the task name, plus the keys that differ between the workloads of that task
    (`distinct_labels`; the weights where they alone tell two apart, `weights_labels`)."""
    return weights_labels(workload_keys, task_name)


def scorer_labels(summaries: Sequence[RunSummary]) -> list[RunSummary]:
    """Each run's scorer labelled within its workload: the class name, plus the settings that
    differ between that workload's scorers of the class (`distinct_labels`; the weights where
    they alone tell two apart, `weights_labels`)."""
    by_workload: dict[str, list[str]] = defaultdict(list)
    for s in summaries:
        by_workload[s.workload_key].append(s.scorer_key)
    labels = {workload: weights_labels(keys, scorer_name) for workload, keys in by_workload.items()}
    return [replace(s, scorer=labels[s.workload_key][s.scorer_key]) for s in summaries]


def strategy_labels(summaries: Sequence[RunSummary]) -> list[RunSummary]:
    """Each run's strategy labelled by its name, plus the settings that differ between the runs
    of that name (`particle_filtering (temperature=0.2)`; budgets and seeds do not count:
    `run_strategy`), so runs of other settings are their own series, never pooled."""
    labels = distinct_labels([s.strategy_key for s in summaries], lambda config: str(config["strategy"]))
    return [replace(s, strategy=labels[s.strategy_key]) for s in summaries]


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run folder's config.yaml as plain data, interpolations resolved; RunFolderError naming
    the file when it is missing, not YAML, not UTF-8, not a mapping or has an interpolation that
    does not resolve (a hand-edited file)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: no {CONFIG} beside {RECORDS}")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml, OmegaConf and decoding errors alike: the file is damaged
        message = " ".join(str(err).split())
        raise RunFolderError(f"{path} is not a readable run config ({type(err).__name__}: {message:.300})") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} is not a run config: it holds a {type(config).__name__}, not a mapping")
    if not config:  # an empty file: its run became workload "?" and relabelled every other run
        raise RunFolderError(f"{path} is empty, not a run config")
    return config  # type: ignore[return-value]


def summarize_run(run_dir: Path, root: Path, seed: int = 0) -> RunSummary:
    """The sweep row of one run folder."""
    if not (run_dir / RECORDS).is_file():
        raise RunFolderError(f"{run_dir / RECORDS} is a folder, not a search's record file")
    rows = load_rows(run_dir / RECORDS, repair=False, keys=RECORD_KEYS)  # a search may still be appending
    if not rows:
        raise EmptyRunError(f"{run_dir}: {RECORDS} has no complete rows")
    check_rows(rows, run_dir / RECORDS)
    rows = unique_rows(rows)
    config = read_run_config(run_dir)
    missing = [node for node in SEARCH_CONFIG_NODES if not isinstance(config.get(node), dict)]
    if missing:  # a foreign config: its run labelled "?" and relabelled every other run
        raise RunFolderError(f"{run_dir / CONFIG} is not a search run's config: it has no {missing[0]} settings")
    if not is_int(config.get("seed", 0)):  # a TypeError traceback, or an error naming no file
        raise RunFolderError(f"{run_dir / CONFIG} has seed={config.get('seed')!r}, not an integer")
    strategy = rows[0]["strategy"]
    strategy_config = with_added_strategy_settings(strategy, rows[0]["config"])
    temperature = config.get("policy", {}).get("sampling", {}).get("temperature")
    compute = mean_compute(rows)
    correct = [chosen_correct(r) for r in rows]
    label = strategy_label(strategy, strategy_config, temperature)
    weights = run_weights(run_dir)
    workload = with_weights(run_workload(config), weights.get("policy", {}))
    scorer = with_weights(run_scorer(config), weights.get("scorer", {}))
    return RunSummary(
        run=str(run_dir.relative_to(root)) if run_dir != root else ".",
        workload=task_name(workload),
        strategy=label,
        scorer=scorer_name(run_scorer(config)),
        budget=run_budget(strategy, strategy_config, config),
        seed=int(config.get("seed", 0)),
        problems=len(rows),
        tokens_per_problem=compute["tokens_generated"],
        compute_C=compute["C"],
        flops_per_problem=compute["flops"],
        accuracy=interval(correct, seed=seed),
        per_problem=tuple((r["problem_id"], c) for r, c in zip(rows, correct)),
        workload_key=json.dumps(workload, sort_keys=True),
        scorer_key=json.dumps(scorer, sort_keys=True),
        strategy_key=json.dumps(run_strategy(label, strategy_config, config), sort_keys=True),
    )


def run_folders(sweep_dir: Path) -> list[Path]:
    """Every folder at or below sweep_dir that holds records.jsonl, sorted."""
    return sorted(p.parent for p in Path(sweep_dir).rglob(RECORDS))


def sweep_summaries(sweep_dir: str | Path) -> list[RunSummary]:
    """One RunSummary per run folder, each labelled with its workload (`workload_labels`),
    scorer (`scorer_labels`) and strategy settings (`strategy_labels`), ordered by workload,
    strategy, scorer, budget, seed."""
    root = Path(sweep_dir)
    if not root.exists():
        raise RunFolderError(f"{root}: no such folder")
    if not root.is_dir():
        raise RunFolderError(f"{root}: not a folder")
    folders = run_folders(root)
    if not folders:
        raise RunFolderError(f"{root}: no {RECORDS} found at or below it")
    found = []
    for folder in folders:
        try:
            found.append(summarize_run(folder, root))
        except EmptyRunError:  # left out and named by `empty_note`: one such job hid every other result
            if len(folders) == 1:
                raise
    if not found:
        raise RunFolderError(f"{root}: no {RECORDS} at or below it has a complete row yet")
    workloads, scorers = settled_keys([s.workload_key for s in found]), settled_keys([s.scorer_key for s in found])
    found = [replace(s, workload_key=workloads[s.workload_key], scorer_key=scorers[s.scorer_key]) for s in found]
    workloads = attach_unrecorded_weights([s.workload_key for s in found])
    scorers = attach_unrecorded_weights([s.scorer_key for s in found])
    found = [replace(s, workload_key=workloads[s.workload_key], scorer_key=scorers[s.scorer_key]) for s in found]
    summaries = strategy_labels(scorer_labels(attach_greedy(found)))
    labels = workload_labels([s.workload_key for s in summaries])
    summaries = [replace(s, workload=labels[s.workload_key]) for s in summaries]
    return sorted(summaries, key=lambda s: (s.workload, s.strategy, s.scorer, s.budget, s.seed, s.run))


def settled_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each run's workload or scorer key (JSON of its config nodes) -> the same with the
    ADDED_SETTINGS another run's node of the same component holds and it lacks filled in with the
    value that behaves as the code before the setting: a run saved before a setting existed and a
    newer one that ran alike are one series, not two (`<absent>` against `suffix`)."""
    peers = [json.loads(key) for key in sorted(set(keys))]
    settled = {}
    for key in set(keys):
        nodes = json.loads(key)
        for peer in peers:
            nodes = with_added_settings(nodes, peer, ADDED_SETTINGS)
        settled[key] = json.dumps(nodes, sort_keys=True)
    return settled


def workload_note(summaries: Sequence[RunSummary], sweep_dir: str | Path) -> str | None:
    """One line for stderr when the runs measured more than one workload (None for one): how
    many, why (their task / policy configs, or their policy's weights: weights.json), and each
    label with its number of runs."""
    counts: dict[str, int] = defaultdict(int)
    for s in summaries:
        counts[s.workload] += 1
    if len(counts) < 2:
        return None
    groups = "; ".join(f"{label}: {n} run{'s' if n > 1 else ''}" for label, n in sorted(counts.items()))
    configs = {s.workload_key for s in summaries}
    weights = bool(split_by_weights(list(configs)))
    configs_differ = len({without_weights(k) for k in configs}) > 1
    why = "task / policy configs"
    if weights:
        why = ("task / policy configs, and " if configs_differ else "") + (
            f"the policy weights recorded in {WEIGHTS_FILE}: a model trained again in place?")
    return (f"note: {sweep_dir} holds runs of {len(counts)} workloads ({why}); "
            f"each is its own group, never pooled: {groups}")


def partial_note(summaries: Sequence[RunSummary]) -> str | None:
    """One line for stderr naming the runs that hold fewer problems than their workload asks
    (its task.count when the config sets one, and at least the largest run of the workload; None
    when there are none): a run still being written, or stopped, measures only the problems it
    has done, so its point is not comparable with its neighbours' yet."""
    most: dict[str, int] = defaultdict(int)
    for s in summaries:
        most[s.workload] = max(most[s.workload], s.problems, asked_count(s.workload_key))
    short = [f"{s.run} ({s.problems} of {most[s.workload]})" for s in summaries if s.problems < most[s.workload]]
    if not short:
        return None
    runs = f"{len(short)} runs hold" if len(short) > 1 else "1 run holds"
    return (f"note: {runs} fewer problems than their workload asks "
            f"(still running, or stopped? rerun its command to finish it): {', '.join(short)}")


def asked_count(workload_key: str) -> int:
    """The task.count a run's config asks for; 0 when it sets none (null: a benchmark's whole split)."""
    count = json.loads(workload_key).get("task", {}).get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


def unstarted_folders(sweep_dir: Path) -> list[Path]:
    """Folders at or below sweep_dir that hold a search's config.yaml (its task, policy and scorer)
    but no records.jsonl: a job stopped before its first chunk finished (outside .hydra/)."""
    folders = []
    for path in Path(sweep_dir).rglob(CONFIG):
        folder = path.parent
        if folder.name == ".hydra" or (folder / RECORDS).exists():
            continue
        try:
            config = read_run_config(folder)
        except RunFolderError:
            continue  # not a run config: not ours to name
        if all(node in config for node in SEARCH_CONFIG_NODES):
            folders.append(folder)
    return sorted(folders)


def empty_note(summaries: Sequence[RunSummary], sweep_dir: str | Path) -> str | None:
    """One line for stderr naming the run folders left out for having no complete row yet (an
    empty records.jsonl, or none beside a search's config.yaml)."""
    root = Path(sweep_dir)
    counted = {s.run for s in summaries}
    empty = [name for folder in sorted(run_folders(root) + unstarted_folders(root))
             if (name := str(folder.relative_to(root)) if folder != root else ".") not in counted]
    if not empty:
        return None
    return (f"note: left out {len(empty)} run folder{'s' if len(empty) > 1 else ''} with no complete row yet "
            f"(not started, or its first write failed): {', '.join(empty)}")


def sweep_notes(summaries: Sequence[RunSummary], sweep_dir: str | Path) -> list[str]:
    """The stderr notes on a sweep's runs: several workloads (`workload_note`), unfinished runs
    (`partial_note`), folders left out with no row yet (`empty_note`)."""
    notes = (workload_note(summaries, sweep_dir), partial_note(summaries), empty_note(summaries, sweep_dir))
    return [note for note in notes if note]


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
    width = max([len("workload")] + [len(s.workload) for s in summaries])
    scorer_width = max([20] + [len(s.scorer) for s in summaries])
    strategy_width = max([12] + [len(s.strategy) for s in summaries])  # particle_filtering is 18
    lines = [f"{'workload':<{width}} {'strategy':<{strategy_width}} {'scorer':<{scorer_width}} {'N':>4} {'seed':>4} "
             f"{'probs':>5} {'tok/prob':>9} {'C':>10} {'accuracy [95% CI]':>24}"]
    for s in summaries:
        lines.append(f"{s.workload:<{width}} {s.strategy:<{strategy_width}} {s.scorer:<{scorer_width}} {s.budget:>4} {s.seed:>4} "
                     f"{s.problems:>5} {s.tokens_per_problem:>9.1f} {s.compute_C:>10.3g} {s.accuracy.fmt():>24}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep_metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a run folder (holds records.jsonl) or a sweep folder")
    args = ap.parse_args(argv)
    try:
        if (args.path / RECORDS).is_file():
            config = read_run_config(args.path) if (args.path / CONFIG).is_file() else {}
            rows = load_rows(args.path / RECORDS, repair=False, keys=RECORD_KEYS)
            if not rows:
                raise RunFolderError(f"{args.path / RECORDS} has no complete rows: nothing to compute metrics from")
            check_rows(rows, args.path / RECORDS)
            print(json.dumps(run_metrics(rows, run_config=config), indent=2))
            return 0
        summaries = sweep_summaries(args.path)
    except (RunFolderError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in sweep_notes(summaries, args.path):
        print(note, file=sys.stderr)
    print(format_table(summaries))  # before the files: a sweep folder one may read but not write still gets its table
    try:
        csv_path, _ = write_sweep_table(summaries, args.path)
    except OSError as err:
        print(f"error: cannot write the sweep's tables into {args.path} ({err.strerror or err})", file=sys.stderr)
        return 2
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
