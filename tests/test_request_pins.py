"""Pins for request checks, prompt building, the tiny-policy cache and the GPU check that a mutation
review found unpinned elsewhere.

What is pinned: `policies.policy_requests` refuses a bool n, a non-integer seed (1.5, True), a step
with text but no token_ids (named before any model work) and token ids just outside the model's
vocabulary (== its size, -1) with the named ValueError, and `close_full_paths` closes only
separator steps (an "eos" step that fills the room stays "eos"); `ChatPrompt` refuses a think that
is not true/false/null, passes think=True/False on to the task whatever the vocabulary holds, and
`load_tokenizer` names a missing folder; `ensure_policy` notes a cached policy trained with other
run settings (task config) and draws its training pairs with the SFT seed; `gpu_check` passes
--budget on, defaults --out to outputs/gpu_check/<preset> and skips without vLLM.

No training (train_sft monkeypatched), no GPU (torch.cuda faked), tiny models only.

Run: `.venv/bin/python -m pytest tests/test_request_pins.py`
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass

import pytest

from experiments import gpu_check
from experiments import tiny_policy
from experiments.tasks import chat_prompt
from experiments.tasks.arith import ArithConfig
from experiments.tasks.chat_prompt import ChatPrompt
from policies import sft_resume
from policies.checkpoint import save_checkpoint
from policies.policy_requests import close_full_paths
from policies.sampling_config import SamplingConfig
from policies.sft import SFTConfig
from policies.tiny_model import build_model
from policies.tiny_tokenizer import build_tokenizer
from test_sft import SMALL
from test_transformers_policy import TOK, policy
from treesearch.records import Prefix, Problem, Step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_policy_model():
    """The transformers policy of tests/test_transformers_policy.py (tiny random Llama)."""
    return policy()


def think_prefix(*steps: Step) -> list[Prefix]:
    return [Prefix(Problem("p", "<think>1"), tuple(steps))]


# -- policies/policy_requests.py -----------------------------------------------------------------


def test_a_bool_n_is_refused_as_no_integer(tiny_policy_model):
    with pytest.raises(ValueError, match=r"n=True must be an integer >= 1"):
        tiny_policy_model.propose(think_prefix(), True, seed=0)


@pytest.mark.parametrize("seed", [1.5, True])
def test_a_seed_that_is_no_integer_is_refused(tiny_policy_model, seed):
    with pytest.raises(ValueError, match=rf"seed={seed!r} must be an integer"):
        tiny_policy_model.propose(think_prefix(), 1, seed=seed)


@pytest.mark.parametrize("method", ["propose", "rollout", "propose_widths"])
@pytest.mark.parametrize("given, named", [
    (lambda: think_prefix()[0], r"prefixes is a single Prefix, not a sequence of them; pass \[prefix\]"),
    (lambda: (p for p in think_prefix()), r"prefixes is a generator, not a sequence of Prefix; pass a list"),
])
def test_prefixes_that_are_no_sequence_are_named(tiny_policy_model, method, given, named):
    """A single Prefix or a generator was a TypeError "object of type ... has no len()"."""
    width = [1] if method == "propose_widths" else 1
    with pytest.raises(TypeError, match=rf"^{named}$"):
        getattr(tiny_policy_model, method)(given(), width, seed=0)


def test_a_step_with_text_but_no_token_ids_is_named(tiny_policy_model):
    text_only = Step("+2=3\n", (), (), "separator")
    with pytest.raises(ValueError, match=r"problem 'p': step 0 has text but no token_ids; the model reads a path's "
                                         r"exact token ids"):
        tiny_policy_model.propose(think_prefix(text_only), 1, seed=0)


@pytest.mark.parametrize("token_id", [len(TOK), -1])
def test_token_ids_just_outside_the_vocabulary_are_named_not_an_index_error(tiny_policy_model, token_id):
    foreign = Step("x", (token_id,), (-0.1,), "separator")
    with pytest.raises(ValueError, match=rf"problem 'p': token id {token_id} of its path lies outside this model's "
                                         rf"vocabulary of {len(TOK)}"):
        tiny_policy_model.propose(think_prefix(foreign), 1, seed=0)


@dataclass(frozen=True)
class _Sample:
    token_ids: tuple
    finish: str


def test_close_full_paths_closes_only_separator_steps():
    # room 2 (max_total_tokens), within max_step_tokens: a separator step filling it ends "length",
    # an eos step filling it keeps "eos" (the path ended on its own)
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=8, max_total_tokens=2)
    rows = [[_Sample((4, 2), "eos"), _Sample((4, 5), "separator"), _Sample((4,), "separator")]]
    closed = close_full_paths(rows, [Prefix(Problem("p", "q"))], sampling, [[1, 2, 3]], None)
    assert [s.finish for s in closed[0]] == ["eos", "length", "separator"]


# -- experiments/tasks/chat_prompt.py -------------------------------------------------------------


class _PlainTokenizer:
    """A chat template that does not open <think>; "<think>" is one token only when thinks."""

    bos_token, bos_token_id, chat_template = None, None, "(a template)"

    def __init__(self, thinks: bool) -> None:
        self.thinks = thinks

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<u>{messages[0]['content']}<a>\n"

    def get_vocab(self):
        return {"a": 1, "<think>": 2} if self.thinks else {"a": 1}


@pytest.mark.parametrize("think, thinks, opens", [(True, False, True), (False, True, False),
                                                  (None, True, True), (None, False, False)])
def test_chat_prompt_think_overrides_the_vocabulary(think, thinks, opens, monkeypatch):
    monkeypatch.setattr(chat_prompt, "load_tokenizer", lambda path: _PlainTokenizer(thinks))
    text = ChatPrompt("/unused", "experiments.tasks.gsm8k", think=think)(Problem("p", "1+1?", "2"))
    assert text.startswith("<u>1+1?") and text.endswith("<think>\n") == opens
    assert ("<think>" in text) == opens


def test_chat_prompt_refuses_a_think_that_is_not_true_false_or_null():
    with pytest.raises(ValueError, match=r"ChatPrompt.think='no' must be true, false or null"):
        ChatPrompt("/unused", "experiments.tasks.gsm8k", think="no")


def test_load_tokenizer_names_a_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"ChatPrompt.tokenizer_path=.*nope' is not a folder"):
        chat_prompt.load_tokenizer(missing)


# -- experiments/tiny_policy.py --------------------------------------------------------------------


def test_ensure_policy_notes_a_cached_policy_of_another_task_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tiny_policy, "train_sft", lambda *a, **k: pytest.fail("trained over a cached policy"))
    run = tmp_path / "tiny-arith"
    tok = build_tokenizer()
    save_checkpoint(build_model(SMALL, tok), tok, run / "final")
    trained = tiny_policy.run_settings("arith", ArithConfig(), SMALL, 1000)
    (run / sft_resume.SUMMARY_FILE).write_text(json.dumps({"config": asdict(SFTConfig()), "run": trained}))
    assert tiny_policy.ensure_policy(run, SFTConfig(), SMALL, ArithConfig(), train_problems=1000) == run / "final"
    assert capsys.readouterr().err == ""
    assert tiny_policy.ensure_policy(run, SFTConfig(), SMALL, ArithConfig(max_ops=8),
                                     train_problems=1000) == run / "final"
    err = capsys.readouterr().err
    assert err.startswith(f"note: the cached policy {run / 'final'} was trained with other settings (task_config: {{")
    assert "'max_ops': 8" in err


def test_ensure_policy_draws_its_training_pairs_with_the_sft_seed(tmp_path, monkeypatch):
    drawn = {}

    def fake_train(sft, pairs, run_dir, *args, **kwargs):
        drawn[sft.seed] = pairs
        return run_dir / "final"

    monkeypatch.setattr(tiny_policy, "train_sft", fake_train)
    for seed in (0, 7, 7):
        tiny_policy.ensure_policy(tmp_path / f"run{seed}", SFTConfig(seed=seed), SMALL, ArithConfig(),
                                  train_problems=20, progress=False)
    assert len(drawn[0]) == len(drawn[7]) > 0 and drawn[0] != drawn[7]


# -- experiments/gpu_check.py ----------------------------------------------------------------------


def test_the_check_runs_best_of_its_budget(tmp_path):
    cfg = gpu_check.compose_check("qwen25_math_1p5b", 2, 4, "confidence", tmp_path)
    assert (cfg.budget, cfg.search.n, cfg.task.count) == (4, 4, 2)


def test_the_default_out_folder_is_named_after_the_preset(monkeypatch, capsys):
    outs = []
    monkeypatch.setattr(gpu_check, "compose_check", lambda preset, problems, budget, scorer, out, extra: outs.append(out))
    monkeypatch.setattr(gpu_check, "skip_reason", lambda cfg, preset: "faked")
    for preset in ("xbai_o4", "qwen25_math_7b"):
        assert gpu_check.check_command(["--preset", preset]) == 0
    assert outs == [gpu_check.DEFAULT_OUT / "xbai_o4", gpu_check.DEFAULT_OUT / "qwen25_math_7b"]
    assert capsys.readouterr().out == "gpu_check: skipped: faked\n" * 2


def test_the_check_skips_without_vllm(monkeypatch, tmp_path):
    cfg = gpu_check.compose_check("qwen25_math_1p5b", 1, 2, "confidence", tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert gpu_check.skip_reason(cfg, "qwen25_math_1p5b") == "vLLM is not installed (pip install vllm)"

