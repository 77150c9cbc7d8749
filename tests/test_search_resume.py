"""Resuming `python -m experiments.search`: a run killed by PID after its first rows, then rerun,
gives exactly the records of an uninterrupted run (same problem ids, no duplicates, the same
per-problem results, since each chunk's seed comes from its problem ids); the record log drops a
torn last line and refuses a corrupt middle line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.record_log import RecordLogError, append_rows, load_rows
from experiments.search import CONFIG_DIR, chunk_seed, run_search_experiment
from tiny_checkpoint import save_tiny_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
COUNT = 24
# one problem per chunk so rows land one by one; long enough generations that the run is killable
RUN = [f"task.count={COUNT}", "chunk=1", "search.n=4", "policy.sampling.max_total_tokens=24", "num_threads=1", "progress=false"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


def run_in_process(overrides: list[str]) -> Path:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return run_search_experiment(compose("search", overrides=overrides))


def comparable(rows: list[dict]) -> dict[str, dict]:
    """Rows by problem id without the one field that is not reproducible (wall time)."""
    out = {}
    for row in rows:
        row = json.loads(json.dumps(row))
        del row["compute"]["wall_time_s"]
        out[row["problem_id"]] = row
    return out


def rows_written(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def signal_after_rows(ckpt: Path, folder_arg: str, records: Path, rows: int, sig: int) -> tuple[int, str]:
    """Run the search of RUN in a subprocess, send it sig once records holds `rows` rows (or it
    ends, or 120 s pass); (its exit code, its stderr)."""
    cmd = [sys.executable, "-m", "experiments.search", f"policy.path={ckpt}", folder_arg] + RUN
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while rows_written(records) < rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_records(ckpt, tmp_path):
    killed = tmp_path / "killed"
    returncode, err = signal_after_rows(ckpt, f"hydra.run.dir={killed}", killed / "records.jsonl", 2, signal.SIGKILL)
    written = rows_written(killed / "records.jsonl")
    assert returncode == -signal.SIGKILL, err[-2000:]
    assert 2 <= written < COUNT, f"the run was not killed midway ({written} of {COUNT} rows)"

    # a kill during a write leaves a torn line: simulate one on top of the real kill
    with open(killed / "records.jsonl", "ab") as f:
        f.write(b'{"problem_id": "torn", "candi')

    run_in_process([f"policy.path={ckpt}", f"out_dir={killed}"] + RUN)
    full = run_in_process([f"policy.path={ckpt}", f"out_dir={tmp_path / 'full'}"] + RUN)

    resumed_rows = load_rows(killed / "records.jsonl")
    full_rows = load_rows(full / "records.jsonl")
    ids = [r["problem_id"] for r in resumed_rows]
    assert len(ids) == len(set(ids)) == COUNT  # nothing lost, no duplicates, the torn line gone
    assert ids[:written] == [r["problem_id"] for r in full_rows][:written]
    assert comparable(resumed_rows) == comparable(full_rows)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["problems"] == COUNT
    assert metrics["accuracy"] == json.loads((full / "metrics.json").read_text())["accuracy"]


def test_ctrl_c_is_one_line_saying_how_to_go_on_and_exit_130(ckpt, tmp_path):
    # Ctrl-C printed the traceback of wherever it landed (~130 lines)
    out = tmp_path / "interrupted"
    returncode, err = signal_after_rows(ckpt, f"out_dir={out}", out / "records.jsonl", 1, signal.SIGINT)
    assert rows_written(out / "records.jsonl") < COUNT, "the run ended before the interrupt"
    assert returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "interrupted: the rows of finished chunks are kept in records.jsonl; rerun the same command to go on")


def test_partly_written_chunk_is_rerun_whole_and_only_missing_rows_added(ckpt, tmp_path):
    out = tmp_path / "run"
    overrides = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=4", "chunk=2", "search.n=2",
                 "policy.sampling.max_total_tokens=8", "progress=false"]
    run_in_process(overrides)
    path = out / "records.jsonl"
    before = load_rows(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in before[:3]))  # the last chunk lost one row
    run_in_process(overrides)
    after = load_rows(path)
    assert [r["problem_id"] for r in after] == [r["problem_id"] for r in before]
    assert comparable(after) == comparable(before)  # the rerun chunk drew the same samples


@pytest.mark.parametrize(("content", "message"), [
    (b"- a\n- list\n", r"config.yaml is not a run config: it holds a list, not a mapping"),
    (b"seed: [unclosed\n", r"config.yaml is not a readable run config \(ParserError: while parsing"),
    (b"budget: ${oops}\n", r"config.yaml is not a readable run config \(InterpolationKeyError: "),
    (b"seed: \xff\n", r"config.yaml is not a readable run config \(UnicodeDecodeError: "),
])
def test_a_damaged_config_beside_records_is_named_and_nothing_is_written(ckpt, tmp_path, content, message):
    """A hand-damaged config.yaml in a folder with records: an error naming the file (an
    AttributeError or Hydra's compact error before), the records untouched."""
    out = tmp_path / "run"
    overrides = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "chunk=2", "search.n=2",
                 "policy.sampling.max_total_tokens=8", "progress=false"]
    run_in_process(overrides)
    records = (out / "records.jsonl").read_bytes()
    (out / "config.yaml").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        run_in_process(overrides)
    assert (out / "records.jsonl").read_bytes() == records and (out / "config.yaml").read_bytes() == content


