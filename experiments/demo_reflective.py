"""The demo's SPRM stage on an embedded task (countdown, arith): the reflective model (policy + SPRM head on one backbone)
trained from the task's SFT policy, cached on disk, with its aha curves on held-out rollouts.

    from experiments.demo_reflective import ReflectiveStage, run_reflective_stage
    stage = run_reflective_stage(ReflectiveStage(), Path("outputs/checkpoints/tiny-countdown/final"),
                                 Path("outputs/demo"))
    stage.head_dir    # outputs/demo/reflective_countdown/model: transformers dir + score_module.pt
    stage.metrics     # countdown.aha.diff_prob_first / _last, countdown.sprm_step_auc, ...
    stage.aha_plot    # outputs/demo/aha_countdown.png

What it does (`experiments.backbone_tuning`, measured by `experiments.probe_backbone_verifier`):
1. Rollouts of the SFT policy on the train split (train_problems x train_n) and on the test split
   (heldout_problems x heldout_n, the held-out set of the aha curves), cached as
   `<out>/reflective_<task>/train.pt` and `heldout.pt`.
2. Backbone and head trained together on the train rollouts' outcome labels and the task's
   reference solutions, with a KL anchor to the SFT policy (`tune`); every eval_every steps the
   current model re-reads the held-out rollouts and its head scores them: `heldout_fc/*` (the aha
   curves), `heldout/step_auc` (against the true step labels). Rows go to `metrics.jsonl`.
3. The trained model saved as `model/`; `metrics.json` holds the config and the summary, so a
   second `make demo` with the same config and caches reuses everything.

The demo then samples its Best-of-N candidates with this model: each step's score comes from the
hidden state computed while generating it (no second forward), as in the reference.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from experiments.backbone_tuning import (REFERENCE_TASKS, BackboneTuneConfig, paths_of, rollout_examples,
                                         solution_examples, train)
from experiments.demo_sprm import SPRMResult, cached_rollouts, reflective_model_saved
from experiments.plot_aha import plot_aha
from experiments.rollout_cache import (
    CacheSpec, FeatureReader, RolloutCache, cache_problems, labels_version, load_cache,
)
from experiments.sft_tasks import get_sft_task
from experiments.train_head import cache_metrics
from policies.checkpoint import load_checkpoint
from policies.reflective_model import ReflectiveModel
from policies.model_folder import weights_fingerprint

# The default measured on countdown's 4800-step SFT policy (README, "The countdown verifier"): a KL
# anchor of 0.5 keeps the model a policy while the backbone learns to compare the last result with
# the target; 1200 steps (`experiments.probe_backbone_verifier --steps 1200 --kl-coef 0.5`: on its
# own 200 x 32 samples Best-of-32 0.385 vs confidence 0.045; 600 steps gave 0.200 on 100 problems).
DEFAULT_TUNE = BackboneTuneConfig(steps=1200, batch=64, backbone_lr=1e-3, head_lr=1e-3, kl_coef=0.5,
                                  reference_solutions=2)
# Arith has no target (every correct rollout of a problem is the same text; majority is near
# optimal) and one reference solution per problem: the same recipe for half the steps, so that the
# demo reports the same numbers for it at half the time.
ARITH_TUNE = replace(DEFAULT_TUNE, steps=600, reference_solutions=1)


@dataclass(frozen=True)
class ReflectiveStage:
    """task: an embedded task with reference solutions (`REFERENCE_TASKS`); train_problems x train_n: the
    SFT policy's training rollouts (train split); heldout_problems x heldout_n: the held-out
    rollouts of the aha curves (test split); tune: the training (`BackboneTuneConfig`);
    eval_every: steps between held-out evaluations; feature_layer: the head's input (-2, the
    reference's); max_total_tokens: rollout length cap."""

    task: str = "countdown"
    train_problems: int = 4096
    train_n: int = 8
    heldout_problems: int = 100
    heldout_n: int = 16
    tune: BackboneTuneConfig = field(default_factory=lambda: DEFAULT_TUNE)
    eval_every: int = 150
    feature_layer: int = -2
    max_total_tokens: int = 128

    def __post_init__(self) -> None:
        if self.task not in REFERENCE_TASKS:
            raise ValueError(f"ReflectiveStage(task={self.task!r}): only the embedded tasks {REFERENCE_TASKS} have the "
                             "reference solutions it uses")
        for name in ("train_problems", "train_n", "heldout_problems", "heldout_n", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReflectiveStage.{name}={getattr(self, name)!r} must be >= 1")


def heldout_evaluator(reflective: ReflectiveModel, reader: FeatureReader, heldout: RolloutCache
                      ) -> Callable[[int], dict[str, Any]]:
    """evaluate(step): the current model re-reads the held-out rollouts (`reader` holds the same
    LM) and its head scores them: heldout_fc/* with the within-problem AUC, heldout/step_auc."""
    paths = paths_of(heldout, cache_problems(heldout))
    layer = reflective.feature_layer

    def evaluate(step: int) -> dict[str, Any]:
        with torch.no_grad():
            features = torch.cat([r.features[layer] for r in reader.read(paths)])  # [P, C], cache order
        reread = replace(heldout, features={layer: features})
        row = cache_metrics(reflective.head, reread, layer, "heldout", False)
        return {k: v for k, v in row.items() if k.startswith("heldout_fc/") or k == "heldout/step_auc"}

    return evaluate


def summary(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """The demo's keys from the run's rows: the held-out gap at the first and last evaluation and
    the last evaluation's AUCs."""
    evals = [r for r in rows if "heldout_fc/diff_prob" in r]
    last = evals[-1] if evals else {}
    return {
        f"{task}.aha.diff_prob_first": evals[0]["heldout_fc/diff_prob"] if evals else None,
        f"{task}.aha.diff_prob_last": last.get("heldout_fc/diff_prob"),
        f"{task}.sprm_step_auc": last.get("heldout/step_auc"),
        f"{task}.sprm_heldout_within_auc": last.get("heldout_fc/within_auc"),
    }


def train_reflective(stage: ReflectiveStage, policy_dir: Path, train_cache: Path, heldout_cache: Path, work: Path,
                     progress: bool = True) -> dict[str, Any]:
    """Train, write metrics.jsonl, model/ and (last, as the run's completion mark) metrics.json."""
    (work / "metrics.json").unlink(missing_ok=True)  # an older run's mark must not vouch for this run's model/
    started = time.perf_counter()
    torch.manual_seed(stage.tune.seed)
    lm, tokenizer = load_checkpoint(policy_dir)
    frozen = load_checkpoint(policy_dir)[0].eval() if stage.tune.kl_coef else None
    reflective = ReflectiveModel(lm, feature_layer=stage.feature_layer)
    prompt_fn = get_sft_task(stage.task).module.prompt_text
    reader = FeatureReader(lm, tokenizer, prompt_fn, [stage.feature_layer])
    train_set, heldout = load_cache(train_cache), load_cache(heldout_cache)
    problems = cache_problems(train_set)
    examples = rollout_examples(train_set, problems, reader) + solution_examples(
        problems, reader, stage.tune.reference_solutions, stage.task)
    rows = train(reflective, frozen, examples, reader.pad_id, stage.tune, progress,
                 heldout_evaluator(reflective, reader, heldout), stage.eval_every)
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reflective.save_pretrained(work / "model", tokenizer)
    metrics = {**stage_identity(stage, policy_dir), "policy_fingerprint": weights_fingerprint(policy_dir),
               "labels_version": labels_version(stage.task), "train_cache": str(train_cache),
               "heldout_cache": str(heldout_cache), "train_examples": len(examples),
               "train_correct": sum(e.correct for e in examples), "seconds": round(time.perf_counter() - started, 1),
               "summary": summary(rows, stage.task)}
    (work / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def _config(stage: ReflectiveStage) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(stage)))  # tuples as lists, as read back from JSON


def stage_identity(stage: ReflectiveStage, policy_dir: Path) -> dict[str, Any]:
    """What makes the stage's model: its config and the SFT policy it starts from (as JSON reads
    them back); the model is trained again, in place, when this changes, or when the policy's
    weights did (`_trained`). Known before the policy is trained (the demo's sweep checks it)."""
    return {"config": _config(stage), "policy_dir": str(policy_dir)}


def _trained(work: Path, stage: ReflectiveStage, policy_dir: Path) -> dict[str, Any] | None:
    """The finished run of this config and policy in work, or None."""
    path = work / "metrics.json"
    if not path.is_file() or not (work / "metrics.jsonl").is_file() or not reflective_model_saved(work / "model"):
        return None
    saved = json.loads(path.read_text())
    same = all(saved.get(key) == value for key, value in stage_identity(stage, policy_dir).items())
    if saved.get("labels_version", 1) != labels_version(stage.task):  # trained on an older grader's outcomes
        return None
    # the SFT policy trained again in place (other steps): its reflective model is another one too
    return saved if same and saved.get("policy_fingerprint") == weights_fingerprint(policy_dir) else None


def stage_dir(stage: ReflectiveStage, out_dir: Path) -> Path:
    """The stage's folder in out_dir (caches, metrics, model/)."""
    return out_dir / f"reflective_{stage.task}"


def run_reflective_stage(stage: ReflectiveStage, policy_dir: Path, out_dir: Path, progress: bool = True) -> SPRMResult:
    """Cache the rollouts, train the reflective model (or reuse it), draw the aha plot."""
    work = stage_dir(stage, out_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = dict(policy_dir=str(Path(policy_dir).resolve()), task=stage.task, max_total_tokens=stage.max_total_tokens,
                  feature_layers=(stage.feature_layer,))
    train_cache = cached_rollouts(CacheSpec(split="train", problems=stage.train_problems, n=stage.train_n, **common),
                                  work / "train.pt")
    heldout_cache = cached_rollouts(
        CacheSpec(split="test", problems=stage.heldout_problems, n=stage.heldout_n, **common), work / "heldout.pt")
    saved = _trained(work, stage, policy_dir) or train_reflective(stage, policy_dir, train_cache, heldout_cache, work,
                                                                 progress)
    aha = plot_aha(work / "metrics.jsonl", out_dir / f"aha_{stage.task}.png")
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = {f"{stage.task}.sprm_labels": f"backbone+head, {stage.tune.loss} on outcomes",
               f"{stage.task}.sprm_train_seconds": saved["seconds"], **summary(rows, stage.task)}
    return SPRMResult(work / "model", metrics, aha, train_cache, heldout_cache)
