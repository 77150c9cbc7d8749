"""Train an SPRM head on a frozen policy's cached rollouts and measure it on held-out rollouts:
the aha metrics, within-problem and step-level AUC, the SPR loss's self-chosen labels against the
true ones, and Best-of-N by the head against confidence, majority and the oracle (issue 3 items
6, 7 and 10).

Usage:
    python -m experiments.train_head --train outputs/heads/countdown_train.pt \\
        --test outputs/heads/countdown_test.pt --labels spr --out outputs/heads/countdown_spr
    python -m experiments.train_head ... --labels spr --warmup-steps 100 --layer -1 --lr 3e-4 --steps 800
    python -m experiments.plot aha outputs/heads/countdown_spr/metrics.jsonl     # the aha curves

Label modes and training: `scorers.head_training`. Caches: `experiments.rollout_cache` (the test
cache's n rollouts per problem set the largest Best-of-N). --epochs E trains E passes over the
train rollouts the head trains on (steps = E * ceil(rollouts / --batch-rollouts), each pass's
last batch the remainder; the SPR modes leave out wrong rollouts cut at the token limit); a
--batch-rollouts above those rollouts gives a one-line note and full-batch steps. Every setting is checked
before a cache is read; a bad setting or input (a missing or damaged cache, caches of different
policies, a layer the caches lack) prints "error: <message>" on stderr and exits with code 2.

Writes into --out:
  metrics.jsonl  one row per logged step (`step`; training rows: loss, grad_norm, spr/kept_fraction,
                 spr/agreement, fc/correct_prob, fc/false_prob, fc/diff_prob of the batch; evaluation
                 rows, at step 0, every --eval-every steps and at the end: heldout_fc/* (correct_prob,
                 false_prob, diff_prob, within_auc), heldout/step_auc, heldout/spr_label_precision,
                 heldout/sprm_bon@n, train_fc/*): the rows `experiments.plot_aha` draws;
  metrics.json   the final numbers, flat keys `<task>.<metric>` as the demo's (`sprm_bon@N`,
                 `sprm_wmaj@N`, `sprm_min_bon@N` (path score = the lowest step score: Best-of-N
                 with aggregation=min, a named deviation), `conf_bon@N`, `confmin_bon@N`, `maj@N`, `pass@N` (oracle),
                 `true_prm_bon@N` (a perfect step verifier, with true step labels),
                 `pass@1`, `sprm_within_auc`, `sprm_step_auc`, `sprm_diff_prob`, `conf_within_auc`,
                 `<task>.ci95` {metric: [low, high]}), `aha.diff_prob_first` / `aha.diff_prob_last`
                 (held-out), the config and the wall time;
  final/         the policy with the trained head (`ReflectiveModel.save_pretrained`), loadable by
                 `TransformersPolicy.from_pretrained(out/'final', ..., with_step_head=True)` and
                 `SPRMScorer.from_pretrained` (skipped with --no-save).

Metric definitions. Path score: geometric mean of a rollout's step scores (the reference's).
Within-problem AUC: `experiments.aha_metrics.within_problem_auc` (what Best-of-N needs). Step
AUC: pooled over all held-out scored positions against their true step labels. SPR label
precision: among the positions the SPR filter would keep under the head (logit sign agrees with
the outcome), the share whose outcome label equals the true step label; `outcome_label_agreement`
is that share over all positions (what plain outcome BCE trains on). Best-of-N: the reference's
disjoint groups of N in generation order (`experiments.metrics`); `conf` is
`ConfidenceScorer("mean")`, `confmin` its "min" reduction (DESIGN.md section 4's best arith
selector was a min-log-prob one); `sprm_wmaj` is majority weighted by the head's path scores.

Ctrl-C (or SIGTERM) in the command: one line and exit 130 (143), no traceback. While it imports
and checks its arguments: "interrupted while starting: nothing was written"; then
`interrupt_reported` says what --out holds at that moment (`interrupt_hint`). Nothing is written
to --out until the head is trained and evaluated, so an earlier run's files there are kept as they
were; then its metrics.json is removed first and written last, so a --out without metrics.json
holds no finished run (the line names which of metrics.jsonl and final/ are this run's).

Tests: `.venv/bin/pytest tests/test_train_head.py tests/test_cli_interrupts.py`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from experiments.startup_interrupt import quiet_start

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import torch
from torch import nn

from experiments.cli_args import check_folder_target, positive_int, seed_int
from experiments.model_folder_target import check_not_model_folder
from experiments.cli_errors import interrupt_reported, run_command
from experiments.aha_metrics import fc_metrics, prefixed
from experiments.metrics import CandidateOutcome, Estimate, ProblemOutcome, accuracy, problem_accuracy
from experiments.record_log import encode_rows
from experiments.result_json import write_atomic
from experiments.rollout_cache import (
    FileId, RolloutCache, check_policy, confidence_path_scores, file_id, labels_version, load_cache, read_from,
    same_policy,
)
from scorers.head_training import (
    HeadTrainConfig, LABEL_MODES, position_logits, position_probs, rollout_min_scores, rollout_path_scores,
    save_reflective_head, train_head, trained_rollout_count,
)
from scorers.spr_loss import agreement_mask

# Best-of-N rows of the final table: name -> (selector of experiments.metrics, score source)
BON_ROWS: tuple[tuple[str, str, str], ...] = (
    ("sprm_bon", "best_score", "head"),
    ("sprm_wmaj", "weighted_majority", "head"),
    ("sprm_min_bon", "best_score", "head_min"),
    ("conf_bon", "best_score", "conf"),
    ("confmin_bon", "best_score", "confmin"),
    ("maj", "majority", "head"),
    ("pass", "oracle", "head"),
    ("true_prm_bon", "best_score", "true_prm"),  # only with true step labels
)

# what other commands' run folders hold (experiments.train: config.yaml, last/, ckpt-*; experiments.search:
# records.jsonl; SFT: sft_summary.json, last/): --out never replaces their metrics.jsonl
OTHER_RUN_FILES: tuple[str, ...] = ("config.yaml", "last", "records.jsonl", "sft_summary.json")
# what a run writes into --out, in the order `run_head_training` writes them (metrics.json last)
OUT_FILES: tuple[str, ...] = ("metrics.jsonl", "final", "metrics.json")


# -- metrics on hand-checkable inputs -------------------------------------------------------------


def pooled_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """P(score of a positive > score of a negative), ties 1/2, over all pairs (Mann-Whitney by
    average ranks); None without both classes. E.g. scores [0.1, 0.4, 0.35, 0.8], labels
    [0, 0, 1, 1]: pairs (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4."""
    labels = labels.bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)  # sorted unique
    ends = counts.cumsum(0).double()  # [U] 1-based rank of the last member of each tie group
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # [N] average rank
    wins = float(ranks[labels].sum()) - positives * (positives + 1) / 2
    return wins / (positives * negatives)


def spr_label_agreement(logits: torch.Tensor, outcome: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """How well SPR's self-chosen labels match the truth, per position: kept_fraction (the filter
    keeps a position when its logit sign agrees with the outcome), label_precision (share of kept
    positions whose outcome equals the true step label; None with none kept), and
    outcome_label_agreement (that share over all positions). E.g. logits [2, -1, 3], outcome
    [1, 1, 0], labels [1, 0, 1]: kept [T, F, F]; precision 1/1; agreement [T, F, F] -> 1/3."""
    outcome, labels = outcome.bool(), labels.bool()
    kept = agreement_mask(logits, outcome)  # [P]
    same = outcome == labels  # [P]
    return {
        "kept_fraction": float(kept.float().mean()) if len(kept) else None,
        "label_precision": float(same[kept].float().mean()) if bool(kept.any()) else None,
        "outcome_label_agreement": float(same.float().mean()) if len(same) else None,
    }


def bon_sizes(n: int) -> list[int]:
    """Group sizes reported: the powers of two below n, and n.
    E.g. 32 -> [1, 2, 4, 8, 16, 32]; 12 -> [1, 2, 4, 8, 12]."""
    sizes = [2**k for k in range(n.bit_length()) if 2**k < n]
    return sizes + [n]


def problem_outcomes(cache: RolloutCache, scores: torch.Tensor) -> list[ProblemOutcome]:
    """The cache's rollouts as `experiments.metrics` outcomes (problem-major, generation order)."""
    values, correct = scores.tolist(), cache.correct.tolist()
    n = cache.n
    return [
        ProblemOutcome(
            pid, tuple(CandidateOutcome(cache.answers[r], correct[r], values[r]) for r in range(i * n, (i + 1) * n))
        )
        for i, pid in enumerate(cache.problem_ids)
    ]


