"""Pins for the benchmark scripts' arithmetic that a mutation review found unpinned elsewhere.

No benchmark is run: each test feeds a table or ratio function fixed inputs (fixed timings, fixed
peaks, monkeypatched clocks and searches), or, for the FLOP counts, one tiny random checkpoint
(`tests/tiny_checkpoint.py`) with every timed repeat replaced by a fixed second. What is pinned:
the training-throughput verdict (>= 0.8 is met); the batching speed-ups (one at a time / other, the
CPU column from CPU seconds) and its ceiling ratio (small / large per row-token); the FLOP formulas
(2 S^3 per matmul, 2PT generation and bare forward with 4 L W keys attention, 6PT training with
3 x 4 L W keys, generation counting the tokens forwarded) and the bf16 peak column; the engine
overhead's phase shares summing to its heading's "outside the forward" and the hotspot table's
self time / unprofiled wall; the scoring-overhead ratios (each row / none); the prefix-reuse
"same choice" and accuracy columns; `make bench`'s vLLM sections where vLLM is installed, its
stderr tail (last lines, last 64 KiB) and Ctrl-C (exit 130, no later section); bench_memory's
growth sign and its docstring command; DecodeRows' median and GenerateClock's CPU seconds.

Run: `.venv/bin/python -m pytest tests/test_bench_pins.py`
"""
from __future__ import annotations

import contextlib
import io
import time
import types

import pytest
import torch

from experiments import bench_all
from experiments.bench_all import Outcome, Section
from experiments.bench_timing import DecodeRows, Timing
from test_bench_perf import table_rows
from tiny_checkpoint import TINY_SHAPE, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- bench_train_throughput -------------------------------------------------------------------


def test_train_throughput_verdict_is_met_at_or_above_the_target():
    from experiments.bench_train_throughput import ThroughputRow, markdown_table

    rows = [ThroughputRow("plain forward + backward", 1.0, 1000, True),
            ThroughputRow("joint half speed", 2.0, 1000, True),      # 0.50 of plain
            ThroughputRow("joint no KL", 1.1, 1000, True),           # 0.91
            ThroughputRow("plain, every prompt", 1.0, 1000, False),
            ThroughputRow("joint, every prompt", 1.25, 1000, False)]  # 0.80: exactly the target
    got = {name: (cells[4], cells[5]) for name, cells in table_rows(markdown_table(rows), "| step |").items()}
    assert got == {
        "plain forward + backward": ("1.00", "-"), "joint half speed": ("0.50", "not met"),
        "joint no KL": ("0.91", "met"), "plain, every prompt": ("1.00", "-"), "joint, every prompt": ("0.80", "met"),
    }


# --- bench_batching ---------------------------------------------------------------------------


class _Engine:
    cohorts_fed, forwards, most_cohorts = 4, 2, 2

    @classmethod
    @contextlib.contextmanager
    def attached(cls, policy):
        yield cls()


def _batching_work():
    from policies.sampling_config import SamplingConfig

    return types.SimpleNamespace(lm=None, problems=(1, 2, 3, 4), sampling=SamplingConfig(batch_size=256),
                                 description="fake", accuracy=lambda results: 0.5, policy=lambda: None)


def test_batching_speed_ups_are_one_at_a_time_over_the_other_wall_and_cpu_apart(monkeypatch):
    from experiments import bench_batching as bb

    timings = {"single": Timing(4.0, 4.0), "batched": Timing(1.0, 2.0), "continuous": Timing(2.0, 8.0)}

    def fake_rounds(lm, configs, rounds):
        configs["continuous"]()  # records its engine
        rows = DecodeRows(None)
        rows.rows = [2]
        return {name: bb._Runs((timings[name],), (), rows) for name in configs}

    monkeypatch.setattr(bb, "ContinuousEngine", _Engine)
    monkeypatch.setattr(bb, "search_each", lambda *a: [])
    monkeypatch.setattr(bb, "beam_search", lambda *a: [])
    monkeypatch.setattr(bb, "_rounds", fake_rounds)
    rows = table_rows(bb.run(_batching_work(), n=2, beam_width=2, seed=0), "| run |")
    # (wall s, speed-up, cpu s, cpu speed-up): 4/1 wall, 4/2 CPU; 4/2 wall, 4/8 CPU
    assert [(c[0], c[2], c[3], c[4]) for c in rows.values()] == [
        ("4.00", "1.00", "4.00", "1.00"), ("1.00", "4.00", "2.00", "2.00"), ("2.00", "2.00", "8.00", "0.50")]


