"""End-to-end smoke test of the demo pipeline at a tiny budget: train (a few SFT steps of a very
small model), reuse the cached checkpoint, search, grade, write the report."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from experiments.demo import DemoConfig, DemoTask, parse_args, run_demo
from experiments.backbone_tuning import BackboneTuneConfig
from experiments.demo_reflective import ReflectiveStage
from experiments.demo_sprm import SPRMStage
from policies.sft import SFTConfig
from policies.tiny_model import TinyModelConfig

# the strategies of the demo's sweep (experiments.demo_sweep.DEMO_STRATEGIES) by their series names
DEMO_SERIES = ("best_of_n", "beam_search", "dvts", "mcts", "rebase", "particle_filtering")
REQUIRED_KEYS = ["arith.pass@1", "arith.greedy", "arith.maj@4", "arith.conf_bon@4", "arith.pass@4"]


@pytest.mark.slow
def test_demo_end_to_end_at_tiny_budget(tmp_path, capsys, monkeypatch):
    import time

    import experiments.demo as demo

    sample = demo.sample_problems

    def slowed(*args, **kwargs):  # each sampling pass >= 0.3 s: the report's timing is told apart
        time.sleep(0.3)
        return sample(*args, **kwargs)

    monkeypatch.setattr(demo, "sample_problems", slowed)
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"),
        checkpoints=str(tmp_path / "ckpt"),
        tasks=(DemoTask("arith", max_total_tokens=24,  # a head on the frozen policy's features
                        sprm=SPRMStage("arith", train_problems=4, train_n=2, test_problems=3, test_n=2, steps=3,
                                       max_total_tokens=24)),
               DemoTask("countdown", max_total_tokens=24,  # the reflective model: backbone + head
                        reflective=ReflectiveStage(train_problems=4, train_n=2, heldout_problems=3, heldout_n=2,
                                                   tune=BackboneTuneConfig(steps=2, batch=2, kl_coef=0.1,
                                                                           reference_solutions=1),
                                                   eval_every=1, max_total_tokens=24),
                        sweep_scorer="sprm")),  # its sweep: the reflective model ranked by its head
        problems=3,
        n=4,
        chunk=2,
        train_problems=64,
        sweep_problems=2,
        sweep_budgets=(4, 8),
        sft=SFTConfig(max_minutes=None, max_steps=2, batch_size=4, warmup_steps=1, checkpoint_every=0),
        model=TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64),
    )
    metrics = run_demo(cfg)
    for key in REQUIRED_KEYS + ["arith.maj@1", "arith.wmaj@2", "arith.random_bon@4", "arith.pass@2"]:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["arith.problems"] == 3
    assert metrics["arith.pass@4"] >= metrics["arith.pass@1"] - 1e-12  # oracle never below a single sample
    assert metrics["arith.compute"]["tokens_generated"] > 0
    assert metrics["arith.compute"]["flops"] > 0
    out = tmp_path / "demo"
    assert "| N | pass@1 |" in (out / "report.md").read_text()
    for task in ("arith", "countdown"):
        rows = [json.loads(line) for line in (out / f"records_{task}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(len(r["candidates"]) == 4 for r in rows)
        assert json.loads((out / f"tree_{task}.json").read_text())["tree"]["nodes"][0]["parent"] is None
        assert (out / f"tree_{task}.png").stat().st_size > 1000 and (out / f"tree_{task}.html").is_file()
        assert (tmp_path / "ckpt" / f"tiny-{task}" / "final" / "config.json").is_file()
        assert metrics[f"{task}.problems"] == 3
        stages = [metrics[f"timing.{task}.{stage}_s"] for stage in ("policy", "sampling", "sprm", "sweep")]
        assert all(s >= 0.0 for s in stages) and metrics[f"timing.{task}.sampling_s"] > 0.0
    assert metrics["timing.total_s"] >= metrics["timing.arith.sampling_s"]
    assert "| task | policy | sprm | sampling | sweep | total |" in (out / "report.md").read_text()

    # the compute-matched strategy sweep: one row per (strategy, budget), a slope per strategy
    table = metrics["arith.budget_table"]
    assert sorted((r["strategy"], r["budget"]) for r in table) == sorted(
        (s, b) for s in DEMO_SERIES for b in (4, 8)
    )
    assert all(r["tokens"] > 0 and r["low"] <= r["accuracy"] <= r["high"] for r in table)
    bon_tokens = {r["budget"]: r["tokens"] for r in table if r["strategy"] == "best_of_n"}
    for n in (4, 8):  # MCTS's token budget is Best-of-N's tokens at the same N, simulations a cap
        mcts_cfg = yaml.safe_load((out / "sweep_arith" / f"mcts_{n}" / "config.yaml").read_text())["search"]
        assert mcts_cfg["token_budget"] == math.ceil(bon_tokens[n]) and mcts_cfg["iterations"] == 16 * n
    assert isinstance(metrics["scaling.best_of_n.slope"], float)  # twice the samples, twice the compute
    for strategy in DEMO_SERIES:
        # None only when both budgets spent the same compute (a saturated MCTS tree of a random policy)
        assert metrics[f"scaling.{strategy}.slope"] is None or isinstance(metrics[f"scaling.{strategy}.slope"], float)
        assert metrics[f"arith.scaling.{strategy}.slope"] == metrics[f"scaling.{strategy}.slope"]
    assert (out / "scaling_arith.png").stat().st_size > 1000
    assert json.loads((out / "sweep_arith" / "sweep.json").read_text())["problems"] == 2  # its settings, for reruns
    assert "strategies at equal budgets" in (out / "report.md").read_text()
    # countdown's sweep: the reflective model, each step ranked by its head's score from generation
    run_cfg = yaml.safe_load((out / "sweep_countdown_sprm" / "beam_4" / "config.yaml").read_text())
    assert run_cfg["scorer"]["_target_"].endswith("StepScoreReader") and run_cfg["policy"]["with_step_head"] is True
    assert run_cfg["policy"]["path"].endswith("reflective_countdown/model")
    assert len(metrics["countdown.budget_table"]) == 2 * len(DEMO_SERIES) and not (out / "sweep_countdown").exists()
    assert "scorer: the SPRM head of the reflective model" in (out / "report.md").read_text()

    # arith: a head on the frozen policy's features scores the SFT policy's candidates
    assert metrics["arith.sprm_labels"] == "spr" and 0.0 <= metrics["arith.sprm_bon@4"] <= 1.0
    assert (out / "sprm_arith" / "head" / "final" / "score_module.pt").is_file()
    assert (out / "aha_arith.png").stat().st_size > 1000
    # countdown: the reflective model samples the candidates and its head scores them on the way
    assert metrics["sprm_task"] == "countdown" and metrics["countdown.sprm_labels"].startswith("backbone+head")
    for key in ("countdown.sprm_bon@4", "countdown.sprm_wmaj@4", "countdown.sprm_bon@1", "countdown.sft_pass@1",
                "countdown.sft_pass@4", "countdown.sft_conf_bon@4"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # sprm_task's held-out gap is the top-level aha.* (None: no correct held-out rollout); each task keeps its own
    for key in ("diff_prob_first", "diff_prob_last"):
        assert metrics[f"aha.{key}"] == metrics[f"countdown.aha.{key}"] and f"arith.aha.{key}" in metrics
    assert "countdown.sprm_within_auc" in metrics and "countdown.conf_within_auc" in metrics
    work = out / "reflective_countdown"
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all("heldout_fc/diff_prob" in r for r in rows)
    assert (work / "model" / "score_module.pt").is_file() and (out / "aha_countdown.png").stat().st_size > 1000
    scored = [json.loads(line) for line in (out / "records_countdown.jsonl").read_text().splitlines()]
    assert "reflective_countdown/model" in (out / "report.md").read_text()  # the table is the reflective model's
    # its tokens/s: the reflective model's tokens over its own pass, not over the SFT baseline's pass too
    took = re.search(r"- countdown: .* took ([0-9.]+) s for ([0-9]+) tokens", (out / "report.md").read_text())
    assert took is not None and float(took.group(1)) < metrics["timing.countdown.sampling_s"] - 0.2  # one pass of two
    assert "SPRM on countdown" in (out / "report.md").read_text()
    assert len(scored) == 3
    for candidate in (c for row in scored for c in row["candidates"]):  # the head's own step scores, kept
        assert len(candidate["head_scores"]) == len(candidate["step_scores"]) > 0
        assert all(0.0 <= s <= 1.0 for s in candidate["head_scores"])
    arith_rows = [json.loads(line) for line in (out / "records_arith.jsonl").read_text().splitlines()]
    assert not any("head_scores" in c for row in arith_rows for c in row["candidates"])  # no head generated them
    # the ablation: the same candidates chosen by the joint head, two frozen-feature heads, confidence, majority
    ablation = metrics["countdown.ablation"]
    assert list(ablation) == ["sprm (joint)", "orm (frozen)", "true-label head", "confidence", "majority",
                              "oracle (pass@N)"]
    assert set(ablation["majority"]) == {"2", "within_auc"}  # N = 2 only: 4 candidates per problem
    assert ablation["oracle (pass@N)"]["2"] == metrics["countdown.pass@2"]
    assert ablation["sprm (joint)"]["2"] == metrics["countdown.sprm_bon@2"]
    assert (work / "head_outcome_bce" / "final" / "score_module.pt").is_file()
    assert "Ablation on countdown" in (out / "report.md").read_text()

    # second run: the cached checkpoint is reused (no training), same records for the same seed
    capsys.readouterr()
    saved = json.loads((work / "metrics.json").read_text())
    saved["summary"] = {"aha.diff_prob_last": -1.0}  # a cache from an older version: keys come from metrics.jsonl
    (work / "metrics.json").write_text(json.dumps(saved))
    trained_at = (work / "metrics.json").stat().st_mtime_ns
    cached_at = {name: (work / name).stat().st_mtime_ns for name in ("train.pt", "heldout.pt")}
    again = run_demo(cfg)
    assert {name: (work / name).stat().st_mtime_ns for name in cached_at} == cached_at  # the rollouts are reused
    assert again["sprm_task"] == "countdown" and again["aha.diff_prob_last"] == metrics["aha.diff_prob_last"]
    assert "training the tiny" not in capsys.readouterr().out
    assert again["arith.pass@4"] == metrics["arith.pass@4"]
    assert (work / "metrics.json").stat().st_mtime_ns == trained_at  # the reflective model is reused
    assert again["countdown.sprm_bon@4"] == metrics["countdown.sprm_bon@4"]


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="DemoConfig.n=0"):
        DemoConfig(n=0)
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).temperature=-0.5"):
        DemoTask("arith", temperature=-0.5)
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).temperature=nan"):  # not first refused by the sampler
        DemoTask("arith", temperature=float("nan"))
    with pytest.raises(ValueError, match="DemoConfig.sweep_problems=-1"):
        DemoConfig(sweep_problems=-1)
    with pytest.raises(ValueError, match="unknown task 'chess'; valid: arith, countdown"):
        DemoTask("chess")
    with pytest.raises(ValueError, match="sweep_scorer='oracle'; valid: confidence, sprm"):
        DemoTask("arith", sweep_scorer="oracle")
    with pytest.raises(ValueError, match="sweep_scorer='sprm' needs a reflective stage"):
        DemoTask("arith", sweep_scorer="sprm")
    # the stages' task defaults to countdown: an arith demo trained its head on countdown rollouts
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).sprm trains on task 'countdown': give SPRMStage\(task='arith'\)"):
        DemoTask("arith", sprm=SPRMStage())
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).reflective trains on task 'countdown': give ReflectiveStage"):
        DemoTask("arith", reflective=ReflectiveStage())
    # another difficulty reached SFT and the table only: the stages and the sweep drew default problems
    from experiments.tasks.arith import ArithConfig

    harder = ArithConfig(min_ops=5, max_ops=6)
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).config is another difficulty .* leave the stage out"):
        DemoTask("arith", config=harder, reflective=ReflectiveStage("arith"))
    with pytest.raises(ValueError, match=r"DemoTask\(arith\).config is another difficulty .* give sweep_problems=0"):
        DemoConfig(tasks=(DemoTask("arith", config=harder),))
    DemoConfig(tasks=(DemoTask("arith", config=harder),), sweep_problems=0)
    DemoConfig(tasks=(DemoTask("arith", config=ArithConfig(), reflective=ReflectiveStage("arith")),))  # the default


def test_sprm_task_prefers_the_configured_task_and_falls_back_to_the_last_staged():
    from experiments.demo import TaskRun, sprm_task_metrics
    from experiments.demo_report import TaskOutcomes

    def run(task: str, extra: dict) -> TaskRun:
        return TaskRun(TaskOutcomes(task, [], [], [], {}, extra=extra), None, "", {})

    arith = run("arith", {"arith.aha.diff_prob_first": 0.01, "arith.aha.diff_prob_last": 0.2})
    countdown = run("countdown", {"countdown.aha.diff_prob_first": 0.02, "countdown.aha.diff_prob_last": 0.6})
    plain = run("countdown", {})
    assert sprm_task_metrics([countdown, arith], "countdown") == {
        "sprm_task": "countdown", "aha.diff_prob_first": 0.02, "aha.diff_prob_last": 0.6}
    assert sprm_task_metrics([arith, plain], "countdown")["sprm_task"] == "arith"  # countdown without a stage
    assert sprm_task_metrics([plain], "countdown") == {}


def test_default_demo_trains_a_reflective_model_on_both_embedded_tasks():
    tasks = {t.name: t for t in DemoConfig().tasks}
    assert tasks["arith"].reflective.task == "arith" and tasks["countdown"].reflective.task == "countdown"
    assert tasks["arith"].reflective.tune.reference_solutions == 1  # arith has one solution per problem
    assert tasks["countdown"].sweep_scorer == "sprm" and tasks["arith"].sweep_scorer == "confidence"
    with pytest.raises(ValueError, match="ReflectiveStage\\(task='gsm8k'\\).*arith.*countdown"):
        ReflectiveStage("gsm8k")


def test_demo_command_line_picks_tasks_and_temperature():
    cfg = parse_args(["--tasks", "countdown", "--temperature", "0.9", "--sweep-problems", "0"])
    assert [t.name for t in cfg.tasks] == ["countdown"] and cfg.tasks[0].sampling_temperature == 0.9
    assert cfg.tasks[0].max_total_tokens == 128 and cfg.sweep_problems == 0
    assert parse_args([]).tasks[0].sampling_temperature == 0.6


def test_mcts_is_matched_only_to_a_best_of_n_of_the_same_sweep(tmp_path):
    from experiments.demo_sweep import SweepSpec, run_overrides, token_budgets

    with pytest.raises(ValueError, match="not best_of_n"):  # nothing to match: refused when asked to match
        SweepSpec(out_dir=tmp_path / "empty", checkpoint="ckpt", strategies=("mcts",))
    alone = SweepSpec(out_dir=tmp_path / "empty", checkpoint="ckpt", strategies=("mcts",), match_tokens=False)
    assert token_budgets(alone, "mcts") == {}  # N simulations, no token budget
    assert not any(o.startswith("search.token_budget") for o in run_overrides(alone, "mcts", 8))
    matched = run_overrides(alone, "mcts", 8, token_budget=230)
    assert "search.token_budget=230" in matched and "search.iterations=128" in matched


def test_demo_command_line_errors_are_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    import experiments.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran before its inputs were checked"))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        (["--tasks", "chess"], "unknown task 'chess'"),
        (["--n", "0"], "DemoConfig.n=0"),
        (["--temperature", "nan"], "temperature=nan must be a finite number >= 0"),  # refused only when sampling began
        (["--temperature", "inf"], "temperature=inf must be a finite number >= 0"),  # after the reflective stage
        (["--tasks", "arith,arith"], "--tasks 'arith,arith' names arith more than once"),  # ran it twice
        (["--out-dir", str(a_file)], f"--out-dir {a_file}: {a_file} is a file"),
        (["--out-dir", str(a_file / "demo")], f"{a_file} is a file"),
        (["--checkpoints", str(a_file)], f"--checkpoints {a_file}: {a_file} is a file"),
        # countdown's test split holds 2325: refused after its SFT stage, or after all but the sweep
        (["--tasks", "countdown", "--problems", "3000", "--out-dir", str(tmp_path / "d")],
         "--problems 3000: countdown: count=3000: the test split of CountdownConfig("),
        (["--tasks", "countdown", "--sweep-problems", "2400", "--out-dir", str(tmp_path / "d")],
         "--sweep-problems 2400: countdown: count=2400: the test split of CountdownConfig("),
    ]
    for argv, message in cases:
        assert demo.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def caches(folder: Path) -> tuple[Path, Path, Path]:
    """(head folder, a train cache, a held-out cache of other problems) in folder."""
    from experiments.rollout_cache import save_cache
    from test_train_head import held_out, synthetic_cache

    cache = synthetic_cache([True, False] * 4, 2, [1] * 8)
    return folder / "head", save_cache(cache, folder / "train.pt"), save_cache(held_out(cache), folder / "test.pt")


def model_marks(folder: Path, head: str = "a head") -> None:
    """The files of a saved reflective model (config, weights, tokenizer, score_module.pt) with
    stand-in contents: what the demo's "done" checks look for."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / "score_module.pt").write_text(head)


