"""Raw-text completion for the policy service: the `TextCompleter` protocol and its in-process
transformers implementation, `TransformersCompleter`, which batches many requests in one loop.

Usage:
    completer = TransformersCompleter.from_pretrained("outputs/checkpoints/tiny-arith/final")
    texts = completer.complete([CompletionRequest("Q: 2+3?\\n<think>", n=4, max_tokens=64,
                                                  temperature=0.6, stop=(".\\n\\n",), seed=0)])
    texts[0]    # 4 completions of the first request (the text after the prompt)

Semantics (those of vLLM's `LLM.generate`, which the reference's policy service calls and
`experiments.services.vllm_completer` wraps, so both backends answer alike): the prompt is
tokenised with the tokenizer's special tokens (a BOS where the tokenizer adds one); a completion
ends at EOS (not in the text), after max_tokens tokens, or at the first stop string, which is kept
in the text (the reference's include_stop_str_in_output=True); then the repetition penalty
(tokens of the prompt and of the completion so far: a positive logit divided by it, a negative
one multiplied), the temperature (0: greedy), and top-p, in that order.

How a batch runs: the requests' rows (n per request) are sorted by prompt length and cut into
chunks of at most `max_rows`; each chunk prefills every distinct prompt once (left padded,
`policies.decode_loop.prefill`), lets its rows read that KV in place (`policies.shared_prefix`;
a copy per row where the model's attention cannot share it) and decodes token by token, dropping
finished rows from the batch.

Seeds: row j of a request samples from its own `torch.Generator` seeded from (seed, j), and a
row's logits do not depend on the other rows (left padding is masked), so a request's
completions depend on its own fields only, not on what it was batched with (up to float
rounding). seed None draws a fresh seed.
"""
from __future__ import annotations

import copy
import math
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from experiments.services.token_chars import max_token_chars
from policies.checkpoint import load_checkpoint
from policies.context_window import context_window
from policies.decode_loop import penalised, prefill
from policies.shared_prefix import SharedPrefixCache, worth_sharing
from policies.slot_cache import KV_RESERVE_LIMIT
from policies.sampling import draw_tokens, top_p_filter
from policies.sampling_config import VLLM_MIN_TEMPERATURE


@dataclass(frozen=True)
class CompletionRequest:
    """One `/generate` request as the backends see it.

    prompt: the raw text to continue. n: completions (>= 1). max_tokens: most new tokens (>= 1).
    temperature: 0 (greedy) or a finite number >= 0.01 (the service's range: vLLM samples a
    smaller one at 0.01). stop: stop strings (kept in the output). seed: None = unseeded.
    """

    prompt: str
    n: int
    max_tokens: int
    temperature: float
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CompletionRequest.{name}={value!r} must be an integer >= 1")
        if not (self.temperature == 0 or VLLM_MIN_TEMPERATURE <= self.temperature < math.inf):
            raise ValueError(f"CompletionRequest.temperature={self.temperature!r} must be 0 or a finite number "
                             f">= {VLLM_MIN_TEMPERATURE}")
        if any(not s for s in self.stop):
            raise ValueError(f"CompletionRequest.stop={self.stop!r} holds an empty string")


@dataclass(frozen=True)
class SamplingDefaults:
    """Server-side sampling settings a request cannot change (the reference fixes top_p=0.95 and
    repetition_penalty=1.05 in its policy service). top_p in (0, 1]; repetition_penalty finite, > 0."""

    top_p: float = 0.95
    repetition_penalty: float = 1.05

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0 < self.repetition_penalty < math.inf:  # vLLM refuses inf at each request
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0")


class TextCompleter(Protocol):
    """A backend of the policy service (owned here, the consumer).

    name: the backend's name for /health. max_model_len: most tokens of prompt + completion.
    max_token_chars (optional): most characters one token covers (`token_chars.max_token_chars`),
    so a prompt too long for the context is refused before it is tokenised; None or absent: no bound.
    """

    name: str
    max_model_len: int

    def count_tokens(self, text: str) -> int:
        """Tokens the backend feeds for this prompt (special tokens included)."""
        ...

    def complete(self, requests: Sequence[CompletionRequest]) -> list[list[str]]:
        """Per request, its n completions (text after the prompt), in request order."""
        ...


@dataclass(frozen=True)
class _Row:
    """One completion to sample: request index, its prompt ids and its own budget and RNG seed."""

    request: int
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    seed: int


