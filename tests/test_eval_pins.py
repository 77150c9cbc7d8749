"""Pins of the training entry point's and the evaluation scripts' behaviours a mutation review
found no test holding:

- experiments.aha_metrics: the within-problem AUC is wins over len(good) * len(bad) pairs;
- experiments.train: the step row's reward/pass_at_g (any correct rollout per group),
  grpo/mixed_groups, rollout/correct and rollout/cut_by_length on hand-made records;
  run.max_minutes=0 and actor_optim.betas=[0.9, 1.0] refused by `settings`;
- experiments.load_test: the nearest-rank quantile (ceil), p50 / p99 / max of `summarize`,
  throughput counting answers, a 200 with an error body (errored, not mismatched, no latency),
  backend_calls as the /health counter's difference (a fake client, no server), port 0 refused,
  other score_positions a mismatch;
- experiments.quick_eval: majority@k grades a completion holding the majority answer and
  unanswered completions do not vote; greedy grades read the greedy outputs; the sampling seed
  adds the call index (a tiny random model); the generated-token count leaves out padding;
  tokens_per_s; --seed leaves the test problems alone; temperature 0 refused;
- experiments.smollm2_eval: n not a multiple of beam_width, and top_p above 1, refused.

Direct calls on hand-made inputs: no training run, no subprocess, no server, no trained checkpoint.

    .venv/bin/python -m pytest tests/test_eval_pins.py
"""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import httpx
import pytest
import torch

from experiments import load_test as lt
from experiments import quick_eval as qe
from experiments.aha_metrics import within_problem_auc
from experiments.load_test import Case, Outcome, Summary, _quantile, matches, summarize
from experiments.smollm2_eval import EvalConfig
from experiments.tasks import arith
from experiments.train import OptimizerConfig, settings, step_row
from policies.tiny_model import build_model
from policies.tiny_tokenizer import build_tokenizer
from test_quick_eval import SMALL
from test_train_loop import composed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROBLEM = arith.generate_problems("test", 1, seed=1, cfg=arith.ArithConfig())[0]
RIGHT, WRONG = f"Answer: {PROBLEM.answer}", f"Answer: {int(PROBLEM.answer) + 1}"


# -- experiments.aha_metrics -----------------------------------------------------------------------


def test_within_problem_auc_is_wins_over_all_pairs():
    assert within_problem_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False], [0] * 4) == 1.0
    # good 0.9 beats all three bad, 0.2 beats 0.1 only: 4 of 6 pairs
    scores, correct = [0.9, 0.2, 0.5, 0.3, 0.1], [True, True, False, False, False]
    assert within_problem_auc(scores, correct, [0] * 5) == pytest.approx(4 / 6)


# -- experiments.train -----------------------------------------------------------------------------


def test_step_row_pass_at_g_mixed_groups_correct_and_cut_by_length():
    s = SimpleNamespace(loss=SimpleNamespace(truncated_wrong_reward=0.0),
                        actor_optim=OptimizerConfig(lr=1e-3), head_optim=OptimizerConfig(lr=1e-3))
    # (group, path score, correct, length, cut by length, reward): group 0 right + wrong, group 1 wrong + wrong (one cut)
    records = [(0, 0.5, True, 5, False, 1.0), (0, 0.4, False, 5, False, 0.0),
               (1, 0.3, False, 5, False, 0.0), (1, 0.2, False, 5, True, 0.0)]
    row = step_row(1, [{"losses": {"loss/total": 1.0}, "records": records}], SimpleNamespace(s=s))
    assert row["reward/pass_at_g"] == 0.5
    assert row["grpo/mixed_groups"] == 0.5
    assert row["rollout/correct"] == 0.25
    assert row["rollout/cut_by_length"] == 0.25  # one of four rollouts, not of two groups


def test_max_minutes_zero_is_refused():
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        settings(composed(["run.max_minutes=0"]))


