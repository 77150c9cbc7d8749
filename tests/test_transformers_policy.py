"""Tests of the in-process transformers policy on a tiny random Llama and a word-level tokenizer
built here: order and counts, seeding, greedy against a cache-free loop, left-padding
independence, log-probs against a full forward, stop reasons, think-awareness, rollout splitting,
compute accounting and input validation. A `ScriptedLM` wrapper forces chosen tokens at chosen
positions (a +100 logit) while still running the real model, so stop behaviour is deterministic.
"""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from policies.checkpoint import save_checkpoint
from policies.sampling import draw_tokens, top_p_filter
from policies.sampling_config import SamplingConfig
from policies.step_stops import split_step_ends
from policies.prefix_cache import PrefixCacheConfig
from policies.transformers_policy import TransformersPolicy, merge_identical, plan_chunks
from treesearch.protocols import Policy, TemperaturePolicy, WidthPolicy
from treesearch.records import Prefix, Problem, Step

SEP = ".\n\n"
CHARS = list("0123456789+-=x ")


def make_tokenizer(with_think: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then the step tokens, then one
    token per character; decoding concatenates tokens."""
    step_tokens = ["<think>", "</think>", SEP] if with_think else [SEP]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + step_tokens + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<bos>", "<eos>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in step_tokens])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the 0.02 init, so samples differ visibly
        model.lm_head.weight.mul_(20)
    return model.eval()


class ScriptedLM(torch.nn.Module):
    """Runs the wrapped model, then adds +100 to the logit of script[p] when predicting the token
    at absolute position p (position id of the fed token + 1)."""

    def __init__(self, inner: LlamaForCausalLM, script: dict[int, int]) -> None:
        super().__init__()
        self.inner, self.script = inner, script
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        target = kwargs["position_ids"][:, -1] + 1  # [B]
        bias = torch.zeros_like(out.logits[:, -1, :])  # [B, V]
        for row, position in enumerate(target.tolist()):
            if position in self.script:
                bias[row, self.script[position]] = 100.0
        out.logits = out.logits.clone()
        out.logits[:, -1, :] += bias
        return out


class ForwardLog:
    """Forward pre-hook recording (rows, non-pad new tokens) of every model call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")  # no mask: a shared-prefix decode step
        self.calls.append((ids.shape[0], ids.numel() if mask is None else int(mask[:, -ids.shape[1]:].sum())))

    @property
    def tokens(self) -> int:
        return sum(tokens for _, tokens in self.calls)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TOK = make_tokenizer()
ID = TOK.get_vocab()


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def policy(model=None, tokenizer=TOK, **sampling) -> TransformersPolicy:
    settings = dict(temperature=1.0, max_step_tokens=8, max_total_tokens=16, batch_size=64)
    settings.update(sampling)
    model = model if model is not None else make_model(len(tokenizer))
    return TransformersPolicy(model, tokenizer, SamplingConfig(**settings), prompt_fn=lambda p: p.question)


def scripted(script_text: dict[int, str], tokenizer=TOK, **sampling) -> TransformersPolicy:
    vocab = tokenizer.get_vocab()
    model = ScriptedLM(make_model(len(tokenizer)), {p: vocab[t] for p, t in script_text.items()})
    return policy(model, tokenizer, **sampling)


def mixed_prefixes() -> list[Prefix]:
    """Prefixes of different lengths, some with steps (given as token ids)."""
    step = Step("3+4" + SEP, tuple(ids("3+4" + SEP)), (0.0,) * 4, "separator")
    return [
        Prefix(Problem("a", "<think>1+2=")),
        Prefix(Problem("b", "<think>12+34=56-7")),
        Prefix(Problem("c", "<think>5"), (step,)),
        Prefix(Problem("d", "9")),
    ]


def full_logprobs(model, context: list[int], generated: list[int]) -> list[float]:
    """log_softmax at each generated token from one cache-free forward over the whole sequence."""
    seq = torch.tensor([context + generated])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)  # [L, V]
    start = len(context) - 1
    return [logp[start + k, t].item() for k, t in enumerate(generated)]


