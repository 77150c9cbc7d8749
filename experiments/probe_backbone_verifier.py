"""Probe (issue 3): can the policy's backbone LEARN to verify its own countdown rollouts?

A head on the frozen tiny policy's features has no signal on countdown (README, "Head-only SPRM
training"): what decides a rollout there is whether its last step writes the target with true
arithmetic (`experiments.countdown_failures`), and next-token prediction never needed the policy
to compute that. This probe lets the backbone learn it: the SPRM head and the backbone are
trained together on cached rollouts (the SPR loss on outcome labels, class-balanced batches, the
head's gradient into the backbone scaled by --grad-scale), optionally with extra positives from
the task's reference solutions (--reference-solutions K per train problem: the same kind of label,
correct traces, that the policy's 1.7% correct rollouts give too rarely) and a KL term to the
frozen policy on the batch's completion tokens (--kl-coef: keeps the policy a policy). Then the
held-out rollouts are read again with the tuned backbone and the head ranks them: within-problem
AUC, held-out fc/diff_prob and Best-of-n against confidence, majority and the oracle.

It measures; it does not produce the demo's scorer. The tuned backbone samples other rollouts than
the cached ones: `--own-problems K` lets it sample its own rollouts of K test problems and rank
them with its head (is it still a policy, and does its head still pick the right answers);
`--save DIR` keeps the tuned reflective model.

    python -m experiments.rollout_cache --policy outputs/checkpoints/tiny-countdown/final --task countdown \\
        --split train --problems 4096 --n 8 --out /tmp/cd/train.pt            # ~7 min, 32768 rollouts
    python -m experiments.rollout_cache ... --split test --problems 200 --n 32 --out /tmp/cd/test.pt
    python -m experiments.probe_backbone_verifier --train /tmp/cd/train.pt --test /tmp/cd/test.pt \\
        --steps 900 --backbone-lr 1e-3 --reference-solutions 2 --out /tmp/cd/probe.json   # ~15 min, 2 cores
    ... --kl-coef 0.1 --own-problems 200 --save /tmp/cd/tuned
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.countdown_failures import cache_problems  # noqa: E402
from experiments.rollout_cache import FeatureReader, RolloutCache, build_rollout_cache, load_cache  # noqa: E402
from experiments.tasks import countdown  # noqa: E402
from experiments.train_head import bon_table, cache_metrics  # noqa: E402
from policies.checkpoint import load_checkpoint  # noqa: E402
from policies.joint_step import JointForward  # noqa: E402
from policies.reflective_model import ReflectiveModel  # noqa: E402
from scorers.head_training import position_probs, rollout_min_scores, rollout_path_scores  # noqa: E402
from scorers.sprm_positions import score_positions  # noqa: E402
from scorers.spr_loss import spr_loss  # noqa: E402
from treesearch.records import Prefix, Problem  # noqa: E402


@dataclass(frozen=True)
class ProbeConfig:
    """steps: optimizer steps; batch: rollouts per step, half correct and half not; backbone_lr,
    head_lr: AdamW learning rates; grad_scale: the head's gradient into the backbone (the
    reference's 1e-4 leaves the backbone as it is); loss: `scorers.spr_loss` mode; kl_coef: KL to
    the frozen policy on completion tokens (0: none); lm_coef: next-token loss on the completion
    tokens of the batch's correct examples (0: none; keeps and sharpens the policy, rejection-
    sampling fine-tuning); reference_solutions: reference traces per train problem added as
    correct examples; seed."""

    steps: int = 900
    batch: int = 64
    backbone_lr: float = 1e-3
    head_lr: float = 1e-3
    grad_scale: float = 1.0
    loss: str = "bce"
    kl_coef: float = 0.0
    reference_solutions: int = 2
    seed: int = 0
    lm_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 2 or self.batch % 2:
            raise ValueError(f"steps={self.steps} must be >= 1 and batch={self.batch} an even number >= 2")
        if min(self.backbone_lr, self.head_lr, self.grad_scale, self.kl_coef, self.lm_coef, self.reference_solutions) < 0:
            raise ValueError("learning rates, grad_scale, kl_coef, lm_coef and reference_solutions must be >= 0")


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids, prompt length, the head's positions, the outcome."""

    ids: list[int]
    start: int
    positions: list[int]
    correct: bool


def paths_of(cache: RolloutCache, problems: Sequence[Problem]) -> list[Prefix]:
    """The cached rollouts as Prefixes of the cache's problems (`cache_problems`), in cache order."""
    return [Prefix(problems[int(cache.rollout_problem[r])], tuple(cache.steps_of(r))) for r in range(cache.num_rollouts)]


def rollout_examples(cache: RolloutCache, problems: Sequence[Problem], reader: FeatureReader) -> list[Example]:
    positions: list[list[int]] = [[] for _ in range(cache.num_rollouts)]
    for p in range(len(cache.position_rollout)):
        positions[int(cache.position_rollout[p])].append(int(cache.position_index[p]))
    sequences = reader.sequences(paths_of(cache, problems))
    return [Example(ids, start, positions[r], bool(cache.correct[r])) for r, (ids, start) in enumerate(sequences)]


