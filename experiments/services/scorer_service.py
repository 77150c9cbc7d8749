"""The SPRM scorer service: the reference's `POST /score` (a whole text in, its SPRM path score
out) on a `ReflectiveModel`, with concurrent requests batched into one padded forward.

Usage:
    python -m experiments.serve scorer --model runs/tiny-sprm --port 8001
    curl -s localhost:8001/score -H 'Content-Type: application/json' \\
        -d '{"text": "Q ...<think>a.\\n\\nb.\\n\\n</think>", "return_all_scores": true}'
    # {"value": 0.51, "all_scores": [0.49, 0.53], "token_ids": [...], "score_positions": [5, 9]}

In Python:
    model, tokenizer = ReflectiveModel.from_pretrained("runs/tiny-sprm")
    scorer = TextSPRM(model, tokenizer)
    scorer.score_ids([scorer.encode(text)])[0].value
    app = build_scorer_app(scorer, ScorerConfig(), model_name="runs/tiny-sprm")

What is scored (the reference's `score_model_queue.py`): the text is tokenised, the LM runs once
with hidden states, the head reads the feature layer (`ReflectiveModel.feature_layer`, -2 as the
reference) at the token just before each counted step separator (`scorers.sprm_positions`, over
the whole text: the reference's service has no prompt/response split either), and
value = geometric mean of the sigmoid readings (clamped at 1e-10), 0.0 with none.

Tokenisation (a decision): the reference tokenises with add_special_tokens=False. Its Qwen
tokenizers add no special tokens anyway, and its chat-templated text carries its own markers, so
that is also the sequence its policy saw. A tokenizer that prepends a BOS (ours, Llama's) would
then score a sequence the policy never saw (vLLM and `TransformersPolicy` feed BOS + prompt). So
by default the special tokens the tokenizer PREPENDS are put in front of the text's ids unless
the text already starts with them (a chat template that writes the BOS itself); nothing is
appended. For Qwen-family tokenizers this is the reference's token sequence, and its positions
are the reference's with the default step_format of `experiments.serve scorer`
(`--separator-match exact`: a step ends at the '.\n\n' token alone, id 382; `suffix`, at the ~30
Qwen tokens whose text ends with it, as a search with policy.sampling.separator_match=suffix;
`policies/step_stops.py`); the sequence equals the one
`scorers.sprm_scorer.SPRMScorer` forwards for prompt + completion. `prepend_special_tokens=False`
(`--no-prepend-special-tokens`) tokenises exactly as the reference on any tokenizer.

Deviations from the reference: on malformed traces (no `<think>`, or several) positions follow
`scorers.sprm_positions` (the reference scores from position 0 without a `<think>`); scores are
float32 (the reference runs the head in the LM's dtype); requests are batched (right padded, so
each text's states equal those of a forward alone up to float rounding) instead of one at a time.
"""
from __future__ import annotations

import math
import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from experiments.services.api_schemas import (
    CLIENT_GONE_STATUS, FieldError, HealthResponse, ScoreRequest, ScoreResponse, body_limit, install_contract,
)
from experiments.services.micro_batcher import BatcherConfig, ClientGone, MicroBatcher
from experiments.services.token_chars import check_fits, max_token_chars
from policies.context_window import context_window
from policies.reflective_model import ReflectiveModel
from scorers.sprm_positions import StepMarkers, score_positions
from treesearch.aggregation import aggregate
from treesearch.steps import StepFormat


@dataclass(frozen=True)
class TextScore:
    """The head's reading of one text (the fields of the reference's /score answer).

    value: geometric mean of all_scores (clamped at 1e-10), 0.0 when empty.
    all_scores: sigmoid of the head at each of score_positions.
    token_ids: the forwarded sequence. score_positions: indices into token_ids the head read.
    """

    value: float
    all_scores: tuple[float, ...]
    token_ids: tuple[int, ...]
    score_positions: tuple[int, ...]