class TransformersCompleter:
    """`TextCompleter` on a transformers causal LM in this process (module docstring).

    model, tokenizer: e.g. from `policies.checkpoint.load_checkpoint`.
    sampling: top_p and repetition penalty. max_rows: sample rows decoded together.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, sampling: SamplingDefaults = SamplingDefaults(), max_rows: int = 64) -> None:
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows={max_rows!r} must be an integer >= 1")
        self.model, self.tokenizer, self.sampling, self.max_rows = model.eval(), tokenizer, sampling, max_rows
        self.device = next(model.parameters()).device
        self.max_model_len = context_window(model.config) or int(tokenizer.model_max_length)
        pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id if pad_id is not None else tokenizer.eos_token_id)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.max_token_chars = max_token_chars(tokenizer)
        # the service counts prompt tokens on its event loop while a batch decodes in the worker
        # thread; a fast tokenizer used from two threads at once can fail ("Already borrowed"), so
        # each side has its own copy and lock: a long prompt being counted (~1 s for 1 MB, then a
        # 413) held the decode loop's stop-string checks, which take the lock every token
        self._tokenizer_lock = threading.Lock()
        self._counting_tokenizer, self._counting_lock = copy.deepcopy(tokenizer), threading.Lock()

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, sampling: SamplingDefaults = SamplingDefaults(),
        max_rows: int = 64, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
    ) -> "TransformersCompleter":
        """Load a checkpoint folder onto `device` ("cpu", "cuda[:N]"; `policies.devices`)."""
        model, tokenizer = load_checkpoint(directory, dtype, device)
        return cls(model, tokenizer, sampling, max_rows)

    def count_tokens(self, text: str) -> int:
        with self._counting_lock:
            return len(self._counting_tokenizer(text, add_special_tokens=True).input_ids)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[list[str]]:
        with self._tokenizer_lock:
            rows = self._rows(requests)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))  # less padding per chunk
        texts: list[str] = [""] * len(rows)
        for first in range(0, len(order), self.max_rows):
            chunk = order[first : first + self.max_rows]
            for i, text in zip(chunk, self._decode([rows[i] for i in chunk])):
                texts[i] = text
        out: list[list[str]] = [[] for _ in requests]
        for row, text in zip(rows, texts):
            out[row.request].append(text)
        return out

    # -- phases -------------------------------------------------------------------------------

    def _rows(self, requests: Sequence[CompletionRequest]) -> list[_Row]:
        """n rows per request, row j seeded from (request seed, j)."""
        prompts = list(dict.fromkeys(r.prompt for r in requests))
        encoded = dict(zip(prompts, self.tokenizer(prompts, add_special_tokens=True).input_ids)) if prompts else {}
        rows = []
        for index, request in enumerate(requests):
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            for row_seed in row_seeds(seed, request.n):
                rows.append(_Row(index, tuple(encoded[request.prompt]), request.max_tokens, request.temperature,
                                 request.stop, row_seed))
        return rows

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> list[str]:
        """Sample every row of one chunk; the text of each (cut at its first stop string)."""
        contexts = list(dict.fromkeys(r.prompt_ids for r in rows))
        row_context = torch.tensor([contexts.index(r.prompt_ids) for r in rows], dtype=torch.long, device=self.device)
        cache, logits, mask, position, _ = prefill(self.model, contexts, self.pad_id, self.device)
        if worth_sharing(self.model, row_context.tolist()):
            # the rows of a prompt read its KV in place (policies/shared_prefix.py)
            reserve = min(max(r.max_tokens for r in rows), KV_RESERVE_LIMIT)
            cache, mask = SharedPrefixCache.over(cache, mask, row_context, reserve), None
        else:
            cache.batch_select_indices(row_context)  # [U, ...] -> [R, ...]: one cache row per sample
            mask = mask[row_context]  # [R, S]
        position, logits = position[row_context], logits[row_context]  # [R], [R, V]
        sampler = _RowSampler(rows, self.sampling, self.vocab_size, self.device)
        generated: list[list[int]] = [[] for _ in rows]
        active = torch.arange(len(rows), device=self.device)  # [B] rows still decoding
        try:
            while True:
                tokens = sampler.choose(logits, active)  # [B]
                done = self._record(rows, active, tokens.tolist(), generated)  # [B] bool
                if bool(done.all()):
                    break
                keep = _drop_rows(cache, done)  # [B'] old slot of each row that goes on
                active, tokens, position = active[keep], tokens[keep], position[keep]
                logits, mask = self._step(cache, tokens, position, active, None if mask is None else mask[keep])
                position = position + 1
        finally:
            if isinstance(cache, SharedPrefixCache):
                cache.release()
        return [self._text(row, ids) for row, ids in zip(rows, generated)]

    def _step(
        self, cache: Any, tokens: torch.Tensor, position: torch.Tensor, active: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed each row's token [B]; (next logits [B, V], the grown mask [B, S+1] or None with a shared prefix)."""
        if isinstance(cache, SharedPrefixCache):
            return cache.forward(self.model, active, tokens[:, None], position[:, None]).logits[:, -1, :], None
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # [B, S+1]
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None],
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], mask

    def _record(self, rows: list[_Row], active: torch.Tensor, tokens: list[int], generated: list[list[int]]) -> torch.Tensor:
        """Append each active row's token; done [B] where it was EOS, the budget, or a stop string."""
        done = []
        for b, (r, token) in enumerate(zip(active.tolist(), tokens)):
            if token in self.eos_ids:
                done.append(True)
                continue
            generated[r].append(token)
            done.append(len(generated[r]) >= rows[r].max_tokens or self._stopped(rows[r].stop, generated[r]))
        return torch.tensor(done, dtype=torch.bool, device=self.device)

    def _stopped(self, stop: tuple[str, ...], ids: list[int]) -> bool:
        """A stop string in the text of the last few tokens (each token is >= 1 byte, so a window
        of the stop string's UTF-8 bytes holds any stop string the newest token completed; one of
        its characters counted 4 bytes-tokens of "😀", missed, and the row ran to max_tokens)."""
        if not stop:
            return False
        window = max(len(s.encode("utf-8")) for s in stop) + 2
        with self._tokenizer_lock:
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _text(self, row: _Row, ids: list[int]) -> str:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return cut_at_stop(text, row.stop)