def test_batching_ceiling_is_the_small_batch_time_per_row_over_the_large_batchs(monkeypatch):
    from experiments import bench_batching as bb

    # a bare decode step: 1.0 ms at 2 rows (500 us per row), 1.6 ms at 8 rows (200 us per row)
    monkeypatch.setattr(bb, "decode_step_seconds", lambda lm, rows, group, context: {2: 1.0e-3, 8: 1.6e-3}[rows])
    monkeypatch.setattr(bb, "median_prompt_tokens", lambda work: 20)
    line = bb.ceiling_line(_batching_work(), n=2, beam_width=2)
    assert "500 us per row-token at 2 rows, 200 us at 8 rows" in line
    assert line.endswith("can give at most ~2.50x")


# --- bench_flops ------------------------------------------------------------------------------


def test_a_matmul_peak_counts_two_flops_per_multiply_add():
    from experiments.bench_flops import matmul_peak

    row = matmul_peak(64, torch.float32, 1)
    assert row.flops == 2 * 64**3 and row.tokens == 0 and row.seconds > 0


def test_the_flop_rows_follow_the_documented_formulas(tmp_path, monkeypatch):
    from experiments import bench_flops
    from experiments.bench_flops import causal_keys
    from experiments.bench_train_throughput import load_train_parts
    from policies.transformers_policy import TransformersPolicy

    torch.manual_seed(0)
    parts = load_train_parts(save_tiny_checkpoint(tmp_path / "ckpt"))
    params = sum(p.numel() for p in parts.reflective.lm.parameters())
    layers, width = TINY_SHAPE.layers, TINY_SHAPE.hidden  # heads x head_dim = hidden in the tiny shape
    monkeypatch.setattr(bench_flops, "best_of", lambda fn, repeats: 1.0)  # no timed repeats
    rollouts, counters, batches = [], [], []
    plain_rollout, plain_batch = TransformersPolicy.rollout, bench_flops.rollout_batch
    monkeypatch.setattr(TransformersPolicy, "rollout",
                        lambda self, *a, **k: rollouts.append(plain_rollout(self, *a, **k)) or rollouts[-1])

    class Counter(bench_flops.KeyCounter):
        def __init__(self):
            super().__init__()
            counters.append(self)

    monkeypatch.setattr(bench_flops, "KeyCounter", Counter)
    monkeypatch.setattr(bench_flops, "rollout_batch", lambda *a: batches.append(plain_batch(*a)) or batches[-1])

    gen = bench_flops.generation(parts, problems=2, n=2, seed=0, repeats=1)
    steps = [s for row in rollouts[0] for path in row for s in path]
    forwarded = sum(s.tokens_forwarded for s in steps)
    assert forwarded != sum(s.num_tokens for s in steps)  # the prompts are forwarded, not generated
    assert gen.tokens == forwarded and gen.flops == 2 * params * forwarded
    assert counters[0].keys > 0 and gen.attention_flops == 4 * layers * width * counters[0].keys

    bare = bench_flops.bare_forward(parts.reflective.lm, 2, 8, 1)
    assert bare.tokens == 16 and bare.flops == 2 * params * 16
    assert bare.attention_flops == 4 * layers * width * 2 * causal_keys(0, 8)  # both rows' keys

    train = bench_flops.training_step(parts, 2, 2, 0, 1)
    lengths = batches[0].attention_mask.sum(-1).tolist()
    tokens, keys = int(sum(lengths)), sum(causal_keys(0, int(n)) for n in lengths)
    assert train.tokens == tokens and train.flops == 6 * params * tokens
    assert train.attention_flops == 3 * 4 * layers * width * keys  # forward + backward (2x)


def test_the_flops_table_reads_each_peak_column_against_its_own_peak():
    from experiments.bench_flops import FlopRow, markdown_table

    peak32, peak16 = FlopRow("fp32 peak", 1.0, 0, 1e9), FlopRow("bf16 peak", 1.0, 0, 4e9)
    work = FlopRow("work", 1.0, 10, 2e9, 1e9)  # 2 GFLOP/s, 3 with attention
    rows = table_rows(markdown_table([peak32, peak16, work], peak32, peak16), "| workload |")
    assert rows["work"][4:] == ["200.0%", "50.0%", "3.00", "300.0%"]
    assert rows["bf16 peak"][4:6] == ["400.0%", "100.0%"]


# --- bench_engine_overhead --------------------------------------------------------------------


