"""Train the reflective model's backbone and SPRM head together on cached rollouts, so that the
policy's own hidden states learn to verify (issue 3; README, "The countdown verifier"). Embedded
tasks (arith, countdown): their reference solutions join the training set.

A head on a frozen tiny policy's features has no signal on countdown: what decides a rollout is
whether its last step writes the target with true arithmetic, and next-token prediction never
needed the policy to compute that (`experiments.countdown_failures`). Here the head's loss reaches
the backbone (`grad_scale`, 1 instead of the reference's 1e-4) on class-balanced batches of
cached rollouts with their outcome labels (the SPR loss's self-supervised labels: no step labels),
plus correct traces from the task's reference solutions (`reference_solutions` per train problem),
while two anchors keep the policy a policy: a KL term to the frozen policy on the batch's
completion tokens (`kl_coef`) and a next-token loss on the batch's correct examples (`lm_coef`).

    reflective = ReflectiveModel(lm)                       # a fresh head on the SFT policy
    examples = rollout_examples(cache, problems, reader) + solution_examples(problems, reader, 2)
    rows = train(reflective, frozen_lm, examples, reader.pad_id, BackboneTuneConfig(kl_coef=0.5),
                 evaluate=lambda step: {...}, eval_every=100)   # rows: the metrics.jsonl rows

Used by `experiments.demo_reflective` (the demo's SPRM stage) and measured by
`experiments.probe_backbone_verifier`. Tests: `.venv/bin/pytest tests/test_probe_backbone_verifier.py`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from experiments.aha_metrics import fc_metrics, path_scores, prefixed
from experiments.rollout_cache import FeatureReader, RolloutCache
from experiments.sft_tasks import get_sft_task
from experiments.tasks import arith, countdown
from policies.bf16_support import native_bf16
from policies.joint_step import JointForward
from policies.reflective_model import ReflectiveModel
from scorers.sprm_positions import score_positions
from scorers.spr_loss import SPR_MODES, spr_loss
from treesearch.config_checks import check_int, is_finite_number
from treesearch.records import Prefix, Problem


@dataclass(frozen=True)
class BackboneTuneConfig:
    """steps: optimizer steps; batch: examples per step, half correct and half not; backbone_lr,
    head_lr: AdamW learning rates; grad_scale: the head's gradient into the backbone (the
    reference's 1e-4 leaves the backbone as it is); loss: `scorers.spr_loss` mode; kl_coef: KL to
    the frozen policy on completion tokens (0: none); lm_coef: next-token loss on the completion
    tokens of the batch's correct examples (0: none; keeps and sharpens the policy, rejection-
    sampling fine-tuning); reference_solutions: reference traces per train problem added as
    correct examples; seed; ref_bf16: the frozen policy's forward (the KL term's only input) in
    bf16 autocast, as `policies.joint_step` and verl do (0.28 s instead of 0.52 s of a ~1.5 s step
    on 2 cores; the reference log-probs move by ~0.05 on average); default: where the CPU has bf16
    matmuls (`policies.bf16_support`)."""

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
    ref_bf16: bool = field(default_factory=native_bf16)

    def __post_init__(self) -> None:
        check_int("BackboneTuneConfig", "steps", self.steps, minimum=1)  # 2.5 failed after the caches loaded
        check_int("BackboneTuneConfig", "batch", self.batch, minimum=2)
        check_int("BackboneTuneConfig", "reference_solutions", self.reference_solutions, minimum=0)
        check_int("BackboneTuneConfig", "seed", self.seed)
        if self.batch % 2:
            raise ValueError(f"BackboneTuneConfig.batch={self.batch} must be an even number >= 2")
        for name in ("backbone_lr", "head_lr", "grad_scale", "kl_coef", "lm_coef"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):  # NaN passed `min(...) < 0` and trained to NaN
                raise ValueError(f"BackboneTuneConfig.{name}={value!r} must be a finite number >= 0")
        if self.loss not in SPR_MODES:
            raise ValueError(f"BackboneTuneConfig.loss={self.loss!r}; valid: {', '.join(SPR_MODES)}")


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
    """The cached rollouts as training examples (token ids as the policy read them)."""
    positions: list[list[int]] = [[] for _ in range(cache.num_rollouts)]
    for p in range(len(cache.position_rollout)):
        positions[int(cache.position_rollout[p])].append(int(cache.position_index[p]))
    sequences = reader.sequences(paths_of(cache, problems))
    return [Example(ids, start, positions[r], bool(cache.correct[r])) for r, (ids, start) in enumerate(sequences)]


REFERENCE_TASKS: tuple[str, ...] = ("arith", "countdown")  # the tasks `reference_solution` knows


def reference_solution(task: str, problem: Problem, k: int) -> str:
    """The k-th reference completion of an embedded task's problem: countdown has many (one per
    solver seed), arith one (every k gives the same text)."""
    if task == "countdown":
        return countdown.solution_text(problem, seed=k)
    if task == "arith":
        return arith.solution_text(problem)
    raise ValueError(f"no reference solutions for task {task!r} (embedded tasks: arith, countdown)")


def solution_examples(problems: Sequence[Problem], reader: FeatureReader, per_problem: int,
                      task: str = "countdown") -> list[Example]:
    """per_problem reference solutions of each problem (`reference_solution` k = 0, 1, ...: not
    always distinct, as a problem with one solution gives it each time: 4096 countdown train
    problems give 6730 distinct texts of 8192), tokenized as the policy writes them (+ EOS), as
    correct examples."""
    tokenizer, out = reader.tokenizer, []
    prompt_text = get_sft_task(task).module.prompt_text
    for k in range(per_problem):
        for problem in problems:
            prompt = tokenizer(prompt_text(problem)).input_ids
            body = tokenizer(reference_solution(task, problem, k), add_special_tokens=False).input_ids
            ids = prompt + body + [int(tokenizer.eos_token_id)]
            out.append(Example(ids, len(prompt), score_positions(ids, reader.markers, len(prompt)), True))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask [B, L], completion-target mask [B, L-1], outcomes [B], and the
    head's positions (rows, cols [N]) with their labels [N] (the example's outcome)."""
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


