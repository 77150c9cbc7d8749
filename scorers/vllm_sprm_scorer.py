"""`VLLMSPRMScorer`: the SPRM head on hidden states from vLLM's pooling runner, as a
`treesearch.protocols.Scorer` with the same scores as `scorers.sprm_scorer.SPRMScorer` (which
runs a transformers forward instead).

Usage:
    scorer = VLLMSPRMScorer.from_pretrained("runs/tiny-sprm", prompt_fn=arith.prompt_text)
    scorer.score(paths)          # [[step score, ...], ...] one per step, in [0, 1]
    scorer.path_scores(paths)    # the reference's value: geometric mean over separator positions, 0 if none
    scorer.read(paths)           # one SPRMReading per path: token ids, positions, per-position and per-step scores
    scorer.cost(paths)           # tokens forwarded (prompt + every step token, per path)
    scorer.close()               # stop the engine

The sequence of a path is the tokenised prompt (special tokens added, as the policies build it)
followed by its steps' exact token_ids. vLLM runs every path once (`LLM.encode`, pooling runner,
per-token states, no activation; prefix caching off because every position is read), the head
(`score_module.pt`) reads the feature layer at the `scorers.sprm_positions` positions, sigmoid;
step scores follow exactly as in `SPRMScorer` (a step's own reading, the terminal step the
geometric mean of the earlier ones).

Feature layer: hidden_states[feature_layer] in transformers' indexing. -1 (after the final norm)
is the pooling runner's own output; any other layer, the reference's -2 included, comes from
`policies.vllm_layer_features` (a registered model class that stops after that layer, before
the final norm), for the architectures it supports. Default: the folder's sprm.json, else -2,
as `policies.reflective_model.ReflectiveModel`.

Tests: `.venv/bin/pytest tests/test_vllm_scorer.py` (equal to `SPRMScorer` within 1e-3).
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from policies.model_folder import check_model_folder
from policies.reflective_model import layer_to_read
from policies.vllm_engine import VLLMEngineConfig, build_llm, encode_hidden_states, max_model_len, shutdown_llm
from policies.vllm_policy import count_parameters
from scorers.sprm_head import load_score_module, sprm_logits
from scorers.sprm_positions import StepMarkers, score_positions
from scorers.sprm_scorer import SPRMReading, path_sequences, sprm_reading
from treesearch.records import Prefix, Problem
from treesearch.steps import StepFormat


class VLLMSPRMScorer:
    """Scores paths with an SPRM head over per-token states from a vLLM pooling engine.

    llm: a pooling engine (`policies.vllm_engine.build_llm(config, "pooling", feature_layer)`).
    tokenizer: the checkpoint's tokenizer (the prompt is encoded with special tokens).
    head: the SPRM head (`scorers.sprm_head`), on the engine's hidden size.
    prompt_fn: the policy's prompt template, Problem -> text.
    feature_layer: the layer the engine returns (a record of how it was built; it does not
        change what the engine computes).
    step_format: separator and think markers (the policy's `SamplingConfig` strings).
    num_parameters: the LM's and the head's parameters, for the compute ledger's FLOPs (2 x
        parameters x tokens forwarded), as `SPRMScorer` counts them; `from_pretrained` counts them
        from the folder's config (vLLM's pooling stops at the feature layer, so for layer -2 this
        counts one decoder layer and the output layer it does not run). 0 counts no FLOPs.
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        head: nn.Sequential,
        prompt_fn: Callable[[Problem], str],
        feature_layer: int,
        step_format: StepFormat = StepFormat(),
        num_parameters: int = 0,
    ) -> None:
        self.llm, self.tokenizer, self.head, self.prompt_fn = llm, tokenizer, head.eval(), prompt_fn
        self.num_parameters = int(num_parameters)
        self.feature_layer = feature_layer
        self._lock = threading.Lock()
        # ids past the tokenizer's size (a wider logit layer) are never separators
        self.markers = StepMarkers.from_tokenizer(tokenizer, len(tokenizer), step_format)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prompt_fn: Callable[[Problem], str],
        step_format: StepFormat = StepFormat(),
        feature_layer: int | None = None,
        engine: VLLMEngineConfig | None = None,
    ) -> "VLLMSPRMScorer":
        """Start a pooling engine on a folder with score_module.pt (FileNotFoundError names a
        missing file). feature_layer None reads sprm.json (-2 without it); a layer vLLM cannot
        return for this architecture raises ValueError naming it. engine: its model is path."""
        directory = check_model_folder(path)
        config = AutoConfig.from_pretrained(str(directory))
        head = load_score_module(directory, int(config.hidden_size))
        layer = layer_to_read(directory, feature_layer)
        engine = replace(engine or VLLMEngineConfig(str(directory)), model=str(directory))
        llm = build_llm(engine, runner="pooling", feature_layer=layer)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        parameters = count_parameters(config) + sum(p.numel() for p in head.parameters())
        return cls(llm, tokenizer, head, prompt_fn, layer, step_format, parameters)

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [list(r.step_scores) for r in self.read(paths)]

    def path_scores(self, paths: Sequence[Prefix]) -> list[float]:
        return [r.value for r in self.read(paths)]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens forwarded: each path's prompt + step tokens (every path is run whole)."""
        return sum(len(ids) for ids, _ in self._sequences(paths))

    def read(self, paths: Sequence[Prefix]) -> list[SPRMReading]:
        """One vLLM pooling call over every path; the head at each path's positions."""
        if self.llm is None:
            raise RuntimeError("this VLLMSPRMScorer was closed; build a new one")
        sequences = self._sequences(paths)
        window = max_model_len(self.llm)
        for path, (ids, _) in zip(paths, sequences):  # vLLM's own refusal named no problem
            if len(ids) > window:
                raise ValueError(f"problem {path.problem.id!r}: the SPRM reads {len(ids)} tokens, more than the scorer "
                                 f"engine's context window of {window} (scorer.engine.max_model_len)")
        with self._lock:  # vLLM's offline engine takes one caller at a time
            states = encode_hidden_states(self.llm, [ids for ids, _ in sequences])  # per path [L, C]
        positions = [score_positions(ids, self.markers, start) for ids, start in sequences]
        values = self._head_scores(states, positions)
        return [
            sprm_reading(path, ids, start, p, v)
            for path, (ids, start), p, v in zip(paths, sequences, positions, values)
        ]

    def close(self) -> None:
        """Stop the engine and free vLLM's process-wide state (`vllm_engine.shutdown_llm`)."""
        if self.llm is not None:
            shutdown_llm(self.llm)
            self.llm = None

    # -- phases -------------------------------------------------------------------------------

    def _sequences(self, paths: Sequence[Prefix]) -> list[tuple[list[int], int]]:
        return path_sequences(self.tokenizer, self.prompt_fn, paths)

    @torch.inference_mode()
    def _head_scores(self, states: list[torch.Tensor], positions: list[list[int]]) -> list[list[float]]:
        """Sigmoid of the head at every path's positions, in one head call."""
        features = [s[p] for s, p in zip(states, positions) if p]  # each [K_i, C]
        if not features:
            return [[] for _ in positions]
        flat = torch.sigmoid(sprm_logits(self.head, torch.cat(features))).tolist()  # [K]
        out, k = [], 0
        for p in positions:
            out.append(flat[k : k + len(p)])
            k += len(p)
        return out