def test_a_beta_of_one_is_refused():
    with pytest.raises(ValueError, match=r"betas=.* must be two values in \[0, 1\)"):
        settings(composed(["actor_optim.betas=[0.9,1.0]"]))


# -- experiments.load_test -------------------------------------------------------------------------

CASES = [Case(i, "/score", {"text": str(i)}) for i in range(10)]


def test_quantile_is_nearest_rank_rounding_up():
    assert _quantile([1.0, 2.0, 3.0], 0.5) == 2.0
    latencies = [0.01 * (i + 1) for i in range(9)] + [2.0]  # 10-90 ms and one of 2000 ms
    assert _quantile(latencies, 0.99) == 2.0


def test_summarize_latencies_are_exact():
    latencies = [0.01 * (i + 1) for i in range(9)] + [2.0]
    outcomes = [Outcome(c, s, 200, {"value": 0.5}) for c, s in zip(CASES, latencies)]
    summary = summarize("scorer", outcomes, outcomes, 1.0)
    assert (summary.p50_s, summary.p99_s, summary.max_s) == (0.05, 2.0, 2.0)
    assert summary.ok


def test_throughput_counts_answered_requests():
    summary = Summary(requests=10, dropped=5, errored=0, mismatched=0, p50_s=0.01, p99_s=0.02, max_s=0.02, wall_s=1.0)
    assert summary.throughput == 5.0


def test_a_200_with_an_error_body_is_errored_and_has_no_latency():
    outcomes = [Outcome(CASES[0], 0.001, 200, {"error": "busy"}), Outcome(CASES[1], 0.5, 200, {"value": 0.5})]
    expected = [Outcome(CASES[0], 0.01, 200, {"value": 0.5}), Outcome(CASES[1], 0.01, 200, {"value": 0.5})]
    summary = summarize("scorer", outcomes, expected, 1.0)
    assert (summary.errored, summary.mismatched, summary.dropped) == (1, 0, 0)
    assert (summary.p50_s, summary.p99_s, summary.max_s) == (0.5, 0.5, 0.5)  # the fast error is no answer


class CountingClient:
    """An httpx.AsyncClient stand-in: every /score answers 0.5; /health's batches_run reads 1000, then 1005."""

    def __init__(self) -> None:
        self.health_calls = 0

    async def __aenter__(self) -> CountingClient:
        return self

    async def __aexit__(self, *exc) -> bool:
        return False

    async def post(self, path, json=None):
        return httpx.Response(200, json={"value": 0.5}, request=httpx.Request("POST", "http://x" + path))

    async def get(self, path):
        self.health_calls += 1
        counter = 1000 + 5 * (self.health_calls - 1)
        return httpx.Response(200, json={"batches_run": counter}, request=httpx.Request("GET", "http://x" + path))


def test_backend_calls_is_the_health_counters_difference(monkeypatch):
    monkeypatch.setattr(lt.httpx, "AsyncClient", lambda **kw: CountingClient())
    args = lt.build_parser().parse_args(["--url", "http://127.0.0.1:8001", "--service", "scorer",
                                         "--clients", "2", "--requests", "2"])
    summary = asyncio.run(lt.run(args))
    assert summary.backend_calls == 5 and summary.ok


def test_port_zero_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="port must be in 1-65535"):
        lt.service_url("http://127.0.0.1:0")
    assert lt.service_url("http://127.0.0.1:1") == "http://127.0.0.1:1"


def test_other_score_positions_are_a_mismatch():
    alone = {"value": 0.5, "all_scores": [0.1, 0.5], "token_ids": [1, 2, 3], "score_positions": [1, 2]}
    assert matches("scorer", dict(alone), alone)
    assert not matches("scorer", {**alone, "score_positions": [0, 2]}, alone)


# -- experiments.quick_eval ------------------------------------------------------------------------


def test_majority_grades_a_completion_holding_the_majority_answer():
    assert qe.majority_correct(PROBLEM, [WRONG, RIGHT, RIGHT])
    assert not qe.majority_correct(PROBLEM, [RIGHT, WRONG, WRONG])


