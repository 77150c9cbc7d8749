"""`VLLMLMPRMScorer`: an external process reward model (Math-Shepherd, RLHFlow's Llama3.1-8B-PRM,
Qwen2.5-Math-PRM) served by vLLM's offline pooling engine, as a `treesearch.protocols.Scorer`
with the same scores as `scorers.lm_prm_scorer.LMPRMScorer` (which runs a transformers forward).

Usage:
    scorer = VLLMLMPRMScorer.from_pretrained("/models/math-shepherd-mistral-7b-prm", "math_shepherd")
    scorer = VLLMLMPRMScorer.from_pretrained("/models/Qwen2.5-Math-PRM-7B", "qwen_prm",
                                             engine=VLLMEngineConfig("/models/Qwen2.5-Math-PRM-7B", dtype="bfloat16"))
    scorer.score(paths)   # [[step score, ...], ...] one per step, in [0, 1]
    scorer.read(paths)    # one PRMReading per path: token ids, read positions, step scores
    scorer.cost(paths)    # tokens forwarded (the PRM's tokens of every distinct path)
    scorer.close()        # stop the engine
    python -m experiments.search scorer=vllm_prm scorer.path=DIR scorer.prm_format=qwen_prm

The paths are laid out exactly as the transformers scorer lays them out (`scorers.prm_layout`:
the PRM's own text and tokenizer, any policy). vLLM runs each distinct path with steps once, whole
(`LLM.encode`, per-token outputs of every position, prefix caching off: the pooling runner reads
every token), and the reader turns the outputs at the read positions into (good, bad) logits:
- reader "lm" (a causal LM): the engine returns the final hidden states (the model converted to
  an embedding model), and the output layer's good and bad rows, read from the folder's weight
  files (`scorers.prm_readers.load_token_rows`), give the logits;
- reader "head" (Qwen2.5-Math-PRM): the engine runs vLLM's own class of the folder's reward
  model (`Qwen2ForProcessRewardModel`) and returns its two-class head's logits per token.
A step's score is softmax(good, bad)'s first entry, as in the transformers scorer. A path longer
than the engine's context window (max_model_len) is a ValueError naming its problem.

Unlike `LMPRMScorer`, paths that start alike are not forwarded once for their common start, and
no KV is kept across calls: each path costs its whole length. On a GPU vLLM's kernels and
scheduling make up for that at 7-8B; on this CPU the transformers scorer is the faster one.

Tests: `.venv/bin/pytest tests/test_vllm_lm_prm_scorer.py` (equal to `LMPRMScorer` within 1e-5 in float32).
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from policies.vllm_engine import (
    PoolingTask, VLLMEngineConfig, build_llm, encode_per_token, max_model_len, shutdown_llm,
)
from scorers.prm_format import PRMFormat, resolve_prm_format
from scorers.prm_layout import PRMLayout, PRMReading, readings_of, whole_path_tokens, whole_paths
from scorers.prm_loading import check_prm_folder, check_tokenizer, load_prm_tokenizer, prm_parameters
from scorers.prm_readers import TokenRows, load_token_rows
from treesearch.records import Prefix

# the architectures (config.json) whose vLLM class has a two-class head that reader "head" reads
HEAD_ARCHITECTURES: tuple[str, ...] = ("Qwen2ForProcessRewardModel",)


class VLLMLMPRMScorer:
    """Scores paths with an external PRM on a vLLM pooling engine (module docstring).

    llm: the pooling engine (`policies.vllm_engine.build_llm(config, "pooling", pooling_task=...)`):
        "token_embed" for reader "lm", "token_classify" for reader "head".
    tokenizer: the PRM's fast tokenizer.
    prm_format: a `scorers.prm_format.PRMFormat` or a preset name.
    rows: reader "lm": the output layer's good and bad rows (`load_token_rows`); None for "head".
    good_id, bad_id: the format's good and bad token ids when they do not encode to one token.
    num_parameters: the PRM's parameters for the compute ledger (2 x parameters x tokens;
        `prm_parameters`); 0 counts no FLOPs.
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        prm_format: str | PRMFormat = "math_shepherd",
        rows: TokenRows | None = None,
        good_id: int | None = None,
        bad_id: int | None = None,
        num_parameters: int = 0,
    ) -> None:
        self.format = resolve_prm_format(prm_format)
        good, _ = check_tokenizer(tokenizer, self.format, good_id, bad_id)
        if (self.format.reader == "lm") != (rows is not None):
            needs = "needs" if rows is None else "takes no"
            raise ValueError(
                f"PRMFormat.reader={self.format.reader!r} {needs} rows "
                "(VLLMLMPRMScorer.from_pretrained reads a causal LM's good and bad rows for reader 'lm')"
            )
        self.llm, self.tokenizer, self.rows = llm, tokenizer, rows
        self.task: PoolingTask = "token_embed" if rows is not None else "token_classify"
        self.num_parameters = int(num_parameters)
        # the engine's window, which scorer.engine.max_model_len may set below max_position_embeddings
        self.layout = PRMLayout(self.format, tokenizer, good, max_model_len(llm), "scorer.engine.max_model_len")
        self._lock = threading.Lock()  # the layout's memory and the engine: one caller at a time

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prm_format: str | PRMFormat = "math_shepherd",
        good_id: int | None = None,
        bad_id: int | None = None,
        engine: VLLMEngineConfig | None = None,
    ) -> "VLLMLMPRMScorer":
        """Start a pooling engine on a local PRM folder (config.json, weights, a fast tokenizer)
        and score with it. A missing folder or config.json is a FileNotFoundError naming it; the
        tokenizer is checked against the format, and a reader "head" folder's architecture
        against `HEAD_ARCHITECTURES`, before the engine starts. engine: its model is path
        (default `VLLMEngineConfig`: float32, 4 GiB of KV cache)."""
        fmt = resolve_prm_format(prm_format)
        directory = check_prm_folder(Path(path))
        tokenizer = load_prm_tokenizer(directory)
        good, bad = check_tokenizer(tokenizer, fmt, good_id, bad_id)
        config = _hf_config(directory)
        rows = load_token_rows(directory, good, bad) if fmt.reader == "lm" else None
        if rows is None:
            check_head_architecture(directory, config)
        engine = replace(engine or VLLMEngineConfig(str(directory)), model=str(directory))
        task: PoolingTask = "token_embed" if rows is not None else "token_classify"
        llm = build_llm(engine, runner="pooling", pooling_task=task)
        return cls(llm, tokenizer, fmt, rows, good_id, bad_id, prm_parameters(config, fmt))

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [list(r.step_scores) for r in self.read(paths)]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens forwarded: each distinct path with steps, whole (a repeat forwards nothing)."""
        with self._lock:
            return whole_path_tokens(self.layout.sequences(paths))

    def read(self, paths: Sequence[Prefix]) -> list[PRMReading]:
        """One vLLM pooling call over the distinct paths with steps; each read at its positions;
        a repeated path gets the reading of its first."""
        if self.llm is None:
            raise RuntimeError("this VLLMLMPRMScorer was closed; build a new one")
        with self._lock:  # vLLM's offline engine takes one caller at a time
            sequences = self.layout.sequences(paths)
            self.layout.check_window(paths, sequences)
            work = whole_paths(sequences)
            outputs = encode_per_token(self.llm, [ids for ids, _ in work], self.task)  # per path [L, C]
        return readings_of(sequences, work, self._step_scores(outputs, [pos for _, pos in work]))

    def close(self) -> None:
        """Stop the engine and free vLLM's process-wide state (`vllm_engine.shutdown_llm`)."""
        if self.llm is not None:
            shutdown_llm(self.llm)
            self.llm = None

    # -- phases -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step_scores(self, outputs: list[torch.Tensor], positions: list[list[int]]) -> list[list[float]]:
        """softmax(good, bad)[0] at every path's positions, in one reader call."""
        picked = [out[pos] for out, pos in zip(outputs, positions)]  # each [K_i, C]
        if not picked:
            return []
        flat = torch.cat(picked).float()
        pair = self.rows(flat) if self.rows is not None else flat[:, [1, 0]]  # class 1 = "right"
        probs = torch.softmax(pair, dim=-1)[:, 0].tolist()
        out, k = [], 0
        for pos in positions:
            out.append(probs[k : k + len(pos)])
            k += len(pos)
        return out


def check_head_architecture(directory: Path, config: Any) -> None:
    """ValueError unless config.json names an architecture whose vLLM class carries the two-class
    head reader "head" reads (vLLM runs the head; the transformers scorer reads any folder's)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(HEAD_ARCHITECTURES):
        raise ValueError(
            f"PRM folder {directory}: reader 'head' on vLLM needs a reward model class vLLM runs "
            f"({', '.join(HEAD_ARCHITECTURES)}); its config.json names {architectures or 'none'}: "
            "score it with scorers.lm_prm_scorer.LMPRMScorer (scorer=qwen_prm) instead"
        )


def _hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory), local_files_only=True)
