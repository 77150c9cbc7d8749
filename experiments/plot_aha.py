"""Plot the "aha moment" of a joint GRPO + SPR run: the SPRM head's mean path score of correct
and of incorrect rollouts over training steps, on the training batches and on the fixed
held-out rollouts, with their difference and the reward below.

    python -m experiments.plot_aha outputs/train/default/metrics.jsonl            # -> metrics.aha.png beside it
    python -m experiments.plot_aha runs/joint/metrics.jsonl --out aha.png

Reads only the run's saved rows (`experiments.train` writes metrics.jsonl): fc/correct_prob,
fc/false_prob, fc/diff_prob (training batch, every step), heldout_fc/* (every eval_every steps,
and step 0), reward/mean and heldout/greedy_acc when present. Where the correct and incorrect
curves split is the reference's "aha moment"; a train gap without a held-out gap is the
self-confirmation DESIGN.md section 4 warns about. The plot marks the split with a vertical line:
`experiments.aha_metrics.aha_step`, the first step from which the held-out gap stays above
AHA_THRESHOLD (0.1) to the end of the run (the train-batch gap when a run has no held-out rows;
no mark when its held-out gap is never a number: every held-out rollout right, or every one
wrong). Steps must increase through the file (two runs' rows in one file are refused).

`plot_aha(metrics_jsonl, out_png)` is the function `python -m experiments.plot aha` wires to
(`register_aha(subparsers)` adds the subcommand). Bad input prints "error: <file>: <what is
wrong>" and exits with code 2; so does an --out that cannot be an image file (an existing
folder, a path under a file, a suffix matplotlib cannot write). An --out without a suffix is
written as PNG to exactly that path.

Tests: `.venv/bin/pytest tests/test_train_loop.py -k plot` and `tests/test_plot_cli.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from experiments.aha_metrics import AHA_THRESHOLD, aha_step
from experiments.broken_pipe import stdout_closed_quietly
from experiments.plot_output import PlotOutputError, check_out_path, save_figure


CURVES: tuple[tuple[str, str, str, str], ...] = (  # (key, label, color, line style)
    ("fc/correct_prob", "correct (train batch)", "tab:green", "-"),
    ("fc/false_prob", "incorrect (train batch)", "tab:red", "-"),
    ("heldout_fc/correct_prob", "correct (held-out)", "tab:green", "--"),
    ("heldout_fc/false_prob", "incorrect (held-out)", "tab:red", "--"),
)
LOWER: tuple[tuple[str, str, str, str], ...] = (
    ("fc/diff_prob", "gap, train batch", "tab:blue", "-"),
    ("heldout_fc/diff_prob", "gap, held-out", "tab:blue", "--"),
    ("reward/mean", "reward (train batch)", "tab:gray", "-"),
    ("heldout/greedy_acc", "greedy accuracy (held-out)", "black", ":"),
)


class AhaInputError(ValueError):
    """A metrics file that cannot be plotted."""


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where key holds a number (null and absent are skipped)."""
    points = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, read-only (a run may be appending to it: an incomplete last
    line is skipped, never cut off the file as `experiments.record_log.load_rows` would)."""
    if not path.is_file():
        raise AhaInputError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise AhaInputError(f"{path}: not UTF-8 text ({err})") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # the torn tail of a line being written
                break
            raise AhaInputError(f"{path}: line {number} is not JSON ({err})") from err
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise AhaInputError(f"{path}: line {number} is not a metrics row with an integer 'step'")
        if rows and row["step"] <= rows[-1]["step"]:  # two runs' rows in one file: one mixed series, a wrong aha
            raise AhaInputError(f"{path}: line {number} is step {row['step']} after step {rows[-1]['step']}: "
                                "a run's steps increase (two runs' rows in one file?)")
        rows.append(row)
    return rows


def load_metrics(path: Path) -> list[dict[str, Any]]:
    rows = read_rows(path)
    if not any(series(rows, key)[0] for key, *_ in CURVES):
        raise AhaInputError(f"{path}: no fc/* or heldout_fc/* values (is it an experiments.train metrics.jsonl?)")
    return rows


def drawn_series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) to draw: a null value (logged, undefined: no correct or no wrong rollout
    that step) is NaN, a break in the line; rows without the key (between evaluations) are skipped,
    so the line joins the evaluations on either side."""
    points = [(int(r["step"]), math.nan if r[key] is None else float(r[key])) for r in rows
              if key in r and (r[key] is None or isinstance(r[key], (int, float)))]
    return [p[0] for p in points], [p[1] for p in points]