@pytest.mark.parametrize("files, what", [
    (("last/config.json", "metrics.jsonl", "config.yaml"), "of another command's run"),
    (("ckpt-2/config.json",), "of another command's run"),
    (("final/config.json", "sft_summary.json"), "of another command's run"), (("metrics.jsonl", "metrics.json"), "of another command's run"),
    # a sweep's or the demo's folder: the run's rows and metrics.json landed at its top, beside its tables
    (("multirun.yaml", "best_of_n-4/records.jsonl"), "the results of several runs"),
    (("report.md", "metrics.json", "sweep_arith/n=4/records.jsonl"), "the results of several runs"),
    (("beam/records.jsonl", "beam/config.yaml"), "the results of several runs"),
])
def test_another_commands_run_folder_is_refused_and_left_as_it_was(ckpt, tmp_path, files, what):
    """A search into a training run's folder replaced its config.yaml and metrics.json (train_head's
    held-out metrics): the training could no longer resume."""
    out = tmp_path / "run"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("theirs")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    overrides = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=1", "search.n=2", "progress=false"]
    with pytest.raises(ValueError, match=f"{out} holds .* {what}"):
        run_in_process(overrides)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert all((out / name).read_text() == "theirs" for name in files)


def test_a_resumed_search_checks_its_rows_types(ckpt, tmp_path):
    """A hand-edited correct of "false" counted as right when the run was resumed (metrics.json rewritten)."""
    out = tmp_path / "run"
    overrides = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "chunk=2", "search.n=2",
                 "policy.sampling.max_total_tokens=8", "progress=false"]
    run_in_process(overrides)
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    rows[0]["correct"] = "false"
    (out / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="has correct='false', not true or false"):
        run_in_process(overrides)
    assert (out / "metrics.json").read_bytes() == metrics


def test_chunk_seed_depends_on_seed_and_problem_ids_only():
    assert chunk_seed(0, ["a", "b"]) == chunk_seed(0, ["a", "b"])
    assert len({chunk_seed(0, ["a", "b"]), chunk_seed(1, ["a", "b"]), chunk_seed(0, ["a", "c"]),
                chunk_seed(0, ["b", "a"])}) == 4
    assert 0 <= chunk_seed(123, ["x"]) < 2**31


def test_record_log_drops_a_torn_last_line_and_keeps_appending(tmp_path):
    path = tmp_path / "records.jsonl"
    assert load_rows(path) == []
    append_rows(path, [{"problem_id": "a"}, {"problem_id": "b"}])
    with open(path, "ab") as f:
        f.write(b'{"problem_id": "c", "x":')
    assert [r["problem_id"] for r in load_rows(path)] == ["a", "b"]
    assert path.read_bytes().endswith(b'"b"}\n')  # the torn tail is cut off the file
    append_rows(path, [{"problem_id": "c"}])
    assert [r["problem_id"] for r in load_rows(path)] == ["a", "b", "c"]


