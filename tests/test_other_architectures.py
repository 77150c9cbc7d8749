"""The transformers backend on decoder architectures whose attention is not Llama's: the ones the
shared prefix, the prefix cache or the padding between cached and new tokens would get wrong run
without them, and their log-probs equal a plain full forward's.

Random 2-layer models of each architecture (built from transformers' config classes, nothing
downloaded) and the project's tiny tokenizer; a bias on a separator-like token makes steps end.

    .venv/bin/pytest tests/test_other_architectures.py
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import GenerationConfig

from policies.prefix_cache import PrefixCacheConfig
from policies.sampling_config import SamplingConfig
from policies.shared_prefix import supports_shared_prefix
from policies.tiny_tokenizer import build_tokenizer
from policies.transformers_policy import TransformersPolicy
from treesearch.records import Prefix, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = build_tokenizer()
COMMON = dict(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=TOK.bos_token_id,
              eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
SEPARATOR_ID = TOK.convert_tokens_to_ids(".\n\n")


def random_model(name: str, **config) -> torch.nn.Module:
    """A random model of transformers' `<name>ForCausalLM`, its separator token made likely."""
    cfg = getattr(transformers, f"{name}Config")(**config)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    model.generation_config = GenerationConfig(eos_token_id=TOK.eos_token_id)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[SEPARATOR_ID] = 4.0
    model.lm_head = head
    return model


def policy(model, prefix_cache: PrefixCacheConfig | None = None) -> TransformersPolicy:
    return TransformersPolicy(model, TOK, SamplingConfig(temperature=1.0, max_step_tokens=6, max_total_tokens=40),
                              lambda problem: problem.question, prefix_cache=prefix_cache)


def worst_logprob_gap(model, prefix: Prefix, steps) -> float:
    """The largest |log-prob - a plain full forward's| over the steps' tokens."""
    context = TOK(prefix.problem.question).input_ids + [t for s in prefix.steps for t in s.token_ids]
    worst = 0.0
    for step in steps:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context + list(step.token_ids)])).logits[0].float(), -1)
        worst = max([worst] + [abs(logprobs[len(context) - 1 + k, t].item() - lp)
                               for k, (t, lp) in enumerate(zip(step.token_ids, step.token_logprobs))])
    return worst


A = Problem("a", "1 2 3 4 5 6<think>", "1")


@pytest.mark.parametrize("name", ["StableLm", "Nemotron", "DiffLlama"])
def test_models_whose_layers_cannot_share_a_prefix_decode_without_it(name):
    # StableLM and Nemotron failed on their first decode step; DiffLlama's log-probs were wrong in silence
    model = random_model(name, **COMMON)
    assert not supports_shared_prefix(model)
    samples = policy(model).propose([Prefix(A)], 3, seed=0)[0]
    assert worst_logprob_gap(model, Prefix(A), samples) < 1e-4


def test_a_model_of_compressed_attention_decodes_without_shared_prefix_or_prefix_cache(capsys):
    # DeepSeek-V3's MLA caches keys and values of different widths: both failed on the first step
    model = random_model("DeepseekV3", **{**COMMON, "num_key_value_heads": 4, "num_hidden_layers": 1},
                         moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                         topk_group=1, first_k_dense_replace=1)
    assert not supports_shared_prefix(model)
    mla = policy(model, PrefixCacheConfig())
    assert mla.prefix_cache is None and "MLA" in capsys.readouterr().err
    samples = mla.propose([Prefix(A)], 3, seed=0)[0]
    assert worst_logprob_gap(model, Prefix(A), samples) < 1e-4


def test_a_column_biased_models_cached_prefix_gives_the_log_probs_of_a_plain_forward():
    # MPT's ALiBi counts KV columns: a pad between a cached prefix and its new tokens (a longer
    # prompt beside it in the call) moved its log-probs by 1e-2
    model = random_model("Mpt", vocab_size=len(TOK), d_model=64, n_layers=2, n_heads=4, max_seq_len=256)
    cached = policy(model, PrefixCacheConfig())
    first = cached.propose([Prefix(A)], 8, seed=0)[0]
    step = next(s for s in first if s.finish == "separator")
    path = Prefix(A).extend(step)
    longer = Problem("b", "1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7 8 9<think>", "1")
    samples = cached.propose([path, Prefix(longer)], 2, seed=1)[0]
    assert cached.prefix_cache.stats().hits >= 1
    assert worst_logprob_gap(model, path, samples) < 1e-4


def test_a_shared_prefix_asked_of_a_model_that_cannot_decode_over_one_is_refused():
    # shared_prefix=True skipped the model check: a sliding-window Qwen2 decoded as plain full
    # attention (log-probs 0.24 off a full forward, 13 greedy tokens not the argmax), in silence
    sliding = random_model("Qwen2", **COMMON, sliding_window=8, use_sliding_window=True)
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=6, max_total_tokens=40)
    with pytest.raises(ValueError, match=r"shared_prefix=True: this model \(qwen2\) cannot decode over a shared prefix"):
        TransformersPolicy(sliding, TOK, sampling, lambda problem: problem.question, shared_prefix=True)
    TransformersPolicy(sliding, TOK, sampling, lambda problem: problem.question)  # None: copies where it must
    TransformersPolicy(random_model("Qwen2", **COMMON), TOK, sampling, lambda problem: problem.question, shared_prefix=True)
