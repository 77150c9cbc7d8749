"""A rollout cache: graded rollouts of a frozen policy with its hidden states at the SPRM
positions, saved once so that heads can be trained and compared in seconds (issue 3 item 6).

Usage:
    python -m experiments.rollout_cache --policy outputs/checkpoints/tiny-countdown/final \\
        --task countdown --split train --problems 512 --n 8 --out outputs/heads/countdown_train.pt
    python -m experiments.rollout_cache ... --device cuda   # rollouts and features on a GPU (cuda:N)
    cache = build_rollout_cache("outputs/checkpoints/tiny-arith/final", "arith", "test", 200, 32, seed=0)
    save_cache(cache, "outputs/heads/arith_test.pt")        # + arith_test.json (a summary)
    cache = load_cache("outputs/heads/arith_test.pt")
    cache.features[-2]                  # [P, C] hidden states of layer -2 at the P SPRM positions
    cache.position_rollout              # [P] rollout of each position; rollout_problem [R] its problem
    confidence_path_scores(cache)       # [R] the ConfidenceScorer's path score of each rollout
    cache = cache_from_paths(spec, lm, tokenizer, problems, paths)   # rollouts you already have

What a cache holds, for `problems` problems of a task split and n rollouts each (problem-major:
rollout r belongs to problem r // n): the outcome (the task's grader), the extracted answer, the
step texts and token ids, a per-step summary of the token log-probs (mean and min, enough for
`scorers.confidence.ConfidenceScorer` of either reduction), true step labels when the task can
check steps (`countdown.true_step_labels`, `arith.true_step_labels`), and the
hidden states of each requested feature layer at the SPRM positions.

How the features are read (exactly `scorers.sprm_scorer.SPRMScorer`'s forward, so a head applied
to cached features gives the scores SPRMScorer and an in-generation policy give): the sequence is
the tokenised prompt (special tokens added) followed by the steps' exact token ids, right padded
in batches (shortest first) with position ids `cumsum(mask) - 1`, one no-grad forward with
`output_hidden_states=True`; positions are `scorers.sprm_positions.score_positions` of the
completion (the token before each counted separator), each assigned to the step holding its
separator (`step_of_positions`). `hidden_states[k]` follows transformers: 0 the embeddings, -2 the
second-to-last decoder layer's output (the reference's layer), -1 after the final norm.

Randomness: problems are `task.generate_problems(split, problems, seed)`; rollouts of chunk k of
`problems_per_call` problems use seed `seed + ROLLOUT_SEED_STRIDE * (k + 1)`; the same spec gives
the same cache (batching changes the draws, as `TransformersPolicy` documents). The device
(`device=`, --device: cpu, cuda, cuda:N; default cpu; one torch cannot see is an error before
any model loads) is not part of the spec: a GPU draws other samples than the CPU from one seed,
and its features differ in rounding, but the cache is of the same policy and problems.

Ctrl-C (or SIGTERM) in the command: one line and exit 130 (143), no traceback. While it imports
and checks its arguments: "interrupted while starting: nothing was written"; then
`interrupt_reported` says what --out holds at that moment (`interrupt_hint`): before the cache is
saved, nothing was written and an earlier cache there is kept as it was (`save_cache` writes a
temp file and renames it over the old one).

Tests: `.venv/bin/pytest tests/test_train_head.py tests/test_rollout_cache.py` (the latter: --device),
`tests/test_cli_interrupts.py` (Ctrl-C).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.startup_interrupt import quiet_start

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import torch
from tqdm.auto import tqdm

from experiments.checkpoint_hints import EMBEDDED_TASKS, hinted_checkpoint, trained_task_note
from experiments.cli_args import check_file_target, device_name, positive_int, seed_int
from experiments.cli_errors import interrupt_reported, run_command
from experiments.sft_tasks import get_sft_task
from experiments.tasks import arith, countdown
from experiments.result_json import write_atomic
from policies.checkpoint import NOT_DAMAGE, TORCH_LOAD_ERRORS, load_checkpoint
from policies.disk_full import disk_full_error
from policies.model_folder import check_model_folder, weights_fingerprint
from policies.rollout_batch import answer_written
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.sprm_positions import StepMarkers, score_positions, step_of_positions
from scorers.sprm_scorer import path_sequences
from treesearch.aggregation import EPS as PATH_SCORE_EPS
from treesearch.records import Prefix, Problem, Step
from treesearch.steps import StepFormat

CACHE_FORMAT = "treesearch.rollout_cache/1"
ROLLOUT_SEED_STRIDE = 7919
StepLabeler = Callable[[Problem, Sequence[str]], list[bool]]


# -- true step labels -----------------------------------------------------------------------------


STEP_LABELERS: dict[str, StepLabeler] = {
    "arith": arith.true_step_labels,
    "countdown": countdown.true_step_labels,
}
# the version of a task's grader and step labeler (1 where absent); a cache saved with an older one
# is graded and labelled again when loaded (arith 2, 2026-12-06: any order of the operations that
# reaches the answer is right, the story's order alone was before; countdown 2, 2026-12-05: a
# derivation with an unused side step is wrong, and the labeler follows the grader; countdown 3,
# 2026-12-06: a step of dots alone is no step for the grader either, and text before a later
# <think> is a malformed step for the labeler too)
LABELS_VERSION: dict[str, int] = {"arith": 2, "countdown": 3}


# -- the spec and the cache -----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """What to generate and read.

    policy_dir: a transformers checkpoint folder (`policies.checkpoint`).
    task: an embedded task of `experiments.sft_tasks` ("arith", "countdown").
    split: "train" or "test"; problems: how many of its problems; n: rollouts per problem.
    seed: problem list and sampling seed (module docstring).
    temperature: sampling temperature; None takes the task's DEFAULT_TEMPERATURE.
    max_total_tokens: most generated tokens of a rollout.
    feature_layers: hidden-state indices to keep (distinct; -2 is the reference's).
    batch_size: most sample rows per generation forward.
    problems_per_call: problems per `rollout` call (one progress-bar tick).
    forward_batch: rollouts per feature forward.
    """

    policy_dir: str
    task: str
    split: str
    problems: int
    n: int
    seed: int = 0
    temperature: float | None = None
    max_total_tokens: int = 160
    feature_layers: tuple[int, ...] = (-2, -1)
    batch_size: int = 256
    problems_per_call: int = 32
    forward_batch: int = 64

    def __post_init__(self) -> None:
        get_sft_task(self.task)  # raises naming the valid tasks
        if self.split not in ("train", "test"):
            raise ValueError(f"CacheSpec.split={self.split!r}; valid: 'train', 'test'")
        for name in ("problems", "n", "max_total_tokens", "batch_size", "problems_per_call", "forward_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CacheSpec.{name}={value!r} must be an integer >= 1")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"CacheSpec.temperature={self.temperature!r} must be > 0 (rollouts are sampled)")
        layers = tuple(self.feature_layers)
        if not layers or len(set(layers)) != len(layers) or not all(isinstance(k, int) for k in layers):
            raise ValueError(
                f"CacheSpec.feature_layers={self.feature_layers!r} must be distinct integers, at least one"
            )
        object.__setattr__(self, "feature_layers", layers)

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else get_sft_task(self.task).module.DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class RolloutCache:
    """Graded rollouts and their features (R rollouts, S steps, P scored positions, T tokens).

    spec: the `CacheSpec` as a dict (JSON-ready); hidden_size: C.
    problem_ids, questions: per problem (in generation order).
    rollout_problem: [R] long, the problem of each rollout (r // n).
    correct: [R] bool, the grader's outcome; answers, finish: per rollout, the extracted answer
        (None when malformed) and the last step's finish reason.
    rollout_steps: [R + 1] long, steps of rollout r are rollout_steps[r]:rollout_steps[r + 1].
    step_texts: per step; step_tokens: [S + 1] long offsets into token_ids [T] long.
    step_mean_logprob, step_min_logprob: [S] float64, mean / min token log-prob (0.0 with no token).
    step_num_tokens: [S] long.
    step_labels: [S] bool true step labels, None when the task cannot check steps.
    position_rollout, position_step: [P] long, the rollout and the (global) step of each scored
        position; position_index: [P] long, its index in the forwarded sequence (prompt included).
    features: {layer: [P, C] float32}, keyed by the layer index as requested.
    num_hidden_states: the model's number of hidden states (decoder layers + 1), so that `layer`
        finds -2 among layers cached as non-negative indices (None in caches that lack it).
    policy_fingerprint: `backbone_fingerprint` of the policy the features came from, taken
        before the model was loaded (None in caches written before it was kept): a policy retrained
        in the same folder, or the same one under another path, is told apart by it
        (`check_policy`); a reflective folder's SPRM head is not in it (the features do not read it).
    """

    spec: dict[str, Any]
    hidden_size: int
    problem_ids: tuple[str, ...]
    questions: tuple[str, ...]
    rollout_problem: torch.Tensor
    correct: torch.Tensor
    answers: tuple[str | None, ...]
    finish: tuple[str, ...]
    rollout_steps: torch.Tensor
    step_texts: tuple[str, ...]
    step_tokens: torch.Tensor
    token_ids: torch.Tensor
    step_mean_logprob: torch.Tensor
    step_min_logprob: torch.Tensor
    step_num_tokens: torch.Tensor
    step_labels: torch.Tensor | None
    position_rollout: torch.Tensor
    position_step: torch.Tensor
    position_index: torch.Tensor
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    num_hidden_states: int | None = None
    policy_fingerprint: str | None = None

    def __post_init__(self) -> None:
        r, s, p = len(self.correct), len(self.step_texts), len(self.position_rollout)
        checks = {
            "rollout_problem": (len(self.rollout_problem), r), "answers": (len(self.answers), r),
            "finish": (len(self.finish), r), "rollout_steps": (len(self.rollout_steps), r + 1),
            "step_tokens": (len(self.step_tokens), s + 1), "step_mean_logprob": (len(self.step_mean_logprob), s),
            "step_min_logprob": (len(self.step_min_logprob), s), "step_num_tokens": (len(self.step_num_tokens), s),
            "position_step": (len(self.position_step), p), "position_index": (len(self.position_index), p),
        }
        if self.step_labels is not None:
            checks["step_labels"] = (len(self.step_labels), s)
        for layer, feats in self.features.items():
            checks[f"features[{layer}]"] = (tuple(feats.shape), (p, self.hidden_size))  # type: ignore[assignment]
        bad = {k: v for k, v in checks.items() if v[0] != v[1]}
        if bad:
            what = ", ".join(f"{k} has {a}, expected {b}" for k, (a, b) in bad.items())
            raise ValueError(f"inconsistent rollout cache: {what}")

    @property
    def num_rollouts(self) -> int:
        return len(self.correct)

    @property
    def num_problems(self) -> int:
        return len(self.problem_ids)

    @property
    def n(self) -> int:
        """Rollouts per problem."""
        return int(self.spec["n"])

    @property
    def task(self) -> str:
        return str(self.spec["task"])

    @property
    def position_problem(self) -> torch.Tensor:
        """[P] long: the problem of each scored position."""
        return self.rollout_problem[self.position_rollout]

    @property
    def position_outcome(self) -> torch.Tensor:
        """[P] bool: the outcome of the rollout each position belongs to (the SPR loss's label)."""
        return self.correct[self.position_rollout]

    @property
    def cut_wrong(self) -> torch.Tensor:
        """[R] bool: wrong rollouts cut at the token limit after writing an answer (the
        reference's reward 0.1, `policies.rollout_batch.outcome_reward` and `answer_written`)."""
        cut = torch.tensor([f == "length" and answer_written("".join(self.texts_of(r)), a)
                            for r, (f, a) in enumerate(zip(self.finish, self.answers))], dtype=torch.bool)
        return cut & ~self.correct

    @property
    def position_labels(self) -> torch.Tensor | None:
        """[P] bool: the true label of the step each position scores (None without labels)."""
        return None if self.step_labels is None else self.step_labels[self.position_step]

    def layer(self, feature_layer: int) -> torch.Tensor:
        """features of one layer, [P, C] (-2 and 3 name the same layer of a 4-layer model);
        a KeyError names the layers the cache holds, or the model's range for an index past it
        (-7 of 5 hidden states is no layer, not -2)."""
        count = self.num_hidden_states
        if count is not None and not -count <= feature_layer < count:
            raise KeyError(f"feature_layer={feature_layer} must index the model's {count} hidden states "
                           f"({-count}..{count - 1})")
        if feature_layer in self.features:
            return self.features[feature_layer]
        if self.num_hidden_states is not None:
            for key, value in self.features.items():
                if key % self.num_hidden_states == feature_layer % self.num_hidden_states:
                    return value
        raise KeyError(f"feature_layer={feature_layer} is not in the cache (it holds {sorted(self.features)})")

    def texts_of(self, r: int) -> tuple[str, ...]:
        """Rollout r's step texts (joined: its completion, as graded)."""
        return self.step_texts[int(self.rollout_steps[r]): int(self.rollout_steps[r + 1])]

    def steps_of(self, r: int) -> list[Step]:
        """Rollout r as Steps (token log-probs are not cached: zeros), e.g. to rescore it."""
        first, last = int(self.rollout_steps[r]), int(self.rollout_steps[r + 1])
        steps = []
        for s in range(first, last):
            ids = tuple(self.token_ids[int(self.step_tokens[s]) : int(self.step_tokens[s + 1])].tolist())
            finish = self.finish[r] if s == last - 1 else "separator"
            steps.append(Step(self.step_texts[s], ids, (0.0,) * len(ids), finish))  # type: ignore[arg-type]
        return steps


# -- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rollout:
    """One graded rollout before it is packed."""

    problem: int
    steps: tuple[Step, ...]
    correct: bool
    answer: str | None
    labels: tuple[bool, ...] | None


def build_rollout_cache(
    policy_dir: str | Path,
    task: str,
    split: str,
    problems: int,
    n: int,
    seed: int = 0,
    temperature: float | None = None,
    max_total_tokens: int = 160,
    feature_layers: Sequence[int] = (-2, -1),
    progress: bool = True,
    device: str = "cpu",
    **options: int,
) -> RolloutCache:
    """Generate, grade and read a cache (module docstring); device: where the policy runs ("cpu",
    "cuda[:N]"); options: batch_size, problems_per_call, forward_batch of `CacheSpec`."""
    spec = CacheSpec(str(Path(policy_dir).resolve()), task, split, problems, n, seed, temperature, max_total_tokens,
                     tuple(feature_layers), **options)
    return build_from_spec(spec, progress, device)


def backbone_fingerprint(policy_dir: str | Path) -> str:
    """The fingerprint a cache keeps of its policy: config.json and the weights, not a reflective
    folder's head (`policies.model_folder.weights_fingerprint`)."""
    return weights_fingerprint(policy_dir, heads=False)


def build_from_spec(spec: CacheSpec, progress: bool = True, device: str = "cpu") -> RolloutCache:
    """Generate the spec's rollouts with the policy on device, then grade and read them (the
    features come back to the CPU). A ValueError when the policy folder changed while they were
    made (a training run writing it): the features would be of other weights than the folder's."""
    module = get_sft_task(spec.task).module
    fingerprint = backbone_fingerprint(spec.policy_dir)  # before loading: the bytes the features are read with
    lm, tokenizer = load_checkpoint(spec.policy_dir, device=device)
    _check_layers(spec.feature_layers, int(lm.config.num_hidden_layers) + 1)
    sampling = SamplingConfig(temperature=spec.sampling_temperature, max_total_tokens=spec.max_total_tokens,
                              batch_size=spec.batch_size)
    policy = TransformersPolicy(lm, tokenizer, sampling, module.prompt_text)
    problem_list = module.generate_problems(spec.split, spec.problems, seed=spec.seed)
    paths: list[list[tuple[Step, ...]]] = []
    chunks = range(0, len(problem_list), spec.problems_per_call)
    bar = tqdm(chunks, desc=f"{spec.task}/{spec.split} rollouts", unit="chunk", disable=not progress)
    for k, first in enumerate(bar):
        chunk = problem_list[first : first + spec.problems_per_call]
        rows = policy.rollout([Prefix(p) for p in chunk], spec.n, spec.seed + ROLLOUT_SEED_STRIDE * (k + 1))
        paths += [[tuple(steps) for steps in row] for row in rows]
    cache = cache_from_paths(spec, lm, tokenizer, problem_list, paths, fingerprint)
    if backbone_fingerprint(spec.policy_dir) != fingerprint:
        raise ValueError(f"{spec.policy_dir} changed while the cache was built (a training run writing it?): its "
                         "features are of the weights it held before; build the cache again once the folder is final")
    return cache


def cache_from_paths(
    spec: CacheSpec, lm: Any, tokenizer: Any, problems: Sequence[Problem], paths: Sequence[Sequence[tuple[Step, ...]]],
    fingerprint: str | None = None,
) -> RolloutCache:
    """Grade and read given rollouts (paths[i][j]: the steps of rollout j of problems[i], exactly
    spec.n per problem) into a cache, as `build_from_spec` does with its own; fingerprint: the
    policy folder's `backbone_fingerprint` when lm was loaded (default: taken now)."""
    if len(paths) != len(problems) or any(len(row) != spec.n for row in paths):
        raise ValueError(f"paths must hold n={spec.n} rollouts for each of the {len(problems)} problems")
    module = get_sft_task(spec.task).module
    _check_layers(spec.feature_layers, int(lm.config.num_hidden_layers) + 1)
    labeler = STEP_LABELERS.get(spec.task)
    reader = FeatureReader(lm, tokenizer, module.prompt_text, spec.feature_layers, spec.forward_batch)
    rollouts = [
        _grade(i, p, tuple(steps), module, labeler) for i, (p, row) in enumerate(zip(problems, paths)) for steps in row
    ]
    readings = reader.read([Prefix(problems[r.problem], r.steps) for r in rollouts])
    return _pack(spec, int(lm.config.hidden_size), int(lm.config.num_hidden_layers) + 1, problems, rollouts, readings,
                 fingerprint)


def _check_layers(layers: Sequence[int], num_states: int) -> None:
    for k in layers:
        if not -num_states <= k < num_states:
            raise ValueError(f"feature layer {k} does not index the model's {num_states} hidden states")


def _grade(index: int, problem: Problem, steps: tuple[Step, ...], module: Any, labeler: StepLabeler | None) -> _Rollout:
    return _Rollout(index, steps, *grade_texts(problem, [s.text for s in steps], module, labeler))


def grade_texts(problem: Problem, texts: Sequence[str], module: Any, labeler: StepLabeler | None,
                ) -> tuple[bool, str | None, tuple[bool, ...] | None]:
    """(correct, extracted answer, true step labels or None without a labeler) of a rollout's step texts."""
    text = "".join(texts)
    labels = None if labeler is None else tuple(bool(x) for x in labeler(problem, list(texts)))
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"problem {problem.id}: {len(labels)} true labels for {len(texts)} steps")
    return bool(module.grade(problem, text)), module.extract_answer(text), labels


@dataclass(frozen=True)
class _Reading:
    """Features of one rollout: per layer [K, C] at its K positions, the step of each, the index."""

    features: dict[int, torch.Tensor]
    steps: tuple[int, ...]
    positions: tuple[int, ...]


class FeatureReader:
    """Reads hidden states at the SPRM positions with SPRMScorer's forward (module docstring).

    lm: the causal LM; tokenizer: its tokenizer; prompt_fn: the policy's prompt template;
    layers: hidden-state indices to keep; batch_size: rollouts per forward.
    """

    def __init__(self, lm: Any, tokenizer: Any, prompt_fn: Callable[[Problem], str], layers: Sequence[int],
                 batch_size: int = 64, step_format: StepFormat = StepFormat()) -> None:
        self.lm, self.tokenizer, self.prompt_fn = lm.eval(), tokenizer, prompt_fn
        self.layers, self.batch_size = tuple(layers), batch_size
        self.markers = StepMarkers.from_tokenizer(tokenizer, len(tokenizer), step_format)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = pad_id if pad_id is not None else int(tokenizer.eos_token_id)
        self.device = next(lm.parameters()).device

    def read(self, paths: Sequence[Prefix]) -> list[_Reading]:
        sequences = self.sequences(paths)
        order = sorted(range(len(paths)), key=lambda i: len(sequences[i][0]))
        out: list[_Reading | None] = [None] * len(paths)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            for i, reading in zip(batch, self._forward([sequences[i] for i in batch], [paths[i] for i in batch])):
                out[i] = reading
        return out  # type: ignore[return-value]

    def sequences(self, paths: Sequence[Prefix]) -> list[tuple[list[int], int]]:
        """(prompt ids + step ids, prompt length) per path, as SPRMScorer reads them."""
        return path_sequences(self.tokenizer, self.prompt_fn, paths)

    @torch.inference_mode()
    def _forward(self, batch: list[tuple[list[int], int]], paths: Sequence[Prefix]) -> list[_Reading]:
        """One right-padded forward (SPRMScorer._position_scores's), the chosen layers' states."""
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        out = self.lm(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device), output_hidden_states=True, use_cache=False, logits_to_keep=1,
        )
        readings = []
        for row, ((ids, start), path) in enumerate(zip(batch, paths)):
            positions = score_positions(ids, self.markers, start)
            owner = step_of_positions([p + 1 for p in positions], [s.num_tokens for s in path.steps], start)
            cols = torch.tensor(positions, dtype=torch.long, device=self.device)  # [K]
            feats = {k: out.hidden_states[k][row, cols].float().cpu() for k in self.layers}  # {k: [K, C]}
            readings.append(_Reading(feats, tuple(owner), tuple(positions)))
        return readings


def _pack(spec: CacheSpec, hidden_size: int, num_states: int, problems: Sequence[Problem], rollouts: Sequence[_Rollout],
          readings: Sequence[_Reading], fingerprint: str | None = None) -> RolloutCache:
    """Flatten the per-rollout records into the cache's tensors; fingerprint: the policy's
    `backbone_fingerprint` (default: taken now)."""
    steps = [s for r in rollouts for s in r.steps]
    step_counts = torch.tensor([len(r.steps) for r in rollouts], dtype=torch.long)  # [R]
    rollout_steps = torch.cat([torch.zeros(1, dtype=torch.long), step_counts.cumsum(0)])  # [R + 1]
    token_counts = torch.tensor([s.num_tokens for s in steps], dtype=torch.long)  # [S]
    position_rollout = [r for r, reading in enumerate(readings) for _ in reading.steps]
    position_step = [int(rollout_steps[r]) + k for r, reading in enumerate(readings) for k in reading.steps]
    labels = None
    if rollouts and all(r.labels is not None for r in rollouts):
        labels = torch.tensor([x for r in rollouts for x in r.labels], dtype=torch.bool)  # type: ignore[union-attr]
    features = {
        k: torch.cat([reading.features[k] for reading in readings]) if readings else torch.zeros(0, hidden_size)
        for k in spec.feature_layers
    }
    return RolloutCache(
        spec=asdict(spec), hidden_size=hidden_size,
        problem_ids=tuple(p.id for p in problems), questions=tuple(p.question for p in problems),
        rollout_problem=torch.tensor([r.problem for r in rollouts], dtype=torch.long),
        correct=torch.tensor([r.correct for r in rollouts], dtype=torch.bool),
        answers=tuple(r.answer for r in rollouts),
        finish=tuple(r.steps[-1].finish if r.steps else "length" for r in rollouts),
        rollout_steps=rollout_steps,
        step_texts=tuple(s.text for s in steps),
        step_tokens=torch.cat([torch.zeros(1, dtype=torch.long), token_counts.cumsum(0)]),
        token_ids=torch.tensor([t for s in steps for t in s.token_ids], dtype=torch.long),
        step_mean_logprob=torch.tensor([_mean(s.token_logprobs) for s in steps], dtype=torch.float64),
        step_min_logprob=torch.tensor([min(s.token_logprobs, default=0.0) for s in steps], dtype=torch.float64),
        step_num_tokens=token_counts,
        step_labels=labels,
        position_rollout=torch.tensor(position_rollout, dtype=torch.long),
        position_step=torch.tensor(position_step, dtype=torch.long),
        position_index=torch.tensor([p for reading in readings for p in reading.positions], dtype=torch.long),
        features=features,
        num_hidden_states=num_states,
        policy_fingerprint=backbone_fingerprint(spec.policy_dir) if fingerprint is None else fingerprint,
    )


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one folder (the same file when both exist, else the same resolved path)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def same_policy(a: RolloutCache, b: RolloutCache) -> bool:
    """Whether two caches were read from one model: by their fingerprints when both keep one,
    else by their policy folders."""
    if a.policy_fingerprint is not None and b.policy_fingerprint is not None:
        return a.policy_fingerprint == b.policy_fingerprint
    return same_folder(a.spec["policy_dir"], b.spec["policy_dir"])


def read_from(cache: RolloutCache, policy: str | Path) -> bool:
    """Whether the cache's features were read from the model in the policy folder (its fingerprint;
    the folder itself for a cache without one)."""
    if cache.policy_fingerprint is not None:
        return backbone_fingerprint(policy) == cache.policy_fingerprint
    return same_folder(policy, cache.spec["policy_dir"])


def check_policy(cache: RolloutCache, what: str = "the cache") -> Path:
    """The policy folder the cache's features came from, checked to still hold that model; a
    ValueError when it was retrained (other weights in the folder) or the cache cannot say
    (written before caches kept a fingerprint), FileNotFoundError when it is gone."""
    folder = Path(cache.spec["policy_dir"])
    try:
        check_model_folder(folder)
    except FileNotFoundError as err:  # "checkpoint folder x does not exist" said nothing of why it was read
        err.add_note(f"{what} was read from that policy, which the head is saved with (final/): put it back there, "
                     "or train with --no-save")
        raise
    if cache.policy_fingerprint is None:
        raise ValueError(f"{what} does not record which weights of {folder} it was read from (an older cache): "
                         "build it again with `python -m experiments.rollout_cache`")
    if backbone_fingerprint(folder) != cache.policy_fingerprint:
        raise ValueError(f"{folder} holds other weights than {what} was read from (the policy was trained again "
                         "since): build the cache again with `python -m experiments.rollout_cache`")
    return folder


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# -- the confidence baseline from the cache -------------------------------------------------------


def confidence_path_scores(cache: RolloutCache, reduce: str = "mean") -> torch.Tensor:
    """[R] float64: `ConfidenceScorer(reduce)`'s path score of each rollout, as Best-of-N reads
    it: step score exp(min(m, 0)) with m the step's mean (or min) token log-prob, 1.0 for a step
    with no token; path score the geometric mean over all its steps (each clamped at 1e-10),
    0.0 with no step. E.g. steps with mean log-probs [-0.2, -0.4]: exp(-0.3) = 0.741."""
    if reduce not in ("mean", "min"):
        raise ValueError(f"reduce={reduce!r}; valid: 'mean', 'min'")
    lp = cache.step_mean_logprob if reduce == "mean" else cache.step_min_logprob  # [S]
    logs = lp.clamp(max=0.0).clamp(min=math.log(PATH_SCORE_EPS))  # [S] log of the clamped step score
    logs = torch.where(cache.step_num_tokens > 0, logs, torch.zeros_like(logs))
    step_rollout = torch.repeat_interleave(torch.arange(cache.num_rollouts), cache.rollout_steps.diff())  # [S]
    sums = torch.zeros(cache.num_rollouts, dtype=torch.float64).index_add_(0, step_rollout, logs)  # [R]
    counts = cache.rollout_steps.diff().to(torch.float64)  # [R]
    return torch.where(counts > 0, torch.exp(sums / counts.clamp(min=1)), torch.zeros_like(sums))


# -- files ----------------------------------------------------------------------------------------


FileId = tuple[int, int, int]  # (device, inode, mtime_ns): a file replaced by a rename gets another


def file_id(path: Path) -> FileId | None:
    """path's identity (`FileId`), None when nothing is there: compared before and after a run,
    it tells whether the run replaced the file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def save_cache(cache: RolloutCache, path: str | Path) -> Path:
    """Write the cache to path (one torch file, written to a temp file and renamed) and a JSON
    summary beside it (path with suffix .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CACHE_FORMAT, **{k: getattr(cache, k) for k in cache.__dataclass_fields__}}
    payload["labels_version"] = labels_version(cache.task)
    payload["features"] = {str(k): v for k, v in cache.features.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
    except BaseException as err:  # a full disk: torch's "unexpected pos 10816 vs 10768"
        tmp.unlink(missing_ok=True)  # the partial file kept the last free space
        full = disk_full_error(err, path)
        if full is not None:
            raise full from err
        if isinstance(err, OSError) and err.filename is None:  # "[Errno 28] No space left on device" named no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    os.replace(tmp, path)
    # atomic too: a summary cut by a full disk or a kill was "another file" to every rebuild
    write_atomic(path.with_suffix(".json"), json.dumps(summary(cache), indent=2) + "\n")
    return path


def check_cache_target(out: Path) -> None:
    """ValueError unless out can take a cache and its summary beside it, checked before any rollout
    is made: a .pt path (the summary is out with suffix .json: `--out c.json` had the summary
    overwrite the cache, `--out run/metrics.pt` train_head's metrics.json), a summary path that is
    free or an earlier cache summary, and a folder that can be made and written."""
    if out.suffix != ".pt":
        raise ValueError(f"--out {out} must end in .pt (its JSON summary is written beside it as {out.with_suffix('.json').name})")
    summary_path = out.with_suffix(".json")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder")
    if out.exists() and not _is_cache_file(out):  # a trained head's score_module.pt was overwritten
        raise ValueError(f"--out {out} holds another file (not a rollout cache, or a damaged one), which the cache "
                         "would overwrite; use another --out (or delete it, when it is a damaged cache)")
    if summary_path.is_dir():
        raise ValueError(f"--out {out}: its summary path {summary_path} is a folder")
    if summary_path.exists() and not _is_cache_summary(summary_path) and not _is_cache_file(out):  # a cache's own: rewritten
        raise ValueError(f"--out {out}: {summary_path} holds another file, which the cache's summary would overwrite; "
                         "use another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create its folder ({error.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: its folder {out.parent} is not writable")


def _is_cache_file(path: Path) -> bool:
    """Whether path holds a rollout cache (`save_cache`'s format), read memory-mapped: the
    features are not loaded to tell."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file, or a damaged one: not a cache to replace
        return False
    return isinstance(payload, dict) and payload.get("format") == CACHE_FORMAT


def _is_cache_summary(path: Path) -> bool:
    """Whether path holds a rollout cache's JSON summary (a `summary` of an earlier cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "spec" in data and "rollouts" in data


def _opens_as_json_object(path: Path) -> bool:
    """Whether path's first bytes open a JSON object (`{`), read without the rest of the file."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False


def _read_payload(path: Path) -> Any:
    """torch.load of a cache file; a ValueError naming the file when it cannot be read as one (a
    truncated or overwritten file: torch raises RuntimeError, OSError, EOFError or an unpickling
    error, none of which names the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except NOT_DAMAGE:
        raise
    except TORCH_LOAD_ERRORS as err:
        reason = f"{type(err).__name__}: {err}".split("\n")[0]
        raise ValueError(
            f"{path} is damaged (truncated or not a torch file; torch.load: {reason}): rebuild it with "
            "python -m experiments.rollout_cache"
        ) from err


def load_cache(path: str | Path) -> RolloutCache:
    """A cache written by `save_cache`; a ValueError names a damaged file, one of another format,
    or a cache's JSON summary given for the cache (`summary_given_error`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rollout cache {path}")
    try:
        payload = _read_payload(path)
    except ValueError:
        if _opens_as_json_object(path) and _is_cache_summary(path):  # a damaged cache is not read as text
            raise summary_given_error(path) from None
        raise
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a rollout cache of format {CACHE_FORMAT!r} (found {found!r})")
    payload.pop("format")
    saved_version = payload.pop("labels_version", 1)
    payload["features"] = {int(k): v for k, v in payload["features"].items()}
    for name in ("problem_ids", "questions", "answers", "finish", "step_texts"):
        payload[name] = tuple(payload[name])
    cache = RolloutCache(**payload)
    if saved_version < labels_version(cache.task):  # its grades were reused by the demo in silence
        cache = relabelled(cache, path)
    return cache


def summary_given_error(path: Path) -> ValueError:
    """The error for a cache's JSON summary given where the cache is read (it said "damaged" with
    torch's advice on weights_only): it names the cache beside it and whether that exists. E.g.
    "heads/a.json is the JSON summary of a rollout cache, not the cache: pass heads/a.pt (beside it)"."""
    cache = path.with_suffix(".pt")
    where = "beside it" if cache.is_file() else "which does not exist: build it with python -m experiments.rollout_cache"
    return ValueError(f"{path} is the JSON summary of a rollout cache, not the cache: pass {cache} ({where})")


def labels_version(task: str) -> int:
    """The version of a task's step labeler (`LABELS_VERSION`)."""
    return LABELS_VERSION.get(task, 1)


class StaleCacheError(ValueError):
    """A cache graded by an older grader (`LABELS_VERSION`) whose problems cannot be regenerated
    to grade it again: build it again (the demo does)."""


def relabelled(cache: RolloutCache, path: Path) -> RolloutCache:
    """The cache graded (correct, answers) and, when it has them, its true step labels made again
    by today's grader and labeler (`LABELS_VERSION`); when its problems cannot be regenerated
    (rollouts of the user's own problems, an older generator), an error: its grades are an older
    grader's, and nothing trained or measured on them could be trusted."""
    try:
        problems = cache_problems(cache)
    except ValueError as err:
        raise StaleCacheError(f"{path} holds the grades of an older {cache.task} grader ({err}): rebuild it with "
                              "python -m experiments.rollout_cache") from None
    module = get_sft_task(cache.task).module
    labeler = STEP_LABELERS.get(cache.task) if cache.step_labels is not None else None
    labels: list[bool] = []
    correct, answers = [], []
    for r in range(cache.num_rollouts):
        texts = cache.texts_of(r)
        ok, answer, rollout_labels = grade_texts(problems[int(cache.rollout_problem[r])], texts, module, labeler)
        correct.append(ok)
        answers.append(answer)
        labels.extend(rollout_labels or ())
    step_labels = None if cache.step_labels is None else torch.tensor(labels, dtype=torch.bool)
    return replace(cache, correct=torch.tensor(correct, dtype=torch.bool), answers=tuple(answers), step_labels=step_labels)


def cache_problems(cache: RolloutCache) -> list[Problem]:
    """The cache's problems, regenerated from its spec (task, split, count, seed); a ValueError
    when the regenerated ids differ from the cached ones."""
    spec = cache.spec
    module = get_sft_task(cache.task).module
    problems = module.generate_problems(spec["split"], int(spec["problems"]), seed=int(spec["seed"]))
    if tuple(p.id for p in problems) != tuple(cache.problem_ids):
        raise ValueError(f"the {cache.task} cache's problems cannot be regenerated from its spec "
                         "(another generator version?)")
    return problems


def summary(cache: RolloutCache) -> dict[str, Any]:
    """What a cache holds, in numbers (the JSON beside the file)."""
    per_problem = cache.correct.view(cache.num_problems, cache.n).float() if cache.num_rollouts else torch.zeros(0, 1)
    labels = cache.position_labels
    return {
        "spec": cache.spec,
        "hidden_size": cache.hidden_size,
        "problems": cache.num_problems,
        "rollouts": cache.num_rollouts,
        "steps": len(cache.step_texts),
        "positions": len(cache.position_rollout),
        "tokens": len(cache.token_ids),
        "pass@1": float(cache.correct.float().mean()) if cache.num_rollouts else None,
        "pass@n": float((per_problem.max(1).values > 0).float().mean()) if cache.num_rollouts else None,
        "mixed_problems": int(((per_problem > 0).any(1) & (per_problem < 1).any(1)).sum()),
        "true_step_labels": cache.step_labels is not None,
        "position_label_rate": None if labels is None or not len(labels) else float(labels.float().mean()),
        "feature_layers": sorted(cache.features),
        "num_hidden_states": cache.num_hidden_states,
    }


# -- CLI ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; our own input errors (ValueError, FileNotFoundError: a bad setting, a
    missing policy folder) print "error: <message>" on stderr and give exit code 2; Ctrl-C (or
    SIGTERM) once the arguments are parsed: one line saying what --out holds (`interrupt_hint`)."""
    return run_command(build_command, argv)


def interrupt_hint(out: Path, before: tuple[FileId | None, FileId | None]) -> str:
    """What a Ctrl-C says of --out at that moment; before: the `file_id`s of the cache and its
    summary when the command began. `save_cache` renames the finished cache over --out, then its
    summary over out.json: until the first rename an earlier cache is kept as it was."""
    summary_path = out.with_suffix(".json")
    cache_before, summary_before = before
    if file_id(out) == cache_before:
        kept = f"an earlier cache at {out} is kept as it was" if cache_before else f"no cache was written to {out}"
        return f"{kept}; rerun the same command to build it"
    if file_id(summary_path) == summary_before:
        return (f"{out} was written but not its summary {summary_path} (missing, or an earlier cache's); "
                "rerun the same command to write both")
    return f"{out} and its summary {summary_path} were written"


def build_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, then `build` with Ctrl-C and SIGTERM reported in one line (`interrupt_hint`)."""
    ap = argparse.ArgumentParser(prog="python -m experiments.rollout_cache", description="Build a rollout cache (rollouts, grades, SPRM-position features).")
    ap.add_argument("--policy", required=True, help="policy checkpoint folder")
    ap.add_argument("--task", required=True, help="embedded task: arith | countdown")
    ap.add_argument("--split", default="train", choices=("train", "test"))
    ap.add_argument("--problems", type=int, required=True)
    ap.add_argument("--n", type=int, required=True, help="rollouts per problem")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="default: the task's DEFAULT_TEMPERATURE")
    ap.add_argument("--max-total-tokens", type=int, default=160)
    ap.add_argument("--layers", type=int, nargs="+", default=[-2, -1], help="hidden-state indices to keep")
    ap.add_argument("--batch-size", type=int, default=256, help="sample rows per generation forward")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    ap.add_argument("--device", type=device_name, default="cpu",
                    help="where the policy runs: cpu, cuda or cuda:N (checked before any model loads)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    before = file_id(args.out), file_id(args.out.with_suffix(".json"))
    with interrupt_reported(functools.partial(interrupt_hint, args.out, before)):
        return build(args)


def build(args: argparse.Namespace) -> int:
    """Check --out, build the cache, save it and print a one-line summary."""
    check_file_target(args.out, "--out", "cache.pt")  # before the rollouts: save_cache would fail only after them
    check_cache_target(args.out)
    torch.set_num_threads(args.threads)
    # arith's policy on countdown: pass@1 ~0, no word (an unknown task is its own error, below)
    note = trained_task_note(args.policy, args.task, "--policy") if args.task in EMBEDDED_TASKS else None
    if note:
        print(note, file=sys.stderr, flush=True)
    started = time.perf_counter()
    with hinted_checkpoint(args.policy, "--policy"):  # a missing policy folder says how to get it
        cache = build_rollout_cache(args.policy, args.task, args.split, args.problems, args.n, args.seed,
                                    args.temperature, args.max_total_tokens, tuple(args.layers),
                                    device=args.device, batch_size=args.batch_size)
    save_cache(cache, args.out)
    info = summary(cache)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s: {info['rollouts']} rollouts, "
          f"{info['positions']} positions, pass@1 {info['pass@1']:.3f}, pass@{cache.n} {info['pass@n']:.3f}, "
          f"{info['mixed_problems']} problems with both outcomes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
