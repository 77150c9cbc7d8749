"""Smoke runs of the benchmark scripts at a tiny size (a random tiny Llama: no checkpoint)."""
from __future__ import annotations

import re
import statistics

import pytest
import torch

from experiments import bench_scoring_overhead


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.slow
def test_scoring_overhead_table(tmp_path):
    table = bench_scoring_overhead.run(tmp_path / "no-checkpoint", problems=2, n=2, repeats=1, seed=0)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()[3:]}
    assert set(rows) == {"none", "in_gen", "second"}
    forwarded = {name: int(cells[2]) for name, cells in rows.items()}
    assert rows["none"][3].strip() == "1.000" and rows["none"][4].strip() == "1.000"  # wall and CPU / none
    assert forwarded["in_gen"] == forwarded["none"]  # scoring in generation forwards nothing extra
    assert forwarded["second"] > forwarded["none"]   # the reference's way forwards every candidate again


@pytest.mark.slow
def test_batching_table(tmp_path):
    from experiments import bench_batching

    from experiments.bench_workload import load_workload

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    table = bench_batching.run(work, n=2, beam_width=1, seed=0, rounds=2)
    lines = table.splitlines()
    assert lines[0].endswith("; medians of 2 interleaved rounds")
    rows = [line.split("|")[1:-1] for line in lines[3:6]]
    assert [r[0].strip() for r in rows] == [
        "one problem at a time", "all problems batched (lockstep rounds)", "continuous batching (a thread per problem)"]
    assert rows[0][2] == rows[1][2] == rows[2][2]  # same accuracy: batching changes no choice here
    single, batched, continuous = (r[6].strip() for r in rows)  # "mean / median (full)" rows per decode forward
    assert single.endswith("(2)") and batched.endswith("(4)") and continuous.endswith("(4)")
    assert 0 < float(single.split(" / ")[0]) <= 2 and 0 < float(batched.split(" / ")[0]) <= 4
    assert lines[6].startswith("continuous batching: ")
    assert re.search(r"2 of 2 problems have the same candidates as one at a time \(lockstep batching, which draws "
                     r"other samples: [0-2]\)$", lines[6])
    assert re.fullmatch(r"same accuracy as one at a time: batched yes \(.*\); continuous yes \(.*difference \+0\.000.*\)", lines[7])
    per_round = lines[8].removeprefix("speed-up (wall) per round: lockstep ").split("; continuous ")
    assert [len(part.split(", ")) for part in per_round] == [2, 2]  # one ratio per round, each run's
    median = statistics.median(float(x.rstrip("x")) for x in per_round[0].split(", "))
    assert float(rows[1][3]) == pytest.approx(median, abs=0.006)  # the table's speed-up: their median


def test_the_batching_accuracy_check_reads_the_interval_of_two_draws():
    from experiments.bench_batching import accuracy_check

    # 64 problems at 0.234 and 0.219: +-0.145, one problem's difference is noise
    assert accuracy_check("batched", 14 / 64, 15 / 64, 64) == (
        "batched yes (0.219 vs 0.234, difference -0.016, interval +-0.145)")
    assert accuracy_check("batched", 0.1, 0.5, 64).startswith("batched NO (0.100 vs 0.500")
    assert accuracy_check("continuous", 1.0, 1.0, 4).startswith("continuous yes")  # no spread, no difference
    assert accuracy_check("continuous", 0.75, 1.0, 4).startswith("continuous yes")


def test_batching_needs_a_round():
    from experiments import bench_batching

    with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
        bench_batching.run(None, n=2, beam_width=1, seed=0, rounds=0)


def test_the_prefill_count_takes_one_token_prefills_and_no_decode_forward():
    # with reuse, a context cached but for the token sampled last is prefilled one token wide:
    # those went uncounted (7-15% of the reuse side's prefill), as decode forwards are
    from experiments.bench_prefix_reuse import PrefillCounter
    from policies.decode_loop import prefill
    from test_transformers_policy import make_model

    model, counter = make_model(16), PrefillCounter()
    handle = model.register_forward_pre_hook(counter.count, with_kwargs=True)
    try:
        with torch.no_grad():
            prefill(model, [[5], [3, 4, 6]], 0, torch.device("cpu"))
            assert counter.tokens == 4  # 1 + 3, the pad column not counted
            cache, _, mask, position, _ = prefill(model, [[5], [6]], 0, torch.device("cpu"))  # one token wide
            assert counter.tokens == 6
            model(input_ids=torch.tensor([[7], [8]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], -1),
                  position_ids=position[:, None], past_key_values=cache, use_cache=True)  # a decode step
    finally:
        handle.remove()
    assert counter.tokens == 6


