"""`python -m experiments.search` as a user meets it: top-level scalars validated before anything
loads, a task without problems refused up front, bad input as one `error: ...` line with exit 2
(the full traceback under HYDRA_FULL_ERROR=1; a bug keeps its traceback; a sweep's bad job does
not stop the others), config.yaml recording the budget that ran, and out_dir as the one folder
of a run (Hydra's files included) that a rerun of the same command resumes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments import group_options
from experiments.group_options import unknown_group_option
from experiments.override_keys import missing_key_error, runs_to_check
from experiments.search import with_run_budget
from cli_batch import Case, CliRuns, Run, command_env
from test_search_resume import ckpt, run_in_process  # noqa: F401 (ckpt: the module-scoped checkpoint fixture)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = ["task.count=2", "chunk=2", "search.n=2", "policy.sampling.max_total_tokens=8",
        "policy.sampling.max_step_tokens=4", "progress=false", "num_threads=1"]


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in cwd (so Hydra's default folders would land there), the repo importable."""
    return subprocess.run([sys.executable, "-m", "experiments.search", *args], cwd=cwd, env=command_env(**env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", r"^seed='abc' must be an integer$"),
        ("seed=1.5", r"^seed=1.5 must be an integer$"),
        ("num_threads=0", r"^num_threads=0 must be an integer >= 1, or null for torch's default$"),
        ("num_threads=-1", r"^num_threads=-1 must be an integer >= 1, or null for torch's default$"),
        ("budget=0", r"^budget=0 must be an integer >= 1$"),
        ("chunk=abc", r"^chunk='abc' must be an integer >= 1$"),
        ("progress=maybe", r"^progress='maybe' must be true or false$"),
        ("policy.sampling.temperature=abc", r"^policy.sampling.temperature='abc' must be a number$"),  # the policy's record
        ("policy.sampling.top_p=2", r"^policy.sampling.top_p=2 must be in \(0, 1\]$"),
        # recorded and not used: `-m search.seed=0,1` ran one draw twice, pooled as two seeds
        ("search.seed=5", r"^search.seed=5 differs from seed=0: each chunk's seed derives from the top-level seed"),
        ("search.seed=1.5", r"^search.seed=1.5 must be an integer$"),  # was told "pass seed=1.5 instead"
        ("search.seed=null", r"^search.seed=None must be an integer$"),
        # drew some problems (true: those of 1, filed under another folder name)
        ("task.seed=1.5", r"^task.seed=1.5 must be an integer$"), ("task.seed=true", r"^task.seed=True must be an integer$"),
    ],
)
def test_top_level_scalars_are_refused_before_anything_loads(override, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):  # the policy folder does not exist: never loaded
        run_in_process([override, f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("+search.bogus=1", r"^search.bogus is not a setting of BestOfNConfig; it takes: aggregation, n, seed$"),
        ("+policy.sampling.temprature=0.5", r"^policy.sampling.temprature is not a setting of SamplingConfig; "),
        ("+policy.dtyp=bf16", r"^policy.dtyp is not a setting of TransformersPolicy.from_pretrained; it takes: "
                              r"device, dtype, forked, path, prefix_cache, prompt_fn, sampling, "),
        ("+task.config.max_opps=3", r"^task.config.max_opps is not a setting of ArithConfig; "),
        ("+scorer.reduc=min", r"^scorer.reduc is not a setting of ConfidenceScorer; it takes: reduce$"),
        # nodes no class is built from: composed, recorded in config.yaml, never read
        ("+task.shuffle=true", r"^task.shuffle is not a setting of task of experiments.search; it takes: config, "),
        ("+budjet=16", r"^budjet is not a setting at the top level of experiments.search; it takes: batching, budget, "),
    ],
)
def test_an_unknown_setting_is_named_before_anything_loads(override, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_in_process([override, f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


@pytest.mark.parametrize("overrides, message", [
    (["task.module=experiments.tasks.nosuch"],  # a ModuleNotFoundError traceback
     r"^task.module='experiments.tasks.nosuch' cannot be imported: No module named 'experiments.tasks.nosuch'$"),
    (["policy.prompt_fn.path=experiments.tasks.arith.nosuch"],  # Hydra's multi-line InstantiationException
     r"^policy.prompt_fn.path='experiments.tasks.arith.nosuch' names no function \(Error loading "),
    # a plain scorer's settings: named only after the policy had loaded and the folder was written
    (["scorer.reduce=median"], r"^ConfidenceScorer.reduce='median'; valid: mean, min$"),
    (["scorer=oracle", "scorer.unfinished=2"], r"^OutcomeOracleScorer.unfinished=2 must be a number in \[0, 1\]$"),
    # refused by with_temperature once the engine (or the server's model list) had answered, naming VLLMPolicy
    (["policy=openai", "policy.base_url=http://127.0.0.1:9", "search=beam", "search.lookahead=1",
      "search.lookahead_temperature=0.005"], r"^search.lookahead_temperature: temperature=0.005 is below vLLM's smallest"),
    (["policy=vllm", "search=dvts", "search.lookahead=1", "search.lookahead_temperature=0.001"],
     r"^search.lookahead_temperature: temperature=0.001 is below vLLM's smallest"),
])
def test_a_task_prompt_or_plain_scorer_that_cannot_work_is_named_before_anything_loads(overrides, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):  # the policy folder does not exist: never loaded
        run_in_process([*overrides, f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


@pytest.mark.parametrize(("name", "problems", "message"), [
    ("empty_task", "[]", r"^task empty_task \(split='test', count=100\) has no problems"),
    ("twice_task", "[Problem('a', '1+1?', '2'), Problem('b', '1+2?', '3'), Problem('a', '2+2?', '4')]",
     r"^task twice_task: problems 1 and 3 share the id 'a': ids must be unique"),
])
def test_a_task_whose_problems_cannot_run_is_refused_before_the_policy_or_the_folder(
    monkeypatch, tmp_path, name, problems, message,
):
    """No problems, or two of one id (a run would write two rows of it and count one short)."""
    (tmp_path / f"{name}.py").write_text(
        "from experiments.tasks.arith import prompt_text, grade, extract_answer\n"
        "from treesearch.records import Problem\n"
        f"def generate_problems(split, count, seed, cfg):\n    return {problems}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_in_process([f"task.module={name}", f"policy.path={tmp_path / 'nope'}", f"out_dir={out}"])
    assert not out.exists()


def test_a_finished_run_resumes_without_loading_the_policy(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_in_process([f"policy.path={ckpt}", f"out_dir={out}"] + TINY)
    rows = (out / "records.jsonl").read_text()
    # nothing left to do (the problems check passes on the task's problems): no policy is
    # loaded and the metrics are rewritten
    (out / "metrics.json").unlink()
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    run_in_process([f"policy.path={ckpt}", f"out_dir={out}"] + TINY)
    assert (out / "records.jsonl").read_text() == rows and json.loads((out / "metrics.json").read_text())["problems"] == 2


def test_config_yaml_records_the_budget_that_ran(ckpt, tmp_path):
    out = tmp_path / "run"
    run_in_process([f"policy.path={ckpt}", f"out_dir={out}"] + TINY)  # budget stays 8, search.n=2 runs
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.budget == saved.search.n == 2
    assert json.loads((out / "metrics.json").read_text())["budget"] == 2
    # a folder saved before (budget: 8 beside search.n: 2) still resumes
    saved.budget = 8
    OmegaConf.save(saved, out / "config.yaml")
    run_in_process([f"policy.path={ckpt}", f"out_dir={out}"] + TINY)


def test_mcts_with_a_token_budget_keeps_budget_as_its_filing_n():
    mcts = {"budget": 4, "search": {"iterations": 16, "token_budget": 100}}
    assert with_run_budget(mcts, "iterations") == mcts
    assert with_run_budget({"budget": 8, "search": {"iterations": 4, "token_budget": None}}, "iterations")["budget"] == 4
    assert with_run_budget({"budget": 8, "search": {"n": 1}}, "n")["budget"] == 1  # greedy is Best-of-1


def test_bad_input_is_one_error_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    done = run_cli(["seed=abc", f"out_dir={out}"], cwd=tmp_path)
    assert (done.returncode, done.stderr.strip()) == (2, "error: seed='abc' must be an integer")
    assert not out.exists() and not (tmp_path / "outputs").exists()  # no folder left behind, Hydra's neither
    full = run_cli(["seed=abc", f"out_dir={out}"], cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr
    assert full.stderr.strip().endswith("ValueError: seed='abc' must be an integer")
    # the default run folder: the outputs/search/ Hydra made above it in a new directory goes too
    # (it stayed, empty), while a folder that holds anything stays
    (tmp_path / "used" / "outputs" / "keep").mkdir(parents=True)
    (tmp_path / "used" / "outputs" / "keep" / "f").touch()
    for cwd, kept in ((tmp_path / "new", []), (tmp_path / "used", ["outputs", "outputs/keep", "outputs/keep/f"])):
        cwd.mkdir(exist_ok=True)
        assert run_cli(["seed=abc"], cwd=cwd).returncode == 2
        assert cwd.is_dir() and sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == kept  # not above it


UNKNOWN_GROUP_OPTIONS = [
    ("experiments.search", ["search=nosuch"],
     "error: search=nosuch is not an option of group search; valid: beam, best_of_n, dvts, greedy, mcts, particle_filtering, rebase"),
    ("experiments.search", ["-m", "scorer=sprm,prm"], "error: scorer=prm is not an option of group scorer; valid: "),
    ("experiments.search", ["+experiment=nope"], "error: experiment=nope is not an option of group experiment; "),
    ("experiments.train", ["recipe=nope"], "error: recipe=nope is not an option of group recipe; valid: grpo_countdown"),
]


@pytest.mark.parametrize("module, args, message", UNKNOWN_GROUP_OPTIONS)
def test_an_unknown_group_option_is_one_error_line_before_hydra_composes(module, args, message, cli_runs):
    assert_one_error_line_before_hydra(cli_runs[Case(module, tuple(args))], message)


OUT_DIR_FILES = [
    ("experiments.search", "notes.txt", "error: out_dir=notes.txt is an existing file; give a folder"),
    ("experiments.train", "notes.txt/run", "error: out_dir=notes.txt/run lies under notes.txt, an existing file; give a folder"),
]


def out_dir_file_case(module: str, out: str) -> Case:
    """`out_dir=<out>` run in a folder holding the file notes.txt."""
    return Case(module, (f"out_dir={out}",), files=(("notes.txt", "mine"),))


@pytest.mark.parametrize("module, out, message", OUT_DIR_FILES)
def test_an_out_dir_that_is_a_file_is_one_error_line_before_hydra_makes_it(module, out, message, cli_runs):
    # Hydra's FileExistsError traceback before
    done = cli_runs[out_dir_file_case(module, out)]
    assert_one_error_line_before_hydra(done, message)
    assert (done.cwd / "notes.txt").read_text() == "mine"


def test_one_job_submitted_with_m_keeps_its_out_dir():
    # `-m hydra/launcher=submitit_slurm ... out_dir=X` (one run through a launcher) was refused as a sweep
    from experiments.out_dir_args import out_dir_error

    conf = REPO / "experiments" / "conf"
    assert out_dir_error(["-m", "task.count=2", "out_dir=runs/x"], conf, "search") is None
    assert out_dir_error(["-m", "budget=range(2,3)", "out_dir=runs/x"], conf, "search") is None  # one value
    assert out_dir_error(["-m", "budget=range(2,4)", "out_dir=runs/x"], conf, "search").startswith("error: out_dir=")
    # budget_sweep narrowed to one job by overriding each of its swept keys, as Hydra's sweeper merges them
    narrowed = ["experiment=budget_sweep", "search=beam", "budget=4", "seed=0", "out_dir=runs/x"]
    assert out_dir_error(narrowed, conf, "search") is None
    assert out_dir_error(narrowed[:-2] + ["out_dir=runs/x"], conf, "search").startswith("error: out_dir=")
    # an interval (for a sampling sweeper) cannot be counted: several jobs, not a traceback
    assert out_dir_error(["-m", "budget=interval(1,2)", "out_dir=runs/x"], conf, "search").startswith("error: out_dir=")


SWEEPS_GIVEN_ONE_OUT_DIR = [["-m", "budget=2,4", "out_dir=runs/x"], ["experiment=budget_sweep", "out_dir=runs/x"]]


@pytest.mark.parametrize("args", SWEEPS_GIVEN_ONE_OUT_DIR)
def test_a_sweep_given_one_out_dir_is_one_error_line_before_hydra_runs(args, cli_runs):
    # every job of the sweep went to one folder: the second was refused with advice no sweep can follow
    done = cli_runs[Case("experiments.search", tuple(args))]
    assert_one_error_line_before_hydra(done, (
        "error: out_dir=runs/x with a sweep sends every job to that one folder; name the sweep's folder with "
        "hydra.sweep.dir=runs/x instead (each job gets a sub-folder of it)"))
    assert not (done.cwd / "runs").exists()


def assert_one_error_line_before_hydra(done: Run, message: str) -> None:
    """The run of `python -m module *args` (HYDRA_FULL_ERROR unset; `cli_runs`) exited 2 with one
    stderr line starting with message, and neither Hydra nor the run made a folder."""
    assert done.returncode == 2 and done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (done.cwd / "outputs").exists() and not (done.cwd / "multirun").exists()


def test_group_options_checks_only_plain_group_choices():
    conf = REPO / "experiments" / "conf"
    for fine in (["search=beam", "task=gsm8k", "policy=tiny_sprm"], ["-m", "search=best_of_n,beam", "budget=4,8"],
                 ["search.n=4", "hydra/job_logging=nosuch", "search=glob(*)", "+scorer.bogus=1", "seed=3"],
                 ["-m", "hydra/launcher=local,submitit_slurm", "hydra/sweeper=basic"]):
        assert unknown_group_option(fine, conf) is None, fine  # others are Hydra's or config_keys' to judge
    assert unknown_group_option(["++task=gsm9k"], conf).startswith("error: task=gsm9k is not an option")


def test_hydra_launcher_and_sweeper_options_are_checked_with_the_installed_plugins(monkeypatch):
    conf = REPO / "experiments" / "conf"
    assert unknown_group_option(["-m", "hydra/launcher=slurm"], conf) == (
        "error: hydra/launcher=slurm is not an option of group hydra/launcher; valid: basic, joblib, local, "
        "submitit_local, submitit_slurm (a Hydra plugin's options appear once its package is installed)")
    assert unknown_group_option(["hydra/sweeper=optuna"], conf).startswith(
        "error: hydra/sweeper=optuna is not an option of group hydra/sweeper; valid: basic (")
    # without the plugins (a leaner install): the project's launcher files are named with what to install
    monkeypatch.setattr(group_options, "plugin_options", lambda group: {"basic"})
    assert unknown_group_option(["hydra/launcher=local"], conf) == (
        "error: hydra/launcher=local needs Hydra's hydra-joblib-launcher plugin, which is not installed: "
        "pip install hydra-joblib-launcher")
    assert unknown_group_option(["-m", "hydra/launcher=submitit_slurm"], conf).endswith("pip install hydra-submitit-launcher")


MISSING_KEYS = [
    ("experiments.search", ["search=mcts", "search.n=16"],
     "error: search.n is not a setting of MCTSConfig; it takes: aggregation, backup, c_puct, expand_width, "),
    ("experiments.search", ["-m", "search=beam,rebase", "search.dedup=true"],
     "error: search.dedup is not a setting of RebaseConfig; it takes: aggregation, balance_temperature, "),
    ("experiments.search", ["-m", "search=beam,dvts", "budget=4,8", "search.lookahead=1"],
     "error: search.lookahead is not in the config a sweep starts from (Hydra composes it with every swept group "
     "at its default before the jobs); write ++search.lookahead=1 to set it in every job"),
    ("experiments.search", ["-m", "hydra/launcher=local", "hydra.launcher.n_job=2"],
     "error: hydra.launcher.n_job is not a setting of hydra.launcher (it has: _target_, backend, batch_size, "),
    ("experiments.search", ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"],
     "error: hydra.launcher.partiton is not a setting of hydra.launcher (it has: _target_, account, "),
    ("experiments.search", ["policy.sampling.temprature=0.5"],
     "error: policy.sampling.temprature is not a setting of SamplingConfig; it takes: batch_size, "),
    # the `+task.bogus=3` it suggested then ran, with the key recorded and never read
    ("experiments.search", ["task.bogus=3"], "error: task.bogus is not a setting of task of experiments.search; it takes: "
     "config, count, module, seed, split"),
    ("experiments.search", ["budjet=3"], "error: budjet is not a setting at the top level of experiments.search; "
     "it takes: batching, budget, "),
    # one the search reads that the config does not hold keeps the + that adds it
    ("experiments.search", ["batching=continuous"],
     "error: batching is not in the config (Hydra adds a new key only as +batching=continuous)"),
    ("experiments.train", ["run.max_step=5"], "error: run.max_step is not a setting of RunConfig; it takes: "),
]


@pytest.mark.parametrize("module, args, message", MISSING_KEYS)
def test_an_override_of_a_missing_key_is_one_error_line_before_hydra_runs(module, args, message, cli_runs):
    assert_one_error_line_before_hydra(cli_runs[Case(module, tuple(args))], message)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> CliRuns:
    """The runs of the bad-input cases above, each in a folder of its own: those of one command in
    one child Python that imports once (tests/cli_batch.py; test_bad_input_is_one_error_line_and_exit_2
    runs a real `python -m experiments.search`)."""
    return CliRuns([*(Case(module, tuple(args)) for module, args, _ in UNKNOWN_GROUP_OPTIONS + MISSING_KEYS),
                    *(out_dir_file_case(module, out) for module, out, _ in OUT_DIR_FILES),
                    *(Case("experiments.search", tuple(args)) for args in SWEEPS_GIVEN_ONE_OUT_DIR)],
                   tmp_path_factory.mktemp("cli_runs"))


def test_override_keys_composes_each_swept_group_option_and_leaves_flags_to_hydra():
    conf = REPO / "experiments" / "conf"
    runs = runs_to_check(["-m", "search=beam,rebase", "budget=4,8", "seed=0,1", "+search.x=1"], conf)
    assert runs == [["search=beam", "budget=4", "seed=0", "+search.x=1"], ["search=rebase", "budget=4", "seed=0", "+search.x=1"]]
    for fine in (["search=beam", "search.lookahead=1", "search.lookahead_temperature=null"],
                 ["-m", "search=beam,dvts", "budget=4,8", "++search.lookahead=1"], ["--cfg", "job", "search.bogus=1"],
                 ["+search.bogus=1"], ["search=beam", "budget=4,8"]):
        assert missing_key_error(fine, conf, "search") is None, fine  # valid, Hydra's, or config_keys' to judge
    # a glob over a group is listed from its options (it ended in "ConfigLoader is not set", a
    # traceback); an interval, which the basic sweeper cannot run, is left to Hydra
    runs = runs_to_check(["-m", "search=glob(*,exclude=[greedy,mcts])", "budget=4"], conf)
    assert [run[0] for run in runs] == ["search=beam", "search=best_of_n", "search=dvts", "search=particle_filtering",
                                        "search=rebase"]
    assert missing_key_error(["-m", "search=glob(*)", "search.n=3"], conf, "search").startswith(
        "error: search.n is not a setting of MCTSConfig")
    assert runs_to_check(["-m", "seed=interval(0,1)"], conf) == []
    # "+" on a key the config holds: Hydra's multi-line "Could not append to config" and exit 1 before
    assert missing_key_error(["+search.n=3"], conf, "search") == (
        "error: +search.n: search.n is in the config already; set it without the + (search.n=3)")
    assert missing_key_error(["-m", "+search.n=1,2"], conf, "search").endswith("(search.n=1,2)")  # (search.n=1) before
    assert missing_key_error(["policy=smollm2", "+policy.dtype=bfloat16"], conf, "search").startswith(
        "error: +policy.dtype: policy.dtype is in the config already")


def test_greedy_with_a_temperature_override_is_refused(ckpt, tmp_path):
    # it sampled at 0.8 in silence, and its rows then read as Best-of-1 (scaling refused their copies)
    done = run_cli(["search=greedy", "policy.sampling.temperature=0.8", f"policy.path={ckpt}", "task.count=2",
                    f"out_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: search=greedy decodes at temperature 0, but policy.sampling.temperature=0.8: drop the temperature "
        "override for greedy runs (sweep it with search=best_of_n search.n=1)"], done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_hydra_job_chdir_is_refused(ckpt, tmp_path):
    # out_dir=rel/x wrote its records into rel/x/rel/x, and a relative policy.path was not found
    done = run_cli(["hydra.job.chdir=true", f"policy.path={ckpt}", "task.count=2", "out_dir=rel/x"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: hydra.job.chdir=true is not supported: out_dir, policy.path and the config's other relative paths "
        "are read from where the command runs; leave hydra.job.chdir false"], done.stderr[-2000:]
    assert not list(tmp_path.rglob("records.jsonl"))


def test_a_server_that_does_not_answer_is_one_error_line(ckpt, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run_cli(["policy=openai", f"policy.path={ckpt}", f"policy.base_url=http://127.0.0.1:{port}",
                    "policy.max_retries=0", "progress=false", f"out_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: no OpenAI-compatible server answers at http://127.0.0.1:{port}")


def test_a_server_that_refuses_the_key_is_one_error_line_and_leaves_no_folder(ckpt, tmp_path):
    # an error answer (401 for a wrong API key, 5xx of a dead engine) was a traceback beside a
    # half-made run folder, where a server that did not answer was one line
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "Unauthorized"}}')

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_cli(["policy=openai", f"policy.path={ckpt}", f"policy.base_url=http://127.0.0.1:{server.server_address[1]}",
                        "policy.max_retries=0", "progress=false", f"out_dir={tmp_path / 'run'}"], cwd=tmp_path)
    finally:
        server.shutdown()
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "/v1/models answered 401: " in done.stderr and "set $OPENAI_API_KEY" in done.stderr
    assert not (tmp_path / "run").exists()


def test_an_internal_error_keeps_its_traceback(tmp_path):
    (tmp_path / "broken_task.py").write_text(  # importable: `python -m` puts the cwd on sys.path
        "def generate_problems(split, count, seed, cfg):\n    raise RuntimeError('a bug in the task')\n"
        "def prompt_text(problem):\n    return problem.question\n"  # policy.prompt_fn's path is checked first
        "def grade(problem, text):\n    return False\n"
        "def extract_answer(text):\n    return None\n"  # a module without them is refused first (`import_task`)
    )
    done = run_cli(["task.module=broken_task", f"out_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: a bug in the task" in done.stderr


def test_out_dir_is_the_one_folder_of_a_run_and_a_rerun_resumes(ckpt, tmp_path):
    out = tmp_path / "run"
    args = [f"policy.path={ckpt}", f"out_dir={out}"] + TINY
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == {"run"}  # no outputs/search/... beside it
    assert {".hydra", "search.log", "records.jsonl", "config.yaml", "metrics.json"} <= {p.name for p in out.iterdir()}
    rows = (out / "records.jsonl").read_text()
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "records.jsonl").read_text() == rows  # resumed: nothing rerun, nothing duplicated
    hydra_files = {name: (out / ".hydra" / name).read_text() for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    assert "- seed=0" not in hydra_files["overrides.yaml"] and f"- out_dir={out}" in hydra_files["overrides.yaml"]
    refused = run_cli(args + ["seed=1"], cwd=tmp_path)  # another config: refused, the folder untouched
    assert refused.returncode == 2 and "holds records of a different config (search.seed: 0 -> 1; seed: 0 -> 1)" in refused.stderr
    assert {name: (out / ".hydra" / name).read_text() for name in hydra_files} == hydra_files
    assert (out / "records.jsonl").read_text() == rows


def test_a_sweep_reports_each_bad_job_in_one_line_and_runs_the_others(ckpt, tmp_path):
    # Hydra named only the first failed job: a second one's folder went without a word
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", f"policy.path={ckpt}", f"hydra.sweep.dir={sweep}", "seed=abc,0,xyz"] + TINY, cwd=tmp_path)
    assert done.returncode == 1
    assert re.search(r"error: job #0 \(policy.path=[^ ]*,seed=abc,[^ ]*\): seed='abc' must be an integer", done.stderr)
    assert re.search(r"error: job #2 \(policy.path=[^ ]*,seed=xyz,[^ ]*\): seed='xyz' must be an integer", done.stderr)
    assert "error: a job of the sweep was refused" in done.stderr and "Traceback" not in done.stderr
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]  # the refused job's folder is gone
    assert "seed=0" in job.name and (job / "metrics.json").is_file()


def test_a_sweep_job_of_another_config_is_told_to_go_on_alone_not_with_the_sweeps_overrides(ckpt, tmp_path):
    # "add `policy.sampling.temperature=0.7` to go on": added to the sweep it renamed every job's
    # folder, searched them all again and left the refused one as it was
    sweep = tmp_path / "sweep"
    args = ["-m", f"policy.path={ckpt}", f"hydra.sweep.dir={sweep}", "seed=0"] + TINY
    assert run_cli(args, cwd=tmp_path).returncode == 0
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    saved = OmegaConf.load(job / "config.yaml")
    saved.policy.sampling.temperature = 0.7
    OmegaConf.save(saved, job / "config.yaml")
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 1 and "holds records of a different config" in done.stderr
    assert (f"use another hydra.sweep.dir (or delete that job's folder); or go on with it as it ran by running that "
            f"job alone with `out_dir={job} policy.sampling.temperature=0.7`") in done.stderr


def test_a_full_disk_is_one_error_line_and_keeps_the_rows_written(ckpt, tmp_path, monkeypatch, capsys):
    # a Hydra traceback ending in "OSError: [Errno 28] No space left on device" before
    import errno

    from experiments import search

    out = tmp_path / "run"
    appended = []

    def fills_up(path, rows):
        if appended:
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(len(rows))
        real_append(path, rows)

    real_append = search.append_rows
    monkeypatch.setattr(search, "append_rows", fills_up)
    monkeypatch.setattr(sys, "argv", ["search", f"policy.path={ckpt}", f"out_dir={out}", "chunk=1", "task.count=3",
                                      *TINY[2:]])
    with pytest.raises(SystemExit) as exit_info:
        search.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith(f"error: cannot write {out}: No space left on device (the rows already in records.jsonl")
    assert len((out / "records.jsonl").read_text().splitlines()) == appended[0] == 1


def test_only_a_full_or_read_only_place_is_called_unwritable():
    # an unreadable input file (EACCES) was reported as "cannot write ... free space"
    import errno

    from experiments.cli_errors import is_storage_error

    assert is_storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_error(OSError(errno.EROFS, "Read-only file system"))
    assert not is_storage_error(PermissionError(errno.EACCES, "Permission denied", "g.jsonl"))
    assert not is_storage_error(OSError(errno.EIO, "Input/output error"))


def test_a_users_scorer_class_is_built_once(tmp_path, monkeypatch, ckpt):
    # the up-front check built every class-target scorer, so a user's scorer that loads a model
    # in __init__ loaded it twice
    (tmp_path / "counting_scorer.py").write_text(
        "from scorers.confidence import ConfidenceScorer\n"
        "BUILT = []\n"
        "class CountingScorer(ConfidenceScorer):\n"
        "    def __init__(self, **kwargs):\n"
        "        BUILT.append(1)\n"
        "        super().__init__(**kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import counting_scorer

    run_in_process([f"policy.path={ckpt}", f"out_dir={tmp_path / 'run'}", "scorer._target_=counting_scorer.CountingScorer",
                    *TINY])
    assert len(counting_scorer.BUILT) == 1



def test_a_run_folder_given_for_its_saved_model_is_named_before_the_run_folder_is_written(ckpt, tmp_path):
    # policy.path=outputs/checkpoints/tiny-arith (SFT's run folder; the model is in final/) said
    # "train the default tiny policy" after claiming the run folder
    run = tmp_path / "checkpoints" / "tiny-arith"
    shutil.copytree(ckpt, run / "final")
    out = tmp_path / "search"
    done = run_cli([f"policy.path={run}", f"out_dir={out}", "task.count=1"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: checkpoint folder {run} has no config.json. The model is saved in {run / 'final'}: "
        f"point policy.path= at it (policy.path={run / 'final'})")
    assert not out.exists()


def test_interrupt_reported_is_one_line_and_exit_130_unless_the_full_error_is_wanted(capsys, monkeypatch):
    from experiments.cli_errors import interrupt_reported

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop, interrupt_reported("rerun to go on"):
        raise KeyboardInterrupt
    assert stop.value.code == 130 and capsys.readouterr().err == "\ninterrupted: rerun to go on\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyboardInterrupt), interrupt_reported("rerun to go on"):
        raise KeyboardInterrupt


def test_a_trainer_that_saved_on_sigterm_exits_143_terminated(capsys, tmp_path, monkeypatch):
    # the demo's SFT stage caught SIGTERM, saved last/ and re-raised TrainingInterrupted(terminated=True):
    # reported "interrupted", exit 130, as a Ctrl-C
    from experiments.cli_errors import interrupt_reported
    from policies.sft_resume import TrainingInterrupted

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop, interrupt_reported("rerun to go on"):
        raise TrainingInterrupted(3, tmp_path / "last", terminated=True)
    assert stop.value.code == 143 and capsys.readouterr().err == "\nterminated: rerun to go on\n"
    with pytest.raises(SystemExit) as stop, interrupt_reported("rerun to go on"):
        raise TrainingInterrupted(3, tmp_path / "last")
    assert stop.value.code == 130


def test_sigterm_runs_the_cleanup_and_is_one_line_and_exit_143(tmp_path):
    # SIGTERM (kill, timeout, a SLURM cancel) ended the process where it was: a vLLM engine in
    # its own processes stayed alive with 2.4 GB; now it unwinds like Ctrl-C
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from experiments.cli_errors import interrupt_reported\n"
        "with interrupt_reported('rerun to go on'):\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        for _ in range(300):\n"  # short sleeps: a SIGTERM landing after Python's last check for
        "            time.sleep(0.1)\n"  # signals and before one long sleep began waited the sleep out (CI)
        "    finally:\n"
        f"        Path({str(tmp_path / 'closed')!r}).write_text('yes')\n"
    )
    code, err = terminated_child(script, {})
    assert code == 143 and err == "\nterminated: rerun to go on\n"
    assert (tmp_path / "closed").read_text() == "yes"
    code, err = terminated_child(script, {"HYDRA_FULL_ERROR": "1"})  # the traceback, and still a kill's status (1 before)
    assert code == 143 and "Terminated" in err


def terminated_child(script: str, env: dict[str, str]) -> tuple[int, str]:
    """(exit status, stderr) of `python -c script` sent SIGTERM once it printed "ready"."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    try:
        assert child.stdout.readline().strip() == "ready"
        child.terminate()
        _, err = child.communicate(timeout=20)
    finally:
        child.kill()
    return child.returncode, err


def test_a_run_refused_before_its_first_row_leaves_no_claimed_folder(ckpt, tmp_path):
    # a missing scorer folder (found when the scorer loads) left config.yaml, weights.json, .hydra/
    # and .lock behind: a sweep's table then named the job as one not started
    out = tmp_path / "search"
    done = run_cli([f"policy.path={ckpt}", "scorer=orm", f"scorer.path={tmp_path / 'no_head'}", f"out_dir={out}",
                    "task.count=1"], cwd=tmp_path)
    assert done.returncode == 2 and "no_head does not exist" in done.stderr
    assert not out.exists()
    # a folder of the user's with a file of theirs keeps that file, and only that
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = run_cli([f"policy.path={ckpt}", "scorer=orm", f"scorer.path={tmp_path / 'no_head'}", f"out_dir={out}",
                    "task.count=1"], cwd=tmp_path)
    # (Hydra's log of the refused job, search.log, went too: one was left in a training run's folder)
    assert done.returncode == 2 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    # an earlier run's log is the folder's own: kept
    (out / "search.log").write_text("an earlier run\n")
    done = run_cli([f"policy.path={ckpt}", "scorer=orm", f"scorer.path={tmp_path / 'no_head'}", f"out_dir={out}",
                    "task.count=1"], cwd=tmp_path)
    assert done.returncode == 2 and (out / "search.log").read_text().startswith("an earlier run\n")


def test_the_ctrl_c_hint_of_a_sweep_names_its_folder(monkeypatch):
    # "rerun the same command" started an ad-hoc sweep over in a new timestamped folder
    from experiments import cli_errors

    monkeypatch.setattr(cli_errors, "_SWEEP_DIR", [])
    assert cli_errors.hydra_rerun_hint("kept") == "kept; rerun the same command to go on"
    monkeypatch.setattr(cli_errors, "_SWEEP_DIR", ["outputs/sweeps/2026-12-05_21-05-05"])
    assert cli_errors.hydra_rerun_hint("kept") == (
        "kept; rerun the same command with hydra.sweep.dir=outputs/sweeps/2026-12-05_21-05-05 (its folder) to go on")
    cli_errors.note_hydra_job(out_dir="runs/one")  # -m with one job writing to its out_dir: the same command finds it
    assert cli_errors.hydra_rerun_hint("kept") == "kept; rerun the same command to go on"


def test_continuous_batching_with_another_backend_is_refused_before_it_loads():
    # a vLLM engine started (10 s) before "batching=continuous needs the in-process transformers policy"
    from experiments.search import check_batching

    for target in ("policies.vllm_policy.VLLMPolicy.from_pretrained", "policies.openai_policy.OpenAIPolicy.from_pretrained"):
        with pytest.raises(ValueError, match=f"batching=continuous needs the in-process transformers policy .* not {target}"):
            check_batching("continuous", target)
        assert check_batching("lockstep", target) == "lockstep"
    assert check_batching("continuous", "policies.transformers_policy.TransformersPolicy.from_pretrained") == "continuous"


def _reflective_folder(tmp_path: Path) -> Path:
    from policies.reflective_model import ReflectiveModel
    from scorers.sprm_head import build_sprm_head
    from test_sprm import LM, TOK

    return ReflectiveModel(LM, build_sprm_head(64)).save_pretrained(tmp_path / "refl", TOK)


@pytest.mark.parametrize("head, extra, error, message", [
    (True, ["scorer.feature_layer=9"], ValueError, r"feature_layer=9 must index the 3 hidden states"),
    (False, [], FileNotFoundError, r"no SPRM head file .*score_module.pt .*A reflective checkpoint"),
])
def test_a_head_scorers_folder_is_checked_before_the_policy_loads(ckpt, tmp_path, monkeypatch, head, extra, error, message):
    # scorer=sprm_forward / vllm_sprm named a bad feature_layer or a missing head after the policy
    # had loaded (minutes of a vLLM engine on a GPU), and a vLLM run's log kept the folder
    folder = _reflective_folder(tmp_path) if head else ckpt
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        run_in_process([f"policy.path={folder}", "scorer=sprm_forward", f"out_dir={out}", *TINY, *extra])
    assert not out.exists()


def test_vllm_sprm_in_a_child_process_is_refused_before_anything_loads(tmp_path, monkeypatch):
    # the feature-layer class is registered in this process only: vLLM's child said "architectures not supported"
    folder = _reflective_folder(tmp_path)
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    with pytest.raises(ValueError, match=r"scorer.engine.multiprocessing=true: the SPRM's feature layer is read"):
        run_in_process([f"policy.path={folder}", "scorer=vllm_sprm", "scorer.engine.multiprocessing=true",
                        f"out_dir={tmp_path / 'run'}", *TINY])


@pytest.mark.parametrize("overrides, key", [
    (["policy.engine.multiprocessing=true"], "multiprocessing"),
    (["scorer.engine.cache_root=/tmp/elsewhere"], "cache_root"),
])
def test_a_vllm_policy_and_scorer_of_other_process_settings_are_refused_before_anything_loads(tmp_path, monkeypatch,
                                                                                              overrides, key):
    # vLLM reads them once per process: the scorer's engine refused them after the policy's had loaded
    folder = _reflective_folder(tmp_path)
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    with pytest.raises(ValueError, match=rf"policy.engine.{key}=.* and scorer.engine.{key}=.*: vLLM reads .* once per process"):
        run_in_process(["policy=vllm", f"policy.path={folder}", "scorer=vllm_sprm", *overrides,
                        f"out_dir={tmp_path / 'run'}", *TINY])


def test_two_vllm_engines_sized_from_the_gpu_must_fit_on_it_together(tmp_path, monkeypatch):
    # a GPU preset (kv_cache_gib null) with scorer=vllm_sprm asked 0.9 + 0.9 of the GPU: the scorer's
    # engine failed to start after the policy's had loaded
    folder = _reflective_folder(tmp_path)
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    gpu_sized = ["policy=vllm", f"policy.path={folder}", "scorer=vllm_sprm", "policy.engine.kv_cache_gib=null",
                 f"out_dir={tmp_path / 'run'}", *TINY]
    with pytest.raises(ValueError, match=r"policy.engine.gpu_memory_utilization=0.9 and scorer.engine.gpu_memory_utilization=0.9 "
                                         r"sum above 1: .* e.g. policy.engine.gpu_memory_utilization=0.55"):
        run_in_process(gpu_sized)
    from hydra import compose, initialize_config_dir

    from experiments.search import CONFIG_DIR, check_engines_agree

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        split = compose("search", overrides=gpu_sized[:4] + ["policy.engine.gpu_memory_utilization=0.55",
                                                              "scorer.engine.gpu_memory_utilization=0.3"])
    check_engines_agree(split)  # shares that fit pass
    # on a GPU every vLLM worker asks for its share free at start, whatever its kv_cache_gib
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        kv_set = compose("search", overrides=gpu_sized[:3])  # policy=vllm's kv_cache_gib 1.0, the scorer's too
    check_engines_agree(kv_set)  # on this CPU: sized in bytes, no share asked
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ValueError, match="sum above 1"):
        check_engines_agree(kv_set)


def test_a_forward_scorer_run_saved_before_its_dtype_setting_resumes(tmp_path):
    # scorer.dtype was added to scorer=sprm_forward: a folder saved without it was refused
    # ("scorer.dtype: <absent> -> 'float32'") with nothing to add that resumes it
    from experiments.search import ADDED_SETTINGS
    from treesearch.config_diff import config_differences, with_added_settings

    current = {"scorer": {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "batch_size": 16, "dtype": "float32"}}
    saved = {"scorer": {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "batch_size": 16}}
    assert config_differences(with_added_settings(saved, current, ADDED_SETTINGS), current) == []
    assert config_differences(with_added_settings(saved, {"scorer": {**current["scorer"], "dtype": "bfloat16"}},
                                                  ADDED_SETTINGS), {"scorer": {**current["scorer"], "dtype": "bfloat16"}}) == [
        "scorer.dtype: 'float32' -> 'bfloat16'"]


def test_a_scorers_error_in_continuous_batching_names_its_problem(ckpt, tmp_path):
    # search_each notes the problem on the error, but the one-line `error: ...` printed str(err) alone
    (tmp_path / "boom_scorer.py").write_text(
        "import dataclasses\n"
        "from scorers.confidence import ConfidenceScorer\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class BoomScorer(ConfidenceScorer):\n"
        "    target: str = ''\n"
        "    def score(self, paths):\n"
        "        if any(p.problem.id == self.target for p in paths):\n"
        "            raise ValueError('scorer input too long')\n"
        "        return super().score(paths)\n")
    from experiments.tasks import arith

    target = arith.generate_problems("test", 3, seed=0)[1].id
    done = run_cli(["search=beam", "search.n=4", "+batching=continuous", f"policy.path={ckpt}", *TINY[:1],
                    "task.count=3", "progress=false", "scorer._target_=boom_scorer.BoomScorer", f"+scorer.target={target}",
                    f"out_dir={tmp_path / 'run'}"], cwd=tmp_path, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: scorer input too long; in the search of problem {target!r}"


def test_connection_settings_resume_and_an_api_key_stays_out_of_the_run_files(tmp_path):
    # the timeout error's advice ("raise timeout_s") was refused as another config; an API key
    # given on the command line was saved in config.yaml (and named the default folder)
    import yaml

    from experiments.search import claim_run_dir

    out = tmp_path / "run"
    out.mkdir()
    config = {"policy": {"path": "p", "timeout_s": 1.0, "max_retries": 0, "api_key": "sk-SECRET123"},
              "scorer": {"timeout_s": 5.0}, "seed": 0}
    claim_run_dir(out, config)
    assert "sk-SECRET123" not in (out / "config.yaml").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["policy"]["api_key"] == "<redacted>"
    (out / "records.jsonl").write_text('{"problem_id": "a"}\n')
    claim_run_dir(out, {**config, "policy": {**config["policy"], "timeout_s": 30.0, "max_retries": 10,
                                             "api_key": "sk-ROTATED"}, "scorer": {"timeout_s": 60.0}})
    # the README's two forms of one server's URL (and a server moved to another port): the served
    # model's id guards the rows (`run_weights.check_served_models`)...
    served = {**config, "policy": {**config["policy"], "base_url": "http://127.0.0.1:8000"}}
    served_run = tmp_path / "served"
    served_run.mkdir()
    claim_run_dir(served_run, served)
    (served_run / "records.jsonl").write_text('{"problem_id": "a"}\n')
    moved = {**served, "policy": {**served["policy"], "base_url": "http://10.0.0.5:9000/v1"}}
    # ...where weights.json keeps it: rows made before the ids were kept are named by their URL alone
    with pytest.raises(ValueError, match=r"policy.base_url: 'http://127.0.0.1:8000' -> 'http://10.0.0.5:9000/v1'"):
        claim_run_dir(served_run, moved)
    (served_run / "weights.json").write_text('{"policy.served_model": {"model": "/models/A"}}\n')
    claim_run_dir(served_run, moved)
    with pytest.raises(ValueError, match=r"policy.path: 'p' -> 'q'"):
        claim_run_dir(out, {**config, "policy": {**config["policy"], "path": "q"}})
    # a key that occurs elsewhere in the text ("test", "tiny", one letter) rewrote those values and keys
    short = {**config, "policy": {**config["policy"], "api_key": "p"}, "task": {"split": "test"}}
    fresh = tmp_path / "short"
    fresh.mkdir()
    claim_run_dir(fresh, short)
    saved = yaml.safe_load((fresh / "config.yaml").read_text())
    assert saved["policy"] == {**short["policy"], "api_key": "<redacted>"} and saved["task"] == {"split": "test"}
    composed = OmegaConf.load(REPO / "experiments" / "conf" / "search.yaml")
    assert {"policy.api_key", "scorer.api_key"} <= set(composed.hydra.job.config.override_dirname.exclude_keys)


@pytest.mark.parametrize("arg", ["policy.api_key=sk-SECRET123", "+scorer.api_key=sk-2", "++policy.api_key=123456789"])
def test_an_api_key_on_the_command_line_is_refused_before_hydra_writes_it(arg, capsys):
    # a sweep's multirun.yaml (Hydra's own file) and its log lines kept the key in plain text
    from experiments.search import check_no_api_key_argument

    check_no_api_key_argument(["policy=openai", "policy.base_url=http://x", "task.count=1"])
    with pytest.raises(SystemExit) as exit_info:
        check_no_api_key_argument(["-m", "policy=openai", arg])
    assert exit_info.value.code == 2 and "set $OPENAI_API_KEY instead" in capsys.readouterr().err


def test_adding_a_group_the_defaults_already_choose_says_to_drop_the_plus():
    # Hydra's two lines "Multiple values for experiment. To override a value use 'override experiment: ...'", exit 1
    from experiments.group_options import unknown_group_option

    conf = REPO / "experiments" / "conf"
    assert unknown_group_option(["+experiment=reasoning_low"], conf, "search") == (
        "error: +experiment=reasoning_low: group experiment is already in search.yaml's defaults list, so it is "
        "chosen without the +: experiment=reasoning_low")
    assert unknown_group_option(["+recipe=grpo_countdown"], conf, "train").endswith("without the +: recipe=grpo_countdown")
    assert unknown_group_option(["++search=beam", "+batching=continuous", "experiment=reasoning_low"], conf, "search") is None


def test_vllm_scorers_follow_the_policys_cache_root_and_name_an_architecture_they_cannot_stop(tmp_path, monkeypatch):
    # the presets hard-coded cache_root null, then refused the policy's own: "set them alike"; a GPT-2
    # head passed the early check and failed only after the policy had loaded
    from hydra import compose, initialize_config_dir
    from transformers import GPT2Config, GPT2LMHeadModel

    from experiments.search import CONFIG_DIR, check_engines_agree
    from scorers.sprm_head import build_sprm_head, save_score_module

    folder = _reflective_folder(tmp_path)
    for scorer in ("vllm_sprm", "vllm_prm"):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("search", overrides=["policy=vllm", f"policy.path={folder}", f"scorer={scorer}",
                                               f"policy.engine.cache_root={tmp_path / 'vc'}"])
        assert cfg.scorer.engine.cache_root == str(tmp_path / "vc")
        if scorer == "vllm_sprm":
            check_engines_agree(cfg)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=64)).save_pretrained(gpt2)
    (gpt2 / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    save_score_module(build_sprm_head(16, seed=0), gpt2)
    monkeypatch.setattr("experiments.search.build_policy", lambda node: pytest.fail("the policy was loaded"))
    with pytest.raises(ValueError, match=r"feature_layer=-2 through vLLM needs one of the architectures .* the checkpoint "
                                         r"has \['GPT2LMHeadModel'\]"):
        run_in_process([f"policy.path={folder}", "scorer=vllm_sprm", f"scorer.path={gpt2}", f"out_dir={tmp_path / 'run'}",
                        *TINY])


def test_a_refused_jobs_log_goes_only_when_it_is_its_own_and_empty(tmp_path):
    # a search refused beside a running one (RunDirBusyError) deleted that run's open, empty log;
    # one failing hours in (a lost server) deleted the lines it had logged
    from experiments.cli_errors import RunDirBusyError
    from experiments.search import is_own_empty_log

    log = tmp_path / "search.log"
    log.write_text("")
    assert is_own_empty_log(log, ValueError("refused"))
    assert not is_own_empty_log(log, RunDirBusyError("another process is writing into it"))
    assert not is_own_empty_log(None, ValueError("refused"))  # held lines, or was missing, as the job started
    log.write_text("WARNING grading took too long\n")
    assert not is_own_empty_log(log, ConnectionError("no server answers"))
    log.unlink()
    assert not is_own_empty_log(log, ValueError("refused"))


@pytest.mark.parametrize("config_name", ["search", "train"])
def test_the_sweep_folder_is_noted_where_the_jobs_are_launched(config_name, monkeypatch):
    # under hydra/launcher=local the Ctrl-C hint is printed by the launching process, which knew no
    # folder: "rerun the same command" started an ad-hoc sweep over in a new timestamped folder
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from experiments import cli_errors
    from experiments.search import CONFIG_DIR

    monkeypatch.setattr(cli_errors, "_SWEEP_DIR", [])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=["hydra.sweep.dir=outputs/sweeps/mine"], return_hydra_config=True)
        with_out_dir = compose(config_name, overrides=["out_dir=runs/one"], return_hydra_config=True)
    note = instantiate(cfg.hydra.callbacks.sweep_folder)
    note.on_multirun_start(with_out_dir)  # one job into its own folder: nothing to name
    assert cli_errors.hydra_rerun_hint("kept") == "kept; rerun the same command to go on"
    note.on_multirun_start(cfg)
    assert cli_errors.hydra_rerun_hint("kept") == (
        "kept; rerun the same command with hydra.sweep.dir=outputs/sweeps/mine (its folder) to go on")
