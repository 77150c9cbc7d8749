"""The external causal-LM PRM scorer (`scorers/lm_prm_scorer.py`, layouts in
`scorers/prm_format.py`, readers in `scorers/prm_readers.py`): its scores equal P(good) /
(P(good) + P(bad)) of a plain full forward of the laid-out text at the right tokens (tag and chat
layouts) and Qwen2.5-Math-PRM's head probability at each tag (chat_tag layout, score head),
batching changes nothing, paths without steps cost nothing, every bad setting is named, and
`scorer=math_shepherd` runs a search. The PRM here is the tiny random Llama of
tests/tiny_checkpoint.py (its scores are noise; the mechanics are what is tested), with a small
chat template for the chat layouts and a random score head for Qwen's reader.

    .venv/bin/python -m pytest tests/test_lm_prm_scorer.py
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from policies.checkpoint import DamagedCheckpointError
from policies.tiny_model import TinyModelConfig
from scorers.lm_prm_scorer import LMPRMScorer
from scorers.prm_layout import last_token_before, readings_of, whole_paths
from scorers.prm_batches import PRMBatch, forwarded_tokens, plan_batches
from scorers.prm_format import QWEN_SYSTEM, PRMFormat, prm_text, resolve_prm_format
from scorers.prm_readers import ScoreHead, logit_transform
from test_search_resume import run_in_process
from tiny_checkpoint import CHAT_TEMPLATE, save_tiny_checkpoint, with_chat_template, with_score_head
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem, Step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROBLEM = Problem("p0", "What is 3 + 4 * 2?", "11")


def step(text: str) -> Step:
    return Step(text, (1,), (0.0,), "separator")


PATHS = [
    Prefix(PROBLEM, (step("4 * 2 = 8\n"), step("3 + 8 = 11\n"), step("Answer: 11"))),
    Prefix(PROBLEM, ()),
    Prefix(PROBLEM, (step("  3 + 4 = 7\n\n"),)),
    Prefix(Problem("p1", "What is 9 - 5?", "4"), (step("9 - 5 = 4\n"), step("Answer: 4"))),
]


# two layers (a cache with its layers out of order scores wrong) and grouped-query attention
PRM_SHAPE = TinyModelConfig(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("prm") / "tag", PRM_SHAPE)


@pytest.fixture(scope="module")
def chat_dir(prm_dir, tmp_path_factory) -> Path:
    """The same model with a chat template in its tokenizer files."""
    return with_chat_template(prm_dir, tmp_path_factory.mktemp("prm") / "chat")


@pytest.fixture(scope="module")
def qwen_dir(chat_dir, tmp_path_factory) -> Path:
    """The chat model with a random head of Qwen2.5-Math-PRM's shape beside its weights."""
    return with_score_head(chat_dir, tmp_path_factory.mktemp("prm") / "qwen")


def full_forward_scores(directory: Path, ids: list[int], positions: list[int], good: int, bad: int) -> list[float]:
    """P(good) / (P(good) + P(bad)) from the whole vocabulary's logits of one unpadded forward."""
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [L, V]
    return [torch.softmax(logits[p, [good, bad]], dim=-1)[0].item() for p in positions]


def test_tag_layout_scores_each_step_at_its_tag_like_a_full_forward(prm_dir):
    scorer = LMPRMScorer.from_pretrained(prm_dir, "math_shepherd", batch_size=2)
    tokenizer = scorer.tokenizer
    reading = scorer.read(PATHS)[0]
    text = "What is 3 + 4 * 2? Step 1: 4 * 2 = 8 ки\nStep 2: 3 + 8 = 11 ки\nStep 3: Answer: 11 ки\n"
    ids = tokenizer(text)["input_ids"]
    assert list(reading.token_ids) == ids
    # the read token is the one that ends each tag: the prefix up to the tag's end, tokenised alone
    ends = [i + len(" ки") for i in range(len(text)) if text.startswith(" ки", i)]
    positions = [len(tokenizer(text[:end])["input_ids"]) - 1 for end in ends]
    assert list(reading.positions) == positions and len(positions) == 3
    good, bad = tokenizer.encode("+", add_special_tokens=False)[0], tokenizer.encode("-", add_special_tokens=False)[0]
    assert (scorer.good_id, scorer.bad_id) == (good, bad)
    expected = full_forward_scores(prm_dir, ids, positions, good, bad)
    assert reading.step_scores == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in reading.step_scores)