def finished_head_run(head: Path, cfg: Any, train: Path, test: Path) -> None:
    """A head run's marks as `run_head_training` leaves them: final/ and metrics.json."""
    from experiments.rollout_cache import labels_version, load_cache

    model_marks(head / "final")
    (head / "metrics.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "train_cache": str(train), "test_cache": str(test),
         "train_spec": load_cache(train).spec, "test_spec": load_cache(test).spec,
         "policy_fingerprint": load_cache(train).policy_fingerprint,
         "labels_version": labels_version(load_cache(train).task)}))


def test_a_head_is_trained_again_when_its_cache_was_rebuilt_in_place(tmp_path, monkeypatch):
    """cached_rollouts rebuilds train.pt at the same path for another spec (--checkpoints other:
    another policy's rollouts): a head trained on the old rollouts is not reused."""
    import experiments.demo_sprm as demo_sprm
    from experiments.rollout_cache import load_cache, save_cache
    from scorers.head_training import HeadTrainConfig

    head, train, test = caches(tmp_path)
    cfg = HeadTrainConfig(labels="outcome_bce", steps=3)
    finished_head_run(head, cfg, train, test)
    assert demo_sprm._trained_with(head, cfg, train, test)
    rebuilt = load_cache(train)
    save_cache(dataclasses.replace(rebuilt, spec={**rebuilt.spec, "policy_dir": "other"}), train)
    assert not demo_sprm._trained_with(head, cfg, train, test)
    save_cache(rebuilt, train)
    assert demo_sprm._trained_with(head, cfg, train, test)
    # a head trained before arith's labels changed (its metrics name no labels_version): trained again
    metrics = json.loads((head / "metrics.json").read_text())
    (head / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "labels_version"}))
    assert not demo_sprm._trained_with(head, cfg, train, test)
    (head / "metrics.json").write_text(json.dumps(metrics))
    # the same spec read again from the policy trained again in its folder (other weights)
    save_cache(dataclasses.replace(rebuilt, policy_fingerprint="other weights"), train)
    assert not demo_sprm._trained_with(head, cfg, train, test)
    save_cache(rebuilt, train)
    assert demo_sprm._trained_with(head, cfg, train, test)
    (head / "final" / "model.safetensors").unlink()  # a head folder that lost a file: reused, then failed on every rerun
    assert not demo_sprm._trained_with(head, cfg, train, test)
    monkeypatch.setattr(demo_sprm, "run_head_training", lambda *args: {"retrained": True})
    assert demo_sprm.train_head_once(train, test, cfg, head) == {"retrained": True}


