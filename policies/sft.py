"""Supervised fine-tuning (SFT) of a causal LM on (prompt, completion) pairs, resumable.

Cross-entropy on completion tokens only (prompt tokens and padding are masked), completions end
with <eos>. Batches are right-padded and length-bucketed (examples of similar length share a
batch, so little compute goes to padding); with right padding and a causal mask, pads never
influence real tokens, so no attention mask is passed and SDPA takes its fast causal path.
AdamW with linear warmup then cosine decay, gradient clipping, bf16 autocast where the CPU has
bf16 matmuls (`SFTConfig.bf16`, `policies.bf16_support`; DESIGN.md: about 1.8x faster than float32
at hidden 256 there, ~56x slower on a CPU without them).

The budget is wall-clock (`max_minutes`), steps (`max_steps`), or both (whichever ends first);
the learning-rate schedule follows the fraction of the budget used, so a time-budgeted run always
finishes its decay in time however busy the CPU is.

Writes out_dir/last (the latest checkpoint, what a rerun on the same out_dir resumes from),
out_dir/final (the trained model, which train_sft returns) and out_dir/sft_summary.json; the
layout, the resume rules (which settings a resume may change, damaged folders, Ctrl-C) and their
machinery are in `policies.sft_resume`.

The data order is a pure function of (seed, step), so training 2K steps straight and training K
steps, stopping, then resuming for K more give bit-identical weights. Run it through
`python -m experiments.train_sft`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from policies.bf16_support import native_bf16
from policies.checkpoint import DamagedCheckpointError, load_optimizer_state, save_checkpoint
from policies.sft_resume import (
    BUDGET_KEYS, FINAL, LAST, STATE_FILE, SUMMARY_FILE, SFTError, TrainerProgress, TrainingInterrupted,
    check_resumable, load_training_checkpoint, resume_point, run_identity, save_training_checkpoint, saved_identity,
    set_rng_states, start_over_hint,
)
from policies.step_boundary import StopRequest, stop_at_step_boundary

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters and budget of one SFT run.

    max_minutes: wall-clock training budget (None = no time limit); max_steps: optimizer steps
        (None = no step limit); at least one must be set; training stops at whichever ends first.
    batch_size: sequences per optimizer step. lr: peak learning rate; min_lr_ratio: final lr as a
        fraction of lr. warmup_steps: linear warmup length. weight_decay: AdamW decay on matrices.
    betas: AdamW betas. grad_clip: max global gradient norm (0 = off).
    bf16: bf16 autocast of forward/backward (weights and optimizer stay float32); default: where
        the CPU has bf16 matmuls (`policies.bf16_support`: without them bf16 is ~56x slower).
    checkpoint_every: steps between periodic checkpoints into out_dir/last (0 = only at the end).
    bucket_batches: batches whose examples are sorted by length together (1 = no bucketing).
    max_length: examples longer than this many tokens are truncated.
    seed: data order (and anything random in training).
    eval_every: steps between held-out loss evaluations (0 = off); eval_max_examples: held-out
        examples used per evaluation.
    num_threads: torch intra-op threads (None = all cores).
    """

    max_minutes: float | None = 8.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = field(default_factory=native_bf16)
    checkpoint_every: int = 500
    bucket_batches: int = 16
    max_length: int = 256
    seed: int = 0
    eval_every: int = 0
    eval_max_examples: int = 256
    num_threads: int | None = None

    def __post_init__(self) -> None:
        """SFTError (a ValueError) naming the first bad value; nan fails every check."""
        if self.max_minutes is None and self.max_steps is None:
            raise SFTError("SFTConfig: max_minutes=None and max_steps=None; set at least one budget")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise SFTError(f"SFTConfig.max_minutes={self.max_minutes}; must be > 0 and finite")
        if self.max_steps is not None and self.max_steps < 1:
            raise SFTError(f"SFTConfig.max_steps={self.max_steps}; must be >= 1")
        for name in ("batch_size", "bucket_batches", "max_length", "eval_max_examples"):
            if getattr(self, name) < 1:
                raise SFTError(f"SFTConfig.{name}={getattr(self, name)}; must be >= 1")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise SFTError(f"SFTConfig.{name}={getattr(self, name)}; must be >= 0")
        if not 0 < self.lr < math.inf:
            raise SFTError(f"SFTConfig.lr={self.lr}; must be > 0 and finite")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SFTError(f"SFTConfig.min_lr_ratio={self.min_lr_ratio}; must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SFTError(f"SFTConfig.betas={self.betas}; must be two values in [0, 1)")
        if self.num_threads is not None and self.num_threads < 1:
            raise SFTError(f"SFTConfig.num_threads={self.num_threads}; must be >= 1")


# ---------------------------------------------------------------------------------------------
# Data: tokenised examples and a deterministic batch order


@dataclass(frozen=True)
class TokenizedExample:
    """input_ids = <bos> prompt completion <eos>; the first prompt_len ids carry no loss."""

    input_ids: tuple[int, ...]
    prompt_len: int


def tokenize_examples(
    examples: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[TokenizedExample]:
    """Prompt with <bos> (add_special_tokens), completion without, then <eos>; truncated."""
    if not examples:
        raise SFTError("no training examples")
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=True)["input_ids"]
    completions = tokenizer([c for _, c in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = (list(prompt) + list(completion) + [eos])[:max_length]
        out.append(TokenizedExample(tuple(ids), min(len(prompt), len(ids))))
    return out


def epoch_batches(lengths: Sequence[int], batch_size: int, bucket_batches: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every full batch of one epoch, a pure function of (seed, epoch).

    Shuffle, cut into chunks of bucket_batches * batch_size, sort each chunk by length, cut it
    into batches, and shuffle the batches, so each batch holds examples of similar length.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # torch's own wrap, without its overflow
    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order) - batch_size + 1, chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


class BatchSchedule:
    """Maps an optimizer step to its batch of example indices (epochs computed lazily)."""

    def __init__(self, lengths: Sequence[int], cfg: SFTConfig) -> None:
        if len(lengths) < cfg.batch_size:
            raise SFTError(f"{len(lengths)} examples < SFTConfig.batch_size={cfg.batch_size}")
        self.lengths, self.cfg = list(lengths), cfg
        self._epoch, self._batches = -1, []

    def batch(self, step: int) -> list[int]:
        per_epoch = len(self.lengths) // self.cfg.batch_size  # at least one full batch
        epoch, index = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.bucket_batches, self.cfg.seed, epoch)
            self._epoch = epoch
        return self._batches[index % len(self._batches)]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], labels [B, L]) right-padded; labels are IGNORE_INDEX on prompt and pad."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, e.prompt_len : len(ids)] = ids[e.prompt_len :]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# Loss, optimizer, schedule


