"""Pins for the external PRM stack that a mutation review found unpinned elsewhere.

No server and no trained checkpoint: a tiny random folder laid out as Qwen2.5-Math-PRM's
(`tiny_checkpoint.save_tiny_qwen_prm`) scored by the transformers scorer, and `ServedPRMScorer` on
the same folder whose client's `request` is replaced by an in-process stand-in for vLLM's
`/v1/models` and `/pooling` routes (pooling type ALL: the head's two logits at every token,
softmaxed when `use_activation`, results returned in reverse index order as the API allows).

What is pinned: the served scorer's request body (`token_classify`, no activation, no special
tokens, the layout's token ids), results matched to their paths by index, every path sent at any
batch_size, a short answer named, the server's max_model_len bounding a path (a path of exactly the
window scored, one token more refused), a repeated path costed once, and the same num_parameters
as the transformers scorer (head biases included); the layout keeps apart two problems whose steps
read alike; the chat_tag layout names a chat template whose prompt is not the start of the whole
and puts no step_join before its first step; Math-Shepherd's "Step k: " is left out only for a
step that starts with its own number; num_parameters of a causal-LM PRM with an untied output layer
counts the base model only; an explicit token id must be below len(tokenizer).

Run: `.venv/bin/python -m pytest tests/test_prm_pins.py`
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from policies.openai_policy import OpenAIServerConfig
from policies.tiny_model import TinyModelConfig
from scorers.lm_prm_scorer import LMPRMScorer
from scorers.prm_format import PRMFormat, prm_text, resolve_prm_format
from scorers.prm_loading import check_tokenizer
from scorers.served_prm_scorer import ServedPRMScorer
from test_lm_prm_scorer import PATHS, PRM_SHAPE, step
from tiny_checkpoint import CHAT_TEMPLATE, save_tiny_checkpoint, save_tiny_qwen_prm
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEP_TAG = "<extra_0>"  # qwen_prm's tag
SCORED = [p for p in PATHS if p.steps]  # three paths with steps, of two problems and three lengths


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen_prm(tmp_path_factory.mktemp("prm_pins") / "qwen", seed=1, step_tag=STEP_TAG)


@pytest.fixture(scope="module")
def local(qwen_dir) -> LMPRMScorer:
    """The transformers scorer of the folder: the reference scores, and the fake server's model."""
    return LMPRMScorer.from_pretrained(qwen_dir, "qwen_prm", cache_bytes=0)


@pytest.fixture(scope="module")
def want(local) -> list[list[float]]:
    return local.score(SCORED)


class FakePooling:
    """vLLM's `/v1/models` (max_model_len `window`) and `/pooling` (pooling type ALL) over the local
    scorer's base model and head; records each pooling body; `drop` results are left off the end."""

    def __init__(self, local: LMPRMScorer, window: int | None = None, drop: int = 0) -> None:
        self.local, self.window, self.drop = local, window, drop
        self.bodies: list[dict[str, Any]] = []

    def rows(self, ids: list[int], activation: bool) -> list[list[float]]:
        with torch.no_grad():
            hidden = self.local.model.base_model(torch.tensor([ids])).last_hidden_state[0]
            logits = self.local.score_head.score(hidden)  # [L, 2]: class 0, class 1
        return (torch.softmax(logits, -1) if activation else logits).tolist()

    def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if path == "/v1/models":
            return {"data": [{"id": "tiny-prm", "max_model_len": self.window}]}
        assert (method, path) == ("POST", "/pooling")
        self.bodies.append(body)
        out = [{"index": i, "data": self.rows(ids, body.get("use_activation", True))}
               for i, ids in enumerate(body["input"])]
        return {"data": out[: len(out) - self.drop][::-1]}  # any order: each result carries its index


@pytest.fixture
def served(qwen_dir, local, monkeypatch):
    """make(window=..., batch_size=..., drop=...) -> (scorer, fake); the scorers are closed after."""
    made: list[ServedPRMScorer] = []

    def make(window: int | None = None, batch_size: int = 16, drop: int = 0) -> tuple[ServedPRMScorer, FakePooling]:
        scorer = ServedPRMScorer(qwen_dir, OpenAIServerConfig("http://127.0.0.1:9", max_retries=0), "qwen_prm",
                                 batch_size=batch_size)
        fake = FakePooling(local, window, drop)
        monkeypatch.setattr(scorer.client, "request", fake)
        made.append(scorer)
        return scorer, fake

    yield make
    for scorer in made:
        scorer.close()


# -- ServedPRMScorer against the in-process stand-in ------------------------------------------------


def test_the_pooling_request_asks_for_raw_logits_of_the_layouts_token_ids(served, local):
    scorer, fake = served()
    scorer.score(SCORED)
    (body,) = fake.bodies
    assert body["task"] == "token_classify" and body["model"] == "tiny-prm"
    assert body["use_activation"] is False  # the scorer softmaxes the logits itself
    assert body["add_special_tokens"] is False  # the ids are the whole text already
    assert body["input"] == [ids for ids, _ in local.layout.sequences(SCORED)]


def test_results_returned_out_of_order_are_matched_to_their_paths_by_index(served, want):
    scorer, fake = served(batch_size=3)
    got = scorer.score(SCORED)
    assert len(fake.bodies) == 1 and len(fake.bodies[0]["input"]) == 3  # one request, answered reversed
    assert [len(s) for s in got] == [3, 1, 2]
    for mine, theirs in zip(got, want):
        assert mine == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_path_is_sent_and_scored_at_any_batch_size(served, want, batch_size):
    scorer, fake = served(batch_size=batch_size)
    got = scorer.score(SCORED)
    assert [len(body["input"]) for body in fake.bodies] == ([1, 1, 1] if batch_size == 1 else [2, 1])
    assert [len(s) for s in got] == [len(p.steps) for p in SCORED]
    for mine, theirs in zip(got, want):
        assert mine == pytest.approx(theirs, abs=1e-5)