def test_a_head_run_stopped_before_its_head_is_saved_is_not_taken_for_done(tmp_path, monkeypatch):
    """train_head writes metrics.json, then final/: Ctrl-C between the two must not leave the new
    config's metrics.json vouching for the old config's head."""
    import experiments.demo_sprm as demo_sprm
    from scorers.head_training import HeadTrainConfig

    head, train, test = caches(tmp_path)
    old, new = HeadTrainConfig(labels="spr", steps=3), HeadTrainConfig(labels="outcome_bce", steps=3)

    def finished_run(cfg):
        finished_head_run(head, cfg, train, test)

    def stopped_after_metrics_json(train_path, test_path, cfg, out_dir):
        (out_dir / "metrics.json").write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "train_cache": str(train_path), "test_cache": str(test_path)}))
        raise KeyboardInterrupt

    finished_run(old)
    assert demo_sprm.train_head_once(train, test, old, head)["config"]["labels"] == "spr"  # reused
    monkeypatch.setattr(demo_sprm, "run_head_training", stopped_after_metrics_json)
    with pytest.raises(KeyboardInterrupt):
        demo_sprm.train_head_once(train, test, new, head)
    assert not demo_sprm._trained_with(head, new, train, test)  # the head there is not the new config's


def test_a_reflective_run_stopped_after_saving_its_model_is_not_taken_for_the_older_run(tmp_path, monkeypatch):
    """model/ is saved before metrics.json, the completion mark: an older config's mark must not
    survive into a new run, or a stop between the two pairs it with the new model."""
    import types

    import experiments.demo_reflective as dr

    policy, work = tmp_path / "policy", tmp_path / "work"
    work.mkdir()
    older, newer = ReflectiveStage(eval_every=150), ReflectiveStage(eval_every=100)
    model_marks(work / "model", "the older model")
    (work / "metrics.jsonl").write_text("")
    monkeypatch.setattr(dr, "weights_fingerprint", lambda folder: "the policy's weights")
    mark = {"config": dr._config(older), "policy_dir": str(policy), "policy_fingerprint": "the policy's weights"}
    (work / "metrics.json").write_text(json.dumps(mark))  # written before its task's grader had a version
    assert dr._trained(work, older, policy) is None  # trained on an older grader's outcomes: trained again
    (work / "metrics.json").write_text(json.dumps({**mark, "labels_version": dr.labels_version(older.task)}))
    assert dr._trained(work, older, policy) is not None
    for lost in ("metrics.jsonl", "model/model.safetensors"):  # reused, then "no such file" on every rerun
        content = (work / lost).read_bytes()
        (work / lost).unlink()
        assert dr._trained(work, older, policy) is None
        (work / lost).write_bytes(content)
    monkeypatch.setattr(dr, "weights_fingerprint", lambda folder: "the policy trained again in place")
    assert dr._trained(work, older, policy) is None  # its reflective model is another one too
    monkeypatch.setattr(dr, "weights_fingerprint", lambda folder: "the policy's weights")

    class StoppedAfterSaving:  # the new model lands in model/, then Ctrl-C
        def __init__(self, *args, **kwargs):
            pass

        def save_pretrained(self, out_dir, tokenizer):
            (out_dir / "score_module.pt").write_text("the newer model")
            raise KeyboardInterrupt

    lm = types.SimpleNamespace(eval=lambda: lm)
    for name, fake in {"load_checkpoint": lambda path: (lm, None), "ReflectiveModel": StoppedAfterSaving,
                       "FeatureReader": lambda *a, **k: types.SimpleNamespace(pad_id=0),
                       "load_cache": lambda path: None, "cache_problems": lambda cache: [],
                       "rollout_examples": lambda *a: [], "solution_examples": lambda *a: [],
                       "heldout_evaluator": lambda *a: None, "train": lambda *a, **k: []}.items():
        monkeypatch.setattr(dr, name, fake)
    with pytest.raises(KeyboardInterrupt):
        dr.train_reflective(newer, policy, tmp_path / "train.pt", tmp_path / "heldout.pt", work, progress=False)
    assert dr._trained(work, older, policy) is None  # model/ holds the newer run's model now