def context_of(prefix: Prefix) -> list[int]:
    return TOK(prefix.problem.question).input_ids + [t for s in prefix.steps for t in s.token_ids]


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature=inf must be a finite number >= 0"),
        (dict(temperature="abc"), "temperature='abc' must be a number"),   # Hydra's policy.sampling.temperature=abc
        (dict(top_p=True), "top_p=True must be a number"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(max_step_tokens=0), "max_step_tokens=0"),
        (dict(max_total_tokens=-3), "max_total_tokens=-3"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(separator=""), "separator=''"),
        (dict(think_open="<t>", think_close="<t>"), "must differ"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_plan_chunks_splits_items_larger_than_the_room():
    assert plan_chunks([4, 4], 5) == [[(0, 4), (1, 1)], [(1, 3)]]
    assert plan_chunks([0, 2, 0], 8) == [[(1, 2)]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125]])
    # sorted 0.5, 0.25, 0.125, 0.125: mass before each = 0, 0.5, 0.75, 0.875 -> top_p 0.75 keeps
    # 0.5 and 0.25 (the third token's predecessors already reach 0.75)
    assert top_p_filter(probs, 0.75).tolist() == [[0.0, 0.5, 0.25, 0.0]]
    assert top_p_filter(probs, 1e-9).tolist() == [[0.0, 0.5, 0.0, 0.0]]


def test_inverse_cdf_draws_follow_the_distribution_and_the_generator():
    probs = torch.tensor([[0.2, 0.0, 1.2, 0.6]]).expand(60_000, 4)  # unnormalised: 0.1, 0, 0.6, 0.3
    draws = draw_tokens(probs, torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=4).float() / len(draws)
    assert share[1] == 0.0  # zero mass is never drawn
    assert torch.allclose(share, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01)
    again = draw_tokens(probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # the generator alone decides
    one_hot = torch.zeros(5, 7)
    one_hot[torch.arange(5), torch.tensor([6, 0, 3, 6, 2])] = 1.0
    assert draw_tokens(one_hot, None).tolist() == [6, 0, 3, 6, 2]  # a single token with mass, edges included


# -- batching, seeds, greedy ----------------------------------------------------------------------


def test_is_a_policy_and_counts_parameters():
    p = policy()
    assert isinstance(p, Policy)
    assert p.num_parameters == sum(x.numel() for x in p.model.parameters())
    assert p.propose([], 3, seed=0) == [] and p.rollout([], 3, seed=0) == []


def test_order_and_counts_kept_across_chunks():
    # batch_size 5 with 4 prefixes x 3 samples: chunks split prefixes; greedy rows must still
    # equal each prefix proposed alone.
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    batched = policy(model, temperature=0.0, batch_size=5).propose(prefixes, 3, seed=0)
    assert [len(row) for row in batched] == [3, 3, 3, 3]
    alone = policy(model, temperature=0.0)
    for prefix, row in zip(prefixes, batched):
        expected = alone.propose([prefix], 1, seed=0)[0][0]
        assert all(step.token_ids == expected.token_ids for step in row)


@pytest.mark.parametrize("batch_size", [64, 5])
def test_propose_widths_gives_each_prefix_its_own_count_in_its_own_row(batch_size):
    # greedy: every sample after a prefix is its greedy step, so a row filled from another
    # prefix's samples shows; batch_size 5 splits the 8 rows (and the merged "a"s) over chunks
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    a = prefixes[0]
    batch = [a, prefixes[1], a, prefixes[2], prefixes[3]]
    p = policy(model, temperature=0.0, batch_size=batch_size)
    log = ForwardLog(p.model)
    rows = p.propose_widths(batch, [1, 3, 2, 1, 1], seed=0)
    assert isinstance(p, WidthPolicy)
    assert [len(row) for row in rows] == [1, 3, 2, 1, 1]
    assert sum(s.tokens_forwarded for row in rows for s in row) == log.tokens
    for prefix, row in zip(batch, rows):
        expected = policy(model, temperature=0.0).propose([prefix], 1, seed=0)[0][0]
        assert all(step.token_ids == expected.token_ids for step in row)


def test_propose_widths_with_one_width_is_propose():
    p, prefixes = policy(), mixed_prefixes()
    assert p.propose_widths(prefixes, [3] * len(prefixes), seed=5) == p.propose(prefixes, 3, seed=5)
    assert p.propose_widths([], [], seed=0) == []
    sampled = p.propose_widths(prefixes, [1, 4, 2, 3], seed=5)
    assert sampled == p.propose_widths(prefixes, [1, 4, 2, 3], seed=5)  # seeded
    assert len({s.token_ids for s in sampled[1]}) > 1  # 4 draws, not one repeated


@pytest.mark.parametrize("widths, error, message", [
    ([1, 2, 0, 1], ValueError, r"widths\[2\]=0 must be an integer >= 1"),
    ([1, 2.5, 1, 1], ValueError, r"widths\[1\]=2.5"),
    ([1, 2], ValueError, "2 widths for 4 prefixes"),
    (3, TypeError, "widths is a int"),
])
def test_propose_widths_names_a_bad_width(widths, error, message):
    with pytest.raises(error, match=message):
        policy().propose_widths(mixed_prefixes(), widths, seed=0)


def test_with_temperature_shares_the_model_and_caches_and_decodes_where_the_policy_does():
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    sampled = policy(model, temperature=1.0)
    greedy = sampled.with_temperature(0.0)
    assert isinstance(sampled, TemperaturePolicy)
    assert greedy.sampling.temperature == 0.0 and sampled.sampling.temperature == 1.0
    assert greedy.model is model and greedy.prefix_cache is sampled.prefix_cache and greedy.lock is sampled.lock
    expected = policy(model, temperature=0.0).propose(prefixes, 2, seed=0)
    assert [[s.token_ids for s in row] for row in greedy.propose(prefixes, 2, seed=5)] == [
        [s.token_ids for s in row] for row in expected]
    # a decoder attached to the policy later (a continuous engine) decodes the copy's chunks too
    seen = []
    decode = sampled.chunk_decoder
    sampled.chunk_decoder = lambda request: seen.append(request.temperature) or decode(request)
    greedy.propose(prefixes[:1], 1, seed=0)
    assert seen == [0.0]
    with pytest.raises(ValueError, match="temperature"):
        sampled.with_temperature(-1.0)


def test_same_seed_same_output_different_seed_differs():
    p, prefixes = policy(), mixed_prefixes()
    first, again = p.rollout(prefixes, 4, seed=7), p.rollout(prefixes, 4, seed=7)
    assert first == again
    assert p.propose(prefixes, 4, seed=7) == p.propose(prefixes, 4, seed=7)
    other = p.rollout(prefixes, 4, seed=8)
    assert [[s.token_ids for s in path] for row in first for path in row] != [
        [s.token_ids for s in path] for row in other for path in row
    ]


def test_greedy_equals_a_manual_loop_without_cache():
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    steps = policy(model, temperature=0.0, max_total_tokens=12).propose(prefixes, 2, seed=0, stop_at_step=False)
    for prefix, row in zip(prefixes, steps):
        seq = context_of(prefix)
        generated: list[int] = []
        while len(generated) < 12 - sum(s.num_tokens for s in prefix.steps):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([seq + generated])).logits[0, -1].argmax())
            generated.append(token)
            if token == ID["<eos>"]:
                break
        assert row[0].token_ids == tuple(generated) and row[1].token_ids == tuple(generated)
        assert row[0].finish == ("eos" if generated[-1] == ID["<eos>"] else "length")


