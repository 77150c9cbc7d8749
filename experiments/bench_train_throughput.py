"""Benchmark: tokens/s of the joint GRPO + SPR training step vs a plain forward + backward (LM
loss) over the same batch of rollouts, measured side by side in one run (target: at least 0.8).

The batch is what one step of `experiments.train` sees by default: P prompts x G rollouts of the
policy on arith train problems (sampled at temperature 1, `TransformersRolloutSource` with the
SPRM head attached), collated by `collate_rollouts` (right-padded, step positions found). The
head is freshly initialised (its values do not change the cost). Each timed unit is forward +
loss + backward (gradients zeroed before, no optimizer step: the same for every row):
  plain        LM forward, token cross-entropy on the completion tokens, backward, with each
               group's prompt forwarded once (`policies.shared_prompt`), as the joint rows;
  joint        `policies.joint_step.joint_step` as the trainer calls it (train_loss=reference):
               one forward of the backbone + head and the frozen reference LM's forward for the
               KL term, each running every group's prompt once (`policies.shared_prompt`), the
               reference in bf16 where the CPU has bf16 matmuls (ref_bf16 None, as verl's
               reference model; `policies.bf16_support`), GRPO + SPR;
  joint, fp32 reference  the same with the reference forward in float32 (ref_bf16 off; only on
               a machine with bf16 matmuls, where the joint row ran it in bf16);
  joint no KL  the same with kl_coef = 0 (no reference forward): what the extra forward costs;
  plain, every prompt forwarded per rollout  the plain step over the whole batch (any LM loss's way);
  joint, every prompt forwarded per rollout  the joint step with the policy's forward over the
               whole batch (shared_prompt off), as before each group's prompt ran once
               (the reference forward shares it either way).
Each joint row is compared with the plain row that forwards the prompts as it does (equal work:
sharing prompts is not credited to the joint step). tokens/s counts the non-pad tokens of the
batch; times are medians of --repeats rounds, the rows alternating within each round.

    python -m experiments.bench_train_throughput                   # 8 prompts x 8 rollouts
    python -m experiments.bench_train_throughput --prompts 2 --group 2 --repeats 1
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import add_checkpoint_argument, load_tiny_parts  # noqa: E402
from experiments.bench_timing import timed  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import positive_int  # noqa: E402
from experiments.tasks import arith  # noqa: E402
from policies.bf16_support import native_bf16  # noqa: E402
from policies.joint_step import JointForward, JointLossConfig, joint_step  # noqa: E402
from policies.reflective_model import ReflectiveModel  # noqa: E402
from policies.rollout_batch import RolloutBatch, TransformersRolloutSource, collate_rollouts  # noqa: E402
from policies.shared_prompt import shared_prompt_forward, shared_prompt_lengths  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from scorers.sprm_positions import StepMarkers  # noqa: E402

TARGET = 0.8  # least joint / plain tokens/s
# experiments/conf/train.yaml's rollout sampling
TRAIN_SAMPLING = SamplingConfig(temperature=1.0, top_p=1.0, max_step_tokens=64, max_total_tokens=128)


@dataclass(frozen=True)
class TrainParts:
    """What a training step needs: the reflective model (policy + fresh head), the frozen
    reference LM (a copy of the policy), the tokenizer and a description of the checkpoint."""

    reflective: ReflectiveModel
    ref_lm: Any
    tokenizer: Any
    source: str


@dataclass(frozen=True)
class ThroughputRow:
    """One kind of step: median seconds over the repeats, non-pad tokens of the batch."""

    name: str
    seconds: float
    tokens: int
    shared_prompt: bool  # each group's prompt forwarded once (else once per rollout)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_train_parts(checkpoint: Path) -> TrainParts:
    lm, tokenizer, source = load_tiny_parts(checkpoint)
    reflective = ReflectiveModel(lm)  # a fresh head: its values do not change the cost
    ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    return TrainParts(reflective, ref_lm, tokenizer, source)


def rollout_batch(parts: TrainParts, prompts: int, group: int, seed: int) -> RolloutBatch:
    """G rollouts for each of P arith train problems, graded and collated as the trainer does."""
    parts.reflective.eval()
    policy = TransformersPolicy.from_reflective(parts.reflective, parts.tokenizer, TRAIN_SAMPLING, arith.prompt_text)
    problems = arith.generate_problems("train", prompts, seed=seed)
    groups = TransformersRolloutSource(policy).rollouts(problems, group, seed)
    flat = [r for g in groups for r in g]
    rewards = [float(arith.grade(p, r.text)) for p, g in zip(problems, groups) for r in g]
    fmt = TRAIN_SAMPLING.step_format
    width = max(int(parts.reflective.config.vocab_size), len(parts.tokenizer))
    markers = StepMarkers.from_tokenizer(parts.tokenizer, width, fmt)
    return collate_rollouts(flat, rewards, group, markers, policy.pad_id)


def plain_step(parts: TrainParts, batch: RolloutBatch, shared_prompt: bool) -> torch.Tensor:
    """Forward + LM loss (mean cross-entropy over completion targets) + backward; returns the loss.
    shared_prompt: each group's prompt forwarded once (`policies.shared_prompt`; the completion
    targets get the plain forward's logits), else the whole batch."""
    lm = parts.reflective.lm
    shared = shared_prompt_lengths(batch) if shared_prompt else None
    if shared is None:
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # [B, L, V]
    else:
        logits, _ = shared_prompt_forward(lm, batch.input_ids, batch.attention_mask, batch.group_size, shared)
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
    )  # [B, L-1]
    loss = (token_loss * batch.completion_mask).sum() / batch.completion_mask.sum().clamp(min=1)
    loss.backward()
    return loss.detach()