class TextSPRM:
    """Scores whole texts with a `ReflectiveModel`'s SPRM head (module docstring).

    model, tokenizer: from `ReflectiveModel.from_pretrained`; the model is put in eval mode.
    step_format: separator and think markers. prepend_special_tokens: see "Tokenisation".
    max_batch_tokens: most padded tokens (rows x longest) per forward.
    """

    def __init__(
        self,
        model: ReflectiveModel,
        tokenizer: Any,
        step_format: StepFormat = StepFormat(),
        prepend_special_tokens: bool = True,
        max_batch_tokens: int = 16384,
    ) -> None:
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens!r} must be an integer >= 1")
        self.model, self.tokenizer, self.max_batch_tokens = model.eval(), tokenizer, max_batch_tokens
        self.markers = StepMarkers.from_tokenizer(tokenizer, len(tokenizer), step_format)
        self.prefix_ids = _prepended_ids(tokenizer) if prepend_special_tokens else ()
        pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id if pad_id is not None else tokenizer.eos_token_id)
        self.device = next(model.parameters()).device
        self.max_model_len = int(context_window(model.config) or model.config.max_position_embeddings)
        self.max_token_chars = max_token_chars(tokenizer)  # most characters a token covers (None: unknown)

    def encode(self, text: str) -> list[int]:
        """The token ids forwarded for text (see "Tokenisation")."""
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        prefix = list(self.prefix_ids)
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[TextScore]:
        """Score token sequences, shortest first in forwards of at most max_batch_tokens."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores: list[TextScore | None] = [None] * len(sequences)
        for chunk in self._chunks([sequences[i] for i in order]):
            for k, score in zip(chunk, self._forward([sequences[order[k]] for k in chunk])):
                scores[order[k]] = score
        return scores  # type: ignore[return-value]

    # -- phases -------------------------------------------------------------------------------

    def _chunks(self, sorted_sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Index runs whose padded size (rows x longest, sorted so the last is longest) fits."""
        chunks: list[list[int]] = []
        for k, ids in enumerate(sorted_sequences):
            if chunks and (len(chunks[-1]) + 1) * max(len(ids), 1) <= self.max_batch_tokens:
                chunks[-1].append(k)
            else:
                chunks.append([k])
        return chunks

    @torch.inference_mode()
    def _forward(self, batch: list[Sequence[int]]) -> list[TextScore]:
        """One right-padded forward; the head at each sequence's positions."""
        positions = [score_positions(ids, self.markers, 0) for ids in batch]
        width = max(len(ids) for ids in batch)
        if width == 0:
            return [TextScore(0.0, (), (), ()) for _ in batch]
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, : len(ids)] = 1
        position_ids = torch.arange(width).expand(len(batch), width)  # [B, L]; right pads are masked
        out = self.model(input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device), logits_to_keep=1)
        rows = torch.tensor([r for r, p in enumerate(positions) for _ in p], dtype=torch.long)  # [K]
        cols = torch.tensor([c for p in positions for c in p], dtype=torch.long)  # [K]
        values = self.model.step_scores(out.features[rows.to(self.device), cols.to(self.device)]).tolist()  # [K]
        result, k = [], 0
        for ids, p in zip(batch, positions):
            own = values[k : k + len(p)]
            k += len(p)
            result.append(TextScore(aggregate(own, "geometric_mean"), tuple(own), tuple(ids), tuple(p)))
        return result


@dataclass(frozen=True)
class ScorerConfig:
    """Serving limits of the scorer.

    max_text_chars: longest text accepted (413 beyond). max_text_tokens: most tokens of a text;
        None: the model's context length. batch: how concurrent requests are batched.
    """

    max_text_chars: int = 1_000_000
    max_text_tokens: int | None = None
    batch: BatcherConfig = field(default_factory=BatcherConfig)

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars={self.max_text_chars!r} must be >= 1")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens={self.max_text_tokens!r} must be >= 1 or None")


def build_scorer_app(scorer: TextSPRM, config: ScorerConfig, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: POST /score and GET /health, requests batched by a `MicroBatcher`."""
    batcher: MicroBatcher[list[int], TextScore] = MicroBatcher(scorer.score_ids, config.batch)
    max_tokens = min(config.max_text_tokens or scorer.max_model_len, scorer.max_model_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="treesearch SPRM scorer", lifespan=lifespan)
    install_contract(app, api_key, body_limit(config.max_text_chars))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": model_name, "service": "scorer", "backend": "transformers",
            "feature_layer": scorer.model.feature_layer, "max_text_tokens": max_tokens,
            "max_text_chars": config.max_text_chars, "max_batch": config.batch.max_batch,
            "batches_run": batcher.batches_run, "requests_scored": batcher.items_run,
        }

    @app.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
    async def score(request: ScoreRequest, http: Request) -> Any:
        if len(request.text) > config.max_text_chars:
            raise FieldError("text", f"has {len(request.text)} characters, over the limit {config.max_text_chars}", 413)
        # more characters than max_tokens tokens cover: refused untokenised (8 texts of 960k characters,
        # each tokenised to be refused, held a small request 9 s)
        check_fits("text", request.text, max_tokens, scorer.max_token_chars, f"over the limit {max_tokens}")
        ids = await asyncio.to_thread(scorer.encode, request.text)  # off the event loop: ~1 s a megabyte
        if len(ids) > max_tokens:
            raise FieldError("text", f"has {len(ids)} tokens, over the limit {max_tokens}", 413)
        try:
            result = await batcher.submit(ids, gone=http.is_disconnected)
        except ClientGone:
            return JSONResponse({"error": "the client went away"}, status_code=CLIENT_GONE_STATUS)
        except Exception as exc:  # noqa: BLE001 - the reference's error body
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        if not all(math.isfinite(v) for v in (result.value, *result.all_scores)):  # JSON would say null
            bad = sum(not math.isfinite(v) for v in result.all_scores)
            return JSONResponse({"error": f"the SPRM head gave {bad} of its {len(result.all_scores)} scores as NaN "
                                          f"(diverged or damaged weights in {model_name}?)"}, status_code=500)
        if not request.return_all_scores:
            return {"value": result.value}
        return {
            "value": result.value, "all_scores": list(result.all_scores),
            "token_ids": list(result.token_ids), "score_positions": list(result.score_positions),
        }

    return app


def _prepended_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer puts BEFORE a text with add_special_tokens=True (a BOS, or none)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    full = list(tokenizer(probe, add_special_tokens=True).input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()