def test_a_sweep_table_reads_records_a_search_is_still_writing_without_cutting_them(tmp_path):
    """sweep_metrics / plot scaling --watch read run folders while searches append: the half
    written last row is skipped, never cut off the file under the writer (nor a read-only copy)."""
    import os
    import stat

    from experiments.sweep_metrics import summarize_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\nscorer: {_target_: scorers.confidence.ConfidenceScorer}\n"
                                     "task: {module: experiments.tasks.arith}\npolicy: {path: ckpt}\n")
    row = {"problem_id": "a", "strategy": "best_of_n", "config": {"n": 1}, "candidates": [], "chosen_index": None,
           "compute": {"tokens_generated": 1, "tokens_forwarded": 1, "scorer_tokens": 0, "C": 1, "flops": 1}}
    append_rows(run / "records.jsonl", [row])
    half = b'{"problem_id": "b", "strategy": "best_of_n", "candi'
    with open(run / "records.jsonl", "ab") as f:
        f.write(half)
    before = (run / "records.jsonl").read_bytes()
    os.chmod(run / "records.jsonl", stat.S_IRUSR)  # a read-only copy
    try:
        assert summarize_run(run, tmp_path).problems == 1
        assert load_rows(run / "records.jsonl", repair=False) == [row]
    finally:
        os.chmod(run / "records.jsonl", stat.S_IRUSR | stat.S_IWUSR)
    assert (run / "records.jsonl").read_bytes() == before and before.endswith(half)


def test_record_log_treats_a_garbage_last_line_as_torn_but_refuses_one_in_the_middle(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"problem_id": "a"}\n\x00\x00\x00\n')
    assert load_rows(path) == [{"problem_id": "a"}]
    # a hand-damaged last line (a kill leaves no newline after a cut line): dropped and cut off in silence before
    damaged = b'{"problem_id": "a"}\n{"problem_id": "b", "chosen": ,}\n'
    path.write_bytes(damaged)
    with pytest.raises(RecordLogError, match="line 2 is not a JSON object"):
        load_rows(path)
    assert path.read_bytes() == damaged
    path.write_bytes(b'{"problem_id": "a"}\n\n{"problem_id": "b"}\n\n')  # blank lines (echo >> records.jsonl) hold no row
    assert load_rows(path) == [{"problem_id": "a"}, {"problem_id": "b"}]
    path.write_bytes(b'{"problem_id": "a"}\nnot json\n{"problem_id": "b"}\n')
    with pytest.raises(RecordLogError, match="line 2"):
        load_rows(path)


def test_a_records_row_without_a_problem_id_is_named_by_its_line(ckpt, tmp_path):
    """A hand-edited row `{"foo": 1}`: an error naming file and line (a KeyError before), in the
    runner and the sweep table; a log of other rows (training metrics) asks for no key."""
    from experiments.sweep_metrics import summarize_run

    out = tmp_path / "run"
    overrides = [f"policy.path={ckpt}", f"out_dir={out}", "task.count=2", "chunk=2", "search.n=2",
                 "policy.sampling.max_total_tokens=8", "progress=false"]
    run_in_process(overrides)
    with open(out / "records.jsonl", "a") as f:
        f.write('{"foo": 1}\n')
    message = r"records.jsonl: line 3 has no 'problem_id': not a row this log writes"
    with pytest.raises(RecordLogError, match=message):
        run_in_process(overrides)
    with pytest.raises(RecordLogError, match=message):
        summarize_run(out, tmp_path)
    assert load_rows(out / "records.jsonl")[-1] == {"foo": 1}  # no key asked for: a row like any other
    # a row with its problem_id but not the rest the sweep reads: named too (a KeyError on 'compute' before)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:2] + ['{"problem_id": "x"}']) + "\n")
    with pytest.raises(RecordLogError, match=r"records.jsonl: line 3 has no 'strategy': not a row this log writes"):
        summarize_run(out, tmp_path)
