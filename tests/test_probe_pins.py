"""Pins for experiments.probe_backbone_verifier and experiments.backbone_tuning that a mutation
review found unpinned by tests/test_probe_backbone_verifier.py.

A random tiny policy and the hand-made countdown caches of that file (its `caches` fixture: 2
problems x 2 rollouts per split, one right and one off by one). What is pinned: the command line
puts every flag into its own config field and prints the held-out table at the TEST cache's n,
the before row from the before numbers and the own-samples table in its column order; `--save`
saves without `--own-problems`; the result's Best-of-n comes from the geometric-mean path score of
the after step scores, with `sprm_min_bon` from their minimum; loss_first / loss_last_50 are the
first loss and the mean of the (fewer than 50) logged losses; one seed gives one result;
`paths_of` / `rollout_examples` follow each rollout's own problem; `kl_to_frozen` is KL(frozen ||
current) averaged over completion targets (by hand; 0 against itself); `train` uses head_lr for
the head, grad_scale for the head's gradient into the backbone, kl_coef and lm_coef for their own
terms and its seed for the batches; steps=0, caches of another task and an example set without a
correct half are refused, exactly half a batch of each side is enough.

Run: `.venv/bin/python -m pytest tests/test_probe_pins.py`
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments import backbone_tuning, probe_backbone_verifier
from experiments.backbone_tuning import (BackboneTuneConfig, Example, check_examples, collate, kl_to_frozen, paths_of,
                                         rollout_examples, train)
from experiments.countdown_failures import cache_problems
from experiments.probe_backbone_verifier import check_caches, probe_command, ranking_metrics, run, summary
from experiments.rollout_cache import FeatureReader, load_cache
from experiments.tasks import countdown
from experiments.train_head import bon_table
from policies.checkpoint import load_checkpoint
from policies.reflective_model import ReflectiveModel
from scorers.head_training import rollout_min_scores, rollout_path_scores
import test_probe_backbone_verifier

pytestmark = pytest.mark.usefixtures("one_thread")
caches = test_probe_backbone_verifier.caches  # its module fixture: a tiny policy and its train / test caches


def fresh_policy(caches):
    """A fresh policy from the fixture's checkpoint, its reader and the train cache's rollout examples."""
    path, files, _, _ = caches
    lm, tokenizer = load_checkpoint(path)
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    cache = load_cache(files["train"])
    return lm, reader, rollout_examples(cache, cache_problems(cache), reader)


def split(model: ReflectiveModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of (backbone, head) parameters."""
    named = list(model.named_parameters())
    return ([p.detach().clone() for n, p in named if not n.startswith("head.")],
            [p.detach().clone() for n, p in named if n.startswith("head.")])


