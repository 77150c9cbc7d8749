"""Plots from saved records: `python -m experiments.plot SUBCOMMAND ...`.

    python -m experiments.plot tree RESULT.json                  # RESULT.png + RESULT.html next to it
    python -m experiments.plot tree RESULT.json --out-dir plots  # ... into plots/
    python -m experiments.plot tree RESULT.json --watch 2        # live: re-render whenever RESULT.json
                                                                 # changes; the page reloads every 2 s

Each plot is one argparse subcommand, registered by a `register(subparsers)` function that adds
its parser and sets `run=` (a function of the parsed args returning an exit code). New plots
(`scaling`, `aha`) live in their own files and are added to `SUBCOMMANDS`. Plots read saved
records only (DESIGN.md 6.11); bad input gives "error: <file>: <what is wrong>" and exit code 2.

Tests: `.venv/bin/pytest tests/test_tree_plot.py`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.plot_aha import register_aha
from experiments.plot_scaling import register_scaling
from experiments.result_json import ResultFileError, load_result
from experiments.tree_html import write_tree_html
from experiments.tree_plot import draw_tree_png


def render_tree(result_path: Path, out_dir: Path | None = None, refresh_s: float | None = None) -> tuple[Path, Path]:
    """Write <stem>.png and <stem>.html for one result JSON (next to it, or into out_dir)."""
    record = load_result(result_path)
    folder = result_path.parent if out_dir is None else out_dir
    stem = result_path.stem
    title = f"{record.strategy} · problem {record.tree['problem']['id']}"
    png = draw_tree_png(record.tree, record.chosen_node, folder / f"{stem}.png", title=title)
    page = write_tree_html(record.tree, record.chosen_node, folder / f"{stem}.html", refresh_s=refresh_s, title=title)
    return png, page


def render_if_changed(result_path: Path, out_dir: Path | None, refresh_s: float, last_mtime: int | None) -> int | None:
    """One watch poll: re-render when the file's mtime differs from last_mtime; return the mtime
    seen (None while the file does not exist yet). The writer replaces the file atomically
    (`save_result`), so a changed mtime means a complete new file."""
    if not result_path.is_file():
        return None
    mtime = result_path.stat().st_mtime_ns
    if mtime != last_mtime:
        for path in render_tree(result_path, out_dir, refresh_s=refresh_s):
            print(path, flush=True)
    return mtime


def watch_tree(result_path: Path, out_dir: Path | None, interval_s: float) -> None:
    """Poll every interval_s seconds until interrupted (Ctrl-C)."""
    last: int | None = None
    while True:
        last = render_if_changed(result_path, out_dir, interval_s, last)
        time.sleep(interval_s)


def run_tree(args: argparse.Namespace) -> int:
    result_path: Path = args.result
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def register_tree(subparsers: Any) -> None:
    parser = subparsers.add_parser("tree", help="one result's search tree as PNG + interactive HTML")
    parser.add_argument("result", type=Path, help="result JSON (experiments.result_json.save_result)")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for the outputs (default: next to RESULT)")
    parser.add_argument("--watch", type=_positive_float, default=None, metavar="SECONDS",
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
    """Parse argv, run the subcommand; bad input files print "error: ..." and give 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ResultFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
