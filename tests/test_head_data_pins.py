"""Pins of the rollout cache and head-training behaviours a mutation review found no test holding:
how a rollout is packed (the finish reason of its last step, the lowest token log-prob of a step,
a rollout with no step scoring 0 for confidence, `steps_of` finish reasons); the cache summary's
pass@n, mixed problems and position label rate; the held-out Best-of-n averaged over problems,
the first aha row, the summary line's largest group size and rounded epoch steps of train_head;
and the inputs refused (caches of two tasks, too few rollouts for a problem, a layer outside the
model, zero problems, a zero or NaN temperature).

Synthetic caches come from tests/test_train_head.py's `synthetic_cache`; rollouts that need
features are read with its tiny random checkpoint (`tiny`).

    .venv/bin/python -m pytest tests/test_head_data_pins.py
"""
from __future__ import annotations

import math

import pytest

from experiments import train_head
from experiments.rollout_cache import CacheSpec, cache_from_paths, confidence_path_scores, save_cache, summary
from experiments.rollout_cache import main as cache_main
from experiments.tasks import arith
from experiments.train_head import cache_metrics, check_same_source, final_metrics, steps_for_epochs
from scorers.sprm_head import build_sprm_head
import test_train_head
from test_train_head import held_out, synthetic_cache
from treesearch.records import Step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
tiny = test_train_head.tiny  # the fixture: (path, lm, tokenizer) of a tiny random checkpoint


def step(tokenizer, text: str, logprobs: list[float], finish: str) -> Step:
    """A step of text's token ids carrying the given log-probs (repeated to the token count)."""
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    lps = tuple(logprobs[k % len(logprobs)] for k in range(len(ids)))
    return Step(text, ids, lps, finish)  # type: ignore[arg-type]


# -- packing rollouts ------------------------------------------------------------------------------


def test_a_packed_rollout_keeps_its_last_steps_finish_min_logprob_and_an_empty_one_scores_zero(tiny):
    path, lm, tokenizer = tiny
    problem = arith.generate_problems("test", 1, seed=0)[0]
    wrong = str(int(problem.answer) + 1)
    # rollout 0: a think step, then a wrong answer cut at the token limit; rollout 1: no step at all
    cut = (step(tokenizer, "3 + 4 = 7.\n\n", [-0.1, -2.0], "separator"),
           step(tokenizer, f"</think>Answer: {wrong}", [-0.5, -0.3], "length"))
    spec = CacheSpec(str(path), "arith", "test", 1, 2, feature_layers=(-2,), forward_batch=2)
    cache = cache_from_paths(spec, lm, tokenizer, [problem], [[cut, ()]], fingerprint="f")
    assert cache.answers == (wrong, None) and cache.correct.tolist() == [False, False]
    # the last step's finish ("length"; the first's is "separator"); an empty rollout is "length"
    assert cache.finish == ("length", "length")
    assert cache.cut_wrong.tolist() == [True, False]  # a wrong answer cut at the limit; no answer: not
    assert [s.finish for s in cache.steps_of(0)] == ["separator", "length"]
    assert cache.steps_of(1) == []
    # the lowest token log-prob of each step (both steps hold at least two tokens)
    assert [len(s.token_ids) >= 2 for s in cut] == [True, True]
    assert cache.step_min_logprob.tolist() == [-2.0, -0.5]
    # confidence: geometric mean over the steps; a rollout with no step scores 0, not exp(0) = 1
    means = cache.step_mean_logprob.tolist()
    assert confidence_path_scores(cache, "mean").tolist() == pytest.approx([math.exp(sum(means) / 2), 0.0])
    assert confidence_path_scores(cache, "min").tolist() == pytest.approx([math.exp(-2.5 / 2), 0.0])


# -- the summary -----------------------------------------------------------------------------------


def test_summary_counts_pass_at_n_mixed_problems_and_the_position_label_rate():
    # 3 problems x 2 rollouts: both right / one right / none right; 2 scored steps each, half right
    cache = synthetic_cache([True, True, True, False, False, False], 2, [2] * 6, labels=[True, False] * 6)
    info = summary(cache)
    assert info["problems"] == 3 and info["rollouts"] == 6 and info["positions"] == 12
    assert info["pass@1"] == pytest.approx(0.5)
    assert info["pass@n"] == pytest.approx(2 / 3)  # the all-wrong problem is not solved
    assert info["mixed_problems"] == 1  # only the one with both outcomes
    assert info["position_label_rate"] == pytest.approx(0.5)  # a share, not a count


# -- train_head's numbers --------------------------------------------------------------------------


def test_heldout_best_of_n_is_a_mean_over_problems():
    # problem 0: all 4 rollouts right, problem 1: all wrong: any head picks right, then wrong -> 1/2
    test = synthetic_cache([True] * 4 + [False] * 4, 4, [2] * 8, labels=[True, False] * 8,
                           answers=["7"] * 4 + ["3"] * 4)
    row = cache_metrics(build_sprm_head(4, seed=0), test, -2, "heldout", True)
    assert row["heldout/sprm_bon@4"] == pytest.approx(0.5)  # not 1 / 8 rollouts
    assert row["heldout/sprm_wmaj@4"] == pytest.approx(0.5)