def table_rows(text: str) -> list[list[str]]:
    """The cells of each markdown table row of `text`."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


# -- the command line -----------------------------------------------------------------------------


def test_cli_puts_every_flag_into_its_own_config_field(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(probe_backbone_verifier, "run", lambda *a, **k: seen.append((a, k)) or 1 / 0)
    argv = ["--policy", str(tmp_path / "pol"), "--train", "tr.pt", "--test", "te.pt", "--save", str(tmp_path / "s"),
            "--own-problems", "3", "--steps", "7", "--batch", "6", "--reference-solutions", "5", "--seed", "11",
            "--backbone-lr", "0.001", "--head-lr", "0.003", "--grad-scale", "0.25", "--kl-coef", "0.5",
            "--lm-coef", "0.75", "--loss", "paper", "--ref-fp32"]
    with pytest.raises(ZeroDivisionError):
        probe_command(argv)
    (args, kwargs), = seen
    assert args == (tmp_path / "pol", Path("tr.pt"), Path("te.pt"),
                    BackboneTuneConfig(steps=7, batch=6, backbone_lr=0.001, head_lr=0.003, grad_scale=0.25, loss="paper",
                                       kl_coef=0.5, reference_solutions=5, seed=11, lm_coef=0.75, ref_bf16=False))
    assert kwargs == {"save_dir": tmp_path / "s", "own_problems": 3}


def fake_result(n: int) -> dict:
    keys = ["heldout_fc/diff_prob", "heldout_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"sprm_wmaj@{n}",
            f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
    own_keys = ["own_fc/diff_prob", "own_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
    return {"before": {k: 0.1 + 0.01 * i for i, k in enumerate(keys)},
            "after": {k: 0.5 + 0.01 * i for i, k in enumerate(keys)},
            "own": {k: 0.8 + 0.01 * i for i, k in enumerate(own_keys)}}


def test_summary_rows_read_the_before_and_the_after_numbers():
    result = fake_result(4)
    header, _, before, after = table_rows(summary(result, 4))
    assert header[1:] == list(result["before"])
    assert before == ["before", *(f"{v:.3f}" for v in result["before"].values())]
    assert after == ["after", *(f"{v:.3f}" for v in result["after"].values())]


def test_cli_tables_use_the_test_caches_n_and_the_documented_columns(monkeypatch, capsys):
    ns = {"tr.pt": 8, "te.pt": 32}  # train and test caches of different n: the tables are at the test cache's
    result = fake_result(32)
    monkeypatch.setattr(probe_backbone_verifier, "load_cache", lambda path: SimpleNamespace(n=ns[str(path)]))
    monkeypatch.setattr(probe_backbone_verifier, "run", lambda *a, **k: result)
    assert probe_command(["--train", "tr.pt", "--test", "te.pt", "--own-problems", "3"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0][1:] == list(result["before"])  # sprm_bon@32 ... pass@32
    assert rows[2] == ["before", *(f"{v:.3f}" for v in result["before"].values())]
    assert rows[3] == ["after", *(f"{v:.3f}" for v in result["after"].values())]
    assert "the tuned model's own samples (3 test problems x 32):" in out
    assert rows[4] == ["own_fc/diff_prob", "own_fc/within_auc", "pass@1", "sprm_bon@32", "conf_bon@32", "maj@32", "pass@32"]
    assert rows[6] == [f"{result['own'][k]:.3f}" for k in rows[4]]


# -- run: saving, the result's numbers, seeds ----------------------------------------------------


@pytest.fixture(scope="module")
def probe_runs(caches, tmp_path_factory):
    """Two runs of one config (steps 3, seed 5), the first with --save and no --own-problems; the
    first's training log."""
    path, files, _, _ = caches
    save = tmp_path_factory.mktemp("saved") / "tuned"
    cfg = BackboneTuneConfig(steps=3, batch=2, backbone_lr=1e-2, head_lr=1e-2, reference_solutions=0, seed=5)
    logs = []

    def logged_train(*args, **kwargs):
        logs.append(train(*args, **kwargs))
        return logs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_backbone_verifier, "train", logged_train)
        first = run(path, files["train"], files["test"], cfg, progress=False, save_dir=save)
    second = run(path, files["train"], files["test"], cfg, progress=False)
    return first, second, logs[0], save


def test_save_without_own_problems_still_saves_the_tuned_model(probe_runs):
    first, _, _, save = probe_runs
    model, _ = ReflectiveModel.from_pretrained(save)
    assert model.feature_layer == -2 and first["own"] == {}


def test_loss_first_and_loss_last_50_read_the_training_log(probe_runs):
    first, _, log, _ = probe_runs
    losses = [r["loss"] for r in log]
    assert len(losses) == 3 and losses[0] != losses[-1]
    assert first["loss_first"] == losses[0]
    assert first["loss_last_50"] == pytest.approx(sum(losses) / 3)  # fewer than 50 steps: their mean


def test_one_seed_gives_one_result(probe_runs):
    first, second, _, _ = probe_runs
    assert first["after_step_scores"] == second["after_step_scores"]
    assert first["after"] == second["after"]


def test_the_results_best_of_n_ranks_by_the_geometric_mean_with_the_minimum_beside_it(probe_runs, caches):
    first, _, _, _ = probe_runs
    test = load_cache(caches[1]["test"])
    probs = torch.tensor(first["after_step_scores"])
    table = bon_table(test, rollout_path_scores(probs, test), head_min_scores=rollout_min_scores(probs, test))
    assert "sprm_min_bon@2" in first["after"] and "sprm_min_bon@2" in first["before"]
    for key, estimate in table.items():
        assert first["after"][key] == pytest.approx(estimate.mean), key


