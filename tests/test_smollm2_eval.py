"""experiments.smollm2_eval's --device, without SmolLM2, GSM8K or a GPU: the flag reaches the
model loader of the search stages and of the SPRM stage's feature reads, and the vLLM engine;
a device torch cannot see is argparse's error before any model loads or any file is written;
the vLLM engine is sized for a GPU on cuda and as before on the CPU; a run folder keeps its
device once a stage has rows; --device cpu writes the report it wrote. The pipeline itself:
tests/test_smollm2.py.

    .venv/bin/python -m pytest tests/test_smollm2_eval.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import smollm2_eval as se
from experiments.smollm2_eval import EvalConfig, claim_out_dir
from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer
from policies.vllm_engine import VLLMEngineConfig
from treesearch.records import Problem

SMALL = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_position=160)
NO_GPU = "but torch {} sees no CUDA GPU (torch.cuda.is_available() is False); run it on the CPU (cpu) or install a CUDA build of torch"


class Loaded(Exception):
    """Raised by a stand-in loader once it has recorded what it was asked."""


def fake_gpus(monkeypatch, count: int) -> None:
    """torch reports `count` CUDA GPUs (none is touched: the tests stop before a model loads)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.fixture(autouse=True)
def fresh_models():
    se._model.cache_clear()
    se._vllm_base.cache_clear()
    yield
    se._model.cache_clear()
    se._vllm_base.cache_clear()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    tok = build_tokenizer()
    return save_checkpoint(build_model(SMALL, tok), tok, tmp_path / "model")


def recorder(asked: list) -> object:
    def loader(directory, dtype="float32", device="cpu"):
        asked.append((Path(directory), dtype, device))
        raise Loaded

    return loader


def test_the_device_reaches_the_search_stages_loader(model_dir, tmp_path, monkeypatch):
    asked: list = []
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(se, "load_checkpoint", recorder(asked))
    monkeypatch.setattr(se, "stage_problems", lambda cfg, stage: [Problem("gsm8k-0", "1 + 1?", "2")])
    with pytest.raises(Loaded):
        se.main(["--device", "cuda:1", "--dtype", "bfloat16", "--stages", "greedy", "--threads", "1",
                 "--model-dir", str(model_dir), "--out", str(tmp_path / "run")])
    assert asked == [(model_dir, "bfloat16", "cuda:1")]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cuda:1"


def test_the_sprm_stage_reads_its_features_on_the_runs_device(model_dir, monkeypatch):
    # with --backend vllm the policy's engine was on the GPU and the feature forward on the CPU
    asked: list = []
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(se, "load_checkpoint", recorder(asked))
    for backend in ("transformers", "vllm"):
        with pytest.raises(Loaded):
            se.build_cache(EvalConfig(model_dir=str(model_dir), backend=backend, device="cuda"), "best_of_n", [], 8)
    assert asked == [(model_dir, "float32", "cuda")] * 2


def test_the_vllm_backend_starts_its_engine_for_the_device(model_dir, monkeypatch):
    asked = []

    def engine(model_dir, dtype, device):
        asked.append(device)
        raise Loaded

    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(se, "_vllm_base", engine)
    for device in ("cuda", "cpu"):
        with pytest.raises(Loaded):
            se.make_policy(EvalConfig(model_dir=str(model_dir), backend="vllm", device=device), 0.6)
    assert asked == ["cuda", "cpu"]


def test_the_vllm_engine_starts_with_its_devices_config(model_dir, monkeypatch):
    from policies import vllm_policy

    engines = []

    def start(path, sampling, prompt, engine):
        engines.append(engine)
        raise Loaded

    monkeypatch.setattr(vllm_policy.VLLMPolicy, "from_pretrained", staticmethod(start))
    monkeypatch.setattr(se, "ChatPrompt", lambda *a, **k: None)  # the tiny tokenizer has no chat template
    for device in ("cuda", "cpu"):
        with pytest.raises(Loaded):
            se._vllm_base(str(model_dir), "float32", device)
    assert engines == [se.vllm_engine_config(model_dir, "float32", device) for device in ("cuda", "cpu")]


def test_the_vllm_engine_is_sized_for_a_gpu_on_cuda_and_as_before_on_the_cpu(tmp_path):
    for device in ("cuda", "cuda:0"):
        gpu = se.vllm_engine_config(tmp_path, "bfloat16", device)
        assert (gpu.kv_cache_gib, gpu.enforce_eager, gpu.gpu_memory_utilization) == (None, False, 0.9)
        assert (gpu.model, gpu.dtype) == (str(tmp_path), "bfloat16")
    # the CPU's engine as it was: eager, 2 GiB of KV cache (gpu_memory_utilization would take 90% of all memory)
    assert se.vllm_engine_config(tmp_path, "float32", "cpu") == VLLMEngineConfig(str(tmp_path), dtype="float32",
                                                                                 kv_cache_gib=2.0)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_device_torch_cannot_see_is_a_usage_error_before_anything(model_dir, tmp_path, monkeypatch, capsys, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(se, "load_checkpoint", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        se.main(["--device", device, "--model-dir", str(model_dir), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m experiments.smollm2_eval: error: argument --device: device={device!r} {NO_GPU.format(torch.__version__)}")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=f"^EvalConfig.device={device!r} but torch"):  # the config alone, too
        EvalConfig(device=device)


def test_the_vllm_engine_takes_the_first_gpu_it_sees(monkeypatch):
    fake_gpus(monkeypatch, 2)
    EvalConfig(backend="vllm", device="cuda:0")
    EvalConfig(backend="transformers", device="cuda:1")
    with pytest.raises(ValueError, match="device='cuda:1' with backend='vllm'.*CUDA_VISIBLE_DEVICES=1"):
        EvalConfig(backend="vllm", device="cuda:1")


def test_a_run_folder_keeps_its_device_once_a_stage_has_rows(tmp_path, monkeypatch):
    # the GPU's generator draws other samples from a chunk seed: rows of both in one stage were no run
    fake_gpus(monkeypatch, 1)
    folder = tmp_path / "run"
    claim_out_dir(EvalConfig(), folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["device"] == "cpu"
    del saved["device"]  # a folder made before the field existed: its rows were drawn on the CPU
    (folder / "config.json").write_text(json.dumps(saved))
    claim_out_dir(EvalConfig(), folder)
    claim_out_dir(EvalConfig(device="cuda"), folder)  # no stage output yet: it may change
    claim_out_dir(EvalConfig(), folder)
    (folder / "greedy.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"device: 'cpu' -> 'cuda' \(greedy.jsonl made with it\)"):
        claim_out_dir(EvalConfig(device="cuda"), folder)


def test_the_report_names_the_device_and_is_unchanged_on_the_cpu(monkeypatch):
    metrics = {"gsm8k.greedy": 0.25, "gsm8k.ci95": {}, "gsm8k_flexible.ci95": {}, "gsm8k.problems": 4,
               "gsm8k.tokens_per_s": {"greedy": 10.0}, "gsm8k.threads": {"greedy": [2]}}
    cpu = se.format_report(EvalConfig(), metrics).splitlines()
    assert cpu[-3:] == ["Throughput (generated tokens / wall second, on CPU threads shared with other jobs, batch 128):",
                        "", "- greedy: 10.0 tokens/s (2 threads)"]
    fake_gpus(monkeypatch, 1)
    gpu = se.format_report(EvalConfig(device="cuda", backend="vllm"), metrics).splitlines()
    assert gpu[-3] == "Throughput (generated tokens / wall second, on cuda (vllm), batch 128):"
    assert gpu[:-3] == cpu[:-3]
