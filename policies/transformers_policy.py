"""`TransformersPolicy`: the `treesearch.protocols.Policy` served in-process by a transformers
causal LM, with its own batched, KV-cached sampling loop.

Usage:
    policy = TransformersPolicy.from_pretrained("runs/tiny", SamplingConfig(temperature=0.6),
                                                prompt_fn=lambda p: p.question)
    steps = policy.propose([Prefix(problem)], n=8, seed=0)          # steps[0][j]: j-th next step
    rows = policy.propose_widths([a, b], [1, 3], seed=0)            # 1 step after a, 3 after b, one batch
    greedy = policy.with_temperature(0.0)                           # the same model and caches, greedy
    paths = policy.rollout([Prefix(problem)], n=32, seed=0)         # paths[0][j]: list of steps
    reuse = TransformersPolicy(model, tokenizer, sampling, prompt_fn, prefix_cache=PrefixCacheConfig())
    with TransformersPolicy.from_pretrained(...) as policy: ...     # close(): model and prefix cache dropped
    scored = TransformersPolicy.from_pretrained("runs/tiny-sprm", sampling, prompt_fn, with_step_head=True)
    scored.rollout([Prefix(problem)], n=8, seed=0)[0][0][0].score   # SPRM step score, no 2nd forward

How a call runs: the model input of a prefix is the tokenised prompt (special tokens added)
followed by the exact `token_ids` of its steps (never re-tokenised text). Equal inputs are merged
(`merge_identical`: a beam search's kept beams often sampled the same steps), sorted by length
and packed into chunks of at most `batch_size` sample rows; each chunk prefills every distinct
input once (left padded), lets its samples read that KV in place (`shared_prefix`; a copy per
sample for models whose attention cannot share it) and decodes token by token, dropping finished
rows (`decode_loop`). Step ends follow the reference's think-aware separator
rule (`step_stops`).

Prefix reuse across calls (`prefix_cache=PrefixCacheConfig(...)`: opt-in in the constructor, on
by default in `from_pretrained` and so in the Hydra presets; without it every call re-prefills its
prefixes from the prompt): each chunk looks up the longest cached prefix of each
context (`policies.prefix_cache`) and forwards only the rest; every sample that ends on a step
separator stores the KV of what it fed (context + its step but the last token), so when a search
extends that child next round only the step's last token and nothing else is forwarded. Steps
that end the sequence ("eos", "length") are not stored: nothing extends them. Outputs equal those
without the cache up to float rounding (the same KV computed in another order). The cache is
only valid for the weights that filled it: `policy.prefix_cache.clear()` after changing them.

Context window: a path (prompt + prefix + generated tokens) ends "length" when it reaches the
model's context window (`policies.context_window`: max_position_embeddings, stretched by a
linear RoPE scaling), as vLLM's max_model_len ends it; a prompt longer than that is a
ValueError naming the problem (`policies.policy_requests.fit_window`).

Randomness: one `torch.Generator(seed)` per call (any integer seed, taken modulo 2**64; torch's
CPU generator reads only the seed's low 32 bits, so on CPU seeds 0 and 2**32 draw alike), so the
same prefixes, n, seed and config give the same samples; another prefix list or batch_size draws
differently (greedy output does not depend on either, up to float rounding: in bfloat16 a batched
matmul can round a near tie the other way).

Step scores with no extra forward (opt-in, `step_head=`, or `from_reflective(ReflectiveModel)`):
the decode loop also takes the LM's hidden states and scores each step-ending separator with the
head on the state of the token before it (`policies.decode_loop`); `Step.score` is the reading of
the step's own separator, and a step without one (the terminal "</think>Answer: ..." step) gets
the geometric mean of the path's earlier step scores (0.0 with none; None when an earlier step of
the prefix has no score), as `scorers.sprm_positions.step_score` defines and
`scorers.sprm_scorer.SPRMScorer` reproduces with a second forward. Without a head, Step.score is
None and the forwards are exactly those of before.

Compute accounting (`Step.tokens_forwarded`): an input's prefill tokens (those not taken from the
prefix cache) are counted on its first sample in each chunk (with equal prefixes in one call, on
the first of them: the others' samples ran no prefill), and each generated token that was
fed back to the model on the step that holds it (the last token of a sequence is never fed).
Samples of one context that drew the same tokens so far share one forward per token (forked
decoding, `policies.decode_batch`): that forward counts on the lowest of them only. Sums over
all returned steps equal the non-pad tokens the model ran.
"""
from __future__ import annotations

