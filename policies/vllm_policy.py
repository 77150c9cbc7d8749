"""`VLLMPolicy`: the `treesearch.protocols.Policy` served by vLLM's offline engine in this
process, with the same steps, finish reasons, log-probs and accounting as
`policies.transformers_policy.TransformersPolicy`.

Usage:
    path = "outputs/checkpoints/tiny-arith/final"
    policy = VLLMPolicy.from_pretrained(path, SamplingConfig(temperature=0.6), arith.prompt_text,
                                        engine=VLLMEngineConfig(path, kv_cache_gib=2))
    steps = policy.propose([Prefix(problem)], n=8, seed=0)     # steps[0][j]: j-th next step
    rows = policy.propose_widths([a, b], [1, 3], seed=0)       # 1 step after a, 3 after b, one batch
    greedy = policy.with_temperature(0.0)                      # the same engine, greedy
    paths = policy.rollout([Prefix(problem)], n=32, seed=0)    # paths[0][j]: list of steps
    policy.last_usage.cached_share                             # prompt tokens vLLM served from its prefix cache
    policy.close()                                             # stop the engine (or use `with`)

How a call runs: the model input of a prefix is the tokenised prompt (special tokens added)
followed by the exact `token_ids` of its steps (never re-tokenised text), sent as
`TokensPrompt`s. Every sample is its own vLLM request with the seed
`derive_seed(seed, prefix index, sample index)`, so the same prefixes, n, seed and config give the
same samples (token ids, log-probs, finishes; only tokens_forwarded follows the prefix cache,
which earlier calls fill), whatever else vLLM batches with them (greedy output depends on none of
it). All requests of a call go
to vLLM at once; its scheduler batches them and its prefix cache shares the prompt's KV among the
samples of a prefix and across calls (`VLLMEngineConfig.enable_prefix_caching`).

Step ends: propose stops requests at every separator token (`stop_token_ids`) and
`policies.step_assembly` replays the reference's think-aware rule (`policies.step_stops`); a
stop that is no step boundary (outside <think> ... </think>, right after <think> or after another
separator) is resubmitted as context + tokens so far with the budget left, until a boundary, EOS
or max_step_tokens / max_total_tokens, so the steps equal `TransformersPolicy`'s. Rollouts run to
EOS or max_total_tokens in one request and are split at the boundaries.

Log-probs: vLLM's default `logprobs_mode="raw_logprobs"`, log_softmax of the raw logits at the
sampled token, i.e. at temperature 1 and before top-p, as `Step.token_logprobs` requires.

Compute accounting (`Step.tokens_forwarded`): each request's prompt tokens that vLLM did not
serve from its prefix cache (`RequestOutput.num_cached_tokens`) plus its generated tokens but the
last; a rollout's first step carries the prefill, every step its fed tokens. vLLM always
recomputes at least the last prompt token and caches whole blocks only, so a sample's prefill is
>= 1 even on a full hit. `usage` (since construction) and `last_usage` (the last call) count
prompt tokens sent and those served from the cache, for a benchmark's cache share: of this
object's calls only; a `with_sampling` / `with_temperature` copy (beam search's greedy lookahead)
counts its own, as `OpenAIPolicy`'s copies do (a search's compute is in `Step.tokens_forwarded`).

Deviations from `TransformersPolicy`: no step head (Step.score is always None); batch_size is not
used (vLLM schedules its own batches, see VLLMEngineConfig.max_num_seqs); samples are drawn by
vLLM's sampler from other random streams, so seeded samples differ from TransformersPolicy's
(greedy ones are equal up to float rounding); a step whose sample stopped on a non-boundary
separator took more than one request, and tokens_forwarded counts the real extra work (the
re-sent context's uncached tail). Both cap a path at the model's context window (here the
engine's max_model_len; there the same, `policies.context_window`): a sample that reaches it ends "length", a prompt longer than it is a
ValueError naming the problem and the window (`policies.policy_requests.fit_window`).

Tests: `.venv/bin/pytest tests/test_vllm_policy.py` (the vLLM ones are marked `vllm`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from policies.model_folder import check_model_folder
from policies.policy_requests import (
    check_request, check_widths, close_full_paths, encode_contexts, fit_window, split_rows, step_budget,
)
from policies.sampling_config import SamplingConfig, check_vllm_temperature
from policies.step_assembly import (
    CompleteFn, SampleRequest, SampleTokens, StepMarks, decode_steps, derive_seed, sample_continuations,
    split_steps, whole_step,
)
from policies.step_stops import StepStopRule
from policies.vllm_engine import (
    VLLMEngineConfig, build_llm, complete_tokens, is_shut_down, max_model_len, shutdown_llm,
)
from treesearch.records import Prefix, Problem, Step


@dataclass(frozen=True)
class VLLMUsage:
    """Token counts of vLLM requests.

    requests: requests sent (continuations after a non-boundary separator included).
    prompt_tokens: prompt tokens sent (prompt + prefix + tokens so far, per request).
    cached_prompt_tokens: of those, served from vLLM's prefix cache (not recomputed).
    generated_tokens: tokens vLLM sampled (including any dropped past a step end).
    """

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0

    def __add__(self, other: "VLLMUsage") -> "VLLMUsage":
        return VLLMUsage(
            self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
            self.cached_prompt_tokens + other.cached_prompt_tokens, self.generated_tokens + other.generated_tokens,
        )

    @property
    def cached_share(self) -> float:
        """Share of prompt tokens served from the prefix cache (0.0 with no prompt tokens)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @classmethod
    def of(cls, samples: Sequence[SampleTokens]) -> "VLLMUsage":
        """The summed counts of these samples' requests."""
        return cls(
            sum(s.requests for s in samples), sum(s.prompt_tokens for s in samples),
            sum(s.cached_tokens for s in samples), sum(s.generated_tokens for s in samples),
        )