def test_chat_layout_scores_each_step_where_its_answer_is_predicted(chat_dir):
    scorer = LMPRMScorer.from_pretrained(chat_dir, "rlhflow")
    tokenizer = scorer.tokenizer
    reading = scorer.read(PATHS)[3]
    text = "<|user|>\nWhat is 9 - 5? 9 - 5 = 4\n<|assistant|>\n+\n<|user|>\nAnswer: 4\n<|assistant|>\n+\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(reading.token_ids) == ids
    answers = [i + len("<|assistant|>\n") for i in range(len(text)) if text.startswith("<|assistant|>\n", i)]
    positions = [len(tokenizer(text[:start], add_special_tokens=False)["input_ids"]) - 1 for start in answers]
    assert list(reading.positions) == positions
    assert [ids[p + 1] for p in positions] == [scorer.good_id] * 2  # each read token predicts the answer
    expected = full_forward_scores(chat_dir, ids, positions, scorer.good_id, scorer.bad_id)
    assert reading.step_scores == pytest.approx(expected, abs=1e-5)


def test_qwen_layout_scores_each_step_at_its_tag_with_the_score_head(qwen_dir):
    scorer = LMPRMScorer.from_pretrained(qwen_dir, "qwen_prm", batch_size=2)
    tokenizer = scorer.tokenizer
    reading = scorer.read(PATHS)[0]
    text = (f"<|system|>\n{QWEN_SYSTEM}\n<|user|>\nWhat is 3 + 4 * 2?\n"
            "<|assistant|>\n4 * 2 = 8<extra_0>3 + 8 = 11<extra_0>Answer: 11<extra_0>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(reading.token_ids) == ids
    ends = [i + len("<extra_0>") for i in range(len(text)) if text.startswith("<extra_0>", i)]
    positions = [len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1 for end in ends]
    assert list(reading.positions) == positions and len(positions) == 3
    base = AutoModel.from_pretrained(str(qwen_dir)).eval()  # the backbone without the LM head
    head = {k: v for k, v in load_file(str(qwen_dir / "model.safetensors")).items() if k.startswith("score.")}
    with torch.no_grad():
        hidden = base(torch.tensor([ids])).last_hidden_state[0, positions]  # [3, H]
        inner = torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"])  # [3, H]
        logits = inner @ head["score.2.weight"].T + head["score.2.bias"]  # [3, 2]
    assert reading.step_scores == pytest.approx(torch.softmax(logits, dim=-1)[:, 1].tolist(), abs=1e-5)


def test_a_score_head_is_needed_by_the_head_reader_only(prm_dir, qwen_dir):
    with pytest.raises(FileNotFoundError, match=r"has no score head \(score.0.weight, .*prm_format=qwen_prm"):
        LMPRMScorer.from_pretrained(with_chat_template(prm_dir, qwen_dir.parent / "no_head"), "qwen_prm")
    scorer = LMPRMScorer.from_pretrained(qwen_dir, "qwen_prm")
    with pytest.raises(ValueError, match="reader='head' needs score_head"):
        LMPRMScorer(scorer.model, scorer.tokenizer, "qwen_prm")
    with pytest.raises(ValueError, match="reader='lm' takes no score_head"):
        LMPRMScorer(scorer.model, scorer.tokenizer, "rlhflow", score_head=ScoreHead(8))


@pytest.mark.parametrize("layout", ["math_shepherd", "rlhflow", "qwen_prm"])
def test_batches_of_mixed_lengths_equal_each_path_alone_and_cost_counts_prm_tokens(qwen_dir, layout):
    batched = LMPRMScorer.from_pretrained(qwen_dir, layout, batch_size=3)
    alone = LMPRMScorer(batched.model, batched.tokenizer, layout, batch_size=1, score_head=batched.score_head)
    assert isinstance(batched, Scorer)
    head = sum(p.numel() for p in batched.score_head.parameters()) if layout == "qwen_prm" else 0
    assert batched.num_parameters == sum(p.numel() for p in batched.model.base_model.parameters()) + head > head
    scores = batched.score(PATHS)
    assert [len(s) for s in scores] == [3, 0, 1, 2]  # one per step, in input order; none without steps
    for got, want in zip(scores, [alone.score([p])[0] for p in PATHS]):
        assert got == pytest.approx(want, abs=1e-5)
    readings = batched.read(PATHS)
    assert readings[1].token_ids == () and batched.cost([PATHS[1]]) == 0
    whole = LMPRMScorer(batched.model, batched.tokenizer, layout, score_head=batched.score_head, share_prefix=False)
    assert whole.cost(PATHS) == sum(len(r.token_ids) for r in readings) > batched.cost(PATHS)  # the question once


def beam_children(problem: Problem, parent: tuple[str, ...], news: list[str]) -> list[Prefix]:
    """The children of one beam: its steps, then one new step each (what a beam search scores)."""
    return [Prefix(problem, tuple(step(t) for t in parent) + (step(new),)) for new in news]


CHILDREN = (
    beam_children(PROBLEM, ("4 * 2 = 8\n", "3 + 8 = 11\n"),
                  ["Answer: 11", "Answer: 12", "So 11.\n", "Check: 8 + 3 = 11\n"])
    + beam_children(PROBLEM, ("3 + 4 = 7\n",), ["7 * 2 = 14\n", "Answer: 14"])
    + beam_children(Problem("p1", "What is 9 - 5?", "4"), (), ["9 - 5 = 4\n", "Answer: 4"])
)


@pytest.mark.parametrize("layout", ["math_shepherd", "rlhflow", "qwen_prm"])
def test_paths_that_start_alike_share_one_forward_of_that_start_and_score_the_same(qwen_dir, layout):
    shared = LMPRMScorer.from_pretrained(qwen_dir, layout, batch_size=3)
    whole = LMPRMScorer(shared.model, shared.tokenizer, layout, batch_size=3, score_head=shared.score_head,
                        share_prefix=False)
    for got, want in zip(shared.score(CHILDREN), whole.score(CHILDREN)):
        assert len(got) == len(want) and got == pytest.approx(want, abs=1e-5)
    assert shared.cost(CHILDREN) < whole.cost(CHILDREN)  # earlier steps forwarded once per batch of a beam
    # the four children of the first beam, in two batches of 2 (at most 3): the beam's tokens twice
    first = [list(r.token_ids) for r in shared.read(CHILDREN[:4])]
    start = next(n for n in range(len(first[0])) if any(ids[n] != first[0][n] for ids in first))
    assert shared.cost(CHILDREN[:4]) == 2 * start + sum(len(ids) - start for ids in first)


def test_math_shepherd_numbers_each_step_unless_the_step_numbers_itself():
    """The model card's layout: "Step k: " before each step; a policy that writes its own "Step k:"
    (search-and-learn's "## Step 1:") keeps it and gets no second one."""
    fmt = resolve_prm_format("math_shepherd")
    plain = Prefix(PROBLEM, (step("4 * 2 = 8\n"), step("3 + 8 = 11")))
    assert prm_text(fmt, None, plain).text == "What is 3 + 4 * 2? Step 1: 4 * 2 = 8 ки\nStep 2: 3 + 8 = 11 ки\n"
    numbered = Prefix(PROBLEM, (step("## Step 1: 4 * 2 = 8\n"), step("**Step 2:** 3 + 8 = 11"), step("Step 3. 11"),
                                step("Steps 4 and 5")))
    text = prm_text(fmt, None, numbered)
    assert text.text == ("What is 3 + 4 * 2? ## Step 1: 4 * 2 = 8 ки\n**Step 2:** 3 + 8 = 11 ки\nStep 3. 11 ки\n"
                         "Step 4: Steps 4 and 5 ки\n")
    assert [text.text[:end][-3:] for end in text.read_ends] == [" ки"] * 4


def test_a_step_is_read_without_its_surrounding_whitespace(prm_dir):
    scorer = LMPRMScorer.from_pretrained(prm_dir)
    (reading,) = scorer.read([PATHS[2]])
    assert scorer.tokenizer.decode(reading.token_ids, skip_special_tokens=True) == "What is 3 + 4 * 2? Step 1: 3 + 4 = 7 ки\n"


def test_a_repeated_path_is_forwarded_once(prm_dir):
    scorer = LMPRMScorer.from_pretrained(prm_dir, cache_bytes=0)
    once = scorer.cost(CHILDREN[:2])
    twice = [CHILDREN[0], CHILDREN[1], CHILDREN[0], CHILDREN[0]]  # equal beams ask for one path again
    assert scorer.cost(twice) == once
    readings, alone = scorer.read(twice), scorer.read([CHILDREN[0]])[0]
    assert readings[2] == readings[3] == readings[0]
    assert readings[0].positions == alone.positions and readings[0].step_scores == pytest.approx(alone.step_scores)
    as_asked = LMPRMScorer(scorer.model, scorer.tokenizer, share_prefix=False, cache_bytes=0)  # shares nothing
    assert as_asked.cost(twice) == sum(len(r.token_ids) for r in readings) > once


@pytest.mark.parametrize("share_prefix", [True, False])
def test_paths_of_one_text_split_into_other_steps_are_read_apart(prm_dir, share_prefix):
    """A step that holds the tag and joiner lays out as the two steps it spans: same tokens, other
    read positions; each path gets its own reading (one score per step), in one call or alone."""
    base = LMPRMScorer.from_pretrained(prm_dir, cache_bytes=0)
    plain = PRMFormat(layout="tag")  # " ки" after a step, "\n" between, no "Step k: " (which tells the two apart)
    scorer = LMPRMScorer(base.model, base.tokenizer, plain, share_prefix=share_prefix, cache_bytes=0)
    joined = Prefix(PROBLEM, (step("4 * 2 = 8" + scorer.format.step_tag + scorer.format.step_join + "3 + 8 = 11"),))
    split = Prefix(PROBLEM, (step("4 * 2 = 8"), step("3 + 8 = 11")))
    together = scorer.read([joined, split, joined])
    assert together[0].token_ids == together[1].token_ids and together[0].positions != together[1].positions
    assert [len(r.step_scores) for r in together] == [1, 2, 1] and together[2] == together[0]
    for reading, path in zip(together, [joined, split]):
        assert reading.step_scores == pytest.approx(scorer.read([path])[0].step_scores)
    # the helpers of the vLLM and served scorers key a reading the same way
    sequences = [(list(r.token_ids), list(r.positions)) for r in together]
    work = whole_paths(sequences)
    assert work == sequences[:2]
    assert [r.step_scores for r in readings_of(sequences, work, [[0.1], [0.2, 0.3]])] == [(0.1,), (0.2, 0.3), (0.1,)]


def test_think_tags_are_dropped_from_the_steps(prm_dir):
    scorer = LMPRMScorer.from_pretrained(prm_dir)
    thinking = Prefix(PROBLEM, (step("<think>\n4 * 2 = 8\n"), step("3 + 8 = 11</think>\n"), step("Answer: 11")))
    (reading,) = scorer.read([thinking])
    assert reading == scorer.read([PATHS[0]])[0]  # as if the policy had not thought aloud
    kept = LMPRMScorer(scorer.model, scorer.tokenizer, PRMFormat(drop=()))
    assert "<think>" in kept.tokenizer.decode(kept.read([thinking])[0].token_ids)


def test_the_read_token_holds_the_character_before_the_end():
    spans = [(0, 0), (0, 3), (3, 4), (4, 5), (4, 5), (5, 6), (0, 0)]  # bos, ..., two byte tokens of one char, eos
    assert last_token_before(spans, 5) == 4 and last_token_before(spans, 6) == 5 and last_token_before(spans, 4) == 2


def test_formats_and_presets_are_checked():
    assert resolve_prm_format("math_shepherd").layout == "tag" and resolve_prm_format("rlhflow").layout == "chat"
    assert (resolve_prm_format("qwen_prm").layout, resolve_prm_format("qwen_prm").reader) == ("chat_tag", "head")
    custom = PRMFormat(step_tag=" <step>", good="Y", bad="N")
    assert resolve_prm_format(custom) is custom
    with pytest.raises(ValueError, match=r"prm_format='shepherd'; valid: math_shepherd, rlhflow, qwen_prm"):
        resolve_prm_format("shepherd")
    with pytest.raises(ValueError, match=r"layout='xml'; valid: tag, chat, chat_tag"):
        PRMFormat(layout="xml")
    with pytest.raises(ValueError, match=r"reader='value'; valid: lm, head"):
        PRMFormat(reader="value")
    with pytest.raises(ValueError, match="two different tokens"):
        PRMFormat(good="+", bad="+")
    with pytest.raises(ValueError, match="visible tag"):
        PRMFormat(step_tag="  ")


def test_tokens_that_do_not_fit_the_prm_are_named(prm_dir, chat_dir):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(prm_dir)), AutoTokenizer.from_pretrained(str(prm_dir))
    with pytest.raises(ValueError, match=r"the good token 'correct' encodes to \d+ tokens .*give good_id"):
        LMPRMScorer(model, tokenizer, PRMFormat(good="correct"))
    scorer = LMPRMScorer(model, tokenizer, PRMFormat(good="correct"), good_id=13)  # explicit ids win
    assert (scorer.good_id, scorer.bad_id) == (13, tokenizer.encode("-", add_special_tokens=False)[0])
    with pytest.raises(ValueError, match=r"bad_id=100000 must be a token id in \[0, 453\)"):
        LMPRMScorer(model, tokenizer, bad_id=100000)
    with pytest.raises(ValueError, match="same token id"):
        LMPRMScorer(model, tokenizer, good_id=13, bad_id=13)
    no_template = r"has no chat template: the chat layouts \(prm_format=rlhflow, qwen_prm\) need one"
    with pytest.raises(ValueError, match=no_template):
        LMPRMScorer.from_pretrained(prm_dir, "rlhflow")
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        LMPRMScorer.from_pretrained(prm_dir, batch_size=0)