def draw(ax: Axes, rows: Sequence[dict[str, Any]], curves: Sequence[tuple[str, str, str, str]]) -> None:
    for key, label, color, style in curves:
        steps, values = drawn_series(rows, key)
        if any(not math.isnan(v) for v in values):
            broken = any(math.isnan(v) for v in values)  # a point between two breaks shows only as a marker
            ax.plot(steps, values, style, color=color, label=label,
                    marker="o" if len(steps) < 30 or broken else None, ms=3 if len(steps) < 30 else 1.5)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a stray box and a UserWarning
        ax.legend(fontsize=8)


def metrics_file(path: str | Path) -> Path:
    """A run folder's metrics.jsonl, or the file itself when given one."""
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def run_name(metrics_jsonl: Path) -> str:
    """The run folder's name (also for a bare "metrics.jsonl" given inside the run folder)."""
    return metrics_jsonl.resolve().parent.name


HELDOUT_GAP = "heldout_fc/diff_prob"
UNDEFINED_GAP = ("held-out gap undefined at every evaluation (no correct or no wrong held-out rollout): "
                 "no aha marked")


def split_step(rows: Sequence[dict[str, Any]], threshold: float = AHA_THRESHOLD) -> tuple[int | None, str]:
    """(the aha step of the run, the gap it was read from): `aha_step` of the held-out gap, or of
    the train-batch gap when the run has no held-out rows. A run with held-out rows whose gap is
    never a number (every held-out rollout right, or every one wrong) marks none: the train gap
    is the self-confirmation DESIGN.md section 4 warns about."""
    if any(HELDOUT_GAP in row for row in rows):
        return aha_step(*series(rows, HELDOUT_GAP), threshold), HELDOUT_GAP
    return aha_step(*series(rows, "fc/diff_prob"), threshold), "fc/diff_prob"


def mark_split(axes: Sequence[Axes], step: int | None, key: str, defined: bool = True) -> None:
    """A vertical line at the aha step on every axes, labelled on the last; the label runs left of
    the line in the right half of the run, so it stays inside the axes (a split at the last
    step is common). defined False: the gap was never a number, said in the last axes instead."""
    if not defined:
        axes[-1].text(0.01, 0.97, UNDEFINED_GAP, transform=axes[-1].transAxes, color="tab:purple", fontsize=8, va="top")
        return
    if step is None:
        return
    for ax in axes:
        ax.axvline(step, color="tab:purple", lw=1.2, ls="-.")
    left, right = axes[-1].get_xlim()
    ha = "right" if step > (left + right) / 2 else "left"
    axes[-1].text(step, axes[-1].get_ylim()[1], f" aha: step {step} ({key} > {AHA_THRESHOLD} from here on) ",
                  color="tab:purple", fontsize=8, va="top", ha=ha)


def plot_aha(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Draw the aha curves of a run's metrics.jsonl (or of a run folder holding one) into
    out_png; return its path."""
    metrics_jsonl, out_png = metrics_file(metrics_jsonl), Path(out_png)
    rows = load_metrics(metrics_jsonl)
    fmt = check_out_path(out_png, "aha.png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 6.5))  # drawn on its own Agg canvas: the process's backend is left alone
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    draw(top, rows, CURVES)
    top.set_ylabel("mean path score (geometric mean of step scores)")
    top.set_title(f"SPRM scores of correct vs incorrect rollouts: {run_name(metrics_jsonl)}", parse_math=False)
    draw(bottom, rows, LOWER)
    bottom.axhline(0.0, color="gray", lw=0.5)
    step, key = split_step(rows)
    mark_split((top, bottom), step, key, defined=bool(series(rows, key)[0]))
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.5 on a short run
    only = {row["step"] for row in rows}
    if len(only) == 1:  # one step (a run just started): the locator's ticks were 0.945 .. 1.05
        bottom.set_xlim(min(only) - 1, min(only) + 1)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("gap / accuracy")
    fig.tight_layout()
    save_figure(fig, out_png, fmt, dpi=120)
    return out_png


def run_aha(args: argparse.Namespace) -> int:
    out = args.out or metrics_file(args.metrics).with_suffix(".aha.png")
    try:
        plot_aha(args.metrics, out)
    except (AhaInputError, PlotOutputError, OSError) as err:  # OSError: an --out folder that cannot be made
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def add_aha_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("metrics", type=Path, help="a run folder (RUN_DIR) or its metrics.jsonl (experiments.train, "
                    "experiments.train_head)")
    ap.add_argument("--out", type=Path, default=None,
                    help="image path; its suffix picks the format: .png, .svg, .pdf, ... (none: PNG) "
                         "(default: METRICS with suffix .aha.png)")
    ap.set_defaults(run=run_aha)


def register_aha(subparsers: Any) -> None:
    """The `aha` subcommand of `python -m experiments.plot`."""
    add_aha_arguments(subparsers.add_parser("aha", help="SPRM scores of correct vs incorrect rollouts over training"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot_aha", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_aha_arguments(ap)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
