"""Pins of joint GRPO + SPR training behaviours a mutation review found no test holding: the
policy-gradient term's gradient in closed form; advantages normalised within each prompt's group
(P != G); the shared-prompt forward when the longest row sits in the shorter prompt's group; the
head optimiser's own lr and grad_clip, and a head left bit-identical by train_loss=grpo_only;
mini-batches training their own prompts; warmup's lr in closed form and the logged lr being the one
used; several processes (rank offsets of the prompts, groups kept apart in the step row, a resume
of another world size refused); per-step rollout and dropout seeds; the reward wiring of a wrong
answer cut at the token limit; keep_checkpoints and the newest complete checkpoint on resume; a
separator ending the prompt not read as a step; a repetition penalty below 1 refused with GRPO.

Most tests call experiments.train's step functions on a hand-made trainer (SimpleNamespace)
rather than launching runs; one tiny 2-step run pins the grpo_only head.

    .venv/bin/python -m pytest tests/test_training_pins.py
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments import train
from experiments.tasks import arith
from experiments.train import OptimizerConfig, run_training, settings, stream_indices
from policies.grpo import group_advantages
from policies.joint_step import JointForward, JointLossConfig, joint_step, target_logprobs
from policies.rollout_batch import Rollout, collate_rollouts
from policies.sampling_config import SamplingConfig
from policies.shared_prompt import shared_prompt_forward, shared_prompt_lengths
from policies.train_state import STATE_FILE, JointTrainState, publish_checkpoint, resume_point
from scorers.sprm_head import build_sprm_head
from test_joint_step import BOS, COMPLETIONS, EOS, MARKERS, OPEN, PAD, SEP, TOK, hand_batch, reflective_model
from test_joint_step import rollout as joint_rollout
from test_shared_prompt import lm as shared_lm
from test_shared_prompt import read_positions
from test_shared_prompt import rollout as shared_rollout
from test_train_loop import composed, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROBLEMS = arith.generate_problems("train", 10, seed=0)


# -- hand-made trainers for experiments.train's step functions -----------------------------------


class FakeOpt:
    """An optimizer that records its steps (param_groups: the lr update() sets)."""

    def __init__(self) -> None:
        self.param_groups = [{}]
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


class Source:
    """A rollout source: G rollouts per problem (path score attached), the seeds it was handed."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def rollouts(self, problems, n, seed):
        self.seeds.append(seed)
        return [[Rollout(p.id, (1,), (5,), (-0.1,), f"{p.id}-{j}", "eos", 0.5) for j in range(n)] for p in problems]


def trainer(*, world: int = 1, rank: int = 0, prompts: int = 2, g: int = 2, mini_batches: int = 1,
            loss: JointLossConfig | None = None, actor: OptimizerConfig | None = None,
            head: OptimizerConfig | None = None, grade=lambda p, text: True, answer=None,
            sampling: SamplingConfig | None = None) -> SimpleNamespace:
    run = SimpleNamespace(prompts_per_step=prompts, rollouts_per_prompt=g, seed=0, mini_batches=mini_batches,
                          micro_batches=1, old_logprobs="recompute")
    s = SimpleNamespace(run=run, loss=loss or JointLossConfig(), actor_optim=actor or OptimizerConfig(lr=1e-3),
                        head_optim=head or OptimizerConfig(lr=1e-3), sampling=sampling or SamplingConfig())
    lm_params, head_params = [torch.zeros(2)], [torch.zeros(3)]
    model = SimpleNamespace(eval=lambda: None, train=lambda: None, lm=SimpleNamespace(parameters=lambda: lm_params),
                            head=SimpleNamespace(parameters=lambda: head_params))
    clips: list[tuple[list, float]] = []

    def clip(params, max_norm):
        clips.append((params, max_norm))
        return 0.0

    acc = SimpleNamespace(backward=lambda l: None, clip_grad_norm_=clip)
    task = SimpleNamespace(grade=grade, extract_answer=lambda text: answer)
    return SimpleNamespace(s=s, world=world, rank=rank, data_position=0, train_problems=PROBLEMS, reflective=model,
                           source=Source(), task=task, accelerator=acc, actor_opt=FakeOpt(), head_opt=FakeOpt(),
                           model=None, ref_lm=None, clips=clips, lm_params=lm_params, head_params=head_params)


