"""The joint trainer's inputs and run folder (`python -m experiments.train`): a damaged last/
resumes from the newest complete ckpt-<K> (one line says which and why, metrics.jsonl cut back to
it) and a run with no complete checkpoint is refused with nothing deleted; device= and
run.rollouts_per_prompt are checked before anything loads; truncated checkpoint files and a
missing config.yaml are errors naming the file; the missing-checkpoint hints of the trainer and of
`experiments.search` fit the folder (tiny-arith, tiny-countdown, the demo's, a head, a GPU preset).

Runs use the tiny fixtures of tests/test_train_loop.py (a random biased Llama, a coin-flip task).

    .venv/bin/pytest tests/test_train_inputs.py
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.checkpoint_hints import checkpoint_hint
from experiments.search import CONFIG_DIR, build_policy
from experiments import train
from experiments.train import RESUMABLE_KEYS, run_training, settings
from policies.checkpoint import DamagedCheckpointError, load_checkpoint, save_checkpoint
from policies.reflective_model import ReflectiveModel
from policies.train_state import STATE_FILE, load_joint_state
from cli_batch import Case, CliRuns, command_env
from test_joint_step import TOK, biased_lm
from test_train_loop import composed, rows_of, tiny, untimed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """An SFT-style policy folder (no score_module.pt: the run adds a fresh head)."""
    return save_checkpoint(biased_lm(), TOK, tmp_path_factory.mktemp("init") / "final")


@pytest.fixture(scope="module")
def finished(init_dir, tmp_path_factory) -> Path:
    """A 3-step run: ckpt-2/ and last/ (step 3), metric rows of steps 0..3."""
    return run_training(composed(tiny(init_dir, tmp_path_factory.mktemp("finished") / "run")))


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut the file to `keep` of its size, as a full disk or a copy cut short leaves it."""
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


# -- resuming from a damaged run folder ---------------------------------------------------------


# a truncated tokenizer.json / sprm.json stopped the run with "Expecting ',' delimiter" (no file
# named), a truncated config.json with transformers' OSError, and a missing sprm.json resumed with
# the head reading layer -2 whatever the run's feature_layer
@pytest.mark.parametrize("damage, name", [
    ("missing", STATE_FILE), ("truncated", STATE_FILE), ("truncated", "model.safetensors"),
    ("truncated", "tokenizer.json"), ("truncated", "config.json"), ("truncated", "sprm.json"), ("missing", "sprm.json"),
])
def test_a_damaged_last_resumes_from_the_newest_complete_checkpoint(init_dir, finished, tmp_path, capsys, damage, name):
    out = copy_run(finished, tmp_path)
    if damage == "missing":
        (out / "last" / name).unlink()
    else:
        truncate(out / "last" / name)
    run_training(composed(tiny(init_dir, out)))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"resuming from {out / 'ckpt-2'} (step 2): {out / 'last'}"), line
    assert f"{out / 'last' / name} is damaged or incomplete" in line if damage == "truncated" else f"has no {name}" in line
    assert untimed(rows_of(out)) == untimed(rows_of(finished))  # rows of step 3 cut, then logged again
    assert load_joint_state(out / "last").step == 3


def test_a_deleted_last_is_named_when_a_numbered_checkpoint_is_resumed(init_dir, finished, tmp_path, capsys):
    # last/ deleted: the run resumed from ckpt-2 and said nothing (only folders that exist were passed over)
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "last")
    run_training(composed(tiny(init_dir, out)))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"resuming from {out / 'ckpt-2'} (step 2): {out / 'last'} is missing"
    assert untimed(rows_of(out)) == untimed(rows_of(finished)) and load_joint_state(out / "last").step == 3


