"""Benchmark: how close generation and a training step come to the machine's limit, as achieved
FLOP/s against a matmul peak measured with torch in the same run (same threads, same process).

Rows:
  matmul fp32 / bf16     the peak: a square S x S matmul (2 S^3 FLOPs), the best of --repeats;
  generation             Best-of-N sampling (`TransformersPolicy.rollout`, N per problem, arith
                         test problems): 2 x params x tokens forwarded (prefill + fed-back tokens,
                         `Step.tokens_forwarded`) per second of the call (the best of --repeats), attention over the
                         keys the forwards that ran attended (`KeyCounter`);
  bare forward           one no-grad forward over B x L prompt-like tokens (no sampling, no
                         cache bookkeeping): what this model shape allows at best;
  training step          the joint GRPO + SPR step (`experiments.bench_train_throughput`, P x G
                         rollouts): 6 x params x non-pad tokens per second of forward + backward
                         (the KL reference forward is real work too but, as in the usual MFU
                         convention, not counted); the policy's forward runs every rollout's
                         prompt (shared_prompt off), so every counted token is really forwarded.
The "+ attention" column adds the attention score and value products (4 x layers x width x
attended keys per token, x3 for a training step) that 2/6 x params leaves out. params counts
every LM weight: the embedding matrix is the (tied) output layer's.

    python -m experiments.bench_flops                         # 16 problems x N=32, 8 x 8 rollouts
    python -m experiments.bench_flops --problems 2 --n 2 --prompts 2 --group 2 --matmul-size 256
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.bench_workload import add_checkpoint_argument  # noqa: E402
from experiments.broken_pipe import stdout_closed_quietly  # noqa: E402
from experiments.cli_args import positive_int  # noqa: E402
from experiments.bench_timing import best_of  # noqa: E402
from experiments.bench_train_throughput import (  # noqa: E402
    TrainParts, joint_unit, load_train_parts, rollout_batch,
)
from experiments.tasks import arith  # noqa: E402
from policies.joint_step import JointLossConfig  # noqa: E402
from policies.sampling_config import SamplingConfig  # noqa: E402
from policies.transformers_policy import TransformersPolicy  # noqa: E402
from treesearch.records import Prefix  # noqa: E402


@dataclass(frozen=True)
class FlopRow:
    """One workload: seconds, tokens (0 for a matmul), model FLOPs (2PT / 6PT / 2S^3) and the
    attention FLOPs on top (0 for a matmul)."""

    name: str
    seconds: float
    tokens: int
    flops: float
    attention_flops: float = 0.0

    @property
    def rate(self) -> float:
        return self.flops / self.seconds

    @property
    def rate_with_attention(self) -> float:
        return (self.flops + self.attention_flops) / self.seconds


def matmul_peak(size: int, dtype: torch.dtype, repeats: int) -> FlopRow:
    """The best of `repeats` S x S matmuls (after one warm-up) in dtype."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    seconds = best_of(lambda: torch.mm(a, b), repeats)
    return FlopRow(f"matmul {size}x{size} {str(dtype).removeprefix('torch.')} (peak)", seconds, 0, 2 * size**3)