def test_a_rerun_whose_sweep_settings_differ_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """Each sweep run refuses another config only when reached, after training and sampling: the
    demo checks the sweep folders' settings (sweep.json) first."""
    import experiments.demo as demo
    from experiments.demo_sweep import SWEEP_STAMP, _identity, check_sweep_folder

    out = tmp_path / "demo"
    first = demo.sweep_spec(parse_args(["--out-dir", str(out)]), DemoConfig().tasks[0])
    first.out_dir.mkdir(parents=True)
    (first.out_dir / SWEEP_STAMP).write_text(json.dumps(_identity(first)))
    other = demo.sweep_spec(parse_args(["--out-dir", str(out), "--seed", "1"]), DemoConfig().tasks[0])
    check_sweep_folder(other)  # no run has written a row yet (one failed at once on bad input): not binding
    (first.out_dir / "run").mkdir()
    (first.out_dir / "run" / "records.jsonl").write_text('{"problem_id": "p0"}\n')
    check_sweep_folder(first)  # the same settings: resumed
    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran before its sweep folders were checked"))
    assert demo.main(["--out-dir", str(out), "--seed", "1", "--sweep-problems", "50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {first.out_dir} holds a strategy sweep of other settings") and len(err.splitlines()) == 1
    assert "problems: 100 -> 50" in err and "seed: 0 -> 1" in err


def test_a_sweep_of_a_reflective_model_trained_from_another_policy_is_refused(tmp_path, monkeypatch, capsys):
    """Countdown's sweep runs the reflective model at one path whatever it was trained from; with
    --checkpoints other that model is trained again in place, so its old sweep is refused up front
    (made_from), not reused as the new model's. A sweep saved before made_from existed resumes."""
    import experiments.demo as demo
    from experiments.demo_sweep import SWEEP_STAMP, _identity, check_sweep_folder

    out = tmp_path / "demo"
    countdown = next(t for t in DemoConfig().tasks if t.sweep_scorer == "sprm")
    first = demo.sweep_spec(parse_args(["--out-dir", str(out), "--checkpoints", str(tmp_path / "a")]), countdown)
    assert first.made_from["policy_dir"] == str(tmp_path / "a" / f"tiny-{countdown.name}" / "final")
    first.out_dir.mkdir(parents=True)
    (first.out_dir / SWEEP_STAMP).write_text(json.dumps(_identity(first)))
    (first.out_dir / "run").mkdir()
    (first.out_dir / "run" / "records.jsonl").write_text('{"problem_id": "p0"}\n')
    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran before its sweep folders were checked"))
    args = ["--out-dir", str(out), "--checkpoints", str(tmp_path / "b"), "--tasks", countdown.name]
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {first.out_dir} holds a strategy sweep of other settings (made_from: ")
    legacy = {key: value for key, value in _identity(first).items() if key != "made_from"}
    (first.out_dir / SWEEP_STAMP).write_text(json.dumps(legacy))
    check_sweep_folder(demo.sweep_spec(parse_args(["--out-dir", str(out), "--checkpoints", str(tmp_path / "b")]), countdown))


def test_sweep_folders_with_commas_equals_or_quotes_reach_hydra_as_written(tmp_path, monkeypatch, capsys):
    """--out-dir runs,v2 failed the sweep (Hydra: "Ambiguous value for argument") after every
    other stage; a folder no override can write is refused before anything runs."""
    import experiments.demo as demo
    from hydra import compose, initialize_config_dir

    from experiments.demo_sweep import SweepSpec, run_overrides
    from experiments.search import CONFIG_DIR

    for name in ("runs,v2", "a=b", "it's", "two words"):
        spec = SweepSpec(out_dir=tmp_path / name / "sweep", checkpoint=str(tmp_path / name / "ckpt"), problems=3)
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("search", overrides=run_overrides(spec, "best_of_n", 4))
        assert (cfg.out_dir, cfg.policy.path) == (str(spec.out_dir / "best_of_n_4"), spec.checkpoint)
    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran before its inputs were checked"))
    assert demo.main(["--out-dir", str(tmp_path / "back\\slash")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out-dir {tmp_path / 'back'}") and "cannot be passed to the sweep's Hydra runs" in err


def test_the_sweep_searches_the_demo_tables_first_problems_at_any_seed(tmp_path):
    """The demo draws its problems with --seed; the sweep's task.seed stayed 0, so at --seed 1
    only 3 of its 100 problems were the table's."""
    from hydra import compose, initialize_config_dir

    from experiments.demo_sweep import SweepSpec, run_overrides
    from experiments.search import CONFIG_DIR, load_task
    from experiments.tasks import arith

    spec = SweepSpec(out_dir=tmp_path / "sweep", checkpoint="ckpt", problems=3, seed=1)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        _, swept = load_task(compose("search", overrides=run_overrides(spec, "best_of_n", 4)).task)
    table = arith.generate_problems("test", 5, 1, DemoConfig().tasks[0].task_config)  # as run_task draws them
    assert [p.id for p in swept] == [p.id for p in table[:3]]


def test_the_ablation_table_is_a_table_at_any_n():
    # --n 1: every ablation size (2, 8, 32) exceeds the candidates; the header had 3 cells over a
    # 2-cell separator, which markdown does not render as a table
    from experiments.demo_ablation import ablation_markdown, ablation_rows
    from experiments.metrics import CandidateOutcome, ProblemOutcome

    def outcomes(n: int) -> list[ProblemOutcome]:
        return [ProblemOutcome(f"p{i}", tuple(CandidateOutcome(str(j), j == i % n, 0.1 * j) for j in range(n)))
                for i in range(4)]

    for n, columns in ((1, 2), (2, 3), (8, 4)):
        table = ablation_markdown(ablation_rows(outcomes(n), {"sprm (joint)": outcomes(n)}, (2, 8, 32))).splitlines()
        assert all(line.count("|") == columns + 1 for line in table), table
        assert table[1] == "|---|" + "---|" * (columns - 1)
    assert ablation_markdown(ablation_rows(outcomes(2), {}, (2,))).splitlines()[0] == "| selection | N = 2 | within-problem AUC |"