def completion_loss(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over labelled positions, number of labelled positions).

    No attention mask: padding is on the right, so under the causal mask no real token sees a pad.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids).logits  # [B, L, V]
    targets = labels[:, 1:]  # [B, L-1]: position t predicts token t+1
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return loss, count


def make_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False, foreach=True)


def budget_fraction(step: int, elapsed_s: float, cfg: SFTConfig) -> float:
    """How much of the budget is used: the larger of the step and the time fractions."""
    fractions = []
    if cfg.max_steps is not None:
        fractions.append(step / cfg.max_steps)
    if cfg.max_minutes is not None:
        fractions.append(elapsed_s / (60.0 * cfg.max_minutes))
    return max(fractions)


def learning_rate(step: int, fraction: float, cfg: SFTConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr_ratio * lr over the budget."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# ---------------------------------------------------------------------------------------------
# Training loop


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, examples: Sequence[TokenizedExample], pad_id: int, cfg: SFTConfig) -> float:
    """Mean completion-token loss on held-out examples (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), cfg.batch_size):
        input_ids, labels = collate(examples[start : start + cfg.batch_size], pad_id)
        loss, n = completion_loss(model, input_ids, labels, cfg.bf16)
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def _default_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from policies.tiny_model import TinyModelConfig, build_model
    from policies.tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    return build_model(TinyModelConfig(), tokenizer), tokenizer


def train_sft(
    cfg: SFTConfig,
    train_examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    eval_examples: Sequence[tuple[str, str]] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> Path:
    """Train (or resume training) and return out_dir/final, the trained model directory.

    If out_dir/last holds a trainer state, training continues where it stopped (printing
    "resuming from out_dir/last at step K") with the model and tokenizer loaded from it; the
    arguments then only serve the identity check (module docstring): the same training pairs,
    config (up to RESUMABLE_KEYS), run_info, and where passed the same starting model and
    tokenizer, or an SFTError. Otherwise model and tokenizer are used as given (both None: the
    default tiny model and tokenizer). run_info: JSON-able facts the arguments do not show (the
    CLI: task, train_problems). Ctrl-C or SIGTERM: TrainingInterrupted after saving out_dir/last.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    try:
        return _train_sft(cfg, train_examples, Path(out_dir), model, tokenizer, progress, eval_examples, run_info)
    finally:
        torch.set_num_threads(threads_before)