def attention_width(config: Any) -> tuple[int, int]:
    """(layers, heads x head_dim) of a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_hidden_layers), int(config.num_attention_heads * head_dim)


def causal_keys(start: int, count: int) -> int:
    """Keys attended by `count` tokens at positions start .. start+count-1 (token at p sees p+1)."""
    return count * (start + 1) + count * (count - 1) // 2


class KeyCounter:
    """A forward pre-hook that counts the keys each forwarded token attends: a real (unmasked) new
    token at position p sees p + 1 (its prefix's keys and its own). Counted on the forwards that
    ran, so a forward that forked decoding shares among a context's samples counts once (a
    per-sample estimate counted it once per sample: 5.7x the keys at 16 problems x N = 32)."""

    def __init__(self) -> None:
        self.keys = 0

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]  # [B, L] the new tokens
        positions = kwargs.get("position_ids")
        if positions is None:  # no cache: the tokens start at 0
            positions = torch.arange(ids.shape[1]).expand_as(ids)
        mask = kwargs.get("attention_mask")
        real = mask[:, -ids.shape[1]:].bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        self.keys += int(((positions.to(real.device) + 1) * real).sum())


def generation(parts: TrainParts, problems: int, n: int, seed: int, repeats: int) -> FlopRow:
    """Best-of-N rollouts at the arith sampling settings, the best of `repeats` calls after one
    warm-up call (as the other rows: one seed, so every call draws the same paths; no prefix
    cache, so none reuses another's work); FLOPs of the tokens actually forwarded, attention
    over the keys those forwards attended (`KeyCounter`, on the warm-up call)."""
    lm = parts.reflective.lm.eval()
    sampling = SamplingConfig(temperature=arith.DEFAULT_TEMPERATURE, max_total_tokens=160)
    policy = TransformersPolicy(lm, parts.tokenizer, sampling, arith.prompt_text)
    prefixes = [Prefix(p) for p in arith.generate_problems("test", problems, seed=seed)]
    counter = KeyCounter()
    hook = lm.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        paths = policy.rollout(prefixes, n=n, seed=seed)
    finally:
        hook.remove()
    seconds = best_of(lambda: policy.rollout(prefixes, n=n, seed=seed), repeats)
    forwarded = sum(s.tokens_forwarded for row in paths for steps in row for s in steps)
    keys = counter.keys
    layers, width = attention_width(lm.config)
    params = sum(p.numel() for p in lm.parameters())
    return FlopRow(f"generation (Best-of-{n}, {problems} problems)", seconds, forwarded,
                   2 * params * forwarded, 4 * layers * width * keys)


@torch.inference_mode()
def bare_forward(lm: Any, rows: int, length: int, repeats: int) -> FlopRow:
    """The best of `repeats` forwards over a [rows, length] batch of token ids, no cache."""
    ids = torch.randint(3, int(lm.config.vocab_size), (rows, length))
    lm.eval()
    lm(input_ids=ids, use_cache=False)
    seconds = best_of(lambda: lm(input_ids=ids, use_cache=False), repeats)
    layers, width = attention_width(lm.config)
    params = sum(p.numel() for p in lm.parameters())
    tokens = rows * length
    return FlopRow(f"bare forward ({rows} x {length} tokens)", seconds, tokens, 2 * params * tokens,
                   4 * layers * width * rows * causal_keys(0, length))


def training_step(parts: TrainParts, prompts: int, group: int, seed: int, repeats: int) -> FlopRow:
    """The joint step (forward + backward) over P x G rollouts: 6 x params x non-pad tokens."""
    batch = rollout_batch(parts, prompts, group, seed)
    parts.reflective.train()
    cfg = JointLossConfig(shared_prompt=False)  # every counted token forwarded (not each prompt once per group)

    def unit() -> None:
        parts.reflective.zero_grad(set_to_none=True)
        joint_unit(parts, batch, cfg)

    unit()  # warm-up
    seconds = best_of(unit, repeats)
    lengths = batch.attention_mask.sum(-1).tolist()
    tokens = int(sum(lengths))
    layers, width = attention_width(parts.reflective.config)
    params = sum(p.numel() for p in parts.reflective.lm.parameters())
    keys = sum(causal_keys(0, int(n)) for n in lengths)
    return FlopRow(f"training step (joint GRPO + SPR, {prompts} x {group} rollouts)", seconds, tokens,
                   6 * params * tokens, 3 * 4 * layers * width * keys)


def markdown_table(rows: Sequence[FlopRow], peak32: FlopRow, peak16: FlopRow) -> str:
    lines = [
        "| workload | s | tokens | GFLOP | GFLOP/s | of fp32 peak | of bf16 peak | + attention GFLOP/s "
        "| of fp32 peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.seconds:.3f} | {r.tokens or '-'} | {r.flops / 1e9:.2f} | {r.rate / 1e9:.2f} | "
            f"{r.rate / peak32.rate:.1%} | {r.rate / peak16.rate:.1%} | {r.rate_with_attention / 1e9:.2f} | "
            f"{r.rate_with_attention / peak32.rate:.1%} |"
        )
    return "\n".join(lines)


def run(
    checkpoint: Path, problems: int, n: int, prompts: int, group: int, matmul_size: int,
    forward_rows: int, forward_length: int, repeats: int, seed: int,
) -> str:
    parts = load_train_parts(checkpoint)
    peak32 = matmul_peak(matmul_size, torch.float32, repeats)
    peak16 = matmul_peak(matmul_size, torch.bfloat16, repeats)
    rows = [
        peak32, peak16,
        generation(parts, problems, n, seed, repeats),
        bare_forward(parts.reflective.lm, forward_rows, forward_length, repeats),
        training_step(parts, prompts, group, seed, repeats),
    ]
    params = sum(p.numel() for p in parts.reflective.lm.parameters())
    return "\n".join([
        f"policy: {parts.source} ({params / 1e6:.2f}M parameters, fp32); torch threads {torch.get_num_threads()}; "
        f"every row: best of {repeats}",
        markdown_table(rows, peak32, peak16),
    ])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(ap)
    ap.add_argument("--problems", type=positive_int, default=16, help="generation: arith test problems")
    ap.add_argument("--n", type=positive_int, default=32, help="generation: samples per problem")
    ap.add_argument("--prompts", type=positive_int, default=8, help="training step: prompts (train.yaml: 8)")
    ap.add_argument("--group", type=positive_int, default=8, help="training step: rollouts per prompt (train.yaml: 8)")
    ap.add_argument("--matmul-size", type=positive_int, default=1024)
    ap.add_argument("--forward-rows", type=positive_int, default=256)
    ap.add_argument("--forward-length", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 on a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.checkpoint, args.problems, args.n, args.prompts, args.group, args.matmul_size,
              args.forward_rows, args.forward_length, args.repeats, args.seed))


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        main()
