"""`LMPRMScorer`: an external process reward model built on a language model (Math-Shepherd,
RLHFlow's Llama3.1-8B-PRM, Qwen2.5-Math-PRM) as a `treesearch.protocols.Scorer`: the baseline a
SPRM is compared against, with a second model and a second forward per path.

Usage:
    scorer = LMPRMScorer.from_pretrained("/models/math-shepherd-mistral-7b-prm", "math_shepherd")
    scorer = LMPRMScorer.from_pretrained("/models/Qwen2.5-Math-PRM-7B", "qwen_prm",
                                         dtype="bfloat16", device="cuda")
    scorer.score(paths)   # [[step score, ...], ...] one per step, in [0, 1]
    scorer.read(paths)    # one PRMReading per path: token ids, read positions, step scores
    scorer.cost(paths)    # tokens forwarded (the PRM's own tokens of every path)
    python -m experiments.search scorer=math_shepherd     # MATH_SHEPHERD_PRM_PATH=/path/to/model
    python -m experiments.search scorer=qwen_prm scorer.path=DIR

The PRM reads the problem's question and the steps' texts in its own layout and tokenizer
(`scorers.prm_format`), never the policy's token ids, so any policy can be scored by any PRM. Paths
are forwarded in right-padded batches through the model's base (no LM head), and paths that start
with the same tokens (a beam's children, a question's samples) forward that start once
(`scorers.prm_batches`; `share_prefix=False` forwards each whole); only the read positions' hidden
states go on to the reader (`scorers.prm_readers`: the LM head's
good / bad rows, or a two-class score head). A path longer than the PRM's context window is a
ValueError naming its problem. The tokenizer must be a fast one (it maps characters to tokens).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from policies.checkpoint import torch_dtype
from policies.devices import resolve_device
from policies.prefix_cache import PrefixKV
from scorers.prm_batches import PRMBatch, forwarded_tokens, plan_batches
from scorers.prm_memory import DEFAULT_MAX_BYTES, ParentHit, PRMMemory, stacked_kv
from scorers.prm_format import PRMFormat, resolve_prm_format
from scorers.prm_layout import PRMLayout, PRMReading, Sequences, distinct, reading_key
from scorers.prm_loading import (
    check_cache_bytes, check_prm_folder, check_tokenizer, load_prm_model, load_prm_tokenizer,
)
from scorers.prm_readers import ScoreHead, load_score_head, token_pair_logits
from scorers.sprm_scorer import check_batch_size
from treesearch.records import Prefix



class LMPRMScorer:
    """Scores paths with a PRM built on a language model (module docstring).

    model: a transformers causal LM (reader "lm"), or any transformers model whose base gives the
        last hidden states (reader "head"); put in eval mode here.
    tokenizer: its fast tokenizer.
    prm_format: a `scorers.prm_format.PRMFormat` or a preset name (`PRM_FORMATS`).
    batch_size: paths per forward.
    good_id, bad_id: reader "lm": the token ids of the format's good and bad tokens when they do
        not encode to one token each (None: encoded from the format's strings).
    score_head: reader "head": the two-class head (`scorers.prm_readers.load_score_head`).
    share_prefix: paths that start with the same tokens share the forward of that start
        (`scorers.prm_batches`; the scores are the same within float rounding) and a path asked
        for again in one call is forwarded once; False forwards every path whole, as asked.
    cache_bytes: memory for the KV of scored paths kept across calls (`scorers.prm_memory`): a
        path whose parent (its steps but the last) was scored before forwards only its new
        tokens; 0 keeps nothing.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prm_format: str | PRMFormat = "math_shepherd",
        batch_size: int = 8,
        good_id: int | None = None,
        bad_id: int | None = None,
        score_head: ScoreHead | None = None,
        share_prefix: bool = True,
        cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        check_batch_size(batch_size)
        self.format = resolve_prm_format(prm_format)
        self.good_id, self.bad_id = check_tokenizer(tokenizer, self.format, good_id, bad_id)
        if (self.format.reader == "head") != (score_head is not None):
            needs = "needs" if score_head is None else "takes no"
            raise ValueError(
                f"PRMFormat.reader={self.format.reader!r} {needs} score_head "
                "(LMPRMScorer.from_pretrained loads a folder's score head for reader 'head')"
            )
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.share_prefix = bool(share_prefix)
        check_cache_bytes(cache_bytes)
        self.memory = PRMMemory(cache_bytes)  # with 0 it keeps no KV, only what each path forwarded
        self._lock = threading.Lock()  # the memory is one per scorer; a search may call from threads
        self.device = next(model.parameters()).device
        self.score_head = None if score_head is None else score_head.eval().to(self.device)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = int(pad_id if pad_id is not None else (tokenizer.eos_token_id or 0))
        window = getattr(model.config, "max_position_embeddings", None)
        self.layout = PRMLayout(self.format, tokenizer, self.good_id, window)  # tokens and read positions
        # the weights a scored token goes through (the compute ledger's FLOPs): the base model and
        # the score head; an LM reader computes two rows of the output layer, not counted
        modules = [model.base_model] + ([self.score_head] if self.score_head is not None else [])
        self.num_parameters: int = sum(p.numel() for module in modules for p in module.parameters())

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prm_format: str | PRMFormat = "math_shepherd",
        batch_size: int = 8,
        dtype: str = "float32",
        device: str = "cpu",
        good_id: int | None = None,
        bad_id: int | None = None,
        share_prefix: bool = True,
        cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> "LMPRMScorer":
        """Load a PRM from a local transformers folder (config.json, weights in any layout
        transformers reads, a fast tokenizer; for reader "head" its `score.*` tensors in
        safetensors) and score with it; the model's own code in the folder never runs. A missing
        folder, config.json or score head is a FileNotFoundError naming it; the settings are
        checked before the weights load. dtype: "float32", "bfloat16" or "float16"; device: "cpu"
        or "cuda[:N]"."""
        check_batch_size(batch_size)
        check_cache_bytes(cache_bytes)
        fmt, weights_dtype, target = resolve_prm_format(prm_format), torch_dtype(dtype), resolve_device(device)
        directory = check_prm_folder(Path(path))
        tokenizer = load_prm_tokenizer(directory)
        check_tokenizer(tokenizer, fmt, good_id, bad_id)  # before minutes of loading a large model
        head = load_score_head(directory, weights_dtype) if fmt.reader == "head" else None
        model = load_prm_model(directory, weights_dtype, causal_lm=fmt.reader == "lm")
        return cls(model.to(target), tokenizer, fmt, batch_size, good_id, bad_id, head, share_prefix, cache_bytes)

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [list(r.step_scores) for r in self.read(paths)]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens forwarded for these paths: what their last `score` forwarded for each distinct
        path with steps (a start that several paths shared counted once, on the first; a parent
        found in the memory not at all); a path not scored yet counts as `scorers.prm_batches`
        would plan it."""
        with self._lock:
            sequences = [ids for ids, _ in self._distinct(self._sequences(paths))]
            known = [self.memory.forwarded(ids) if ids else 0 for ids in sequences]
            unknown = [ids if n is None else [] for ids, n in zip(sequences, known)]
            planned = forwarded_tokens(self._plan(unknown), [len(ids) for ids in unknown])
            return sum(n for n in known if n is not None) + planned

    def clear_memory(self) -> None:
        """Forget the paths scored so far (their KV, scores and forwarded tokens)."""
        self.memory.clear()

    def read(self, paths: Sequence[Prefix]) -> list[PRMReading]:
        """Forward every distinct path with steps once and read its positions: a path whose parent
        is in the memory forwards only its new tokens; the others are planned by
        `scorers.prm_batches` (paths that start alike share the forward of their common start); a
        repeated path gets the reading of its first."""
        with self._lock:
            sequences = self._sequences(paths)
            self.layout.check_window(paths, sequences)
            readings = {reading_key(ids, pos): PRMReading(tuple(ids), tuple(pos), ()) for ids, pos in sequences}
            work = self._distinct(sequences)  # repeats forward nothing
            for rows, shared, hit in self._batches(work, self._parent_hits(paths, work)):
                scores, kvs, forwarded = self._run([work[i] for i in rows], shared, hit)
                for i, row_scores, kv, tokens in zip(rows, scores, kvs, forwarded):
                    ids, positions = work[i]
                    readings[reading_key(ids, positions)] = PRMReading(tuple(ids), tuple(positions), tuple(row_scores))
                    self.memory.remember(ids, positions[-1] + 1, kv, dict(zip(positions, row_scores)), tokens)
            return [readings[reading_key(ids, pos)] for ids, pos in sequences]  # a repeat: its first's reading

    def _distinct(self, sequences: Sequences) -> Sequences:
        """`distinct(sequences)`, or all of them as asked when nothing is shared (share_prefix)."""
        return distinct(sequences) if self.share_prefix else sequences

    def _plan(self, sequences: list[list[int]]) -> list[PRMBatch]:
        return plan_batches(sequences, self.batch_size, share=self.share_prefix)

    def _parent_hits(
        self, paths: Sequence[Prefix], sequences: list[tuple[list[int], list[int]]]
    ) -> dict[int, ParentHit]:
        """The paths whose parent (steps but the last; its tokens through its last reading) the
        memory holds, with every position the parent covers scored there: path index -> the hit."""
        if not self.memory.keeps_kv:
            return {}
        hits = {}
        for i, (path, (ids, positions)) in enumerate(zip(paths, sequences)):
            if len(path.steps) < 2 or not ids:
                continue
            # the parent's tokens through its last reading (laid out once: `_sequences` keeps it)
            parent_end = self._sequences([Prefix(path.problem, path.steps[:-1])])[0][1][-1] + 1
            hit = self.memory.parent(ids, parent_end)
            if hit is not None and all(p in hit.scores for p in positions if p < hit.length):
                hits[i] = hit
        return hits

    def _batches(
        self, sequences: list[tuple[list[int], list[int]]], hits: dict[int, ParentHit]
    ) -> list[tuple[list[int], int, ParentHit | None]]:
        """(rows, tokens before the rows' own, the cached parent or None) per forward: the rows of
        one cached parent together, then the plan of the rest (shared starts)."""
        by_parent: dict[int, list[int]] = {}
        for i, hit in hits.items():
            by_parent.setdefault(id(hit.kv), []).append(i)
        batches: list[tuple[list[int], int, ParentHit | None]] = []
        for rows in by_parent.values():
            hit = hits[rows[0]]
            for first in range(0, len(rows), self.batch_size):
                batches.append((rows[first : first + self.batch_size], hit.length, hit))
        rest = [[] if i in hits else ids for i, (ids, _) in enumerate(sequences)]
        batches.extend((list(b.rows), b.shared, None) for b in self._plan(rest))
        return batches

    # -- phases -------------------------------------------------------------------------------

    def _sequences(self, paths: Sequence[Prefix]) -> Sequences:
        """(token ids, read positions) of each path (`scorers.prm_layout`)."""
        return self.layout.sequences(paths)

    @torch.inference_mode()
    def _run(
        self, batch: list[tuple[list[int], list[int]]], start: int, hit: ParentHit | None
    ) -> tuple[list[list[float]], list[PrefixKV | None], list[int]]:
        """One forward of a batch whose rows all begin with the same `start` tokens (0: none),
        cached (hit) or forwarded once here: per row its scores at its positions, its KV for the
        memory (None without one) and the tokens forwarded for it (a forwarded start counts on
        the first row)."""
        past, start_hidden, root = self._start(batch, start, hit)
        rests = [ids[start:] for ids, _ in batch]
        tail, cache = self._tail(rests, start, past)  # [B, S, H]
        wanted = [(r, c) for r, (_, pos) in enumerate(batch) for c in pos if hit is None or c >= start]
        read = dict(zip(wanted, self._read_scores(self._gather(wanted, start, start_hidden, tail))))
        scores = [[hit.scores[c] if hit is not None and c < start else read[(r, c)] for c in pos]
                  for r, (_, pos) in enumerate(batch)]
        kvs = [self._row_kv(cache, r, start, pos[-1] + 1, root) for r, (_, pos) in enumerate(batch)]
        forwarded = [len(rest) + (start if hit is None and r == 0 else 0) for r, rest in enumerate(rests)]
        return scores, kvs, forwarded

    def _gather(
        self, wanted: list[tuple[int, int]], start: int, start_hidden: torch.Tensor | None, tail: torch.Tensor
    ) -> torch.Tensor:
        """[K, H] hidden states at the wanted (row, position) pairs, in order: a position inside a
        start forwarded here from its states, the others from the tail's [B, S, H] (two gathers,
        not one op per position)."""
        hidden = tail.new_empty((len(wanted), tail.shape[-1]))  # [K, H]
        in_tail = [(k, r, c - start) for k, (r, c) in enumerate(wanted) if c >= start]
        if in_tail:
            k, r, c = (torch.tensor(part, device=tail.device) for part in zip(*in_tail))
            hidden[k] = tail[r, c]
        in_start = [(k, c) for k, (_, c) in enumerate(wanted) if c < start]
        if in_start:  # only without a cached parent, whose positions come from the memory
            k, c = (torch.tensor(part, device=tail.device) for part in zip(*in_start))
            hidden[k] = start_hidden[c]
        return hidden

    def _start(
        self, batch: list[tuple[list[int], list[int]]], start: int, hit: ParentHit | None
    ) -> tuple[Any, torch.Tensor | None, PrefixKV | None]:
        """(the past the rows attend to, repeated for each row, or None; the hidden states of a
        start forwarded here; the start's KV as a chain root for the memory)."""
        if hit is not None:
            keys, values = stacked_kv(hit.kv)  # [layers, kv_heads, P, head_dim]
            layers = [(k.unsqueeze(0).expand(len(batch), -1, -1, -1).contiguous(),
                       v.unsqueeze(0).expand(len(batch), -1, -1, -1).contiguous()) for k, v in zip(keys, values)]
            return DynamicCache(ddp_cache_data=layers), None, hit.kv  # no config: every layer whole (sliding too)
        if not start:
            return None, None, None
        out = self.model.base_model(input_ids=torch.tensor([batch[0][0][:start]], device=self.device), use_cache=True,
                                    past_key_values=DynamicCache())  # every layer keeps all its columns (see decode_loop)
        past = out.past_key_values
        root = None
        if self.memory.keeps_kv:  # the start's own columns, once for every row's entry
            root = PrefixKV(torch.stack([layer.keys[0] for layer in past.layers]),
                            torch.stack([layer.values[0] for layer in past.layers]))
        past.batch_repeat_interleave(len(batch))
        return past, out.last_hidden_state[0], root  # [P, H]

    def _tail(self, rests: list[list[int]], start: int, past: Any) -> tuple[torch.Tensor, Any]:
        """The rows' own tokens right-padded in one forward that attends to past (start tokens):
        ([B, S, H] last hidden states, the cache after it when the memory wants it)."""
        width = max(len(ids) for ids in rests)
        input_ids = torch.full((len(rests), width), self.pad_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(rests), start + width), dtype=torch.long)  # [B, P + S]
        mask[:, :start] = 1
        for row, ids in enumerate(rests):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, start : start + len(ids)] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B, S]
        use_cache = past is not None or self.memory.keeps_kv
        if past is None and use_cache:
            past = DynamicCache()  # not the model's own: its sliding layers would keep window - 1 columns
        out = self.model.base_model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device), past_key_values=past, use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values if self.memory.keeps_kv else None

    def _row_kv(self, cache: Any, row: int, start: int, end: int, root: PrefixKV | None) -> PrefixKV | None:
        """Row `row`'s own columns through its last reading (start:end) of the cache after the
        tail forward, chained to root; None without a cache or own columns."""
        if cache is None or end <= start:
            return None
        keys = torch.stack([layer.keys[row, :, start:end] for layer in cache.layers])
        values = torch.stack([layer.values[row, :, start:end] for layer in cache.layers])
        return PrefixKV(keys, values, parent=root)  # [layers, kv_heads, end - start, head_dim]

    def _read_scores(self, hidden: torch.Tensor) -> list[float]:
        """[K, H] final hidden states -> each one's score: the reader's (good, bad) logits,
        softmax, the good class."""
        if not len(hidden):
            return []
        pair = (  # [K, 2]: (good, bad)
            self.score_head(hidden) if self.score_head is not None
            else token_pair_logits(self.model, hidden, self.good_id, self.bad_id)
        )
        return torch.softmax(pair.float(), dim=-1)[:, 0].tolist()

