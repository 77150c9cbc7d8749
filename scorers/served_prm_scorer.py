"""`ServedPRMScorer`: an external process reward model with a two-class head (Qwen2.5-Math-PRM)
served by vLLM's OpenAI-compatible server on another process or machine, as a
`treesearch.protocols.Scorer`, with the scores of `scorers.lm_prm_scorer.LMPRMScorer`.

Usage:
    # the server (on CPU `python -m vllm.entrypoints.openai.api_server`; `vllm serve` on a GPU):
    #   python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8001 \\
    #       --model /models/Qwen2.5-Math-PRM-7B --runner pooling --pooler-config '{"pooling_type": "ALL"}' \\
    #       --kv-cache-memory-bytes 1073741824    # on CPU; on a GPU leave it out
    scorer = ServedPRMScorer.from_pretrained("/models/Qwen2.5-Math-PRM-7B", base_url="http://127.0.0.1:8001")
    scorer.score(paths)   # [[step score, ...], ...] one per step, in [0, 1]
    scorer.read(paths)    # one PRMReading per path: token ids, read positions, step scores
    scorer.cost(paths)    # tokens the server forwarded (every distinct path with steps, whole)
    scorer.close()        # the HTTP connections
    python -m experiments.search scorer=served_prm scorer.path=DIR scorer.base_url=http://HOST:8001

The folder is a local copy of the served PRM's config.json and tokenizer (no weights): the paths
are laid out here as the transformers scorer lays them out (`scorers.prm_layout`) and sent as token
ids, `batch_size` paths per `POST /pooling` request (`task: token_classify`, no activation), the
requests of a call concurrently. The server returns the head's two logits per token (pooling type
ALL), or at each step tag only (pooling type STEP at the tag's `step_tag_id`, read in order;
vLLM's default for this class, at 151651, Qwen's "<extra_0>", so a real Qwen2.5-Math-PRM served
without `--pooler-config` works too); both tested against a server. A STEP server at another id
than this tokenizer's tag returns nothing, and is named with the flags that fix it. A step's
score is softmax(logits)'s class 1 ("the step is right") at its read position. The context window is the server's (`max_model_len` of
`/v1/models`); a longer path is a ValueError naming its problem.

Only reader "head" PRMs: the server runs the head. A causal-LM PRM (Math-Shepherd, RLHFlow) would
have to send its hidden state per token; run it with `scorers.vllm_lm_prm_scorer` or
`scorers.lm_prm_scorer` instead.

Failures as `policies.openai_policy.OpenAIPolicy`'s (retries, then a ConnectionError naming the
URL and the command that starts a server, a TimeoutError, or an `OpenAIServerError`).

Tests: `.venv/bin/pytest tests/test_served_prm_scorer.py` (a real vLLM server, marked `vllm`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import httpx
import torch

from policies.openai_policy import KV_CACHE_FLAG, CompletionsClient, OpenAIServerConfig
from scorers.prm_format import PRMFormat, resolve_prm_format
from scorers.prm_layout import PRMLayout, PRMReading, readings_of, whole_path_tokens, whole_paths
from scorers.prm_loading import check_prm_folder, check_tokenizer, load_prm_tokenizer, prm_parameters
from scorers.sprm_scorer import check_batch_size
from treesearch.records import Prefix


class ServedPRMScorer:
    """Scores paths with a PRM served at a vLLM server's `/pooling` route (module docstring).

    path: the local folder with the PRM's config.json and tokenizer.
    server: how to reach the server (`policies.openai_policy.OpenAIServerConfig`).
    prm_format: a reader "head" `scorers.prm_format.PRMFormat` or preset name (qwen_prm).
    batch_size: paths per request.
    """

    def __init__(
        self, path: str | Path, server: OpenAIServerConfig, prm_format: str | PRMFormat = "qwen_prm",
        batch_size: int = 16,
    ) -> None:
        check_batch_size(batch_size)
        self.format = resolve_prm_format(prm_format)
        if self.format.reader != "head":
            raise ValueError(
                f"PRMFormat.reader={self.format.reader!r}: a served PRM must carry its head (reader 'head', "
                "qwen_prm); score a causal-LM PRM with scorer=vllm_prm or the transformers scorer"
            )
        directory = check_prm_folder(Path(path))
        self.tokenizer = load_prm_tokenizer(directory)
        answer_id, _ = check_tokenizer(self.tokenizer, self.format, None, None)  # the chat layout's answer token
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        self.num_parameters = prm_parameters(config, self.format)
        self.batch_size = batch_size
        self.client = CompletionsClient(server, start_hint=start_hint(directory, server.root))
        self.folder_window: int | None = getattr(config, "max_position_embeddings", None)
        self.layout = PRMLayout(self.format, self.tokenizer, answer_id, self.folder_window)
        self.tag_id = single_token_id(self.tokenizer, self.format.step_tag)
        self._lock = threading.Lock()  # the layout's memory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prm_format: str | PRMFormat = "qwen_prm",
        base_url: str = "http://127.0.0.1:8001",
        model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        max_concurrency: int = 8,
    ) -> "ServedPRMScorer":
        """The keyword form the Hydra config `scorer=served_prm` uses."""
        server = OpenAIServerConfig(base_url, model, api_key, timeout_s, max_retries, max_concurrency=max_concurrency)
        return cls(path, server, prm_format, batch_size)

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [list(r.step_scores) for r in self.read(paths)]

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens forwarded: each distinct path with steps, whole (a repeat is sent once)."""
        with self._lock:
            return whole_path_tokens(self.layout.sequences(paths))

    def read(self, paths: Sequence[Prefix]) -> list[PRMReading]:
        """The distinct paths with steps in requests of batch_size, sent concurrently; each read at
        its positions; a repeated path gets the reading of its first."""
        # the server's window when it says (`served_model` asks once), else the folder's
        served = self.client.served_model().max_model_len
        self.layout.context_window = served or self.folder_window
        self.layout.window_source = "the server's max_model_len" if served else "max_position_embeddings"
        with self._lock:
            sequences = self.layout.sequences(paths)
            self.layout.check_window(paths, sequences)
        work = whole_paths(sequences)
        batches = [work[k : k + self.batch_size] for k in range(0, len(work), self.batch_size)]
        scored = [row for rows in self.client.map(self._score_batch, batches) for row in rows]
        return readings_of(sequences, work, scored)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    # -- phases -------------------------------------------------------------------------------

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """One `POST /pooling` for the batch's token ids: each path's step scores."""
        body = {
            "model": self.client.served_model().name, "input": [ids for ids, _ in batch],
            "task": "token_classify", "use_activation": False, "add_special_tokens": False,
        }
        data = sorted(self.client.request("POST", "/pooling", body).get("data") or [], key=lambda d: d["index"])
        if len(data) != len(batch):
            raise ValueError(f"{self.client.config.root}/pooling returned {len(data)} results for {len(batch)} inputs")
        return [step_scores(entry["data"], ids, pos, self.tag_id) for entry, (ids, pos) in zip(data, batch)]


