"""`make bench` (`experiments/bench_all.py`): every section runs, a failed one is marked in the
report with its exit code and stderr and the command fails, a vLLM section is skipped without
vLLM. The sections here are tiny `python -c` programs standing in for the benchmarks.

    .venv/bin/python -m pytest tests/test_bench_all.py
"""
from __future__ import annotations

import os
import signal

import pytest

from experiments import bench_all
from experiments.bench_all import Section


def _program(code: str) -> tuple[str, ...]:
    return ("-c", code)


SECTIONS = (
    Section("first", "First table", _program("print('| a | 1 |')")),
    Section("broken", "A benchmark that fails", _program(
        "import sys; print('| half |'); print('Traceback: boom', file=sys.stderr); sys.exit(3)")),
    Section("sub", "a sub-table", _program("print('| c | 3 |')"), level=3),
    Section("needs", "A vLLM benchmark", _program("print('| v |')"), needs_vllm=True),
)


def test_a_last_line_without_its_newline_does_not_swallow_the_failure_mark(monkeypatch, tmp_path):
    """'| a | b |' without its newline ran into '**failed ...' (a broken table row, a hidden mark);
    a progress bar's redraws were kept as lines of the stderr tail."""
    bar = "import sys; [sys.stderr.write(f'\\r{k}/3 bar') for k in range(4)]; sys.stderr.write('\\nboom\\n'); "
    monkeypatch.setattr(bench_all, "SECTIONS", (
        Section("cut", "Cut short", _program(bar + "print('| a | b |', end=''); sys.exit(3)")),))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert "| a | b |\n**failed (exit 3)**" in report
    assert "    3/3 bar\n    boom\n" in report and "0/3 bar" not in report


@pytest.fixture
def sections(monkeypatch):
    monkeypatch.setattr(bench_all, "SECTIONS", SECTIONS)
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)


def test_a_failed_section_is_marked_the_rest_still_run_and_the_command_fails(sections, tmp_path, capsys):
    out = tmp_path / "bench" / "report.md"
    assert bench_all.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert report.startswith("# treesearch benchmarks (make bench)\n\n## First table\n| a | 1 |\n")
    assert "## A benchmark that fails\n| half |\n**failed (exit 3)**" in report
    assert "    Traceback: boom" in report  # the end of its stderr, quoted
    assert "### a sub-table\n| c | 3 |\n" in report  # ran after the failure
    assert "## A vLLM benchmark\n*skipped: vLLM is not installed" in report
    captured = capsys.readouterr()
    assert "| c | 3 |" in captured.out and "Traceback: boom" in captured.err
    assert "not finished: broken" in captured.err


@pytest.mark.parametrize("vllm, args", [(True, "['--vllm']"), (False, "[]")])
def test_a_section_with_vllm_rows_runs_without_them_where_vllm_is_missing(monkeypatch, tmp_path, vllm, args):
    """The transformers PRM benchmark was skipped with its vLLM rows."""
    monkeypatch.setattr(bench_all, "SECTIONS", (
        Section("prm", "PRM (and on vLLM)", _program("import sys; print(sys.argv[1:])"), vllm_argv=("--vllm",)),))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: vllm)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 0
    report = out.read_text()
    assert "## PRM (and on vLLM)\n" in report and f"\n{args}\n" in report
    assert ("*without its vLLM rows: vLLM is not installed*" in report) is not vllm


def test_only_runs_the_named_sections_and_succeeds(sections, tmp_path):
    out = tmp_path / "report.md"
    assert bench_all.main(["--only", "sub", "first", "--out", str(out)]) == 0
    report = out.read_text()
    assert report.index("First table") < report.index("a sub-table") and "fails" not in report


def test_bad_options_are_usage_errors(sections, tmp_path, capsys):
    for argv in (["--only", "nope"], ["--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            bench_all.main(argv)
        assert exit_info.value.code == 2
    assert "is a folder" in capsys.readouterr().err


def test_the_shipped_sections_name_benchmarks_that_exist():
    names = [s.name for s in bench_all.SECTIONS]
    assert len(names) == len(set(names))
    for s in bench_all.SECTIONS:
        module = s.argv[1]
        assert s.argv[0] == "-m" and (bench_all.REPO / (module.replace(".", "/") + ".py")).is_file(), module


def test_a_killed_or_silent_section_says_so_and_the_child_env_keeps_vllm_logs_off_the_report(monkeypatch, tmp_path):
    # a SIGKILL (the OOM killer) read "failed (exit -9), the end of its stderr:" and nothing after
    monkeypatch.setattr(bench_all, "SECTIONS", (
        Section("oom", "Killed", _program("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")),
        Section("silent", "Silent", _program("import sys; sys.exit(1)")),
        Section("env", "Env", _program("import os; print(os.environ.get('VLLM_CONFIGURE_LOGGING'))")),
    ))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert "**failed (killed by SIGKILL (-9): out of memory?" in report
    assert "**failed (exit 1)**, with nothing on its stderr" in report
    assert "## Env\n0\n" in report  # vLLM's INFO lines went into the report's tables


def test_an_out_folder_that_cannot_be_made_is_a_usage_error(sections, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_all.main(["--out", "/proc/treesearch-no/report.md"])
    assert exit_info.value.code == 2 and "cannot create its folder" in capsys.readouterr().err


def test_list_prints_the_sections_and_writes_nothing(sections, tmp_path, capsys):
    out = tmp_path / "new" / "report.md"
    assert bench_all.main(["--list", "--out", str(out)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [s.name for s in SECTIONS]
    assert "(skipped: no vLLM)" in listed[-1]
    assert not (tmp_path / "new").exists()  # --list created the report's folder


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_terminated_run_kills_its_benchmark_and_says_so(monkeypatch, tmp_path, capsys, signame):
    """SIGTERM / SIGHUP (`timeout`, a CI cancel) killed bench_all alone: its benchmark ran on,
    orphaned, beside whatever was measured next. The section here signals bench_all (its parent),
    then would sleep a minute."""
    pid_file = tmp_path / "child.pid"  # not its stdout: the signal may land before bench_all reads a line
    code = (f"import os, pathlib, signal, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); "
            f"os.kill(os.getppid(), signal.{signame}); time.sleep(60)")
    monkeypatch.setattr(bench_all, "SECTIONS", (Section("slow", "Slow", _program(code)), *SECTIONS[:1]))
    monkeypatch.setattr(bench_all, "has_vllm", lambda: False)
    before = signal.getsignal(getattr(signal, signame))
    out = tmp_path / "report.md"
    assert bench_all.main(["--out", str(out)]) == 143
    report = out.read_text()
    assert "*terminated (SIGTERM / SIGHUP): the report stops here*" in report and "First table" not in report
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(child, 0)
    assert signal.getsignal(getattr(signal, signame)) == before  # the handler is put back
    assert "not finished: slow" in capsys.readouterr().err


def test_a_second_stop_signal_is_ignored_while_the_first_is_handled():
    """GNU `timeout` sends SIGTERM to bench_all and then to its whole group: the second one landed
    in run_section's clean-up (a traceback, exit 1, the report unmarked)."""
    before = signal.getsignal(signal.SIGTERM)
    with bench_all.stop_signals_raised():
        with pytest.raises(bench_all.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: nothing raised
    assert signal.getsignal(signal.SIGTERM) == before