class _Fixed:
    """A clock context manager that reports fixed attributes."""

    def __init__(self, *args, **fixed):
        self.__dict__.update(fixed)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_the_phase_shares_sum_to_the_headings_outside_the_forward(monkeypatch):
    from experiments import bench_engine_overhead as beo

    # wall 10 s: forward 6 s, policy calls 9 s, phases 1 + 0.5 s: backend rest 1.5 s, search 1 s
    monkeypatch.setattr(beo, "ForwardClock", lambda lm: _Fixed(seconds=6.0))
    monkeypatch.setattr(beo, "PolicyClock", lambda policy: _Fixed(seconds=9.0))
    monkeypatch.setattr(beo, "PhaseClock", lambda phases, forward: _Fixed(
        seconds={"sampling": 1.0, "moving rows": 0.5}, calls={"sampling": 3, "moving rows": 2}))
    monkeypatch.setattr(beo, "timed", lambda fn: Timing(10.0, 10.0))
    work = types.SimpleNamespace(policy=lambda: None, lm=None, problems=[])
    text = beo.phase_table("beam_search", {}, work)
    assert "(wall clock, one more run: 40.0% outside the forward)" in text
    rows = table_rows(text, "| phase |")
    assert [cells[-1] for cells in rows.values()] == ["10.0%", "5.0%", "15.0%", "10.0%"]
    assert rows["rest of the backend (prefill setup, recording tokens, loop tensors)"][0] == "1.500"


def test_the_hotspot_share_is_self_seconds_over_the_unprofiled_wall():
    from experiments.bench_engine_overhead import hotspot_table

    text = hotspot_table("beam_search", 10.0, [("policies/decode_loop.py:120(move_rows)", 0.5)])
    assert text.splitlines()[-1] == "| `policies/decode_loop.py:120(move_rows)` | 0.500 | 5.0% |"


def _hotspot_parent():
    time.sleep(0.2)  # all of this function's time is inside the sleep: its self time is ~0


def test_hotspots_rank_functions_by_self_time_not_cumulative(monkeypatch):
    from experiments import bench_engine_overhead as beo

    monkeypatch.setattr(beo, "run_search", lambda *a, **k: _hotspot_parent())
    work = types.SimpleNamespace(policy=lambda: None, lm=torch.nn.Linear(1, 1), problems=[])
    spots = beo.hotspots("beam_search", {}, work, top=10)
    assert "sleep" in spots[0][0] and spots[0][1] >= 0.15
    parent = [seconds for name, seconds in spots if "_hotspot_parent" in name]
    assert all(seconds < 0.1 for seconds in parent)  # its cumulative 0.2 s is the sleep's


# --- bench_scoring_overhead -------------------------------------------------------------------


def test_scoring_overhead_ratios_are_each_row_over_none(monkeypatch):
    from experiments import bench_scoring_overhead as so
    from policies.tiny_model import build_model
    from policies.tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    monkeypatch.setattr(so, "load_tiny_parts", lambda checkpoint: (build_model(TINY_SHAPE, tokenizer), tokenizer, "tiny"))
    monkeypatch.setattr(so, "_rollout_forwarded", lambda *a: ([], 1))
    fixed = {"none": (Timing(1.0, 1.0), 1000), "in_gen": (Timing(1.02, 1.04), 1000), "second": (Timing(2.0, 3.0), 2500)}
    monkeypatch.setattr(so, "_interleaved", lambda fns, repeats: fixed)
    rows = table_rows(so.run(None, problems=1, n=1, repeats=1, seed=0), "| scoring |")
    assert {name: cells[3:] for name, cells in rows.items()} == {
        "none": ["1.000", "1.000", "1.000"], "in_gen": ["1.020", "1.040", "1.000"], "second": ["2.000", "3.000", "2.500"]}


# --- bench_prefix_reuse -----------------------------------------------------------------------


def test_prefix_reuse_same_choice_compares_the_on_row_with_its_off_row():
    from experiments.bench_prefix_reuse import BenchRow, markdown_table

    off = BenchRow("beam_search", False, 1000, 3000, 2500, 2.0, None, 16.0, 0.5, ("12", "7"))
    same = BenchRow("beam_search", True, 1000, 1200, 700, 1.0, 0.9, 16.0, 0.5, ("12", "7"))
    other = BenchRow("best_of_n", False, 10, 10, 10, 1.0, None, 1.0, 0.5, ("1",))
    other_on = BenchRow("best_of_n", True, 10, 10, 10, 1.0, 0.5, 1.0, 0.5, ("2",))
    lines = markdown_table([off, same, other, other_on]).splitlines()[2:]
    assert [line.rsplit("|", 2)[-2].strip() for line in lines] == ["-", "yes", "-", "no"]