def joint_unit(parts: TrainParts, batch: RolloutBatch, cfg: JointLossConfig) -> torch.Tensor:
    """`joint_step` (forward, reference forward when kl_coef > 0, GRPO + SPR) + backward."""
    out = joint_step(JointForward(parts.reflective), batch, parts.ref_lm if cfg.kl_coef > 0 else None, cfg)
    out.loss.backward()
    return out.loss.detach()


def step_units(parts: TrainParts, batch: RolloutBatch) -> dict[str, tuple[bool, Callable[[], torch.Tensor]]]:
    """The timed units by row name: (each group's prompt forwarded once, the unit; each zeroes
    the gradients first). The first unit of each kind of prompt forwarding is its plain step."""
    joint_cfg = JointLossConfig(ref_bf16=None)  # the reference's loss (train_loss=reference)
    bf16 = native_bf16(str(batch.input_ids.device))  # what ref_bf16=None picks here
    units = {
        "plain forward + backward": (True, lambda: plain_step(parts, batch, shared_prompt=True)),
        f"joint GRPO + SPR (reference forward in {'bf16' if bf16 else 'fp32'})":
            (True, lambda: joint_unit(parts, batch, joint_cfg)),
    }
    if bf16:  # without bf16 matmuls a bf16 reference would be far slower, not a choice worth timing
        units["joint, fp32 reference forward"] = (
            True, lambda: joint_unit(parts, batch, dataclasses.replace(joint_cfg, ref_bf16=False)))
    units["joint, no KL reference forward"] = (
        True, lambda: joint_unit(parts, batch, dataclasses.replace(joint_cfg, kl_coef=0.0)))
    units["plain, every prompt forwarded per rollout"] = (False, lambda: plain_step(parts, batch, shared_prompt=False))
    units["joint, every prompt forwarded per rollout"] = (
        False, lambda: joint_unit(parts, batch, dataclasses.replace(joint_cfg, shared_prompt=False)))
    return {name: (shared, _zeroing(parts.reflective, unit)) for name, (shared, unit) in units.items()}


def _zeroing(model: torch.nn.Module, unit: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return unit()

    return call


def measure(parts: TrainParts, batch: RolloutBatch, repeats: int) -> list[ThroughputRow]:
    """Median wall seconds of each unit over `repeats` rounds (after one untimed warm-up round)."""
    parts.reflective.train()
    units = step_units(parts, batch)
    times: dict[str, list[float]] = {name: [] for name in units}
    for round_index in range(repeats + 1):
        for name, (_, unit) in units.items():
            seconds = timed(unit).wall_s
            if round_index > 0:
                times[name].append(seconds)
    tokens = int(batch.attention_mask.sum())
    return [ThroughputRow(name, statistics.median(times[name]), tokens, shared) for name, (shared, _) in units.items()]


def markdown_table(rows: Sequence[ThroughputRow]) -> str:
    """Each row against the first (plain) row of its kind of prompt forwarding: equal work."""
    bases: dict[bool, ThroughputRow] = {}
    lines = [
        "| step | prompts forwarded | s / step | tokens | tokens/s | vs plain, same prompts | target >= 0.8 |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = bases.setdefault(r.shared_prompt, r)
        ratio = r.tokens_per_s / base.tokens_per_s
        verdict = "-" if r is base else ("met" if ratio >= TARGET else "not met")
        forwarded = "once per group" if r.shared_prompt else "once per rollout"
        lines.append(f"| {r.name} | {forwarded} | {r.seconds:.3f} | {r.tokens} | {r.tokens_per_s:.0f} | {ratio:.2f} "
                     f"| {verdict} |")
    return "\n".join(lines)


def run(checkpoint: Path, prompts: int, group: int, repeats: int, seed: int) -> str:
    parts = load_train_parts(checkpoint)
    batch = rollout_batch(parts, prompts, group, seed)
    rows = measure(parts, batch, repeats)
    rows_, width = batch.input_ids.shape
    return "\n".join([
        f"policy: {parts.source}; batch {prompts} prompts x {group} rollouts = {rows_} rows x {width} columns "
        f"({int(batch.attention_mask.sum())} non-pad tokens, {int(batch.step_rows.numel())} scored steps); "
        f"torch threads {torch.get_num_threads()}; median of {repeats}",
        markdown_table(rows),
    ])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_train_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(ap)
    ap.add_argument("--prompts", type=positive_int, default=8, help="P, prompts per step (train.yaml: 8)")
    ap.add_argument("--group", type=positive_int, default=8, help="G, rollouts per prompt (train.yaml: 8)")
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 on a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.checkpoint, args.prompts, args.group, args.repeats, args.seed))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