def bon_table(
    cache: RolloutCache, head_scores: torch.Tensor, sizes: Sequence[int] | None = None,
    head_min_scores: torch.Tensor | None = None,
) -> dict[str, Estimate]:
    """Every BON_ROWS metric at each group size (95% intervals over problems, `experiments.metrics.interval`), plus pass@1;
    `true_prm_bon` (Best-of-N by a perfect step verifier: the path score is 1 iff all the scored
    steps are right) only when the cache has true step labels; `sprm_min_bon` (the head's lowest
    step score as the path score) only with head_min_scores."""
    sources = {
        "head": problem_outcomes(cache, head_scores),
        "conf": problem_outcomes(cache, confidence_path_scores(cache, "mean")),
        "confmin": problem_outcomes(cache, confidence_path_scores(cache, "min")),
    }
    if head_min_scores is not None:
        sources["head_min"] = problem_outcomes(cache, head_min_scores)
    labels = cache.position_labels
    if labels is not None:  # a perfect process verifier: path score 1 iff every scored step is right
        sources["true_prm"] = problem_outcomes(cache, rollout_path_scores(labels.float(), cache))
    table = {"pass@1": accuracy(sources["head"], 1, "first")}
    for size in sizes or bon_sizes(cache.n):
        for name, selector, source in BON_ROWS:
            if source in sources:
                table[f"{name}@{size}"] = accuracy(sources[source], size, selector)
    return table