@pytest.fixture
def fake_step(monkeypatch):
    """train.joint_step replaced by a recorder of the batches it trains on (and of a random draw
    after update()'s dropout seeding); the finiteness checks of local_report pass."""
    seen: list = []
    draws: list[float] = []

    def step(model, batch, ref, cfg):
        seen.append(batch)
        draws.append(float(torch.rand(())))
        return SimpleNamespace(loss=torch.zeros(()), metrics={"loss/total": 0.0})

    monkeypatch.setattr(train, "joint_step", step)
    monkeypatch.setattr(train, "with_old_logprobs", lambda t, b: b)
    monkeypatch.setattr(train, "weights_finite", lambda m: True)
    monkeypatch.setattr(train, "forward_finite", lambda m, b: True)
    return SimpleNamespace(seen=seen, draws=draws)


def no_batch():
    return SimpleNamespace(num_groups=2, groups=lambda lo, hi: (lo, hi), attention_mask=torch.ones(2, 2))


def report(t, problems, rollouts, rewards):
    return train.local_report(t, problems, rollouts, rewards, SimpleNamespace(attention_mask=torch.ones(2, 2)),
                              {"loss/total": 0.0})


# -- joint_step ---------------------------------------------------------------------------------


# pins: on-policy with entropy, KL and SPR off, the LM gradient is the closed form -A * grad logp (token mean), not 0
def test_the_policy_gradient_term_has_the_closed_form_gradient():
    model, batch = reflective_model().eval(), hand_batch()
    cfg = JointLossConfig(kl_coef=0.0, entropy_coef=0.0, spr_coef=0.0)
    joint_step(JointForward(model), batch, None, cfg).loss.backward()
    got = {n: p.grad.clone() for n, p in model.lm.named_parameters()}
    model.zero_grad()
    logp = target_logprobs(model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                           batch.input_ids, 1.0)[0]
    adv = group_advantages(batch.rewards.view(-1, 2)).view(-1)
    mask = batch.completion_mask
    (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()
    assert sum(float(g.abs().sum()) for g in got.values()) > 1e-3
    for n, p in model.lm.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


# pins: advantages are normalised per prompt group when prompts (3) != rollouts per prompt (2)
def test_advantages_are_normalised_within_each_prompts_group():
    comps = list(COMPLETIONS) + [list(COMPLETIONS[0]), list(COMPLETIONS[2])]
    rewards = (1.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # only the first group has a GRPO signal
    batch = collate_rollouts([joint_rollout(c) for c in comps], rewards, 2, MARKERS, PAD)
    out = joint_step(JointForward(reflective_model().eval()), batch, None, JointLossConfig(kl_coef=0.0))
    n = batch.completion_mask.sum(-1)
    adv = group_advantages(torch.tensor(rewards).view(3, 2)).view(-1)
    assert out.metrics["loss/pg"] == pytest.approx(float(-(adv * n).sum() / n.sum()), rel=1e-5)


# pins: the shared-prompt forward equals the plain one where read when the longest row is in the shorter prompt's group
def test_shared_prompt_forward_when_the_longest_row_has_the_shorter_prompt():
    prompts = ((BOS, 100, 101, 102, 103, OPEN), (BOS, 200, OPEN))
    comps = (([10, SEP, 12], [20, 21], [30]), ([40, 41, SEP, 43, 44, 45, SEP, 47, 48, 49], [50], [51, 52, SEP]))
    rows = [shared_rollout(p, c) for p, cs in zip(prompts, comps) for c in cs]
    b = collate_rollouts(rows, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], 3, MARKERS, PAD)
    assert int(b.attention_mask.sum(-1).argmax()) == 3  # the longest row: the short prompt's group
    model = shared_lm()
    plain = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    logits, _ = shared_prompt_forward(model, b.input_ids, b.attention_mask, 3, shared_prompt_lengths(b))
    read = read_positions(b)
    torch.testing.assert_close(logits[read], plain[read], rtol=1e-5, atol=1e-5)


# -- the two optimisers -------------------------------------------------------------------------


# pins: the head optimiser's lr is head_optim's, not actor_optim's
def test_the_head_optimiser_uses_head_optims_lr(fake_step):
    t = trainer(actor=OptimizerConfig(lr=1e-3), head=OptimizerConfig(lr=1e-2))
    train.update(t, no_batch(), 0)
    assert t.actor_opt.param_groups[0]["lr"] == 1e-3 and t.head_opt.param_groups[0]["lr"] == 1e-2


# pins: the head is clipped at head_optim.grad_clip, the policy at actor_optim.grad_clip
def test_the_head_is_clipped_at_head_optims_grad_clip(fake_step):
    t = trainer(actor=OptimizerConfig(lr=1e-3, grad_clip=1.0), head=OptimizerConfig(lr=1e-3, grad_clip=0.25))
    train.update(t, no_batch(), 0)
    assert [(p[0] is t.lm_params[0], p[0] is t.head_params[0], norm) for p, norm in t.clips] == [
        (True, False, 1.0), (False, True, 0.25)]


# pins: with spr_coef 0 the head optimiser never steps (its weight decay would move the head)
def test_with_spr_off_only_the_actor_optimiser_steps(fake_step):
    t = trainer(loss=JointLossConfig(spr_coef=0.0))
    train.update(t, no_batch(), 0)
    assert (t.actor_opt.steps, t.head_opt.steps) == (1, 0)


# pins: train_loss=grpo_only leaves the head bit-identical to its seeded init after 2 steps
def test_grpo_only_leaves_the_head_bit_identical(tmp_path):
    from policies.checkpoint import save_checkpoint
    from test_joint_step import biased_lm

    init = save_checkpoint(biased_lm(), TOK, tmp_path / "init" / "final")
    out = run_training(composed(tiny(init, tmp_path / "run", "train_loss=grpo_only", "run.max_steps=2",
                                     "run.eval_every=0", "run.greedy_every=0", "head_optim.weight_decay=0.5")))
    from safetensors.torch import load_file

    before, after = load_file(init / "model.safetensors"), load_file(out / "last" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy did train
    head = torch.load(out / "last" / "score_module.pt", weights_only=True)
    fresh = build_sprm_head(int(head["0.weight"].shape[1]), seed=0).state_dict()  # run.head_seed 0
    assert sorted(head) == sorted(fresh)
    assert [k for k in head if not torch.equal(head[k], fresh[k])] == []


# pins: with run.mini_batches=2 each optimizer step trains its own prompts' rollouts
def test_each_mini_batch_trains_its_own_prompts(fake_step):
    batch = hand_batch()  # 2 prompts x 2 rollouts
    train.update(trainer(mini_batches=2), batch, 0)
    assert [b.input_ids.tolist() for b in fake_step.seen] == [batch.input_ids[:2].tolist(), batch.input_ids[2:].tolist()]


# -- learning rates -----------------------------------------------------------------------------


# pins: linear warmup in closed form: step k trains at lr * (k + 1) / warmup (the first step not at 0)
def test_warmup_lr_in_closed_form():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4)
    assert [cfg.lr_at(k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert OptimizerConfig(lr=1e-3).lr_at(0) == 1e-3


# pins: the row of step k + 1 logs the lr the optimisers used in update(step=k)
def test_the_logged_lr_is_the_one_the_update_used(fake_step):
    t = trainer(actor=OptimizerConfig(lr=1e-3, warmup_steps=4), head=OptimizerConfig(lr=1e-2, warmup_steps=3))
    problems = PROBLEMS[:1]
    rollouts = [Rollout("p", (1,), (5,), (-0.1,), "x", "eos", s) for s in (0.7, 0.3)]
    for step in range(3):
        train.update(t, no_batch(), step)
        row = train.step_row(step + 1, [report(t, problems, rollouts, [1.0, 0.0])], t)
        assert row["lr/actor"] == t.actor_opt.param_groups[0]["lr"], step
        assert row["lr/head"] == t.head_opt.param_groups[0]["lr"], step


# -- several processes --------------------------------------------------------------------------


# pins: rank r draws the step's prompts at stream positions r * per_process ..., disjoint across ranks
def test_each_rank_draws_its_own_share_of_the_steps_prompts():
    drawn = [[p.id for p in train.collect(trainer(world=2, rank=r, prompts=4), 0)[0]] for r in (0, 1)]
    want = [PROBLEMS[i].id for i in stream_indices(0, 4, len(PROBLEMS), 0)]
    assert drawn == [want[:2], want[2:]]


# pins: the step row keeps two ranks' groups apart (rank 0 all correct, rank 1 all wrong)
def test_the_step_row_keeps_two_ranks_groups_apart(fake_step):
    reports = []
    for rank, ok in ((0, True), (1, False)):
        t = trainer(world=2, rank=rank, prompts=2, grade=lambda p, text, ok=ok: ok)
        problems, rollouts, rewards = train.collect(t, 0)
        reports.append(report(t, problems, rollouts, rewards))
    row = train.step_row(1, reports, trainer(world=2))
    assert (row["reward/pass_at_g"], row["grpo/mixed_groups"], row["rollout/correct"]) == (0.5, 0.0, 0.5)


# pins: load_start refuses a resume point of another world size (1 saved, 2 resuming)
@pytest.mark.parametrize("saved, world", [(1, 2), (2, 1)])
def test_a_resume_with_another_world_size_is_refused(monkeypatch, saved, world):
    point = SimpleNamespace(state=SimpleNamespace(world_size=saved), directory=Path("run/last"), reflective=None,
                            tokenizer=None)
    monkeypatch.setattr(train, "resume_point", lambda out: point)
    with pytest.raises(ValueError, match=f"trained by {saved} processes; resume it with as many, not {world}"):
        train.load_start(None, Path("run"), world)


# -- seeds --------------------------------------------------------------------------------------


# pins: the rollout seeds and the head's dropout seeds differ from step to step
def test_rollout_and_dropout_seeds_differ_across_steps(fake_step):
    t = trainer()
    with torch.random.fork_rng():
        for step in range(3):
            train.collect(t, step)
            train.update(t, no_batch(), step)
    assert len(set(t.source.seeds)) == 3
    assert len(set(fake_step.draws)) == 3


# -- rewards ------------------------------------------------------------------------------------


# pins: a wrong answer cut at the token limit (reward 0.1) is logged as wrong, not correct, and
# reward/mean / grpo/mixed_groups read GRPO's rewards, where it is 0 (as the reference's)
def test_a_cut_wrong_rollout_is_not_correct(fake_step):
    t = trainer()
    cut = Rollout("p", (1,), (5,), (-0.1,), "x", "length", 0.5)
    ended = Rollout("p", (1,), (5,), (-0.1,), "x", "eos", 0.5)
    row = train.step_row(1, [report(t, PROBLEMS[:1], [cut, ended], [0.1, 0.0])], t)
    assert (row["rollout/correct"], row["reward/pass_at_g"]) == (0.0, 0.0)
    assert row["reward/mean"] == 0.0 and row["grpo/mixed_groups"] == 0.0


# pins: train_loss.truncated_wrong_reward reaches rollout_reward (0 gives a cut wrong answer 0.0)
def test_truncated_wrong_reward_reaches_the_rollout_reward():
    cut = Rollout("p", (1,), (5,), (-0.1,), "x", "length", 0.5)
    wrong = dict(grade=lambda p, text: False, answer="5")
    assert train.rollout_reward(trainer(**wrong), None, cut) == pytest.approx(0.1)
    assert train.rollout_reward(trainer(loss=JointLossConfig(truncated_wrong_reward=0.0), **wrong), None, cut) == 0.0
    assert train.rollout_reward(trainer(loss=JointLossConfig(truncated_wrong_reward=0.05), **wrong), None, cut) == 0.05
    # text after </think> is a written answer (the reference's reading), whatever the task extracts
    unread = dict(grade=lambda p, text: False, answer=None)
    assert train.rollout_reward(trainer(**unread), None, replace(cut, text="3.\n\n</think>Ans")) == pytest.approx(0.1)
    assert train.rollout_reward(trainer(**wrong), None, replace(cut, text="3.\n\n</think>")) == 0.0
    # the policy's own think tag (sampling.think_close)
    own = dict(unread, sampling=SamplingConfig(think_open="<t>", think_close="</t>"))
    assert train.rollout_reward(trainer(**own), None, replace(cut, text="3.\n\n</t>Ans")) == pytest.approx(0.1)
    assert train.rollout_reward(trainer(**own), None, replace(cut, text="3.\n\n</t>")) == 0.0


# -- checkpoints --------------------------------------------------------------------------------


def publish_steps(out: Path, steps, keep: int) -> None:
    model = reflective_model()
    for step in steps:
        state = JointTrainState(step, step, 0.0, {}, {}, ({},), 1)
        publish_checkpoint(out, model, TOK, state, numbered=True, keep=keep)


# pins: run.keep_checkpoints=K keeps exactly the newest K ckpt-* folders
def test_keep_checkpoints_keeps_exactly_the_newest(tmp_path):
    publish_steps(tmp_path, range(1, 5), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-3", "ckpt-4"]


def test_last_is_an_exact_copy_and_a_full_disk_while_copying_it_is_a_storage_error(tmp_path, monkeypatch):
    # shutil.copytree gathered the ENOSPC into a shutil.Error without errno: a traceback, not the one-line error
    import errno
    import shutil

    from experiments.cli_errors import is_storage_error

    publish_steps(tmp_path, (1,), keep=0)
    copied = {p.relative_to(tmp_path / "last"): p.read_bytes() for p in (tmp_path / "last").rglob("*") if p.is_file()}
    numbered = {p.relative_to(tmp_path / "ckpt-1"): p.read_bytes() for p in (tmp_path / "ckpt-1").rglob("*") if p.is_file()}
    assert copied == numbered and copied

    def full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copy2", full)
    with pytest.raises(OSError) as caught:
        publish_steps(tmp_path, (2,), keep=0)
    assert is_storage_error(caught.value)
    assert (tmp_path / "last" / STATE_FILE).is_file()  # the step-1 last/ is left whole


# pins: with last/ damaged, a resume takes the NEWEST complete ckpt-<K> (10 after 9, not by name)
def test_a_damaged_last_resumes_from_the_newest_numbered_checkpoint(tmp_path):
    publish_steps(tmp_path, (2, 9, 10), keep=0)
    (tmp_path / "last" / "joint_state.pt").unlink()
    point = resume_point(tmp_path)
    assert (point.directory.name, point.state.step) == ("ckpt-10", 10)


# -- rollout batch and settings -----------------------------------------------------------------


# pins: a separator that ends the prompt is not a step the head reads (only the completion's are)
def test_a_separator_ending_the_prompt_is_not_scored():
    r = joint_rollout([10, 11, SEP, EOS], prompt=(BOS, 100, OPEN, 101, SEP))
    b = collate_rollouts([r, r], [1.0, 0.0], 2, MARKERS, PAD)
    assert b.step_rows.tolist() == [0, 1] and b.step_cols.tolist() == [6, 6]  # the token before the completion's SEP


# pins: sampling.repetition_penalty below 1 with a GRPO term is refused (any value but 1.0)
@pytest.mark.parametrize("penalty", [0.9, 1.05])
def test_a_repetition_penalty_other_than_1_is_refused_with_grpo(penalty):
    with pytest.raises(ValueError, match=f"sampling.repetition_penalty={penalty}: GRPO"):
        settings(composed([f"+sampling.repetition_penalty={penalty}"]))


def test_the_data_order_and_seeds_keep_their_values():
    # a run resumed from a checkpoint of an earlier version must draw the stream it began with
    from experiments.data_order import derived_seed

    assert stream_indices(0, 8, 10, seed=0) == [7, 3, 0, 5, 1, 4, 8, 9]
    assert derived_seed(0, "rollout", 3, 0) == 1119134436
    assert all(0 <= derived_seed(seed, "epoch", 0) < 2**31 for seed in range(64))  # a 31-bit seed
