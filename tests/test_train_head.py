"""Tests of head-only SPRM training: the rollout cache (shapes, true step labels, the confidence
baseline, features equal to what `SPRMScorer` reads), the training loop (every label mode moves
the head, the BCE warm-up, true labels learn a separable cache) and the evaluation metrics
(pooled AUC, SPR label agreement, Best-of-N on hand-made candidates), end to end on a tiny
random checkpoint.

    .venv/bin/pytest tests/test_train_head.py
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from experiments.aha_metrics import path_scores as aha_path_scores
from experiments.plot_aha import load_metrics
from experiments.rollout_cache import (
    CacheSpec, RolloutCache, StaleCacheError, build_rollout_cache, cache_from_paths, confidence_path_scores,
    load_cache, save_cache,
)
from experiments.tasks import arith, countdown
from experiments.train_head import (
    batch_note, bon_sizes, bon_table, cache_metrics, check_pair, main, pooled_auc, run_head_training,
    spr_label_agreement, steps_for_epochs,
)
from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.confidence import ConfidenceScorer
from scorers.head_training import (
    LABEL_MODES, HeadTrainConfig, RolloutBatches, path_scores, position_probs, rollout_min_scores,
    rollout_path_scores, save_reflective_head, train_head, trained_rollout_count, trained_rollouts,
)
from scorers.sprm_head import build_sprm_head
from scorers.sprm_scorer import SPRMScorer
from tiny_checkpoint import save_tiny_checkpoint
from treesearch.aggregation import aggregate
from treesearch.records import Prefix, Problem, Step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- a synthetic cache ------------------------------------------------------------------------------


def synthetic_cache(
    correct: list[bool], n: int, steps_per_rollout: list[int], features: torch.Tensor | None = None,
    labels: list[bool] | None = None, answers: list[str | None] | None = None,
    mean_logprobs: list[float] | None = None, c: int = 4, task: str = "arith",
) -> RolloutCache:
    """A cache of len(correct) rollouts (problem r // n); rollout r has steps_per_rollout[r] think
    steps, each with one scored position, then one unscored answer step of 2 tokens."""
    r_count = len(correct)
    counts = [k + 1 for k in steps_per_rollout]  # + the answer step
    rollout_steps = torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()))
    s_count = int(rollout_steps[-1])
    think = [int(rollout_steps[r]) + k for r in range(r_count) for k in range(steps_per_rollout[r])]
    p_count = len(think)
    step_labels = None
    if labels is not None:  # labels of the positions; answer steps get the rollout's outcome
        step_labels = torch.tensor([bool(correct[r]) for r in range(r_count) for _ in range(counts[r])])
        step_labels[torch.tensor(think, dtype=torch.long)] = torch.tensor(labels)
    return RolloutCache(
        spec={"policy_dir": "none", "task": task, "n": n, "split": "test"}, hidden_size=c,
        problem_ids=tuple(f"p{i}" for i in range(r_count // n)), questions=tuple("q" for _ in range(r_count // n)),
        rollout_problem=torch.arange(r_count) // n, correct=torch.tensor(correct),
        answers=tuple(answers or [None] * r_count), finish=("eos",) * r_count, rollout_steps=rollout_steps,
        step_texts=("s",) * s_count, step_tokens=torch.arange(s_count + 1) * 2,
        token_ids=torch.zeros(2 * s_count, dtype=torch.long),
        step_mean_logprob=torch.tensor(mean_logprobs or [-0.1] * s_count, dtype=torch.float64),
        step_min_logprob=torch.tensor(mean_logprobs or [-0.1] * s_count, dtype=torch.float64) * 2,
        step_num_tokens=torch.full((s_count,), 2), step_labels=step_labels,
        position_rollout=torch.arange(r_count).repeat_interleave(torch.tensor(steps_per_rollout, dtype=torch.long)),
        position_step=torch.tensor(think, dtype=torch.long), position_index=torch.arange(p_count),
        features={-2: features if features is not None else random_features(p_count, c)},
    )


def random_features(count: int, c: int) -> torch.Tensor:
    return torch.randn(count, c, generator=torch.Generator().manual_seed(0))  # [count, C]


def separable_cache(problems: int, seed: int, n: int = 4, steps: int = 3, c: int = 8) -> RolloutCache:
    """Step label = a random bit; features = noise + 2 * (2 label - 1) * a fixed direction; a
    rollout is correct iff all its steps are."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(problems * n, steps, generator=g) < 0.7  # [R, steps]
    direction = torch.ones(c) / math.sqrt(c)
    signs = labels.reshape(-1, 1).float() * 2 - 1  # [R * steps, 1] +-1
    features = torch.randn(problems * n * steps, c, generator=g) + 2.0 * signs * direction
    flat = labels.reshape(-1).tolist()
    return synthetic_cache(labels.all(1).tolist(), n, [steps] * (problems * n), features, flat, c=c)


# -- metrics on hand-made inputs --------------------------------------------------------------------


def test_pooled_auc_counts_ordered_pairs_with_ties_as_half():
    # pairs (positive, negative): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, 0.1), (0.8, 0.4) right -> 3/4
    assert pooled_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # one tied pair -> 1/2; one class only -> None
    assert pooled_auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == pytest.approx(0.5)
    assert pooled_auc(torch.tensor([0.2, 0.3]), torch.tensor([True, True])) is None
    # ties across groups: positives [0.5, 0.9], negatives [0.5, 0.1]: (0.5,0.5) 1/2, (0.5,0.1) 1, (0.9, .) 2 -> 3.5/4
    assert pooled_auc(torch.tensor([0.5, 0.9, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.875)


def test_spr_label_agreement_by_hand():
    # logits [2, -1, 3], outcome [1, 1, 0]: kept [T (2>0, correct), F (-1<0 but correct), F (3>0, wrong)]
    # kept position 0: outcome 1 == label 1 -> precision 1/1; outcome == label on [T, F, F] -> 1/3
    out = spr_label_agreement(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([1, 1, 0]), torch.tensor([1, 0, 1]))
    third = pytest.approx(1 / 3)
    assert out == {"kept_fraction": third, "label_precision": 1.0, "outcome_label_agreement": third}
    none_kept = spr_label_agreement(torch.tensor([-1.0]), torch.tensor([1]), torch.tensor([1]))
    assert none_kept["label_precision"] is None and none_kept["kept_fraction"] == 0.0


def test_bon_sizes_are_powers_of_two_and_n():
    assert bon_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bon_sizes(12) == [1, 2, 4, 8, 12]
    assert bon_sizes(1) == [1]


def test_bon_table_on_hand_made_candidates():
    # one problem, 4 rollouts: outcome [F, T, F, T], answers [1, 2, 3, 2], head scores [0.9, 0.5, 0.1, 0.8]
    # mean log-probs per step (one think step + answer step each): confidence = exp(mean of the two)
    lps = [-1.0, -1.0, -0.1, -0.1, -2.0, -2.0, -0.5, -0.5]  # conf [e^-1, e^-0.1, e^-2, e^-0.5]
    cache = synthetic_cache([False, True, False, True], 4, [1] * 4, answers=["1", "2", "3", "2"], mean_logprobs=lps)
    table = bon_table(cache, torch.tensor([0.9, 0.5, 0.1, 0.8]), sizes=[2, 4])
    got = {k: v.mean for k, v in table.items()}
    # groups of 2: [0, 1] picks 0 (F), [2, 3] picks 3 (T) -> 0.5; all 4: picks 0 (F) -> 0
    assert got["sprm_bon@2"] == 0.5 and got["sprm_bon@4"] == 0.0
    # confidence picks 1 in [0, 1] (T) and 3 in [2, 3] (T) -> 1; of all 4 picks 1 (T) -> 1
    assert got["conf_bon@2"] == 1.0 and got["conf_bon@4"] == 1.0
    # majority of 4: "2" twice -> T; of [0, 1] and [2, 3]: a tie goes to the first seen ("1", "3") -> 0
    assert got["maj@4"] == 1.0 and got["maj@2"] == 0.0
    # weighted by head: "1" 0.9, "2" 0.5 + 0.8 = 1.3, "3" 0.1 -> "2" (T)
    assert got["sprm_wmaj@4"] == 1.0
    assert got["pass@1"] == 0.5 and got["pass@2"] == 1.0 and got["pass@4"] == 1.0
    assert "sprm_min_bon@4" not in got
    with_min = bon_table(cache, torch.zeros(4), sizes=[4], head_min_scores=torch.tensor([0.1, 0.2, 0.9, 0.3]))
    assert with_min["sprm_min_bon@4"].mean == 0.0  # picks rollout 2 (F)
    assert "true_prm_bon@4" not in got  # no true step labels in this cache
    # with labels [F, T, F, T] a perfect step verifier scores [1e-10, 1, 1e-10, 1] and picks 1 (T)
    labelled = synthetic_cache([False, True, False, True], 4, [1, 1, 1, 1], labels=[False, True, False, True])
    assert bon_table(labelled, torch.zeros(4), sizes=[4])["true_prm_bon@4"].mean == 1.0


def test_confidence_path_scores_equal_the_confidence_scorer():
    lps = [-0.2, -0.4, -0.05, -3.0]  # rollout 0: steps 0, 1; rollout 1: steps 2, 3
    cache = synthetic_cache([True, False], 2, [1, 1], mean_logprobs=lps)
    # rollout 0: geometric mean of e^-0.2 and e^-0.4 = e^-0.3 = 0.7408
    assert confidence_path_scores(cache).tolist() == pytest.approx([math.exp(-0.3), math.exp(-1.525)])
    # the same through ConfidenceScorer: each step's tokens all carry its mean log-prob
    steps = [Step("s", (1, 2), (lp, lp), "separator") for lp in lps]
    paths = [Prefix(Problem("p", "q"), tuple(steps[2 * r : 2 * r + 2])) for r in range(2)]
    expected = [aggregate(scores) for scores in ConfidenceScorer().score(paths)]
    assert confidence_path_scores(cache).tolist() == pytest.approx(expected, abs=1e-12)
    # "min" reads the min log-probs (here twice the mean): e^-0.6
    assert confidence_path_scores(cache, "min")[0].item() == pytest.approx(math.exp(-0.6))


def test_rollout_path_scores_are_geometric_means_of_positions():
    cache = synthetic_cache([True, False, True], 3, [2, 1, 0])
    # rollout 0: sqrt(0.25 * 1.0) = 0.5; rollout 1: 0.8; rollout 2 has no position: 0
    assert rollout_path_scores(torch.tensor([0.25, 1.0, 0.8]), cache).tolist() == pytest.approx([0.5, 0.8, 0.0])
    # the lowest step score: rollout 0 min(0.25, 1.0); rollout 2 has none -> 0
    assert rollout_min_scores(torch.tensor([0.25, 1.0, 0.8]), cache).tolist() == pytest.approx([0.25, 0.8, 0.0])
    # a zero score is clamped at 1e-10 (the reference's): sqrt(1e-10 * 0.3); a row with no score is 0
    probs, rows = torch.tensor([0.0, 0.3, 0.9, 0.5]), torch.tensor([0, 0, 1, 2])
    assert path_scores(probs, rows, 4).tolist() == pytest.approx([(1e-10 * 0.3) ** 0.5, 0.9, 0.5, 0.0])
    assert aha_path_scores is path_scores  # the joint trainer's aha metrics use this one function


def test_arith_true_step_labels_accept_any_order_that_reaches_the_answer():
    # tripled then doubled, written doubled first: the same 30 (labelled wrong when only the
    # story's order counted, so the step oracle scored a correct rollout 0)
    problem = Problem("p", "q", "30", meta={"start": 5, "operations": (("*", 3), ("*", 2))})
    answer = "</think>Answer: 30"
    assert arith.true_step_labels(problem, ["5 * 2 = 10.\n\n", "10 * 3 = 30.\n\n", answer]) == [True] * 3
    assert arith.true_step_labels(problem, ["5 * 2 = 10.\n\n", answer]) == [True, False]  # an operation left
    assert arith.true_step_labels(problem, ["5 * 2 = 10.\n\n", "10 * 2 = 20.\n\n"]) == [True, False]  # used twice
    # + 3 then doubled: doubling first cannot reach 16
    plus = Problem("p", "q", "16", meta={"start": 5, "operations": (("+", 3), ("*", 2))})
    assert arith.true_step_labels(plus, ["5 * 2 = 10.\n\n", "10 + 3 = 13.\n\n"]) == [False, False]
    assert arith.true_step_labels(plus, ["5 + 3 = 8.\n\n", "8 * 2 = 16.\n\n", "</think>Answer: 16"]) == [True] * 3
    # a division only where it is exact: 7 / 7 first, then + 14 -> 15, the story's 7 + 14 = 21, / 7 = 3 is not 15
    div = Problem("p", "q", "3", meta={"start": 7, "operations": (("+", 14), ("/", 7))})
    assert arith.true_step_labels(div, ["7 / 7 = 1.\n\n"]) == [False]
    assert arith.true_step_labels(div, ["7 + 14 = 21.\n\n", "21 / 7 = 3.\n\n"]) == [True, True]
    # read back from JSON (a tree's problem): the operations are lists
    listed = Problem("p", "q", "30", meta={"start": 5, "operations": [["*", 3], ["*", 2]]})
    assert arith.true_step_labels(listed, ["5 * 2 = 10.\n\n", "10 * 3 = 30.\n\n", answer]) == [True] * 3
    # many operations: one search over (value, operations left), not every ordering (11: 7 s, 600 MiB a path)
    long = Problem("p", "q", "14", meta={"start": 2, "operations": [("+", 1)] * 12})
    assert arith.true_step_labels(long, ["2 + 1 = 3.\n\n"]) == [True]
    assert arith.true_step_labels(long, ["2 * 1 = 2.\n\n"]) == [False]


def test_arith_true_step_labels_of_the_reference_and_of_a_wrong_result():
    problem = arith.generate_problems("test", 1, seed=0)[0]
    reference = arith.solution_steps(problem)
    answer = f"</think>Answer: {problem.answer}"
    assert arith.true_step_labels(problem, [*reference, answer]) == [True] * (len(reference) + 1)
    wrong = reference[0].replace("=", "= 1")  # a changed result
    labels = arith.true_step_labels(problem, [wrong, *reference[1:], answer])
    assert labels == [False] * (len(reference) + 1)  # every later step is wrong too
    # the right answer after too few steps is not a correct answer step
    assert arith.true_step_labels(problem, [reference[0], answer])[-1] is (len(reference) == 1)


def test_rollout_batches_cover_each_rollout_once_per_epoch():
    cache = synthetic_cache([True] * 6, 2, [2, 0, 1, 3, 1, 2])
    batches = RolloutBatches(cache, 4, torch.Generator().manual_seed(0))
    epoch = [batches.next(), batches.next()]
    assert [len(b) for b in epoch] == [4, 2]  # the remainder is the epoch's last batch (it was dropped)
    assert sorted(torch.cat(epoch).tolist()) == list(range(6))
    assert len(batches.next()) == 4  # a new epoch
    positions, rows = batches.positions(torch.tensor([3, 0]))
    # rollout 3 holds positions 3, 4, 5 (after 2 + 0 + 1); rollout 0 holds 0, 1
    assert positions.tolist() == [3, 4, 5, 0, 1] and rows.tolist() == [0, 0, 0, 1, 1]


def test_spr_modes_leave_out_wrong_rollouts_cut_at_the_token_limit():
    # the reference's reward-0.1 mask (a wrong answer written, then cut at the limit), which the
    # joint trainer applies: head-only SPR training trained those steps as negatives
    cache = dataclasses.replace(
        synthetic_cache([True, False, False, False, True, False], 2, [1, 1, 2, 1, 1, 1],
                        answers=["4", "5", None, "7", "8", "9"]),
        finish=("length", "length", "length", "eos", "eos", "length"))
    assert cache.cut_wrong.tolist() == [False, True, False, False, False, True]  # no answer / correct / eos: kept
    # with a think span, text after </think> is an answer written (the reference's reading)
    texts = list(cache.step_texts)
    texts[int(cache.rollout_steps[2])] = "</think>Ans"  # rollout 2: extracted no answer, cut inside it
    texts[int(cache.rollout_steps[6]) - 1] = "</think>"  # rollout 5: cut right after </think>
    think = dataclasses.replace(cache, step_texts=tuple(texts))
    assert think.cut_wrong.tolist() == [False, True, True, False, False, False]
    for labels, expected in [("spr", [0, 2, 3, 4]), ("spr_paper", [0, 2, 3, 4]), ("outcome_bce", list(range(6)))]:
        cfg = HeadTrainConfig(labels=labels)
        batches = RolloutBatches(cache, 3, torch.Generator().manual_seed(0), trained_rollouts(cache, cfg))
        drawn = torch.cat([batches.next() for _ in range(4)]).tolist()  # two epochs (or 12 of 6)
        assert sorted(set(drawn)) == expected, labels
    cut_all = dataclasses.replace(cache, correct=torch.zeros(6, dtype=torch.bool), answers=("1",) * 6, finish=("length",) * 6)
    with pytest.raises(ValueError, match="no rollouts to train on: every rollout of the cache is a wrong one cut"):
        RolloutBatches(cut_all, 3, torch.Generator(), trained_rollouts(cut_all, HeadTrainConfig(labels="spr")))


# -- configs ---------------------------------------------------------------------------------------


def test_configs_name_the_bad_value():
    with pytest.raises(ValueError, match="'nope'"):
        HeadTrainConfig(labels="nope")
    with pytest.raises(ValueError, match="warmup_steps=5"):
        HeadTrainConfig(labels="outcome_bce", warmup_steps=5)
    with pytest.raises(ValueError, match="lr=-1"):
        HeadTrainConfig(lr=-1)
    with pytest.raises(ValueError, match="'val'"):
        CacheSpec("x", "arith", "val", 1, 1)
    with pytest.raises(ValueError, match="feature_layers"):
        CacheSpec("x", "arith", "test", 1, 1, feature_layers=(-2, -2))


def test_epochs_count_full_batch_steps_and_must_be_positive():
    assert steps_for_epochs(2, 640, 64) == 20
    assert steps_for_epochs(1, 96, 64) == 2 and steps_for_epochs(2, 96, 64) == 4  # 64 + 32 a pass
    assert steps_for_epochs(10, 64, 1000) == 10  # a batch larger than the cache is one full pass
    assert steps_for_epochs(0.001, 64, 64) == 1
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="epochs=.* must be a finite number > 0"):
            steps_for_epochs(bad, 64, 64)


def test_cli_refuses_bad_settings_before_reading_a_cache(tmp_path, capsys):
    missing = ["--train", str(tmp_path / "none.pt"), "--test", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:  # argparse: the caches are never read
        main([*missing, "--epochs", "-1"])
    assert exit_info.value.code == 2 and "--epochs: '-1' must be a finite number > 0" in capsys.readouterr().err
    assert main([*missing, "--lr", "-1"]) == 2  # the config before the cache
    err = capsys.readouterr().err
    assert err.startswith("error: HeadTrainConfig.lr=-1.0") and "Traceback" not in err
    assert main(missing) == 2 and capsys.readouterr().err == f"error: no rollout cache {tmp_path / 'none.pt'}\n"
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_info:  # was torch's RuntimeError traceback
        main([*missing, "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads: '0' must be an integer >= 1" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "o"):  # failed only after training, in a traceback
        for epochs in ([], ["--epochs", "1"]):  # with --epochs the (missing) cache was read first
            assert main([*missing[:4], "--out", str(out), *epochs]) == 2
            assert capsys.readouterr().err.startswith(f"error: --out {out} ")


def test_cli_keeps_the_traceback_of_a_genuine_bug(tmp_path, monkeypatch):
    from experiments import train_head

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_head, "run_head_training", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["--train", "a.pt", "--test", "b.pt", "--out", str(tmp_path / "o")])


def test_cache_cli_prints_bad_settings_as_one_error_line(tmp_path, capsys):
    from experiments.rollout_cache import main as cache_main

    args = ["--policy", str(tmp_path / "none"), "--problems", "2", "--n", "2"]
    assert cache_main([*args, "--task", "foo", "--out", str(tmp_path / "c.pt")]) == 2
    assert capsys.readouterr().err == "error: unknown task 'foo'; valid: arith, countdown\n"
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path)]) == 2  # before any rollout
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path} is a folder")
    (tmp_path / "a_file").write_text("x")
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path / "a_file" / "c.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'a_file' / 'c.pt'} lies under")
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path / "c.pt")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint folder {tmp_path / 'none'} does not exist. "
                                       "Point --policy at an existing checkpoint folder\n")
    # the summary beside the cache overwrote it (--out c.json) or train_head's metrics.json, after every rollout
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'c.json'} must end in .pt")
    (tmp_path / "metrics.json").write_text('{"summary": {}}')
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path / "metrics.pt")]) == 2
    assert "metrics.json holds another file, which the cache's summary would overwrite" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == '{"summary": {}}'
    # a trained head's score_module.pt was overwritten by the cache, and the head lost
    torch.save({"0.weight": torch.ones(2, 2)}, tmp_path / "score_module.pt")
    assert cache_main([*args, "--task", "arith", "--out", str(tmp_path / "score_module.pt")]) == 2
    assert "score_module.pt holds another file (not a rollout cache, or a damaged one)" in capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "score_module.pt")["0.weight"], torch.ones(2, 2))
    assert cache_main([*args, "--task", "arith", "--out", "/proc/treesearch-no/c.pt"]) == 2
    assert "cannot create its folder" in capsys.readouterr().err


