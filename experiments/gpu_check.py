"""`python -m experiments.gpu_check`: run one GPU policy preset end to end at small scale (Best-of-2
on the first few GSM8K test problems), or exit 0 saying why it cannot run here.

Usage:
    python -m experiments.gpu_check --preset qwen25_math_1p5b --problems 4
    QWEN25_MATH_1P5B_PATH=/data/Qwen2.5-Math-1.5B python -m experiments.gpu_check --preset qwen25_math_1p5b
    python -m experiments.gpu_check --preset xbai_o4 --budget 8 --out outputs/gpu_check/xbai
    python -m experiments.gpu_check --preset metastone_s1_1p5b --scorer vllm_sprm --override policy.engine.max_model_len=8192

What it runs: the search config (`experiments/conf/search.yaml`) composed with policy=<preset>,
task=gsm8k, task.count=<problems>, search=best_of_n, budget=<budget>, scorer=<scorer> (default
confidence) and any --override KEY=VALUE, run by `experiments.search.run_search_experiment` into
--out (resumable as any search run); it prints the accuracy with its interval and the tokens
generated per wall second. A scorer with a vLLM engine of its own (vllm_sprm, vllm_prm) shares the
GPU with the policy's: the two engines get 0.55 and 0.3 of its memory (SHARED_GPU; both at the
presets' 0.9, the second engine could not start); beside a PRM loaded by transformers on the same
GPU (math_shepherd, qwen_prm, rlhflow_prm) the policy's engine takes 0.6, and so beside
scorer=sprm_forward, which then reads the preset's own folder on the GPU in bfloat16
(SPRM_FORWARD_ON_GPU); --override sets any of them.

It skips (exit 0, one line "gpu_check: skipped: <why>") when no CUDA GPU is visible to torch,
when vLLM does not import, or when the preset's checkpoint folder is missing (the line names the
folder and the environment variable that sets it). Anything that fails after those checks is a
real failure (non-zero exit). An unknown preset or scorer, or a count below 1, prints
"error: <message>" (listing the valid options) on stderr and exits with code 2.

Tests: `.venv/bin/pytest tests/test_gpu_presets.py`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from experiments.cli_errors import run_command
from experiments.record_log import load_rows
from experiments.search import CONFIG_DIR, METRICS, RECORDS, run_search_experiment

# the presets of experiments/conf/policy that run on a GPU through vLLM
GPU_PRESETS: tuple[str, ...] = (
    "metastone_s1_1p5b", "metastone_s1_7b", "metastone_s1_32b", "qwen25_math_1p5b", "qwen25_math_7b",
    "r1_distill_qwen_1p5b", "xbai_o4",
)
DEFAULT_OUT = Path("outputs/gpu_check")
# scorers that start a vLLM engine beside the policy's, and each engine's share of one GPU's memory
ENGINE_SCORERS: tuple[str, ...] = ("vllm_sprm", "vllm_prm")
SHARED_GPU: tuple[str, ...] = ("policy.engine.gpu_memory_utilization=0.55", "scorer.engine.gpu_memory_utilization=0.3")
# scorers that load a 7-8B PRM with transformers on the policy's GPU (scorer.device=cuda), and the
# policy engine's share that leaves it room (conf/scorer/qwen_prm.yaml: ~15 GB in bfloat16)
GPU_PRM_SCORERS: tuple[str, ...] = ("math_shepherd", "qwen_prm", "rlhflow_prm")
ROOM_FOR_A_PRM: tuple[str, ...] = ("policy.engine.gpu_memory_utilization=0.6",)
# the SPRM read over a second forward of the preset's own folder: on its GPU, in bfloat16 (its yaml: cpu, float32)
SPRM_FORWARD_ON_GPU: tuple[str, ...] = ("scorer.device=cuda", "scorer.dtype=bfloat16", *ROOM_FOR_A_PRM)


def check_preset(preset: str) -> None:
    """ValueError listing the valid presets unless preset is one."""
    if preset not in GPU_PRESETS:
        raise ValueError(f"--preset {preset!r}; valid: {', '.join(GPU_PRESETS)}")


def scorer_options() -> tuple[str, ...]:
    """The scorer options of experiments/conf/scorer (one yaml each)."""
    return tuple(sorted(path.stem for path in (CONFIG_DIR / "scorer").glob("*.yaml")))


def check_args(preset: str, problems: int, budget: int, scorer: str) -> None:
    """ValueError naming the first bad setting (checked before the config is composed)."""
    check_preset(preset)
    for name, value in (("problems", problems), ("budget", budget)):
        if value < 1:
            raise ValueError(f"--{name} {value} must be >= 1")
    if scorer not in scorer_options():
        raise ValueError(f"--scorer {scorer!r}; valid: {', '.join(scorer_options())}")


def scorer_settings(scorer: str) -> tuple[str, ...]:
    """The overrides that give the scorer its share of the policy's GPU (module docstring)."""
    if scorer in ENGINE_SCORERS:
        return SHARED_GPU
    if scorer in GPU_PRM_SCORERS:
        return ROOM_FOR_A_PRM
    return SPRM_FORWARD_ON_GPU if scorer == "sprm_forward" else ()


