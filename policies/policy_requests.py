"""What every generation backend does the same way before it generates: check a propose / rollout
request, build the model input of each prefix, and the token budget of a call (within the model's
context window).

    widths = check_request(prefixes, n, seed)              # ValueError / TypeError naming the bad value
    widths = check_widths(prefixes, [1, 3], seed)          # propose_widths: one width per prefix
    rows = split_rows(flat_samples, widths)                # prefix i's samples: rows[i]
    contexts, prompt_lengths = encode_contexts(tokenizer, prompt_fn, prefixes)
    budget = step_budget(sampling, prefix, stop_at_step)   # <= 0: nothing left to generate
    budgets = fit_window(budgets, contexts, prompt_lengths, prefixes, window=512, setting="max_position_embeddings")
    rows = close_full_paths(rows, prefixes, sampling, contexts, window=512)   # propose: a full path's step ends it

Shared by `policies.transformers_policy`, `policies.vllm_policy` and `policies.openai_policy`, so the
three backends see the same tokens for the same prefix and refuse the same requests.
"""
from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any, Callable, Sequence

from policies.sampling_config import SamplingConfig
from treesearch.records import Prefix, Problem


def is_integer(value: Any) -> bool:
    """int-like (Python or numpy integer), but not bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_request(prefixes: Sequence[Prefix], n: int, seed: int) -> list[int]:
    """n >= 1 and an integer seed; every prefix a Prefix that is not terminal. Returns the widths
    of the request, n per prefix (what `check_widths` checks and returns for propose_widths)."""
    if not is_integer(n) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    check_prefix_sequence(prefixes)
    return check_widths(prefixes, [n] * len(prefixes), seed)


def check_prefix_sequence(prefixes: Sequence[Prefix]) -> None:
    """A TypeError naming what prefixes is when it is not a sequence (a single Prefix, a
    generator, a set): the policies read it by index and length."""
    if isinstance(prefixes, Prefix):
        raise TypeError("prefixes is a single Prefix, not a sequence of them; pass [prefix]")
    if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence):
        raise TypeError(f"prefixes is a {type(prefixes).__name__}, not a sequence of Prefix; pass a list")


def check_widths(prefixes: Sequence[Prefix], widths: Sequence[int], seed: int) -> list[int]:
    """One integer width >= 1 per prefix, an integer seed; every prefix a Prefix that is not
    terminal. Returns the widths as a list of ints."""
    check_prefix_sequence(prefixes)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"widths is a {type(widths).__name__}, not a sequence of integers")
    if len(widths) != len(prefixes):
        raise ValueError(f"{len(widths)} widths for {len(prefixes)} prefixes; give one width per prefix")
    for i, width in enumerate(widths):
        if not is_integer(width) or width < 1:
            raise ValueError(f"widths[{i}]={width!r} must be an integer >= 1")
    if not is_integer(seed):
        raise ValueError(f"seed={seed!r} must be an integer")
    for i, prefix in enumerate(prefixes):
        if not isinstance(prefix, Prefix):
            raise TypeError(f"prefixes[{i}] is a {type(prefix).__name__}, not a Prefix")
        if prefix.is_terminal:
            raise ValueError(
                f"prefixes[{i}] (problem {prefix.problem.id!r}) is terminal "
                f"(last step finish={prefix.steps[-1].finish!r}); nothing can follow it"
            )
    return [int(width) for width in widths]


def split_rows(flat: Sequence[Any], widths: Sequence[int]) -> list[list[Any]]:
    """flat (every prefix's samples, prefix by prefix) cut into one row of widths[i] per prefix."""
    rows, start = [], 0
    for width in widths:
        rows.append(list(flat[start : start + width]))
        start += width
    return rows


def encode_contexts(
    tokenizer: Any, prompt_fn: Callable[[Problem], str], prefixes: Sequence[Prefix]
) -> tuple[list[list[int]], list[int]]:
    """Model input per prefix: the prompt's ids (special tokens added; each distinct prompt encoded
    once) followed by each step's exact token_ids (never re-tokenised text); and the prompt's
    length in it. A step with text but no ids is a ValueError (`check_step_ids`)."""
    prompts = [prompt_fn(prefix.problem) for prefix in prefixes]
    unique = list(dict.fromkeys(prompts))
    encoded = tokenizer(unique, add_special_tokens=True).input_ids if unique else []
    prompt_ids = dict(zip(unique, encoded))
    contexts, prompt_lengths = [], []
    for prefix, prompt in zip(prefixes, prompts):
        ids = list(prompt_ids[prompt])
        prompt_lengths.append(len(ids))
        for step in prefix.steps:
            if step.text and not step.token_ids:
                check_step_ids(prefix)  # names it
            ids.extend(step.token_ids)
        if not ids:
            raise ValueError(f"problem {prefix.problem.id!r}: the prompt encodes to no tokens")
        contexts.append(ids)
    return contexts, prompt_lengths


def check_step_ids(prefix: Prefix) -> None:
    """ValueError naming the step when one has text but no token_ids: the backends and SPRM
    scorers read exact ids, so its text was dropped in silence (a step built from text, e.g. a
    reference solution, scored near 0 over the prompt alone)."""
    for j, step in enumerate(prefix.steps):
        if step.text and not step.token_ids:
            raise ValueError(
                f"problem {prefix.problem.id!r}: step {j} has text but no token_ids; the model reads a path's exact "
                "token ids, never its re-tokenised text: build the step with "
                "token_ids=tokenizer.encode(text, add_special_tokens=False) (and as many token_logprobs)"
            )


def model_vocabulary(model: Any) -> int | None:
    """The model's embedding rows (the ids it can read), or None for a model that does not say
    (a wrapper without `get_input_embeddings`)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, NotImplementedError):  # transformers: "not auto-handled" for custom names
        return None


def name_out_of_vocabulary(prefixes: Sequence[Prefix], contexts: Sequence[Sequence[int]], vocabulary: int | None) -> None:
    """ValueError naming the first problem whose context holds an id outside the model's
    vocabulary (steps of another policy's tokenizer), else nothing. Called before the forward: on
    CPU the embedding lookup would fail with a bare IndexError, on CUDA with a device-side assert
    that leaves the process's CUDA context unusable (the check is two C-speed passes per context)."""
    if vocabulary is None:
        return
    for prefix, ids in zip(prefixes, contexts):
        if not ids or (min(ids) >= 0 and max(ids) < vocabulary):
            continue
        bad = next((t for t in ids if not 0 <= t < vocabulary), None)
        if bad is not None:
            raise ValueError(f"problem {prefix.problem.id!r}: token id {bad} of its path lies outside this model's "
                             f"vocabulary of {vocabulary}: steps made by another policy's tokenizer?")


def step_budget(sampling: SamplingConfig, prefix: Prefix, stop_at_step: bool) -> int:
    """Tokens one call may generate after the prefix (<= 0: none left): the path's remaining
    max_total_tokens, capped at max_step_tokens when the call stops at a step."""
    left = sampling.max_total_tokens - sum(step.num_tokens for step in prefix.steps)
    return min(left, sampling.max_step_tokens) if stop_at_step else left


def fit_window(
    budgets: Sequence[int],
    contexts: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    prefixes: Sequence[Prefix],
    window: int | None,
    setting: str,
) -> list[int]:
    """The budgets capped so that context + generated tokens stay within the model's context
    window (a path that reaches it ends "length", on every backend alike; <= 0: no room left);
    window None: no cap. A prompt longer than the window is a ValueError naming the problem, the
    prompt's length and the window (`setting`: where the window comes from): the model cannot
    read it, and an empty "length" answer would hide that."""
    if window is None:
        return list(budgets)
    for prefix, prompt_length in zip(prefixes, prompt_lengths):
        if prompt_length > window:
            raise ValueError(
                f"problem {prefix.problem.id!r}: its prompt is {prompt_length} tokens, longer than the "
                f"model's context window of {window} tokens ({setting}); shorten the prompt"
            )
    return [min(budget, window - len(ids)) for budget, ids in zip(budgets, contexts)]


def close_full_paths(
    rows: list[list[Any]], prefixes: Sequence[Prefix], sampling: SamplingConfig, contexts: Sequence[Sequence[int]],
    window: int | None,
) -> list[list[Any]]:
    """A propose call's samples (rows[i]: prefix i's, dataclasses with token_ids and finish), each
    that ended on a separator with no room left for its path (max_total_tokens, or the context
    window: None, no window) as "length". Why: the next call could only return empty "length"
    steps, n copies of one dead path, that beam search, DVTS and REBASE would keep as n
    candidates (REBASE spending n of its budget on them)."""
    closed = []
    for row, prefix, ids in zip(rows, prefixes, contexts):
        room = sampling.max_total_tokens - sum(step.num_tokens for step in prefix.steps)
        room = room if window is None else min(room, window - len(ids))
        if room <= sampling.max_step_tokens:  # else no step of this call can fill the path
            row = [replace(s, finish="length") if s.finish == "separator" and len(s.token_ids) >= room else s
                   for s in row]
        closed.append(row)
    return closed