def test_ranking_metrics_rank_by_the_geometric_mean_of_the_step_scores(caches):
    _, files, lm, _ = caches
    test = load_cache(files["test"])
    assert test.correct.tolist() == [True, False, True, False]
    assert test.position_rollout.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the right rollouts: one weak step (geometric mean 0.545, min 0.2); the wrong ones: 0.5 throughout
    probs = torch.tensor([0.9, 0.9, 0.2, 0.5, 0.5, 0.5] * 2)
    metrics = ranking_metrics(ReflectiveModel(lm), test, probs, "x")
    assert metrics["sprm_bon@2"] == 1.0  # the minimum would pick the wrong ones: 0.0


# -- backbone_tuning -----------------------------------------------------------------------------


def test_paths_and_examples_follow_each_rollouts_own_problem(caches):
    _, files, lm, tokenizer = caches
    cache = load_cache(files["train"])
    problems = cache_problems(cache)
    owners = [int(p) for p in cache.rollout_problem]
    assert owners == [0, 0, 1, 1]
    assert [p.problem.id for p in paths_of(cache, problems)] == [problems[i].id for i in owners]
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    for example, i in zip(rollout_examples(cache, problems, reader), owners):
        prompt = tokenizer(countdown.prompt_text(problems[i])).input_ids
        assert example.ids[: len(prompt)] == prompt and example.start == len(prompt)


def kl_batch():
    ids = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    completion = torch.tensor([[0, 1, 1, 1, 1.0], [0, 0, 1, 0, 0]])  # 5 completion targets of 10 mask tokens
    return {"ids": ids, "mask": mask, "completion": completion}


def test_kl_to_frozen_is_the_mean_kl_of_frozen_to_current_over_the_completion_targets():
    generator = torch.Generator().manual_seed(0)
    current = torch.randn(2, 6, 7, generator=generator)
    reference = 2.0 * torch.randn(2, 6, 7, generator=generator)
    frozen = lambda input_ids, attention_mask: SimpleNamespace(logits=reference)  # noqa: E731
    batch = kl_batch()
    terms = []
    for b, t in batch["completion"].nonzero().tolist():  # the logits at t predict token t + 1
        p, q = torch.softmax(reference[b, t], -1), torch.softmax(current[b, t], -1)
        terms.append(float((p * (p.log() - q.log())).sum()))
    assert len(terms) == 5
    assert kl_to_frozen(current, frozen, batch).item() == pytest.approx(sum(terms) / 5, rel=1e-5)


