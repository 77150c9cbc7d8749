"""A frozen LM's target log-probs over a GRPO batch with each prompt forwarded once per group,
not once per rollout: the KL term's reference forward (and a recomputation of old log-probs).

A rollout batch holds G rollouts of each prompt, right-padded, prompt-major
(`policies.rollout_batch.RolloutBatch`). A plain forward runs every prompt G times. Here the
prompts run once (one row per group, right-padded to the longest), their KV is repeated into the
rows of their group (`policies.slot_cache.slot_cache`), and only the completions run per row,
attending to [their prompt | their own tokens]. The log-prob of every completion target is what the
plain forward gives, up to float rounding (tested); a target inside the shared prompt is not
computed and is 0, as `RolloutBatch.old_logprobs` is there (no loss reads it: the completion mask
is 0).

    shared = shared_prompt_lengths(batch)        # [P] tokens each group's rows share, or None
    if shared is not None:
        logprobs = shared_prompt_logprobs(lm, batch, shared, temperature)   # [B, L-1]

Why: with the tiny policy's 8 x 8 arith rollouts, prompts are about half the tokens, and the
reference forward was a third of the joint step (`python -m experiments.bench_train_throughput`).

Tests: `.venv/bin/pytest tests/test_shared_prompt_logprobs.py`.
"""
from __future__ import annotations

from typing import Any

import torch

from policies.rollout_batch import RolloutBatch
from policies.slot_cache import slot_cache


def shared_prompt_lengths(batch: RolloutBatch) -> torch.Tensor | None:
    """[P] per group the number of leading tokens all its rows share (its prompt, at most: where
    the first completion target is, or the row's length without one), or None when sharing does
    not apply: one rollout per group, masks not right-padded, or rows of a group whose prompts differ."""
    ids, mask, group = batch.input_ids, batch.attention_mask, batch.group_size
    rows, width = ids.shape
    if group < 2 or rows % group:
        return None
    lengths = mask.sum(-1)  # [B]
    if not torch.equal(mask.bool(), torch.arange(width, device=ids.device) < lengths[:, None]):
        return None  # not right-padded
    completion = batch.completion_mask > 0  # [B, L-1]
    prompt = torch.where(completion.any(-1), completion.int().argmax(-1) + 1, lengths)  # [B]
    shared = prompt.view(-1, group).min(-1).values  # [P]
    if int(shared.min()) < 1:
        return None
    first = ids[::group].repeat_interleave(group, dim=0)  # [B, L] the first row of each group, per row
    inside = torch.arange(width, device=ids.device) < shared.repeat_interleave(group)[:, None]  # [B, L]
    if not bool(((ids == first) | ~inside).all()):
        return None
    return shared


@torch.no_grad()
def shared_prompt_logprobs(lm: Any, batch: RolloutBatch, shared: torch.Tensor, temperature: float) -> torch.Tensor:
    """Target log-probs [B, L-1] of `lm` (a transformers causal LM) at temperature, from one
    forward of each group's first shared[p] tokens and one of every row's rest (module docstring)."""
    ids, group = batch.input_ids, batch.group_size
    rows, width = ids.shape
    device = ids.device
    row_group = torch.arange(rows, device=device) // group  # [B]
    start = shared[row_group]  # [B] first column each row forwards itself
    last_prompt, cache = _prefill_prompts(lm, ids[::group], shared)  # [P, V], the prompts' KV
    logits = None
    lengths = batch.attention_mask.sum(-1)  # [B]
    rest = int((lengths - start).max())
    if rest > 0:
        columns = start[:, None] + torch.arange(rest, device=device)  # [B, C] columns of input_ids
        valid = columns < lengths[:, None]
        rest_ids = torch.where(valid, ids.gather(1, columns.clamp(max=width - 1)), 0)  # [B, C]
        prompt_mask = torch.arange(int(shared.max()), device=device) < start[:, None]  # [B, S]
        rows_cache = slot_cache(cache, row_group, reserve=rest)  # each group's prompt KV in its rows
        try:
            out = lm(input_ids=rest_ids, attention_mask=torch.cat([prompt_mask, valid], -1).long(),
                     position_ids=columns, past_key_values=rows_cache, use_cache=True)
        finally:
            rows_cache.release()
        logits = out.logits  # [B, C, V]: position start + i predicts input_ids[start + i + 1]
    return _gather_targets(ids, start, last_prompt[row_group], logits, lengths, temperature)


def _prefill_prompts(lm: Any, prompts: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(the logits at each prompt's last shared token [P, V], the prompts' cache): one forward of
    prompts[:, :S] (S = the longest shared prefix), right-padded, so positions need no offset."""
    width = int(shared.max())
    mask = (torch.arange(width, device=prompts.device) < shared[:, None]).long()  # [P, S]
    out = lm(input_ids=prompts[:, :width], attention_mask=mask, use_cache=True)
    last = out.logits[torch.arange(int(prompts.shape[0]), device=prompts.device), shared - 1]  # [P, V]
    return last, out.past_key_values


def _gather_targets(
    ids: torch.Tensor, start: torch.Tensor, last_prompt: torch.Tensor, rest_logits: torch.Tensor | None,
    lengths: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """[B, L-1] log-prob of input_ids[:, t+1] for t >= start - 1 (the last shared token's logits,
    then the rest's), 0 before (inside the shared prompt) and past each row's end."""
    rows, width = ids.shape
    out = torch.zeros((rows, width - 1), dtype=torch.float32, device=ids.device)
    row = torch.arange(rows, device=ids.device)
    has_target = start < lengths  # a row that is only its prompt has no target after it
    first = torch.log_softmax(last_prompt.float() / temperature, -1).gather(-1, ids.gather(1, start.clamp(max=width - 1)[:, None]))
    out[row[has_target], start[has_target] - 1] = first[has_target, 0]
    if rest_logits is not None:
        rest = int(rest_logits.shape[1])
        t = start[:, None] + torch.arange(rest, device=ids.device)  # [B, C] positions whose targets are t + 1
        valid = t + 1 < lengths[:, None]
        targets = ids.gather(1, (t + 1).clamp(max=width - 1))  # [B, C]
        logprobs = torch.log_softmax(rest_logits.float() / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
        out[row[:, None].expand_as(t)[valid], t[valid]] = logprobs[valid]
    return out
