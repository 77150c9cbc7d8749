"""The benchmark command lines (`experiments/bench_*.py`) reject a bad number at parse time, before
any model loads: argparse's one-line error naming the option (`<prog>: error: argument --problems:
...`) and exit code 2 (`experiments/cli_args.py`). Each case runs the script's main in-process
with everything that would load a model or run a search replaced by a failure, so a case that
got past the argument check fails at once instead of running the benchmark. Valid input parses
as before (defaults, and the 0 that means something: `bench_engine_overhead --top 0`).

    .venv/bin/python -m pytest tests/test_bench_args.py
"""
from __future__ import annotations

import argparse
import importlib
import subprocess

import pytest
import torch

from experiments import bench_all
from experiments.cli_args import check_beam_shape, int_list, nonnegative_int, positive_float, positive_int

# What runs after the arguments in some script: a model load, a search, a child process.
HEAVY = ("run", "load_workload", "load_tiny_parts", "load_train_parts", "child", "measure", "run_one",
         "run_transformers", "run_vllm", "resolve_checkpoint", "ceiling_line")

FLOPS_COUNTS = ("--problems", "--n", "--prompts", "--group", "--matmul-size", "--forward-rows",
                "--forward-length", "--repeats", "--threads")
SEARCH_COUNTS = ("--problems", "--n", "--beam-width", "--threads")  # bench_workload.add_search_arguments