def test_a_chat_template_whose_turns_are_not_prefixes_is_named(chat_dir):
    scorer = LMPRMScorer.from_pretrained(chat_dir, "rlhflow")
    generation_prompt = "{% if add_generation_prompt %}<|assistant|>"
    scorer.tokenizer.chat_template = CHAT_TEMPLATE.replace(generation_prompt, "{% if add_generation_prompt %}<|bot|>")
    with pytest.raises(ValueError, match="does not render a conversation's earlier turns"):
        scorer.score(PATHS[:1])


def test_a_chat_layout_with_a_score_head_reads_before_each_answer(qwen_dir):
    # check_tokenizer gave reader "head" no answer token (-1): every path failed "does not render the answer"
    scorer = LMPRMScorer.from_pretrained(qwen_dir, PRMFormat(layout="chat", reader="head"))
    chat = LMPRMScorer.from_pretrained(qwen_dir, "rlhflow")
    reading, expected = scorer.read(PATHS)[3], chat.read(PATHS)[3]
    assert reading.positions == expected.positions and len(reading.step_scores) == 2


def test_damaged_prm_files_and_a_head_of_another_width_are_named(qwen_dir, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(qwen_dir, weights)
    data = (weights / "model.safetensors").read_bytes()
    (weights / "model.safetensors").write_bytes(data[: len(data) // 2])  # SafetensorError naming no file before
    with pytest.raises(DamagedCheckpointError, match=f"{weights / 'model.safetensors'} is damaged"):
        LMPRMScorer.from_pretrained(weights, "qwen_prm")
    tokens = tmp_path / "tokens"
    shutil.copytree(qwen_dir, tokens)
    text = (tokens / "tokenizer.json").read_text()
    (tokens / "tokenizer.json").write_text(text[: len(text) // 2])  # a bare JSONDecodeError before
    with pytest.raises(DamagedCheckpointError, match=f"{tokens / 'tokenizer.json'} is damaged"):
        LMPRMScorer.from_pretrained(tokens, "qwen_prm")
    wide = tmp_path / "wide"
    shutil.copytree(qwen_dir, wide)
    tensors = load_file(str(wide / "model.safetensors"))
    tensors["score.0.weight"], tensors["score.0.bias"] = torch.zeros(64, 64), torch.zeros(64)
    tensors["score.2.weight"] = torch.zeros(2, 64)
    save_file(tensors, str(wide / "model.safetensors"))  # loaded, then failed at the first score before
    with pytest.raises(ValueError, match=r"score.0.weight has shape \(64, 64\), not \(32, 32\)"):
        LMPRMScorer.from_pretrained(wide, "qwen_prm")


def test_logit_transform_divides_by_granites_logits_scaling():
    from types import SimpleNamespace

    assert logit_transform(SimpleNamespace(logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(SimpleNamespace(logit_scale=2.0, final_logit_softcapping=30.0)) == (2.0, 30.0)


def test_missing_folders_and_long_paths_are_named(prm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        LMPRMScorer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LMPRMScorer.from_pretrained(tmp_path / "empty")
    scorer = LMPRMScorer.from_pretrained(prm_dir)
    scorer.layout.context_window = 20
    with pytest.raises(ValueError, match=r"problem 'p0': the PRM reads \d+ tokens, more than its context window of 20"):
        scorer.score(PATHS)


def test_a_search_ranks_steps_with_the_prm_preset(prm_dir, tmp_path):
    out = tmp_path / "run"
    run_in_process([
        f"policy.path={prm_dir}", "search=beam", "scorer=math_shepherd", f"scorer.path={prm_dir}",
        "scorer.device=cpu", "scorer.dtype=float32", "task.count=2", "chunk=2", "budget=4",
        "policy.sampling.max_total_tokens=12", "policy.sampling.max_step_tokens=4", "progress=false",
        "num_threads=1", f"out_dir={out}",
    ])
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["compute"]["scorer_tokens"] > 0 for row in rows)
    # FLOPs count the PRM's base model over its tokens beside the policy's over its own
    policy = AutoModelForCausalLM.from_pretrained(str(prm_dir))
    prm_params = sum(p.numel() for p in policy.base_model.parameters())
    for row in rows:
        compute = row["compute"]
        policy_flops = 2.0 * policy.num_parameters() * compute["tokens_forwarded"]
        assert compute["flops"] == pytest.approx(policy_flops + 2.0 * prm_params * compute["scorer_tokens"])


@pytest.mark.parametrize("layout", ["math_shepherd", "rlhflow", "qwen_prm"])
def test_a_path_whose_parent_was_scored_forwards_only_its_new_tokens(qwen_dir, layout):
    memory = LMPRMScorer.from_pretrained(qwen_dir, layout, batch_size=3)
    whole = LMPRMScorer(memory.model, memory.tokenizer, layout, batch_size=3, score_head=memory.score_head,
                        share_prefix=False, cache_bytes=0)
    parents = [Prefix(c.problem, c.steps[:-1]) for c in CHILDREN]
    memory.score(parents)  # the last round: every child's parent is scored (and kept) here
    got, want = memory.score(CHILDREN), whole.score(CHILDREN)
    for g, w in zip(got, want):
        assert len(g) == len(w) and g == pytest.approx(w, abs=1e-5)
    # each child of a scored parent forwarded only its tokens after the parent's last reading (the
    # first six; the two children of the empty path were planned as before)
    own = [len(c.token_ids) - p.positions[-1] - 1 for c, p in zip(memory.read(CHILDREN[:6]), whole.read(parents[:6]))]
    assert memory.cost(CHILDREN[:6]) == sum(own) < whole.cost(CHILDREN[:6])
    memory.clear_memory()  # forgotten: the children forward again (their common starts once)
    for g, again in zip(got, memory.score(CHILDREN)):
        assert again == pytest.approx(g, abs=1e-5)
    assert sum(own) < memory.cost(CHILDREN[:6]) < whole.cost(CHILDREN[:6])


def test_without_room_nothing_is_kept_and_the_scores_stay(prm_dir):
    kept = LMPRMScorer.from_pretrained(prm_dir)
    none = LMPRMScorer(kept.model, kept.tokenizer, cache_bytes=0)
    tiny = LMPRMScorer(kept.model, kept.tokenizer, cache_bytes=1)  # every path is larger than the budget
    parents = [Prefix(c.problem, c.steps[:-1]) for c in CHILDREN]
    for scorer in (kept, none, tiny):
        scorer.score(parents)
    assert not none.memory.keeps_kv and len(tiny.memory.cache) == 0 and len(kept.memory.cache) > 0
    reference = kept.score(CHILDREN)
    for scorer in (none, tiny):
        for got, want in zip(scorer.score(CHILDREN), reference):
            assert got == pytest.approx(want, abs=1e-5)
        assert scorer.cost(CHILDREN) > kept.cost(CHILDREN)
    with pytest.raises(ValueError, match=r"cache_bytes=-1 must be an integer >= 0"):
        LMPRMScorer(kept.model, kept.tokenizer, cache_bytes=-1)


def test_plan_groups_sequences_that_share_a_start_while_it_saves_tokens():
    beam = list(range(100, 140))  # 40 tokens every child of one beam starts with
    seqs = [beam + [1, 2], [7] * 30, beam + [3], [], beam + [4, 5, 6], [8] * 20 + [9]]
    batches = plan_batches(seqs, batch_size=8)
    assert batches[0] == PRMBatch((0, 2, 4), shared=40)  # sorted by tokens; the rest batched alone
    assert sorted(r for b in batches for r in b.rows) == [0, 1, 2, 4, 5]  # none for the empty one
    assert all(b.shared == 0 for b in batches[1:])
    assert forwarded_tokens(batches, [len(s) for s in seqs]) == 40 + 2 + 1 + 3 + 30 + 21
    # a start shorter than min_shared is not shared; share=False shares nothing
    assert all(b.shared == 0 for b in plan_batches(seqs, 8, min_shared=41))
    assert all(b.shared == 0 for b in plan_batches(seqs, 8, share=False))
    # a group larger than a batch: near-equal batches, each forwarding the start once
    many = [beam + [k] for k in range(5)]
    assert [b.rows for b in plan_batches(many, batch_size=4)] == [(0, 1), (2, 3, 4)]
    # every row keeps a token of its own; a sequence equal to another's start caps the shared part
    assert plan_batches([beam, beam + [1]], 8) == [PRMBatch((0, 1), shared=39)]


def test_plan_leaves_a_group_when_joining_it_would_save_less():
    beam_a, beam_b = [5] * 20 + list(range(60)), [5] * 20 + list(range(100, 160))
    seqs = [beam_a + [1], beam_a + [2], beam_b + [1], beam_b + [2]]
    # joining the second beam would share 20 tokens over 3 rows (40 saved) instead of 80 over 2 (80 saved)
    assert plan_batches(seqs, 8) == [PRMBatch((0, 1), shared=80), PRMBatch((2, 3), shared=80)]


def test_the_memory_finds_a_parent_only_with_its_kv_and_scores(monkeypatch):
    from scorers import prm_memory

    def kv(length: int) -> prm_memory.PrefixKV:
        return prm_memory.PrefixKV(torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2))

    memory = prm_memory.PRMMemory(max_bytes=2**20)
    memory.remember([1, 2, 3, 4], 3, kv(3), {2: 0.7}, forwarded=4)  # kept through its last reading
    hit = memory.parent([1, 2, 3, 9, 9], 3)
    assert (hit.length, hit.scores, hit.kv.length) == (3, {2: 0.7}, 3) and memory.forwarded([1, 2, 3, 4]) == 4
    assert memory.parent([1, 2, 3], 3) is None  # nothing left to forward
    assert memory.parent([1, 2, 4, 9], 3) is None  # another start
    memory.remember([5, 6, 7], 3, None, {2: 0.1}, forwarded=3)  # no KV to keep: counted, not found
    assert memory.parent([5, 6, 7, 8], 3) is None and memory.forwarded([5, 6, 7]) == 3
    monkeypatch.setattr(prm_memory, "MAX_RECORDS", 2)
    memory.remember([8, 8], 2, kv(2), {1: 0.5}, forwarded=2)
    assert memory.forwarded([1, 2, 3, 4]) is None  # the oldest record dropped beyond MAX_RECORDS
    memory.clear()
    assert memory.parent([8, 8, 1], 2) is None and len(memory.cache) == 0


def test_the_memory_keeps_a_digest_of_each_paths_ids_not_the_ids():
    # MAX_RECORDS tuples of 2000 token ids each took ~6 GB beside a KV budget of 512 MiB
    from scorers import prm_memory

    memory = prm_memory.PRMMemory(max_bytes=2**20)
    long = [list(range(k, k + 5000)) for k in range(20)]
    for ids in long:
        memory.remember(ids, 4000, prm_memory.PrefixKV(torch.zeros(1, 1, 4000, 2), torch.zeros(1, 1, 4000, 2)),
                        {3999: 0.5}, forwarded=len(ids))
    keys = [*memory._scores, *memory._forwarded]
    assert len(keys) == 40 and all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert [memory.forwarded(ids) for ids in long] == [5000] * 20 and memory.forwarded(long[0][:-1]) is None
    assert memory.parent(long[-1][:4000] + [7], 4000).scores == {3999: 0.5}


def test_the_kept_layouts_are_bounded_in_tokens(chat_dir, monkeypatch):
    from scorers import prm_layout

    scorer = LMPRMScorer.from_pretrained(chat_dir, "rlhflow")
    sequences = scorer.layout.sequences(CHILDREN[:6])
    monkeypatch.setattr(prm_layout, "LAID_OUT_TOKENS", len(sequences[0][0]) + len(sequences[1][0]))
    scorer.layout.sequences(CHILDREN[:6])  # laid out before: kept ones move to the end, none added
    layout = prm_layout.PRMLayout(scorer.layout.format, scorer.layout.tokenizer, scorer.layout.good_id, None)
    assert layout.sequences(CHILDREN[:6]) == sequences  # the same layouts, the oldest dropped as it goes
    assert layout._laid_out_tokens == sum(len(ids) for ids, _ in layout._laid_out.values()) <= prm_layout.LAID_OUT_TOKENS
    assert len(layout._laid_out) < len({(c.problem.question, tuple(s.text for s in c.steps)) for c in CHILDREN[:6]})


@pytest.mark.parametrize("cache_bytes", [0, 2**20])
def test_costs_asked_per_problem_add_up_to_what_the_call_forwarded(chat_dir, cache_bytes):
    # a search scores all problems' paths in one call, then asks each problem's cost: the chat
    # template's start, shared across problems in the call, must be counted once in all
    scorer = LMPRMScorer.from_pretrained(chat_dir, "rlhflow", cache_bytes=cache_bytes)
    calls: list[int] = []  # tokens each forward fed: the rows' own, and a start forwarded for them
    real_tail = scorer._tail

    def counted_tail(rests, start, past):
        calls.append(sum(map(len, rests)) + (start if past is not None else 0))  # nothing is cached here
        return real_tail(rests, start, past)

    scorer._tail = counted_tail
    preamble = "Work it out step by step and give the final answer on its own line. "  # both questions start so
    problems = [Problem(f"q{k}", preamble + f"What is {k} + {k}?", str(2 * k)) for k in (3, 4)]
    paths = [Prefix(p, (step(f"{k} + {k} = {2 * k + d}\n"),)) for p, k in zip(problems, (3, 4)) for d in (0, 1)]
    scorer.score(paths)
    by_problem = [[p for p in paths if p.problem is problem] for problem in problems]
    assert sum(scorer.cost(mine) for mine in by_problem) == scorer.cost(paths) == sum(calls)
    assert len(calls) == 1  # one forward: the preamble is shared across the problems


def test_a_path_is_laid_out_once_for_its_score_its_cost_and_its_children(chat_dir, monkeypatch):
    from scorers import prm_layout

    laid: list[int] = []
    real = prm_layout.prm_text
    monkeypatch.setattr(prm_layout, "prm_text", lambda fmt, tok, path: laid.append(1) or real(fmt, tok, path))
    scorer = LMPRMScorer.from_pretrained(chat_dir, "rlhflow")
    parents = [Prefix(c.problem, c.steps[:-1]) for c in CHILDREN[:6]]
    scorer.score(parents)
    scorer.cost(parents)
    assert len(laid) == 3  # the two distinct parents once each, and the one parent of theirs looked up
    scorer.score(CHILDREN[:6])  # their parents are looked up, not laid out again
    assert len(laid) == 3 + 6


def test_a_policy_that_may_outgrow_the_prm_window_is_warned_about_at_start(prm_dir, tmp_path, capsys):
    from experiments.search import prm_window_warning
    from scorers.confidence import ConfidenceScorer

    scorer = LMPRMScorer.from_pretrained(prm_dir)  # max_position_embeddings 512
    assert prm_window_warning(512, scorer) is None and prm_window_warning(None, scorer) is None
    assert prm_window_warning(4096, ConfidenceScorer()) is None  # no window to outgrow
    run_in_process([
        f"policy.path={prm_dir}", "search=beam", "search.max_depth=2", "scorer=math_shepherd", f"scorer.path={prm_dir}",
        "scorer.device=cpu", "scorer.dtype=float32", "task.count=1", "budget=4", "policy.sampling.max_total_tokens=513",
        "policy.sampling.max_step_tokens=4", "progress=false", "num_threads=1", f"out_dir={tmp_path / 'run'}",
    ])
    err = capsys.readouterr().err
    assert "warning: policy.sampling.max_total_tokens=513 is more than the PRM's context window of 512 tokens" in err


@pytest.fixture(scope="module")
def windowed_prm_dir(tmp_path_factory) -> Path:
    """A Qwen2 PRM whose layers all attend within a sliding window of 8 tokens (Mistral, the
    Math-Shepherd PRM's base, has one of 4096): shorter than the paths' shared starts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from policies.tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=8, max_window_layers=0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("prm") / "windowed"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_sliding_window_prm_scores_shared_starts_and_remembered_parents_as_whole_paths(windowed_prm_dir):
    # the start's KV came from the model's own cache, whose sliding layers keep window - 1
    # columns: the rows after it read a cut past
    shared = LMPRMScorer.from_pretrained(windowed_prm_dir, "math_shepherd", batch_size=3)
    whole = LMPRMScorer(shared.model, shared.tokenizer, "math_shepherd", batch_size=3, share_prefix=False, cache_bytes=0)
    unshared = LMPRMScorer(shared.model, shared.tokenizer, "math_shepherd", batch_size=3, share_prefix=False)
    alone = LMPRMScorer(shared.model, shared.tokenizer, "math_shepherd", batch_size=1)  # no shared start at all
    want = whole.score(CHILDREN)
    shared.score([Prefix(c.problem, c.steps[:-1]) for c in CHILDREN])  # parents remembered: children reuse their KV
    for scorer in (shared, unshared, alone):  # each kept KV of a path forwarded with no past before it
        for got, expected in zip(scorer.score(CHILDREN), want):
            assert len(got) == len(expected) and got == pytest.approx(expected, abs=1e-5)


def test_a_folder_without_the_output_layer_its_format_reads_is_refused(prm_dir, tmp_path):
    # Qwen2.5-Math-PRM (no lm_head, untied) read as math_shepherd: transformers filled lm_head at
    # random and the scorer returned noise that changed with the torch seed
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(prm_dir, tmp_path / "no_lm_head"))
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no_lm_head lacks weights the model needs \(lm_head.weight\), which would "
                                                r"be random: a reader 'lm' PRM is a causal LM"):
        LMPRMScorer.from_pretrained(folder, "math_shepherd")
    LMPRMScorer.from_pretrained(prm_dir, "math_shepherd")  # a whole folder loads
