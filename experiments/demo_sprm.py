"""The demo's SPRM stage: a head trained on the task's frozen policy from cached rollouts and
hidden states (`experiments.rollout_cache`, `experiments.train_head`), cached on disk, its aha
plot, and the head used as a scorer of the demo's Best-of-N candidates.

    from experiments.demo_sprm import SPRMStage, run_sprm_stage
    stage = run_sprm_stage(SPRMStage(task="countdown"), Path("outputs/checkpoints/tiny-countdown/final"),
                           Path("outputs/demo"))
    stage.head_dir          # the policy with the trained head (transformers dir + score_module.pt)
    stage.metrics           # sprm_task, T.sprm_within_auc, T.sprm_step_auc, aha.diff_prob_first / _last
    stage.aha_plot          # outputs/demo/aha_<task>.png

Files (each reused when present, so a second `make demo` costs nothing here):
`<out>/sprm_<task>/train.pt` and `test.pt` (rollout caches of the train and test splits),
`<out>/sprm_<task>/head/` (metrics.jsonl, metrics.json, final/). The head is trained with the
reference's SPR loss by default (labels="spr"); `labels` takes every mode of
`scorers.head_training` (outcome_bce: an outcome reward model on frozen features; true_labels:
the upper bound with true step labels).
"""
from __future__ import annotations

import json
import sys
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from experiments.plot_aha import plot_aha
from experiments.rollout_cache import (
    CacheSpec, StaleCacheError, backbone_fingerprint, build_from_spec, labels_version, load_cache, save_cache,
)
from experiments.train_head import run_head_training
from policies.model_folder import check_model_folder
from scorers.head_training import HeadTrainConfig
from scorers.sprm_head import SCORE_MODULE_FILE

# metrics of the head run copied into the demo's metrics.json (the rest stays in its metrics.json)
HEAD_KEYS: tuple[str, ...] = ("sprm_within_auc", "sprm_step_auc", "sprm_diff_prob", "conf_within_auc",
                              "spr_label_precision")


@dataclass(frozen=True)
class SPRMStage:
    """task: the embedded task the SPRM is trained on; train_problems x train_n: training rollouts
    (train split); test_problems x test_n: held-out rollouts (test split, for the aha curves and
    AUCs); labels, steps, lr, feature_layer: the head's training (`HeadTrainConfig`);
    max_total_tokens: rollout length cap."""

    task: str = "countdown"
    train_problems: int = 512
    train_n: int = 8
    test_problems: int = 100
    test_n: int = 16
    labels: str = "spr"
    steps: int = 400
    lr: float = 1e-3
    feature_layer: int = -2
    max_total_tokens: int = 128

    def head_config(self) -> HeadTrainConfig:
        return HeadTrainConfig(labels=self.labels, feature_layer=self.feature_layer, lr=self.lr, steps=self.steps)


@dataclass(frozen=True)
class SPRMResult:
    """head_dir: the reflective model (policy + trained head); metrics: keys for the demo's
    metrics.json; aha_plot: the PNG of the held-out curves; train_cache, heldout_cache: the rollout
    caches it was trained and evaluated on (the frozen policy's features; the ablation's frozen
    heads train on them)."""

    head_dir: Path
    metrics: dict[str, Any]
    aha_plot: Path
    train_cache: Path | None = None
    heldout_cache: Path | None = None


def cached_rollouts(spec: CacheSpec, path: Path) -> Path:
    """The cache at path when it was built from this spec and the policy folder still holds the
    model it read (a policy retrained in place gives other features; a cache that does not say is
    built again), else a fresh one saved there."""
    if path.exists():
        try:
            cache = load_cache(path)
        except StaleCacheError as err:  # an older grader's: built again
            print(f"note: {err}; building it again", file=sys.stderr)
        else:
            if _as_json(cache.spec) == _as_json(asdict(spec)) and cache.policy_fingerprint == backbone_fingerprint(spec.policy_dir):
                return path
    save_cache(build_from_spec(spec), path)
    return path


