"""Engine-independent step assembly: turn token completions from any serving engine (vLLM
offline, an OpenAI-compatible server, ...) into reasoning steps under the reference's
think-aware separator rule, resubmitting a sample whose engine stopped on a separator that is
not a step boundary.

Usage:
    marks = StepMarks.from_rule(rule)                           # rule: policies.step_stops.StepStopRule
    requests = [SampleRequest(context_ids, budget, derive_seed(seed, i, j)) for ...]
    samples = sample_continuations(requests, complete, marks, stop_at_step=True)
    raw = [whole_step(s) for s in samples]                      # propose: one step per sample
    raw = [split_steps(s, marks) for s in samples]              # rollout: a sample cut into steps
    steps = decode_steps([raw], tokenizer)                      # nested lists of treesearch Steps

An engine plugs in through one batch function, `complete(requests: Sequence[CompletionRequest])
-> list[Completion]`: for each request, continue `token_ids` for at most `max_tokens` tokens,
sampled with `seed`, stopping after any token of `stop_token_ids` or EOS (the stop token or EOS
kept in the returned ids), and report each generated token's log-probability at temperature 1
plus how many prompt tokens its prefix cache served. Temperature and top-p are the engine's
business (the caller configures them).

Why a continuation loop: an engine's stop-token list fires on EVERY separator token, but a
separator ends a step only inside <think> ... </think> and not right after another separator or
<think> (`policies.step_stops`). `sample_continuations` replays the rule over context + generated
tokens; a stop that is not a boundary is resubmitted as context + tokens so far with the budget
left and the seed `derive_seed(sample seed, round)`, until a boundary, EOS or the budget. Tokens
an engine produced past the first boundary or EOS are dropped (an engine that ignores stop ids
still gives correct steps). One `complete` call per round carries every sample still running.

Compute accounting (`SampleTokens.tokens_forwarded`): the real work of every request of a sample,
i.e. its prompt tokens not served from the engine's prefix cache plus its generated tokens but the
last (which is never fed back); `whole_step` / `split_steps` hand it to the steps so sums over
steps equal it (as `TransformersPolicy` does: prefill on the first step, each fed token on the
step that holds it).

Tests: `.venv/bin/pytest tests/test_vllm_policy.py -m "not vllm"` (a scripted engine, no vLLM).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from policies.step_stops import StepStopRule, split_step_ends
from treesearch.records import Finish, Step


@dataclass(frozen=True)
class StepMarks:
    """The token ids the boundary rule reads, as plain Python sets (no tensors per token).

    separator_ids: the separator ids (`policies.step_stops.separator_mask` under the sampling's
        separator_match: every id whose text ends with the separator, or its own token alone).
    eos_ids: ids that end the sequence.
    think_open_id, think_close_id: the single-token think markers, both None when the tokenizer
        lacks either (then a separator ends a step anywhere, as in `StepStopRule`).
    """

    separator_ids: frozenset[int]
    eos_ids: frozenset[int]
    think_open_id: int | None = None
    think_close_id: int | None = None

    def __post_init__(self) -> None:
        if not self.eos_ids:
            raise ValueError("StepMarks.eos_ids is empty; at least one EOS id is needed")
        if (self.think_open_id is None) != (self.think_close_id is None):
            raise ValueError(
                f"think_open_id={self.think_open_id!r} and think_close_id={self.think_close_id!r}: "
                "give both or neither"
            )

    @classmethod
    def from_rule(cls, rule: StepStopRule) -> "StepMarks":
        """The same lookups as a `StepStopRule` (built once per policy from its tokenizer)."""
        separators = rule.is_separator.nonzero().squeeze(-1).tolist()
        eos = rule.is_eos.nonzero().squeeze(-1).tolist()
        return cls(frozenset(separators), frozenset(eos), rule.think_open_id, rule.think_close_id)

    @property
    def think_aware(self) -> bool:
        return self.think_open_id is not None

    def start(self, context: Sequence[int]) -> "RuleState":
        """The rule's state after reading context (prompt + prefix tokens), as
        `StepStopRule.initial_state` computes it for one row."""
        inside = not self.think_aware
        if self.think_aware:
            for token in reversed(context):
                if token == self.think_open_id or token == self.think_close_id:
                    inside = token == self.think_open_id
                    break
        last = context[-1] if context else None
        after = last is not None and (last in self.separator_ids or last == self.think_open_id)
        return RuleState(inside, after)

    def advance(self, state: "RuleState", token: int) -> tuple[bool, "RuleState"]:
        """(the token ends a step, the state after it): `StepStopRule.advance` for one token."""
        is_separator = token in self.separator_ids
        boundary = is_separator and state.inside_think and not state.after_separator_or_open
        if not self.think_aware:
            return boundary, RuleState(state.inside_think, is_separator)
        is_open = token == self.think_open_id
        inside = (state.inside_think or is_open) and token != self.think_close_id
        return boundary, RuleState(inside, is_separator or is_open)

    def boundaries(self, context: Sequence[int], generated: Sequence[int]) -> list[bool]:
        """Per generated token: does it end a step (the rule replayed over context + generated)?"""
        state, flags = self.start(context), []
        for token in generated:
            boundary, state = self.advance(state, token)
            flags.append(boundary)
        return flags


class RuleState(NamedTuple):
    """inside_think: the path is inside <think> ... </think> (always True when not think-aware);
    after_separator_or_open: the last token was a separator or <think>."""

    inside_think: bool
    after_separator_or_open: bool


@dataclass(frozen=True)
class CompletionRequest:
    """One engine request.

    token_ids: the full model input (prompt + prefix + what the sample generated so far).
    max_tokens: most tokens to generate (>= 1).
    seed: the sampling seed of this request (ignored by greedy engines).
    stop_token_ids: stop after any of these (kept in the output); empty: run to EOS or max_tokens.
    """

    token_ids: tuple[int, ...]
    max_tokens: int
    seed: int
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What an engine returned for one request.

    token_ids: generated ids, a stop token or EOS included (possibly empty: the engine had no
        room, e.g. the prompt fills its context window).
    logprobs: log-probability of each generated token under the raw model (temperature 1).
    prompt_tokens: len(request.token_ids).
    cached_tokens: prompt tokens served from the engine's prefix cache (0 when it cannot say).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    prompt_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Completion has {len(self.token_ids)} token_ids but {len(self.logprobs)} logprobs")
        if not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(
                f"Completion.cached_tokens={self.cached_tokens} not in [0, prompt_tokens={self.prompt_tokens}]"
            )


CompleteFn = Callable[[Sequence[CompletionRequest]], list[Completion]]


@dataclass(frozen=True)
class SampleRequest:
    """One sample to draw: continue `context` for at most `budget` tokens (<= 0: none), with
    `seed` as the sample's base seed (round r uses derive_seed(seed, r))."""

    context: tuple[int, ...]
    budget: int
    seed: int