def test_a_server_that_returns_too_few_results_is_named(served):
    scorer, _ = served(batch_size=3, drop=1)
    with pytest.raises(ValueError, match=r"http://127.0.0.1:9/pooling returned 2 results for 3 inputs"):
        scorer.score(SCORED)


def test_the_servers_max_model_len_bounds_a_path_at_exactly_its_length(served, local, want):
    n = len(local.layout.sequences(SCORED[:1])[0][0])
    assert n < local.layout.context_window  # the folder's window would let it through
    scorer, _ = served(window=n)
    assert scorer.score(SCORED[:1])[0] == pytest.approx(want[0], abs=1e-5)  # exactly the window: scored
    assert scorer.layout.context_window == n
    scorer, fake = served(window=n - 1)
    message = (rf"problem 'p0': the PRM reads {n} tokens, more than its context window of {n - 1} "
               r"\(the server's max_model_len\)")
    with pytest.raises(ValueError, match=message):
        scorer.score(SCORED[:1])
    assert not fake.bodies  # refused before any request


def test_a_repeated_path_costs_its_tokens_once(served, local):
    scorer, _ = served()
    once = scorer.cost(SCORED)
    assert once == sum(len(ids) for ids, _ in local.layout.sequences(SCORED))
    assert scorer.cost(SCORED + SCORED[:1]) == scorer.cost(SCORED + SCORED) == once


def test_the_served_scorer_counts_the_parameters_the_transformers_scorer_does(served, local):
    scorer, _ = served()
    head = sum(p.numel() for p in local.score_head.parameters())
    assert scorer.num_parameters == local.num_parameters  # the head's two biases included
    assert local.num_parameters == sum(p.numel() for p in local.model.base_model.parameters()) + head


# -- layouts ------------------------------------------------------------------------------------------


def test_two_problems_whose_steps_read_alike_are_laid_out_apart(local):
    a = Prefix(Problem("a", "What is 2 + 2?", "4"), (step("The answer is 4"),))
    b = Prefix(Problem("b", "Compute 1 + 3.", "4"), (step("The answer is 4"),))
    (ids_a, _), (ids_b, _) = local.layout.sequences([a, b])  # one read, both new
    text_a, text_b = (local.tokenizer.decode(ids, skip_special_tokens=True) for ids in (ids_a, ids_b))
    assert "What is 2 + 2?" in text_a and "Compute 1 + 3." in text_b and "What is 2 + 2?" not in text_b
    ra, rb = local.read([a, b])
    assert ra.token_ids != rb.token_ids and ra.step_scores != pytest.approx(rb.step_scores, abs=1e-6)


def test_a_qwen_chat_template_whose_prompt_is_not_the_start_of_the_whole_is_named(qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    generation_prompt = "{% if add_generation_prompt %}<|assistant|>"
    tokenizer.chat_template = CHAT_TEMPLATE.replace(generation_prompt, "{% if add_generation_prompt %}<|bot|>")
    with pytest.raises(ValueError, match="does not render a conversation's earlier turns"):
        prm_text(resolve_prm_format("qwen_prm"), tokenizer, PATHS[0])


def test_a_chat_tag_step_join_goes_between_steps_not_before_the_first(qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    fmt = PRMFormat(layout="chat_tag", step_tag=STEP_TAG, step_join="\n", reader="head")
    path = Prefix(Problem("a", "What is 2 + 2?", "4"), (step("2 + 2 = 4"), step("Answer: 4")))
    laid = prm_text(fmt, tokenizer, path)
    assert laid.text == "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n2 + 2 = 4<extra_0>\nAnswer: 4<extra_0>\n"
    assert [laid.text[:end][-len(STEP_TAG):] for end in laid.read_ends] == [STEP_TAG] * 2


def test_a_step_that_mentions_a_step_number_later_still_gets_its_own_number():
    fmt = resolve_prm_format("math_shepherd")
    path = Prefix(Problem("p", "What is 2+3?", "5"), (step("First add 2 and 3.\n"), step("As in step 1: 2 + 3 = 5")))
    assert prm_text(fmt, None, path).text == (
        "What is 2+3? Step 1: First add 2 and 3. ки\nStep 2: As in step 1: 2 + 3 = 5 ки\n"
    )


# -- loading --------------------------------------------------------------------------------------------


def test_num_parameters_of_an_untied_causal_lm_prm_leave_out_its_output_layer(tmp_path):
    untied = save_tiny_checkpoint(tmp_path / "untied", TinyModelConfig(
        hidden=PRM_SHAPE.hidden, layers=PRM_SHAPE.layers, heads=PRM_SHAPE.heads, kv_heads=PRM_SHAPE.kv_heads,
        intermediate=PRM_SHAPE.intermediate, tie_embeddings=False))
    scorer = LMPRMScorer.from_pretrained(untied, "math_shepherd")
    base = sum(p.numel() for p in scorer.model.base_model.parameters())
    assert scorer.num_parameters == base < sum(p.numel() for p in scorer.model.parameters())


def test_an_explicit_token_id_must_be_below_the_tokenizers_length(qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    n = len(tokenizer)
    fmt = resolve_prm_format("math_shepherd")
    assert check_tokenizer(tokenizer, fmt, None, n - 1)[1] == n - 1  # the last id is a token
    with pytest.raises(ValueError, match=rf"bad_id={n} must be a token id in \[0, {n}\)"):
        check_tokenizer(tokenizer, fmt, None, n)
    with pytest.raises(ValueError, match=rf"good_id={n} must be a token id in \[0, {n}\)"):
        check_tokenizer(tokenizer, fmt, n, None)
