"""The sweep readers keep runs searched with other weights apart: a policy trained again in place
keeps its `policy.path`, and only the run folder's weights.json (`experiments/run_weights.py`)
says its runs came from other weights; runs without that record pool as before. Also: without
lookahead, beam search's / DVTS's lookahead_temperature splits no series.

    .venv/bin/python -m pytest tests/test_sweep_weights.py
"""
from __future__ import annotations

import json
from pathlib import Path

from experiments import plot as plot_module
from experiments import scaling, sweep_metrics
from experiments.scaling import scaling_by_strategy
from experiments.sweep_metrics import sweep_summaries
from test_scaling import ARITH, write_run

OLD = "7f6135d7b2f5" + "0" * 52  # sha256 fingerprints of the policy before and after training again
NEW = "6ad2a1decb7d" + "1" * 52


def record(folder: Path, **entries: dict) -> None:
    """weights.json as `run_weights.check_run_weights` / `check_served_models` write it."""
    (folder / "weights.json").write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def folder_record(fingerprint: str, path: str = "/tmp/ckpt/final") -> dict:
    return {"path": path, "signature": {"model.safetensors": [1, 2]}, "fingerprint": fingerprint}


def retrained_sweep(root: Path, unrecorded: tuple[str, ...] = ()) -> Path:
    """Best-of-N at N = 4, 8 (seeds 0, 1) with the old weights, then N = 16 after training again
    in place: every run at policy.path=ckpt/final (the runs named in `unrecorded` without weights.json)."""
    for budget, fingerprint, good in ((4, OLD, 2), (8, OLD, 3), (16, NEW, 9)):
        for seed in (0, 1):
            name = f"bon-{budget}-{seed}"
            write_run(root / name, "best_of_n", budget, seed, [i < good for i in range(10)], 10 * budget)
            if name not in unrecorded:
                record(root / name, **{"policy.path": folder_record(fingerprint)})
    return root


def test_runs_of_other_weights_are_separate_workloads_with_a_note(tmp_path, capsys):
    sweep = retrained_sweep(tmp_path)
    runs = {r.run: r.workload for r in sweep_summaries(sweep)}
    old, new = "arith (weights.policy.path=7f6135d7b2f5)", "arith (weights.policy.path=6ad2a1decb7d)"
    assert runs == {"bon-4-0": old, "bon-4-1": old, "bon-8-0": old, "bon-8-1": old, "bon-16-0": new, "bon-16-1": new}
    series = {s.name: s for s in scaling_by_strategy(sweep_summaries(sweep))}
    assert set(series) == {f"best_of_n [{old}]", f"best_of_n [{new}]"}
    assert [p.budget for p in series[f"best_of_n [{old}]"].points] == [4, 8]
    assert [(p.budget, p.runs) for p in series[f"best_of_n [{new}]"].points] == [(16, 2)]

    def note() -> str:
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"note: {sweep} holds runs of 2 workloads (the policy weights recorded in weights.json")
        assert f"{new}: 2 runs; {old}: 4 runs" in line
        return line

    assert sweep_metrics.main([str(sweep)]) == 0
    note()
    rows = json.loads((sweep / "sweep_metrics.json").read_text())
    assert sorted({r["workload"] for r in rows}) == [new, old]
    assert scaling.main([str(sweep)]) == 0
    note()
    saved = json.loads((sweep / "scaling.json").read_text())["series"]
    assert sorted((s["workload"], [p["budget"] for p in s["points"]]) for s in saved) == [(new, [16]), (old, [4, 8])]
    assert plot_module.main(["scaling", str(sweep)]) == 0 and (sweep / "scaling.png").is_file()
    note()


def test_runs_of_the_same_weights_pool_and_their_labels_do_not_show_them(tmp_path, capsys):
    # one fingerprint throughout and a second task.count: the weights split nothing, show nowhere
    same = retrained_sweep(tmp_path / "same")
    for run in ("bon-16-0", "bon-16-1"):
        record(same / run, **{"policy.path": folder_record(OLD)})
    write_run(same / "count4", "best_of_n", 4, 0, [True] * 4, 40, task={**ARITH, "count": 4})
    record(same / "count4", **{"policy.path": folder_record(OLD)})
    runs = sweep_summaries(same)
    assert {r.run: r.workload for r in runs} == {**{f"bon-{n}-{seed}": "arith (task.count=10)" for n in (4, 8, 16) for seed in (0, 1)},
                                                 "count4": "arith (task.count=4)"}
    assert sweep_metrics.main([str(same)]) == 0
    assert "(task / policy configs); each is its own group" in capsys.readouterr().err
    # the retrained runs beside them: the weights now tell the count=10 runs apart, and every label shows them
    for run in ("bon-16-0", "bon-16-1"):
        record(same / run, **{"policy.path": folder_record(NEW)})
    labels = {r.run: r.workload for r in sweep_summaries(same)}
    assert labels["count4"] == "arith (task.count=4, weights.policy.path=7f6135d7b2f5)"
    assert labels["bon-16-0"] == "arith (task.count=10, weights.policy.path=6ad2a1decb7d)"
    assert sweep_metrics.main([str(same)]) == 0
    assert "3 workloads (task / policy configs, and the policy weights recorded in weights.json" in capsys.readouterr().err