# -- evaluation of a head -------------------------------------------------------------------------


def cache_metrics(head: nn.Sequential, cache: RolloutCache, layer: int, prefix: str, with_bon: bool) -> dict[str, Any]:
    """`<prefix>_fc/*` (fc metrics with the within-problem AUC) and `<prefix>/*` (step AUC, SPR
    label agreement, and with_bon the head's Best-of-n and score-weighted majority at the
    cache's n, without intervals) of the head on a cache."""
    logits = position_logits(head, cache.layer(layer))  # [P]
    probs = torch.sigmoid(logits)  # [P]
    scores = rollout_path_scores(probs, cache)  # [R]
    fc = fc_metrics(scores.tolist(), cache.correct.tolist(), cache.rollout_problem.tolist())
    row: dict[str, Any] = prefixed(f"{prefix}_fc/", fc)
    labels = cache.position_labels
    if labels is not None:
        row[f"{prefix}/step_auc"] = pooled_auc(probs, labels)
        agreement = spr_label_agreement(logits, cache.position_outcome, labels)
        row.update({f"{prefix}/spr_{k}": v for k, v in agreement.items()})
    if with_bon:
        outcomes = problem_outcomes(cache, scores)
        for name, selector in (("sprm_bon", "best_score"), ("sprm_wmaj", "weighted_majority")):
            values = [problem_accuracy(o, cache.n, selector) for o in outcomes]
            row[f"{prefix}/{name}@{cache.n}"] = sum(values) / len(values) if values else None
    return row


def make_evaluate(train: RolloutCache, test: RolloutCache, layer: int):
    """The evaluation the training loop calls: held-out metrics (with Best-of-n) and train-cache
    metrics (self-confirmation shows as a train gap without a held-out one)."""

    def evaluate(head: nn.Sequential, step: int) -> dict[str, Any]:
        held = cache_metrics(head, test, layer, "heldout", True)
        return {**held, **cache_metrics(head, train, layer, "train", False)}

    return evaluate


def final_metrics(
    run_rows: Sequence[dict[str, Any]], head: nn.Sequential, test: RolloutCache, layer: int
) -> dict[str, Any]:
    """metrics.json's numbers (module docstring)."""
    task = test.task
    probs = position_probs(head, test.layer(layer))  # [P]
    table = bon_table(test, rollout_path_scores(probs, test), head_min_scores=rollout_min_scores(probs, test))
    held = cache_metrics(head, test, layer, "heldout", False)
    conf_scores = confidence_path_scores(test, "mean")
    conf = fc_metrics(conf_scores.tolist(), test.correct.tolist(), test.rollout_problem.tolist())
    diffs = [r["heldout_fc/diff_prob"] for r in run_rows if r.get("heldout_fc/diff_prob") is not None]
    out: dict[str, Any] = {f"{task}.{k}": v.mean for k, v in table.items()}
    out.update({
        f"{task}.sprm_within_auc": held["heldout_fc/within_auc"],
        f"{task}.sprm_step_auc": held.get("heldout/step_auc"),
        f"{task}.sprm_diff_prob": held["heldout_fc/diff_prob"],
        f"{task}.sprm_correct_prob": held["heldout_fc/correct_prob"],
        f"{task}.sprm_false_prob": held["heldout_fc/false_prob"],
        f"{task}.spr_label_precision": held.get("heldout/spr_label_precision"),
        f"{task}.spr_kept_fraction": held.get("heldout/spr_kept_fraction"),
        f"{task}.outcome_label_agreement": held.get("heldout/spr_outcome_label_agreement"),
        f"{task}.conf_within_auc": conf["within_auc"],
        f"{task}.problems": test.num_problems,
        f"{task}.ci95": {k: [v.low, v.high] for k, v in table.items()},
        "aha.diff_prob_first": diffs[0] if diffs else None,
        "aha.diff_prob_last": diffs[-1] if diffs else None,
    })
    return out