def test_final_metrics_take_the_first_and_last_heldout_diff_prob():
    test = synthetic_cache([True, False, False, True], 4, [2] * 4, labels=[True, False] * 4)
    rows = [{"step": 0, "heldout_fc/diff_prob": 0.01}, {"step": 1, "loss": 0.7},
            {"step": 50, "heldout_fc/diff_prob": 0.2}, {"step": 100, "heldout_fc/diff_prob": 0.3}]
    metrics = final_metrics(rows, build_sprm_head(4, seed=0), test, -2)
    assert metrics["aha.diff_prob_first"] == 0.01 and metrics["aha.diff_prob_last"] == 0.3
    assert final_metrics([{"step": 1, "loss": 0.7}], build_sprm_head(4, seed=0), test, -2)["aha.diff_prob_first"] is None


def test_the_cli_summary_line_reports_the_largest_group_size(tmp_path, capsys):
    cache = synthetic_cache([True, False, True, False] * 4, 4, [2] * 16, labels=[True, False] * 16)
    train, test = tmp_path / "tr.pt", tmp_path / "te.pt"
    save_cache(cache, train)
    save_cache(held_out(cache), test)
    assert train_head.main(["--train", str(train), "--test", str(test), "--out", str(tmp_path / "o"), "--no-save",
                            "--steps", "2", "--eval-every", "100"]) == 0
    line = capsys.readouterr().out.strip().split(": ", 1)[1]
    groups = [w for w in line.split() if "@" in w]
    assert groups == ["sprm_bon@4", "sprm_wmaj@4", "sprm_min_bon@4", "conf_bon@4", "confmin_bon@4", "maj@4",
                      "pass@1", "pass@4", "true_prm_bon@4"]


def test_epoch_steps_round_to_the_nearest_step():
    # 2.5 passes of ceil(96 / 32) = 3 steps: 7.5 -> 8 (not cut to 7); 1.4 passes of 5 steps: 7
    assert steps_for_epochs(2.5, 96, 32) == 8
    assert steps_for_epochs(1.4, 160, 32) == 7
    assert steps_for_epochs(1.3, 64, 32) == 3  # 2.6 -> 3


# -- inputs refused --------------------------------------------------------------------------------


def test_caches_of_two_tasks_are_refused():
    train = synthetic_cache([True, False, False, True], 4, [2] * 4)
    other = held_out(synthetic_cache([True, False, False, True], 4, [2] * 4, task="countdown"))
    with pytest.raises(ValueError, match="train cache task 'arith' differs from test cache task 'countdown'"):
        check_same_source(train, other)
    check_same_source(train, held_out(train))  # the same task: accepted


def test_a_problem_with_fewer_than_n_rollouts_is_refused(tiny):
    path, lm, tokenizer = tiny
    problems = arith.generate_problems("test", 2, seed=0)
    spec = CacheSpec(str(path), "arith", "test", 2, 2, feature_layers=(-2,), forward_batch=4)

    def solved(p):
        return tuple(step(tokenizer, t, [-0.1], "separator") for t in arith.solution_steps(p))

    short = [[solved(problems[0]), solved(problems[0])], [solved(problems[1])]]  # problem 1: 1 rollout of 2
    with pytest.raises(ValueError, match=r"paths must hold n=2 rollouts for each of the 2 problems"):
        cache_from_paths(spec, lm, tokenizer, problems, short, fingerprint="f")
    extra = [[solved(problems[0])] * 2, [solved(problems[1])] * 3]
    with pytest.raises(ValueError, match=r"paths must hold n=2 rollouts"):
        cache_from_paths(spec, lm, tokenizer, problems, extra, fingerprint="f")


def test_a_feature_layer_below_the_model_is_named(tiny):
    path, lm, tokenizer = tiny
    problems = arith.generate_problems("test", 1, seed=0)
    paths = [[tuple(step(tokenizer, t, [-0.1], "separator") for t in arith.solution_steps(problems[0]))] * 2]
    states = int(lm.config.num_hidden_layers) + 1
    for layer in (-50, -states - 1, states):
        spec = CacheSpec(str(path), "arith", "test", 1, 2, feature_layers=(layer,), forward_batch=2)
        with pytest.raises(ValueError, match=rf"feature layer {layer} does not index the model's {states} hidden states"):
            cache_from_paths(spec, lm, tokenizer, problems, paths, fingerprint="f")
    spec = CacheSpec(str(path), "arith", "test", 1, 2, feature_layers=(-states,), forward_batch=2)
    assert cache_from_paths(spec, lm, tokenizer, problems, paths, fingerprint="f").num_rollouts == 2


def test_zero_problems_are_refused_before_the_policy_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"CacheSpec\.problems=0 must be an integer >= 1"):
        CacheSpec("x", "arith", "test", 0, 2)
    CacheSpec("x", "arith", "test", 1, 2)  # one is fine
    # the CLI names the setting, not the (missing) policy folder it would have loaded next
    args = ["--policy", str(tmp_path / "none"), "--task", "arith", "--n", "2", "--out", str(tmp_path / "c.pt")]
    assert cache_main([*args, "--problems", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: CacheSpec.problems=0 must be an integer >= 1")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("temperature", [0.0, float("nan"), -1.0])
def test_a_temperature_that_cannot_sample_is_refused(temperature):
    with pytest.raises(ValueError, match=r"CacheSpec\.temperature=.* must be > 0"):
        CacheSpec("x", "arith", "test", 1, 2, temperature=temperature)
    assert CacheSpec("x", "arith", "test", 1, 2, temperature=0.7).sampling_temperature == 0.7
