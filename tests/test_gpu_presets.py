"""The GPU policy presets (experiments/conf/policy/{xbai_o4,metastone_s1_*,qwen25_math_*,
r1_distill_qwen_1p5b}.yaml) and the reasoning modes (experiment/reasoning_{low,medium,high}.yaml):
every one composes with the search config, its fields are the reference's settings, its parts
that need no GPU (sampling, engine config, prompt) instantiate; building a whole preset policy is
marked gpu and skipped with the reason when no GPU, vLLM or checkpoint is present; and
`experiments.gpu_check` exits 0 with a skip message on a machine without a GPU.

    .venv/bin/pytest tests/test_gpu_presets.py
"""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from experiments import gpu_check
from experiments.search import CONFIG_DIR, build, build_frozen, strategy_of
from experiments.tasks.chat_prompt import ChatPrompt
from policies.sampling_config import SamplingConfig
from policies.vllm_engine import VLLMEngineConfig

# preset -> (environment variable of its folder, placeholder folder, thinks, owns an SPRM head, min GPUs)
PRESETS = {
    "xbai_o4": ("XBAI_O4_PATH", "/models/XBai-o4", True, True, 4),
    "metastone_s1_32b": ("METASTONE_S1_32B_PATH", "/models/MetaStone-S1-32B", True, True, 4),
    "metastone_s1_7b": ("METASTONE_S1_7B_PATH", "/models/MetaStone-S1-7B", True, True, 1),
    "metastone_s1_1p5b": ("METASTONE_S1_1P5B_PATH", "/models/MetaStone-S1-1.5B", True, True, 1),
    "r1_distill_qwen_1p5b": ("R1_DISTILL_QWEN_1P5B_PATH", "/models/DeepSeek-R1-Distill-Qwen-1.5B", True, False, 1),
    "qwen25_math_1p5b": ("QWEN25_MATH_1P5B_PATH", "/models/Qwen2.5-Math-1.5B", False, False, 1),
    "qwen25_math_7b": ("QWEN25_MATH_7B_PATH", "/models/Qwen2.5-Math-7B", False, False, 1),
}
MODES = {"reasoning_low": 2, "reasoning_medium": 8, "reasoning_high": 32}


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides)