def _as_json(data: dict[str, Any]) -> Any:
    """data as read back from JSON (tuples as lists), so a saved spec compares equal to its own."""
    return json.loads(json.dumps(data))


def run_sprm_stage(stage: SPRMStage, policy_dir: Path, out_dir: Path) -> SPRMResult:
    """Cache the rollouts, train the head (or reuse the trained one), draw the aha plot."""
    work = out_dir / f"sprm_{stage.task}"
    work.mkdir(parents=True, exist_ok=True)
    common = dict(policy_dir=str(Path(policy_dir).resolve()), task=stage.task, max_total_tokens=stage.max_total_tokens,
                  feature_layers=(stage.feature_layer,))
    train = cached_rollouts(CacheSpec(split="train", problems=stage.train_problems, n=stage.train_n, **common),
                            work / "train.pt")
    test = cached_rollouts(CacheSpec(split="test", problems=stage.test_problems, n=stage.test_n, **common),
                           work / "test.pt")
    head = work / "head"
    metrics = train_head_once(train, test, stage.head_config(), head)
    aha = plot_aha(head / "metrics.jsonl", out_dir / f"aha_{stage.task}.png")
    keep = {f"{stage.task}.{k}": metrics.get(f"{stage.task}.{k}") for k in HEAD_KEYS}
    keep.update({f"{stage.task}.aha.diff_prob_first": metrics.get("aha.diff_prob_first"),
                 f"{stage.task}.aha.diff_prob_last": metrics.get("aha.diff_prob_last"),
                 f"{stage.task}.sprm_labels": stage.labels})
    return SPRMResult(head / "final", keep, aha, train, test)


def train_head_once(train: Path, test: Path, cfg: HeadTrainConfig, head: Path) -> dict[str, Any]:
    """The metrics of the head run of this config on these caches in `head`: the finished one, or a
    new run. Its old metrics.json and final/ go first, so a run stopped part way never pairs one
    config's metrics.json with another's head (`_trained_with` would take that for done;
    `run_head_training` itself writes metrics.json last, after final/)."""
    if _trained_with(head, cfg, train, test):
        return json.loads((head / "metrics.json").read_text())
    (head / "metrics.json").unlink(missing_ok=True)
    shutil.rmtree(head / "final", ignore_errors=True)
    return run_head_training(train, test, cfg, head)


def reflective_model_saved(folder: Path) -> bool:
    """Whether folder holds a whole reflective model (config, weights, tokenizer and the head's
    score_module.pt; sprm.json is optional): a stage whose model lost a file is trained again,
    not reused to fail on every rerun."""
    try:
        check_model_folder(folder)
    except FileNotFoundError:
        return False
    return (folder / SCORE_MODULE_FILE).is_file()


def _trained_with(head: Path, cfg: HeadTrainConfig, train: Path, test: Path) -> bool:
    """A finished head run of this config on these caches exists: the same paths holding caches
    of the same specs, read from the same weights (`cached_rollouts` rebuilds a cache in place
    when its spec or its policy's weights change, and a head trained on the old one must not be
    reused)."""
    path = head / "metrics.json"
    if not path.is_file() or not reflective_model_saved(head / "final"):
        return False
    saved = json.loads(path.read_text())
    if saved.get("config") != asdict(cfg) or saved.get("train_cache") != str(train) or saved.get("test_cache") != str(test):
        return False
    caches = {"train_spec": load_cache(train), "test_spec": load_cache(test)}
    if saved.get("policy_fingerprint") != caches["train_spec"].policy_fingerprint:
        return False
    if saved.get("labels_version", 1) != labels_version(caches["train_spec"].task):  # trained on older true labels
        return False
    return all(saved.get(key) == _as_json(cache.spec) for key, cache in caches.items())
