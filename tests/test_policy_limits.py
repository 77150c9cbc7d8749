"""The transformers policy at the edges of its settings: the model's context window
(max_position_embeddings), seeds beyond 64 bits, and temperatures / top-p so small that float32
rounds them away. The same context-window rule for vLLM and an OpenAI-compatible server is
tested in tests/test_vllm_policy.py and tests/test_openai_policy.py.

Run: `.venv/bin/python -m pytest tests/test_policy_limits.py`.
"""
from __future__ import annotations

import pytest
import torch

from policies.sampling import sample_next_tokens
from treesearch.records import Prefix, Problem
from test_transformers_policy import ID, TOK, ScriptedLM, make_model, policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WINDOW = 32


def windowed(**sampling):
    """The tiny policy whose model reads at most WINDOW tokens, forced to write "1" at every
    position (never a separator or EOS), so only a token limit can end a sample."""
    model = ScriptedLM(make_model(len(TOK)), {p: ID["1"] for p in range(200)})
    model.config.max_position_embeddings = WINDOW
    return policy(model, **sampling)


def question(tokens: int) -> Problem:
    """A problem whose prompt is `tokens` tokens (<bos> + characters)."""
    return Problem(f"q{tokens}", "<think>" + "2" * (tokens - 2))


def test_a_prompt_longer_than_the_context_window_names_it():
    p = windowed()
    assert len(TOK(question(40).question).input_ids) == 40
    for call in (p.propose, p.rollout):
        message = r"'q40'.* 40 tokens.*context window of 32 tokens.*max_position_embeddings"
        with pytest.raises(ValueError, match=message):
            call([Prefix(question(10)), Prefix(question(40))], 2, seed=0)


@pytest.mark.parametrize("call", ["rollout", "propose", "propose_to_the_end"])
def test_generation_ends_on_length_at_the_context_window(call):
    # prompt 28 tokens + at most 4 generated = the window of 32 (max_total_tokens 16 would allow 16)
    p = windowed(max_step_tokens=16, max_total_tokens=16)
    prefix = Prefix(question(28))
    if call == "rollout":
        steps = [path[-1] for path in p.rollout([prefix], 3, seed=0)[0]]
    else:
        steps = p.propose([prefix], 3, seed=0, stop_at_step=call == "propose")[0]
    assert [(s.token_ids, s.finish) for s in steps] == [(tuple([ID["1"]] * 4), "length")] * 3


def test_a_context_that_fills_the_window_gets_empty_length_steps_and_no_work():
    p = windowed()
    full = Prefix(question(24), ())
    step = p.propose([full], 1, seed=0)[0][0]  # 8 tokens: the step budget (max_step_tokens=8) fits exactly
    assert step.num_tokens == 8 and step.finish == "length"
    filled = Prefix(question(32))
    (empty,) = p.propose([filled], 1, seed=0)[0]
    assert (empty.token_ids, empty.finish, empty.tokens_forwarded) == ((), "length", 0)


def test_any_integer_seed_is_accepted_modulo_two_to_the_64():
    p = policy()
    prefix = [Prefix(Problem("s", "<think>1"))]
    drawn = lambda seed: [s.token_ids for s in p.propose(prefix, 4, seed=seed)[0]]  # noqa: E731
    assert drawn(2**64) == drawn(0) and drawn(2**64 + 5) == drawn(5)
    assert drawn(-1) == drawn(2**64 - 1) and drawn(-(2**70)) == drawn(0)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax(temperature):
    # float32 logits / 1e-40 overflow to inf (softmax: NaN) and 1e-300 rounds to 0 in float32
    logits = torch.tensor([[1.0, 3.0, 2.0, -float("inf")], [0.5, -1.0, 0.25, 0.0]])
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next_tokens(logits, temperature, 1.0, generator)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("row_slot", [None, [1, 1, 0]])
def test_logits_that_are_not_finite_are_a_named_error(temperature, row_slot):
    # a diverged model's NaN logits drew token V, one past the vocabulary: an IndexError in the
    # sampler (greedy took an arbitrary token and a NaN log-prob)
    from policies.sampling import NonFiniteLogitsError

    logits = torch.tensor([[1.0, 3.0, 2.0], [float("nan"), 0.0, 1.0]])
    slots = None if row_slot is None else torch.tensor(row_slot)
    with pytest.raises(NonFiniteLogitsError, match="logits are not finite .* for 2 of 3 rows|for 1 of 2 rows"):
        sample_next_tokens(logits, temperature, 1.0, torch.Generator().manual_seed(0), row_slot=slots)
    tokens, _ = sample_next_tokens(logits[:1], temperature, 1.0, torch.Generator().manual_seed(0))
    assert 0 <= int(tokens) < 3


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    tokens, _ = sample_next_tokens(logits, 1.0, 5e-324, torch.Generator().manual_seed(0))  # 0.0 in float32
    assert tokens.tolist() == [1, 0]


def test_tiny_temperatures_and_top_p_run_through_the_policy():
    greedy = policy(temperature=0.0).propose([Prefix(Problem("t", "<think>1"))], 1, seed=0)[0][0]
    for settings in (dict(temperature=1e-300), dict(top_p=5e-324)):
        steps = policy(**settings).propose([Prefix(Problem("t", "<think>1"))], 3, seed=0)[0]
        assert all(s.token_ids == greedy.token_ids for s in steps)