def test_rows_do_not_depend_on_the_rest_of_the_batch():
    # Left padding: the short prefix "d" alone vs among longer ones (and "b" among shorter ones).
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    p = policy(model, temperature=0.0, max_total_tokens=12)
    mixed = p.propose(prefixes, 1, seed=0, stop_at_step=False)
    for i in (1, 3):
        alone = p.propose([prefixes[i]], 1, seed=0, stop_at_step=False)[0][0]
        assert mixed[i][0].token_ids == alone.token_ids
        assert mixed[i][0].token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


def test_logprobs_equal_a_full_forward_over_the_final_text():
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    paths = policy(model, top_p=0.9, max_total_tokens=14).rollout(prefixes, 3, seed=1)
    for prefix, row in zip(prefixes, paths):
        for path in row:
            generated = [t for s in path for t in s.token_ids]
            logprobs = [lp for s in path for lp in s.token_logprobs]
            assert logprobs == pytest.approx(full_logprobs(model, context_of(prefix), generated), abs=1e-4)


def test_tiny_top_p_is_greedy():
    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    greedy = policy(model, temperature=0.0).propose(prefixes, 1, seed=0)
    nucleus = policy(model, temperature=1.0, top_p=1e-6).propose(prefixes, 3, seed=5)
    for g, row in zip(greedy, nucleus):
        assert all(s.token_ids == g[0].token_ids for s in row)


def test_continuing_a_path_appends_the_step_token_ids():
    # Greedy step by step (each call re-prefills prompt + step ids) equals one greedy run.
    p = scripted({3: SEP, 6: SEP}, temperature=0.0, max_total_tokens=9)  # 2 steps at least
    prefix = Prefix(Problem("a", "<think>"))
    whole = p.propose([prefix], 1, seed=0, stop_at_step=False)[0][0]
    while not prefix.is_terminal:
        prefix = prefix.extend(p.propose([prefix], 1, seed=0)[0][0])
    assert len(prefix.steps) >= 2
    assert tuple(t for s in prefix.steps for t in s.token_ids) == whole.token_ids


# -- stops ----------------------------------------------------------------------------------------


