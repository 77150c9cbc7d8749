"""`VLLMCompleter`: the policy service's `TextCompleter` on vLLM's offline engine, one
`LLM.generate` over every request of a batch (what the reference's policy service runs, one
request at a time there).

Usage:
    completer = VLLMCompleter.from_pretrained("outputs/checkpoints/tiny-arith/final", kv_cache_gib=1.0)
    completer.complete([CompletionRequest("Q: 2+3?\\n<think>", n=4, max_tokens=64, temperature=0.6,
                                          stop=(".\\n\\n",), seed=0)])       # [[4 texts]]
    python -m experiments.serve policy --model DIR --backend vllm

Each sample row of a request (response_num of them) becomes one prompt with its own
`SamplingParams`: n=1, the request's max_tokens, temperature, stop strings (kept in the text:
include_stop_str_in_output=True, as the reference), the row's seed, and the server's top_p and
repetition_penalty (the reference's 0.95 and 1.05); the prompts share their KV through vLLM's
prefix cache. The rows' seeds are drawn from the request's (`text_completer.row_seeds`, as the
transformers backend): vLLM's own n > 1 seeds child j with seed + j, so requests of seeds 1 and 2
shared 3 of 4 samples. A greedy request is sampled once and its text copied n times (vLLM refuses
n > 1 at temperature 0). vLLM seeds each prompt's own generator, so a request's completions do not
depend on its batch. The prompt
is the raw text, tokenised by vLLM with the tokenizer's special tokens (as
`experiments.services.text_completer.TransformersCompleter` does).

The engine is built by `policies.vllm_engine.build_llm` (in-process engine, enforce_eager,
block size 32 with prefix caching, the KV cache size given here); vLLM itself is reached through
`policies.vllm_engine.import_vllm`, the project's one place that imports it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from transformers import AutoTokenizer

from experiments.services.text_completer import CompletionRequest, SamplingDefaults, row_seeds
from experiments.services.token_chars import max_token_chars
from policies.vllm_engine import VLLMEngineConfig, build_llm, import_vllm, max_model_len


class VLLMCompleter:
    """`TextCompleter` on a `vllm.LLM` (module docstring).

    llm: a generation engine from `policies.vllm_engine.build_llm`. tokenizer: the checkpoint's
    (to count prompt tokens as vLLM will feed them). sampling: top_p and repetition penalty.
    """

    name = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, sampling: SamplingDefaults = SamplingDefaults()) -> None:
        self.llm, self.tokenizer, self.sampling = llm, tokenizer, sampling
        self.max_model_len = max_model_len(llm)
        self.max_token_chars = max_token_chars(tokenizer)  # a prompt too long for the context: refused untokenised
        self._sampling_params = import_vllm().SamplingParams
        self._counting_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, sampling: SamplingDefaults = SamplingDefaults(),
        dtype: str = "float32", kv_cache_gib: float | None = 1.0, gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
    ) -> "VLLMCompleter":
        """Start vLLM on a checkpoint folder; kv_cache_gib None sizes the KV cache from
        gpu_memory_utilization (GPU), enforce_eager False captures CUDA graphs (`VLLMEngineConfig`)."""
        config = VLLMEngineConfig(str(directory), dtype=dtype, kv_cache_gib=kv_cache_gib,
                                  gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
        llm = build_llm(config)
        return cls(llm, AutoTokenizer.from_pretrained(str(directory)), sampling)

    def count_tokens(self, text: str) -> int:
        with self._counting_lock:  # the service counts from several threads; a fast tokenizer is not thread-safe
            return len(self.tokenizer(text, add_special_tokens=True).input_ids)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[list[str]]:
        if not requests:
            return []
        rows = [(index, params) for index, request in enumerate(requests) for params in self._row_params(request)]
        outputs = self.llm.generate([requests[index].prompt for index, _ in rows], [p for _, p in rows], use_tqdm=False)
        texts: list[list[str]] = [[] for _ in requests]
        for (index, _), output in zip(rows, outputs):
            texts[index].append(output.outputs[0].text)
        return [t * r.n if _greedy(r) else t for t, r in zip(texts, requests)]

    def _row_params(self, request: CompletionRequest) -> list[Any]:
        """One SamplingParams per sample row (n=1), each row's seed drawn from the request's
        (`row_seeds`, as the transformers backend); one row for a greedy request."""
        seeds = [None] if _greedy(request) else (
            [None] * request.n if request.seed is None else row_seeds(request.seed, request.n))
        return [self._sampling_params(
            n=1, max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=self.sampling.top_p, repetition_penalty=self.sampling.repetition_penalty,
            stop=list(request.stop) or None, include_stop_str_in_output=True, seed=seed,
        ) for seed in seeds]


def _greedy(request: CompletionRequest) -> bool:
    """vLLM refuses n > 1 at temperature 0; one greedy sample is asked and copied n times."""
    return request.temperature == 0
