"""Room on a GPU for a scorer's model beside a vLLM policy (experiments/gpu_room.py): the weights
counted from safetensors headers, the share that leaves room, the refusal before anything loads,
and the note for a scorer left on the CPU. No GPU needed: the GPU's memory is given.

    .venv/bin/pytest tests/test_gpu_room.py
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from experiments import gpu_room
from experiments.gpu_room import GIB, check_room_for_scorer, cpu_scorer_note, room_problem, weight_bytes
from experiments.search import CONFIG_DIR


def header_only_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file's header for tensors of these shapes (bf16), the tensors left out: the
    size of a 7B model without writing 14 GB."""
    offset, header = 0, {}
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)


def seven_b_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "prm"
    folder.mkdir()
    header_only_safetensors(folder / "model-00001-of-00002.safetensors", {"a": [4, 10**9], "b": [3, 10**9]})
    header_only_safetensors(folder / "model-00002-of-00002.safetensors", {"c": [6 * 10**8]})
    return folder


def composed(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=list(overrides))


def test_weights_are_counted_from_the_headers_in_the_loading_dtype(tmp_path):
    save_file({"w": torch.zeros(3, 5), "__b": torch.zeros(7)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    assert weight_bytes(tmp_path, "float32") == 22 * 4
    assert weight_bytes(tmp_path, "bfloat16") == 22 * 2
    assert weight_bytes(seven_b_folder(tmp_path), "bfloat16") == 7.6e9 * 2
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert weight_bytes(tmp_path / "bins", "bfloat16") == 1000  # pickles: their size on disk
    assert weight_bytes(tmp_path / "nosuch", "bfloat16") is None


def test_the_share_that_leaves_room_is_named():
    assert room_problem(0.6, 80 * GIB, 16 * GIB) is None
    problem = room_problem(0.9, 80 * GIB, int(15.7 * GIB))
    assert "takes policy.engine.gpu_memory_utilization=0.9 of the GPU's 80 GiB, leaving 8.0 GiB" in problem
    assert "set policy.engine.gpu_memory_utilization=0.8 " in problem  # 80 - 15.7 GiB left is 0.80 of the GPU
    assert "needs ~15.7 GiB" in problem
    assert room_problem(0.5, 24 * GIB, 20 * GIB).endswith(": put the scorer on another GPU (scorer.device=cuda:N)")


def test_a_prm_that_cannot_fit_beside_the_policy_is_refused_naming_the_share(tmp_path):
    folder = seven_b_folder(tmp_path)
    cfg = composed("policy=qwen25_math_7b", "scorer=qwen_prm", f"scorer.path={folder}")
    with pytest.raises(ValueError, match=r"scorer.device=cuda beside the vLLM policy: the scorer's model at "
                                         r"scorer.path=.*prm \(14.2 GiB of weights in bfloat16\) needs ~15.7 GiB.*"
                                         r"set policy.engine.gpu_memory_utilization=0.8 "):
        check_room_for_scorer(cfg, lambda index: 80 * GIB)
    asked = []
    check_room_for_scorer(cfg, asked.append)  # None: torch sees no such GPU
    assert asked == [0]  # "cuda" is GPU 0
    check_room_for_scorer(composed("policy=qwen25_math_7b", "scorer=qwen_prm", f"scorer.path={folder}",
                                   "policy.engine.gpu_memory_utilization=0.6"), lambda index: 80 * GIB)
    check_room_for_scorer(composed("policy=qwen25_math_7b", "scorer=qwen_prm", f"scorer.path={folder}",
                                   "scorer.device=cuda:1"), lambda index: pytest.fail("GPU 1 holds no policy"))
    check_room_for_scorer(composed("policy=qwen25_math_7b", "scorer=qwen_prm", f"scorer.path={folder}",
                                   "scorer.device=cpu"), lambda index: pytest.fail("the CPU has no share"))


def test_the_gpus_of_a_tensor_parallel_policy_are_all_shared(tmp_path):
    folder = seven_b_folder(tmp_path)
    cfg = composed("policy=metastone_s1_32b", "scorer=qwen_prm", f"scorer.path={folder}", "scorer.device=cuda:3")
    with pytest.raises(ValueError, match="leaving 8.0 GiB"):
        check_room_for_scorer(cfg, lambda index: 80 * GIB)


def test_the_search_refuses_before_the_policy_loads(tmp_path, monkeypatch):
    from experiments import search

    monkeypatch.setattr(gpu_room, "_total_memory", lambda index: 80 * GIB)
    monkeypatch.setattr(search, "build_policy", lambda cfg: pytest.fail("the policy was built"))
    cfg = composed("policy=qwen25_math_7b", "scorer=qwen_prm", f"scorer.path={seven_b_folder(tmp_path)}",
                   "task=arith", "task.count=1")
    cfg.out_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="set policy.engine.gpu_memory_utilization=0.8"):
        search.run_search_experiment(cfg)
    assert not (tmp_path / "run").exists()


def test_a_scorer_left_on_the_cpu_beside_a_gpu_policy_is_noted():
    cfg = composed("policy=metastone_s1_1p5b", "scorer=sprm_forward")
    note = cpu_scorer_note(cfg, gpu_here=True)
    assert note.startswith("note: the policy runs on the GPU and the scorer's model") and "dtype float32" in note
    assert cpu_scorer_note(cfg, gpu_here=False) is None
    assert cpu_scorer_note(composed("policy=metastone_s1_1p5b", "scorer=sprm_forward", "scorer.device=cuda"), True) is None
    assert cpu_scorer_note(composed("policy=tiny_sprm", "scorer=sprm_forward"), True) is None  # no vLLM policy
