"""`make bench`: every benchmark of the engine in turn, their tables gathered in one report.

    python -m experiments.bench_all                    # every section -> outputs/bench/report.md
    python -m experiments.bench_all --only flops memory --out /tmp/bench.md
    python -m experiments.bench_all --list             # the section names

Each section (`SECTIONS`) is one benchmark command run as a child process. Its stdout (the
tables) goes to the terminal and, under the section's heading, into the report as it comes; its
stderr (progress bars, errors) goes to the terminal. A section that fails is marked in the report
with its exit code and the last lines of its stderr, the sections after it still run, and the
command exits 1 naming the failed ones (a failed benchmark never leaves an empty heading behind a
successful exit). Sections that need vLLM are marked skipped where it is not installed
(`make setup VLLM=`); one with vLLM rows runs without them. Ctrl-C stops the running child and marks the report interrupted;
SIGTERM / SIGHUP (`kill`, `timeout`, a CI cancel, a closed session) likewise, marked terminated
(exit 143), so no benchmark runs on orphaned beside whatever is measured next.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from experiments.broken_pipe import stdout_closed_quietly
from experiments.cli_args import check_file_target
from experiments.cli_errors import INTERRUPT_EXIT, TERMINATE_EXIT, Terminated, raise_terminated

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "outputs" / "bench" / "report.md"
STDERR_TAIL = 20  # lines of a failed section's stderr copied into the report
STDERR_KEEP = 1 << 16  # bytes of a section's stderr kept to find them in


@dataclass(frozen=True)
class Section:
    """One benchmark command: name (for --only), its heading in the report (level 2 or 3), the
    `python -m experiments.<module>` arguments, whether it needs vLLM, and arguments it adds
    where vLLM is installed (its vLLM rows; without vLLM it runs the rest)."""

    name: str
    heading: str
    argv: tuple[str, ...]
    level: int = 2
    needs_vllm: bool = False
    vllm_argv: tuple[str, ...] = ()

    def command(self, vllm: bool) -> tuple[str, ...]:
        return (*self.argv, *self.vllm_argv) if vllm else self.argv


def _bench(module: str, *args: str) -> tuple[str, ...]:
    return ("-m", f"experiments.{module}", *args)


SMOLLM2 = ("--model", "smollm2")
SECTIONS: tuple[Section, ...] = (
    Section("scoring_overhead", "Scoring overhead of Best-of-N", _bench("bench_scoring_overhead", "--threads", "1")),
    Section("prefix_reuse", "Prefix reuse in step-level search", _bench("bench_prefix_reuse")),
    Section("batching", "Batched vs one problem at a time", _bench("bench_batching")),
    Section("batching_smollm2", "the same with SmolLM2-135M on GSM8K",
            _bench("bench_batching", *SMOLLM2, "--problems", "16", "--rounds", "1"), level=3),
    Section("prm_prefix", "External PRM: its memory and shared starts vs every path whole (and on vLLM)",
            _bench("bench_prm_prefix"), vllm_argv=("--vllm",)),
    Section("prm_prefix_smollm2", "the same with SmolLM2 as the policy on GSM8K",
            _bench("bench_prm_prefix", *SMOLLM2, "--problems", "2", "--rounds", "1"), level=3, vllm_argv=("--vllm",)),
    Section("merged_scorer", "External PRM under continuous batching: merged calls vs a call per thread",
            _bench("bench_merged_scorer", "--rounds", "1")),
    Section("widths", "REBASE and particle filtering: one policy call per round vs one per width",
            _bench("bench_widths")),
    Section("shared_prefix", "Shared prefix vs copied KV rows", _bench("bench_shared_prefix")),
    Section("forked", "Forked decoding vs every sample row forwarded alone", _bench("bench_forked")),
    Section("dtype", "Weights in bfloat16 vs float32", _bench("bench_dtype")),
    Section("engine_overhead", "Engine overhead at N = 32", _bench("bench_engine_overhead")),
    Section("engine_overhead_no_forked", "the same with every sample row forwarded alone (no forked decoding)",
            _bench("bench_engine_overhead", "--no-forked", "--top", "0"), level=3),
    Section("engine_overhead_smollm2", "the same with SmolLM2-135M on GSM8K",
            _bench("bench_engine_overhead", *SMOLLM2, "--problems", "4", "--rounds", "1"), level=3),
    Section("vllm_overhead", "the same through vLLM (outside LLM.generate)", _bench("bench_vllm_overhead"),
            level=3, needs_vllm=True),
    Section("flops", "FLOP/s vs a matmul peak measured in the same run", _bench("bench_flops")),
    Section("train_throughput", "Training throughput: joint GRPO + SPR vs plain forward + backward",
            _bench("bench_train_throughput")),
    Section("memory", "Peak RSS vs N (one process per row)", _bench("bench_memory")),
    Section("vllm", "transformers vs vLLM", _bench("bench_vllm"), needs_vllm=True),
)


@dataclass(frozen=True)
class Outcome:
    """How a section ended: "ok", "failed" (exit code, stderr tail), "skipped" (why) or "interrupted"."""

    section: Section
    status: str
    detail: str = ""


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _copy_stderr(stream: IO[bytes], kept: bytearray) -> None:
    """The child's stderr to ours as it comes (bytes: a progress bar's carriage returns redraw
    its line, as in a terminal), its last STDERR_KEEP bytes kept for a failure's report."""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        _write_stderr(chunk)
        kept += chunk
        del kept[:-STDERR_KEEP]