# -- a run ----------------------------------------------------------------------------------------


def check_same_source(train: RolloutCache, test: RolloutCache) -> None:
    """The two caches must come from one policy on one task, and the held-out one must share no
    problem with the training one (its numbers would be measured on training data); a
    ValueError naming both otherwise."""
    if not same_policy(train, test) or train.hidden_size != test.hidden_size:
        raise ValueError(
            f"train cache of {train.spec['policy_dir']} (C={train.hidden_size}) and test cache of "
            f"{test.spec['policy_dir']} (C={test.hidden_size}) come from different policies"
        )
    if train.task != test.task:
        raise ValueError(f"train cache task {train.task!r} differs from test cache task {test.task!r}")
    shared = sorted(set(train.problem_ids) & set(test.problem_ids))
    if shared:
        raise ValueError(
            f"the test cache (split {test.spec.get('split')!r}) shares {len(shared)} of its {len(test.problem_ids)} "
            f"problems with the train cache (split {train.spec.get('split')!r}), e.g. {shared[0]!r}: held-out "
            "numbers need a cache of other problems (the test split)"
        )


def check_pair(train: RolloutCache, test: RolloutCache, layer: int) -> None:
    """The two caches must come from one policy on one task and hold the layer."""
    check_same_source(train, test)
    for name, cache in (("train", train), ("test", test)):
        try:
            cache.layer(layer)
        except KeyError as err:
            raise ValueError(f"{name} cache: {err.args[0]}") from None


def empty_note(train: RolloutCache) -> str | None:
    """A one-line note when the train cache has no scored position (its rollouts never ended a
    step at a separator: the head keeps its initial weights), else None."""
    if len(train.position_rollout):
        return None
    return (f"note: the train cache has no scored position ({train.num_rollouts} rollouts, none ending a step at a "
            "separator): the head is not trained (build the cache with a larger --max-total-tokens)")


def check_epochs(epochs: float) -> float:
    """epochs, or a ValueError unless it is a finite number > 0."""
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"epochs={epochs!r} must be a finite number > 0")
    return epochs