def test_prefix_reuse_accuracy_is_the_share_of_problems_answered_right(monkeypatch):
    from experiments import bench_prefix_reuse as bpr
    from experiments.tasks import arith

    problems = arith.generate_problems("test", 3, seed=0)

    def fake_search(strategy, problems, policy, scorer, **kw):
        out = []
        for i, p in enumerate(problems):  # only the first problem answered right
            candidate = types.SimpleNamespace(text=f"Answer: {p.answer}" if i == 0 else "nonsense")
            out.append(types.SimpleNamespace(problem=p, chosen_candidate=candidate, candidates=[candidate],
                                             compute=types.SimpleNamespace(tokens_generated=10, tokens_forwarded=20)))
        return out

    monkeypatch.setattr(bpr, "run_search", fake_search)
    monkeypatch.setattr(bpr, "TransformersPolicy", lambda *a, **k: types.SimpleNamespace(prefix_cache=None))
    model = types.SimpleNamespace(register_forward_pre_hook=lambda *a, **k: types.SimpleNamespace(remove=lambda: None))
    assert arith.grade(problems[0], f"Answer: {problems[0].answer}") and not arith.grade(problems[1], "nonsense")
    row = bpr.run_one("beam_search", False, problems, model, None, None, 1)
    assert row.accuracy == pytest.approx(1 / 3)


# --- bench_all --------------------------------------------------------------------------------


def test_a_vllm_section_runs_where_vllm_is_installed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_all, "SECTIONS", (
        Section("vllm", "transformers vs vLLM", ("-c", "print('| vllm row |')"), needs_vllm=True),))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: True)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 0
    assert "## transformers vs vLLM\n| vllm row |\n" in out.read_text()
    assert "skipped" not in out.read_text()
    capsys.readouterr()
    assert bench_all.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("vllm ") and "skipped" not in listed


def test_a_failed_sections_stderr_tail_is_its_last_lines():
    kept = "".join(f"  frame {k}\n" for k in range(30)) + "ValueError: the real cause\n"
    tail = bench_all.stderr_tail(kept.encode())
    assert len(tail) == bench_all.STDERR_TAIL == 20
    assert tail[-1] == "ValueError: the real cause" and tail[0] == "  frame 11"


def test_the_stderr_copy_keeps_its_last_64_kib(monkeypatch):
    monkeypatch.setattr(bench_all, "_write_stderr", lambda chunk: None)
    data = b"".join(f"line {k}\n".encode() for k in range(20000))  # ~200 KiB in several reads
    kept = bytearray()
    bench_all._copy_stderr(io.BufferedReader(io.BytesIO(data)), kept)
    assert bytes(kept) == data[-bench_all.STDERR_KEEP:] and bench_all.STDERR_KEEP == 1 << 16


def test_ctrl_c_in_a_section_exits_130_and_starts_no_later_section(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_all, "SECTIONS", (Section("a", "A", ("-c", "print(1)")), Section("b", "B", ("-c", "print(2)"))))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)
    started = []

    def interrupted(section, report, vllm=True):  # Ctrl-C while the first section runs
        started.append(section.name)
        return Outcome(section, "interrupted")

    monkeypatch.setattr(bench_all, "run_section", interrupted)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 130
    assert started == ["a"]
    assert "*interrupted (Ctrl-C): the report stops here*" in out.read_text() and "## B" not in out.read_text()
    assert "not finished: a" in capsys.readouterr().err


# --- bench_memory -----------------------------------------------------------------------------


def test_memory_growth_is_the_peak_above_the_loaded_rss():
    from experiments.bench_memory import MemoryConfig, MemoryRow, markdown_table

    row = MemoryRow(MemoryConfig("best_of_n", 4, 2), 300.0, 350.0, 1.0)
    assert row.growth_mib == 50.0
    assert table_rows(markdown_table([row]), "| strategy |")["best_of_n"][-1] == "50"


def test_the_memory_docstring_command_with_n_below_the_beam_width_parses(monkeypatch):
    from experiments import bench_memory

    calls = []
    monkeypatch.setattr(bench_memory, "run", lambda *a: calls.append(a) or "ran")
    with contextlib.redirect_stdout(io.StringIO()):
        bench_memory.main(["--ns", "2", "--bon-problems", "2", "--beam-problems", "2"])  # M=4 > N=2: M is min(M, N)
    assert len(calls) == 1 and tuple(calls[0][1]) == (2,) and calls[0][4] == 4
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench_memory.main(["--ns", "6"])  # 6 is not a multiple of 4


# --- bench_timing -----------------------------------------------------------------------------


def test_decode_rows_median_is_the_middle_count():
    rows = DecodeRows(None)
    rows.rows = [2, 2, 2, 8, 2]  # one full forward among straggler forwards
    assert rows.median == 2.0 and rows.mean == pytest.approx(3.2)


def test_the_generate_clock_counts_cpu_seconds_apart_from_a_wait():
    from experiments.bench_timing import GenerateClock

    policy = types.SimpleNamespace(llm=types.SimpleNamespace(generate=lambda *a: time.sleep(0.2)))  # waits, no CPU
    with GenerateClock(policy) as clock:
        policy.llm.generate()
    assert clock.calls == 1 and clock.seconds >= 0.15
    assert clock.cpu_seconds < 0.5 * clock.seconds