import copy
import sys
import threading
from itertools import accumulate
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from policies.allocator import keep_freed_memory
from policies.checkpoint import load_checkpoint
from policies.context_window import context_window
from policies.decode_loop import FINISH_CODES, ChunkOutput, ChunkRequest, StepHead, decode_request
from policies.model_lock import model_lock
from policies.policy_requests import (
    check_request, check_widths, close_full_paths, encode_contexts, fit_window, model_vocabulary, name_out_of_vocabulary,
    step_budget,
)
from policies.prefix_cache import PrefixCache, PrefixCacheConfig, PrefixKV, candidate_lengths, prefix_cache_config
from policies.reflective_model import ReflectiveModel
from policies.sampling_config import SamplingConfig, check_policy_inputs
from policies.shared_prefix import has_latent_attention, supports_shared_prefix
from policies.step_assembly import RawStep, decode_steps, decode_texts, text_ids
from policies.step_stops import StepStopRule, split_step_ends
from scorers.sprm_positions import step_score
from treesearch.config_checks import check_flag
from treesearch.records import Prefix, Problem, Step


@dataclass(frozen=True)
class _Sample:
    """One generated sequence before it becomes steps.

    token_ids, logprobs, boundary: per generated token (boundary: the token ends a step; None for
        a propose call's samples, which are one step each and never split).
    finish: "separator" | "eos" | "length". prefill_tokens: prefill work counted on this sample.
    scores: with a step head, per generated token the head's score of a boundary token, NaN on
        the others; None without a head.
    fed_tokens: decode work counted on this sample: its tokens fed back to the model, less those
        a forward shared with a sample that decoded alike counted on that one (`ChunkOutput.fed`).
    fed: with boundary flags, per generated token whether that work includes it; else None.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    boundary: tuple[bool, ...] | None
    finish: str
    prefill_tokens: int
    scores: list[float] | None = None
    fed_tokens: int = 0
    fed: tuple[bool, ...] | None = None

    def own_scores(self, start: int, end: int) -> list[float]:
        """The head's readings on tokens [start, end) (empty without a head)."""
        return [x for x in (self.scores or [])[start:end] if x == x]  # x == x drops NaN


def check_switches(shared_prefix: object, forked: object) -> None:
    """ValueError unless shared_prefix is true / false / None and forked true / false."""
    check_flag("TransformersPolicy", "shared_prefix", shared_prefix, or_none=True)
    check_flag("TransformersPolicy", "forked", forked)