def test_a_run_without_a_complete_checkpoint_is_refused_and_kept(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=2", "run.checkpoint_every=0")))
    truncate(out / "last" / "model.safetensors")
    rows = (out / "metrics.jsonl").read_text()
    refused = rf"{out} holds a run but no complete checkpoint .*model\.safetensors"
    with pytest.raises(DamagedCheckpointError, match=refused):
        run_training(composed(tiny(init_dir, out, "run.max_steps=2", "run.checkpoint_every=0")))
    assert (out / "metrics.jsonl").read_text() == rows  # nothing wiped


def test_a_missing_config_yaml_is_named(init_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.yaml is missing") as caught:
        run_training(composed(tiny(init_dir, out)))
    assert "another config" not in str(caught.value) and "<absent>" not in str(caught.value)


def test_a_resume_of_another_config_says_what_resumes_it_as_it_ran(init_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds a run of another config \(actor_optim.lr: 0.001 -> 0.002\)") as caught:
        run_training(composed(tiny(init_dir, out, "actor_optim.lr=2e-3")))
    suggested = re.search(r"or add `([^`]*)` to resume it as it ran", str(caught.value)).group(1).split()
    assert suggested == ["actor_optim.lr=0.001"]
    run_training(composed(tiny(init_dir, out, "actor_optim.lr=2e-3", *suggested)))  # resumes: nothing left to run
    assert (out / "metrics.jsonl").read_text() == rows


def test_a_resume_with_another_step_token_cap_goes_on(init_dir, finished, tmp_path):
    # sampling.max_step_tokens is read by no rollout (they run to the end), yet a change refused the resume
    out = copy_run(finished, tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    run_training(composed(tiny(init_dir, out, "sampling.max_step_tokens=32")))  # resumes: nothing left to run
    assert (out / "metrics.jsonl").read_text() == rows


def test_a_resume_names_each_resumable_key_it_changes_on_stderr(init_dir, finished, tmp_path, capsys, monkeypatch):
    # num_threads=2 moved the weights by float rounding (up to 6e-8 in a few steps), and the resume said nothing
    out = copy_run(finished, tmp_path)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the module's one thread stays
    run_training(composed(tiny(init_dir, out, "num_threads=2", "run.keep_checkpoints=5")))
    assert (f"changed on resume: num_threads: 1 -> 2; out_dir: '{finished}' -> '{out}'; run.keep_checkpoints: 3 -> 5; "
            "another num_threads sums in another order: the weights differ from an unbroken run's by float rounding"
            ) in capsys.readouterr().err.splitlines()
    assert train.resume_changes(["device: 'cpu' -> 'cuda'"]) == (
        "changed on resume: device: 'cpu' -> 'cuda'; another device computes in another order, and another kind "
        "of device (cpu / cuda) draws other rollouts: the run goes on as another run would")


def test_a_fresh_start_over_metric_rows_without_a_checkpoint_says_so(init_dir, finished, tmp_path, capsys):
    # its last/ deleted by hand (or killed before its first checkpoint): step 0 ran again in silence
    out = copy_run(finished, tmp_path)
    for folder in out.iterdir():
        if folder.is_dir() and (folder.name == "last" or folder.name.startswith("ckpt-")):
            shutil.rmtree(folder)
    rows = sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    run_training(composed(tiny(init_dir, out)))
    assert (f"note: {out} holds {rows} metric row(s) of this config but no checkpoint to resume from (killed before "
            "its first, or last/ removed): starting over at step 0, its metrics.jsonl rewritten"
            ) in capsys.readouterr().err.splitlines()


def test_a_missing_kl_reference_says_what_it_was(init_dir, finished, tmp_path):
    # "checkpoint folder .../reference does not exist", with no word of what to do
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "reference")
    with pytest.raises(FileNotFoundError, match=f"reference is missing: it holds the KL reference, the policy this run "
                                                f"started from .* init_from={init_dir} names"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=4")))


@pytest.mark.parametrize("max_steps", [2, 3])
def test_a_rerun_with_no_step_left_says_so(init_dir, finished, tmp_path, capsys, max_steps):
    # run.max_steps=2 on a run at step 3 did nothing in silence, then printed "step 3"
    out = copy_run(finished, tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    run_training(composed(tiny(init_dir, out, f"run.max_steps={max_steps}")))
    assert (out / "metrics.jsonl").read_text() == rows
    assert f"is at step 3, its run.max_steps={max_steps} spent: nothing to train" in capsys.readouterr().err
    run_training(composed(tiny(init_dir, out, "run.max_steps=9", "run.max_minutes=0.0001")))  # minutes used up
    assert (out / "metrics.jsonl").read_text() == rows
    assert "is at step 3, its run.max_minutes=0.0001 spent: nothing to train" in capsys.readouterr().err


def test_a_run_saved_before_ref_bf16_and_shared_prompt_existed_resumes_as_it_ran(init_dir, finished, tmp_path, monkeypatch):
    # a config.yaml without the settings added in December was refused ("<absent> -> None"), with
    # nothing to add that resumes it: such a run ran with an fp32 reference, every prompt per
    # rollout, and a cut wrong rollout as an ordinary wrong one
    monkeypatch.setattr(train, "native_bf16", lambda device: True)  # ref_bf16: null pins to True here
    out = copy_run(finished, tmp_path)
    config = OmegaConf.load(out / "config.yaml")
    for key in ("ref_bf16", "shared_prompt", "truncated_wrong_reward"):
        del config.train_loss[key]
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config))
    with pytest.raises(ValueError, match=r"train_loss.ref_bf16: False -> True; train_loss.shared_prompt: False -> True; "
                                         r"train_loss.truncated_wrong_reward: 0.0 -> 0.1"):
        run_training(composed(tiny(init_dir, out)))
    rows = (out / "metrics.jsonl").read_text()
    run_training(composed(tiny(init_dir, out, "train_loss.ref_bf16=false", "train_loss.shared_prompt=false",
                               "train_loss.truncated_wrong_reward=0.0")))
    assert (out / "metrics.jsonl").read_text() == rows  # resumed: nothing left to run


def test_the_kl_reference_precision_is_pinned_so_another_machine_resumes_it_as_it_ran(init_dir, tmp_path, monkeypatch):
    # `train_loss.ref_bf16: null` was saved as null and resolved by each machine: a run moved to a
    # CPU of other bf16 support resumed with another KL reference precision, in silence
    out = tmp_path / "run"
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    run_training(composed(tiny(init_dir, out, "run.max_steps=2")))
    assert OmegaConf.load(out / "config.yaml").train_loss.ref_bf16 is True
    rows = (out / "metrics.jsonl").read_text()
    monkeypatch.setattr(train, "native_bf16", lambda device: False)  # the run moved to a CPU without bf16
    with pytest.raises(ValueError, match=r"another config \(train_loss.ref_bf16: True -> False\)") as caught:
        run_training(composed(tiny(init_dir, out, "run.max_steps=2")))
    suggested = re.search(r"or add `([^`]*)` to resume it as it ran", str(caught.value)).group(1).split()
    assert suggested == ["train_loss.ref_bf16=true"]
    run_training(composed(tiny(init_dir, out, "run.max_steps=2", *suggested)))
    assert (out / "metrics.jsonl").read_text() == rows  # resumed: nothing left to run
    config = OmegaConf.load(out / "config.yaml")
    config.train_loss.ref_bf16 = None  # saved before the precision was pinned: it resumes on any machine
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config))
    run_training(composed(tiny(init_dir, out, "run.max_steps=2")))
    assert (out / "metrics.jsonl").read_text() == rows


def test_a_run_without_a_kl_term_leaves_the_reference_precision_unpinned(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=1", "train_loss.kl_coef=0")))
    assert OmegaConf.load(out / "config.yaml").train_loss.ref_bf16 is None


@pytest.mark.parametrize("files, message", [
    ({"records.jsonl": "{}\n", "config.yaml": "seed: 0\n"}, r"holds records.jsonl of another command's run"),
    ({"metrics.jsonl": '{"step": 0}\n', "metrics.json": "{}"}, r"holds metrics.json of another command's run"),
    ({"metrics.jsonl": '{"step": 0}\n'}, r"holds a metrics.jsonl without a config.yaml"),
    ({"config.yaml": "seed: 0\nsearch: {n: 4}\n"}, r"holds the config.yaml of another run and no checkpoint of it"),
])
def test_a_fresh_run_never_overwrites_another_commands_folder(init_dir, tmp_path, files, message):
    # a search's or train_head's folder had its config.yaml / metrics.jsonl replaced by a new run
    out = tmp_path / "other"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        run_training(composed(tiny(init_dir, out, "run.max_steps=1")))
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # untouched


def test_a_fresh_start_of_the_same_config_stopped_before_its_first_checkpoint_starts_over(init_dir, tmp_path):
    out = run_training(composed(tiny(init_dir, tmp_path / "run", "run.max_steps=1", "run.checkpoint_every=0")))
    shutil.rmtree(out / "last")  # stopped before its first checkpoint: rows and config.yaml only
    (out / "metrics.jsonl").write_text('{"step": 0, "stale": true}\n')
    run_training(composed(tiny(init_dir, out, "run.max_steps=1", "run.checkpoint_every=0")))
    assert "stale" not in (out / "metrics.jsonl").read_text() and (out / "last").is_dir()


# -- truncated files name themselves ------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", STATE_FILE, "score_module.pt"])
def test_a_truncated_checkpoint_file_is_named(finished, tmp_path, name):
    folder = Path(shutil.copytree(finished / "last", tmp_path / "last"))
    truncate(folder / name)
    loaders = {"model.safetensors": load_checkpoint, STATE_FILE: load_joint_state}
    load = loaders.get(name, ReflectiveModel.from_pretrained)
    with pytest.raises(DamagedCheckpointError, match=rf"{folder / name} is damaged or incomplete"):
        load(folder)


def test_a_state_file_of_something_else_is_named_and_passed_over(finished, tmp_path):
    # torch.save({"x": 1}) as joint_state.pt was a KeyError ('rng'), not a damaged file to pass over
    folder = Path(shutil.copytree(finished / "last", tmp_path / "last"))
    torch.save({"x": 1}, folder / STATE_FILE)
    with pytest.raises(DamagedCheckpointError, match=rf"{folder / STATE_FILE} holds no training state of experiments.train "
                                                     r"\(found \['x'\]; expected step, data_position"):
        load_joint_state(folder)


def test_an_optimizer_state_of_another_model_is_named():
    # torch's "loaded state dict contains a parameter group that doesn't match" named no file; moments
    # of other shapes loaded in silence and the first step failed inside AdamW
    from policies.checkpoint import load_optimizer_state

    def adam(*shapes):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        optimizer = torch.optim.AdamW(params)
        sum(p.sum() for p in params).backward()
        optimizer.step()
        return optimizer

    load_optimizer_state(adam((3, 2), (4,)), adam((3, 2), (4,)).state_dict(), Path("s.pt"))  # the same shapes: loads
    with pytest.raises(DamagedCheckpointError, match=r"s.pt holds the optimizer state of another model \(exp_avg of shape "
                                                     r"\(5, 2\) for a parameter of shape \(3, 2\)\)"):
        load_optimizer_state(adam((3, 2), (4,)), adam((5, 2), (4,)).state_dict(), Path("s.pt"))
    with pytest.raises(DamagedCheckpointError, match=r"s.pt holds the optimizer state of another model \(loaded state dict"):
        load_optimizer_state(adam((3, 2), (4,)), adam((3, 2)).state_dict(), Path("s.pt"))


# -- inputs checked before anything loads -------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "cuda:99", *(["cuda"] if not torch.cuda.is_available() else [])])
def test_a_device_torch_cannot_use_is_refused_before_anything_is_written(init_dir, tmp_path, device):
    with pytest.raises(ValueError, match=rf"device='{device}'"):
        run_training(composed(tiny(init_dir, tmp_path / "run", f"device={device}")))
    assert not (tmp_path / "run").exists()


def test_a_grpo_group_of_one_is_refused_unless_the_loss_has_no_grpo_term():
    with pytest.raises(ValueError, match=r"run\.rollouts_per_prompt=1: a GRPO group of one"):
        settings(composed(["run.rollouts_per_prompt=1"]))
    assert settings(composed(["run.rollouts_per_prompt=1", "train_loss=spr_only"])).run.rollouts_per_prompt == 1


# -- missing-checkpoint hints -------------------------------------------------------------------


def search_policy(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("search", overrides=overrides).policy


def test_a_missing_init_policy_gets_the_hint_of_its_folder(tmp_path):
    countdown = tmp_path / "outputs" / "checkpoints" / "tiny-countdown" / "final"
    with pytest.raises(FileNotFoundError, match=r"train_sft --task countdown --out outputs/checkpoints/tiny-countdown"):
        run_training(composed(tiny(countdown, tmp_path / "run")))
    recipe = composed(["recipe=grpo_countdown"]).init_from
    hint = checkpoint_hint(recipe, FileNotFoundError(f"checkpoint folder {recipe} does not exist"), "init_from")
    assert "make demo" in hint and "tiny-arith" not in hint
    # SmolLM2's folder without a PRM score head was told to convert SmolLM2 again
    smollm2 = "outputs/models/smollm2-135m-instruct"
    no_head = FileNotFoundError(f"PRM folder {smollm2} has no score head (score.0.weight ...)")
    assert "python -m policies.smollm2" not in checkpoint_hint(smollm2, no_head, "scorer.path")
    missing = FileNotFoundError(f"checkpoint folder {smollm2} does not exist")
    assert "python -m policies.smollm2" in checkpoint_hint(smollm2, missing, "policy.path")


def test_the_smollm2_converter_writes_where_the_preset_reads():
    # the converter wrote under the repository, policy=smollm2 read under the working folder
    from policies import smollm2

    preset = OmegaConf.load(CONFIG_DIR / "policy" / "smollm2.yaml")
    assert not smollm2.DEFAULT_DIR.is_absolute() and str(smollm2.DEFAULT_DIR) == preset.path


def test_search_hints_fit_a_headless_folder_and_gpu_presets(init_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"reflective checkpoint .* `python -m experiments\.train`") as caught:
        build_policy(search_policy(["policy=tiny_sprm", f"policy.path={init_dir}", "scorer=sprm"]))
    assert "train_sft" not in str(caught.value)
    for preset, variable in (("xbai_o4", "XBAI_O4_PATH"), ("qwen25_math_1p5b", "QWEN25_MATH_1P5B_PATH")):
        monkeypatch.delenv(variable, raising=False)
        with pytest.raises(FileNotFoundError, match=rf"policy={preset} reads its folder from \${variable}") as caught:
            build_policy(search_policy([f"policy={preset}", "task=gsm8k"]))
        assert "hf download" in str(caught.value) and "train_sft" not in str(caught.value)
        if preset == "xbai_o4":  # MetaStone-AI is the GitHub organisation: that download failed
            assert "hf download MetaStoneTec/XBai-o4 --local-dir" in str(caught.value)


BAD_INPUTS = [
    ("+run.bogus=1", "error: run.bogus is not a setting of RunConfig; it takes: checkpoint_every, "),
    ("run.rollouts_per_prompt=1", "error: run.rollouts_per_prompt=1: a GRPO group of one rollout"),
    ("num_threads=0", "error: num_threads=0 must be an integer >= 1, or null"),  # 0 was skipped in silence
    ("run.max_steps=abc", "error: run.max_steps='abc' must be an integer >= 1"),  # a TypeError traceback
    ("+num_thread=2", "error: num_thread is not a setting at the top level of experiments.train; it takes: "),
    ("hydra.job.chdir=true", "error: hydra.job.chdir=true is not supported: out_dir, policy.path and "),
]
REAL_COMMAND = "run.rollouts_per_prompt=1"  # a real `python -m experiments.train`; the others share one child


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> CliRuns:
    """The BAD_INPUTS runs other than REAL_COMMAND, each in a folder of its own, in one child Python
    that imports once (tests/cli_batch.py)."""
    return CliRuns([Case("experiments.train", (override, "out_dir={cwd}/run")) for override, _ in BAD_INPUTS
                    if override != REAL_COMMAND], tmp_path_factory.mktemp("cli_runs"))


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(override, message, request, tmp_path):
    """`python -m experiments.train` with a setting its config does not take, or a refused value:
    one line `error: ...` on stderr, exit 2, no run folder and none of Hydra's left behind."""
    if override == REAL_COMMAND:  # the command itself, as a user runs it
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-m", "experiments.train", override, f"out_dir={tmp_path / 'run'}"],
                              cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=120)
        cwd = tmp_path
    else:
        done = request.getfixturevalue("cli_runs")[Case("experiments.train", (override, "out_dir={cwd}/run"))]
        cwd = done.cwd
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message), done.stderr[-2000:]
    assert not (cwd / "run").exists() and not (cwd / "outputs").exists()


@pytest.mark.parametrize("cls, values, message", [
    # failed mid-run (2.0 prompts, 2.5 rows a forward), after checkpoints (1.5 kept), or ran 1.5 steps as 2
    ("RunConfig", {"prompts_per_step": 2.0}, "RunConfig.prompts_per_step=2.0 must be an integer >= 1"),
    ("RunConfig", {"eval_batch_size": 2.5}, "RunConfig.eval_batch_size=2.5 must be an integer >= 1"),
    ("RunConfig", {"keep_checkpoints": 1.5}, "RunConfig.keep_checkpoints=1.5 must be an integer >= 0"),
    ("RunConfig", {"max_steps": 1.5}, "RunConfig.max_steps=1.5 must be an integer >= 1"),
    ("RunConfig", {"max_steps": None}, "RunConfig.max_steps=None must be an integer >= 1"),
    ("RunConfig", {"eval_every": True}, "RunConfig.eval_every=True must be an integer >= 0"),
    ("RunConfig", {"max_minutes": "abc"}, "RunConfig.max_minutes='abc' must be a finite number > 0"),
    ("DataConfig", {"train_problems": 10.5}, "DataConfig.train_problems=10.5 must be an integer >= 1"),
    ("OptimizerConfig", {"lr": "1e-5x"}, "OptimizerConfig.lr='1e-5x' must be a finite number > 0"),
    ("OptimizerConfig", {"lr": 1e-5, "warmup_steps": 1.5}, "OptimizerConfig.warmup_steps=1.5 must be an integer >= 0"),
    ("OptimizerConfig", {"lr": 1e-5, "betas": ("0.9", 0.99)}, "OptimizerConfig.betas=\\('0.9', 0.99\\) must be two"),
    ("OptimizerConfig", {"lr": 1e-5, "eps": "tiny"}, "OptimizerConfig.eps='tiny' must be a finite number >= 0"),
])
def test_training_settings_of_the_wrong_type_are_named(cls, values, message):
    with pytest.raises(ValueError, match=message):
        getattr(train, cls)(**values)


def test_rollout_cache_says_how_to_get_a_missing_policy_folder(tmp_path, capsys):
    """rollout_cache names the command that writes a missing project folder (its flag as it is
    typed: --policy), before any rollout; a missing file that is not the policy gets no hint."""
    from experiments import rollout_cache
    from experiments.checkpoint_hints import hinted_checkpoint

    missing = tmp_path / "outputs" / "checkpoints" / "tiny-countdown" / "final"
    assert rollout_cache.main(["--policy", str(missing), "--task", "countdown", "--problems", "2", "--n", "2",
                               "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint folder {missing} does not exist. Train the countdown policy with")
    assert err.rstrip().endswith("or point --policy at a checkpoint") and len(err.splitlines()) == 1
    with pytest.raises(FileNotFoundError, match=r"^no rollout cache x\.pt$"):
        with hinted_checkpoint(missing, "--policy"):
            raise FileNotFoundError("no rollout cache x.pt")


def test_settings_a_resume_may_change_do_not_rename_the_default_run_folder():
    # `run.checkpoint_every=1` on a rerun without out_dir= trained from step 0 in a new folder
    # `outputs/train/<overrides>,run.checkpoint_every=1` instead of resuming the run
    config = OmegaConf.load(Path(CONFIG_DIR) / "train.yaml")
    excluded = set(config.hydra.job.config.override_dirname.exclude_keys)
    assert set(RESUMABLE_KEYS) <= excluded


def test_a_split_too_small_for_its_count_is_named_before_anything_is_written(init_dir, tmp_path):
    # countdown's test split holds ~2.3k problems: the task's error came after config.yaml and
    # reference/ were written, without naming the setting
    out = tmp_path / "run"
    cfg = composed(tiny(init_dir, out, "task=countdown", "task.module=experiments.tasks.countdown",
                        "data.heldout_problems=5000"))
    with pytest.raises(ValueError, match=r"^data\.heldout_problems=5000: count=5000: the test split of .* holds only 2325 distinct solvable"):
        run_training(cfg)
    assert not out.exists()
    # a benchmark's split: its hint for a search's task.count (-1 takes them all) is left out here
    cfg = composed(tiny(init_dir, out, "task=gsm8k", "task.module=experiments.tasks.gsm8k", "data.train_problems=20000"))
    with pytest.raises(ValueError, match=r"^data\.train_problems=20000: gsm8k: count=20000 but the train split has "
                                         r"only 7473 problems$"):
        run_training(cfg)
    assert not out.exists()


def test_an_init_from_with_a_head_must_name_the_layer_it_reads(finished, tmp_path):
    """run.feature_layer was dropped in silence for a folder with its own head (config.yaml then
    recorded a layer the head never read)."""
    from policies.train_state import load_policy_with_head

    folder = Path(shutil.copytree(finished / "last", tmp_path / "reflective"))
    (folder / "sprm.json").write_text('{"feature_layer": -1}\n')
    with pytest.raises(ValueError, match=r"head reads hidden layer -1 \(sprm.json\) but run.feature_layer=-2: set "
                                         r"run.feature_layer=-1"):
        load_policy_with_head(folder, head_seed=7, feature_layer=-2)
    reflective, _ = load_policy_with_head(folder, head_seed=7, feature_layer=-1)
    assert reflective.feature_layer == -1
    # the same layer counted from the front, as search takes it, and null: the head's own layer
    # (the config comment promised "an init_from with a head: its sprm.json's layer")
    states = reflective.config.num_hidden_layers + 1
    assert load_policy_with_head(folder, head_seed=7, feature_layer=states - 1)[0].feature_layer == states - 1
    assert load_policy_with_head(folder, head_seed=7, feature_layer=None)[0].feature_layer == -1
    with pytest.raises(ValueError, match=rf"feature_layer={states} must index the {states} hidden states"):
        load_policy_with_head(folder, head_seed=7, feature_layer=states)
    assert load_policy_with_head(finished / "last", feature_layer=None)[0].feature_layer == -2  # its sprm.json's
    # a folder in the reference's format (no sprm.json): its head was trained on -2, as before
    reference = Path(shutil.copytree(finished / "last", tmp_path / "reference_format"))
    (reference / "sprm.json").unlink()
    with pytest.raises(ValueError, match=r"head reads hidden layer -2 \(the reference's, no sprm.json\) but "
                                         r"run.feature_layer=-1"):
        load_policy_with_head(reference, feature_layer=-1)
    assert load_policy_with_head(reference, feature_layer=states - 2)[0].feature_layer == states - 2
    assert load_policy_with_head(reference, feature_layer=None)[0].feature_layer == -2
    out = run_training(composed(tiny(folder, tmp_path / "null", "run.feature_layer=null", "run.max_steps=1")))
    assert json.loads((out / "last" / "sprm.json").read_text()) == {"feature_layer": -1}


def test_spr_only_with_no_backbone_gradient_leaves_the_policy_bit_identical(init_dir, tmp_path):
    """train_loss=spr_only train_loss.backbone_grad_scale=0 (the head on frozen features): the
    policy's AdamW still stepped, its weight decay moving all 39328 weights, so last/ no longer
    matched the policy's fingerprint that rollout caches check."""
    from safetensors.torch import load_file

    out = run_training(composed(tiny(init_dir, tmp_path / "run", "train_loss=spr_only",
                                     "train_loss.backbone_grad_scale=0", "run.max_steps=2")))
    before, after = load_file(init_dir / "model.safetensors"), load_file(out / "last" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    from scorers.sprm_head import build_sprm_head

    head = torch.load(out / "last" / "score_module.pt", weights_only=True)
    fresh = build_sprm_head(int(head["0.weight"].shape[1]), seed=0).state_dict()  # run.head_seed 0
    assert not torch.equal(head["0.weight"], fresh["0.weight"])  # the head itself learned


def test_prompt_chat_renders_a_benchmark_question_through_the_init_from_chat_template(init_dir, tmp_path, monkeypatch):
    """The trainer always sent a benchmark task's plain "Question: ..." prompt, while the chat
    presets (policy=smollm2, xbai_o4, ...) search the same folder through its chat template."""
    import json

    import experiments.train as train_module
    from experiments.tasks import gsm8k
    from experiments.tasks.chat_prompt import ChatPrompt

    chat = Path(shutil.copytree(init_dir, tmp_path / "chat_model"))  # not a run folder below: refused
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(config))

    class Built(Exception):
        pass

    def spy(reflective, tokenizer, sampling, prompt_fn, *args, **kwargs):
        raise Built(prompt_fn)

    monkeypatch.setattr(train_module.TransformersPolicy, "from_reflective", spy)
    problem = gsm8k.generate_problems("test", 1, 0)[0]
    prompts = {}
    for prompt in ("plain", "chat"):
        cfg = composed(tiny(chat, tmp_path / prompt, "task=gsm8k", "task.module=experiments.tasks.gsm8k",
                            "data.train_problems=8", f"prompt={prompt}"))
        with pytest.raises(Built) as built:
            run_training(cfg)
        prompts[prompt] = built.value.args[0](problem)
    assert prompts["plain"].startswith("Question: ") and "<|user|>" not in prompts["plain"]
    assert prompts["chat"] == ChatPrompt(str(chat), "experiments.tasks.gsm8k")(problem)
    assert prompts["chat"].startswith("<|user|>") and prompts["chat"].endswith("<|assistant|>\n<think>\n")  # <think> is a token
    with pytest.raises(ValueError, match=r"prompt=chat: task \S+ writes its own prompt \(no chat template applies\); use prompt=plain"):
        run_training(composed(tiny(chat, tmp_path / "arith", "prompt=chat")))
    with pytest.raises(ValueError, match="prompt='fancy'; valid: plain, chat"):
        run_training(composed(tiny(chat, tmp_path / "bad", "prompt=fancy")))
    assert not (tmp_path / "arith").exists() and not (tmp_path / "bad").exists()


def test_a_head_saved_in_bf16_trains_in_float32(finished, tmp_path):
    """A reference-format folder's bf16 score_module.pt was trained in bf16: AdamW's updates at
    the head's learning rate rounded away (34 of 2048 first-layer weights moved in 4 steps)."""
    from policies.train_state import load_policy_with_head

    folder = Path(shutil.copytree(finished / "last", tmp_path / "reflective"))
    state = torch.load(folder / "score_module.pt", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "score_module.pt")
    reflective, _ = load_policy_with_head(folder, feature_layer=-2)
    assert {p.dtype for p in reflective.head.parameters()} == {torch.float32}
    assert torch.equal(reflective.head[0].weight, state["0.weight"].to(torch.bfloat16).float())


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_finished_step_and_a_rerun_resumes_from_it(init_dir, tmp_path, signum):
    """Ctrl-C in `python -m experiments.train` stops after the current step, saves last/ there and
    says how to go on, exit 130 (it printed a KeyboardInterrupt traceback and lost every step since
    the last checkpoint_every, up to 24 steps of the GRPO recipe); SIGTERM the same, exit 143 (it
    unwound at once, saved nothing and said the run would resume)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=f"{repo}{os.pathsep}{repo / 'tests'}", PYTHONWARNINGS="ignore")
    out = tmp_path / "run"
    args = tiny(init_dir, out, "run.max_steps=200", "run.checkpoint_every=0", "run.eval_every=0", "run.greedy_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, getattr(signal, signum))
    _, err = proc.communicate(timeout=120)
    terminated = signum == "SIGTERM"
    assert proc.returncode == (143 if terminated else 130) and "Traceback" not in err, err[-2000:]
    step = load_joint_state(out / "last").step
    assert 2 <= step < 200 and rows_of(out)[-1]["step"] == step  # saved at the step it stopped after
    assert f"{'SIGTERM' if terminated else 'Ctrl-C'}: saved {out / 'last'} at step {step}" in err
    assert err.strip().splitlines()[-1] == (f"{'terminated' if terminated else 'interrupted'}: a run resumes from its "
                                            "out_dir/last; rerun the same command to go on")
    rows = rows_of(out)
    run_training(composed(tiny(init_dir, out, f"run.max_steps={step + 1}", "run.checkpoint_every=0",
                               "run.eval_every=0", "run.greedy_every=0")))
    assert rows_of(out)[:-1] == rows and rows_of(out)[-1]["step"] == step + 1  # resumed there, not restarted


def test_a_diverging_run_stops_before_sampling_from_or_saving_nan_weights(init_dir, tmp_path):
    # head_optim.lr=1e30 saved NaN weights in ckpt-2 and last/, then failed with an IndexError in
    # the sampler (and every rerun resumed the NaN weights)
    from experiments.train import TrainingDivergedError

    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step \d+: the (losses .* are|updated "
                                                    r"weights, or their logits, are) not finite \(NaN or inf\); "
                                                    r"nothing of this step"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=6", "run.checkpoint_every=1", "head_optim.lr=1e30",
                                   "actor_optim.lr=1e30")))
    for folder in [out / "last", *out.glob("ckpt-*")]:  # none, when step 1 diverged already (its head overflowed)
        if folder.exists():
            saved = load_checkpoint(folder)[0]
            assert all(torch.isfinite(p).all() for p in saved.parameters())  # every checkpoint is a good one
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_weights_too_large_for_a_finite_forward_count_as_diverged():
    # lr=1e4 left every weight finite (|w| ~ 1e8) but the logits NaN: the run saved that last/ as a
    # good checkpoint, and every search of it crashed in the sampler
    from types import SimpleNamespace

    from experiments.train import TrainingDivergedError, check_not_diverged, forward_finite, weights_finite
    from scorers.sprm_head import build_sprm_head

    lm = biased_lm()
    model = ReflectiveModel(lm, build_sprm_head(lm.config.hidden_size, seed=0)).train()
    batch = SimpleNamespace(input_ids=torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert forward_finite(model, batch) and model.training  # its mode is given back
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(1e15)
    assert weights_finite(model) and not forward_finite(model, batch)
    # finite logits and features, but a head whose scores overflow (lr=1e4 saved a head scoring
    # NaN at every step, and the held-out metrics row NaN, as a good last/)
    model = ReflectiveModel(lm := biased_lm(), build_sprm_head(lm.config.hidden_size, seed=0)).train()
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(1e30)
    assert weights_finite(model) and not forward_finite(model, batch)
    report = {"losses": {"loss": 0.5}, "records": [], "finite_weights": False}
    with pytest.raises(TrainingDivergedError, match="step 4: the updated weights, or their logits, are not finite"):
        check_not_diverged([report], 4)


def test_a_policy_of_another_embedded_task_is_named(tmp_path):
    # task=countdown ran the default arith policy and scored 0 with no word
    from experiments.checkpoint_hints import trained_task_note

    run = tmp_path / "mine"
    (run / "final").mkdir(parents=True)
    (run / "sft_summary.json").write_text('{"config": {}, "run": {"task": "arith", "train_problems": 10, "split_version": 2}}')
    assert trained_task_note(str(run / "final"), "experiments.tasks.countdown") == (
        f"note: policy.path={run / 'final'} was trained on arith, not countdown: point policy.path= at a policy "
        "of countdown (e.g. outputs/checkpoints/tiny-countdown/final)")
    assert trained_task_note(str(run / "final"), "experiments.tasks.arith") is None
    assert trained_task_note(str(run / "final"), "experiments.tasks.gsm8k").endswith("at a policy of gsm8k")
    old = tmp_path / "tiny-countdown"  # a summary from before it recorded the task: the folder's name
    (old / "final").mkdir(parents=True)
    (old / "sft_summary.json").write_text('{"config": {}}')
    assert "was trained on countdown, not arith" in trained_task_note(str(old / "final"), "experiments.tasks.arith")
    (old / "sft_summary.json").unlink()  # no summary at all: the folder's name still says
    assert "was trained on countdown, not arith" in trained_task_note(str(old / "final"), "experiments.tasks.arith")
    assert trained_task_note(str(tmp_path / "elsewhere" / "final"), "experiments.tasks.arith") is None  # no summary
    assert trained_task_note(None, "experiments.tasks.arith") is None  # a served policy has no folder
    # a head trained over it by train_head, then a joint-trained policy from that head: no note before
    head = tmp_path / "head"
    (head / "final").mkdir(parents=True)
    (head / "metrics.json").write_text(json.dumps({"train_spec": {"policy_dir": str(run / "final"), "task": "arith"}}))
    joint = tmp_path / "joint"
    (joint / "last").mkdir(parents=True)
    (joint / "config.yaml").write_text(f"init_from: {head / 'final'}\nseed: 0\n")
    for descendant in (head / "final", joint / "last"):
        assert trained_task_note(str(descendant), "experiments.tasks.countdown") == (
            f"note: policy.path={descendant} was trained on arith, not countdown: point policy.path= at a policy "
            "of countdown (e.g. outputs/checkpoints/tiny-countdown/final)")
        assert trained_task_note(str(descendant), "experiments.tasks.arith") is None
    (run / "sft_summary.json").write_text('{"config": {}, "run": {"task": "arith", "train_problems": 10}}')
    stale = trained_task_note(str(joint / "last"), "experiments.tasks.arith")  # version 1 of the splits
    assert f"delete {run} and train it again" in stale and f"(and what was trained from it: {joint / 'last'})" in stale
    assert trained_task_note(str(run / "final"), "countdown", "--policy").startswith(
        f"note: --policy {run / 'final'} was trained on arith, not countdown: point --policy at a policy of countdown")


def test_a_training_run_from_a_policy_of_another_task_says_so(init_dir, tmp_path, capsys):
    # experiments.train task=countdown without init_from= trained the arith policy in silence
    init = Path(shutil.copytree(init_dir, tmp_path / "tiny-countdown" / "final"))
    (init.parent / "sft_summary.json").write_text('{"config": {}, "run": {"task": "countdown"}}')
    run_training(composed(tiny(init, tmp_path / "run", "run.max_steps=1")))
    assert f"note: init_from={init} was trained on countdown, not " in capsys.readouterr().err


def test_the_smollm2_and_orm_default_folders_say_how_to_make_them():
    err = FileNotFoundError("missing")
    assert "`python -m policies.smollm2`" in checkpoint_hint("outputs/models/smollm2-135m-instruct", err, "policy.path")
    assert "experiments/conf/scorer/orm.yaml" in checkpoint_hint("outputs/heads/arith_orm/final", err, "scorer.path")


def test_weights_finite_finds_a_nan_or_inf_in_any_parameter():
    from experiments.train import weights_finite

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1).to(torch.bfloat16))
    assert weights_finite(model)
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    assert not weights_finite(model)
    with torch.no_grad():
        model[1].bias.fill_(0.0)
        model[0].weight[1, 2] = float("nan")
    assert not weights_finite(model)


def test_a_head_seed_torch_cannot_take_names_the_setting():
    # "error: Overflow when unpacking long long", naming nothing
    from experiments.train import RunConfig

    with pytest.raises(ValueError, match=r"^run.head_seed=100000000000000000000 must be an integer from -9223372036854775808"):
        RunConfig(head_seed=10**20)
    assert RunConfig(head_seed=-1).head_seed == -1


@pytest.mark.parametrize("cut", [20, None])
def test_a_damaged_heldout_file_is_refused_on_resume_and_left_as_it_is(init_dir, finished, tmp_path, cut):
    # a torn file was trimmed further and its shorter held-out set used (the fc metrics moved); an
    # empty one turned every heldout_fc metric to null, without a word
    out = copy_run(finished, tmp_path)
    path = out / "heldout_rollouts.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-cut] if cut else b"")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds \d+ complete held-out rollouts, not this "
                                         r"run's \d+ \(\d+ problems x data.heldout_rollouts=\d+\): the file is damaged"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=4")))
    assert path.read_bytes() == (data[:-cut] if cut else b"")


def test_a_last_checkpoint_cut_between_its_renames_is_named_not_started_over(init_dir, finished, tmp_path):
    # only .last.old-* left (atomic_directory killed between its two renames): a silent fresh start
    # that rewrote metrics.jsonl from step 0
    from policies.checkpoint import DamagedCheckpointError

    out = copy_run(finished, tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    (out / "last").rename(out / ".last.old-4242-abcdefgh")
    with pytest.raises(DamagedCheckpointError, match=r"last is missing but .*\.last\.old-4242-abcdefgh holds the "
                                                     r"checkpoint before it .*rename it to"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=4")))
    assert (out / "metrics.jsonl").read_text() == rows


def test_an_sft_run_folder_is_named_as_another_commands_run_not_a_damaged_checkpoint(init_dir, tmp_path):
    # "holds a run but no complete checkpoint ... restore the files": an SFT run is not damaged
    out = Path(shutil.copytree(init_dir, tmp_path / "sft" / "last"))
    (out / "trainer_state.pt").write_bytes(b"state")  # an interrupted SFT run: its resume state only
    with pytest.raises(ValueError, match=r"holds last/trainer_state.pt of another command's run \(experiments.train_sft"):
        run_training(composed(tiny(init_dir, out.parent, "run.max_steps=1")))
    assert sorted(p.name for p in out.parent.iterdir()) == ["last"]


def test_a_sigterm_during_the_last_step_still_stops_after_saving(init_dir, tmp_path, monkeypatch):
    # the loop ended on max_steps and ignored the request: a sweep went on to its next job, exit 0
    import signal

    from experiments import train
    from policies.step_boundary import Terminated

    real_step = train.train_step

    def terminated_in_last_step(t):
        if t.step == 1:  # the last of run.max_steps=2
            signal.raise_signal(signal.SIGTERM)
        return real_step(t)

    monkeypatch.setattr(train, "train_step", terminated_in_last_step)
    out = tmp_path / "run"
    with pytest.raises(Terminated):
        run_training(composed(tiny(init_dir, out, "run.max_steps=2", "run.checkpoint_every=0")))
    assert load_joint_state(out / "last").step == 2


def test_a_run_in_bf16_throughout_leaves_its_reference_unpinned(monkeypatch):
    # train_loss.bf16 runs the reference in bf16 on every machine: pinning ref_bf16 to a machine's
    # support recorded false where the reference ran in bf16, and refused a resume that changed nothing
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    config = {"train_loss": {"kl_coef": 0.001, "ref_bf16": None, "bf16": True}}
    assert train.pinned_reference_precision(config, torch.device("cpu")) == config
    config["train_loss"]["bf16"] = False
    assert train.pinned_reference_precision(config, torch.device("cpu"))["train_loss"]["ref_bf16"] is False


def test_a_separator_that_ends_no_token_is_refused_while_the_spr_loss_is_on(init_dir, tmp_path):
    # SmolLM2 under prompt=chat kept train.yaml's ".\n\n", which no SmolLM2 token ends with: the
    # run trained with spr/steps 0, loss/spr 0 and a head that never moved, behind one warning
    with warnings.catch_warnings():  # the refusal alone: the tokenizer's warning said the same, with its source line
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"sampling.separator='@@@' ends no token of .*train_loss.spr_coef=0"):
            run_training(composed(tiny(init_dir, tmp_path / "at", "sampling.separator=@@@")))
        assert not (tmp_path / "at").exists()  # refused before the folder is claimed (a rerun with a fixed separator
        # there was refused as another run, and each refusal left the whole model in reference/)
        with pytest.raises(ValueError, match=r"a backslash and an n, not a newline"):
            run_training(composed(tiny(init_dir, tmp_path / "typed", r"sampling.separator='\n'")))
    with pytest.warns(UserWarning):
        out = run_training(composed(tiny(init_dir, tmp_path / "grpo", "sampling.separator=@@@",
                                         "train_loss=grpo_only", "run.max_steps=1")))
    assert (out / "last").is_dir()  # no SPR loss: nothing reads the steps


def test_held_out_problems_among_the_training_problems_are_refused(init_dir, tmp_path):
    # task.config.path names one file for every split: the held-out set was the first problems of
    # the training file (20 of 20), and its metrics measured training data in silence
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{k}?", "answer": f"#### {k}"}) + "\n" for k in range(60)))
    out = tmp_path / "run"
    cfg = composed(tiny(init_dir, out, "task=gsm8k", "task.module=experiments.tasks.gsm8k", "data.train_problems=40",
                        f"task.config.path={data}"))
    with pytest.raises(ValueError, match=rf"^2 of the 2 held-out problems .* among the training problems .* "
                                         rf"task.config.path={data} gives every split that one file"):
        run_training(cfg)
    assert not out.exists()


def test_a_run_diverging_after_its_checkpoints_keeps_them_and_saves_nothing_of_that_step(init_dir, tmp_path, monkeypatch):
    # the lr=1e30 run above diverges at step 1, before any checkpoint: here step 3 diverges after
    # ckpt-1, ckpt-2 and last/ (step 2) were saved; they stay as they were and nothing of step 3 lands
    import experiments.train as train_module
    from policies.train_state import load_joint_state

    calls = {"n": 0}
    finite = train_module.forward_finite

    def diverging_at_step_3(model, batch):
        calls["n"] += 1
        return calls["n"] < 3 and finite(model, batch)

    monkeypatch.setattr(train_module, "forward_finite", diverging_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(train_module.TrainingDivergedError, match=r"training diverged at step 3: the updated weights"):
        run_training(composed(tiny(init_dir, out, "run.max_steps=6", "run.checkpoint_every=1",
                                   "run.keep_checkpoints=0")))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]
    assert load_joint_state(out / "last").step == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_second_run_on_the_folder_is_refused_while_one_holds_it(init_dir, tmp_path):
    # two trainers on one out_dir (a requeued job while the old one ran) both ran, interleaving their
    # metrics rows and checkpoints; the second now stops before it claims anything
    from experiments.cli_errors import RunDirBusyError
    from experiments.search import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(RunDirBusyError, match=f"another process is writing into {out}"):
            run_training(composed(tiny(init_dir, out)))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing claimed: no config.yaml, reference/, rows
    run_training(composed(tiny(init_dir, out)))  # once free, the run goes on there
    assert (out / "metrics.jsonl").is_file()


def test_a_search_is_refused_in_a_training_runs_folder_before_its_first_row(tmp_path):
    # the trainer writes config.yaml, reference/ and heldout_rollouts.jsonl before metrics.jsonl: a
    # search let in then replaced config.yaml, and the training run could never resume
    from experiments.search import claim_run_dir

    for marker in ("reference", "heldout_rollouts.jsonl"):
        out = tmp_path / marker
        out.mkdir()
        (out / marker).mkdir() if marker == "reference" else (out / marker).write_text("{}\n")
        (out / "config.yaml").write_text("seed: 0\n")  # the trainer's
        with pytest.raises(ValueError, match=rf"holds {marker} of another command's run"):
            claim_run_dir(out, {"seed": 1})
        assert (out / "config.yaml").read_text() == "seed: 0\n"