def test_unanswered_completions_do_not_vote():
    assert qe.majority_answer(["blah", "blah", "Answer: 3"]) == "3"


class Idle:
    """A model stand-in for grade_policy with generation stubbed out."""

    def eval(self) -> Idle:
        return self


def test_greedy_grades_read_the_greedy_outputs(monkeypatch):
    def generate(model, tokenizer, prompts, n, temperature, *args, **kwargs):
        texts = [[RIGHT]] * len(prompts) if temperature is None else [[WRONG] * n] * len(prompts)
        return texts, 1

    monkeypatch.setattr(qe, "generate_completions", generate)
    g = qe.grade_policy(Idle(), None, [PROBLEM], qe.QuickEvalConfig(num_samples=2, bf16=False))
    assert g.greedy == (True,) and g.sampled == ((False, False),) and g.majority == (False,)


def test_the_sampling_seed_adds_the_call_index():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(SMALL, tok)
    prompt = arith.prompt_text(PROBLEM)
    # batch_size = n: one prompt per generate call, three calls of the same prompt
    outs, _ = qe.generate_completions(model, tok, [prompt] * 3, 4, 1.0, 8, 4, 0)
    assert outs[0] != outs[1] and outs[1] != outs[2] and outs[0] != outs[2]


class PaddedGenerator:
    """A model stand-in whose generate appends [10, 11, eos, pad, pad] to every returned sequence."""

    device = torch.device("cpu")  # where generate_completions puts the prompts (a transformers model's .device)

    def __init__(self, tok) -> None:
        self.new = torch.tensor([10, 11, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id])

    def generate(self, input_ids, attention_mask=None, num_return_sequences=1, **kwargs):
        rows = input_ids.repeat_interleave(num_return_sequences, dim=0)
        return torch.cat([rows, self.new.expand(rows.shape[0], -1)], dim=1)


def test_the_generated_token_count_leaves_out_padding():
    tok = build_tokenizer()
    outs, generated = qe.generate_completions(PaddedGenerator(tok), tok, ["1 + 1", "22 + 3"], 2, 1.0, 5, 8, 0)
    assert len(outs) == 2 and all(len(o) == 2 for o in outs)
    assert generated == 4 * 3  # 4 sequences of 3 tokens that are not padding (of 5 new positions)


def test_report_tokens_per_s_is_tokens_over_seconds():
    g = qe.ProblemGrades(greedy=(True,), sampled=((True, False, False, False),), majority=(False,), tokens=100, seconds=2.0)
    assert qe.report_of(g, qe.QuickEvalConfig(num_samples=4, bf16=False)).tokens_per_s == 50.0


def test_the_seed_leaves_the_test_problems_alone():
    questions = [[p.question for p in qe.eval_problems(qe.QuickEvalConfig(num_problems=3, seed=s, bf16=False))]
                 for s in (0, 5)]
    assert questions[0] == questions[1]


def test_temperature_zero_is_refused():
    with pytest.raises(ValueError, match="temperature=0.0; must be a finite number > 0"):
        qe.QuickEvalConfig(temperature=0.0, bf16=False)


def test_the_difference_line_spells_k_as_num_samples():
    g = qe.ProblemGrades(greedy=(True,), sampled=((True, False),), majority=(True,), tokens=1, seconds=1.0)
    line = qe.format_difference(qe.paired_difference(g, g), 4)
    assert "pass@4 +0.0000" in line and "majority@4 +0.0000" in line and "@k" not in line


# -- experiments.smollm2_eval ----------------------------------------------------------------------


def test_smollm2_eval_n_must_be_a_multiple_of_beam_width():
    with pytest.raises(ValueError, match="must be a multiple of beam_width=4"):
        EvalConfig(n=6, beam_width=4)
    EvalConfig(n=12, beam_width=4)


def test_smollm2_eval_top_p_above_one_is_refused():
    with pytest.raises(ValueError, match=r"top_p=1.2 must be in \(0, 1\]"):
        EvalConfig(top_p=1.2)