class TransformersPolicy:
    """A `Policy` over a transformers causal LM and its tokenizer (see the module docstring).

    model: a causal LM called as `model(input_ids, attention_mask, position_ids, past_key_values,
        use_cache, logits_to_keep)` returning `.logits` and `.past_key_values` (any transformers
        `*ForCausalLM` with a DynamicCache).
    tokenizer: its tokenizer (`__call__`, `batch_decode`, `get_vocab`, `eos_token_id`).
    sampling: temperature, top-p, token limits, batch size, separator and think markers.
    prompt_fn: the prompt template, Problem -> text (the step tokens follow it directly).
    prefix_cache: reuse prefixes' KV across calls (module docstring); None (or enabled=False)
        re-prefills every prefix in every call. The store is `self.prefix_cache` (None when off).
    step_head: a head on the model's own hidden states (`policies.decode_loop.StepHead`, e.g. a
        `ReflectiveModel` whose `.lm` is `model`) that attaches `Step.score` while generating;
        None leaves scores None. `num_parameters` counts the LM only (the head runs once per
        step, not per token).
    shared_prefix: the samples of one context read its KV in place while decoding
        (`policies.shared_prefix`) instead of each holding a copy; None (default) whenever the
        model supports it and the contexts' sample counts are even, True whenever the model
        supports it (a ValueError for a model that does not: sliding-window or soft-capped
        attention decoded as plain full attention, wrong log-probs and samples), False always
        copies (the older path, kept for benchmarks).
    forked: the samples of one context that drew the same tokens so far share one forward per
        token and fork when they differ (`policies.decode_batch`; same samples, fewer forwards);
        False forwards every sample row on its own (the older path, kept for benchmarks). Hydra:
        `+policy.forked=false`.

    Threads: calls from several threads at once are safe. Without an engine each chunk decodes
    in its caller's thread, one chunk at a time (`policies.model_lock`: the model's attention is
    switched per chunk, so two decode loops, or a decode loop and a scorer, on one model object
    would corrupt each other); with
    `policies.continuous_engine.ContinuousEngine.attached(policy)` they decode together.

    Lifetime: nothing on the policy refers back to it, so `del policy` frees it and (with no
    other reference) its model at once. `close()` (or the end of a `with policy:` block) drops
    the model, step head and prefix cache even while references to the policy remain; later
    calls on it or its `with_temperature` copies are a RuntimeError.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        prefix_cache: PrefixCacheConfig | None = None,
        step_head: StepHead | None = None,
        shared_prefix: bool | None = None,
        forked: bool = True,
    ) -> None:
        check_policy_inputs(sampling, prompt_fn)
        check_switches(shared_prefix, forked)
        keep_freed_memory()  # per-token temporaries reuse heap blocks (policies/allocator.py)
        self.model = model.eval()
        self.step_head = step_head
        if shared_prefix is True and not supports_shared_prefix(model):
            raise ValueError(
                f"shared_prefix=True: this model ({getattr(getattr(model, 'config', None), 'model_type', '?')}) cannot "
                "decode over a shared prefix (sliding-window, soft-capped or latent attention, or an attention "
                "implementation other than sdpa / eager): leave shared_prefix unset (None), which uses it where it can")
        self.shared_prefix = shared_prefix  # decode_chunk's: None = whenever the model supports it
        self.forked = forked
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.prompt_fn = prompt_fn
        self.num_parameters: int = sum(p.numel() for p in model.parameters())
        self.device = next(model.parameters()).device
        self.vocabulary: int | None = model_vocabulary(model)  # the ids its embeddings can read (None: not said)
        # the longest sequence (prompt + prefix + generated) the model reads; None: no limit known
        self.context_window: int | None = context_window(getattr(model, "config", None))
        eos_ids = _eos_ids(model, tokenizer)
        self.rule = StepStopRule.from_tokenizer(
            tokenizer, _logit_width(model, tokenizer), sampling.separator, sampling.think_open,
            sampling.think_close, eos_ids, self.device, sampling.separator_match,
        )
        self._is_separator: list[bool] = self.rule.is_separator.tolist()
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = pad_id if pad_id is not None else eos_ids[0]
        prefix_cache = prefix_cache_config(prefix_cache)
        if prefix_cache is not None and prefix_cache.enabled and has_latent_attention(getattr(model, "config", None)):
            # its keys and values differ in width, which a cached prefix cannot hold (its first step failed)
            print("note: the model caches compressed attention (MLA: keys and values of different widths), which "
                  "the prefix cache cannot hold: prefixes are forwarded again each call", file=sys.stderr)
            prefix_cache = None
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(prefix_cache) if prefix_cache is not None and prefix_cache.enabled else None
        )
        # Who decodes a chunk (`chunk_decoder`): None is this thread; the lock guards the
        # tokenizer and the prefix cache, which the threads of a continuous engine share.
        self._chunk_decoder: Callable[[ChunkRequest], ChunkOutput] | None = None
        self.lock = threading.RLock()
        self._closed = threading.Event()  # set by close(); shared with with_temperature copies

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        dtype: torch.dtype | str = torch.float32,
        prefix_cache: PrefixCacheConfig | None = PrefixCacheConfig(),
        with_step_head: bool = False,
        shared_prefix: bool | None = None,
        device: str = "cpu",
        forked: bool = True,
    ) -> "TransformersPolicy":
        """Load a checkpoint directory (`policies.checkpoint`; FileNotFoundError names a missing
        file). prefix_cache: on by default here (what the Hydra presets build: a step-level search
        then forwards only each step's new tokens; tiny beam search took 1.7x the time without
        it, `python -m experiments.bench_prefix_reuse`); None re-prefills every prefix in every
        call (Hydra: `+policy.prefix_cache=null`).
        dtype: the LM's weights, a torch dtype or "float32" / "bfloat16" / "float16"
        (Hydra: `policy.dtype=bfloat16`; on a CPU with bf16 matmuls SmolLM2 beam search ran
        1.7x the tokens/s of float32, `python -m experiments.bench_dtype --model smollm2`; the
        samples then differ from float32's). with_step_head=True loads it as a `ReflectiveModel`
        (score_module.pt beside it) whose head scores the steps. shared_prefix, forked: see the class.
        device: where the model runs, "cpu" or "cuda[:N]" (Hydra: `+policy.device=cuda`;
        `policies.devices.resolve_device` rejects one torch cannot see before loading); the
        prefix cache keeps its entries on that device (its `max_bytes` is then GPU memory)."""
        # settings named before minutes of loading (a YAML "no" was read as true)
        check_policy_inputs(sampling, prompt_fn)
        check_flag("TransformersPolicy", "with_step_head", with_step_head)
        check_switches(shared_prefix, forked)
        prefix_cache = prefix_cache_config(prefix_cache)
        if with_step_head:
            reflective, tokenizer = ReflectiveModel.from_pretrained(path, dtype, device=device)
            return cls.from_reflective(reflective, tokenizer, sampling, prompt_fn, prefix_cache, shared_prefix, forked)
        model, tokenizer = load_checkpoint(path, dtype, device)
        return cls(model, tokenizer, sampling, prompt_fn, prefix_cache, shared_prefix=shared_prefix, forked=forked)

    @classmethod
    def from_reflective(
        cls,
        reflective: ReflectiveModel,
        tokenizer: Any,
        sampling: SamplingConfig,
        prompt_fn: Callable[[Problem], str],
        prefix_cache: PrefixCacheConfig | None = None,
        shared_prefix: bool | None = None,
        forked: bool = True,
    ) -> "TransformersPolicy":
        """A policy over a `policies.reflective_model.ReflectiveModel`: its LM generates and its
        SPRM head scores each step on the way (Step.score, no extra forward)."""
        return cls(reflective.lm, tokenizer, sampling, prompt_fn, prefix_cache, step_head=reflective,
                   shared_prefix=shared_prefix, forked=forked)

    def propose(
        self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """n sampled next steps per prefix, result[i][j] after prefixes[i]. A step ends at a
        step separator (kept in its text), at EOS (in token_ids, not in text), or at
        max_step_tokens / max_total_tokens / the model's context window ("length"; a step that
        ends on a separator with no token of max_total_tokens or the window left is "length"
        too: it ends its path, `policy_requests.close_full_paths`); with stop_at_step=False it
        runs to EOS or max_total_tokens. A prefix with no token budget left gets empty "length"
        steps; a prompt longer than the context window is a ValueError."""
        widths = check_request(prefixes, n, seed)
        samples = self._generate(prefixes, widths, seed, stop_at_boundary=stop_at_step, with_boundary=False)
        return self._whole_steps(prefixes, samples)

    def propose_widths(
        self, prefixes: Sequence[Prefix], widths: Sequence[int], seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """widths[i] sampled next steps after prefixes[i], all in one batched decode (REBASE and
        particle filtering give each node its own width); otherwise as `propose`, which is this
        with the same width for every prefix (same samples for the same seed)."""
        checked = check_widths(prefixes, widths, seed)
        samples = self._generate(prefixes, checked, seed, stop_at_boundary=stop_at_step, with_boundary=False)
        return self._whole_steps(prefixes, samples)

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        """n sampled completions per prefix, result[i][j] = the steps of the j-th completion of
        prefixes[i]: generated to EOS or max_total_tokens in one loop, then split at step
        boundaries (a run of separators stays with the step it ends). Intermediate steps end on
        "separator", the last one on "eos" or "length"."""
        widths = check_request(prefixes, n, seed)
        samples = self._generate(prefixes, widths, seed, stop_at_boundary=False, with_boundary=True)
        raw = [
            [self._split_steps(sample, prefix) for sample in row] for prefix, row in zip(prefixes, samples)
        ]
        with self.lock:
            return decode_steps(raw, self.tokenizer)

    def with_temperature(self, temperature: float) -> "TransformersPolicy":
        """A policy on the same model, tokenizer, SPRM head, prefix cache and locks that samples
        at `temperature` (0: greedy); beam search's lookahead steps use it
        (`treesearch.protocols.TemperaturePolicy`). Its chunks go to whatever decodes this
        policy's at the time (this thread, or a continuous engine attached later)."""
        other = copy.copy(self)
        other.sampling = replace(self.sampling, temperature=temperature)
        other.chunk_decoder = lambda request: self.chunk_decoder(request)
        return other

    @property
    def chunk_decoder(self) -> Callable[[ChunkRequest], ChunkOutput]:
        """Who decodes a chunk: this thread (`_decode_here`, the default) or an attached
        `policies.continuous_engine`, which lets calls from many threads decode together. The
        default is stored as None, not as the bound method: that would be a reference cycle
        (policy -> method -> policy), which kept the policy and its model alive after `del
        policy` until a garbage collection, and for good once `gc.freeze()` had frozen it."""
        return self._decode_here if self._chunk_decoder is None else self._chunk_decoder

    @chunk_decoder.setter
    def chunk_decoder(self, decoder: Callable[[ChunkRequest], ChunkOutput]) -> None:
        """Decode the chunks with decoder; this policy's own `_decode_here` restores the default."""
        self._chunk_decoder = None if decoder == self._decode_here else decoder

    def close(self) -> None:
        """Drop the model, the step head and the prefix cache's entries (their memory is freed
        once nothing else holds them, e.g. the caller's own `model`; a `with_temperature` copy
        alive still holds the model). Later calls on this policy or its `with_temperature`
        copies are a RuntimeError; closing again does nothing."""
        self._closed.set()
        with self.lock:
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self.model, self.step_head, self.prefix_cache = None, None, None

    def __enter__(self) -> "TransformersPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- phases -------------------------------------------------------------------------------

    def _generate(
        self, prefixes: Sequence[Prefix], widths: list[int], seed: int, stop_at_boundary: bool, with_boundary: bool
    ) -> list[list[_Sample]]:
        """Sample widths[i] sequences after prefixes[i] (a checked request), batched over all
        prefixes; result in input order (with_boundary: each sample's boundary flags too, to split
        it into steps)."""
        self._check_open()
        with self.lock:
            contexts, prompt_lengths = encode_contexts(self.tokenizer, self.prompt_fn, prefixes)
        budgets = fit_window(
            [step_budget(self.sampling, prefix, stop_at_boundary) for prefix in prefixes], contexts,
            prompt_lengths, prefixes, self.context_window, "the model's context window (max_position_embeddings, x its RoPE scaling factor)",
        )
        samples: list[list[_Sample]] = [[] for _ in prefixes]
        # torch seeds are 64-bit: any integer maps into that range as two's complement, so -1 and
        # 2**64 - 1 draw alike (as torch itself takes a negative seed) and 2**64 is 0, not an overflow
        generator = torch.Generator(device=self.device).manual_seed(int(seed) % 2**64)
        items = merge_identical(contexts, budgets)  # less padding per chunk; one context per distinct input
        counts = [sum(widths[i] for i in owners) if budgets[owners[0]] > 0 else 0 for owners in items]
        name_out_of_vocabulary(prefixes, contexts, self.vocabulary)  # before the forward (CUDA would assert)
        self._decode_chunks(prefixes, widths, contexts, prompt_lengths, budgets, items, counts, generator,
                            stop_at_boundary, with_boundary, samples)
        return close_full_paths(samples, prefixes, self.sampling, contexts, self.context_window) if stop_at_boundary else samples

    def _decode_chunks(
        self, prefixes: Sequence[Prefix], widths: list[int], contexts: list[list[int]], prompt_lengths: list[int],
        budgets: list[int], items: list[list[int]], counts: list[int], generator: torch.Generator,
        stop_at_boundary: bool, with_boundary: bool, samples: list[list[_Sample]],
    ) -> None:
        """Decode the merged contexts chunk by chunk into samples (`_generate`)."""
        owners_in_row_order = [i for owners, count in zip(items, counts) if count for i in owners for _ in range(widths[i])]
        done_rows = 0  # rows handed to earlier chunks (an item may span chunks)
        for chunk in plan_chunks(counts, self.sampling.batch_size):
            members = [items[k][0] for k, _ in chunk]  # prefix indices, one per unique context
            row_context = [u for u, (_, count) in enumerate(chunk) for _ in range(count)]
            row_owner = owners_in_row_order[done_rows: done_rows + len(row_context)]  # the prefix of each row
            done_rows += len(row_context)
            with self.lock:
                past = [self._cached_prefix(contexts[i], prompt_lengths[i], prefixes[i]) for i in members]
            out = self.chunk_decoder(ChunkRequest(
                [contexts[i] for i in members], row_context, [budgets[members[u]] for u in row_context],
                stop_at_boundary, self.sampling.temperature, self.sampling.top_p, generator,
                past=past if self.prefix_cache is not None else None,
                keep_kv=self.prefix_cache is not None and stop_at_boundary,
                shared_prefix=self.shared_prefix, kv_wanted=self._kv_is_new, forked=self.forked,
                repetition_penalty=self.sampling.repetition_penalty,
            ))
            cached = dict(zip(row_context, out.cached))  # per context (a sliding window may cut its past: `gap_free_past`)
            prefill_sizes = [len(contexts[i]) - cached[u] for u, i in enumerate(members)]
            _collect(out, row_owner, row_context, prefill_sizes, samples, with_boundary)
            with self.lock:
                self._store_fed(out, [contexts[i] for i in members], row_context)
        for i in range(len(prefixes)):
            if budgets[i] <= 0:
                no_scores = None if self.step_head is None else []
                samples[i] = [_Sample((), (), () if with_boundary else None, "length", 0, no_scores) for _ in range(widths[i])]

    def _decode_here(self, request: ChunkRequest) -> ChunkOutput:
        """Decode one chunk in this thread, to the end (`policies.decode_loop.decode_request`),
        while nothing else runs this model object (`policies.model_lock`: another policy or a scorer on it)."""
        model, step_head = self.model, self.step_head
        if model is None:  # closed while a call was on its way (or through a with_temperature copy)
            self._check_open()
        with model_lock(model):
            return decode_request(model, request, self.rule, self.pad_id, step_head)

    def _check_open(self) -> None:
        """RuntimeError once `close()` ran on this policy or the one it was copied from."""
        if self._closed.is_set():
            raise RuntimeError("this TransformersPolicy was closed (its close(), or the end of its with block); "
                               "build a new one")

    def _cached_prefix(self, context: list[int], prompt_length: int, prefix: Prefix) -> PrefixKV | None:
        """The KV of the longest cached prefix of context (None: none, or no cache)."""
        if self.prefix_cache is None:
            return None
        lengths = candidate_lengths(len(context), prompt_length, [s.num_tokens for s in prefix.steps])
        hit = self.prefix_cache.longest(context, lengths)
        return None if hit is None else hit[1]

    def _kv_is_new(self, key: tuple[int, ...]) -> bool:
        """Whether the decode loop should copy out the fed KV stored under key: not when the prefix
        cache has it (that entry then becomes the most recently used, as storing it would)."""
        with self.lock:  # the continuous engine decodes on its own thread
            return self.prefix_cache is None or not self.prefix_cache.touch(key)

    def _store_fed(self, out: ChunkOutput, contexts: list[list[int]], row_context: list[int]) -> None:
        """Store what each row that ended on a separator fed: its context + its tokens but the last."""
        if self.prefix_cache is None:
            return
        lengths = out.lengths.tolist()
        token_ids = out.token_ids[:, : max(lengths, default=0)].tolist()  # one conversion, not one per row
        for r, kv in enumerate(out.fed_kv):
            if kv is not None:
                self.prefix_cache.store(contexts[row_context[r]] + token_ids[r][: lengths[r] - 1], kv)

    def _whole_steps(self, prefixes: Sequence[Prefix], samples: list[list[_Sample]]) -> list[list[Step]]:
        """Each sample as one step, samples[i][j] -> result[i][j] (every generated token but the
        last was fed back); the texts decoded in one batch, without a final EOS token. Straight
        from the samples to Steps: no intermediate RawStep per sample (a tiny beam search makes
        4k steps per search)."""
        flat = [(sample, prefix) for prefix, row in zip(prefixes, samples) for sample in row]
        with self.lock:
            texts = decode_texts(self.tokenizer, [text_ids(s.token_ids, s.finish) for s, _ in flat])
        steps = iter([
            Step(text, sample.token_ids, sample.logprobs, sample.finish,  # type: ignore[arg-type]
                 sample.prefill_tokens + sample.fed_tokens,
                 self._step_score(sample, 0, len(sample.token_ids), prefix.steps, ()))
            for (sample, prefix), text in zip(flat, texts)
        ])
        return [[next(steps) for _ in row] for row in samples]

    def _split_steps(self, sample: _Sample, prefix: Prefix) -> list[RawStep]:
        """Cut one rollout at its step ends; tokens_forwarded per step as in the module docstring,
        scores as in `scorers.sprm_positions.step_score` (after the prefix's step scores)."""
        ends = split_step_ends(sample.boundary or (), [self._is_separator[t] for t in sample.token_ids])
        steps: list[RawStep] = []
        start = 0
        for k, end in enumerate(ends):
            last = k == len(ends) - 1
            fed = sum((sample.fed or ())[start:end])
            score = self._step_score(sample, start, end, prefix.steps, steps)
            steps.append(
                RawStep(
                    sample.token_ids[start:end], sample.logprobs[start:end],
                    sample.finish if last else "separator", fed + (sample.prefill_tokens if k == 0 else 0),
                    score,
                )
            )
            start = end
        return steps

    def _step_score(
        self, sample: _Sample, start: int, end: int, prefix_steps: Sequence[Step], earlier: Sequence[RawStep]
    ) -> float | None:
        """None without a step head (nothing read or built), else `step_score` of the head's
        readings on the sample's tokens [start, end) after the scores of the prefix's steps and
        of this sample's earlier steps."""
        if self.step_head is None:
            return None
        return step_score(sample.own_scores(start, end), [s.score for s in (*prefix_steps, *earlier)])