@pytest.mark.slow
def test_prefix_reuse_table_matches_mcts_to_beam_tokens(tmp_path, monkeypatch, capsys):
    from experiments import bench_prefix_reuse

    monkeypatch.setattr("experiments.bench_workload.DEFAULT_CHECKPOINT", tmp_path / "none")  # untrained: a random model
    monkeypatch.setattr("sys.argv", ["bench_prefix_reuse", "--problems", "2"])
    monkeypatch.setitem(bench_prefix_reuse.STRATEGIES, "beam_search", dict(n=4, beam_width=2, max_depth=3))
    monkeypatch.setitem(bench_prefix_reuse.STRATEGIES, "mcts", dict(iterations=64, expand_width=2, leaves_per_round=2, max_depth=3))
    for name in ("rebase", "particle_filtering"):
        monkeypatch.setitem(bench_prefix_reuse.STRATEGIES, name, dict(n=4, max_depth=3))
    bench_prefix_reuse.main()
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (name, reuse) for name in ("beam_search", "mcts", "rebase", "particle_filtering") for reuse in ("off", "on")]
    for off, on in zip(rows[::2], rows[1::2]):  # the same work, fewer tokens forwarded with reuse
        assert int(on[2]) > 0 and int(on[3]) <= int(off[3])
        assert 0 < int(on[5]) <= int(off[5]) <= int(off[3])  # the context prefilled: part of what was forwarded
    mcts_off, mcts_on = rows[2], rows[3]  # MCTS revisits its own prefixes even on this small run: reuse must show
    assert int(mcts_on[3]) < int(mcts_off[3]) and int(mcts_on[5]) < int(mcts_off[5])
    budget = int(out.split("MCTS token_budget: ")[1].split()[0])
    beam_tokens = int(rows[0][2])
    assert budget == -(-beam_tokens // 2)  # ceil of the uncached beam search's tokens per problem


@pytest.mark.slow
def test_shared_prefix_table_compares_both_ways_on_the_same_work(tmp_path):
    from experiments import bench_shared_prefix
    from experiments.bench_workload import load_workload

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    table = bench_shared_prefix.run(work, n=4, beam_width=2, rounds=1, seed=0)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("best_of_n", "shared prefix"), ("best_of_n", "copied rows"),
        ("beam_search", "shared prefix"), ("beam_search", "copied rows"),
    ]
    assert rows[0][4] == rows[2][4] == "1.00x"  # each strategy's ratio is against its shared run
    for shared, copied in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert int(shared[5]) > 0 and abs(int(shared[5]) - int(copied[5])) <= int(shared[5]) // 10  # same work


@pytest.mark.slow
def test_forked_table_compares_both_ways_on_the_same_work(tmp_path):
    from experiments import bench_forked
    from experiments.bench_workload import load_workload

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    table = bench_forked.run(work, n=4, beam_width=2, rounds=1, seed=0)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("best_of_n", "forked"), ("best_of_n", "every row alone"),
        ("beam_search", "forked"), ("beam_search", "every row alone"),
    ]
    assert rows[0][4] == rows[2][4] == "1.00x"  # each strategy's ratio is against its forked run
    for forked, alone in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert int(forked[5]) > 0 and abs(int(forked[5]) - int(alone[5])) <= int(forked[5]) // 10  # same work


@pytest.mark.slow
def test_widths_table_runs_rebase_and_particle_filtering_both_ways(tmp_path):
    from experiments import bench_widths
    from experiments.bench_workload import load_workload
    from treesearch.protocols import WidthPolicy

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    assert isinstance(work.policy(), WidthPolicy) and not isinstance(bench_widths.ProposeOnly(work.policy()), WidthPolicy)
    table = bench_widths.run(work, n=6, beam_width=4, rounds=1, seed=0)
    assert "N=6;" in table.splitlines()[0] and "beam width" not in table.splitlines()[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("rebase", "one call per round"), ("rebase", "one call per width"),
        ("particle_filtering", "one call per round"), ("particle_filtering", "one call per width"),
    ]
    assert rows[0][4] == rows[2][4] == "1.00x" and all(int(r[5]) > 0 for r in rows)
    # policy calls per problem (the ways draw different samples, so their depths, and calls, may differ)
    assert table.splitlines()[1].endswith("| policy calls / problem |")
    assert all(float(r[9]) >= 1 for r in rows)


@pytest.mark.slow
def test_dtype_table_runs_each_strategy_in_both_dtypes(tmp_path):
    from experiments import bench_dtype
    from experiments.bench_workload import load_workload

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    table = bench_dtype.run(work, n=4, beam_width=2, rounds=1, seed=0)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("best_of_n", "float32"), ("best_of_n", "bfloat16"), ("beam_search", "float32"), ("beam_search", "bfloat16"),
    ]
    assert rows[0][4] == rows[0][7] == rows[2][4] == rows[2][7] == "1.00x"  # ratios against float32
    assert all(int(r[5]) > 0 and float(r[6]) > 0 for r in rows)
    assert next(work.lm.parameters()).dtype == torch.float32  # the workload's model is left as it was