def compose_check(preset: str, problems: int, budget: int, scorer: str, out_dir: Path,
                  extra: Sequence[str] = ()) -> DictConfig:
    """The search config of the check (module docstring); extra: Hydra overrides after the rest."""
    check_preset(preset)
    overrides = [
        f"policy={preset}", "task=gsm8k", f"task.count={problems}", "search=best_of_n", f"budget={budget}",
        f"scorer={scorer}", f"chunk={problems}", "progress=false",
        *scorer_settings(scorer), *extra,
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            cfg = compose("search", overrides=overrides)
        except HydraException as err:  # a bad --override: Hydra's message, one line
            raise ValueError(f"--override {' '.join(extra)}: {' '.join(str(err).split())}") from err
    cfg.out_dir = str(out_dir)  # set, not an override: a path with "," "=" or "(" is no override grammar
    return cfg


def env_var_of(preset: str) -> str | None:
    """The environment variable that sets the preset's checkpoint folder (read from its yaml)."""
    text = (CONFIG_DIR / "policy" / f"{preset}.yaml").read_text()
    match = re.search(r"\$\{oc\.env:([A-Za-z0-9_]+),", text)
    return match.group(1) if match else None


def skip_reason(cfg: DictConfig, preset: str) -> str | None:
    """Why the check cannot run here (no GPU, no vLLM, no checkpoint folder), or None."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm)"
    path = Path(cfg.policy.path)
    if not (path / "config.json").is_file():
        variable = env_var_of(preset)
        hint = f"; set {variable} to the checkpoint folder" if variable else ""
        return f"checkpoint folder {path} of preset {preset!r} is missing (no config.json){hint}"
    return None


def tokens_per_second(out: Path) -> float:
    """Generated tokens / wall seconds over the run's records."""
    rows = load_rows(out / RECORDS)
    seconds = sum(row["compute"]["wall_time_s"] for row in rows)
    return sum(row["compute"]["tokens_generated"] for row in rows) / seconds if seconds else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; our own input errors (ValueError, FileNotFoundError: an unknown preset or
    scorer, a bad count) print "error: <message>" on stderr and give exit code 2."""
    return run_command(check_command, argv)


def check_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, skip saying why or run the check, print its line."""
    ap = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description="Run one GPU policy preset end to end at small scale (or skip, saying why).")
    ap.add_argument("--preset", required=True, help=f"one of {', '.join(GPU_PRESETS)}")
    ap.add_argument("--problems", type=int, default=4, help="first GSM8K test problems")
    ap.add_argument("--budget", type=int, default=2, help="Best-of-N's N")
    ap.add_argument("--scorer", default="confidence", help="a scorer option of experiments/conf/scorer")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default outputs/gpu_check/<preset>)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override of the search config (repeatable), e.g. policy.engine.max_model_len=8192")
    args = ap.parse_args(argv)
    check_args(args.preset, args.problems, args.budget, args.scorer)
    out = args.out or DEFAULT_OUT / args.preset
    cfg = compose_check(args.preset, args.problems, args.budget, args.scorer, out, args.override)
    reason = skip_reason(cfg, args.preset)
    if reason is not None:
        print(f"gpu_check: skipped: {reason}")
        return 0
    run_dir = run_search_experiment(cfg)
    metrics = json.loads((run_dir / METRICS).read_text())
    acc = metrics["accuracy"]
    print(f"gpu_check {args.preset}: Best-of-{args.budget} accuracy {acc['mean']:.3f} [{acc['low']:.3f}, "
          f"{acc['high']:.3f}] over {metrics['problems']} GSM8K problems, {tokens_per_second(run_dir):.0f} "
          f"generated tokens/s ({run_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