def plan_chunks(counts: Sequence[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Pack counts[k] sample rows of item k into chunks of at most batch_size rows, in order.
    Returns per chunk a list of (k, rows of item k in it); an item larger than the room left is
    split across chunks (each part prefills its prefix again). E.g. counts [4, 4], batch 5 ->
    [[(0, 4), (1, 1)], [(1, 3)]]."""
    chunks: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    room = batch_size
    for k, count in enumerate(counts):
        while count > 0:
            take = min(count, room)
            current.append((k, take))
            count, room = count - take, room - take
            if room == 0:
                chunks.append(current)
                current, room = [], batch_size
    if current:
        chunks.append(current)
    return chunks


def merge_identical(contexts: Sequence[Sequence[int]], budgets: Sequence[int]) -> list[list[int]]:
    """Group the prefixes whose model inputs and token budgets are equal, shortest input first
    (less padding per chunk): per group the prefix indices in input order, so one context is
    prefilled (and its cached prefix copied and looked up) once for all their samples.
    A step-level beam search asks for many equal prefixes: the tiny policy's beam search, 32
    problems at N = 32, sent 64 contexts per call of which 8 were distinct (its kept beams
    had sampled the same steps). E.g. contexts [[1, 2], [3], [1, 2]] -> [[1], [0, 2]]."""
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for i, (ids, budget) in enumerate(zip(contexts, budgets)):
        groups.setdefault((tuple(ids), budget), []).append(i)
    return sorted(groups.values(), key=lambda owners: len(contexts[owners[0]]))


def _collect(
    out, row_owner: list[int], row_context: list[int], prefill_sizes: list[int], samples, with_boundary: bool
) -> None:
    """Append each chunk row to samples[the prefix it belongs to] (row_owner), in row order; a
    context's prefill goes on its first row, each decode forward on the row it was counted on
    (`ChunkOutput.fed`); boundary and fed flags only with_boundary."""
    lengths, finish = out.lengths.tolist(), out.finish.tolist()
    rows = _RowSpans(out.lengths, lengths, int(out.token_ids.shape[1]))
    token_ids, logprobs = rows.tuples(out.token_ids), rows.tuples(out.logprobs)
    boundary = rows.tuples(out.boundary) if with_boundary else None
    fed_tokens = out.fed.sum(-1).tolist()
    fed = rows.tuples(out.fed) if with_boundary else None
    scores = None if out.step_scores is None else rows.lists(out.step_scores)
    seen: set[int] = set()
    for r, u in enumerate(row_context):
        samples[row_owner[r]].append(
            _Sample(
                token_ids[r], logprobs[r], None if boundary is None else boundary[r],
                FINISH_CODES[finish[r]], prefill_sizes[u] if u not in seen else 0,
                None if scores is None else scores[r], fed_tokens[r], None if fed is None else fed[r],
            )
        )
        seen.add(u)


class _RowSpans:
    """Each row's first lengths[r] entries of a chunk's [R, T] outputs, converted to Python in one
    call over those entries only: the rectangle up to the longest row converts several times as
    many (a step-level beam search's rows are ~7 tokens, a chunk's longest up to 64; the tiny
    policy's beam search spent 0.035 s turning samples into steps and texts that way, 0.026 s
    this way, `experiments/bench_engine_overhead.py`)."""

    def __init__(self, lengths: torch.Tensor, as_list: list[int], columns: int) -> None:
        """lengths [R] long (as_list: the same as a list) of outputs [R, columns]."""
        valid = torch.arange(columns, device=lengths.device) < lengths[:, None]  # [R, T]
        self.flat_index = valid.reshape(-1).nonzero().squeeze(-1)  # the valid entries of [R, T], row by row
        self.bounds = list(zip(accumulate([0, *as_list[:-1]]), accumulate(as_list)))

    def lists(self, values: torch.Tensor) -> list[list]:
        """values [R, T] as one list per row, each its row's valid entries."""
        flat = self._valid(values)
        return [flat[a:b] for a, b in self.bounds]

    def tuples(self, values: torch.Tensor) -> list[tuple]:
        """`lists`, each row a tuple."""
        flat = self._valid(values)
        return [tuple(flat[a:b]) for a, b in self.bounds]

    def _valid(self, values: torch.Tensor) -> list:
        """The valid entries of values [R, T], row by row, as one Python list."""
        return values.reshape(-1).index_select(0, self.flat_index).tolist()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config (which may list several)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (getattr(tokenizer, "eos_token_id", None), config_eos):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return ids


def _logit_width(model: Any, tokenizer: Any) -> int:
    """Size of the model's output vocabulary (may exceed the tokenizer's)."""
    config_size = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    return max(int(config_size), len(tokenizer))