def kl_to_frozen(logits: torch.Tensor, frozen: Any, batch: dict[str, torch.Tensor], bf16: bool = False) -> torch.Tensor:
    """KL(frozen || current) per completion token, averaged; bf16: the frozen forward in bf16 autocast."""
    device = batch["ids"].device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        ref_logits = frozen(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
    ref = torch.log_softmax(ref_logits[:, :-1].float(), -1)
    current = torch.log_softmax(logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - current)).sum(-1)  # [B, L-1]
    return (kl * batch["completion"]).sum() / batch["completion"].sum().clamp(min=1)


def lm_loss_on_correct(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of the batch's correct examples."""
    weights = batch["completion"] * batch["correct"][:, None]  # [B, L-1]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["ids"][:, 1:],
                                            reduction="none")  # [B, L-1]
    return (nll * weights).sum() / weights.sum().clamp(min=1)


def batch_fc(head_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """fc/correct_prob, fc/false_prob, fc/diff_prob of the training batch (path scores from the
    head's train-mode logits [N])."""
    scores = path_scores(torch.sigmoid(head_logits.detach()), batch["rows"], len(batch["correct"]))  # [B]
    fc = fc_metrics(scores.tolist(), batch["correct"].tolist())
    return prefixed("fc/", {k: fc[k] for k in ("correct_prob", "false_prob", "diff_prob")})


def check_examples(examples: Sequence[Example], batch: int) -> tuple[list[Example], list[Example]]:
    """(correct, incorrect) examples, or a ValueError unless each side fills half a batch."""
    positives = [e for e in examples if e.correct]
    negatives = [e for e in examples if not e.correct]
    if len(positives) < batch // 2 or len(negatives) < batch // 2:
        raise ValueError(f"batch={batch} needs {batch // 2} correct and {batch // 2} incorrect examples, "
                         f"have {len(positives)} / {len(negatives)}")
    return positives, negatives


def train(reflective: ReflectiveModel, frozen: Any, examples: Sequence[Example], pad_id: int, cfg: BackboneTuneConfig,
          progress: bool = True, evaluate: Callable[[int], dict[str, Any]] | None = None, eval_every: int = 0,
          ) -> list[dict[str, Any]]:
    """Train backbone + head in place. Returns one row per step (`step` 1-based, loss parts, the
    batch's fc/*); evaluate(step), when given, is called at step 0, every eval_every steps and at
    the last step, and its metrics are merged into that step's row (step 0: a row of its own).
    frozen: the reference LM of the KL term (None when kl_coef is 0)."""
    positives, negatives = check_examples(examples, cfg.batch)
    if cfg.kl_coef and frozen is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs the frozen reference LM")
    model, rng = JointForward(reflective), random.Random(cfg.seed)
    actor = [p for name, p in reflective.named_parameters() if not name.startswith("head.")]
    optim = torch.optim.AdamW([{"params": actor, "lr": cfg.backbone_lr},
                               {"params": reflective.head.parameters(), "lr": cfg.head_lr}], weight_decay=0.01)
    rows: list[dict[str, Any]] = [{"step": 0, **evaluate(0)}] if evaluate else []
    reflective.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="backbone + head", unit="step", disable=not progress):
        batch = collate(rng.sample(positives, cfg.batch // 2) + rng.sample(negatives, cfg.batch // 2), pad_id)
        logits, head = model(batch["ids"], batch["mask"], batch["rows"], batch["cols"], cfg.grad_scale)
        spr = spr_loss(head, batch["labels"], cfg.loss).loss
        kl = kl_to_frozen(logits, frozen, batch, cfg.ref_bf16) if cfg.kl_coef else torch.zeros(())
        lm = lm_loss_on_correct(logits, batch) if cfg.lm_coef else torch.zeros(())
        loss = spr + cfg.kl_coef * kl + cfg.lm_coef * lm
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reflective.parameters(), 1.0)
        optim.step()
        row = {"step": step, "loss": loss.item(), "loss/spr": spr.item(),
               **({"loss/kl": kl.item()} if cfg.kl_coef else {}),  # a term switched off is not measured: no 0 logged
               **({"loss/lm": lm.item()} if cfg.lm_coef else {}), **batch_fc(head, batch)}
        if evaluate and (step == cfg.steps or (eval_every and step % eval_every == 0)):
            reflective.eval()
            row.update(evaluate(step))
            reflective.train()
        rows.append(row)
    reflective.eval()
    return rows