@dataclass(frozen=True)
class SampleTokens:
    """One sampled continuation, possibly assembled from several completions.

    token_ids, logprobs: the generated tokens and their temperature-1 log-probs.
    boundary: per token, it ends a step under the rule (over context + tokens).
    finish: "separator" (ended on a boundary; only when stopping at steps), "eos", or "length"
        (the budget, or the engine's context window, cut it).
    tokens_forwarded: the real work of all its requests (module docstring).
    prompt_tokens, cached_tokens: summed over its requests (prompt tokens sent, and served
        from the engine's prefix cache).
    requests: completions it took (1 + continuations; 0 when there was no budget).
    generated_tokens: tokens the engine returned over its requests (any dropped past an end
        included).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    boundary: tuple[bool, ...]
    finish: Finish
    tokens_forwarded: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class RawStep:
    """A step before its text is decoded (`decode_steps` decodes all texts in one batch); score:
    the step head's reading at the step's end, None without a head."""

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    finish: Finish
    tokens_forwarded: int
    score: float | None = None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integer parts (e.g. call seed, prefix index,
    sample index, round): the same parts give the same seed on any machine and Python run."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


# -- sampling with continuation ---------------------------------------------------------------


@dataclass
class _Running:
    """A sample being drawn (local to `sample_continuations`, never returned)."""

    request: SampleRequest
    state: RuleState
    token_ids: list[int]
    logprobs: list[float]
    boundary: list[bool]
    forwarded: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    generated: int = 0
    finish: Finish | None = None


def sample_continuations(
    samples: Sequence[SampleRequest], complete: CompleteFn, marks: StepMarks, stop_at_step: bool
) -> list[SampleTokens]:
    """Draw every sample, in input order (module docstring). With stop_at_step a sample ends at
    the first step boundary; without, it runs to EOS or its budget in one request."""
    running = [_Running(s, marks.start(s.context), [], [], []) for s in samples]
    for item in running:
        if item.request.budget <= 0:
            item.finish = "length"
    stop_ids = tuple(sorted(marks.separator_ids)) if stop_at_step else ()
    round_index = 0
    while active := [item for item in running if item.finish is None]:
        requests = [_next_request(item, stop_ids, round_index) for item in active]
        completions = complete(requests)
        if len(completions) != len(requests):
            raise ValueError(f"complete() returned {len(completions)} completions for {len(requests)} requests")
        for item, request, completion in zip(active, requests, completions):
            _absorb(item, request, completion, marks, stop_at_step)
        round_index += 1
    return [_finished(item) for item in running]


def _next_request(item: _Running, stop_ids: tuple[int, ...], round_index: int) -> CompletionRequest:
    """Context + what the sample has so far, with the budget left and this round's seed."""
    left = item.request.budget - len(item.token_ids)
    return CompletionRequest(
        item.request.context + tuple(item.token_ids), left, derive_seed(item.request.seed, round_index), stop_ids
    )


