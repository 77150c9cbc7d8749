"""Start the policy or the SPRM scorer as an HTTP service with the reference's endpoints
(MetaStone-S1 / XBai-o4: `POST /generate`, `POST /score`; plus `GET /health`), on FastAPI + uvicorn.

Usage:
    python -m experiments.serve policy --model outputs/checkpoints/tiny-arith/final [--backend transformers|vllm]
                                       [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python -m experiments.serve scorer --model runs/tiny-sprm [--port 8001] [--api-key KEY]
    python -m experiments.serve scorer --model runs/tiny-sprm --device cuda   # the model on a GPU
    python -m experiments.serve policy --model DIR --backend vllm --kv-cache-gib auto --cuda-graphs   # a GPU
    python -m experiments.serve policy --help                # every limit and batching knob

SIGTERM or Ctrl-C stops it: it stops listening at once, and requests in flight get
--shutdown-timeout seconds (default 25) to finish before they are cut and the process exits
(after Ctrl-C, once the batch the model is computing ends: its worker thread is waited for).
Ctrl-C while it imports or loads the model prints one line and exits 130.

The API key may also come from the environment variable TREESEARCH_API_KEY; with one set, every
request needs `Authorization: Bearer KEY` (else 401). The default host is 127.0.0.1 (this machine
only); binding another address without a key prints a warning. Request and response formats:
`experiments.services.api_schemas`; the services: `experiments.services.policy_service` and
`experiments.services.scorer_service`.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import os
import socket
import sys
from typing import TYPE_CHECKING, Sequence

from experiments.startup_interrupt import quiet_start, started

quiet_start(__name__)  # Ctrl-C while it imports and loads the model: one line and exit 130, not a traceback

from experiments.cli_args import port_number, positive_float, positive_int  # noqa: E402
from experiments.cli_errors import INPUT_ERRORS, INTERRUPT_EXIT, USAGE_EXIT  # noqa: E402
from experiments.services.micro_batcher import MAX_WAIT_S  # noqa: E402
from policies.gc_freeze import freeze_long_lived  # noqa: E402
from treesearch.steps import SEPARATOR_MATCHES, StepFormat  # noqa: E402

if TYPE_CHECKING:  # heavy imports wait until a service is chosen, so --help is instant
    from fastapi import FastAPI

    from experiments.services.micro_batcher import BatcherConfig

API_KEY_ENV = "TREESEARCH_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DTYPES = ("float32", "bfloat16", "float16")  # policies.checkpoint.DTYPES, named here so --help imports no torch
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
SHUTDOWN_TIMEOUT_S = 25.0  # under the 30 s Kubernetes gives before SIGKILL; uvicorn waits forever by default
VLLM_ONLY = {"--kv-cache-gib": "kv_cache_gib", "--gpu-memory-utilization": "gpu_memory_utilization",
             "--cuda-graphs": "cuda_graphs"}  # flag -> its attribute, present only when given


def kv_cache_size(text: str) -> float | None:
    """argparse type of --kv-cache-gib: a positive number of GiB, or 'auto' (None: vLLM sizes it)."""
    return None if text.strip().lower() == "auto" else positive_float(text)


def unit_fraction(text: str) -> float:
    """argparse type of a share: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def batch_wait_ms(text: str) -> float:
    """An argparse type: milliseconds in [0, MAX_WAIT_S * 1000] (inf was taken, and the batcher
    then waited forever for a full batch: no answer, and no shutdown)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_S * 1000:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of milliseconds in [0, {MAX_WAIT_S * 1000:g}]")
    return value


def _common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (transformers dir; + score_module.pt for the scorer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=port_number, default=default_port)
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N: where the transformers backend / the scorer runs (vLLM places itself)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-batch", type=positive_int, default=32, help="most requests batched into one backend call")
    parser.add_argument("--max-wait-ms", type=batch_wait_ms, default=5.0,
                        help=f"longest wait for more requests to batch (0 to {MAX_WAIT_S * 1000:g} ms)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="uvicorn log level")
    parser.add_argument("--shutdown-timeout", type=positive_float, default=SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, how long requests in flight (and clients still sending one) get "
                        "to finish before they are cut and the process exits (default: %(default)g)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.serve", description=__doc__.split("\n\n")[0])
    services = parser.add_subparsers(dest="service", required=True)
    policy = services.add_parser("policy", help="POST /generate: completions of a raw text prompt")
    _common_arguments(policy, 8000)
    policy.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    policy.add_argument("--max-response-num", type=positive_int, default=64, help="most completions per request")
    policy.add_argument("--max-rows", type=positive_int, default=256, help="most completions (rows) per backend call")
    policy.add_argument("--max-prompt-chars", type=positive_int, default=1_000_000)
    policy.add_argument("--top-p", type=float, default=0.95, help="server-side top-p (the reference's 0.95)")
    policy.add_argument("--repetition-penalty", type=positive_float, default=1.05, help="server-side (the reference's 1.05)")
    # --backend vllm only (argparse.SUPPRESS: absent unless given, so the transformers backend can
    # refuse them; build_policy fills in the defaults)
    policy.add_argument("--kv-cache-gib", type=kv_cache_size, default=argparse.SUPPRESS,
                        help="--backend vllm: its KV cache in GiB (default 1, what a CPU needs), or 'auto' on a GPU: "
                        "sized from --gpu-memory-utilization")
    policy.add_argument("--gpu-memory-utilization", type=unit_fraction, default=argparse.SUPPRESS,
                        help="--backend vllm on a GPU with --kv-cache-gib auto: its share of the GPU's memory (default 0.9)")
    policy.add_argument("--cuda-graphs", action="store_true", default=argparse.SUPPRESS,
                        help="--backend vllm on a GPU: capture CUDA graphs (faster decoding, slower start)")
    scorer = services.add_parser("scorer", help="POST /score: SPRM path score of a text")
    _common_arguments(scorer, 8001)
    scorer.add_argument("--max-text-tokens", type=positive_int, default=None, help="default: the model's context")
    scorer.add_argument("--max-text-chars", type=positive_int, default=1_000_000)
    scorer.add_argument("--max-batch-tokens", type=positive_int, default=16384, help="most padded tokens per forward")
    scorer.add_argument("--feature-layer", type=int, default=None,
                        help="the layer the head reads, for a folder without sprm.json (the reference's format; "
                        "default -2); a folder's sprm.json names its own")
    scorer.add_argument("--no-prepend-special-tokens", action="store_true",
                        help="tokenise exactly as the reference (add_special_tokens=False), no BOS added")
    scorer.add_argument("--separator-match", choices=SEPARATOR_MATCHES, default="exact",
                        help="which tokens end a step: the '.\\n\\n' token alone (exact, the reference's id 382 on "
                        "Qwen) or every token whose text ends with it (suffix: a search's policy.sampling."
                        "separator_match=suffix); default: %(default)s")
    return parser


def _batch_config(args: argparse.Namespace, max_weight: int | None) -> "BatcherConfig":
    from experiments.services.micro_batcher import BatcherConfig

    return BatcherConfig(max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000, max_weight=max_weight)


def build_policy(args: argparse.Namespace) -> "FastAPI":
    """The policy app for the parsed arguments (loads the model)."""
    from experiments.services.policy_service import PolicyConfig, build_policy_app
    from experiments.services.text_completer import SamplingDefaults, TransformersCompleter

    sampling = SamplingDefaults(top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    given = [flag for flag, name in VLLM_ONLY.items() if hasattr(args, name)]
    if args.backend == "vllm":
        if args.device != "cpu":
            raise ValueError("--device is for --backend transformers: vLLM uses the GPU it finds")
        from experiments.services.vllm_completer import VLLMCompleter

        completer = VLLMCompleter.from_pretrained(
            args.model, sampling, dtype=args.dtype, kv_cache_gib=getattr(args, "kv_cache_gib", 1.0),
            gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9),
            enforce_eager=not getattr(args, "cuda_graphs", False),
        )
    elif given:
        raise ValueError(f"{', '.join(given)}: for --backend vllm only")
    else:
        completer = TransformersCompleter.from_pretrained(args.model, sampling, args.max_rows, args.dtype, args.device)
    config = PolicyConfig(args.max_response_num, args.max_prompt_chars, _batch_config(args, args.max_rows))
    return build_policy_app(completer, config, args.model, _api_key(args))


def build_scorer(args: argparse.Namespace) -> "FastAPI":
    """The scorer app for the parsed arguments (loads the model and its head)."""
    from experiments.services.scorer_service import ScorerConfig, TextSPRM, build_scorer_app
    from policies.reflective_model import ReflectiveModel

    model, tokenizer = ReflectiveModel.from_pretrained(args.model, args.dtype, args.feature_layer, args.device)
    scorer = TextSPRM(model, tokenizer, StepFormat(separator_match=args.separator_match),
                      prepend_special_tokens=not args.no_prepend_special_tokens, max_batch_tokens=args.max_batch_tokens)
    config = ScorerConfig(args.max_text_chars, args.max_text_tokens, _batch_config(args, None))
    return build_scorer_app(scorer, config, args.model, _api_key(args))


def address_problem(host: str, port: int) -> str | None:
    """Why the service could not listen on host:port (an unknown host, a port in use), or None;
    checked before the model loads (minutes for a large one), not after, as uvicorn would."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        return f"cannot serve on --host {host}: no such address ({err})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            hint = "; another server is listening there: choose another --port" if err.errno == errno.EADDRINUSE else ""
            return f"cannot serve on {host}:{port}: {err.strerror or err}{hint}"
    return None