def _write_stderr(chunk: bytes) -> None:
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is None:  # a stderr replaced by text only
        sys.stderr.write(chunk.decode("utf-8", errors="replace"))
    else:
        sys.stderr.flush()
        buffer.write(chunk)
        buffer.flush()


def stderr_tail(kept: bytes) -> list[str]:
    """The last STDERR_TAIL lines of kept stderr, each as a terminal last showed it (the text after
    its last carriage return: a progress bar's final state, not each redraw)."""
    lines = [line.rsplit("\r", 1)[-1] for line in kept.decode("utf-8", errors="replace").split("\n")]
    return [line for line in lines if line.strip()][-STDERR_TAIL:]


def run_section(section: Section, report: IO[str], vllm: bool = True) -> Outcome:
    """Run one section's command, its stdout into the terminal and the report line by line (a
    last line without its newline gets one, so nothing written after it joins it)."""
    # vLLM logs INFO lines (a config dump among them) to stdout, which is the report: unconfigured,
    # its warnings reach stderr through Python's last-resort handler and its INFO lines nowhere
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CONFIGURE_LOGGING": "0"}
    child = subprocess.Popen([sys.executable, *section.command(vllm)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kept = bytearray()
    reader = threading.Thread(target=_copy_stderr, args=(child.stderr, kept), daemon=True)
    reader.start()
    line = "\n"
    try:
        for raw in child.stdout:  # type: ignore[union-attr]
            line = raw.decode("utf-8", errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            report.write(line)
            report.flush()
        code = child.wait()
    except KeyboardInterrupt as err:  # Ctrl-C, or Terminated: SIGTERM / SIGHUP (`stop_signals_raised`)
        child.kill()
        child.wait()
        return Outcome(section, "interrupted", "terminated" if isinstance(err, Terminated) else "")
    except BrokenPipeError:  # our stdout's reader left (`| head`): stop the benchmark, not orphan it
        child.kill()
        child.wait()
        raise  # `stdout_closed_quietly` of __main__: exit 141
    finally:
        if not line.endswith("\n"):
            sys.stdout.write("\n")
            report.write("\n")
    reader.join()
    if code != 0:
        return Outcome(section, "failed", f"{exit_text(code)}\n" + "\n".join(stderr_tail(bytes(kept))))
    return Outcome(section, "ok")


def exit_text(code: int) -> str:
    """"exit 1", or the signal that killed the child ("killed by SIGKILL (-9): out of memory?")."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = ": out of memory? (the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
    return f"killed by {name} ({code}){hint}"


def failure_text(outcome: Outcome) -> str:
    """The report's lines for a section that did not finish."""
    if outcome.status == "skipped":
        return f"*skipped: {outcome.detail}*\n"
    if outcome.status == "interrupted":
        why = "terminated (SIGTERM / SIGHUP)" if outcome.detail == "terminated" else "interrupted (Ctrl-C)"
        return f"*{why}: the report stops here*\n"
    code, _, tail = outcome.detail.partition("\n")
    if not tail.strip():
        return f"**failed ({code})**, with nothing on its stderr\n"
    quoted = "\n".join(f"    {line}" for line in tail.splitlines())
    return f"**failed ({code})**, the end of its stderr:\n\n{quoted}\n"


def run_all(sections: Sequence[Section], out: Path) -> list[Outcome]:
    """Every section in turn into the report at `out` (written as it goes); stops at Ctrl-C."""
    out.parent.mkdir(parents=True, exist_ok=True)
    vllm = has_vllm()
    outcomes: list[Outcome] = []
    with out.open("w", encoding="utf-8") as report:
        report.write("# treesearch benchmarks (make bench)\n\n")
        for section in sections:
            report.write(f"{'#' * section.level} {section.heading}\n")
            report.flush()
            print(f"{'#' * section.level} {section.heading}", flush=True)
            if section.needs_vllm and not vllm:
                outcome = Outcome(section, "skipped", "vLLM is not installed (`make setup` installs it)")
            else:
                if section.vllm_argv and not vllm:
                    report.write("*without its vLLM rows: vLLM is not installed*\n")
                outcome = run_section(section, report, vllm)
            if outcome.status != "ok":
                text = failure_text(outcome)
                report.write(text)
                print(text, end="", flush=True)
            report.write("\n")
            print(flush=True)
            outcomes.append(outcome)
            if outcome.status == "interrupted":
                break
    return outcomes


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _terminate_once(signum: int, frame: object) -> None:
    """The first stop signal raises `Terminated`; later ones are ignored while the child is killed
    and reaped (GNU `timeout` signals its child and then the whole group: the second SIGTERM
    landed in that clean-up, a traceback and exit 1 with the report unmarked)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise_terminated(signum, frame)


@contextlib.contextmanager
def stop_signals_raised() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) within the block, in the main
    thread, so `run_section` kills its child as at Ctrl-C (they killed this process alone, and
    the benchmark ran on, re-parented, for minutes on the cores the next measurement uses)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate_once) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in SECTIONS]
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_all", description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"these sections: {', '.join(names)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the report (default {DEFAULT_OUT})")
    ap.add_argument("--list", action="store_true", help="print the section names and commands, run nothing")
    args = ap.parse_args(argv)
    try:
        check_file_target(args.out, "--out", "report.md")
        if not args.list:  # --list runs nothing and writes nothing
            args.out.parent.mkdir(parents=True, exist_ok=True)
    except ValueError as error:
        ap.error(str(error))
    except OSError as error:  # a folder that cannot be made (/proc/x, no permission)
        ap.error(f"--out {args.out}: cannot create its folder ({error.strerror})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s for s in SECTIONS if not args.only or s.name in args.only]
    if args.list:
        vllm = has_vllm()
        for s in sections:
            skipped = "   (skipped: no vLLM)" if s.needs_vllm and not vllm else ""
            print(f"{s.name:28} python {' '.join(s.command(vllm))}{skipped}")
        return 0
    with stop_signals_raised():
        outcomes = run_all(sections, args.out)
    failed = [o.section.name for o in outcomes if o.status in ("failed", "interrupted")]
    skipped = [o.section.name for o in outcomes if o.status == "skipped"]
    print(f"report: {args.out}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    if failed:
        print(f"not finished: {', '.join(failed)} (see the report)", file=sys.stderr)
        if outcomes[-1].status == "interrupted":
            return TERMINATE_EXIT if outcomes[-1].detail == "terminated" else INTERRUPT_EXIT
        return 1
    return 0


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        sys.exit(main())