def _drop_rows(cache: Any, done: torch.Tensor) -> torch.Tensor:
    """Drop the finished rows (done [B]) from the cache; the old slot of each remaining row [B']."""
    if isinstance(cache, SharedPrefixCache):
        return cache.keep(~done)  # moves live rows into freed slots: the order changes
    keep = (~done).nonzero().squeeze(-1)  # [B'], in order
    cache.batch_select_indices(keep)
    return keep


class _RowSampler:
    """Next-token choice per row with the row's own generator, temperature and penalty state."""

    def __init__(self, rows: list[_Row], sampling: SamplingDefaults, vocab_size: int, device: torch.device) -> None:
        self.sampling = sampling
        self.temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device)  # [R]
        self.generators = [torch.Generator(device=device).manual_seed(r.seed) for r in rows]
        self.seen = torch.zeros((len(rows), vocab_size), dtype=torch.bool, device=device)  # [R, V] prompt + output tokens
        for r, row in enumerate(rows):
            ids = [t for t in row.prompt_ids if t < vocab_size]
            self.seen[r, ids] = True

    def choose(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the active rows [B] -> tokens [B] long (and marks them seen)."""
        logits = self._penalised(logits.float()[:, : self.seen.shape[1]], active)  # [B, V]
        temperature = self.temperature[active]  # [B]
        tokens = logits.argmax(dim=-1)  # [B]; kept for greedy rows
        sampled = (temperature > 0).nonzero().squeeze(-1)  # [b]
        if sampled.numel():
            probs = torch.softmax(logits[sampled] / temperature[sampled, None], dim=-1)  # [b, V]
            if self.sampling.top_p < 1:
                probs = top_p_filter(probs, self.sampling.top_p)
            for k, b in enumerate(sampled.tolist()):
                generator = self.generators[int(active[b])]
                tokens[b] = draw_tokens(probs[k : k + 1], generator)[0]
        self.seen[active, tokens] = True
        return tokens

    def _penalised(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        penalty = self.sampling.repetition_penalty
        return logits if penalty == 1.0 else penalised(logits, self.seen[active], penalty)


def row_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a request's n sample rows: independent streams drawn from its seed (numpy's
    SeedSequence), below 2^63 as torch and vLLM take them; requests of seeds s and s + 1 share none
    (vLLM's own parallel sampling seeds child j with seed + j, so they shared n - 1 samples)."""
    return [int(state >> np.uint64(1)) for state in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to and including its earliest stop string (unchanged without one)."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config (as vLLM stops)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return frozenset(int(i) for i in ids if i is not None)