def test_kl_to_a_frozen_copy_of_the_current_model_is_zero(caches):
    _, _, lm, _ = caches
    batch = kl_batch()
    with torch.no_grad():
        logits = lm(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
    assert kl_to_frozen(logits, lm, batch).item() == pytest.approx(0.0, abs=1e-6)


def test_head_lr_zero_leaves_the_head_as_it_is(caches):
    lm, reader, examples = fresh_policy(caches)
    torch.manual_seed(0)
    model = ReflectiveModel(lm)
    backbone, head = split(model)
    train(model, None, examples, reader.pad_id,
          BackboneTuneConfig(steps=2, batch=2, backbone_lr=1e-2, head_lr=0.0, reference_solutions=0), progress=False)
    new_backbone, new_head = split(model)
    assert all(torch.equal(a, b) for a, b in zip(head, new_head))
    assert any(not torch.equal(a, b) for a, b in zip(backbone, new_backbone))  # the backbone did learn


def test_grad_scale_zero_keeps_the_heads_gradient_out_of_the_backbone(caches):
    lm, reader, examples = fresh_policy(caches)
    torch.manual_seed(0)
    model = ReflectiveModel(lm)
    backbone, head = split(model)
    lr, steps = 1e-2, 2
    train(model, None, examples, reader.pad_id,
          BackboneTuneConfig(steps=steps, batch=2, backbone_lr=lr, head_lr=1e-2, grad_scale=0.0, reference_solutions=0),
          progress=False)
    new_backbone, new_head = split(model)
    decay = (1 - lr * 0.01) ** steps  # AdamW's weight decay is all that moves it (an Adam step moves by ~lr)
    for old, new in zip(backbone, new_backbone):
        assert torch.equal(new, old) or torch.allclose(new, old * decay, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(head, new_head))


def test_the_loss_is_spr_plus_each_coefficient_times_its_own_term(caches):
    path = caches[0]
    lm, reader, examples = fresh_policy(caches)
    torch.manual_seed(0)
    cfg = BackboneTuneConfig(steps=3, batch=2, backbone_lr=5e-2, kl_coef=0.3, lm_coef=0.7, reference_solutions=0,
                             ref_bf16=False)
    rows = train(ReflectiveModel(lm), load_checkpoint(path)[0], examples, reader.pad_id, cfg, progress=False)
    assert rows[-1]["loss/kl"] > 1e-4 and rows[-1]["loss/lm"] > 0
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss/spr"] + 0.3 * row["loss/kl"] + 0.7 * row["loss/lm"], rel=1e-5)


def test_the_seed_chooses_the_training_batches(caches, monkeypatch):
    lm, reader, examples = fresh_policy(caches)
    seen: list[list[int]] = []

    def recording_collate(batch, pad_id):
        seen.append([examples.index(e) for e in batch])
        return collate(batch, pad_id)

    monkeypatch.setattr(backbone_tuning, "collate", recording_collate)
    picks = {}
    for seed in (0, 1, 2, 0):
        seen.clear()
        torch.manual_seed(0)
        train(ReflectiveModel(lm), None, examples, reader.pad_id,
              BackboneTuneConfig(steps=4, batch=2, backbone_lr=0.0, head_lr=0.0, seed=seed, reference_solutions=0),
              progress=False)
        assert picks.setdefault(seed, list(seen)) == seen  # one seed, one batch sequence
    assert len({str(v) for v in picks.values()}) > 1


# -- refusals ------------------------------------------------------------------------------------


def test_config_refuses_zero_steps():
    with pytest.raises(ValueError, match="BackboneTuneConfig.steps=0"):
        BackboneTuneConfig(steps=0)


def test_caches_of_another_task_are_refused(caches):
    path, files, _, _ = caches
    train_set, test = (load_cache(files[s]) for s in ("train", "test"))
    arith = [dataclasses.replace(c, spec={**c.spec, "task": "arith"}) for c in (train_set, test)]
    check_caches(path, train_set, test)  # countdown caches of this policy pass
    with pytest.raises(ValueError, match="the probe reads countdown rollouts; the caches hold task 'arith'"):
        check_caches(path, *arith)


def test_a_test_split_cache_given_as_train_is_refused(caches):
    # the two caches swapped: its examples held the very test problems --own-problems samples
    path, files, _, _ = caches
    train_set, test = (load_cache(files[s]) for s in ("train", "test"))
    with pytest.raises(ValueError, match=r"--train holds rollouts of the 'test' split; give the train split's cache"):
        check_caches(path, test, train_set)


def test_own_problems_the_test_split_cannot_give_are_refused_before_training(caches, monkeypatch):
    # checked only after the whole training (~33 min at the README's scale), the before / after table lost
    path, files, _, _ = caches
    monkeypatch.setattr("experiments.probe_backbone_verifier.load_checkpoint",
                        lambda *a: pytest.fail("loaded the policy before refusing own_problems"))
    with pytest.raises(ValueError, match=r"count=100000: the test split of CountdownConfig.* holds only \d+"):
        run(path, files["train"], files["test"], BackboneTuneConfig(steps=1), own_problems=100000)


def test_check_examples_needs_half_a_batch_of_each_side():
    right, wrong = Example([1, 2, 3], 1, [2], True), Example([1, 2, 4], 1, [2], False)
    positives, negatives = check_examples([right, wrong, right, wrong], 4)  # exactly enough of each
    assert positives == [right, right] and negatives == [wrong, wrong]
    with pytest.raises(ValueError, match="batch=2 needs 1 correct and 1 incorrect examples, have 0 / 4"):
        check_examples([wrong] * 4, 2)
    with pytest.raises(ValueError, match="batch=4 needs 2 correct and 2 incorrect examples, have 1 / 3"):
        check_examples([right] + [wrong] * 3, 4)
