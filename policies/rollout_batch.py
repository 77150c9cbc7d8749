"""Rollouts as training tensors for the joint GRPO + SPR step (`policies.joint_step`).

A `Rollout` is one sampled completion with the exact token ids the model saw; a `RolloutSource`
makes them (the small protocol the trainer consumes: `TransformersRolloutSource` here, a vLLM
source can plug in with the same `rollouts` method). `collate_rollouts` lays P x G rollouts out as
right-padded tensors, prompt-major (rows p*G .. p*G+G-1 share prompt p).

Usage:
    source = TransformersRolloutSource(TransformersPolicy.from_reflective(model, tok, sampling, prompt_text))
    groups = source.rollouts(problems, n=8, seed=0)                    # [P][G] Rollout
    flat = [r for group in groups for r in group]
    rewards = [outcome_reward(grade(p, r.text), r, answer_written(r.text, extract_answer(r.text)))
               for p, group in zip(problems, groups) for r in group]
    markers = StepMarkers.from_tokenizer(tok, len(tok))
    batch = collate_rollouts(flat, rewards, group_size=8, markers=markers, pad_id=tok.pad_token_id)
    batch.input_ids  # [B, L]; batch.completion_mask [B, L-1]; batch.step_rows/step_cols [N]

Alignment: per-token tensors of width L-1 are indexed by TARGET position: column t holds the
token input_ids[:, t+1], predicted by the logits at position t (`logits[:, :-1]`). The head reads
`features[step_rows, step_cols]`, the state of the token just before each scored separator
(`scorers.sprm_positions.score_positions`, completion only, think-aware).

Tests: `.venv/bin/pytest tests/test_joint_step.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from scorers.sprm_positions import StepMarkers, score_positions
from treesearch.aggregation import geometric_mean
from treesearch.records import Prefix, Problem


# The reference's reward of a rollout that wrote a wrong final answer and was cut at the token
# limit (MetaStone-S1's math_v2.compute_score: 0.1 with no EOS, 0 with one); a mark, read as 0 by
# GRPO (`policies.joint_step.grpo_rewards`)
TRUNCATED_WRONG_REWARD = 0.1


def answer_written(text: str, extracted: str | None, think_close: str = "</think>") -> bool:
    """Whether a completion began its final answer, the reference's reading for its reward 0.1
    (math_v2.extract_solution: any non-blank text after the last </think>, so a trace cut inside
    "</think>Answer: " counts); a completion without think_close (a task without a think span,
    which the reference never rewards 0.1): whether the task's extract_answer found one
    (`extracted`). think_close: the policy's tag (`SamplingConfig.think_close`)."""
    if think_close in text:
        return text.rsplit(think_close, 1)[1].strip() != ""
    return extracted is not None