def test_the_check_script_and_the_tests_know_the_same_presets():
    assert sorted(gpu_check.GPU_PRESETS) == sorted(PRESETS)
    for preset in PRESETS:
        assert (CONFIG_DIR / "policy" / f"{preset}.yaml").is_file()
        assert gpu_check.env_var_of(preset) == PRESETS[preset][0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_the_reference_settings(preset, monkeypatch):
    variable, placeholder, thinks, _, min_gpus = PRESETS[preset]
    monkeypatch.delenv(variable, raising=False)
    cfg = composed([f"policy={preset}", "task=gsm8k"])
    policy = cfg.policy
    assert policy._target_ == "policies.vllm_policy.VLLMPolicy.from_pretrained"
    assert policy.path == placeholder and policy.engine.model == placeholder
    sampling = build(policy.sampling)
    assert isinstance(sampling, SamplingConfig)
    assert (sampling.temperature, sampling.top_p, sampling.separator) == (0.6, 0.95, ".\n\n")
    assert (sampling.think_open, sampling.think_close) == ("<think>", "</think>")
    assert sampling.max_total_tokens >= 3072 and sampling.max_step_tokens <= sampling.max_total_tokens
    engine = build(policy.engine)
    assert isinstance(engine, VLLMEngineConfig)
    assert engine.dtype == "bfloat16" and engine.enforce_eager is False and engine.kv_cache_gib is None
    assert engine.tensor_parallel_size >= min_gpus and 0.5 <= engine.gpu_memory_utilization <= 0.95
    prompt = build(policy.prompt_fn)  # lazy: no tokenizer is read until the first problem
    assert prompt == ChatPrompt(placeholder, "experiments.tasks.gsm8k", think=thinks)


ENGINE_FOLLOWS = ("dtype", "block_size", "enforce_eager", "kv_cache_gib", "max_model_len", "tensor_parallel_size")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_vllm_sprm_scorer_follows_the_presets_engine(preset):
    """scorer=vllm_sprm reads the policy's own folder: its engine takes the preset's GPU settings (a
    float32 engine with a 1 GiB KV cache could not hold one 32k-token sequence of a 1.5B model)."""
    cfg = composed([f"policy={preset}", "scorer=vllm_sprm"])
    for key in ENGINE_FOLLOWS:
        assert cfg.scorer.engine[key] == cfg.policy.engine[key], key
    prm = composed([f"policy={preset}", "scorer=vllm_prm"]).scorer.engine
    assert prm.kv_cache_gib is None and prm.enforce_eager is False  # sized from its gpu_memory_utilization


def test_the_vllm_scorers_keep_cpu_settings_beside_a_transformers_policy():
    engine = composed(["policy=tiny_sprm", "scorer=vllm_sprm"]).scorer.engine
    assert (engine.dtype, engine.block_size, engine.enforce_eager, engine.kv_cache_gib) == ("float32", 32, True, 1.0)
    engine = composed(["policy=tiny", "scorer=vllm_prm"]).scorer.engine
    assert (engine.kv_cache_gib, engine.enforce_eager) == (4.0, True)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_path_follows_its_environment_variable(preset, monkeypatch, tmp_path):
    monkeypatch.setenv(PRESETS[preset][0], str(tmp_path))
    cfg = composed([f"policy={preset}", "task=math500"])
    assert cfg.policy.path == str(tmp_path) and cfg.policy.prompt_fn.tokenizer_path == str(tmp_path)
    assert cfg.policy.prompt_fn.task_module == "experiments.tasks.math500"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reasoning_modes_are_best_of_n_at_the_reference_budgets(mode):
    cfg = composed([f"experiment={mode}", "policy=qwen25_math_1p5b", "task=aime24"])
    strategy = build_frozen(cfg.search)
    assert strategy_of(strategy)[0] == "best_of_n"
    assert cfg.budget == MODES[mode] and strategy.n == MODES[mode]
    assert strategy.aggregation == "geometric_mean"  # the reference's path score


def test_reasoning_mode_leaves_the_scorer_to_the_command_line():
    assert composed(["experiment=reasoning_high"]).scorer._target_ == "scorers.confidence.ConfidenceScorer"
    cfg = composed(["experiment=reasoning_low", "policy=tiny_sprm", "scorer=sprm"])
    assert cfg.scorer._target_ == "scorers.step_score_reader.StepScoreReader" and cfg.budget == 2


def test_gpu_check_skips_here_saying_why(capsys):
    reason = gpu_check.skip_reason(gpu_check.compose_check("qwen25_math_1p5b", 1, 2, "confidence", "unused"),
                                   "qwen25_math_1p5b")
    if reason is None:
        pytest.skip("a GPU, vLLM and the Qwen2.5-Math-1.5B folder are all present: the check would really run")
    assert gpu_check.main(["--preset", "qwen25_math_1p5b", "--problems", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: skipped: ") and reason in out


def test_gpu_check_names_the_valid_presets(capsys):
    assert gpu_check.main(["--preset", "qwen25-math"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --preset 'qwen25-math'; valid: ") and "qwen25_math_1p5b" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--scorer", "sprm2"], "error: --scorer 'sprm2'; valid: confidence, math_shepherd, oracle"),
    (["--budget", "0"], "error: --budget 0 must be >= 1"),
    (["--problems", "-1"], "error: --problems -1 must be >= 1"),
])
def test_gpu_check_refuses_bad_settings_before_composing(args, message, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "compose_check", lambda *a: pytest.fail("composed a bad setting"))
    assert gpu_check.main(["--preset", "qwen25_math_1p5b", *args]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_gpu_check_keeps_the_traceback_of_a_genuine_bug(monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gpu_check, "compose_check", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        gpu_check.main(["--preset", "qwen25_math_1p5b"])


@pytest.mark.parametrize("name", ["gpu check,1", "run(1)", "a=b"])
def test_the_check_takes_any_out_folder_name(tmp_path, name):
    # --out went into an override `out_dir=...`: Hydra's grammar refused these, in a traceback
    cfg = gpu_check.compose_check("qwen25_math_1p5b", 1, 2, "confidence", tmp_path / name)
    assert cfg.out_dir == str(tmp_path / name)


def test_a_scorer_with_its_own_engine_shares_the_gpu_and_overrides_pass_on(tmp_path, capsys):
    # both engines asked for 0.9 of one GPU: the second could not start, and nothing could be passed on
    cfg = gpu_check.compose_check("metastone_s1_1p5b", 1, 2, "vllm_sprm", tmp_path / "run")
    assert (cfg.policy.engine.gpu_memory_utilization, cfg.scorer.engine.gpu_memory_utilization) == (0.55, 0.3)
    cfg = gpu_check.compose_check("metastone_s1_1p5b", 1, 2, "vllm_sprm", tmp_path / "run",
                                  ["scorer.engine.gpu_memory_utilization=0.2", "policy.engine.max_model_len=8192"])
    assert (cfg.scorer.engine.gpu_memory_utilization, cfg.policy.engine.max_model_len) == (0.2, 8192)
    assert gpu_check.compose_check("qwen25_math_1p5b", 1, 2, "confidence", tmp_path).policy.engine.gpu_memory_utilization == 0.9
    assert gpu_check.compose_check("qwen25_math_7b", 1, 2, "qwen_prm", tmp_path).policy.engine.gpu_memory_utilization == 0.6
    beside = gpu_check.compose_check("metastone_s1_1p5b", 1, 2, "sprm_forward", tmp_path)  # its yaml: cpu, float32
    assert (beside.scorer.device, beside.scorer.dtype, beside.policy.engine.gpu_memory_utilization) == ("cuda", "bfloat16", 0.6)
    assert gpu_check.main(["--preset", "qwen25_math_1p5b", "--override", "policy.engine.nosuch=1"]) == 2
    assert capsys.readouterr().err.startswith("error: --override policy.engine.nosuch=1: ")


def test_a_missing_folder_names_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("XBAI_O4_PATH", str(tmp_path / "nowhere"))
    cfg = gpu_check.compose_check("xbai_o4", 1, 2, "confidence", tmp_path / "run")
    reason = gpu_check.skip_reason(cfg, "xbai_o4")
    assert reason is not None
    # on a GPU machine with vLLM the folder is what is missing; elsewhere the GPU or vLLM is
    assert "XBAI_O4_PATH" in reason or "CUDA" in reason or "vLLM" in reason
    # the folder's own branch, checked on any machine (it ran only where a GPU and vLLM were)
    import importlib.util

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    assert gpu_check.skip_reason(cfg, "xbai_o4") == (
        f"checkpoint folder {tmp_path / 'nowhere'} of preset 'xbai_o4' is missing (no config.json); set XBAI_O4_PATH "
        "to the checkpoint folder")


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.parametrize("preset", ["qwen25_math_1p5b", "r1_distill_qwen_1p5b", "metastone_s1_1p5b"])
def test_small_preset_instantiates_on_a_gpu(preset, tmp_path):
    cfg = gpu_check.compose_check(preset, 1, 2, "confidence", tmp_path)
    reason = gpu_check.skip_reason(cfg, preset)
    if reason is not None:
        pytest.skip(reason)
    from policies.vllm_policy import VLLMPolicy

    policy = build(cfg.policy)
    try:
        assert isinstance(policy, VLLMPolicy) and policy.num_parameters > 10**9
    finally:
        policy.close()


class _TemplateTokenizer:
    """A stand-in for a DeepSeek-R1 distill's tokenizer: its template writes BOS and opens <think>,
    and encoding adds BOS too (add_bos_token) unless adds_bos is False."""

    bos_token, bos_token_id, chat_template = "<bos>", 1, "(a template)"

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<bos><User>{messages[0]['content']}<Assistant><think>\n"

    def get_vocab(self):
        return {"<think>": 7}

    def __call__(self, text, add_special_tokens=True):
        class Encoded:
            input_ids = ([1] if self.adds_bos and add_special_tokens else []) + [5]
        return Encoded()


@pytest.mark.parametrize("adds_bos", [True, False])
def test_chat_prompt_keeps_one_bos_and_one_think(adds_bos, monkeypatch, tmp_path):
    from experiments.tasks import chat_prompt
    from treesearch.records import Problem

    folder = str(tmp_path / f"r1-{adds_bos}")  # a fresh path: the tokenizer caches are per path
    monkeypatch.setattr(chat_prompt, "load_tokenizer", lambda path: _TemplateTokenizer(adds_bos))
    text = ChatPrompt(folder, "experiments.tasks.gsm8k", think=True)(Problem("p", "1+1?", "2"))
    # the encoder adds BOS itself, so the text drops the template's; the template opened <think>
    assert text.startswith("<User>1+1?\n" if adds_bos else "<bos><User>1+1?\n")
    assert text.endswith("<Assistant><think>\n") and text.count("<think>") == 1