class CutRequestLog(logging.Filter):
    """uvicorn logs each request its shutdown timeout cuts (after its own line "Cancel N running
    task(s), timeout graceful shutdown exceeded") as "Exception in ASGI application" with the
    CancelledError's 30-line traceback, which read as a crash: one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a request still in flight at the shutdown timeout was cut (--shutdown-timeout)", (), None, None)
        return True


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the model and serve until stopped. A bad input found while loading (a missing
    model folder or score_module.pt, a device torch cannot see) prints one line `error: ...` and
    returns 2 before the server starts, as the other command lines do (`experiments.cli_errors`)."""
    args = build_parser().parse_args(argv)
    key = _api_key(args)
    if key is not None and not (key.isascii() and key.isprintable() and key == key.strip()):
        print(f"error: the API key (--api-key or ${API_KEY_ENV}) must be printable ASCII without blanks at either end: "
              "HTTP clients send other characters in the Authorization header each their own way, and strip or "
              "refuse the blanks, so no request would match it", file=sys.stderr)
        return USAGE_EXIT
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    problem = address_problem(args.host, args.port)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return USAGE_EXIT
    if args.host not in LOOPBACK and not _api_key(args):
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    try:  # only loading is checked here: an error of the running server keeps its traceback
        app = build_policy(args) if args.service == "policy" else build_scorer(args)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    freeze_long_lived()  # imports and model: out of the garbage collector's walks (policies/gc_freeze.py)
    import uvicorn

    # uvicorn says it is up at log level info only: at the default warning nothing told the model had loaded
    # (a port taken since `address_problem` looked is uvicorn's error line next)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"model loaded; starting the {args.service} service of {args.model} on http://{host}:{args.port} "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn_log = logging.getLogger("uvicorn.error")  # its filters survive uvicorn's logging set-up
    if not any(isinstance(f, CutRequestLog) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(CutRequestLog())
    started()  # Ctrl-C is Python's again: uvicorn takes it and SIGTERM over, to stop gracefully
    try:
        # SIGTERM / Ctrl-C: stop listening, give requests in flight --shutdown-timeout seconds, then cut
        # them (uvicorn's default waits for every connection: a client that stalled mid-body kept it up)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.shutdown_timeout)
    except KeyboardInterrupt:  # Ctrl-C in the instant before uvicorn took the signal over
        print("interrupted before the service started", file=sys.stderr)
        return INTERRUPT_EXIT
    return 0


if __name__ == "__main__":  # the guard vLLM's spawned workers need
    sys.exit(main())
