"""experiments.backbone_tuning and experiments.probe_backbone_verifier on a random tiny policy and hand-made countdown caches."""
from __future__ import annotations

import pytest

from experiments.countdown_failures import cache_problems
import torch

from experiments.backbone_tuning import (BackboneTuneConfig, collate, lm_loss_on_correct, reference_solution,
                                         rollout_examples, solution_examples)
from experiments import probe_backbone_verifier
from experiments.probe_backbone_verifier import main, run
from experiments.rollout_cache import CacheSpec, FeatureReader, cache_from_paths, same_folder, save_cache
from experiments.tasks import countdown
from policies.checkpoint import load_checkpoint, save_checkpoint
from tiny_checkpoint import save_tiny_checkpoint
from treesearch.records import Step


def steps_of(tokenizer, text: str) -> tuple[Step, ...]:
    parts = [p + ".\n\n" for p in text.split("</think>")[0].split(".\n\n") if p] + ["</think>" + text.split("</think>")[1]]
    out = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        ids = tokenizer(part, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if last else [])
        out.append(Step(part, tuple(ids), (-0.1,) * len(ids), "eos" if last else "separator"))
    return tuple(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train and test caches of 2 countdown problems x 2 rollouts: a reference solution and the
    same with its last result off by one (false arithmetic)."""
    folder = tmp_path_factory.mktemp("probe")
    path = save_tiny_checkpoint(folder / "final")
    lm, tokenizer = load_checkpoint(path)
    out = {}
    for split in ("train", "test"):
        problems = countdown.generate_problems(split, 2, seed=0)
        paths = []
        for p in problems:
            good = countdown.solution_text(p)
            target = p.meta["target"]
            bad = good.replace(f"= {target}, left {target}.", f"= {target + 1}, left {target + 1}.")
            paths.append([steps_of(tokenizer, good), steps_of(tokenizer, bad)])
        spec = CacheSpec(str(path), "countdown", split, 2, 2, feature_layers=(-2,), forward_batch=4)
        out[split] = save_cache(cache_from_paths(spec, lm, tokenizer, problems, paths), folder / f"{split}.pt")
    return path, out, lm, tokenizer


def test_examples_carry_positions_outcomes_and_reference_solutions(caches):
    path, files, lm, tokenizer = caches
    from experiments.rollout_cache import load_cache

    cache = load_cache(files["train"])
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    problems = cache_problems(cache)
    rollouts = rollout_examples(cache, problems, reader)
    assert [e.correct for e in rollouts] == [True, False, True, False]
    assert all(len(e.positions) == 3 and e.start < min(e.positions) for e in rollouts)  # 3 think steps each
    solutions = solution_examples(problems, reader, per_problem=1)
    assert solutions[0].ids == rollouts[0].ids and solutions[0].positions == rollouts[0].positions  # same tokens
    batch = collate(rollouts[:2], reader.pad_id)
    assert batch["labels"].tolist() == [True] * 3 + [False] * 3
    assert batch["completion"][0].sum() == len(rollouts[0].ids) - rollouts[0].start


def test_run_trains_the_backbone_and_reports_before_and_after(caches):
    path, files, _, _ = caches
    cfg = BackboneTuneConfig(steps=3, batch=2, backbone_lr=1e-2, head_lr=1e-2, kl_coef=0.1, reference_solutions=1, lm_coef=0.5)
    result = run(path, files["train"], files["test"], cfg, progress=False)
    assert result["train_examples"] == 4 + 2 and result["train_correct"] == 2 + 2
    for when in ("before", "after"):
        assert {"heldout_fc/within_auc", "sprm_bon@2", "conf_bon@2", "pass@2"} <= set(result[when])
    assert result["after"]["heldout_fc/diff_prob"] != result["before"]["heldout_fc/diff_prob"]


def test_the_tuned_model_is_saved_and_ranks_its_own_samples(caches, tmp_path):
    from policies.reflective_model import ReflectiveModel

    path, files, _, _ = caches
    cfg = BackboneTuneConfig(steps=1, batch=2, reference_solutions=0)
    result = run(path, files["train"], files["test"], cfg, progress=False, save_dir=tmp_path / "tuned", own_problems=1)
    model, _ = ReflectiveModel.from_pretrained(tmp_path / "tuned")  # policy + score_module.pt
    assert model.feature_layer == -2
    own = result["own"]
    assert {"pass@1", "pass@2", "sprm_bon@2", "conf_bon@2"} <= set(own)
    assert own["own_fc/num_correct"] + own["own_fc/num_false"] == 2  # 1 problem x n = 2 own rollouts
    assert 0.0 <= own["pass@1"] <= own["pass@2"] <= 1.0


def test_lm_loss_counts_only_the_completion_tokens_of_correct_examples(caches):
    _, files, lm, tokenizer = caches
    from experiments.rollout_cache import load_cache

    cache = load_cache(files["train"])
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    good, bad = rollout_examples(cache, cache_problems(cache), reader)[:2]
    batch = collate([good, bad], reader.pad_id)
    logits = torch.randn(2, batch["ids"].shape[1], lm.config.vocab_size)
    logits[1] = 100.0 * torch.randn_like(logits[1])  # the incorrect row's loss would be huge
    # by hand: the mean of -log p(next token) over the good row's completion targets
    logp = torch.log_softmax(logits[0], -1)
    targets = range(good.start - 1, len(good.ids) - 1)  # position t predicts token t + 1
    expected = -sum(logp[t, good.ids[t + 1]] for t in targets) / len(targets)
    assert torch.allclose(lm_loss_on_correct(logits, batch), expected, atol=1e-5)


def test_train_evaluates_at_the_start_every_k_steps_and_at_the_end(caches):
    from experiments.backbone_tuning import train
    from experiments.rollout_cache import load_cache
    from policies.reflective_model import ReflectiveModel

    path, files, _, _ = caches
    lm, tokenizer = load_checkpoint(path)
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [-2])
    cache = load_cache(files["train"])
    examples = rollout_examples(cache, cache_problems(cache), reader)
    seen = []
    rows = train(ReflectiveModel(lm), None, examples, reader.pad_id, BackboneTuneConfig(steps=5, batch=2),
                 progress=False, evaluate=lambda step: seen.append(step) or {"heldout_fc/diff_prob": 0.1 * step},
                 eval_every=2)
    assert seen == [0, 2, 4, 5] and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[2]["heldout_fc/diff_prob"] == pytest.approx(0.2) and "heldout_fc/diff_prob" not in rows[3]
    assert rows[1]["fc/diff_prob"] is not None  # one correct + one incorrect per batch
    assert "loss/kl" not in rows[1] and "loss/lm" not in rows[1]  # kl_coef, lm_coef 0: not measured (was a 0)
    with pytest.raises(ValueError, match="needs the frozen reference LM"):
        train(ReflectiveModel(lm), None, examples, reader.pad_id, BackboneTuneConfig(steps=1, batch=2, kl_coef=0.1))


def test_reference_solutions_of_both_embedded_tasks(caches):
    path, files, lm, tokenizer = caches
    from experiments.tasks import arith

    problems = arith.generate_problems("train", 2, seed=0)
    assert reference_solution("arith", problems[0], 3) == arith.solution_text(problems[0])  # one per problem
    cd = countdown.generate_problems("train", 1, seed=0)[0]
    assert reference_solution("countdown", cd, 1) == countdown.solution_text(cd, seed=1)
    reader = FeatureReader(lm, tokenizer, arith.prompt_text, [-2])
    examples = solution_examples(problems, reader, per_problem=1, task="arith")
    prompt = tokenizer(arith.prompt_text(problems[0])).input_ids
    assert examples[0].ids[: len(prompt)] == prompt and examples[0].start == len(prompt) and examples[0].correct
    steps = len(arith.solution_steps(problems[0]))
    assert len(examples[0].positions) == steps  # one score position per reference step
    with pytest.raises(ValueError, match="no reference solutions for task 'gsm8k'"):
        reference_solution("gsm8k", problems[0], 0)


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="batch=3"):
        BackboneTuneConfig(batch=3)
    with pytest.raises(ValueError, match="kl_coef"):
        BackboneTuneConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match="lm_coef"):
        BackboneTuneConfig(lm_coef=-1.0)
    with pytest.raises(ValueError, match="BackboneTuneConfig.loss='foo'; valid: reference, paper, bce"):
        BackboneTuneConfig(loss="foo")
    for name in ("backbone_lr", "head_lr", "grad_scale", "kl_coef", "lm_coef"):  # NaN trained to NaN, inf passed
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=rf"BackboneTuneConfig.{name}={value} must be a finite number >= 0"):
                BackboneTuneConfig(**{name: value})
    # counts of another type failed after the caches and the model had loaded (the Python API)
    for name, value in (("steps", 2.5), ("batch", 4.0), ("reference_solutions", 1.5), ("seed", 1.5)):
        with pytest.raises(ValueError, match=rf"BackboneTuneConfig.{name}={value} must be an integer"):
            BackboneTuneConfig(**{name: value})


def test_cli_refuses_a_bad_loss_before_reading_anything(tmp_path, capsys):
    missing = ["--train", str(tmp_path / "none.pt"), "--test", str(tmp_path / "none.pt")]
    with pytest.raises(SystemExit) as exit_info:
        main([*missing, "--loss", "foo"])
    assert exit_info.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err
    assert main([*missing, "--batch", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: BackboneTuneConfig.batch=3 must be an even number >= 2") and "Traceback" not in err
    assert main(missing) == 2 and capsys.readouterr().err == f"error: no rollout cache {tmp_path / 'none.pt'}\n"
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    for flag, path in [("--out", tmp_path / "a_folder"), ("--save", tmp_path / "a_file")]:  # failed after training
        assert main([*missing, flag, str(path)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag} {path} is ")


def test_caches_of_another_policy_are_refused_before_loading_it(caches, tmp_path, monkeypatch):
    path, files, lm, tokenizer = caches
    other = tmp_path / "tiny-arith" / "final"  # other weights: refused by the caches' fingerprint
    changed = load_checkpoint(path)[0]
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    save_checkpoint(changed, tokenizer, other)
    monkeypatch.setattr(probe_backbone_verifier, "load_checkpoint", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"--policy {other} and the rollout caches \\(of {path}\\) come from different"):
        run(other, files["train"], files["test"], BackboneTuneConfig(steps=1, batch=2), progress=False)
    assert same_folder(path, path.parent / ".." / path.parent.name / path.name)


def test_too_few_examples_for_a_batch_are_refused_before_the_first_evaluation(caches, monkeypatch):
    path, files, _, _ = caches

    def no_evaluation(*args):
        raise AssertionError("evaluated before the examples were checked")

    monkeypatch.setattr(probe_backbone_verifier, "evaluate", no_evaluation)
    with pytest.raises(ValueError, match="batch=8 needs 4 correct and 4 incorrect examples, have 4 / 2"):
        run(path, files["train"], files["test"], BackboneTuneConfig(steps=1, batch=8, reference_solutions=1), progress=False)


def test_save_into_a_model_folder_and_an_unusable_seed_are_refused_before_anything_loads(tmp_path, capsys):
    # --save <the policy's folder> replaced the SFT policy's weights with the tuned ones, in silence;
    # --seed 99999999999999999999 failed in torch with "Overflow when unpacking long long"
    from experiments.probe_backbone_verifier import main as probe_main

    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = ["--policy", str(model), "--train", "a.pt", "--test", "b.pt"]
    with pytest.raises(SystemExit) as caught:
        probe_main([*base, "--save", str(model)])
    assert caught.value.code == 2 and "is not empty; give a new or empty folder" in capsys.readouterr().err
    caches = tmp_path / "caches"  # the docstring keeps the caches beside the save folder: they were deleted
    caches.mkdir()
    (caches / "train.pt").write_bytes(b"rollouts")
    with pytest.raises(SystemExit) as caught:
        probe_main([*base, "--save", str(caches)])
    assert caught.value.code == 2 and (caches / "train.pt").read_bytes() == b"rollouts"
    with pytest.raises(SystemExit):
        probe_main([*base, "--seed", "99999999999999999999"])
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_the_reference_forward_is_bf16_only_where_the_cpu_has_bf16_matmuls(native, monkeypatch, tmp_path):
    # the command line passed ref_bf16=True unless --ref-fp32, on an AVX2-only CPU too (bf16 ~56x slower there)
    import experiments.probe_backbone_verifier as probe
    from policies import bf16_support

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2" + (" amx_bf16\n" if native else "\n"))
    monkeypatch.setattr(bf16_support, "CPUINFO", cpuinfo)
    bf16_support.native_bf16.cache_clear()
    seen = []
    monkeypatch.setattr(probe, "run", lambda policy, train, test, cfg, **_: seen.append(cfg.ref_bf16) or 1 / 0)
    try:
        for extra in ([], ["--ref-fp32"]):
            with pytest.raises(ZeroDivisionError):
                probe.main(["--train", "a.pt", "--test", "b.pt", *extra])
    finally:
        bf16_support.native_bf16.cache_clear()  # this machine's answer again for later tests
    assert seen == [native, False]