def test_stop_at_separator_eos_and_length():
    # "<bos><think>" fills positions 0-1; the script forces the tokens from position 2 on.
    prefix = [Prefix(Problem("a", "<think>"))]
    step = scripted({2: "1", 3: SEP}).propose(prefix, 2, seed=0)[0][0]
    assert (step.text, step.finish, step.token_ids) == ("1" + SEP, "separator", (ID["1"], ID[SEP]))
    step = scripted({2: "1", 3: "<eos>"}).propose(prefix, 2, seed=0)[0][0]
    assert (step.text, step.finish, step.token_ids) == ("1", "eos", (ID["1"], ID["<eos>"]))
    step = scripted({2: "1", 3: "2", 4: "3"}, max_step_tokens=3).propose(prefix, 1, seed=0)[0][0]
    assert (step.text, step.finish) == ("123", "length")


def test_max_total_tokens_counts_the_prefix_steps():
    done = Step("12", (ID["1"], ID["2"]), (0.0, 0.0), "separator")
    p = scripted({4: "1", 5: "2", 6: "3"}, max_total_tokens=4)
    step = p.propose([Prefix(Problem("a", "<think>"), (done,))], 1, seed=0)[0][0]
    assert (step.text, step.finish) == ("12", "length")  # 4 - 2 prefix tokens = 2 left
    full = Step("1234", tuple(ids("1234")), (0.0,) * 4, "separator")
    empty = p.propose([Prefix(Problem("a", "<think>"), (full,))], 2, seed=0)[0]
    assert [(s.text, s.finish, s.token_ids, s.tokens_forwarded) for s in empty] == [("", "length", (), 0)] * 2


def test_a_step_that_ends_on_a_separator_with_no_room_left_ends_the_path():
    # 2 of max_total_tokens 4 left: "3" + SEP fills the path, so it ends there ("length"), not
    # one round later as n copies of an empty step (kept as n candidates by beam search)
    done = Step("12", (ID["1"], ID["2"]), (0.0, 0.0), "separator")
    prefix = Prefix(Problem("a", "<think>"), (done,))
    full = scripted({4: "3", 5: SEP}, max_total_tokens=4).propose([prefix], 2, seed=0)[0]
    assert [(s.text, s.finish) for s in full] == [("3" + SEP, "length")] * 2
    room = scripted({4: "3", 5: SEP}, max_total_tokens=5).propose([prefix], 1, seed=0)[0][0]
    assert (room.text, room.finish) == ("3" + SEP, "separator")  # a token left: the path goes on
    capped = scripted({2: "1", 3: SEP}, max_total_tokens=8, max_step_tokens=2)
    assert capped.propose([Prefix(Problem("a", "<think>"))], 1, seed=0)[0][0].finish == "separator"  # the step cap, not the path's
    path = scripted({4: "3", 5: SEP, 6: "4"}, max_total_tokens=4).rollout([prefix], 1, seed=0)[0][0]
    assert [(s.text, s.finish) for s in path] == [("3" + SEP, "length")]  # as a rollout ends it


def test_separators_end_steps_only_inside_think():
    script = {2: "1", 3: SEP, 4: "2", 5: "<eos>"}
    outside = scripted(script).propose([Prefix(Problem("a", "7"))], 1, seed=0)[0][0]
    assert (outside.text, outside.finish) == ("1" + SEP + "2", "eos")
    after_close = scripted({2: "7", 3: "</think>", 4: "1", 5: SEP, 6: "<eos>"})
    step = after_close.propose([Prefix(Problem("a", "<think>"))], 1, seed=0)[0][0]
    assert (step.text, step.finish) == ("7</think>1" + SEP, "eos")


def test_separator_right_after_think_or_a_separator_does_not_end_a_step():
    p = scripted({2: SEP, 3: "1", 4: SEP})
    step = p.propose([Prefix(Problem("a", "<think>"))], 1, seed=0)[0][0]
    assert (step.text, step.finish) == (SEP + "1" + SEP, "separator")
    prev = Step("1" + SEP, (ID["1"], ID[SEP]), (0.0, 0.0), "separator")
    p = scripted({4: SEP, 5: "2", 6: SEP})
    step = p.propose([Prefix(Problem("a", "<think>"), (prev,))], 1, seed=0)[0][0]
    assert (step.text, step.finish) == (SEP + "2" + SEP, "separator")


def test_without_think_tokens_separators_always_end_steps():
    tok = make_tokenizer(with_think=False)
    step = scripted({1: "1", 2: SEP}, tokenizer=tok).propose([Prefix(Problem("a", ""))], 1, seed=0)[0][0]
    assert (step.text, step.finish) == ("1" + SEP, "separator")