def outcome_reward(correct: bool, rollout: "Rollout", answered: bool,
                   truncated_wrong_reward: float = TRUNCATED_WRONG_REWARD) -> float:
    """A rollout's outcome reward: 1 correct; truncated_wrong_reward when it wrote a final answer
    (answered: `answer_written`), a wrong one, and was cut at the token limit
    (finish "length"); else 0 (`policies.joint_step.JointLossConfig.truncated_wrong_reward`)."""
    if correct:
        return 1.0
    return truncated_wrong_reward if answered and rollout.finish == "length" else 0.0


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of a problem's prompt.

    problem_id: the problem it answers.
    prompt_ids: the model input before the completion, special tokens included, exactly as fed.
    completion_ids: the generated tokens (the EOS token included when the sequence ended on it).
    completion_logprobs: log-probability of each generated token under the policy at temperature
        1, without a repetition penalty (vLLM's raw log-probs; same length as completion_ids).
    text: the decoded completion without EOS: what the grader reads.
    finish: "eos" or "length" (the sequence was cut at the token limit).
    path_score: the SPRM path score the source attached while generating (geometric mean of the
        step scores, the reference's value; 1e-10 rather than 0 for a rollout with no scored step,
        the clamp), None when the source has no head.
    """

    problem_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    completion_logprobs: tuple[float, ...]
    text: str
    finish: str
    path_score: float | None = None

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.completion_logprobs):
            raise ValueError(
                f"Rollout of {self.problem_id!r}: {len(self.completion_ids)} completion_ids but "
                f"{len(self.completion_logprobs)} completion_logprobs"
            )
        if not self.prompt_ids:
            raise ValueError(f"Rollout of {self.problem_id!r}: empty prompt_ids")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class RolloutSource(Protocol):
    """Where the trainer's rollouts come from (owned here, by the consumer)."""

    def rollouts(self, problems: Sequence[Problem], n: int, seed: int) -> list[list[Rollout]]:
        """n sampled completions per problem, result[i][j] for problems[i]; same seed, same samples."""
        ...


class TransformersRolloutSource:
    """A `RolloutSource` over `policies.transformers_policy.TransformersPolicy` (in-process).
    With a step head (`from_reflective`) each rollout carries its path score at no extra forward."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def rollouts(self, problems: Sequence[Problem], n: int, seed: int) -> list[list[Rollout]]:
        paths = self.policy.rollout([Prefix(p) for p in problems], n, seed)  # [P][n] list of Step
        prompts = [self.policy.prompt_fn(p) for p in problems]
        # the same call TransformersPolicy makes for its contexts, so these are the ids it fed
        prompt_ids = self.policy.tokenizer(prompts, add_special_tokens=True).input_ids if prompts else []
        return [
            [_rollout(problem.id, ids, steps) for steps in row]
            for problem, ids, row in zip(problems, prompt_ids, paths)
        ]


def _rollout(problem_id: str, prompt_ids: Sequence[int], steps: Sequence[Any]) -> Rollout:
    scores = [s.score for s in steps]
    path_score = None if not steps or any(s is None for s in scores) else geometric_mean(scores)
    return Rollout(
        problem_id=problem_id,
        prompt_ids=tuple(int(t) for t in prompt_ids),
        completion_ids=tuple(t for s in steps for t in s.token_ids),
        completion_logprobs=tuple(x for s in steps for x in s.token_logprobs),
        text="".join(s.text for s in steps),
        finish=steps[-1].finish if steps else "length",
        path_score=path_score,
    )


@dataclass(frozen=True)
class RolloutBatch:
    """B = P*G rollouts as tensors, prompt-major; L = longest prompt + completion; N = scored steps.

    input_ids: [B, L] long, right-padded with the pad id.
    attention_mask: [B, L] long, 1 on real tokens.
    completion_mask: [B, L-1] float, 1 where the target token input_ids[:, t+1] is a completion token.
    old_logprobs: [B, L-1] float32, the rollout's log-probs at completion targets (0 elsewhere),
        or None: the trainer takes them from its own forward (`policies.joint_step`).
    step_rows, step_cols: [N] long, where the head reads (row, position into input_ids).
    rewards: [B] float32, the outcome reward of each rollout (`outcome_reward`: 1 correct, 0 not,
        the small truncated-wrong reward for a wrong answer cut at the token limit).
    group_size: G, rollouts per prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    step_rows: torch.Tensor
    step_cols: torch.Tensor
    rewards: torch.Tensor
    group_size: int

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_groups(self) -> int:
        return self.num_rows // self.group_size

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch with every tensor on device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RolloutBatch(
            move(self.input_ids), move(self.attention_mask), move(self.completion_mask), move(self.old_logprobs),
            move(self.step_rows), move(self.step_cols), move(self.rewards), self.group_size,
        )

    def groups(self, start: int, stop: int) -> "RolloutBatch":
        """The rollouts of prompts [start, stop) (whole groups, so advantages stay the same)."""
        lo, hi = start * self.group_size, stop * self.group_size
        keep = (self.step_rows >= lo) & (self.step_rows < hi)  # [N]
        return RolloutBatch(
            self.input_ids[lo:hi], self.attention_mask[lo:hi], self.completion_mask[lo:hi],
            None if self.old_logprobs is None else self.old_logprobs[lo:hi],
            self.step_rows[keep] - lo, self.step_cols[keep], self.rewards[lo:hi], self.group_size,
        )


def collate_rollouts(
    rollouts: Sequence[Rollout],
    rewards: Sequence[float],
    group_size: int,
    markers: StepMarkers,
    pad_id: int,
    with_old_logprobs: bool = False,
) -> RolloutBatch:
    """Pad rollouts (prompt-major, group_size per prompt) into a `RolloutBatch`. with_old_logprobs
    keeps the rollout's own log-probs (temperature 1) as old_logprobs, else None."""
    if len(rollouts) != len(rewards):
        raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards")
    if group_size < 1 or not rollouts or len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts do not split into groups of group_size={group_size}")
    width = max(r.num_tokens for r in rollouts)
    input_ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(rollouts), width), dtype=torch.long)  # [B, L]
    completion_mask = torch.zeros((len(rollouts), width - 1), dtype=torch.float32)  # [B, L-1]
    old_logprobs = torch.zeros((len(rollouts), width - 1), dtype=torch.float32)  # [B, L-1]
    rows: list[int] = []
    cols: list[int] = []
    for b, r in enumerate(rollouts):
        ids = list(r.prompt_ids) + list(r.completion_ids)
        start, end = len(r.prompt_ids), len(ids)
        input_ids[b, :end] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :end] = 1
        completion_mask[b, start - 1 : end - 1] = 1  # targets start .. end-1 sit at columns start-1 ..
        old_logprobs[b, start - 1 : end - 1] = torch.tensor(r.completion_logprobs, dtype=torch.float32)
        positions = score_positions(ids, markers, start=start)
        rows += [b] * len(positions)
        cols += positions
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs if with_old_logprobs else None,
        step_rows=torch.tensor(rows, dtype=torch.long),
        step_cols=torch.tensor(cols, dtype=torch.long),
        rewards=torch.tensor([float(x) for x in rewards], dtype=torch.float32),
        group_size=group_size,
    )
