"""`SPRMScorer`: the SPRM head scored the reference's way, with a second full forward over
prompt + path (what the reference's `/score` service does), as a `treesearch.protocols.Scorer`.

Usage:
    model, tokenizer = ReflectiveModel.from_pretrained("runs/tiny-sprm")
    scorer = SPRMScorer(model, tokenizer, prompt_fn=arith.prompt_text)
    scorer = SPRMScorer.from_pretrained("runs/tiny-sprm", arith.prompt_text)   # the same, in one call
    scorer.score(paths)          # [[step score, ...], ...] one per step, in [0, 1]
    scorer.path_scores(paths)    # the reference's value: geometric mean over separator positions, 0 if none
    scorer.read(paths)           # one SPRMReading per path: token ids, positions, per-position and per-step scores
    scorer.cost(paths)           # tokens forwarded (prompt + every step token, per path)

The sequence of a path is the tokenised prompt (special tokens added, as the policy builds it)
followed by its steps' exact token_ids; the LM runs over it once (right padded in batches,
keeping only the feature layer's states, `policies.feature_tap`), the head reads the feature layer at `scorers.sprm_positions`
positions of the completion, sigmoid. A step's score: the reading at its own separator; a step
with none (the terminal step) the geometric mean of the earlier step scores, 0.0 with none (see
`scorers.sprm_positions`): so the geometric-mean path score of a rollout equals `path_scores`
(a rollout without a scored separator: the 1e-10 clamp, where `path_scores` gives 0). A
path longer than the model's context window is a ValueError naming its problem.

A policy built with the same model as step head (`TransformersPolicy.from_reflective`) attaches
the same scores while generating (equal within float rounding) at no extra forward; read them
with `scorers.step_score_reader.StepScoreReader`. This scorer is for paths from other policies,
or to check that equality.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from policies.model_lock import model_lock
from policies.policy_requests import encode_contexts, model_vocabulary, name_out_of_vocabulary
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import check_prompt_fn
from scorers.sprm_positions import StepMarkers, path_step_scores, score_positions, step_of_positions
from treesearch.aggregation import aggregate
from treesearch.records import Prefix, Problem
from treesearch.steps import StepFormat


@dataclass(frozen=True)
class SPRMReading:
    """What the head read on one path (the reference service's `return_all_scores` fields).

    token_ids: the forwarded sequence, prompt + steps.
    prompt_length: tokens of the prompt at its start.
    positions: indices into token_ids the head read (the token before each scored separator).
    position_scores: sigmoid of the head at each position.
    step_scores: one per step of the path (module docstring).
    value: geometric mean of position_scores (clamped at 1e-10), 0.0 with none: the reference's score.
    """

    token_ids: tuple[int, ...]
    prompt_length: int
    positions: tuple[int, ...]
    position_scores: tuple[float, ...]
    step_scores: tuple[float, ...]
    value: float


class SPRMScorer:
    """Scores paths with a `ReflectiveModel`'s SPRM head over a separate forward pass.

    model: the reflective model (LM + head + feature layer); put in eval mode here.
    tokenizer: its tokenizer (the prompt is encoded with special tokens, as the policy does).
    prompt_fn: the policy's prompt template, Problem -> text.
    step_format: separator and think markers (the policy's `SamplingConfig` strings).
    batch_size: paths per forward.
    """

    def __init__(
        self,
        model: ReflectiveModel,
        tokenizer: Any,
        prompt_fn: Callable[[Problem], str],
        step_format: StepFormat = StepFormat(),
        batch_size: int = 16,
    ) -> None:
        check_reflective(model)
        check_prompt_fn(prompt_fn)
        check_batch_size(batch_size)
        self.model = model.eval()
        self.tokenizer, self.prompt_fn, self.batch_size = tokenizer, prompt_fn, batch_size
        # ids past the tokenizer's size (a wider logit layer) are never separators
        self.markers = StepMarkers.from_tokenizer(tokenizer, len(tokenizer), step_format)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = pad_id if pad_id is not None else int(tokenizer.eos_token_id)
        self.num_parameters: int = model.num_parameters
        self.device = next(model.parameters()).device
        # the longest sequence the LM reads (None: unchecked); a longer path is refused, not read past it
        self.context_window: int | None = getattr(model.lm.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prompt_fn: Callable[[Problem], str],
        step_format: StepFormat = StepFormat(),
        batch_size: int = 16,
        feature_layer: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> "SPRMScorer":
        """Load a reflective checkpoint folder (transformers files + score_module.pt, e.g. a
        `python -m experiments.train` checkpoint or an XBai-o4 / MetaStone-S1 folder) with
        `ReflectiveModel.from_pretrained` (FileNotFoundError names a missing file) and score with
        it; feature_layer: None reads the folder's sprm.json (-2 without one); another layer than
        sprm.json names is a ValueError. `scorer=sprm_forward` in the search configs builds it
        from here. device: where it runs, "cpu" or "cuda[:N]"
        (`policies.devices.resolve_device`; Hydra: `scorer.device=cuda`); dtype: the LM's weights,
        "float32" or "bfloat16" / "float16" (half the memory: a 7B model in float32 takes ~28 GB;
        the head keeps the dtype it was saved in)."""
        check_prompt_fn(prompt_fn)  # before minutes of loading a large model
        check_batch_size(batch_size)
        model, tokenizer = ReflectiveModel.from_pretrained(path, dtype=dtype, feature_layer=feature_layer, device=device)
        return cls(model, tokenizer, prompt_fn, step_format, batch_size)

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [list(r.step_scores) for r in self.read(paths)]

    def path_scores(self, paths: Sequence[Prefix]) -> list[float]:
        return [r.value for r in self.read(paths)]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens forwarded: each path's prompt + step tokens (the reference rescans whole texts)."""
        return sum(len(ids) for ids, _ in self._sequences(paths))

    def read(self, paths: Sequence[Prefix]) -> list[SPRMReading]:
        """Forward every path once (batched, shortest first) and read the head at its positions.
        ValueError naming the first path longer than the model's context window (max_position_embeddings)."""
        sequences = self._sequences(paths)
        self._check_window(paths, sequences)
        name_out_of_vocabulary(paths, [ids for ids, _ in sequences], model_vocabulary(self.model.lm))  # before the forward
        order = sorted(range(len(paths)), key=lambda i: len(sequences[i][0]))
        readings: list[SPRMReading | None] = [None] * len(paths)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            scores = self._position_scores([sequences[i] for i in batch])
            for i, (positions, values) in zip(batch, scores):
                readings[i] = sprm_reading(paths[i], *sequences[i], positions, values)
        return readings  # type: ignore[return-value]

    # -- phases -------------------------------------------------------------------------------

    def _sequences(self, paths: Sequence[Prefix]) -> list[tuple[list[int], int]]:
        return path_sequences(self.tokenizer, self.prompt_fn, paths)

    def _check_window(self, paths: Sequence[Prefix], sequences: list[tuple[list[int], int]]) -> None:
        """ValueError naming the first path longer than the context window: the positions past
        it were never trained, so its scores would mean nothing (a policy with a longer window,
        e.g. a vLLM or OpenAI one, can make such paths)."""
        if self.context_window is None:
            return
        for path, (ids, _) in zip(paths, sequences):
            if len(ids) > self.context_window:
                raise ValueError(f"problem {path.problem.id!r}: the SPRM reads {len(ids)} tokens (prompt + steps), "
                                 f"more than its model's context window of {self.context_window} (max_position_embeddings)")

    @torch.inference_mode()
    def _position_scores(self, batch: list[tuple[list[int], int]]) -> list[tuple[list[int], list[float]]]:
        """One right-padded forward; per sequence (positions, sigmoid of the head there)."""
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        positions = [score_positions(ids, self.markers, start) for ids, start in batch]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]; right pads are masked anyway
        with model_lock(self.model.lm):  # a policy decoding on this model object takes turns with it
            out = self.model(
                input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device), logits_to_keep=1
            )
        rows = torch.tensor([r for r, p in enumerate(positions) for _ in p], dtype=torch.long)  # [K]
        cols = torch.tensor([c for p in positions for c in p], dtype=torch.long)  # [K]
        values = self.model.step_scores(out.features[rows.to(self.device), cols.to(self.device)]).tolist()  # [K]
        result, k = [], 0
        for p in positions:
            result.append((p, values[k : k + len(p)]))
            k += len(p)
        return result


