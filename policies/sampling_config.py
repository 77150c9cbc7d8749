"""`SamplingConfig`: how a generation backend samples tokens and where it stops.

Usage:
    from policies.sampling_config import SamplingConfig
    cfg = SamplingConfig(temperature=0.6, top_p=0.95, max_step_tokens=128, max_total_tokens=1024)

One frozen, validated record shared by the generation backends (transformers in-process, vLLM);
a bad value fails at construction with a message that names it.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from treesearch.steps import StepFormat, check_separator_match


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling and stopping settings of a policy.

    temperature: softmax temperature for sampling; 0 means greedy (argmax). Token log-probs are
        always reported at temperature 1, whatever this is.
    top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution.
    max_step_tokens: most tokens of one step when a call stops at steps
        (`propose(..., stop_at_step=True)`); a step cut here ends with finish "length".
        Runs to the end of the sequence (`rollout`, `propose(stop_at_step=False)`) are bounded by
        max_total_tokens only.
    max_total_tokens: most generated tokens of a whole path, the prefix's steps included (the
        prompt is not counted). Every backend also ends a path ("length") where prompt + path
        reach the model's context window.
    batch_size: most sample rows decoded together (one chunk; a forward pass holds at most this
        many rows, fewer with forked decoding, `policies.decode_batch`).
    separator: the text that ends a reasoning step.
    separator_match: which tokens are the separator: "suffix", every token whose decoded text
        ends with it; "exact", the token whose text is the separator alone (the MetaStone-S1
        reference's rule; the Qwen presets; `policies.step_stops`).
    think_open, think_close: the thinking-section markers; when the tokenizer has both as single
        tokens, separators end steps only inside the section.
    repetition_penalty: vLLM's and transformers' penalty on every token already in the sequence
        (prompt and generated): such a token's logit is divided by it when positive, multiplied
        when negative, before sampling (or greedy); 1 is none (the reference's evaluation: 1.05).
        Token log-probs are reported without it (vLLM's raw log-probs).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_step_tokens: int = 256
    max_total_tokens: int = 1024
    batch_size: int = 256
    separator: str = ".\n\n"
    think_open: str = "<think>"
    think_close: str = "</think>"
    repetition_penalty: float = 1.0
    separator_match: str = "suffix"

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a number")
        if not 0 <= self.temperature < math.inf:  # also rejects NaN (inf would divide logits to 0)
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 (1: none)")
        for name in ("max_step_tokens", "max_total_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("separator", "think_open", "think_close"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty string")
        if self.think_open == self.think_close:
            raise ValueError(
                f"think_open={self.think_open!r} and think_close={self.think_close!r} must differ"
            )
        check_separator_match(self.separator_match, "separator_match")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def step_format(self) -> StepFormat:
        """Where steps end, for the SPRM positions (`scorers.sprm_positions.StepMarkers`)."""
        return StepFormat(self.separator, self.think_open, self.think_close, self.separator_match)


VLLM_MIN_TEMPERATURE = 0.01  # vLLM raises a temperature in (0, 0.01) to this, with a log line only


def check_vllm_temperature(temperature: float, owner: str) -> None:
    """ValueError naming owner unless vLLM samples at exactly this temperature: 0 (greedy) or at
    least VLLM_MIN_TEMPERATURE (the transformers backend samples at 0.005 as given, vLLM at 0.01:
    another distribution under the same setting)."""
    if 0 < temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(
            f"{owner}: temperature={temperature!r} is below vLLM's smallest, {VLLM_MIN_TEMPERATURE} (it would sample at "
            f"that instead): use 0 for greedy or a temperature >= {VLLM_MIN_TEMPERATURE}"
        )


def check_policy_inputs(sampling: object, prompt_fn: object) -> None:
    """TypeError naming the argument unless sampling is a SamplingConfig and prompt_fn is
    callable: checked before a model loads (swapped arguments, or a dict of settings, failed
    with an AttributeError only after loading; a prompt string at the first search)."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling is a {type(sampling).__name__}, not a SamplingConfig")
    check_prompt_fn(prompt_fn)


def check_prompt_fn(prompt_fn: object) -> None:
    """TypeError unless prompt_fn (the prompt template, Problem -> text) is callable."""
    if not callable(prompt_fn):
        raise TypeError(f"prompt_fn is a {type(prompt_fn).__name__}, not a callable (Problem -> prompt text)")