def solution_examples(problems: Sequence[Problem], reader: FeatureReader, per_problem: int) -> list[Example]:
    """Reference solutions of the problems, tokenized as the policy writes them (+ EOS)."""
    tokenizer, out = reader.tokenizer, []
    for k in range(per_problem):
        for problem in problems:
            prompt = tokenizer(countdown.prompt_text(problem)).input_ids
            body = tokenizer(countdown.solution_text(problem, seed=k), add_special_tokens=False).input_ids
            ids = prompt + body + [int(tokenizer.eos_token_id)]
            out.append(Example(ids, len(prompt), score_positions(ids, reader.markers, len(prompt)), True))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, L]
    completion = torch.zeros((len(examples), width - 1))  # [B, L-1] targets that are completion tokens
    rows, cols, labels = [], [], []
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        completion[i, e.start - 1 : len(e.ids) - 1] = 1
        rows += [i] * len(e.positions)
        cols += e.positions
        labels += [e.correct] * len(e.positions)
    return {"ids": ids, "mask": mask, "completion": completion,
            "correct": torch.tensor([e.correct for e in examples]), "rows": torch.tensor(rows, dtype=torch.long),
            "cols": torch.tensor(cols, dtype=torch.long), "labels": torch.tensor(labels)}


def kl_to_frozen(logits: torch.Tensor, frozen: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(frozen || current) per completion token, averaged."""
    with torch.no_grad():
        ref = torch.log_softmax(frozen(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1].float(), -1)
    current = torch.log_softmax(logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - current)).sum(-1)  # [B, L-1]
    return (kl * batch["completion"]).sum() / batch["completion"].sum().clamp(min=1)


def lm_loss_on_correct(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of the batch's correct examples."""
    weights = batch["completion"] * batch["correct"][:, None]  # [B, L-1]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["ids"][:, 1:],
                                            reduction="none")  # [B, L-1]
    return (nll * weights).sum() / weights.sum().clamp(min=1)