def test_a_separator_no_token_ends_with_is_reported():
    with pytest.warns(UserWarning, match="separator='!!'"):
        policy(separator="!!")


def test_finished_rows_leave_the_batch_and_prefixes_prefill_once():
    # "a" = <bos><think> (2 tokens) ends at position 3; "b" = <bos><think>1 ends at once.
    p = scripted({2: "5", 3: "<eos>"}, max_total_tokens=6)
    log = ForwardLog(p.model)
    out = p.propose([Prefix(Problem("a", "<think>")), Prefix(Problem("b", "<think>1"))], 4, seed=0)
    assert [s.text for s in out[0]] == ["5"] * 4 and [s.text for s in out[1]] == [""] * 4
    # prefill 2 rows (2 + 3 tokens), one decode of a's 4 rows: in one row while they decode alike
    assert log.calls == [(2, 5), (1, 1)]
    p.forked = False  # (forked decoding off: every row forwarded on its own)
    log.calls.clear()
    p.propose([Prefix(Problem("a", "<think>")), Prefix(Problem("b", "<think>1"))], 4, seed=0)
    assert log.calls == [(2, 5), (4, 4)]


def test_merge_identical_groups_equal_inputs_and_budgets_shortest_first():
    assert merge_identical([[1, 2], [3], [1, 2], [1, 2]], [5, 5, 5, 4]) == [[1], [0, 2], [3]]
    assert merge_identical([], []) == []


@pytest.mark.parametrize("batch_size", [64, 5])
def test_equal_prefixes_prefill_once_and_sample_independently(batch_size):
    # Three copies of "a" among other prefixes: one prefill row for them (per chunk), n samples
    # each, the prefill counted once; with batch_size 5 the merged rows span chunks.
    a = Prefix(Problem("a", "<think>1+2"))
    prefixes = [a, Prefix(Problem("b", "<think>3")), a, a]
    p = policy(batch_size=batch_size)
    log = ForwardLog(p.model)
    out = p.propose(prefixes, 3, seed=4)
    assert [len(row) for row in out] == [3, 3, 3, 3]
    if batch_size == 64:
        assert log.calls[0] == (2, len(context_of(a)) + len(context_of(prefixes[1])))
    assert sum(s.tokens_forwarded for row in out for s in row) == log.tokens
    texts = [s.token_ids for i in (0, 2, 3) for s in out[i]]
    assert len(set(texts)) > 1  # 9 independent draws, not one repeated
    greedy = policy(p.model, temperature=0.0, batch_size=batch_size).propose(prefixes, 2, seed=0)
    ids = [[s.token_ids for s in row] for row in greedy]
    assert ids[0] == ids[2] == ids[3] != ids[1]


# -- rollout ------------------------------------------------------------------------------------


def test_split_step_ends_attaches_separator_runs():
    # tokens a . . b . c: boundaries at 1 and 4 -> steps "a..", "b.", "c"
    assert split_step_ends([0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0]) == [3, 5, 6]
    assert split_step_ends([0, 1], [0, 1]) == [2]


def test_rollout_splits_at_separators_inside_think():
    script = ["1", SEP, "2", SEP, SEP, "3", "</think>", "4", SEP, "<eos>"]
    p = scripted({2 + k: t for k, t in enumerate(script)}, max_total_tokens=20)
    paths = p.rollout([Prefix(Problem("a", "<think>"))], 2, seed=0)[0]
    for path in paths:
        assert [(s.text, s.finish) for s in path] == [
            ("1" + SEP, "separator"), ("2" + SEP + SEP, "separator"), ("3</think>4" + SEP, "eos"),
        ]
        assert [t for s in path for t in s.token_ids] == [ID[t] for t in script]


def test_rollout_cut_by_length_ends_on_length():
    p = scripted({2: "1", 3: SEP, 4: "2", 5: "3"}, max_total_tokens=3)
    path = p.rollout([Prefix(Problem("a", "<think>"))], 1, seed=0)[0][0]
    assert [(s.text, s.finish) for s in path] == [("1" + SEP, "separator"), ("2", "length")]


# -- compute accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["propose", "propose_whole", "rollout"])
def test_tokens_forwarded_sum_to_the_real_work(call):
    p = policy(batch_size=5, max_total_tokens=10)
    log = ForwardLog(p.model)
    prefixes = mixed_prefixes()
    if call == "rollout":
        steps = [s for row in p.rollout(prefixes, 3, seed=0) for path in row for s in path]
    else:
        steps = [s for row in p.propose(prefixes, 3, seed=0, stop_at_step=call == "propose") for s in row]
    assert sum(s.tokens_forwarded for s in steps) == log.tokens > 0
    generated = sum(s.num_tokens for s in steps)
    assert log.tokens < generated + 3 * sum(len(context_of(x)) for x in prefixes)


