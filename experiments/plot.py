"""Plots from saved records: `python -m experiments.plot SUBCOMMAND ...`.

    python -m experiments.plot tree RESULT.json                  # RESULT.png + RESULT.html next to it
    python -m experiments.plot tree RESULT.json --out-dir plots  # ... into plots/
    python -m experiments.plot tree RESULT.json --watch 2        # live: re-render whenever RESULT.json
                                                                 # changes; the page reloads every 2 s

In watch mode the title says where a live tree stands (`experiments.live_tree`): "searching, round
12", "stopped (interrupted) at round 12" (a Ctrl-C'd or failed search) or "final" (the finished
search's result, its chosen path marked); the last two print a note on stderr too. A file that
cannot be read after a good render (caught mid-write by a writer that does not replace it
atomically) keeps the last render, prints a one-line note on stderr and is retried at its next
change; only a file bad before the first good render is an error.

Each plot is one argparse subcommand, registered by a `register(subparsers)` function that adds
its parser and sets `run=` (a function of the parsed args returning an exit code). New plots
(`scaling`, `aha`) live in their own files and are added to `SUBCOMMANDS`. Plots read saved
records only (DESIGN.md 6.11); bad input (or an --out-dir that is not a folder) gives
"error: <file>: <what is wrong>" and exit code 2. `tree` reads one result JSON
(`experiments.result_json.save_result`, e.g. the demo's outputs/demo/tree_<task>.json): given a
folder, or a JSONL file such as `experiments.search`'s records.jsonl (no trees in it), the error
says so.

Tests: `.venv/bin/pytest tests/test_tree_plot.py tests/test_plot_cli.py`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.broken_pipe import stdout_closed_quietly, stdout_reader_gone
from experiments.plot_aha import register_aha
from experiments.plot_scaling import register_scaling
from experiments.result_json import ResultFileError, ResultRecord, load_result
from experiments.tree_html import write_tree_html
from experiments.tree_plot import TreeJsonError, check_drawable, draw_tree_png

RESULT_HINT = ("plot tree reads one result JSON written by experiments.result_json.save_result, e.g. the demo's "
               "outputs/demo/tree_<task>.json; experiments.search's records.jsonl holds no trees")


class OutputDirError(ValueError):
    """An output folder that cannot be one (an existing file); the message names the path."""


def check_out_dir(out_dir: Path | None) -> None:
    """OutputDirError when out_dir (or a folder above it) exists and is not a folder."""
    if out_dir is None:
        return
    for path in (out_dir, *out_dir.parents):
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"{path}: --out-dir needs a folder here, but it is an existing file")


def check_result_path(result_path: Path) -> None:
    """ResultFileError when RESULT is a folder (read as "no such file", and watched forever)."""
    if result_path.is_dir():
        raise ResultFileError(f"{result_path}: a folder, not a result JSON file; {RESULT_HINT}")


def load_tree_record(result_path: Path) -> ResultRecord:
    """`load_result`, with a hint for a JSONL file, and `check_drawable`: ResultFileError naming
    the file before anything is drawn."""
    try:
        record = load_result(result_path)
    except ResultFileError as err:
        if result_path.suffix == ".jsonl":
            raise ResultFileError(f"{err}; {RESULT_HINT}") from None
        raise
    try:
        check_drawable(record.tree)
    except TreeJsonError as err:
        raise ResultFileError(f"{result_path}: cannot draw the tree: {err}") from None
    return record


def render_tree(result_path: Path, out_dir: Path | None = None, refresh_s: float | None = None) -> tuple[Path, Path]:
    """Write <stem>.png and <stem>.html for one result JSON (next to it, or into out_dir)."""
    return render_record(load_tree_record(result_path), result_path, out_dir, refresh_s)


def live_status(record: ResultRecord, watching: bool) -> str | None:
    """What a watched file shows: "searching, round 12", "stopped (interrupted) at round 12" (a
    live tree's marks, `experiments.live_tree`) or "final" (a finished search's result); None
    for a finished result rendered once."""
    live = record.live
    if live is None:
        return "final" if watching else None
    if live["state"] == "stopped":
        return f"stopped ({live.get('reason', 'unknown')}) at round {live.get('round', '?')}"
    return f"searching, round {live.get('round', '?')}"


def render_record(
    record: ResultRecord, result_path: Path, out_dir: Path | None = None, refresh_s: float | None = None
) -> tuple[Path, Path]:
    """`render_tree` of a record read from result_path; the title says its live status."""
    folder = result_path.parent if out_dir is None else out_dir
    stem = result_path.stem
    status = live_status(record, watching=refresh_s is not None)
    title = f"{record.strategy} · problem {record.tree['problem']['id']}" + (f" · {status}" if status else "")
    png = draw_tree_png(record.tree, record.chosen_node, folder / f"{stem}.png", title=title)
    page = write_tree_html(record.tree, record.chosen_node, folder / f"{stem}.html", refresh_s=refresh_s, title=title,
                           candidates=record.candidates)
    return png, page


def render_if_changed(
    result_path: Path, out_dir: Path | None, refresh_s: float, last_mtime: int | None, keep_last: bool = False
) -> int | None:
    """One watch poll: re-render when the file's mtime differs from last_mtime; return the mtime
    seen (None while the file does not exist yet). `save_result` replaces the file atomically,
    but another writer may not: with keep_last (a good render exists) a file that does not load
    prints a one-line note and keeps the last render; its mtime is returned, so the next change
    retries. Without keep_last the ResultFileError propagates."""
    try:
        mtime = result_path.stat().st_mtime_ns if result_path.is_file() else None
    except FileNotFoundError:  # removed between the two calls
        mtime = None
    if mtime is None or mtime == last_mtime:
        return mtime
    try:
        record = load_tree_record(result_path)
        paths = render_record(record, result_path, out_dir, refresh_s=refresh_s)
    except ResultFileError as err:
        if not keep_last:
            raise
        print(f"note: {err}; keeping the last render, retrying when the file changes", file=sys.stderr, flush=True)
        return mtime
    for path in paths:
        print(path, flush=True)
    status = live_status(record, watching=True)
    if status == "final":
        print(f"note: {result_path}: the search of problem {record.problem['id']} finished (its chosen path marked); "
              "still watching the file (a live tree's next problem replaces it)", file=sys.stderr, flush=True)
    elif status and status.startswith("stopped"):
        print(f"note: {result_path}: the search {status}; the tree as it stood then", file=sys.stderr, flush=True)
    return mtime


def watch_tree(result_path: Path, out_dir: Path | None, interval_s: float) -> None:
    """Poll every interval_s seconds until interrupted (Ctrl-C); after the first good render a
    bad file is a note, not an error (`render_if_changed`)."""
    last: int | None = None
    rendered = False
    waiting_said = False
    while True:
        seen = render_if_changed(result_path, out_dir, interval_s, last, keep_last=rendered)
        if seen is None and not waiting_said:  # not there yet, or removed: said once per absence
            print(absent_note(result_path, rendered), file=sys.stderr, flush=True)
        waiting_said = seen is None
        last = seen
        rendered = rendered or last is not None
        time.sleep(interval_s)


def absent_note(result_path: Path, rendered: bool) -> str:
    """The note for a watched file that is not there: removed after a render, or not yet written
    (naming a folder that does not exist, a typo more likely than a search still starting)."""
    if rendered:
        return f"note: {result_path} was removed; keeping the last render, waiting for it to appear again"
    folder = "" if result_path.parent.is_dir() else f" (its folder {result_path.parent} does not exist yet)"
    return (f"note: waiting for {result_path} to appear{folder}: a search with live_tree=true writes it after its "
            "first round (a finished run searches nothing again and writes none)")


def run_tree(args: argparse.Namespace) -> int:
    result_path: Path = args.result
    check_result_path(result_path)
    check_out_dir(args.out_dir)
    if args.watch is None:
        for path in render_tree(result_path, args.out_dir):
            print(path)
        return 0
    print(f"watching {result_path} every {args.watch} s (Ctrl-C stops)", file=sys.stderr)
    try:
        watch_tree(result_path, args.out_dir, args.watch)
    except KeyboardInterrupt:
        pass
    return 0


MAX_WATCH_S = 86400.0  # --watch: a longer period is a typo (inf failed in the page's JSON, 1e308 in sleep)
MIN_WATCH_S = 0.1  # a shorter one reloaded the page without pause and polled the file in a busy loop


def watch_seconds(text: str) -> float:
    """argparse type of --watch: seconds in [MIN_WATCH_S, MAX_WATCH_S]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MIN_WATCH_S <= value <= MAX_WATCH_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a number of seconds >= {MIN_WATCH_S:g} and <= {MAX_WATCH_S:g}")
    return value


def register_tree(subparsers: Any) -> None:
    parser = subparsers.add_parser("tree", help="one result's search tree as PNG + interactive HTML")
    parser.add_argument("result", type=Path, help="result JSON (experiments.result_json.save_result)")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for the outputs (default: next to RESULT)")
    parser.add_argument("--watch", type=watch_seconds, default=None, metavar="SECONDS",
                        help="live mode: re-render when RESULT changes; the HTML reloads every SECONDS")
    parser.set_defaults(run=run_tree)


SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (register_tree, register_scaling, register_aha)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description="Plots from saved records.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv, run the subcommand; bad input files and outputs that cannot be written (a
    read-only or forbidden folder, a full disk) print "error: ..." and give 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ResultFileError, OutputDirError, OSError) as err:  # OSError: "[Errno 13] Permission denied: 'ro/sub'"
        if isinstance(err, BrokenPipeError) and stdout_reader_gone():
            raise  # `... | head`: `stdout_closed_quietly` ends it with 141, quietly
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