def test_bench_dtype_skips_bf16_without_bf16_matmuls(monkeypatch, capsys):
    from experiments import bench_dtype

    monkeypatch.setattr(bench_dtype, "native_bf16", lambda: False)
    monkeypatch.setattr(bench_dtype, "load_workload", lambda *a, **k: pytest.fail("nothing is timed"))
    bench_dtype.main([])
    assert capsys.readouterr().out.strip() == bench_dtype.SKIPPED


@pytest.mark.slow
def test_merged_scorer_table_counts_fewer_prm_calls_for_the_same_paths(tmp_path):
    from experiments import bench_merged_scorer
    from experiments.bench_workload import load_workload
    from tiny_checkpoint import save_tiny_checkpoint
    from treesearch.beam_search import BeamSearchConfig

    work = load_workload("tiny", problems=8, seed=0, checkpoint=tmp_path / "no-checkpoint")
    prm = save_tiny_checkpoint(tmp_path / "prm")
    cfg = BeamSearchConfig(n=4, beam_width=2, max_depth=3)
    report = bench_merged_scorer.run(work, prm, "math_shepherd", batch_size=8, cfg=cfg, rounds=2)
    assert "beam search N = 4, M = 2" in report and "medians of 2 interleaved rounds" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in report.splitlines()[4:]}
    assert list(rows) == list(bench_merged_scorer.WAYS)
    merged, alone = rows["merged calls"], rows["a call per thread"]
    # the same paths are scored: calls x paths per call agree; one thread's call per problem and round
    assert round(int(merged[0]) * float(merged[1])) == round(int(alone[0]) * float(alone[1])) > 0
    assert 0 < int(merged[0]) <= int(alone[0]) and alone[4] == "1.00"
    # a start that problems share may be forwarded once when their calls merge; the choices may
    # differ only by float rounding at a near-tie (which calls merged depends on timing)
    assert 0 < int(merged[2]) <= int(alone[2]) and alone[7] == "8/8" and merged[7].endswith("/8")


@pytest.mark.slow
def test_prm_prefix_table_scores_the_same_paths_every_way(tmp_path):
    from experiments import bench_prm_prefix
    from experiments.bench_workload import load_workload
    from tiny_checkpoint import save_tiny_checkpoint

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    prm = save_tiny_checkpoint(tmp_path / "prm")
    report = bench_prm_prefix.run(work, prm, "math_shepherd", batch_size=4, n=4, beam_width=2, seed=0, rounds=2)
    assert "beam search N = 4, M = 2" in report and "medians of 2 interleaved rounds" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in report.splitlines()[4:]}
    assert list(rows) == ["memory + shared starts", "shared starts", "every path whole"]
    memory, shared, whole = (int(rows[name][0]) for name in rows)
    assert 0 < memory <= shared < whole and rows["every path whole"][1] == "1.00"  # the question at least is shared
    assert all(float(cells[6]) < 1e-4 for cells in rows.values())  # the same scores every way


@pytest.mark.slow
def test_prm_prefix_table_adds_the_prm_on_vllm_with_the_same_scores(tmp_path):
    pytest.importorskip("vllm")
    from experiments import bench_prm_prefix
    from experiments.bench_workload import load_workload
    from policies.tiny_model import TinyModelConfig
    from tiny_checkpoint import save_tiny_checkpoint

    work = load_workload("tiny", problems=2, seed=0, checkpoint=tmp_path / "no-checkpoint")
    shape = TinyModelConfig(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=64)  # heads vLLM's CPU takes
    prm = save_tiny_checkpoint(tmp_path / "prm", shape)
    report = bench_prm_prefix.run(work, prm, "math_shepherd", batch_size=4, n=4, beam_width=2, seed=0, rounds=1,
                                  vllm=True)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in report.splitlines()[4:]}
    assert list(rows)[-1] == "vLLM, every path whole"
    # each distinct path of a call whole: at most every path as asked, more than shared starts
    assert int(rows["shared starts"][0]) < int(rows["vLLM, every path whole"][0]) <= int(rows["every path whole"][0])
    assert float(rows["vLLM, every path whole"][6]) < 1e-4  # the transformers scorer's scores


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux's VmHWM")
def test_a_childs_peak_rss_is_its_own_not_its_parents():
    # ru_maxrss is inherited through subprocess: a parent that had held 1.1 GB made a 386 MiB child report 1148
    import subprocess
    import sys
    from pathlib import Path

    held = bytearray(400 * 2**20)  # touched: resident in this process
    held[:: 4096] = b"x" * len(held[:: 4096])
    code = "from experiments.bench_timing import peak_rss_mib; print(peak_rss_mib())"
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300, child.stdout  # a bare interpreter with torch imported: ~100-250 MiB
    del held
