"""Smoke test of `python -m experiments.bench_vllm`: a tiny run (2 problems, N=4, beam width 2,
24 tokens) on a random tiny Llama (the missing-checkpoint fallback) prints the table with a row
per strategy and backend, the shares of vLLM's prefix cache, and a block size vLLM's CPU backend
rejects reported as such. Plus the cache-rule replay of `RecordingLLM` on a scripted engine.

Run: `.venv/bin/python -m pytest tests/test_bench_vllm.py` (the run is marked vllm).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from experiments.bench_vllm import BlockCacheReplay, CacheBound, RecordingLLM, main
from vllm_fixtures import require_vllm


class EchoEngine:
    """generate(): every request returns the tokens 100, 101, ..., one per prompt token (enough
    to fill blocks)."""

    def generate(self, prompts, params, **kwargs):
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(100, 100 + len(p["prompt_token_ids"]))))])
                for p in prompts]


def test_the_cache_replay_follows_vllms_block_rule():
    four, one = BlockCacheReplay(4), BlockCacheReplay(1)
    recorder = RecordingLLM(EchoEngine(), (four, one))
    prompt = list(range(10))  # blocks [0:4], [0:8]; the last token is never cached
    recorder.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": prompt}], None)
    # both could be served at most 8 tokens; the first is cold, the second finds both blocks
    assert (four.block_cap, four.reachable) == (16, 8)
    assert (one.block_cap, one.reachable) == (18, 9)
    # next call: prompt + the first 3 generated tokens (13 tokens, 3 blocks): the third block
    # [0:12] holds generated tokens 100, 101 that the previous call fed
    recorder.generate([{"prompt_token_ids": prompt + [100, 101, 102]}], None)
    assert (four.block_cap, four.reachable) == (16 + 12, 8 + 12)
    recorder.generate([{"prompt_token_ids": [9] + prompt}], None)  # another first token: no hit
    assert four.reachable == 20 and one.reachable == 9 + 12
    assert four.bound() == CacheBound(4, 20, 16 + 12 + 8)


@pytest.mark.vllm
def test_tiny_benchmark_prints_every_row(tmp_path, capsys, monkeypatch):
    require_vllm()
    # an untrained default checkpoint: the random tiny Llama fallback (a --checkpoint given is checked)
    monkeypatch.setattr("experiments.bench_workload.DEFAULT_CHECKPOINT", tmp_path / "missing")
    report = main(["--problems", "2", "--n", "4", "--beam-width", "2", "--max-total-tokens", "24",
                   "--block-sizes", "16,32"])
    assert "using a freshly initialised tiny Llama" in capsys.readouterr().out
    main_table = report.split("prefix-cache bounds")[0]
    table = [line for line in main_table.splitlines() if line.startswith("| ")]  # header + rows
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table]
    assert cells[0][:3] == ["strategy", "backend", "block"]
    rows = {tuple(row[:3]): row for row in cells[1:]}
    on_cpu = not torch.cuda.is_available()  # vLLM's CPU attention takes multiples of 32 only
    vllm_rows = [("best_of_n", "vllm", "16"), ("beam_search", "vllm", "16")]
    vllm_rows += ([("best_of_n", "vllm", "32")] if on_cpu else []) + [("beam_search", "vllm", "32")]
    assert list(rows) == [("best_of_n", "transformers", "-"), ("beam_search", "transformers", "-")] + vllm_rows
    if on_cpu:
        assert rows[("beam_search", "vllm", "16")][3].startswith("rejected: block_size=16: vLLM's CPU attention takes a multiple of 32")
    beam = rows[("beam_search", "vllm", "32")]
    assert int(beam[3]) > 0 and int(beam[4]) > 0 and float(beam[6]) > 0  # generated, forwarded, tokens/s
    assert all(cell.endswith("%") for cell in beam[9:12])  # cached, reachable, block cap
    assert "| beam_search | 32 | 1 |" in report and "| beam_search | 32 | 16 |" in report  # replayed bounds
