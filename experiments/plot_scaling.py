"""Plot accuracy against log compute for a sweep: one line per strategy, fits and CI error bars.

Reads only the sweep's saved records (`experiments.sweep_metrics`), fits accuracy = a + b log2 C
per strategy (`experiments.scaling`) and draws each strategy's pooled points (95% CI (`experiments.metrics.interval`)
error bars, labelled with their budget N) and its fitted line; a strategy measured at one
compute only (greedy) is a single marker. A sweep folder holding runs of several workloads
(task / policy configs, `experiments.sweep_metrics`) gets one line per workload and strategy,
labelled "strategy [workload]", a marker shape per workload, and a one-line note on stderr.
A legend entry gives the fitted slope and, where the curve flattens within the sweep, the last N
that gained more than --threshold accuracy per doubling ("flat after N=8", "falling after N=8";
"flat" or "falling" when no step gained that much: `experiments.scaling.verdict`, the words of
the scaling table). `--compute flops` puts every forward's FLOPs on the x axis (the scorer's
included) instead of C = policy parameters x tokens generated. More than six series, or labels longer than 48
characters (several workloads), put the legend beside the axes, the figure widened (and made
taller by the legend's lines) so the axes keep their size.

    python -m experiments.plot_scaling outputs/sweeps/budget_sweep              # -> SWEEP_DIR/scaling.png
    python -m experiments.plot_scaling outputs/sweeps/budget_sweep --compute flops   # -> SWEEP_DIR/scaling_flops.png
    python -m experiments.plot_scaling outputs/sweeps/budget_sweep --out s.png --threshold 0.02
    python -m experiments.plot_scaling outputs/sweeps/budget_sweep --compute flops

`plot_scaling(sweep_dir, out_png)` is the function `python -m experiments.plot scaling` wires to.
Bad input (a sweep folder without runs, an --out that is a folder, lies under a file or has a suffix
matplotlib does not write) prints "error: <path>: <what is wrong>" and exits with code 2; an --out
without a suffix is written as PNG at that very path.

Tests: `.venv/bin/pytest tests/test_scaling.py`.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.broken_pipe import stdout_closed_quietly
from experiments.cli_args import finite_float
from experiments.plot_output import PlotOutputError, check_out_path, save_figure
from experiments.scaling import (
    COMPUTE_AXES, DEFAULT_AXIS, DEFAULT_THRESHOLD, SeriesScaling, add_compute_argument, scaling_by_strategy,
    scaling_file, scaling_notes, verdict,
)
from experiments.sweep_metrics import RunFolderError, RunSummary, sweep_summaries

WORKLOAD_MARKERS = ("o", "s", "^", "D", "v", "P")  # one shape per workload
CROWDED = 6  # more series than this: a wider figure with the legend beside the axes
LABEL_WIDTH = 48  # legend labels wrap at this many characters; a longer one puts the legend beside the axes
LEGEND_LINE_IN, LEGEND_GAP_LINES = 0.14, 0.6  # a legend line at font size 7; the gap between entries, in lines
LEGEND_COLUMN_LINES, LEGEND_COLUMN_IN = 26, 3.6  # lines of one legend column beside the axes; its width


def series_colors(count: int) -> list[Any]:
    """A colour per series: matplotlib's default cycle, or tab20 when it has fewer colours than
    series (12 series in the default 10 drew two pairs alike); beyond 20 colours repeat."""
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return list(colors) if count <= len(colors) else list(matplotlib.colormaps["tab20"].colors)


def series_label(series: SeriesScaling) -> str:
    """The legend entry: name, fitted slope, and where the curve flattens (the threshold's
    verdict, `experiments.scaling.last_gaining`; not for a curve plainly rising to its end).
    A "$" is escaped: matplotlib read "run_$5_to_$10" as broken maths."""
    label = series.name if series.fit is None else f"{series.name}: {round(series.fit.slope, 3) + 0.0:+.3f}/doubling"
    words = verdict(series)
    if words != "-" and words != f"rising to N={series.last_gaining_budget}":
        label += f", {words}"
    return label.replace("$", r"\$")


def draw_series(ax: Axes, series: SeriesScaling, color: str, marker: str = "o", label: str | None = None) -> None:
    """Points with CI error bars and N labels, plus the fitted line over the measured range;
    label: the legend entry (default `series_label`)."""
    c = np.array([p.compute for p in series.points])
    y = np.array([p.accuracy.mean for p in series.points])
    err = np.array([[p.accuracy.mean - p.accuracy.low for p in series.points],
                    [p.accuracy.high - p.accuracy.mean for p in series.points]])  # [2, P]
    ax.errorbar(c, y, yerr=err, fmt=marker, color=color, capsize=3, label=label or series_label(series))
    for p in series.points:
        ax.annotate(f"N={p.budget}", (p.compute, p.accuracy.mean), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color=color)
    if series.fit is not None:
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.plot(grid, series.fit.predict(grid), "-", color=color, alpha=0.7)


def legend_layout(labels: Sequence[str]) -> tuple[list[str], int, tuple[float, float]]:
    """(labels wrapped to LABEL_WIDTH characters, legend columns beside the axes (0: inside them),
    figure size in inches). A few short labels sit inside the axes (7 x 4.5); many series or long
    labels (a sweep of several workloads) go beside them in columns of at most LEGEND_COLUMN_LINES
    lines, the figure widened by each column (and a little taller for a long column), so the
    axes keep about their size (below them, long labels squeezed the axes to a strip; one tall
    column stretched them)."""
    wrapped = [textwrap.fill(label, LABEL_WIDTH) for label in labels]
    if len(labels) <= CROWDED and all(len(label) <= LABEL_WIDTH for label in labels):
        return wrapped, 0, (7.0, 4.5)
    lines = sum(label.count("\n") + 1 for label in wrapped)
    columns = max(1, math.ceil(lines / LEGEND_COLUMN_LINES))
    per_column = math.ceil(lines / columns) + LEGEND_GAP_LINES * math.ceil(len(labels) / columns)
    return wrapped, columns, (7.0 + LEGEND_COLUMN_IN * columns, max(4.5, 1.2 + LEGEND_LINE_IN * per_column))


def plot_scaling(sweep_dir: str | Path, out_png: str | Path, threshold: float = DEFAULT_THRESHOLD,
                 compute: str = DEFAULT_AXIS) -> Path:
    """Draw the sweep's accuracy-vs-compute plot into out_png; return its path. compute: the
    x axis, a key of `experiments.scaling.COMPUTE_AXES` ("tokens" or "flops")."""
    return plot_runs(sweep_summaries(sweep_dir), Path(sweep_dir).resolve().name, out_png, threshold, compute)


def plot_runs(runs: Sequence[RunSummary], name: str, out_png: str | Path, threshold: float = DEFAULT_THRESHOLD,
              compute: str = DEFAULT_AXIS) -> Path:
    """The plot of `plot_scaling` from the sweep's RunSummary rows; name goes in the title."""
    axis = COMPUTE_AXES[compute]
    series = scaling_by_strategy(runs, threshold, axis)
    if not any(p.compute > 0 for s in series for p in s.points):  # empty axes were drawn, "wrote" printed
        raise ValueError(f"no run of {name} has a {axis.label} above 0 to place on a log axis (records without "
                         "policy_parameters?): nothing to plot")
    out_png = Path(out_png)
    fmt = check_out_path(out_png, "scaling.png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    labels, columns, size = legend_layout([series_label(s) for s in series])
    fig = Figure(figsize=size, layout="constrained")  # on its own Agg canvas: the process's backend is left alone
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = series_colors(len(series))
    workloads = sorted({s.workload for s in series})
    for i, s in enumerate(series):
        marker = WORKLOAD_MARKERS[workloads.index(s.workload) % len(WORKLOAD_MARKERS)]
        draw_series(ax, s, colors[i % len(colors)], marker, labels[i])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{axis.label} (log2 scale)")
    ax.set_ylabel("accuracy (chosen answer, 95% CI)")
    ax.set_title(textwrap.fill(f"Test-time search scaling: {name}", 2 * LABEL_WIDTH), parse_math=False)
    ax.grid(True, alpha=0.3)
    if columns:  # constrained layout gives it the room the figure was widened by
        fig.legend(fontsize=7, loc="outside right upper", ncols=columns)
    else:
        ax.legend(fontsize=8)
    save_figure(fig, out_png, fmt, dpi=120, bbox_inches="tight")
    return out_png


def run_scaling(args: argparse.Namespace) -> int:
    try:
        runs = sweep_summaries(args.sweep_dir)
        for note in scaling_notes(runs, args.sweep_dir, COMPUTE_AXES[args.compute]):
            print(note, file=sys.stderr)
        out = plot_runs(runs, args.sweep_dir.resolve().name, args.out or args.sweep_dir / scaling_file(args.compute, "png"),
                        args.threshold, args.compute)
    except (RunFolderError, PlotOutputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def add_scaling_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("sweep_dir", type=Path, help="a sweep folder of `python -m experiments.search -m`")
    ap.add_argument("--out", type=Path, default=None,
                    help="image path; its suffix picks the format: .png, .svg, .pdf, ... (none: PNG) "
                         "(default: SWEEP_DIR/scaling.png; scaling_flops.png with --compute flops)")
    ap.add_argument("--threshold", type=finite_float, default=DEFAULT_THRESHOLD,
                    help="accuracy gained per doubling of compute below which a series is called flat after its "
                         "last gaining N, shown in its legend entry (default %(default)s)")
    add_compute_argument(ap)
    ap.set_defaults(run=run_scaling)


def register_scaling(subparsers: Any) -> None:
    """The `scaling` subcommand of `python -m experiments.plot`."""
    add_scaling_arguments(subparsers.add_parser("scaling", help="accuracy vs log compute, one line per strategy"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot_scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scaling_arguments(ap)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    with stdout_closed_quietly():  # `... | head`: exit 141 without a traceback
        raise SystemExit(main())