@dataclass(frozen=True)
class _Start:
    """Where training starts: the model, tokenizer, identity to save, and saved state (None: fresh)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: dict
    state: dict | None
    changed: tuple[str, ...] = ()


def _start(
    cfg: SFTConfig, train_examples: Sequence[tuple[str, str]], out_dir: Path, model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None, run_info: Mapping[str, Any] | None,
) -> _Start:
    """Resume from out_dir/last after checking the run's identity, or start fresh."""
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    last = resume_point(out_dir)
    if last is None:
        if model is None or tokenizer is None:
            model, tokenizer = _default_model_and_tokenizer()
        return _Start(model, tokenizer, run_identity(cfg, train_examples, model, tokenizer, run_info), None)
    saved_model, saved_tokenizer, state = load_training_checkpoint(last)
    saved = saved_identity(state)
    current = run_identity(cfg, train_examples, model, tokenizer, run_info)
    changed = check_resumable(last, saved, current)
    print(f"resuming from {last} at step {state['step']}")
    if changed:
        budget = any(line.split(":")[0] in BUDGET_KEYS for line in changed)
        print(f"changed on resume: {'; '.join(changed)}" + ("; the learning rate follows the new budget from here" if budget else ""))
    if spent(cfg, state["step"], state["elapsed_s"]) and changed:
        print(f"the budget is spent at step {state['step']} ({state['elapsed_s'] / 60:.1f} min): nothing to train; "
              "raise max_steps / max_minutes to train the run longer")
    return _Start(saved_model, saved_tokenizer, {**saved, **current}, state, tuple(changed))


def spent(cfg: SFTConfig, step: int, elapsed_s: float) -> bool:
    """Whether a run at this step and time has used up cfg's budget (no step would run)."""
    return (cfg.max_steps is not None and step >= cfg.max_steps) or (
        cfg.max_minutes is not None and elapsed_s >= 60 * cfg.max_minutes)


def _train_sft(
    cfg: SFTConfig, train_examples: Sequence[tuple[str, str]], out_dir: Path, model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None, progress: bool, eval_examples: Sequence[tuple[str, str]] | None,
    run_info: Mapping[str, Any] | None,
) -> Path:
    start = _start(cfg, train_examples, out_dir, model, tokenizer, run_info)
    model, tokenizer, state = start.model, start.tokenizer, start.state
    data = tokenize_examples(train_examples, tokenizer, cfg.max_length)
    held_out = tokenize_examples(eval_examples[: cfg.eval_max_examples], tokenizer, cfg.max_length) if eval_examples else []
    schedule = BatchSchedule([len(e.input_ids) for e in data], cfg)
    optimizer = make_optimizer(model, cfg)
    run = TrainerProgress(history=[], resumes=[])
    if state is not None:
        try:
            load_optimizer_state(optimizer, state["optimizer"], out_dir / LAST / STATE_FILE)
        except DamagedCheckpointError as err:
            raise SFTError(f"cannot resume: {err}; {start_over_hint(out_dir)}") from err
        resumes = list(state.get("resumes") or []) + [{"step": state["step"], "changed": list(start.changed)}]
        run = TrainerProgress(state["step"], state["elapsed_s"], state["tokens"], state["history"], resumes)
        set_rng_states(state["rng"])

    last = out_dir / LAST
    with stop_at_step_boundary() as stop:
        _train_loop(model, tokenizer, optimizer, data, held_out, schedule, run, cfg, out_dir, progress, start.identity, stop)
        if stop.requested:
            save_training_checkpoint(last, model, tokenizer, optimizer, run, cfg, start.identity)
            raise TrainingInterrupted(run.step, last, terminated=stop.terminated)
    save_training_checkpoint(last, model, tokenizer, optimizer, run, cfg, start.identity)
    write_summary(out_dir / SUMMARY_FILE, run, cfg, len(data), start.identity.get("run"))
    model.eval()
    return save_checkpoint(model, tokenizer, out_dir / FINAL)


