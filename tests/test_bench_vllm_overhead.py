"""The engine-overhead benchmark on the vLLM backend (`experiments.bench_vllm_overhead`): its
clock around `LLM.generate` on a scripted engine, and a tiny run through real vLLM on a random
tiny policy (the trained one missing) that prints both strategies with consistent shares.

    .venv/bin/pytest tests/test_bench_vllm_overhead.py
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from experiments.bench_timing import GenerateClock
from test_bench_perf import table_rows
from vllm_fixtures import require_vllm


class SlowEngine:
    """generate() takes 0.03 s; block_size is an engine attribute the policy may read."""

    block_size = 32

    def generate(self, prompts, params, **kwargs):
        time.sleep(0.03)
        return [f"out {p}" for p in prompts]


def test_generate_clock_times_generate_only_and_puts_the_engine_back():
    engine = SlowEngine()
    policy = SimpleNamespace(llm=engine)
    with GenerateClock(policy) as clock:
        assert policy.llm.generate(["a", "b"], None, use_tqdm=False) == ["out a", "out b"]
        assert policy.llm.block_size == 32  # other attributes pass through
        time.sleep(0.03)  # outside generate: not counted
        policy.llm.generate(["c"], None)
    assert policy.llm is engine
    assert clock.calls == 2
    assert 0.05 <= clock.seconds < 0.09


def test_generate_clock_counts_a_call_that_raises():
    class Broken:
        def generate(self, *args, **kwargs):
            raise RuntimeError("engine died")

    policy = SimpleNamespace(llm=Broken())
    with pytest.raises(RuntimeError, match="engine died"), GenerateClock(policy) as clock:
        policy.llm.generate([], None)
    assert clock.calls == 1 and isinstance(policy.llm, Broken)


@pytest.mark.vllm
def test_tiny_run_through_vllm_prints_both_strategies(tmp_path, one_thread):
    require_vllm()
    from experiments import bench_vllm_overhead

    text = bench_vllm_overhead.run("tiny", tmp_path / "missing", problems=2, n=4, beam_width=2, seed=0, threads=1)
    assert "served by vLLM" in text and "random tiny Llama" in text
    rows = table_rows(text, "| strategy |")
    assert set(rows) == {"best_of_n", "beam_search"}
    for cells in rows.values():
        calls = int(cells[2])
        in_generate, backend, search, outside, outside_cpu = (float(c.rstrip("%")) for c in cells[4:9])
        assert calls >= 1
        assert in_generate > 0 and backend >= 0 and search >= 0
        assert in_generate + backend + search == pytest.approx(100.0, abs=0.2)
        assert outside == pytest.approx(backend + search, abs=0.2)
        assert cells[9] == ("met" if outside_cpu <= 5.0 else "not met")