def check_reflective(model: object) -> None:
    """TypeError unless model is a `ReflectiveModel` (an LM with its SPRM head): a plain LM
    failed at `.lm` with an AttributeError that did not say what was wanted."""
    if not isinstance(model, ReflectiveModel):
        raise TypeError(
            f"SPRMScorer takes a ReflectiveModel (an LM with its SPRM head: ReflectiveModel.from_pretrained, or "
            f"SPRMScorer.from_pretrained(path, prompt_fn)), not a {type(model).__name__}")


def check_batch_size(batch_size: object) -> None:
    """ValueError unless batch_size (paths per forward) is an integer >= 1."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")


def path_sequences(
    tokenizer: Any, prompt_fn: Callable[[Problem], str], paths: Sequence[Prefix]
) -> list[tuple[list[int], int]]:
    """(prompt ids + step ids, prompt length) per path: what a scorer forwards, the very input the
    policy decoded the steps from (`policies.policy_requests.encode_contexts`)."""
    contexts, prompt_lengths = encode_contexts(tokenizer, prompt_fn, paths)
    return list(zip(contexts, prompt_lengths))


def sprm_reading(
    path: Prefix, ids: list[int], prompt_length: int, positions: list[int], values: list[float]
) -> SPRMReading:
    """A path's SPRMReading from the head's readings at its positions, each assigned to the step
    that holds its separator; the step scores follow (`scorers.sprm_positions.path_step_scores`)."""
    owner = step_of_positions([p + 1 for p in positions], [s.num_tokens for s in path.steps], prompt_length)
    own: list[list[float]] = [[] for _ in path.steps]
    for step, value in zip(owner, values):
        own[step].append(value)
    step_scores = path_step_scores(own)
    return SPRMReading(
        tuple(ids), prompt_length, tuple(positions), tuple(values),
        tuple(float(s) for s in step_scores),  # type: ignore[arg-type]  # never None without previous
        aggregate(values, "geometric_mean"),
    )