# -- validation and loading -----------------------------------------------------------------------


def test_invalid_requests_name_the_value():
    p, prefixes = policy(), mixed_prefixes()
    with pytest.raises(ValueError, match="n=0"):
        p.propose(prefixes, 0, seed=0)
    with pytest.raises(ValueError, match="seed=None"):
        p.rollout(prefixes, 1, seed=None)
    with pytest.raises(TypeError, match=r"prefixes\[0\]"):
        p.propose([Problem("a", "1")], 1, seed=0)
    ended = Prefix(Problem("z", "1"), (Step("2", (ID["2"],), (0.0,), "eos"),))
    with pytest.raises(ValueError, match=r"prefixes\[1\].*'z'.*terminal"):
        p.propose([prefixes[0], ended], 1, seed=0)


def test_from_pretrained_round_trip(tmp_path):
    model = make_model(len(TOK))
    save_checkpoint(model, TOK, tmp_path / "ckpt")
    cfg = SamplingConfig(temperature=0.0, max_total_tokens=8)
    loaded = TransformersPolicy.from_pretrained(tmp_path / "ckpt", cfg, prompt_fn=lambda p: p.question)
    prefixes = mixed_prefixes()
    assert loaded.propose(prefixes, 1, seed=0) == policy(model, temperature=0.0, max_total_tokens=8).propose(
        prefixes, 1, seed=0
    )
    with pytest.raises(FileNotFoundError, match="missing"):
        TransformersPolicy.from_pretrained(tmp_path / "missing", cfg, prompt_fn=lambda p: p.question)


def test_inverse_cdf_never_draws_a_trailing_zero_mass_token_at_the_top_of_the_range(monkeypatch):
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert set(draw_tokens(probs.expand(2000, 4) * 3.0, g).tolist()) == {0, 1}
    # u x total that reaches the total itself (u = 1, the very top) still lands on a token with mass
    monkeypatch.setattr(torch, "rand", lambda rows, cols, **_: torch.ones(rows, cols))
    assert draw_tokens(probs, None).item() == 1


def test_keep_freed_memory_is_idempotent_and_can_be_switched_off(monkeypatch):
    from policies import allocator

    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.keep_freed_memory() is False  # off: glibc untouched
    allocator.keep_freed_memory.cache_clear()
    monkeypatch.delenv(allocator.ENV_SWITCH)
    first = allocator.keep_freed_memory()
    assert allocator.keep_freed_memory() is first  # once per process
    big = torch.ones(8 * 1024 * 1024)  # 32 MB: served and freed either way
    assert float(big.sum()) == big.numel()