class VLLMPolicy:
    """A `Policy` over a `vllm.LLM` (generation runner) and the checkpoint's tokenizer.

    llm: the engine (`policies.vllm_engine.build_llm`); this policy only calls `generate` on it.
    tokenizer: the checkpoint's transformers tokenizer (prompts, separator lookup, step texts).
    sampling: temperature, top-p, token limits, separator and think markers (batch_size unused).
    prompt_fn: the prompt template, Problem -> text (the step tokens follow it directly).
    num_parameters: the model's parameter count (for FLOPs estimates).
    eos_ids: ids that end a sequence (the tokenizer's and the generation config's).
    vocab_size: the model's logit width (may exceed the tokenizer's).
    engine_lock: held around each call's use of the engine (`vllm.LLM` is not thread-safe);
        policies sharing one engine (`with_sampling`) share it; None: a new one.

    Threads: calls from several threads at once are safe and run one at a time.
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        num_parameters: int,
        eos_ids: Sequence[int],
        vocab_size: int,
        engine_lock: threading.Lock | None = None,
    ) -> None:
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling is a {type(sampling).__name__}, not a SamplingConfig")
        check_vllm_temperature(sampling.temperature, "VLLMPolicy")
        self.llm, self.tokenizer, self.sampling, self.prompt_fn = llm, tokenizer, sampling, prompt_fn
        self.engine_lock = engine_lock if engine_lock is not None else threading.Lock()
        self.num_parameters: int = int(num_parameters)
        self.eos_ids, self.vocab_size = tuple(int(i) for i in eos_ids), int(vocab_size)
        rule = StepStopRule.from_tokenizer(
            tokenizer, max(int(vocab_size), len(tokenizer)), sampling.separator, sampling.think_open,
            sampling.think_close, eos_ids, separator_match=sampling.separator_match,
        )
        self.marks = StepMarks.from_rule(rule)
        self.usage = VLLMUsage()  # since construction
        self.last_usage = VLLMUsage()  # the last propose / rollout call

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        engine: VLLMEngineConfig | None = None,
    ) -> "VLLMPolicy":
        """Start vLLM on a checkpoint folder (FileNotFoundError names a missing file; ImportError
        says how to install vLLM). engine: the engine settings; its `model` is replaced by path."""
        check_vllm_temperature(sampling.temperature, "VLLMPolicy")  # before minutes of loading, not after
        directory = check_model_folder(path)
        engine = replace(engine or VLLMEngineConfig(str(directory)), model=str(directory))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = AutoConfig.from_pretrained(str(directory))
        llm = build_llm(engine, runner="generate")
        return cls(
            llm, tokenizer, sampling, prompt_fn, count_parameters(config),
            checkpoint_eos_ids(directory, tokenizer), int(getattr(config, "vocab_size", 0) or 0),
        )

    def propose(
        self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """n sampled next steps per prefix, result[i][j] after prefixes[i]; ends and limits as
        `TransformersPolicy.propose` (a step ends at a boundary separator, kept in its text, at
        EOS, kept in token_ids but not in text, or at a token limit: "length")."""
        return self._whole_steps(self._sample(prefixes, check_request(prefixes, n, seed), seed, stop_at_step))

    def propose_widths(
        self, prefixes: Sequence[Prefix], widths: Sequence[int], seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """widths[i] sampled next steps after prefixes[i], all in one engine assembly; otherwise
        as `propose` (a sample's seed depends on its prefix index and its index in the row, so
        propose(n) and propose_widths([n] * len) give the same samples)."""
        return self._whole_steps(self._sample(prefixes, check_widths(prefixes, widths, seed), seed, stop_at_step))

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        """n sampled completions per prefix to EOS or max_total_tokens, each split into steps
        (a run of separators stays with the step it ends); inner steps finish "separator"."""
        samples = self._sample(prefixes, check_request(prefixes, n, seed), seed, stop_at_step=False)
        with self.engine_lock:
            return decode_steps([[split_steps(s, self.marks) for s in row] for row in samples], self.tokenizer)

    def with_sampling(self, sampling: SamplingConfig) -> "VLLMPolicy":
        """Another policy on the same engine with other sampling settings (e.g. greedy next to
        sampled); closing either one stops the engine for both."""
        return VLLMPolicy(
            self.llm, self.tokenizer, sampling, self.prompt_fn, self.num_parameters, self.eos_ids, self.vocab_size,
            self.engine_lock,
        )

    def with_temperature(self, temperature: float) -> "VLLMPolicy":
        """`with_sampling` with only the temperature changed (0: greedy); beam search's
        lookahead steps use it (`treesearch.protocols.TemperaturePolicy`)."""
        return self.with_sampling(replace(self.sampling, temperature=temperature))

    def close(self) -> None:
        """Stop the engine and free vLLM's process-wide state (`vllm_engine.shutdown_llm`)."""
        with self.engine_lock:  # not while a call uses the engine
            if self.llm is not None and not is_shut_down(self.llm):
                shutdown_llm(self.llm)
            self.llm = None

    def __enter__(self) -> "VLLMPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- phases -------------------------------------------------------------------------------

    def _whole_steps(self, samples: list[list[SampleTokens]]) -> list[list[Step]]:
        with self.engine_lock:  # the tokenizer
            return decode_steps([[whole_step(s) for s in row] for row in samples], self.tokenizer)

    def _sample(
        self, prefixes: Sequence[Prefix], widths: list[int], seed: int, stop_at_step: bool
    ) -> list[list[SampleTokens]]:
        """All sum(widths) samples (a checked request) in one assembly (one vLLM call per continuation round)."""
        with self.engine_lock:  # also guards the tokenizer and the usage counts
            if self.llm is None or is_shut_down(self.llm):  # closed here, or through a with_sampling copy
                raise RuntimeError("this VLLMPolicy was closed; build a new one")
            contexts, prompt_lengths = encode_contexts(self.tokenizer, self.prompt_fn, prefixes)
            window = max_model_len(self.llm)
            budgets = fit_window(
                [step_budget(self.sampling, prefix, stop_at_step) for prefix in prefixes], contexts, prompt_lengths,
                prefixes, window, "the engine's max_model_len, VLLMEngineConfig.max_model_len",
            )
            requests = [
                SampleRequest(tuple(contexts[i]), budgets[i], derive_seed(seed, i, j))
                for i in range(len(prefixes)) for j in range(widths[i])
            ]
            flat = sample_continuations(requests, self._complete_fn(), self.marks, stop_at_step)
            self.last_usage = VLLMUsage.of(flat)
            self.usage = self.usage + self.last_usage
        rows = split_rows(flat, widths)
        return close_full_paths(rows, prefixes, self.sampling, contexts, window) if stop_at_step else rows

    def _complete_fn(self) -> CompleteFn:
        return partial(complete_tokens, self.llm, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                       repetition_penalty=self.sampling.repetition_penalty)



def count_parameters(config: Any) -> int:
    """Parameters of the transformers model of this config, counted on the meta device (no
    memory), shared tensors once: the same number `TransformersPolicy.num_parameters` reports."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def checkpoint_eos_ids(directory: str | Path, tokenizer: Any) -> list[int]:
    """EOS ids of the tokenizer and of the folder's generation_config.json (which may list
    several), as `TransformersPolicy` takes them from the loaded model; a folder without
    generation_config.json gives config.json's instead, as transformers and vLLM both derive the
    generation config from it (vLLM then stops on that id too)."""
    try:
        config_eos = GenerationConfig.from_pretrained(str(directory)).eos_token_id
    except OSError:  # no generation_config.json: the one config.json implies
        config_eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(directory))).eos_token_id
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), config_eos):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError(f"neither the tokenizer nor {directory}/generation_config.json names an EOS token")
    return ids