def write_summary(
    path: Path, run: TrainerProgress, cfg: SFTConfig, num_examples: int, run_info: Mapping[str, Any] | None = None
) -> dict:
    """A JSON summary of the run (config: the latest one, run: the caller's run_info such as the
    task and its settings, steps, time, throughput, loss, the resumes with what each changed,
    per-step history)."""
    summary = {
        "config": asdict(cfg),
        "run": dict(run_info or {}),
        "num_examples": num_examples,
        "steps": run.step,
        "elapsed_s": run.elapsed_s,
        "tokens": run.tokens,
        "tokens_per_s": run.tokens / run.elapsed_s if run.elapsed_s > 0 else 0.0,
        "final_loss": recent_loss(run.history),
        "resumes": run.resumes or [],
        "history": run.history,
    }
    path.write_text(json.dumps(summary, indent=1))
    return summary


def train_step(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
    labels: torch.Tensor, lr: float, cfg: SFTConfig,
) -> float:
    """One optimizer step on one batch ([B, L] each); returns the batch loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, _ = completion_loss(model, input_ids, labels, cfg.bf16)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach().item()


def _train_loop(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
    data: list[TokenizedExample], held_out: list[TokenizedExample], schedule: BatchSchedule,
    run: TrainerProgress, cfg: SFTConfig, out_dir: Path, progress: bool, identity: Mapping[str, Any],
    stop: StopRequest,
) -> None:
    """Optimizer steps until the budget is used or a stop is requested, checkpointing every
    cfg.checkpoint_every steps. run.elapsed_s counts everything in the loop (checkpoints and
    evaluations included)."""
    model.train()
    timed = cfg.max_steps is None
    bar = tqdm(
        total=int(60 * cfg.max_minutes) if timed else cfg.max_steps,
        initial=int(run.elapsed_s) if timed else run.step,
        unit="s" if timed else "step", disable=not progress, dynamic_ncols=True, desc="sft",
    )
    pad_id = tokenizer.pad_token_id
    while budget_fraction(run.step, run.elapsed_s, cfg) < 1.0 and not stop.requested:
        t0 = time.perf_counter()
        lr = learning_rate(run.step, budget_fraction(run.step, run.elapsed_s, cfg), cfg)
        input_ids, labels = collate([data[i] for i in schedule.batch(run.step)], pad_id)  # [B, L]
        loss = train_step(model, optimizer, input_ids, labels, lr, cfg)
        tokens = int((input_ids != pad_id).sum())
        run.step, run.tokens = run.step + 1, run.tokens + tokens
        record = {"step": run.step, "loss": loss, "lr": lr, "tokens": tokens, "step_s": time.perf_counter() - t0}
        if held_out and cfg.eval_every and run.step % cfg.eval_every == 0:
            record["eval_loss"] = evaluate_loss(model, held_out, pad_id, cfg)
        run.elapsed_s += time.perf_counter() - t0
        record["elapsed_s"] = run.elapsed_s
        run.history.append(record)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            t1 = time.perf_counter()
            save_training_checkpoint(out_dir / LAST, model, tokenizer, optimizer, run, cfg, identity)
            run.elapsed_s += time.perf_counter() - t1
        if progress:
            bar.set_postfix(loss=f"{recent_loss(run.history, 20):.3f}", tok_s=f"{tokens_per_second(run.history):.0f}",
                            step=run.step, lr=f"{lr:.1e}", refresh=False)
            bar.update(min(int(run.elapsed_s), bar.total) - bar.n if timed else 1)
    bar.close()


def tokens_per_second(history: Sequence[dict], window: int = 50) -> float:
    """Training throughput (real tokens per second of step time) over the last `window` steps."""
    tail = history[-window:]
    seconds = sum(h["step_s"] for h in tail)
    return sum(h["tokens"] for h in tail) / seconds if seconds > 0 else 0.0


def recent_loss(history: Sequence[dict], window: int = 50) -> float:
    """Mean training loss over the last `window` steps (nan if none)."""
    tail = [h["loss"] for h in history[-window:]]
    return sum(tail) / len(tail) if tail else float("nan")