def held_out(cache: RolloutCache) -> RolloutCache:
    """The same rollouts filed under other problems: a cache the held-out check accepts beside cache."""
    return dataclasses.replace(cache, problem_ids=tuple(f"held-out {i}" for i in cache.problem_ids))


def test_a_test_cache_of_training_problems_is_refused(tmp_path):
    """Held-out numbers measured on training problems (the same cache twice, or a cache of the
    train split) are refused before training, naming the overlap."""
    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    check_pair(cache, held_out(cache), -2)
    with pytest.raises(ValueError, match=r"the test cache \(split 'test'\) shares 4 of its 4 problems with the "
                                         r"train cache \(split 'test'\), e.g. 'p0': held-out numbers need"):
        check_pair(cache, cache, -2)
    save_cache(cache, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="shares 4 of its 4 problems"):
        run_head_training(tmp_path / "c.pt", tmp_path / "c.pt", HeadTrainConfig(steps=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("other", ["config.yaml", "last", "records.jsonl", "sft_summary.json", "ckpt-8"])
def test_an_out_holding_another_commands_run_is_refused_and_a_rerun_of_its_own_is_not(tmp_path, other):
    # --out of a joint training run replaced its metrics.jsonl; resuming it then appended to head rows
    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    save_cache(cache, tmp_path / "c.pt")
    save_cache(held_out(cache), tmp_path / "t.pt")
    cfg = HeadTrainConfig(steps=1, eval_every=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/total": 0.5}\n')
    (run / other).mkdir() if other in ("last", "ckpt-8") else (run / other).write_text("x")
    with pytest.raises(ValueError, match=rf"--out {run} holds {other} of another command's run"):
        run_head_training(tmp_path / "c.pt", tmp_path / "t.pt", cfg, run, save=False, progress=False)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss/total": 0.5}\n'
    own = tmp_path / "own"
    for _ in range(2):  # its own output is replaced by a rerun
        run_head_training(tmp_path / "c.pt", tmp_path / "t.pt", cfg, own, save=False, progress=False)


def test_a_batch_larger_than_the_cache_is_noted(tmp_path, capsys):
    assert batch_note(64, 64) is None
    assert batch_note(1000, 64) == ("note: batch_rollouts=1000 exceeds the 64 train rollouts the head trains on: "
                                    "every step trains on all 64 (full-batch steps)")
    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    save_cache(cache, tmp_path / "c.pt")
    save_cache(held_out(cache), tmp_path / "t.pt")
    cfg = HeadTrainConfig(steps=1, batch_rollouts=1000, eval_every=0)
    run_head_training(tmp_path / "c.pt", tmp_path / "t.pt", cfg, tmp_path / "run", save=False, progress=False)
    assert "batch_rollouts=1000 exceeds the 8 train rollouts the head trains on" in capsys.readouterr().err


def test_epochs_and_the_batch_note_count_the_rollouts_the_head_trains_on(tmp_path, capsys):
    # the SPR modes leave out wrong rollouts cut at the token limit: an epoch of 8 rollouts of
    # which 4 were cut ran twice over the 4 trained, and a batch of 6 took them all in silence
    cache = dataclasses.replace(synthetic_cache([True, False] * 4, 2, [1] * 8, answers=["1"] * 8),
                                finish=("eos", "length") * 4)
    assert cache.cut_wrong.sum() == 4
    assert trained_rollout_count(cache, HeadTrainConfig(labels="spr")) == 4
    assert trained_rollout_count(cache, HeadTrainConfig(labels="outcome_bce")) == 8
    save_cache(cache, tmp_path / "c.pt")
    save_cache(held_out(cache), tmp_path / "t.pt")
    out = tmp_path / "run"
    assert main(["--train", str(tmp_path / "c.pt"), "--test", str(tmp_path / "t.pt"), "--out", str(out), "--labels", "spr",
                 "--epochs", "1", "--batch-rollouts", "6", "--no-save", "--eval-every", "0"]) == 0
    assert "batch_rollouts=6 exceeds the 4 train rollouts the head trains on" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1  # one full pass over the 4, not two
    # --warmup-steps was checked against the default --steps 500, not the steps --epochs gives
    assert main(["--train", str(tmp_path / "c.pt"), "--test", str(tmp_path / "t.pt"), "--out", str(out), "--labels", "spr",
                 "--epochs", "600", "--batch-rollouts", "4", "--warmup-steps", "550", "--no-save", "--eval-every", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["steps"] == 600
    capsys.readouterr()
    assert main(["--train", str(tmp_path / "c.pt"), "--test", str(tmp_path / "t.pt"), "--out", str(out), "--labels", "spr",
                 "--epochs", "2", "--batch-rollouts", "4", "--warmup-steps", "550", "--no-save", "--eval-every", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: HeadTrainConfig.warmup_steps=550 must be below steps=2 "
                                              "(the warm-up trains with plain BCE; the 'spr' loss starts after it); "
                                              "steps=2: --epochs 2 of 4 train rollouts by 4")
    cut = dataclasses.replace(cache, finish=("length",) * 8, correct=torch.zeros(8, dtype=torch.bool))
    save_cache(cut, tmp_path / "cut.pt")  # every rollout cut wrong: "the train cache holds no rollouts" (it held 8)
    assert main(["--train", str(tmp_path / "cut.pt"), "--test", str(tmp_path / "t.pt"), "--out", str(tmp_path / "cut"),
                 "--labels", "spr", "--epochs", "1", "--no-save", "--eval-every", "0"]) == 2
    err = capsys.readouterr().err
    assert "every rollout of the cache is a wrong one cut at the token limit" in err and "exceeds" not in err


def test_a_layer_the_caches_lack_is_a_value_error_naming_the_cache():
    cache = synthetic_cache([True, False], 2, [1, 1])
    with pytest.raises(ValueError, match=r"train cache: feature_layer=-1 is not in the cache \(it holds \[-2\]\)"):
        check_pair(cache, held_out(cache), -1)
    # -7 of a 5-state model was taken as -2 (7 % 5), 8 as 3: trained on, then refused only at saving
    known = dataclasses.replace(cache, num_hidden_states=5)
    for layer in (-7, 8, 5):
        with pytest.raises(ValueError, match=rf"train cache: feature_layer={layer} must index the model's 5 hidden "
                                             r"states \(-5..4\)"):
            check_pair(known, held_out(known), layer)
    check_pair(known, held_out(known), 3)  # -2 of 5


def test_a_train_cache_without_a_scored_position_is_noted(tmp_path, capsys):
    """It "trained" without a word: loss 0, the head as initialised."""
    save_cache(synthetic_cache([True, False], 2, [0, 0]), tmp_path / "train.pt")  # cut before a separator
    save_cache(held_out(synthetic_cache([True, False], 2, [1, 1])), tmp_path / "test.pt")
    run_head_training(tmp_path / "train.pt", tmp_path / "test.pt", HeadTrainConfig(steps=1, batch_rollouts=2),
                      tmp_path / "run", save=False, progress=False)
    assert "note: the train cache has no scored position (2 rollouts, none ending a step" in capsys.readouterr().err


def test_a_damaged_cache_file_is_named(tmp_path):
    path = save_cache(synthetic_cache([True, False] * 4, 2, [3] * 8), tmp_path / "c.pt")
    data = path.read_bytes()
    for size in range(0, len(data), 97):  # torch.load raises EOFError, RuntimeError or OSError [Errno 22]
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=f"{path} is damaged .*rebuild it"):
            load_cache(path)


def test_warmup_trains_plain_bce_before_the_filter():
    cfg = HeadTrainConfig(labels="spr", warmup_steps=2)
    assert [cfg.loss_mode(s) for s in range(3)] == ["bce", "bce", "reference"]
    assert HeadTrainConfig(labels="spr_paper").loss_mode(0) == "paper"
    assert HeadTrainConfig(labels="true_labels").uses_true_labels


# -- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", LABEL_MODES)
def test_each_label_mode_trains_and_changes_the_head(labels):
    cache = separable_cache(problems=8, seed=1)
    cfg = HeadTrainConfig(labels=labels, steps=3, batch_rollouts=8, eval_every=0, log_every=1, seed=3)
    run = train_head(cache, cfg, progress=False)
    initial = build_sprm_head(cache.hidden_size, seed=3).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in run.head.state_dict().items())
    assert [r["step"] for r in run.rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in run.rows[1:])


def test_true_labels_learn_a_separable_cache():
    train, test = separable_cache(problems=40, seed=1), separable_cache(problems=20, seed=2)
    cfg = HeadTrainConfig(labels="true_labels", steps=150, batch_rollouts=32, lr=3e-3, eval_every=0)
    run = train_head(train, cfg, progress=False)
    assert pooled_auc(position_probs(run.head, test.layer(-2)), test.position_labels) > 0.9
    metrics = cache_metrics(run.head, test, -2, "heldout", True)
    assert metrics["heldout/step_auc"] > 0.9 and metrics["heldout_fc/diff_prob"] > 0.1


def test_true_labels_need_a_cache_with_labels():
    cache = synthetic_cache([True, False], 2, [1, 1])
    with pytest.raises(ValueError, match="true step labels"):
        train_head(cache, HeadTrainConfig(labels="true_labels", steps=1), progress=False)


# -- the cache on a tiny checkpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")
    lm, tokenizer = load_checkpoint(path)
    return path, lm, tokenizer


def handmade_paths(tokenizer, problems: list[Problem], n: int) -> list[list[tuple[Step, ...]]]:
    """n rollouts per problem from its reference solution: even ones as is, odd ones with a wrong
    first step and a wrong answer; token log-probs -0.1 * (k + 1) on step k."""
    def steps_of(texts: list[str]) -> tuple[Step, ...]:
        out = []
        for k, text in enumerate(texts):
            last = k == len(texts) - 1
            ids = tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if last else [])
            out.append(Step(text, tuple(ids), (-0.1 * (k + 1),) * len(ids), "eos" if last else "separator"))
        return tuple(out)

    paths = []
    for p in problems:
        good = [*arith.solution_steps(p), f"</think>Answer: {p.answer}"]
        bad = [good[0].replace("=", "= 1"), *good[1:-1], f"</think>Answer: {int(p.answer) + 1}"]
        paths.append([steps_of(good if j % 2 == 0 else bad) for j in range(n)])
    return paths


@pytest.fixture(scope="module")
def handmade(tiny):
    path, lm, tokenizer = tiny
    problems = arith.generate_problems("test", 3, seed=0)
    spec = CacheSpec(str(path), "arith", "test", 3, 2, feature_layers=(-2, -1), forward_batch=4)
    paths = handmade_paths(tokenizer, problems, 2)
    return cache_from_paths(spec, lm, tokenizer, problems, paths), problems, paths


def test_a_cache_of_older_arith_labels_is_relabelled_on_load(handmade, tmp_path, capsys):
    # arith's labels changed (any order that reaches the answer): the demo reused older caches
    cache, _, _ = handmade
    path = save_cache(cache, tmp_path / "c.pt")
    payload = torch.load(path, weights_only=False)
    assert payload["labels_version"] == 2
    del payload["labels_version"]
    payload["step_labels"] = ~payload["step_labels"]  # what an older labeler said
    torch.save(payload, path)
    assert torch.equal(load_cache(path).step_labels, cache.step_labels)
    payload["labels_version"] = 2  # today's: kept as saved
    torch.save(payload, path)
    assert torch.equal(load_cache(path).step_labels, ~cache.step_labels)
    # graded again too: an older grader's correct flags were reused by the demo in silence
    del payload["labels_version"]
    payload["correct"] = ~payload["correct"]
    torch.save(payload, path)
    assert torch.equal(load_cache(path).correct, cache.correct)
    # problems that cannot be regenerated (the user's own, an older generator): an error saying to rebuild it
    payload["problem_ids"] = tuple(f"own-{i}" for i in range(len(payload["problem_ids"])))
    torch.save(payload, path)
    with pytest.raises(StaleCacheError, match="holds the grades of an older arith grader .* rebuild it"):
        load_cache(path)


def test_a_countdown_cache_of_an_older_grader_is_graded_again(tiny, tmp_path):
    # the grader of 2026-12-05 rejects an unused side step; caches graded before were reused with
    # their old correct flags, and heads trained on them
    path_dir, lm, tokenizer = tiny
    problem = countdown.generate_problems("test", 1, seed=0)[0]
    solution = countdown.solution_text(problem)
    side = solution.replace("</think>", "9 - 9 = 0.\n\n</think>", 1)
    def path_of(text: str) -> tuple[Step, ...]:
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        return (Step(text, ids, (-0.1,) * len(ids), "eos"),)

    paths = [[path_of(solution), path_of(side)]]
    spec = CacheSpec(str(path_dir), "countdown", "test", 1, 2, feature_layers=(-1,), forward_batch=2)
    cache = cache_from_paths(spec, lm, tokenizer, [problem], paths)
    assert cache.correct.tolist() == [True, False]  # the side step 9 - 9 = 0 is no part of the derivation
    path = save_cache(cache, tmp_path / "c.pt")
    payload = torch.load(path, weights_only=False)
    del payload["labels_version"]  # saved before countdown's grader had a version
    payload["correct"] = torch.tensor([True, True])  # what the older grader said of the side step
    torch.save(payload, path)
    assert load_cache(path).correct.tolist() == cache.correct.tolist()


def test_handmade_cache_shapes_and_labels(handmade, tiny):
    cache, problems, paths = handmade
    _, _, tokenizer = tiny
    think_steps = [len(arith.solution_steps(p)) for p in problems for _ in range(2)]
    assert cache.num_rollouts == 6 and cache.rollout_problem.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(cache.position_rollout) == sum(think_steps)  # one separator per think step
    assert cache.features[-2].shape == cache.features[-1].shape == (sum(think_steps), 32)
    assert cache.correct.tolist() == [True, False] * 3
    # the token after each position is the step's separator, the last token of its step
    separator = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(".\n\n"))[0]
    prompt_lengths = [len(tokenizer(arith.prompt_text(problems[int(p)])).input_ids) for p in cache.position_problem]
    for k in range(len(cache.position_rollout)):
        s = int(cache.position_step[k])
        step_ids = cache.token_ids[int(cache.step_tokens[s]) : int(cache.step_tokens[s + 1])].tolist()
        assert step_ids[-1] == separator
        offset = int(cache.position_index[k]) + 1 - prompt_lengths[k]  # index of the separator in the completion
        r = int(cache.position_rollout[k])
        first, last = int(cache.rollout_steps[r]), int(cache.rollout_steps[r + 1])
        completion = cache.token_ids[int(cache.step_tokens[first]) : int(cache.step_tokens[last])]
        assert int(completion[offset]) == separator
    # true labels: good rollouts all True, bad ones all False (the first step is wrong)
    assert cache.position_labels.tolist() == [bool(cache.correct[int(r)]) for r in cache.position_rollout]
    # confidence: step k of every rollout has mean log-prob -0.1 (k + 1)
    k = think_steps[0] + 1
    assert confidence_path_scores(cache)[0].item() == pytest.approx(math.exp(-0.1 * (k + 1) / 2))


@pytest.mark.parametrize("layer", [-2, -1])
def test_cached_features_give_sprm_scorer_scores(handmade, tiny, tmp_path, layer):
    cache, problems, paths = handmade
    checkpoint, _, _ = tiny
    head = build_sprm_head(cache.hidden_size, seed=5)
    with torch.no_grad():
        head[3].weight.mul_(20.0)  # spread the scores, so equality means something
    folder = save_reflective_head(head, checkpoint, layer, tmp_path / "final")
    scorer = SPRMScorer.from_pretrained(folder, arith.prompt_text, batch_size=3)
    prefixes = [Prefix(problems[i], steps) for i, row in enumerate(paths) for steps in row]
    expected = scorer.path_scores(prefixes)
    got = rollout_path_scores(position_probs(head, cache.layer(layer)), cache).tolist()
    assert max(expected) - min(expected) > 1e-3
    assert got == pytest.approx(expected, abs=1e-5)
    sampling = SamplingConfig(temperature=0.6)
    policy = TransformersPolicy.from_pretrained(folder, sampling, arith.prompt_text, with_step_head=True)
    assert policy.step_head.feature_layer == layer


def test_build_save_load_round_trip_on_the_tiny_policy(tiny, tmp_path):
    path, _, _ = tiny
    cache = build_rollout_cache(
        path, "arith", "train", 3, 2, seed=1, max_total_tokens=12, feature_layers=(-1,), progress=False
    )
    assert cache.num_rollouts == 6 and cache.num_problems == 3
    assert int(cache.rollout_steps[-1]) == len(cache.step_texts) and int(cache.step_tokens[-1]) == len(cache.token_ids)
    assert int(cache.step_num_tokens.sum()) == len(cache.token_ids) <= 6 * 12
    assert sorted(cache.features) == [-1]
    assert cache.layer(1) is cache.layer(-1)  # TINY_SHAPE has 1 layer: 2 hidden states, -1 is 1
    with pytest.raises(KeyError, match="holds \\[-1\\]"):
        cache.layer(0)
    out = save_cache(cache, tmp_path / "c.pt")
    assert json.loads((tmp_path / "c.json").read_text())["rollouts"] == 6
    loaded = load_cache(out)
    assert loaded.step_texts == cache.step_texts and torch.equal(loaded.features[-1], cache.features[-1])
    assert torch.equal(loaded.correct, cache.correct) and loaded.spec == cache.spec
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a rollout cache"):
        load_cache(tmp_path / "bad.pt")


def test_run_writes_metrics_plot_rows_and_a_loadable_head(handmade, tmp_path):
    cache, problems, paths = handmade
    save_cache(cache, tmp_path / "train.pt")
    save_cache(held_out(cache), tmp_path / "test.pt")
    cfg = HeadTrainConfig(labels="spr", warmup_steps=2, steps=4, batch_rollouts=2, eval_every=2, log_every=1)
    metrics = run_head_training(tmp_path / "train.pt", tmp_path / "test.pt", cfg, tmp_path / "run", progress=False)
    assert {"arith.sprm_bon@2", "arith.conf_bon@2", "arith.maj@2", "arith.pass@1", "arith.pass@2",
            "arith.sprm_within_auc", "arith.sprm_step_auc", "aha.diff_prob_first", "arith.ci95"} <= set(metrics)
    rows = load_metrics(tmp_path / "run" / "metrics.jsonl")  # what `python -m experiments.plot aha` reads
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if "heldout_fc/diff_prob" in r] == [0, 2, 4]
    assert [r["loss_mode_bce"] for r in rows[1:]] == [1.0, 1.0, 0.0, 0.0]
    scorer = SPRMScorer.from_pretrained(tmp_path / "run" / "final", arith.prompt_text)
    prefixes = [Prefix(problems[i], steps) for i, row in enumerate(paths) for steps in row]
    assert len(scorer.path_scores(prefixes)) == 6


def test_a_cache_that_does_not_fit_the_disk_is_named_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # torch's "unexpected pos 10816 vs 10768" traceback, and a hidden partial file holding the
    # last free space
    import errno

    from experiments import rollout_cache
    from experiments.cli_errors import is_storage_error

    def short_write(payload, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10816 vs 10768")

    monkeypatch.setattr(rollout_cache.torch, "save", short_write)
    with pytest.raises(OSError, match=r"No space left on device \(RuntimeError: .*unexpected pos 10816") as caught:
        save_cache(synthetic_cache([True, False] * 4, 2, [3] * 8), tmp_path / "c.pt")
    assert caught.value.errno == errno.ENOSPC and is_storage_error(caught.value)
    assert caught.value.filename == str(tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_summary_beside_its_cache_is_rewritten_by_a_rebuild(tmp_path):
    # a summary cut by a full disk (written in place after the cache) refused every rebuild as
    # "another file"; it is written atomically now, and one left damaged beside its cache is the cache's
    from experiments.rollout_cache import check_cache_target

    cache = save_cache(synthetic_cache([True, False] * 4, 2, [3] * 8), tmp_path / "c.pt")
    assert json.loads(cache.with_suffix(".json").read_text())["rollouts"] == 8
    cache.with_suffix(".json").write_text("")
    check_cache_target(cache)  # no error
    (tmp_path / "d.json").write_text("")  # a damaged file with no cache beside it: someone else's
    with pytest.raises(ValueError, match="d.json holds another file"):
        check_cache_target(tmp_path / "d.pt")


def test_a_policy_trained_again_in_its_folder_is_not_the_caches_policy(handmade, tiny, tmp_path, monkeypatch):
    """A cache knew its policy by the folder's path only: caches of an SFT policy retrained in
    place were reused (by the demo) and trained a head joined to the new backbone; the same folder
    under two names was "different policies"."""
    import shutil

    from experiments.demo_sprm import cached_rollouts
    from experiments.rollout_cache import check_policy, same_policy
    from experiments.train_head import check_same_source

    cache, _, _ = handmade
    path, lm, tokenizer = tiny
    folder = Path(shutil.copytree(path, tmp_path / "policy"))
    spec = CacheSpec(str(folder), "arith", "test", 3, 2, feature_layers=(-2, -1), forward_batch=4)
    mine = dataclasses.replace(cache, spec=dataclasses.asdict(spec))  # read from this folder's weights
    alias = tmp_path / "alias"
    alias.symlink_to(folder)
    aliased = dataclasses.replace(held_out(cache), spec={**cache.spec, "policy_dir": str(alias)})
    assert same_policy(mine, aliased) and check_policy(mine) == folder
    check_same_source(mine, aliased)  # one model under two names
    save_cache(mine, tmp_path / "train.pt")
    save_cache(held_out(mine), tmp_path / "test.pt")
    built: list = []
    monkeypatch.setattr("experiments.demo_sprm.build_from_spec", lambda spec: built.append(spec) or mine)
    cached_rollouts(spec, tmp_path / "train.pt")
    assert built == []  # the same weights: reused
    changed = load_checkpoint(folder)[0]
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    save_checkpoint(changed, tokenizer, folder)  # trained again, in place
    cached_rollouts(spec, tmp_path / "train.pt")
    assert built == [spec]  # other weights: built again
    stale = torch.load(tmp_path / "train.pt", weights_only=False)
    del stale["labels_version"]  # an older grader's, whose problems do not regenerate: built again, not a crash
    stale["problem_ids"] = tuple(f"own-{i}" for i in range(len(stale["problem_ids"])))
    torch.save(stale, tmp_path / "train.pt")
    cached_rollouts(spec, tmp_path / "train.pt")
    assert built == [spec, spec]
    save_cache(mine, tmp_path / "train.pt")
    cfg = HeadTrainConfig(steps=1, batch_rollouts=2, eval_every=1)
    with pytest.raises(ValueError, match="holds other weights than the train cache"):
        run_head_training(tmp_path / "train.pt", tmp_path / "test.pt", cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before training


def test_the_caches_policy_is_its_backbone_read_before_loading_and_checked_after(handmade, tiny, tmp_path, monkeypatch):
    """A reflective folder whose head was trained again kept byte-identical weights, yet its
    caches were refused as "trained again since"; a folder written while a cache was built (or a
    head trained) recorded, or saved with, weights the features were not read from."""
    import shutil

    from experiments import rollout_cache as cache_module
    from experiments import train_head as train_head_module
    from experiments.rollout_cache import backbone_fingerprint, build_from_spec, check_policy
    from policies.model_folder import weights_fingerprint

    cache, _, _ = handmade
    path, lm, tokenizer = tiny
    folder = Path(shutil.copytree(path, tmp_path / "policy"))
    spec = CacheSpec(str(folder), "arith", "test", 3, 2, feature_layers=(-2, -1), forward_batch=4)
    mine = dataclasses.replace(cache, spec=dataclasses.asdict(spec))
    whole = weights_fingerprint(folder)
    (folder / "score_module.pt").write_bytes(b"a head")
    (folder / "sprm.json").write_text('{"feature_layer": -2}')
    assert weights_fingerprint(folder) != whole and backbone_fingerprint(folder) == mine.policy_fingerprint
    assert check_policy(mine) == folder  # a new head over the same backbone keeps its caches
    prints = iter(["before", "after"])
    monkeypatch.setattr(cache_module, "backbone_fingerprint", lambda folder: next(prints))
    with pytest.raises(ValueError, match="policy changed while the cache was built"):
        build_from_spec(dataclasses.replace(spec, problems=1, n=1, max_total_tokens=8), progress=False)
    monkeypatch.undo()
    save_cache(mine, tmp_path / "train.pt")
    save_cache(held_out(mine), tmp_path / "test.pt")
    saved = train_head_module.save_reflective_head

    def retrained_meanwhile(head, policy, layer, out):
        changed = load_checkpoint(folder)[0]
        with torch.no_grad():
            next(changed.parameters()).add_(0.01)
        save_checkpoint(changed, tokenizer, folder)
        return saved(head, policy, layer, out)

    monkeypatch.setattr(train_head_module, "save_reflective_head", retrained_meanwhile)
    cfg = HeadTrainConfig(steps=1, batch_rollouts=2, eval_every=0)
    with pytest.raises(ValueError, match="policy changed while the head trained"):
        run_head_training(tmp_path / "train.pt", tmp_path / "test.pt", cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "metrics.json").exists()
    shutil.rmtree(folder)  # moved away: the message said only "checkpoint folder ... does not exist"
    with pytest.raises(FileNotFoundError, match="put it back there, or train with --no-save"):
        run_head_training(tmp_path / "train.pt", tmp_path / "test.pt", cfg, tmp_path / "run", progress=False)


def test_a_seed_torch_cannot_take_is_an_argument_error(tmp_path, capsys):
    # "error: Overflow when unpacking long long", naming no setting
    with pytest.raises(SystemExit) as info:
        main(["--train", "a.pt", "--test", "b.pt", "--out", str(tmp_path / "h"), "--seed", str(2**64)])
    assert info.value.code == 2 and "argument --seed: '18446744073709551616' must be an integer from" in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_refused():
    # --labels spr --warmup-steps 500 --steps 30 trained plain BCE throughout and reported "spr"
    with pytest.raises(ValueError, match=r"warmup_steps=30 must be below steps=30"):
        HeadTrainConfig(labels="spr", warmup_steps=30, steps=30)
    assert HeadTrainConfig(labels="spr", warmup_steps=29, steps=30).loss_mode(29) != "bce"


def test_a_rerun_killed_before_its_metrics_leaves_no_metrics_beside_the_earlier_head(tmp_path, monkeypatch):
    # metrics.json was written before final/: a rerun killed between them paired its config with the old head
    from experiments import train_head as train_head_module

    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    save_cache(cache, tmp_path / "c.pt")
    save_cache(held_out(cache), tmp_path / "t.pt")
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "metrics.json").write_text('{"config": "the earlier run"}')

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_head_module, "save_reflective_head", killed)
    monkeypatch.setattr(train_head_module, "check_policy", lambda cache, where: None)
    with pytest.raises(KeyboardInterrupt):
        run_head_training(tmp_path / "c.pt", tmp_path / "t.pt", HeadTrainConfig(steps=1, eval_every=0), out,
                          progress=False)
    assert not (out / "metrics.json").exists()


def test_a_rerun_without_saving_removes_the_earlier_head(tmp_path):
    # final/ of a first run stayed beside a --no-save rerun's metrics, passing for their head
    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    save_cache(cache, tmp_path / "c.pt")
    save_cache(held_out(cache), tmp_path / "t.pt")
    own = tmp_path / "own"
    (own / "final").mkdir(parents=True)
    (own / "final" / "score_module.pt").write_bytes(b"an earlier head")
    run_head_training(tmp_path / "c.pt", tmp_path / "t.pt", HeadTrainConfig(steps=1, eval_every=0), own,
                      save=False, progress=False)
    assert (own / "metrics.json").is_file() and not (own / "final").exists()


@pytest.mark.parametrize("lr", [1e10, 1e38])
def test_a_head_whose_training_diverges_stops_with_the_step_named(lr):
    # lr 1e10 trained a head of NaN weights, saved and scoring every path NaN; 1e38 overflowed in AdamW (a traceback)
    from scorers.head_training import HeadDivergedError

    cache = synthetic_cache([True, False] * 4, 2, [3] * 8)
    with pytest.raises(HeadDivergedError, match=rf"head training diverged at step \d: .* lower --lr \(now {re.escape(f'{lr:g}')}\)"):
        train_head(cache, HeadTrainConfig(lr=lr, steps=5, eval_every=0, grad_clip=0.0), progress=False)