def test_a_slot_cache_reserves_its_budget_and_grows_only_past_it():
    from transformers import DynamicCache

    from policies.decode_loop import KV_GROWTH, slot_cache

    prefilled = DynamicCache()
    keys = [torch.randn(2, 3, 5, 4) for _ in range(2)]  # per layer [U, H, S, D]
    values = [torch.randn(2, 3, 5, 4) for _ in range(2)]
    for index in range(2):
        prefilled.update(keys[index], values[index], index)
    cache = slot_cache(prefilled, torch.tensor([0, 1, 1]), reserve=10)
    buffer = cache._buffers.keys
    assert buffer.shape == (2, 3, 3, 15, 4)  # [L, R, H, S + reserve, D]
    assert torch.equal(cache.layers[1].keys[2], keys[1][1]) and torch.equal(cache.layers[0].values[0], values[0][0])
    for _ in range(10):  # the reserved columns: written in place, never reallocated
        for layer in cache.layers:
            layer.update(torch.ones(3, 3, 1, 4), torch.ones(3, 3, 1, 4))
    assert cache._buffers.keys is buffer and cache.layers[1].keys.shape[2] == 15 and cache.length == 15
    for layer in cache.layers:  # one past the reserve: the first layer grows every layer's buffer
        layer.update(torch.full((3, 3, 1, 4), 2.0), torch.full((3, 3, 1, 4), 2.0))
    assert cache._buffers.keys is not buffer and cache._buffers.keys.shape[3] == 16 + KV_GROWTH
    for index in range(2):  # the prefill and both layers' new columns survived the move
        assert torch.equal(cache.layers[index].keys[:, :, :5], keys[index][[0, 1, 1]])
        assert bool((cache.layers[index].values[:, :, 5:15] == 1).all() and (cache.layers[index].values[:, :, 15] == 2).all())


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_steps_longer_than_the_step_reserve_grow_the_cache_and_equal_a_full_reserve(monkeypatch, shared_prefix):
    from policies import decode_loop

    model, prefixes = make_model(len(TOK)), mixed_prefixes()
    runs = {}
    for reserve in (1024, 2):  # the budget reserved ahead; 2: most steps outgrow it (KV_GROWTH at a time)
        monkeypatch.setattr(decode_loop, "STEP_KV_RESERVE", reserve)
        p = policy(model, max_step_tokens=12, max_total_tokens=40)
        p.shared_prefix = shared_prefix
        runs[reserve] = p.propose(prefixes, 4, seed=3)
    long_steps = [s for row in runs[2] for s in row if len(s.token_ids) > 2]
    assert long_steps  # the growth path ran
    for full, grown in zip(runs[1024], runs[2]):
        assert [s.token_ids for s in full] == [s.token_ids for s in grown]
        for a, b in zip(full, grown):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_a_slot_cache_moves_rows_and_copies_a_row_out_in_every_layer():
    from policies.decode_loop import SlotCache

    keys = torch.arange(2 * 4 * 1 * 6 * 2, dtype=torch.float32).reshape(2, 4, 1, 6, 2)  # [L, B, H, cap, D]
    values = -keys.clone()
    cache = SlotCache(keys.clone(), values.clone(), length=5)
    cache.move_rows(torch.tensor([1]), torch.tensor([3]), rows=3)  # slot 1 takes row 3; row 2 stays
    for index in range(2):
        assert cache.layers[index].keys.shape == (3, 1, 5, 2)
        assert torch.equal(cache.layers[index].keys[1], keys[index, 3, :, :5])
        assert torch.equal(cache.layers[index].values[2], values[index, 2, :, :5])
    kv = cache.row_kv(1, torch.tensor([0, 3, 4]))  # slot 1 (was row 3), columns 0, 3, 4
    assert kv.length == 3 and kv.keys.shape == (2, 1, 3, 2)
    assert torch.equal(kv.keys, keys[:, 3][:, :, [0, 3, 4]]) and torch.equal(kv.values, values[:, 3][:, :, [0, 3, 4]])
    with pytest.raises(NotImplementedError, match="move_rows"):
        cache.batch_select_indices(torch.tensor([0]))