def train(reflective: ReflectiveModel, frozen: Any, examples: Sequence[Example], pad_id: int, cfg: ProbeConfig,
          progress: bool = True) -> list[dict[str, float]]:
    """Train backbone + head in place; per step the loss parts."""
    positives = [e for e in examples if e.correct]
    negatives = [e for e in examples if not e.correct]
    if len(positives) < cfg.batch // 2 or len(negatives) < cfg.batch // 2:
        raise ValueError(f"need {cfg.batch // 2} correct and incorrect examples, have {len(positives)} / {len(negatives)}")
    model, rng = JointForward(reflective), random.Random(cfg.seed)
    actor = [p for name, p in reflective.named_parameters() if not name.startswith("head.")]
    optim = torch.optim.AdamW([{"params": actor, "lr": cfg.backbone_lr},
                               {"params": reflective.head.parameters(), "lr": cfg.head_lr}], weight_decay=0.01)
    reflective.train()
    log = []
    for _ in tqdm(range(cfg.steps), desc="probe", unit="step", disable=not progress):
        batch = collate(rng.sample(positives, cfg.batch // 2) + rng.sample(negatives, cfg.batch // 2), pad_id)
        logits, head = model(batch["ids"], batch["mask"], batch["rows"], batch["cols"], cfg.grad_scale)
        spr = spr_loss(head, batch["labels"], cfg.loss).loss
        kl = kl_to_frozen(logits, frozen, batch) if cfg.kl_coef else torch.zeros(())
        lm = lm_loss_on_correct(logits, batch) if cfg.lm_coef else torch.zeros(())
        loss = spr + cfg.kl_coef * kl + cfg.lm_coef * lm
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reflective.parameters(), 1.0)
        optim.step()
        log.append({"loss": loss.item(), "spr": spr.item(), "kl": kl.item(), "lm": lm.item()})
    reflective.eval()
    return log


def evaluate(reflective: ReflectiveModel, test: RolloutCache, paths: Sequence[Prefix], reader: FeatureReader
             ) -> tuple[dict[str, float], torch.Tensor]:
    """The model re-reads the held-out rollouts (`paths_of(test, ...)`); its head ranks them.
    Returns the metrics and the head's [P] step scores in the cache's position order."""
    readings = reader.read(paths)
    layer = reflective.feature_layer
    features = torch.cat([r.features[layer] for r in readings])  # [P, C], the cache's position order
    reread = replace(test, features={layer: features})
    probs = position_probs(reflective.head, features)
    metrics = ranking_metrics(reflective, reread, probs, "heldout", head_min_scores=rollout_min_scores(probs, reread))
    return metrics, probs


def ranking_metrics(reflective: ReflectiveModel, cache: RolloutCache, probs: torch.Tensor, prefix: str,
                    **table_options: Any) -> dict[str, float]:
    """`<prefix>_fc/*` of the head on the cache's features and `bon_table` (means) of its [P] step
    scores `probs`; table_options go to bon_table."""
    table = bon_table(cache, rollout_path_scores(probs, cache), **table_options)
    held = cache_metrics(reflective.head, cache, reflective.feature_layer, prefix, False)
    out = {k: v for k, v in held.items() if isinstance(v, float)}
    out.update({k: v.mean for k, v in table.items()})
    return out


def own_samples(folder: Path, problems: int, n: int, progress: bool = True) -> dict[str, float]:
    """The tuned model as a policy: it samples n rollouts of each of the first `problems` test
    problems (`rollout_cache.build_rollout_cache`, the task's default temperature) and its own
    head ranks them (the same scores as in-generation scoring, `policies.reflective_model`):
    pass@1, pass@n, Best-of-n by the head and by confidence, majority, `own_fc/*`."""
    reflective, _ = ReflectiveModel.from_pretrained(folder)
    layer = reflective.feature_layer
    cache = build_rollout_cache(folder, "countdown", "test", problems, n, feature_layers=(layer,), progress=progress)
    return ranking_metrics(reflective, cache, position_probs(reflective.head, cache.layer(layer)), "own", sizes=[n])


def run(policy: Path, train_cache: Path, test_cache: Path, cfg: ProbeConfig, progress: bool = True,
        save_dir: Path | None = None, own_problems: int = 0) -> dict[str, Any]:
    """Train and measure (module docstring); save_dir: also save the tuned reflective model there
    (transformers folder + score_module.pt); own_problems: also let the tuned model sample its own
    rollouts of that many test problems (n as the held-out cache) and rank them (`own_samples`:
    does it still solve problems, and does its head pick the right ones)."""
    torch.manual_seed(cfg.seed)
    lm, tokenizer = load_checkpoint(policy)
    frozen = load_checkpoint(policy)[0] if cfg.kl_coef else None
    reflective = ReflectiveModel(lm)
    train_set, test = load_cache(train_cache), load_cache(test_cache)
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [reflective.feature_layer])
    train_problems = cache_problems(train_set)
    examples = rollout_examples(train_set, train_problems, reader) + solution_examples(train_problems, reader, cfg.reference_solutions)
    test_paths = paths_of(test, cache_problems(test))
    started = time.perf_counter()
    before, _ = evaluate(reflective, test, test_paths, reader)
    log = train(reflective, frozen, examples, reader.pad_id, cfg, progress)
    after, after_probs = evaluate(reflective, test, test_paths, reader)
    own: dict[str, float] = {}
    if save_dir is not None or own_problems:
        with tempfile.TemporaryDirectory() as scratch:
            folder = save_dir or Path(scratch) / "tuned"
            reflective.save_pretrained(folder, tokenizer)
            own = own_samples(folder, own_problems, test.n, progress) if own_problems else {}
    return {"own": own, "config": asdict(cfg), "train_examples": len(examples), "train_correct": sum(e.correct for e in examples),
            "seconds": time.perf_counter() - started, "before": before, "after": after,
            "loss_first": log[0]["loss"], "loss_last_50": sum(r["loss"] for r in log[-50:]) / min(50, len(log)),
            "after_step_scores": after_probs.tolist()}


def summary(result: dict[str, Any], n: int) -> str:
    keys = ["heldout_fc/diff_prob", "heldout_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"sprm_wmaj@{n}",
            f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for when in ("before", "after"):
        lines.append(f"| {when} | " + " | ".join(f"{result[when].get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    d = ProbeConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, default=Path("outputs/checkpoints/tiny-countdown/final"))
    ap.add_argument("--train", type=Path, required=True, help="train-split rollout cache (.pt)")
    ap.add_argument("--test", type=Path, required=True, help="held-out rollout cache (.pt)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--save", type=Path, default=None, help="save the tuned reflective model in this folder")
    ap.add_argument("--own-problems", type=int, default=0,
                    help="the tuned model samples its own rollouts of this many test problems; its head ranks them")
    for name in ("steps", "batch", "reference_solutions", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("backbone_lr", "head_lr", "grad_scale", "kl_coef", "lm_coef"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--loss", default=d.loss, help="scorers.spr_loss mode: reference | paper | bce")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ProbeConfig(args.steps, args.batch, args.backbone_lr, args.head_lr, args.grad_scale, args.loss,
                      args.kl_coef, args.reference_solutions, args.seed, args.lm_coef)
    result = run(args.policy, args.train, args.test, cfg, save_dir=args.save, own_problems=args.own_problems)
    n = load_cache(args.test).n
    print(summary(result, n))
    if result["own"]:
        keys = ["own_fc/diff_prob", "own_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
        print(f"\nthe tuned model's own samples ({args.own_problems} test problems x {n}):")
        print("| " + " | ".join(keys) + " |\n|" + "---:|" * len(keys))
        print("| " + " | ".join(f"{result['own'].get(k, float('nan')):.3f}" for k in keys) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # after_step_scores: the held-out step scores


if __name__ == "__main__":
    main()