# (script, argv, the option the error names)
BAD: list[tuple[str, list[str], str]] = [
    *[("bench_batching", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds")],
    ("bench_batching", ["--problems", "x"], "--problems"),
    ("bench_batching", ["--n", "-3"], "--n"),
    ("bench_batching", ["--n", "6", "--beam-width", "4"], "--n"),           # N not split into beams of M
    ("bench_batching", ["--n", "2", "--beam-width", "4"], "--beam-width"),  # M > N
    *[("bench_dtype", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds")],
    ("bench_dtype", ["--n", "30"], "--n"),
    *[("bench_engine_overhead", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds")],
    ("bench_engine_overhead", ["--top", "-1"], "--top"),
    ("bench_engine_overhead", ["--n", "30"], "--n"),
    ("bench_engine_overhead", ["--device", "tpu"], "--device"),
    *[("bench_flops", [flag, "0"], flag) for flag in FLOPS_COUNTS],
    *[(script, [flag, "0"], flag) for script in ("bench_forked", "bench_shared_prefix")
      for flag in (*SEARCH_COUNTS, "--rounds")],
    *[(script, ["--n", "30"], "--n") for script in ("bench_forked", "bench_shared_prefix")],
    *[("bench_widths", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds")],
    ("bench_memory", ["--ns", "0"], "--ns"),
    ("bench_memory", ["--ns", "4,0"], "--ns"),
    ("bench_memory", ["--ns", "4,x"], "--ns"),
    ("bench_memory", ["--ns", ","], "--ns"),
    ("bench_memory", ["--ns", "6"], "--ns"),  # beam search at N = 6 with M = 4
    *[("bench_memory", [flag, "0"], flag) for flag in ("--bon-problems", "--beam-problems", "--beam-width", "--threads")],
    *[("bench_prefix_reuse", [flag, "0"], flag) for flag in ("--problems", "--max-bytes", "--threads")],
    *[("bench_prm_prefix", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds", "--batch-size")],
    ("bench_prm_prefix", ["--n", "30"], "--n"),
    *[("bench_merged_scorer", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--rounds", "--batch-size", "--depth")],
    ("bench_merged_scorer", ["--n", "30"], "--n"),
    *[("bench_scoring_overhead", [flag, "0"], flag) for flag in ("--problems", "--n", "--repeats", "--threads")],
    *[("bench_train_throughput", [flag, "0"], flag) for flag in ("--prompts", "--group", "--repeats", "--threads")],
    *[("bench_vllm", [flag, "0"], flag)
      for flag in ("--problems", "--n", "--beam-width", "--max-total-tokens", "--block-sizes", "--what-if-blocks",
                   "--kv-cache-gib", "--threads")],
    ("bench_vllm", ["--block-sizes", ""], "--block-sizes"),
    ("bench_vllm", ["--block-sizes", "32,abc"], "--block-sizes"),
    ("bench_vllm", ["--kv-cache-gib", "nan"], "--kv-cache-gib"),
    ("bench_vllm", ["--n", "6"], "--n"),
    *[("bench_vllm_overhead", [flag, "0"], flag) for flag in (*SEARCH_COUNTS, "--kv-cache-gib")],
    ("bench_vllm_overhead", ["--kv-cache-gib", "-1"], "--kv-cache-gib"),
    ("bench_vllm_overhead", ["--n", "30"], "--n"),
    # a --checkpoint that is no saved model: an error, not a benchmark of a random tiny Llama
    *[(script, ["--checkpoint", "/nonexistent/tiny-arith"], "--checkpoint")
      for script in ("bench_batching", "bench_dtype", "bench_engine_overhead", "bench_flops", "bench_forked",
                     "bench_memory", "bench_merged_scorer", "bench_prefix_reuse", "bench_prm_prefix",
                     "bench_scoring_overhead", "bench_shared_prefix", "bench_train_throughput", "bench_vllm",
                     "bench_vllm_overhead", "bench_widths")],
    *[(script, ["--prm", "/nonexistent/prm"], "--prm") for script in ("bench_prm_prefix", "bench_merged_scorer")],
]


class RanPastTheArguments(AssertionError):
    """A HEAVY function was called: the command line got past its argument checks."""


def _nothing_runs(name: str):
    def refuse(*args, **kwargs):
        raise RanPastTheArguments(f"{name} ran: the arguments were not checked first")

    return refuse


@pytest.fixture
def blocked(monkeypatch):
    """import_bench(script) -> the module, with every HEAVY function (its own and bench_ways')
    and torch.set_num_threads replaced, and bf16 matmuls claimed (bench_dtype would otherwise
    skip before running anything)."""
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)

    def import_bench(script: str):
        module = importlib.import_module(f"experiments.{script}")
        for owner in (module, importlib.import_module("experiments.bench_ways")):
            for name in HEAVY:
                if callable(getattr(owner, name, None)):
                    monkeypatch.setattr(owner, name, _nothing_runs(f"{owner.__name__}.{name}"))
        if hasattr(module, "native_bf16"):
            monkeypatch.setattr(module, "native_bf16", lambda *a: True)
        return module

    return import_bench


@pytest.mark.parametrize("script, argv, option", BAD, ids=[f"{s}:{' '.join(a) or 'empty'}" for s, a, _ in BAD])
def test_a_bad_argument_is_a_usage_error(blocked, capsys, script, argv, option):
    module = blocked(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m experiments.{script}: error: argument {option}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("script, argv", [
    ("bench_batching", ["--model", "gpt"]),
    ("bench_dtype", ["--dtype", "float64"]),
    ("bench_memory", ["--child", "mcts"]),
    ("bench_prm_prefix", ["--prm-format", "xml"]),
    ("bench_merged_scorer", ["--prm-format", "xml"]),
])
def test_a_choice_outside_the_fixed_options_is_a_usage_error(blocked, capsys, script, argv):
    with pytest.raises(SystemExit) as exit_info:
        blocked(script).main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[0]}: invalid choice" in capsys.readouterr().err


# The command lines of `make bench` (experiments/bench_all.py), README and the scripts' docstrings.
DOCUMENTED: list[tuple[str, list[str]]] = [
    *[(s.argv[1].removeprefix("experiments."), list(s.command(vllm)[2:])) for s in bench_all.SECTIONS
      for vllm in (True, False)],
    ("bench_scoring_overhead", ["--threads", "1"]),
    ("bench_scoring_overhead", ["--problems", "8", "--n", "8", "--repeats", "1"]),
    ("bench_prefix_reuse", []),
    ("bench_prm_prefix", []),
    ("bench_prm_prefix", ["--model", "smollm2", "--problems", "2", "--rounds", "1"]),
    ("bench_prm_prefix", ["--vllm"]),
    ("bench_prm_prefix", ["--model", "smollm2", "--problems", "2", "--rounds", "1", "--vllm"]),
    ("bench_prm_prefix", ["--prm", "outputs/checkpoints/tiny-arith/final", "--problems", "16"]),
    ("bench_merged_scorer", []),
    ("bench_merged_scorer", ["--rounds", "1"]),
    ("bench_merged_scorer", ["--prm", "outputs/checkpoints/tiny-arith/final", "--problems", "64"]),
    ("bench_prefix_reuse", ["--problems", "4", "--checkpoint", "/tmp/runs/r1/final"]),
    ("bench_batching", []),
    ("bench_batching", ["--model", "smollm2", "--problems", "16", "--rounds", "1"]),
    ("bench_batching", ["--problems", "8", "--n", "4", "--beam-width", "2"]),
    ("bench_shared_prefix", []),
    ("bench_shared_prefix", ["--model", "smollm2", "--problems", "2", "--rounds", "1"]),
    ("bench_forked", []),
    ("bench_widths", []),
    ("bench_widths", ["--model", "smollm2", "--problems", "4", "--n", "8", "--rounds", "1"]),
    ("bench_widths", ["--n", "30"]),  # no beam search: N need not split into beams
    ("bench_forked", ["--model", "smollm2", "--problems", "2", "--rounds", "1"]),
    ("bench_dtype", []),
    ("bench_dtype", ["--model", "smollm2", "--problems", "4", "--n", "8", "--rounds", "1"]),
    ("bench_engine_overhead", []),
    ("bench_engine_overhead", ["--no-forked", "--top", "0"]),
    ("bench_engine_overhead", ["--model", "smollm2", "--problems", "4", "--rounds", "1"]),
    ("bench_engine_overhead", ["--problems", "4", "--n", "4", "--top", "5"]),
    ("bench_vllm_overhead", []),
    ("bench_vllm_overhead", ["--model", "smollm2", "--problems", "4"]),
    ("bench_vllm_overhead", ["--problems", "2", "--n", "4"]),
    ("bench_flops", []),
    ("bench_flops", ["--problems", "2", "--n", "2", "--prompts", "2", "--group", "2", "--matmul-size", "256"]),
    ("bench_train_throughput", []),
    ("bench_train_throughput", ["--prompts", "2", "--group", "2", "--repeats", "1"]),
    ("bench_memory", []),
    ("bench_memory", ["--ns", "2", "--bon-problems", "2", "--beam-problems", "2"]),
    ("bench_vllm", []),
    ("bench_vllm", ["--problems", "8", "--block-sizes", "32", "--checkpoint", "/tmp/runs/r1/final"]),
    ("bench_vllm", ["--problems", "2", "--n", "4", "--beam-width", "2", "--max-total-tokens", "24",
                    "--block-sizes", "16,32"]),  # tests/test_bench_vllm.py
]


MODEL_OPTIONS = ("--checkpoint", "--prm")  # their documented paths stand for a saved model


@pytest.mark.parametrize("script, argv", DOCUMENTED, ids=[f"{s}:{' '.join(a) or 'defaults'}" for s, a in DOCUMENTED])
def test_a_documented_command_line_gets_past_its_arguments(blocked, tmp_path, script, argv):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = [str(model) if i and argv[i - 1] in MODEL_OPTIONS else arg for i, arg in enumerate(argv)]
    with pytest.raises(RanPastTheArguments):
        blocked(script).main(argv)


def test_a_checkpoint_is_a_model_folder_or_a_run_with_a_final_one(tmp_path):
    from experiments.bench_workload import DEFAULT_CHECKPOINT, checkpoint_folder

    assert DEFAULT_CHECKPOINT.is_absolute()  # the trained policy whatever folder the command runs in
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert checkpoint_folder(str(tmp_path / "run")) == tmp_path / "run" / "final"
    assert checkpoint_folder(str(tmp_path / "run" / "final")) == tmp_path / "run" / "final"
    with pytest.raises(argparse.ArgumentTypeError, match="no config.json in it or in its final/"):
        checkpoint_folder(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no such folder"):
        checkpoint_folder(str(tmp_path / "typo"))


def test_bench_memory_names_a_random_model_and_its_children_load_the_same(monkeypatch, tmp_path):
    from experiments import bench_memory

    commands: list = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, '{"loaded_mib": 1, "peak_mib": 2, "wall_s": 0.1}', "")

    monkeypatch.setattr(bench_memory.subprocess, "run", fake_run)
    table = bench_memory.run(tmp_path / "untrained", (2,), 1, 1, 2, 1, 0)
    assert table.startswith("policy: random tiny Llama (no checkpoint found)")
    assert all("--checkpoint" not in c for c in commands)  # the child's default: the same random model
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "config.json").write_text("{}")
    table = bench_memory.run(tmp_path / "trained", (2,), 1, 1, 2, 1, 0)
    assert table.startswith(f"policy: checkpoint {tmp_path / 'trained'}")
    assert commands[-1][commands[-1].index("--checkpoint") + 1] == str((tmp_path / "trained").resolve())


def _recording(monkeypatch, module, name: str) -> list:
    calls: list = []
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append((args, kwargs)) or "table")
    return calls


def test_valid_input_reaches_the_benchmark_unchanged(blocked, monkeypatch):
    overhead = blocked("bench_engine_overhead")
    calls = _recording(monkeypatch, overhead, "run")
    overhead.main([])
    overhead.main(["--top", "0", "--problems", "2", "--n", "4", "--beam-width", "2", "--rounds", "1"])
    checkpoint = calls[0][0][0]
    assert calls[0][0] == (checkpoint, 32, 32, 4, 10, 0, "tiny", 3, "cpu", True)  # the defaults
    assert calls[1][0] == (checkpoint, 2, 4, 2, 0, 0, "tiny", 1, "cpu", True)   # --top 0: no hotspot table

    memory = blocked("bench_memory")
    calls = _recording(monkeypatch, memory, "run")
    memory.main([])
    memory.main(["--ns", "2, 8", "--beam-width", "4"])  # N = 2 runs M = 2; 8 splits into beams of 4
    assert calls[0][0][1:] == ((4, 8, 16, 32), 32, 64, 4, 1, 0)
    assert calls[1][0][1] == (2, 8)

    scoring = blocked("bench_scoring_overhead")
    calls = _recording(monkeypatch, scoring, "run")
    threads: list = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    scoring.main([])
    assert threads == [] and calls[0][0][1:] == (32, 32, 3, 0)  # no --threads: torch's own count


def test_parse_args_defaults_are_unchanged():
    from experiments import bench_prefix_reuse, bench_vllm
    from policies.prefix_cache import PrefixCacheConfig

    args = bench_vllm.parse_args([])
    assert (args.problems, args.n, args.beam_width, args.block_sizes, args.what_if_blocks, args.kv_cache_gib,
            args.threads) == (64, 16, 4, (16, 32, 64), (1, 16), 1.0, 1)
    assert bench_vllm.parse_args(["--what-if-blocks", ""]).what_if_blocks == ()  # no replays
    args = bench_prefix_reuse.parse_args([])
    assert (args.problems, args.max_bytes, args.threads) == (16, PrefixCacheConfig().max_bytes, 1)


def test_the_argument_types():
    assert positive_int("3") == 3 and nonnegative_int("0") == 0 and positive_float("0.5") == 0.5
    assert int_list()("16, 32,") == (16, 32) and int_list(allow_empty=True)("") == ()
    for parse, text in [(positive_int, "0"), (positive_int, "1.5"), (nonnegative_int, "-1"),
                        (positive_float, "0"), (positive_float, "inf"), (positive_float, "x"),
                        (int_list(), ""), (int_list(), "1,-2")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    ap = argparse.ArgumentParser()
    check_beam_shape(ap, 8, 4)
    check_beam_shape(ap, 4, 4)
    for n, width in [(6, 4), (2, 4)]:
        with pytest.raises(SystemExit):
            check_beam_shape(ap, n, width)
