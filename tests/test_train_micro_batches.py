"""Tests of `run.micro_batches` (gradient accumulation inside each PPO mini-batch, verl's
ppo_micro_batch_size): K parts of whole prompt groups, each a forward and a backward of
`joint_step`'s loss / K, accumulate the gradient of the parts' averaged losses (per-part SPR class
weights and GRPO token means), which is not the whole mini-batch's one-backward gradient; K = 1
updates the weights bit for bit as the code before the setting did; 0, 1.5 and a K that does not
divide a mini-batch's groups are refused before anything loads; a run folder saved before the
setting existed resumes (as K = 1), and another K is a change that refuses the resume.

The trainer is hand-made around `test_joint_step`'s tiny reflective model, its head centred so that
the SPR loss keeps steps of both classes in both halves of a 2-prompt x 3-rollout batch, in other
proportions, with a real single-process CPU Accelerator and AdamW; the head's dropout is off where
one forward and two are compared.

    .venv/bin/pytest tests/test_train_micro_batches.py
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator

from experiments import train
from experiments.train import ADDED_SETTINGS, CONFIG, OptimizerConfig, RunConfig, run_training, settings
from policies.checkpoint import save_checkpoint
from policies.joint_step import JointForward, JointLossConfig, joint_step
from policies.reflective_model import ReflectiveModel
from policies.rollout_batch import RolloutBatch, collate_rollouts
from test_joint_step import EOS, MARKERS, PAD, SEP, TOK, biased_lm, grads, reflective_model, rollout
from test_train_loop import composed, rows_of, tiny
from treesearch.config_diff import config_differences, with_added_settings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LOSS = JointLossConfig()  # the reference's: class-weighted SPR loss, GRPO with KL and entropy
COMPLETIONS = ([10, SEP, 11, SEP, 12, SEP, EOS], [20, 21, SEP, 22, SEP, EOS], [30, SEP, 31, 32, SEP, 33, SEP, EOS],
               [40, SEP, 41, SEP, EOS], [50, 51, SEP, 52, SEP, 53, SEP, EOS], [60, SEP, 61, SEP, 62, EOS])
REWARDS = (1.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # 2 prompt groups of 3, both mixed


def mixed_batch() -> RolloutBatch:
    return collate_rollouts([rollout(c) for c in COMPLETIONS], REWARDS, 3, MARKERS, PAD)


def centred_model() -> ReflectiveModel:
    """`reflective_model()` with its head's logits on mixed_batch spread 10x more and shifted to
    straddle 0 (the middle of the 15 steps), so the SPR loss keeps steps of both classes: the
    first prompt's 4 positive and 1 negative, the second's 1 and 3 (a random head's logits
    all share one sign). Dropout off."""
    model, batch = reflective_model(), mixed_batch()
    model.head[2].p = 0.0
    with torch.no_grad():
        model.head[3].weight.mul_(10)
        logits = JointForward(model)(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols)[1]
        middle = logits.sort().values[7:9]  # [2]
        model.head[3].bias.sub_(middle.mean())
    return model


def hand_trainer(micro_batches: int = 1, mini_batches: int = 1) -> SimpleNamespace:
    """What `update` reads of a Trainer: the centred tiny reflective model wrapped as `open_run`
    wraps it, its KL reference, both AdamW optimisers, a CPU Accelerator."""
    reflective = centred_model()
    ref_lm = copy.deepcopy(reflective.lm).eval().requires_grad_(False)
    run = RunConfig(prompts_per_step=2, rollouts_per_prompt=3, mini_batches=mini_batches, micro_batches=micro_batches)
    s = SimpleNamespace(run=run, loss=LOSS, actor_optim=OptimizerConfig(lr=1e-2), head_optim=OptimizerConfig(lr=1e-2))
    accelerator = Accelerator(cpu=True)
    actor_opt = s.actor_optim.build(list(reflective.lm.parameters()))
    head_opt = s.head_optim.build(list(reflective.head.parameters()))
    model, actor_opt, head_opt = accelerator.prepare(JointForward(reflective), actor_opt, head_opt)
    return SimpleNamespace(s=s, accelerator=accelerator, model=model, reflective=reflective, ref_lm=ref_lm,
                           actor_opt=actor_opt, head_opt=head_opt, rank=0)


def weights(t: SimpleNamespace) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.reflective.named_parameters()}


def head_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: g for n, g in grads(model).items() if n.startswith("head.")}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def negative_share(metrics: dict[str, float]) -> float:
    """N / (P + N) of the SPR class weights (`scorers.spr_loss`: P, N = kept positives, negatives + 1)."""
    p, n = metrics["spr/kept_positive"] + 1, metrics["spr/kept_negative"] + 1
    return n / (p + n)


# -- the accumulated gradient -------------------------------------------------------------------


def test_two_micro_batches_accumulate_the_gradient_of_their_averaged_losses():
    batch = mixed_batch()
    t = hand_trainer(micro_batches=2)
    metrics = train.accumulate(t, batch)
    accumulated = grads(t.reflective)

    by_hand = hand_trainer()
    parts = [joint_step(by_hand.model, batch.groups(k, k + 1), by_hand.ref_lm, LOSS) for k in range(2)]
    ((parts[0].loss + parts[1].loss) / 2).backward()
    assert max_diff(accumulated, grads(by_hand.reflective)) < 1e-7
    assert metrics == pytest.approx({k: (parts[0].metrics[k] + parts[1].metrics[k]) / 2 for k in metrics}, abs=1e-6)

    # the premise: the parts weigh the SPR classes otherwise, so one backward over the whole
    # mini-batch (the code before the setting) trains the head another way
    kept = [(part.metrics["spr/kept_positive"], part.metrics["spr/kept_negative"]) for part in parts]
    assert kept == [(4, 1), (1, 3)]
    assert [negative_share(part.metrics) for part in parts] == pytest.approx([2 / 7, 2 / 3])
    whole = hand_trainer()
    joint_step(whole.model, batch, whole.ref_lm, LOSS).loss.backward()
    assert max_diff(head_grads(t.reflective), head_grads(whole.reflective)) > 1e-3


def test_update_steps_each_optimiser_once_per_mini_batch():
    t = hand_trainer(micro_batches=2)
    train.update(t, mixed_batch(), 0)
    assert [int(opt.state[opt.param_groups[0]["params"][0]]["step"]) for opt in (t.actor_opt, t.head_opt)] == [1, 1]
    assert all(p.grad is None for p in t.reflective.parameters())  # zeroed after the step


# -- micro_batches=1 is the old path ------------------------------------------------------------


def old_update(t: SimpleNamespace, batch, step: int) -> dict[str, float]:
    """`experiments.train.update` as it was before run.micro_batches (one backward per mini-batch)."""
    t.reflective.train()
    torch.manual_seed(train.derived_seed(t.s.run.seed, "dropout", step, t.rank))
    for opt, optim_cfg in ((t.actor_opt, t.s.actor_optim), (t.head_opt, t.s.head_optim)):
        for group in opt.param_groups:
            group["lr"] = optim_cfg.lr_at(step)
    batch = train.with_old_logprobs(t, batch)
    size = batch.num_groups // t.s.run.mini_batches
    rows = []
    for k in range(t.s.run.mini_batches):
        out = joint_step(t.model, batch.groups(k * size, (k + 1) * size), t.ref_lm, t.s.loss)
        t.accelerator.backward(out.loss)
        norms = {
            "grad_norm/actor": train._clip(t, t.reflective.lm.parameters(), t.s.actor_optim.grad_clip),
            "grad_norm/head": train._clip(t, t.reflective.head.parameters(), t.s.head_optim.grad_clip),
        }
        for opt in train.learning_optimizers(t):
            opt.step()
        for opt in (t.actor_opt, t.head_opt):
            opt.zero_grad(set_to_none=True)
        rows.append({**out.metrics, **norms})
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_one_micro_batch_updates_bit_for_bit_as_before(mini_batches):
    new, old = hand_trainer(mini_batches=mini_batches), hand_trainer(mini_batches=mini_batches)
    for t in (new, old):
        t.reflective.head[2].p = 0.1  # the run's dropout: both draw the same masks
    for step in range(2):
        assert train.update(new, mixed_batch(), step) == old_update(old, mixed_batch(), step)
    after_new, after_old = weights(new), weights(old)
    assert all(torch.equal(after_new[k], after_old[k]) for k in after_old)
    assert not torch.equal(after_new["head.3.weight"], centred_model().head[3].weight)  # it did train


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [("0", "0"), ("1.5", "1.5"), ("two", "'two'")])
def test_a_micro_batches_that_is_no_integer_ge_1_is_refused(value, shown):
    with pytest.raises(ValueError, match=rf"^run\.micro_batches={shown} must be an integer >= 1$"):
        settings(composed([f"run.micro_batches={value}"]))


class Reached(Exception):
    pass


@pytest.mark.parametrize("processes, overrides, groups", [
    (1, ["run.prompts_per_step=4", "run.mini_batches=2", "run.micro_batches=3"], 2),
    (2, ["run.prompts_per_step=8", "run.mini_batches=2", "run.micro_batches=4"], 2),  # 4 groups on one process
])
def test_micro_batches_not_dividing_a_mini_batchs_groups_is_refused_before_anything_loads(
        tmp_path, monkeypatch, processes, overrides, groups):
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(train, "run_problems", reached)
    monkeypatch.setattr(train, "load_start", reached)
    out = tmp_path / "run"
    cfg = composed([f"out_dir={out}", *overrides])
    s = settings(cfg)  # the config alone is fine: the split depends on the processes
    accelerator = SimpleNamespace(num_processes=processes, process_index=0, is_main_process=True, device="cpu")
    micro = s.run.micro_batches
    with pytest.raises(ValueError, match=(
            rf"^run\.micro_batches={micro} must divide the {groups} prompt group\(s\) of each mini-batch "
            rf"\(run\.prompts_per_step={s.run.prompts_per_step} over {processes} process\(es\) and "
            rf"run\.mini_batches=2\)")):
        train.open_run(cfg, s, accelerator)
    assert not out.exists()
    if processes == 2:  # on one process the 4 groups of a mini-batch split into 4 parts
        with pytest.raises(Reached):
            train.open_run(cfg, s, SimpleNamespace(**{**vars(accelerator), "num_processes": 1}))


# -- resuming a folder saved before the setting -------------------------------------------------


def test_added_setting_reads_a_config_without_it_as_one_micro_batch():
    assert ADDED_SETTINGS["run.micro_batches"] == 1
    current = {"run": {"_target_": "experiments.train.RunConfig", "mini_batches": 1, "micro_batches": 1}}
    saved = {"run": {"_target_": "experiments.train.RunConfig", "mini_batches": 1}}
    assert config_differences(with_added_settings(saved, current, ADDED_SETTINGS), current) == []
    two = {"run": {**current["run"], "micro_batches": 2}}
    assert config_differences(with_added_settings(saved, two, ADDED_SETTINGS), two) == ["run.micro_batches: 1 -> 2"]


def test_a_run_saved_before_the_setting_resumes_and_another_micro_batches_is_refused(tmp_path):
    init = save_checkpoint(biased_lm(), TOK, tmp_path / "init" / "final")
    out = run_training(composed(tiny(init, tmp_path / "run", "run.max_steps=1", "run.eval_every=0",
                                     "run.greedy_every=0", "run.micro_batches=1")))
    saved = yaml.safe_load((out / CONFIG).read_text())
    del saved["run"]["micro_batches"]  # as a run folder written before the setting existed
    (out / CONFIG).write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"run\.micro_batches: 1 -> 2.*add `run\.micro_batches=1`"):
        run_training(composed(tiny(init, out, "run.max_steps=2", "run.eval_every=0", "run.greedy_every=0",
                                   "run.micro_batches=2")))
    run_training(composed(tiny(init, out, "run.max_steps=2", "run.eval_every=0", "run.greedy_every=0")))
    assert [row["step"] for row in rows_of(out)] == [0, 1, 2]