def test_runs_without_weights_json_pool_as_before_and_join_the_one_recorded_weights(tmp_path):
    # folders saved before weights.json existed: one workload, seeds pooled
    every = ("bon-4-0", "bon-4-1", "bon-8-0", "bon-8-1", "bon-16-0", "bon-16-1")
    runs = sweep_summaries(retrained_sweep(tmp_path / "none", unrecorded=every))
    assert {r.workload for r in runs} == {"arith"}
    (series,) = scaling_by_strategy(runs)
    assert [(p.budget, p.runs) for p in series.points] == [(4, 2), (8, 2), (16, 2)]
    one = retrained_sweep(tmp_path / "one", unrecorded=("bon-4-0",))
    for run in ("bon-16-0", "bon-16-1"):  # one fingerprint left: the old folder pools with it
        record(one / run, **{"policy.path": folder_record(OLD)})
    runs = sweep_summaries(one)
    assert {r.workload for r in runs} == {"arith"}
    assert [(p.budget, p.runs) for p in scaling_by_strategy(runs)[0].points] == [(4, 2), (8, 2), (16, 2)]
    two = retrained_sweep(tmp_path / "two", unrecorded=("bon-4-0",))  # two fingerprints: which it ran is unknown
    labels = {r.run: r.workload for r in sweep_summaries(two)}
    assert labels["bon-4-0"] == "arith (weights.policy.path=unset)"
    assert labels["bon-4-1"] == "arith (weights.policy.path=7f6135d7b2f5)"


def test_served_policy_runs_pool_by_their_served_model(tmp_path):
    # policy=openai: weights.json holds the local copy's fingerprint and the served model's id;
    # a folder from before the ids were kept joins the one served model of its neighbours
    for seed, model in ((0, "tiny-a"), (1, "tiny-a"), (2, None)):
        write_run(tmp_path / f"openai-{seed}", "best_of_n", 4, seed, [True, False], 40)
        served = {"policy.served_model": {"model": model}} if model else {}
        record(tmp_path / f"openai-{seed}", **{"policy.path": folder_record(OLD)}, **served)
    assert {r.workload for r in sweep_summaries(tmp_path)} == {"arith"}
    write_run(tmp_path / "openai-3", "best_of_n", 4, 3, [True, True], 40)
    record(tmp_path / "openai-3", **{"policy.path": folder_record(OLD), "policy.served_model": {"model": "tiny-b"}})
    labels = {r.run: r.workload for r in sweep_summaries(tmp_path)}
    assert labels["openai-0"] == labels["openai-1"] == "arith (weights.policy.served_model=tiny-a)"
    assert labels["openai-3"] == "arith (weights.policy.served_model=tiny-b)"
    assert labels["openai-2"] == "arith (weights.policy.served_model=unset)"


def test_a_scorer_trained_again_in_place_is_its_own_series(tmp_path):
    head = {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "path": "outputs/heads/arith/final"}
    for seed, fingerprint in ((0, OLD), (1, OLD), (2, NEW)):
        write_run(tmp_path / f"sprm-{seed}", "best_of_n", 4, seed, [True, False], 40, scorer=head)
        record(tmp_path / f"sprm-{seed}", **{"policy.path": folder_record(OLD), "scorer.path": folder_record(fingerprint)})
    runs = sweep_summaries(tmp_path)
    assert {r.workload for r in runs} == {"arith"}
    assert {r.run: r.scorer for r in runs} == {"sprm-0": "SPRMScorer (weights.scorer.path=7f6135d7b2f5)",
                                               "sprm-1": "SPRMScorer (weights.scorer.path=7f6135d7b2f5)",
                                               "sprm-2": "SPRMScorer (weights.scorer.path=6ad2a1decb7d)"}
    series = {s.name: [(p.budget, p.runs) for p in s.points] for s in scaling_by_strategy(runs)}
    assert series == {"best_of_n (SPRMScorer (weights.scorer.path=7f6135d7b2f5))": [(4, 2)],
                      "best_of_n (SPRMScorer (weights.scorer.path=6ad2a1decb7d))": [(4, 1)]}


def test_a_damaged_weights_json_is_an_error_naming_it(tmp_path, capsys):
    sweep = retrained_sweep(tmp_path)
    (sweep / "bon-8-1" / "weights.json").write_text("{not json")
    assert sweep_metrics.main([str(sweep)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {sweep / 'bon-8-1' / 'weights.json'} is not readable")


def test_without_lookahead_its_temperature_splits_no_series(tmp_path):
    # beam / DVTS folders saved before lookahead_temperature existed read as null (ADDED_SETTINGS);
    # the yaml now saves 0.0; with lookahead=0 neither samples anything: one series, seeds pooled
    for strategy in ("beam_search", "dvts"):
        write_run(tmp_path / f"{strategy}-old-0", strategy, 4, 0, [True, False], 40, settings={"lookahead": 0})
        write_run(tmp_path / f"{strategy}-new-1", strategy, 4, 1, [True, True], 40,
                  settings={"lookahead": 0, "lookahead_temperature": 0.0})
        write_run(tmp_path / f"{strategy}-null-8", strategy, 8, 0, [True, True], 80,
                  settings={"lookahead": 0, "lookahead_temperature": None})
        write_run(tmp_path / f"{strategy}-la-4", strategy, 4, 0, [True, True], 40,
                  settings={"lookahead": 1, "lookahead_temperature": 0.5})
    labels = {r.run: r.strategy for r in sweep_summaries(tmp_path)}
    for strategy in ("beam_search", "dvts"):
        assert labels[f"{strategy}-old-0"] == labels[f"{strategy}-new-1"] == labels[f"{strategy}-null-8"]
        assert labels[f"{strategy}-la-4"] != labels[f"{strategy}-old-0"] and "lookahead=1" in labels[f"{strategy}-la-4"]
    series = {s.name: s for s in scaling_by_strategy(sweep_summaries(tmp_path))}
    assert len(series) == 4
    assert [(p.budget, p.runs) for p in series[labels["dvts-old-0"]].points] == [(4, 2), (8, 1)]
    assert [(p.budget, p.runs) for p in series[labels["beam_search-old-0"]].points] == [(4, 2), (8, 1)]