def single_token_id(tokenizer: object, text: str) -> int | None:
    """The id of text when the tokenizer writes it as one token (Qwen's "<extra_0>"), else None."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []  # type: ignore[attr-defined]
    return int(ids[0]) if len(ids) == 1 else None


def step_scores(rows: list[list[float]], ids: list[int], positions: list[int], tag_id: int | None = None) -> list[float]:
    """P(class 1) at each read position from the server's per-token logits (pooling type ALL: one
    row per token) or per-tag logits (STEP pooling: one row per tag token in ids, in order; a step
    whose own text holds the tag adds a row, read past); ValueError for any other number of rows
    (tag_id: the step tag's token id)."""
    if not rows:
        step = "" if tag_id is None else f" or '{{\"pooling_type\": \"STEP\", \"step_tag_id\": {tag_id}}}'"
        raise ValueError(
            f"the served PRM returned no rows for a path of {len(ids)} tokens (a STEP pooling server whose "
            f"step_tag_id is not this tokenizer's step tag; vLLM's default is 151651, Qwen's): serve it with "
            f"--pooler-config '{{\"pooling_type\": \"ALL\"}}'{step}"
        )
    logits = torch.tensor(rows, dtype=torch.float32)  # [rows, 2]
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"the served PRM returned rows of shape {tuple(logits.shape)}: a two-class head gives [L, 2]")
    tags = [] if tag_id is None else [k for k, token in enumerate(ids) if token == tag_id]
    if len(logits) == len(ids):
        picked = logits[positions]
    elif len(logits) == len(tags) and set(positions) <= set(tags):
        picked = logits[[tags.index(p) for p in positions]]
    elif len(logits) == len(positions):
        picked = logits
    else:
        raise ValueError(
            f"the served PRM returned {len(logits)} rows for a path of {len(ids)} tokens and {len(positions)} steps: "
            "serve it with --pooler-config '{\"pooling_type\": \"ALL\"}' (or STEP on its step tag)"
        )
    return torch.softmax(picked, dim=-1)[:, 1].tolist()


def start_hint(directory: Path, root: str) -> str:
    """The vLLM command line that serves this PRM at root (host and port from the URL)."""
    url = httpx.URL(root)
    return (f"python -m vllm.entrypoints.openai.api_server --host {url.host} --port {url.port or 80} "
            f"--model {directory} --runner pooling --pooler-config '{{\"pooling_type\": \"ALL\"}}' {KV_CACHE_FLAG}")
