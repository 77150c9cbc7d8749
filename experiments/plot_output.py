"""Where a plot command writes its image: an --out path checked before anything is drawn.

    fmt = check_out_path(Path("plots/scaling.png"), "scaling.png")   # "png"
    save_figure(fig, out, fmt)        # written at exactly the path the command then reports

Used by `python -m experiments.plot scaling` and `... aha`; tests: tests/test_plot_cli.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from experiments.cli_args import file_above


class PlotOutputError(ValueError):
    """An --out path no image can be written to."""


def check_out_path(out: Path, example_name: str) -> str:
    """The image format for out (its suffix; "png" without one, still written at out itself), or
    PlotOutputError naming an --out that cannot be written: an existing folder (example_name is
    the file the message suggests inside it), a path under a file, an unknown suffix, .pgf
    without the LaTeX program matplotlib writes it with."""
    if out.is_dir():
        raise PlotOutputError(f"{out}: --out is an existing folder; give a file path such as {out / example_name}")
    above = file_above(out)
    if above is not None:
        raise PlotOutputError(f"{above}: --out needs a folder here, but it is an existing file")
    fmt = out.suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise PlotOutputError(f"{out}: --out must end in an image suffix matplotlib writes "
                              f"({', '.join(sorted(supported))}), not .{fmt}")
    tex = str(matplotlib.rcParams["pgf.texsystem"])
    if fmt == "pgf" and shutil.which(tex) is None:
        raise PlotOutputError(f"{out}: matplotlib writes .pgf with {tex}, which is not installed; "
                              "use .pdf, .svg or .png, or install a LaTeX distribution")
    return fmt


def save_figure(fig: Figure, out: Path, fmt: str, **kwargs: Any) -> None:
    """fig.savefig(out, format=fmt, **kwargs); PlotOutputError naming out where matplotlib cannot
    write it (a full disk, a backend's missing tool), with no partial file left behind."""
    existed = out.exists()
    try:
        fig.savefig(out, format=fmt, **kwargs)
    except (OSError, RuntimeError) as err:
        if not existed:
            out.unlink(missing_ok=True)
        raise PlotOutputError(f"{out}: the image could not be written: {err}") from err