def _absorb(
    item: _Running, request: CompletionRequest, completion: Completion, marks: StepMarks, stop_at_step: bool
) -> None:
    """Append a completion's tokens up to the first EOS or (stop_at_step) boundary; decide
    whether the sample is done and how it finished."""
    item.requests += 1
    item.prompt_tokens += completion.prompt_tokens
    item.cached_tokens += completion.cached_tokens
    item.generated += len(completion.token_ids)
    item.forwarded += completion.prompt_tokens - completion.cached_tokens + max(len(completion.token_ids) - 1, 0)
    for token, logprob in zip(completion.token_ids[: request.max_tokens], completion.logprobs):
        is_boundary, item.state = marks.advance(item.state, token)
        item.token_ids.append(token)
        item.logprobs.append(logprob)
        item.boundary.append(is_boundary)
        if token in marks.eos_ids:  # EOS wins over a boundary, as in the decode loop
            item.finish = "eos"
            return
        if is_boundary and stop_at_step:
            item.finish = "separator"
            return
    if len(item.token_ids) >= item.request.budget:
        item.finish = "length"
    elif not (completion.token_ids and completion.token_ids[-1] in request.stop_token_ids):
        item.finish = "length"  # the engine cut it short (e.g. its context window), not a stop
    # else: stopped on a separator that is no boundary: resubmitted next round


def _finished(item: _Running) -> SampleTokens:
    assert item.finish is not None
    return SampleTokens(
        tuple(item.token_ids), tuple(item.logprobs), tuple(item.boundary), item.finish, item.forwarded,
        item.prompt_tokens, item.cached_tokens, item.requests, item.generated,
    )


# -- samples into steps -------------------------------------------------------------------------


def whole_step(sample: SampleTokens) -> RawStep:
    """The sample as one step (propose): all of its work on it."""
    return RawStep(sample.token_ids, sample.logprobs, sample.finish, sample.tokens_forwarded)


def split_steps(sample: SampleTokens, marks: StepMarks) -> list[RawStep]:
    """Cut a sample that ran to the end (rollout) at its boundaries, a run of separators staying
    with the step it ends (`split_step_ends`); inner steps finish "separator", the last one as
    the sample. tokens_forwarded: each step its own tokens (the last step one less: its last
    token is never fed), and the first step the rest of the sample's work (the prefill)."""
    ends = split_step_ends(list(sample.boundary), [t in marks.separator_ids for t in sample.token_ids])
    fed = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    if fed[-1] > 0:
        fed[-1] -= 1
    fed[0] += sample.tokens_forwarded - sum(fed)
    steps, start = [], 0
    for k, end in enumerate(ends):
        finish: Finish = sample.finish if k == len(ends) - 1 else "separator"
        steps.append(RawStep(sample.token_ids[start:end], sample.logprobs[start:end], finish, fed[k]))
        start = end
    return steps


def decode_texts(tokenizer: Any, sequences: Sequence[Sequence[int]]) -> list[str]:
    """Each token-id sequence as text, special tokens kept and no clean-up of spaces: exactly
    `tokenizer.batch_decode(..., skip_special_tokens=False, clean_up_tokenization_spaces=False)`,
    but a fast tokenizer's Rust backend decodes the whole batch in one call (transformers' own
    path checks every id of every sequence in Python first: 3% of a Best-of-32 run's wall time
    on the tiny policy, `experiments/bench_engine_overhead.py`), and equal sequences are decoded
    once (a step-level search samples the same step many times: the tiny policy's beam search,
    32 problems at N = 32: 4212 steps per search, 406 different texts)."""
    if not sequences:
        return []
    keys = [tuple(ids) for ids in sequences]
    unique = list(dict.fromkeys(keys))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        texts = backend.decode_batch([list(ids) for ids in unique], skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(
            [list(ids) for ids in unique], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
    by_key = dict(zip(unique, texts))
    return [by_key[key] for key in keys]


def text_ids(token_ids: Sequence[int], finish: str) -> Sequence[int]:
    """The ids a step's text is decoded from: all of them but a final EOS token (a separator stays)."""
    return token_ids[:-1] if finish == "eos" else token_ids


def decode_steps(nested: list, tokenizer: Any) -> list:
    """Turn nested lists of RawStep into Steps, decoding every text in one batched call. The text
    keeps the separator and leaves out a final EOS token (as `TransformersPolicy`)."""
    flat: list[RawStep] = []
    _flatten(nested, flat)
    texts = decode_texts(tokenizer, [text_ids(s.token_ids, s.finish) for s in flat])
    steps = iter(
        Step(text, tuple(s.token_ids), tuple(s.logprobs), s.finish, s.tokens_forwarded, s.score)
        for s, text in zip(flat, texts)
    )
    return _rebuild(nested, steps)


def _flatten(nested: list, out: list[RawStep]) -> None:
    for item in nested:
        if isinstance(item, list):
            _flatten(item, out)
        else:
            out.append(item)


def _rebuild(nested: list, steps) -> list:
    return [_rebuild(item, steps) if isinstance(item, list) else next(steps) for item in nested]