def positive_epochs(text: str) -> float:
    """--epochs' argparse type: a finite number > 0 (refused before any cache is read)."""
    try:
        return check_epochs(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0") from None


def steps_for_epochs(epochs: float, rollouts: int, batch_rollouts: int) -> int:
    """Optimiser steps of `epochs` passes over `rollouts` train rollouts, at least 1; a pass is
    ceil(rollouts / batch_rollouts) steps, its last one the remainder
    (`scorers.head_training.RolloutBatches`). E.g. 2 epochs of 640 rollouts by 64 -> 20; of 96
    by 64 -> 4 (64 + 32 each); by 1000 (each step a full pass) -> 2."""
    check_epochs(epochs)
    if rollouts < 1:
        raise ValueError("the train cache holds no rollouts")
    return max(1, round(epochs * math.ceil(rollouts / batch_rollouts)))


def batch_note(batch_rollouts: int, rollouts: int) -> str | None:
    """A one-line note when a step asks for more rollouts than the head trains on (of the train
    cache: `trained_rollout_count`; every step is then a full pass over them), else None."""
    if batch_rollouts <= rollouts or rollouts == 0:  # none: training names why (`RolloutBatches`)
        return None
    return (f"note: batch_rollouts={batch_rollouts} exceeds the {rollouts} train rollouts the head trains on: "
            f"every step trains on all {rollouts} (full-batch steps)")


def run_head_training(
    train_path: str | Path, test_path: str | Path, cfg: HeadTrainConfig, out_dir: str | Path,
    save: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Train on train_path's cache, evaluate on test_path's, write out_dir (module docstring);
    returns metrics.json's content."""
    out_dir = Path(out_dir)
    check_folder_target(out_dir, "--out")  # an existing file failed only after training, in a traceback
    check_not_another_run(out_dir)
    train, test = load_cache(train_path), load_cache(test_path)
    check_pair(train, test, cfg.feature_layer)
    policy = check_policy(train, f"the train cache {train_path}") if save else None  # final/ joins it to the head
    for note in (batch_note(cfg.batch_rollouts, trained_rollout_count(train, cfg)), empty_note(train)):
        if note is not None:
            print(note, file=sys.stderr)
    run = train_head(train, cfg, make_evaluate(train, test, cfg.feature_layer), progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    # metrics.json goes last: killed before it, a rerun leaves no metrics beside an earlier run's final/
    (out_dir / "metrics.json").unlink(missing_ok=True)
    write_atomic(out_dir / "metrics.jsonl", encode_rows(list(run.rows)))
    metrics = final_metrics(run.rows, run.head, test, cfg.feature_layer)
    metrics.update({"config": asdict(cfg), "train_cache": str(train_path), "test_cache": str(test_path),
                    "train_spec": train.spec, "test_spec": test.spec, "policy_fingerprint": train.policy_fingerprint,
                    "labels_version": labels_version(train.task),
                    "train_seconds": run.seconds})
    if save:
        save_reflective_head(run.head, policy, cfg.feature_layer, out_dir / "final")
        if not read_from(train, policy):  # written while the head trained: final/ joined it to other weights
            shutil.rmtree(out_dir / "final")
            raise ValueError(f"{policy} changed while the head trained (a training run writing it?): final/ would "
                             "join the head to weights it was not trained on, so it was not kept; build the caches "
                             "again once the folder is final")
    elif (out_dir / "final").is_dir():  # an earlier run's head beside these metrics would pass for theirs
        shutil.rmtree(out_dir / "final")
    write_atomic(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def check_not_another_run(out_dir: Path) -> None:
    """ValueError when --out holds another command's run (OTHER_RUN_FILES: a joint training run, a
    search, an SFT run), whose metrics.jsonl this command would replace; its own earlier output
    (metrics.jsonl, metrics.json, final/) is replaced, as a rerun should."""
    found = sorted(name for name in OTHER_RUN_FILES if (out_dir / name).exists())
    found += sorted(p.name for p in out_dir.glob("ckpt-*"))[:1]
    if found:
        raise ValueError(f"--out {out_dir} holds {', '.join(found)} of another command's run, whose metrics.jsonl "
                         "a head training there would replace; give another --out")
    check_not_model_folder(out_dir, "--out")


def format_summary(metrics: dict[str, Any], task: str, n: int) -> str:
    """One line of the numbers that decide whether the head helps."""
    def fmt(key: str) -> str:
        value = metrics.get(f"{task}.{key}")
        return "-" if value is None else f"{value:.3f}"

    keys = ("sprm_diff_prob", "sprm_within_auc", "sprm_step_auc", "spr_label_precision", "outcome_label_agreement",
            f"sprm_bon@{n}", f"sprm_wmaj@{n}", f"sprm_min_bon@{n}", f"conf_bon@{n}", f"confmin_bon@{n}",
            f"maj@{n}", "pass@1", f"pass@{n}",
            f"true_prm_bon@{n}")
    return "  ".join(f"{k} {fmt(k)}" for k in keys)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; our own input errors (ValueError, FileNotFoundError: a bad setting, a
    missing or damaged cache, caches of different policies) print "error: <message>" on stderr
    and give exit code 2; Ctrl-C (or SIGTERM) once the arguments are parsed: one line saying
    what --out holds (`interrupt_hint`)."""
    return run_command(train_command, argv)


def out_state(out: Path) -> dict[str, FileId | None]:
    """The `file_id` of each of OUT_FILES in out (None: not there)."""
    return {name: file_id(out / name) for name in OUT_FILES}


def _names(names: Sequence[str]) -> str:
    """OUT_FILES as a line names them: final/ as a folder, "a and b"."""
    return " and ".join(f"{name}/" if name == "final" else name for name in names)


def interrupt_hint(out: Path, before: dict[str, FileId | None]) -> str:
    """What a Ctrl-C says of --out at that moment; before: its `out_state` when the command began.
    E.g. "nothing was written to runs/h (an earlier run's files there are kept as they were); ..."
    while the head trains, "runs/h holds no finished run: no metrics.json (a finished run's last
    file); metrics.jsonl is this run's, final/ an earlier run's; ..." while it is written."""
    now = out_state(out)
    changed = [name for name in OUT_FILES if now[name] != before[name]]
    again = "rerun the same command to train again"
    if not changed:
        kept = " (an earlier run's files there are kept as they were)" if any(before.values()) else ""
        return f"nothing was written to {out}{kept}; {again}"
    if now["metrics.json"] is not None:  # changed and there: the run's last file is written
        return f"the run finished: {out} holds its metrics.json and its other files"
    ours = [name for name in changed if now[name] is not None]
    earlier = [name for name in OUT_FILES if name not in changed and now[name] is not None]
    whose = ([f"{_names(ours)} {'is' if len(ours) == 1 else 'are'} this run's"] if ours else []) + (
        [f"{_names(earlier)} an earlier run's"] if earlier else [])
    return (f"{out} holds no finished run: no metrics.json (a finished run's last file)"
            + (f"; {', '.join(whose)}" if whose else "") + f"; {again}")


def train_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, then `train_and_report` with Ctrl-C and SIGTERM reported in one line (`interrupt_hint`)."""
    ap = argparse.ArgumentParser(prog="python -m experiments.train_head", description="Train an SPRM head on cached rollouts of a frozen policy.")
    ap.add_argument("--train", required=True, type=Path, help="train rollout cache (.pt)")
    ap.add_argument("--test", required=True, type=Path, help="held-out rollout cache (.pt)")
    ap.add_argument("--labels", default="spr", choices=LABEL_MODES)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layer", type=int, default=-2, help="cached feature layer (-2: the reference's)")
    ap.add_argument("--lr", type=float, default=HeadTrainConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=HeadTrainConfig.weight_decay)
    ap.add_argument("--grad-clip", type=float, default=HeadTrainConfig.grad_clip)
    ap.add_argument("--steps", type=int, default=HeadTrainConfig.steps)
    ap.add_argument("--epochs", type=positive_epochs, default=None,
                    help="train this many passes over the train rollouts (overrides --steps)")
    ap.add_argument("--batch-rollouts", type=int, default=HeadTrainConfig.batch_rollouts)
    ap.add_argument("--warmup-steps", type=int, default=0, help="plain BCE steps before the SPR filter engages")
    ap.add_argument("--eval-every", type=int, default=HeadTrainConfig.eval_every)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--no-save", action="store_true", help="do not write the final/ reflective folder")
    args = ap.parse_args(argv)
    with interrupt_reported(functools.partial(interrupt_hint, args.out, out_state(args.out))):
        return train_and_report(args)


def train_and_report(args: argparse.Namespace) -> int:
    """Check every setting before a cache is read, train, write --out, print a summary."""
    torch.set_num_threads(args.threads)
    # with --epochs the steps are counted from the train cache: until then any count past the warm-up
    steps = args.steps if args.epochs is None else max(args.steps, args.warmup_steps + 1)
    cfg = HeadTrainConfig(args.labels, args.layer, args.lr, args.weight_decay, args.grad_clip, steps,
                          args.batch_rollouts, args.warmup_steps, args.eval_every, seed=args.seed)
    if args.epochs is not None:
        check_folder_target(args.out, "--out")  # every setting before a cache is read
        check_not_another_run(args.out)
        rollouts = trained_rollout_count(load_cache(args.train), cfg)
        if rollouts:  # none to train on: training names why ("every rollout ... is a wrong one cut"), not "no rollouts"
            steps = steps_for_epochs(args.epochs, rollouts, cfg.batch_rollouts)
            try:
                cfg = replace(cfg, steps=steps)
            except ValueError as err:
                err.add_note(f"steps={steps}: --epochs {args.epochs:g} of {rollouts} train rollouts by {cfg.batch_rollouts}")
                raise
    started = time.perf_counter()
    metrics = run_head_training(args.train, args.test, cfg, args.out, save=not args.no_save)
    task = next(k for k in metrics if k.endswith(".problems")).split(".")[0]
    n = max(int(k.rsplit("@", 1)[1]) for k in metrics if k.startswith(f"{task}.pass@"))
    print(f"{args.out} ({time.perf_counter() - started:.0f} s): {format_summary(metrics, task, n)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
