"""`VLLMCompleter`: the policy service's `TextCompleter` on vLLM's offline engine, one
`LLM.generate` over every request of a batch (what the reference's policy service runs, one
request at a time there).

Usage:
    completer = VLLMCompleter.from_pretrained("outputs/checkpoints/tiny-arith/final", kv_cache_gib=1.0)
    completer.complete([CompletionRequest("Q: 2+3?\\n<think>", n=4, max_tokens=64, temperature=0.6,
                                          stop=(".\\n\\n",), seed=0)])       # [[4 texts]]
    python -m experiments.serve policy --model DIR --backend vllm

Each request becomes one prompt with its own `SamplingParams`: n=response_num, its max_tokens,
temperature, stop strings (kept in the text: include_stop_str_in_output=True, as the reference),
seed, and the server's top_p and repetition_penalty (the reference's 0.95 and 1.05). vLLM refuses
n > 1 at temperature 0, so a greedy request is sampled once and its text copied n times. vLLM seeds
each request's own generator, so a request's completions do not depend on its batch. The prompt
is the raw text, tokenised by vLLM with the tokenizer's special tokens (as
`experiments.services.text_completer.TransformersCompleter` does).

The engine is built by `policies.vllm_engine.build_llm` (in-process engine, enforce_eager,
block size 32 with prefix caching, the KV cache size given here); vLLM itself is reached through
`policies.vllm_engine.import_vllm`, the project's one place that imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import AutoTokenizer

from experiments.services.text_completer import CompletionRequest, SamplingDefaults
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
        self._sampling_params = import_vllm().SamplingParams

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
        return len(self.tokenizer(text, add_special_tokens=True).input_ids)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[list[str]]:
        if not requests:
            return []
        params = [self._params(r) for r in requests]
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        texts = [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        return [t * r.n if _greedy(r) else t for t, r in zip(texts, requests)]

    def _params(self, request: CompletionRequest) -> Any:
        return self._sampling_params(
            n=1 if _greedy(request) else request.n, max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=self.sampling.top_p, repetition_penalty=self.sampling.repetition_penalty,
            stop=list(request.stop) or None, include_stop_str_in_output=True, seed=request.seed,
        )


def _greedy(request: CompletionRequest) -> bool:
    """vLLM refuses n > 1 at temperature 0; one greedy sample is asked and copied n times."""
    return request.temperature == 0
