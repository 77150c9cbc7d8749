"""experiments.rollout_cache's --device: the flag reaches the model loader, a device torch cannot
see is argparse's error before any model loads, and --device cpu builds the cache it built before
(the spec has no device). The cache itself: tests/test_train_head.py.

    .venv/bin/python -m pytest tests/test_rollout_cache.py
"""
from __future__ import annotations

import pytest
import torch

from experiments import rollout_cache as rc
from policies.checkpoint import save_checkpoint
from policies.tiny_model import TinyModelConfig, build_model
from policies.tiny_tokenizer import build_tokenizer

SMALL = TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_position=160)


class Loaded(Exception):
    """Raised by a stand-in loader once it has recorded what it was asked."""


@pytest.fixture
def policy(tmp_path):
    torch.manual_seed(0)
    tok = build_tokenizer()
    return save_checkpoint(build_model(SMALL, tok), tok, tmp_path / "policy")


def argv(policy, out, *extra):
    return ["--policy", str(policy), "--task", "arith", "--problems", "2", "--n", "2", "--max-total-tokens", "12",
            "--layers", "-2", "--out", str(out), *extra]


def test_the_device_reaches_the_loader(policy, tmp_path, monkeypatch):
    asked = []

    def loader(directory, *args, **kwargs):
        asked.append(kwargs.get("device", args[1] if len(args) > 1 else None))
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU the parser accepts, never touched
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(rc, "load_checkpoint", loader)
    with pytest.raises(Loaded):
        rc.main(argv(policy, tmp_path / "c.pt", "--device", "cuda:1"))
    with pytest.raises(Loaded):
        rc.build_rollout_cache(policy, "arith", "test", 1, 1, device="cuda")
    assert asked == ["cuda:1", "cuda"]


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_device_torch_cannot_see_is_a_usage_error_before_any_model_loads(policy, tmp_path, monkeypatch, capsys,
                                                                         device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rc, "load_checkpoint", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        rc.main(argv(policy, tmp_path / "c.pt", "--device", device))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m experiments.rollout_cache: error: argument --device: device={device!r} but torch "
        f"{torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False); run it on the CPU (cpu) or install a CUDA build of torch")
    assert not (tmp_path / "c.pt").exists()


def test_device_cpu_builds_the_cache_it_built_before(policy, tmp_path, capsys):
    assert rc.main(argv(policy, tmp_path / "default.pt")) == 0
    assert rc.main(argv(policy, tmp_path / "cpu.pt", "--device", "cpu")) == 0
    default, cpu = rc.load_cache(tmp_path / "default.pt"), rc.load_cache(tmp_path / "cpu.pt")
    assert "device" not in cpu.spec  # the spec is what the cache is: other caches of it stay the same
    assert cpu.spec == default.spec and cpu.step_texts == default.step_texts and cpu.answers == default.answers
    for name in ("correct", "token_ids", "step_mean_logprob", "position_index"):
        assert torch.equal(getattr(cpu, name), getattr(default, name)), name
    assert torch.equal(cpu.features[-2], default.features[-2]) and cpu.features[-2].device.type == "cpu"