def test_decode_texts_equals_batch_decode_with_special_tokens_kept():
    from policies.step_assembly import decode_texts

    sequences = [ids("<think>3 + 4 = 7.\n\n"), [TOK.eos_token_id], ids(" 12 * 3"), []]
    expected = TOK.batch_decode(sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert decode_texts(TOK, sequences) == expected and decode_texts(TOK, []) == []
    assert "<think>" in expected[0]  # the special tokens stayed


def test_decode_texts_decodes_equal_sequences_once_and_keeps_their_order():
    from policies.step_assembly import decode_texts

    calls: list[list[list[int]]] = []

    class Counting:  # the slow path: a tokenizer without a Rust backend
        def batch_decode(self, sequences, **kwargs):
            calls.append(sequences)
            return TOK.batch_decode(sequences, **kwargs)

    a, b = ids("3 + 4 = 7.\n\n"), ids(" 12 * 3")
    sequences = [a, b, tuple(a), list(b), a, []]
    expected = TOK.batch_decode([list(s) for s in sequences], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    assert decode_texts(Counting(), sequences) == expected == decode_texts(TOK, sequences)
    assert calls == [[a, b, []]]  # each distinct sequence once, first-seen order


def test_steps_of_another_tokenizer_are_named_not_an_index_error():
    # a prefix whose steps hold ids past the model's embeddings failed with a bare IndexError; it is
    # named before any forward (on CUDA the lookup is a device-side assert that spoils the process)
    p = policy()
    lookups = []
    p.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: lookups.append(args))
    foreign = Step("x", (10_000,), (-0.1,), "separator")
    with pytest.raises(ValueError, match=r"problem 'a': token id 10000 of its path lies outside this model's "
                                         r"vocabulary of \d+: steps made by another policy's tokenizer\?"):
        p.propose([Prefix(Problem("a", "<think>1"), (foreign,))], n=1, seed=0)
    assert lookups == []


def test_nan_token_logprobs_are_named_as_the_policys_by_the_confidence_scorer():
    from scorers.confidence import ConfidenceScorer

    for reduce in ("mean", "min"):
        for logprobs in ((math.nan,), (-0.1, math.nan), (-0.5, math.nan, -0.2)):  # min() skipped a NaN not first
            step = Step("x", (1,) * len(logprobs), logprobs, "eos")
            with pytest.raises(ValueError, match=r"ConfidenceScorer: the policy gave a step NaN token log-probs"):
                ConfidenceScorer(reduce=reduce).score([Prefix(Problem("a", "q"), (step,))])


def test_an_encoder_model_folder_is_named_as_no_policy(tmp_path):
    # a BERT folder loads as BertLMHeadModel and failed inside the KV cache code
    # ("'NoneType' object has no attribute 'layers'")
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    folder = tmp_path / "bert"
    bert.save_pretrained(folder)
    TOK.save_pretrained(folder)
    policy = TransformersPolicy.from_pretrained(folder, SamplingConfig(max_step_tokens=4), prompt_fn=lambda p: p.question)
    with pytest.raises(ValueError, match=r"\(BertLMHeadModel, model_type 'bert'\) returned no KV cache: a policy must be a "
                                         r"causal \(decoder-only\) language model"):
        policy.propose([Prefix(Problem("a", "1"))], n=2, seed=0)


@pytest.mark.parametrize("forked, prefix_cache", [(True, None), (False, None), (True, PrefixCacheConfig())])
def test_a_repetition_penalty_decodes_as_a_manual_loop_with_it_and_reports_raw_logprobs(forked, prefix_cache):
    # the reference's evaluation samples with repetition_penalty 1.05 (vLLM's rule: a seen token's
    # logit / p when positive, x p when negative, over prompt and generated tokens)
    model, prefixes, penalty = make_model(len(TOK)), mixed_prefixes(), 3.0
    sampling = SamplingConfig(temperature=0.0, max_total_tokens=12, repetition_penalty=penalty)
    p = TransformersPolicy(model, TOK, sampling, lambda problem: problem.question, prefix_cache=prefix_cache, forked=forked)
    steps = p.propose(prefixes, 2, seed=0, stop_at_step=False)
    plain = policy(model, temperature=0.0, max_total_tokens=12).propose(prefixes, 1, seed=0, stop_at_step=False)
    assert any(row[0].token_ids != base[0].token_ids for row, base in zip(steps, plain))  # the penalty tells
    for prefix, row in zip(prefixes, steps):
        seq = context_of(prefix)
        generated: list[int] = []
        raw: list[float] = []
        while len(generated) < 12 - sum(s.num_tokens for s in prefix.steps):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq + generated])).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(seq + generated)] = True
            token = int(torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits).argmax())
            raw.append(float(torch.log_softmax(logits, -1)[token]))
            generated.append(token)
            if token == ID["<eos>"]:
                break
        assert row[0].token_ids == tuple(generated) and row[1].token_ids == tuple(generated)
        assert row[0].token_logprobs == pytest.approx(raw, abs=1e-4)
    with pytest.raises(ValueError, match=r"repetition_penalty=0 must be a finite number > 0"):
        SamplingConfig(repetition_penalty=0)


def test_the_repetition_penalty_is_applied_in_float32_and_stays_finite():
    from policies.decode_loop import penalised

    # vLLM penalises float32 logits; bf16 ones / 1.05 rounded to bf16's steps (10 / 1.05 -> 9.5):
    # greedy bf16 decoding differed from vLLM on 3 of 64 paths
    logits = torch.tensor([[10.0, -10.0, 3.0]], dtype=torch.bfloat16)
    seen = torch.tensor([[True, True, False]])
    out = penalised(logits, seen, 1.05)
    assert out.dtype == torch.float32
    shift = 10 / 1.05  # each row shifted by its maximum: the same distribution
    assert out.tolist()[0] == pytest.approx([10 / 1.05 - shift, -10.5 - shift, 3.0 - shift], rel=1e-6)
    # a penalty of 1e-40 divided a logit to inf (NaN log-probs named as diverged weights), and at a
    # temperature below 1 float32's largest value divided to inf again: the last token, in silence
    huge = penalised(torch.tensor([[1.0, 2.0, -1.0]]), torch.ones(1, 3, dtype=torch.bool), 1e-40)
    assert huge[0, :2].tolist() == [0.0, 0.0] and huge[0, 2] < -1e38
    assert penalised(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2, dtype=torch.bool), 1.05).isnan().any()
    for temperature in (1.0, 0.6):
        sampling = SamplingConfig(temperature=temperature, max_total_tokens=6, repetition_penalty=1e-40)
        p = TransformersPolicy(make_model(len(TOK)), TOK, sampling, lambda problem: problem.question)
        steps = p.propose(mixed_prefixes(), 4, seed=0, stop_at_step=False)
        assert all(math.isfinite(lp) for row in steps for step in row for lp in step.token_logprobs)
        drawn = {t for row in steps for step in row for t in step.token_ids}
        assert drawn != {len(TOK) - 1}, temperature  # every row drew the last token (a NaN row's draw)
