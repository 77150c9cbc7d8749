"""A search tree as a PNG: hierarchical layout, colour = step score, edge width = visits, chosen
path in red.

Layout (`tree_layout`, computed here, no graphviz): depth runs down the y axis; leaves sit at
x = 0, 1, 2, ... in depth-first order (children in creation order); each parent is centred over
its first and last child. `chosen_path` and `score_range` are shared with the HTML view
(`experiments.tree_html`), so both pictures place and colour the nodes the same way.

Drawing uses matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`, no pyplot), so
importing this module never changes anyone's global backend. Trees with more than
`LABEL_MAX_NODES` nodes get smaller markers and no step labels; a few hundred nodes stay readable.
In a labelled tree, neighbouring nodes of one depth put their labels in two alternating rows
(`label_rows`), with `LABEL_SLOT_IN` inches per leaf, so the labels do not overlap each other.
The PNG's font has no CJK glyphs (a C-Eval tree): those characters draw as boxes, without a
warning per character; the HTML page shows the text.

`check_drawable` refuses (TreeJsonError, naming the field) a node whose depth, visits or score
is not a number: the structure itself is checked when the file is read
(`experiments.result_json.load_result`).

    draw_tree_png(record.tree, record.chosen_node, "tree.png")
    python -m experiments.plot tree RESULT.json      # writes RESULT.png and RESULT.html

Tests: `.venv/bin/pytest tests/test_tree_plot.py tests/test_plot_cli.py`.
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.result_json import write_atomic

SCORE_CMAP = "viridis"
NO_SCORE_COLOR = "#b0b0b0"
CHOSEN_COLOR = "#d62728"
LABEL_MAX_NODES = 40  # above this: no per-node text labels
LABEL_CHARS = 14
LABEL_SLOT_IN = 0.6  # inches per leaf in a labelled tree; neighbours' labels alternate between two
# rows (`label_rows`), so a label has two slots, 1.2 in: LABEL_CHARS digits at 7 pt take ~0.9 in
UNLABELLED_SLOT_IN = 0.3
ROOT_LABEL_IN = 0.45  # the root's label: 12 pt above the root + a 9 pt line, with some air
THINK_TAGS = re.compile(r"</?think>")  # markup, not content: "</think>Answer: 5" is labelled "Answer: 5"
FINISH_MARKERS = {"eos": "s", "length": "X"}  # any other finish (open steps, unknown values): "o"

Position = tuple[float, int]  # (x in leaf slots, depth)


class TreeJsonError(ValueError):
    """A tree node that cannot be drawn; the message names the field (`tree.nodes[4].visits`)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_drawable(tree_json: dict[str, Any]) -> None:
    """TreeJsonError naming the first node whose depth is not an integer, whose visits are not a
    finite number (NaN failed in the HTML's strict JSON after the PNG was written), or whose score is neither a number nor null: the layout, the edge widths and the
    colours compute with them."""
    for i, node in enumerate(tree_json["nodes"]):
        checks = (("depth", isinstance(node["depth"], int) and not isinstance(node["depth"], bool), "an integer"),
                  ("visits", _is_number(node["visits"]) and math.isfinite(node["visits"]), "a finite number"),
                  ("score", node["score"] is None or _is_number(node["score"]), "a number or null"))
        for key, ok, must in checks:
            if not ok:
                raise TreeJsonError(f"tree.nodes[{i}].{key}={node[key]!r} must be {must}")


def tree_layout(tree_json: dict[str, Any]) -> dict[int, Position]:
    """Node id -> (x, depth): leaves evenly spaced in depth-first order, parents centred over
    their first and last child. Iterative, so deep trees need no recursion."""
    nodes = tree_json["nodes"]
    xs: dict[int, float] = {}
    next_leaf = 0
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:
        node_id, children_done = stack.pop()
        children = nodes[node_id]["children"]
        if not children:
            xs[node_id] = float(next_leaf)
            next_leaf += 1
        elif children_done:
            xs[node_id] = (xs[children[0]] + xs[children[-1]]) / 2.0
        else:
            stack.append((node_id, True))
            stack.extend((child, False) for child in reversed(children))
    return {node_id: (x, nodes[node_id]["depth"]) for node_id, x in xs.items()}


def chosen_path(tree_json: dict[str, Any], chosen_node: int | None) -> list[int]:
    """Node ids from the root to chosen_node ([] when there is no chosen node)."""
    if chosen_node is None:
        return []
    nodes, path = tree_json["nodes"], []
    node_id: int | None = chosen_node
    while node_id is not None:
        path.append(node_id)
        node_id = nodes[node_id]["parent"]
    return path[::-1]


def finite_score(node: dict[str, Any]) -> float | None:
    """The node's score, or None when it has none (or it is NaN / infinite)."""
    score = node.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return float(score)
    return None


def score_range(tree_json: dict[str, Any]) -> tuple[float, float]:
    """Colour scale bounds: [0, 1] when every score lies there (PRM scores do), else min..max."""
    scores = [s for s in (finite_score(n) for n in tree_json["nodes"]) if s is not None]
    if not scores or (min(scores) >= 0.0 and max(scores) <= 1.0):
        return 0.0, 1.0
    lo, hi = min(scores), max(scores)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def score_colors(tree_json: dict[str, Any]) -> list[str]:
    """Hex fill colour of every node: the colormap at its score, grey for no score."""
    cmap = matplotlib.colormaps[SCORE_CMAP]
    norm = Normalize(*score_range(tree_json))
    colors = []
    for node in tree_json["nodes"]:
        score = finite_score(node)
        colors.append(NO_SCORE_COLOR if score is None else to_hex(cmap(norm(score))))
    return colors


def edge_widths(tree_json: dict[str, Any], thin: float, thick: float) -> dict[int, float]:
    """Child id -> width of the edge into it, linear in the child's visits from thin to thick
    (all thin-ish when nothing was visited, e.g. Best-of-N)."""
    nodes = tree_json["nodes"]
    most = max((n["visits"] for n in nodes[1:]), default=0)
    if most <= 0:
        return {n["id"]: (thin + thick) / 3 for n in nodes[1:]}
    return {n["id"]: thin + (thick - thin) * n["visits"] / most for n in nodes[1:]}


def short_label(node: dict[str, Any]) -> str:
    """A one-line, truncated step text for small trees."""
    step = node["step"]
    text = "" if step is None else " ".join(THINK_TAGS.sub(" ", str(step["text"])).split())
    text = "".join(c if c.isprintable() else "?" for c in text)  # no glyph for control chars
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def draw_tree_png(
    tree_json: dict[str, Any], chosen_node: int | None, out_path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Draw the tree to out_path (PNG, written atomically) and return the path."""
    fig = tree_figure(tree_json, chosen_node, title)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # one per character the font lacks (CJK): the boxes say it already
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format="png", bbox_inches="tight")
    return write_atomic(out_path, buf.getvalue())


def tree_figure(tree_json: dict[str, Any], chosen_node: int | None, title: str | None = None) -> Figure:
    """The tree drawn on a new Agg figure (what `draw_tree_png` saves); TreeJsonError first when
    a node cannot be drawn (`check_drawable`)."""
    check_drawable(tree_json)
    pos = tree_layout(tree_json)
    path = chosen_path(tree_json, chosen_node)
    large = len(tree_json["nodes"]) > LABEL_MAX_NODES
    fig = _figure(pos, labelled=not large)
    ax = fig.add_subplot()
    _draw_edges(ax, tree_json, pos, path, large)
    _draw_nodes(ax, tree_json, pos, path, large)
    _draw_labels(ax, tree_json, pos, large)
    _decorate(fig, ax, tree_json, pos, title)
    return fig


def _figure(pos: dict[int, Position], labelled: bool) -> Figure:
    """Size (inches) grows with the number of leaves (width: room for a label under each leaf
    when labelled) and the depth (height), within bounds."""
    width_slots = max(x for x, _ in pos.values()) + 1
    depth = max(d for _, d in pos.values())
    slot_in = LABEL_SLOT_IN if labelled else UNLABELLED_SLOT_IN
    width = min(max(3 + slot_in * width_slots, 7.0), 40.0)
    height = min(max(2 + 0.9 * depth, width / 4, 3.5), 24.0)  # aspect at most 4:1
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _draw_edges(ax: Any, tree_json: dict[str, Any], pos: dict[int, Position], path: list[int], large: bool) -> None:
    widths = edge_widths(tree_json, thin=0.4, thick=3.0 if large else 5.0)
    on_path = set(path[1:])
    segments, seg_widths = [], []
    for child, width in widths.items():
        parent = tree_json["nodes"][child]["parent"]
        segments.append([(pos[parent][0], -pos[parent][1]), (pos[child][0], -pos[child][1])])
        seg_widths.append(width)
    ax.add_collection(LineCollection(segments, linewidths=seg_widths, colors="#7f7f7f", zorder=1))
    chosen = [seg for seg, child in zip(segments, widths) if child in on_path]
    chosen_w = [max(w, 2.0) + 1.0 for w, child in zip(seg_widths, widths) if child in on_path]
    if chosen:
        ax.add_collection(LineCollection(chosen, linewidths=chosen_w, colors=CHOSEN_COLOR, zorder=2))


def _draw_nodes(ax: Any, tree_json: dict[str, Any], pos: dict[int, Position], path: list[int], large: bool) -> None:
    """Circles for open steps, squares for final ones (eos), X for cut ones (length); nodes on
    the chosen path get a thick red outline."""
    n = len(tree_json["nodes"])
    size = min(max(9000.0 / n, 14.0), 260.0)
    colors = score_colors(tree_json)
    on_path = set(path)
    for marker in ("o", "s", "X"):
        ids = [i for i, node in enumerate(tree_json["nodes"]) if node_marker(node) == marker]
        if not ids:
            continue
        ax.scatter(
            [pos[i][0] for i in ids], [-pos[i][1] for i in ids], s=size, marker=marker,
            c=[colors[i] for i in ids], zorder=3,
            edgecolors=[CHOSEN_COLOR if i in on_path else "#333333" for i in ids],
            linewidths=[2.6 if i in on_path else (0.3 if large else 0.8) for i in ids],
        )


def node_marker(node: dict[str, Any]) -> str:
    """The node's matplotlib marker by its step's finish: every node gets one, whatever it holds."""
    finish = None if node["step"] is None else node["step"].get("finish")
    return FINISH_MARKERS.get(finish, "o") if isinstance(finish, str) else "o"


def _draw_labels(ax: Any, tree_json: dict[str, Any], pos: dict[int, Position], large: bool) -> None:
    root_x, _ = pos[0]
    ax.annotate(
        f"problem {tree_json['problem']['id']}", (root_x, 0), xytext=(0, 12), textcoords="offset points",
        ha="center", va="bottom", fontsize=9, fontweight="bold", parse_math=False,
    )
    if large:
        return
    rows = label_rows(tree_json, pos)
    for node in tree_json["nodes"][1:]:
        x, depth = pos[node["id"]]
        ax.annotate(
            short_label(node), (x, -depth), xytext=(0, -11 - 10 * rows[node["id"]]), textcoords="offset points",
            ha="center", va="top", fontsize=7, color="#333333", parse_math=False,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},  # over edges
        )


def label_rows(tree_json: dict[str, Any], pos: dict[int, Position]) -> dict[int, int]:
    """Node id -> label row, 0 or 1: the nodes of one depth, left to right, alternate rows, so
    each label may be two leaf slots wide without touching its neighbours'."""
    by_depth: dict[int, list[int]] = {}
    for node in tree_json["nodes"][1:]:
        by_depth.setdefault(node["depth"], []).append(node["id"])
    return {node_id: rank % 2 for ids in by_depth.values()
            for rank, node_id in enumerate(sorted(ids, key=lambda i: pos[i][0]))}


def _decorate(fig: Figure, ax: Any, tree_json: dict[str, Any], pos: dict[int, Position], title: str | None) -> None:
    xs = [x for x, _ in pos.values()]
    depth = max(d for _, d in pos.values())
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-depth - 0.6, _top_margin(fig, depth))
    ax.set_xticks([])
    step = max(1, math.ceil((depth + 1) / 20))
    ax.set_yticks([-d for d in range(0, depth + 1, step)], [str(d) for d in range(0, depth + 1, step)])
    ax.set_ylabel("depth (steps)")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"{len(tree_json['nodes'])} nodes", fontsize=10, parse_math=False)
    mappable = ScalarMappable(norm=Normalize(*score_range(tree_json)), cmap=SCORE_CMAP)
    fig.colorbar(mappable, ax=ax, label="step score (grey: none)", fraction=0.04, pad=0.02)
    visits = any(n["visits"] for n in tree_json["nodes"])  # MCTS counts them; elsewhere every edge is alike
    ax.legend(handles=_legend_handles(visits), loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=5,
              frameon=False, fontsize=8)


def _top_margin(fig: Figure, depth: int) -> float:
    """Room above the root (in depth units) for its "problem ..." label below the title: 0.6, or
    ROOT_LABEL_IN inches where a deep tree makes a depth unit thin (the axes get ~80% of the height)."""
    units_per_inch = (depth + 1.2) / (0.8 * fig.get_size_inches()[1])
    return max(0.6, ROOT_LABEL_IN * units_per_inch)


def _legend_handles(visits: bool = True) -> list[Line2D]:
    """The shapes' and lines' legend; edge width is explained only where it shows visits (MCTS)."""
    def marker(shape: str, label: str) -> Line2D:
        return Line2D([], [], linestyle="", marker=shape, markerfacecolor="#cccccc", markeredgecolor="#333333",
                      label=label)

    widths = [Line2D([], [], color="#7f7f7f", linewidth=2, label="edge width ∝ visits")] if visits else []
    return [
        marker("o", "step"), marker("s", "final (eos)"), marker("X", "cut (length)"), *widths,
        Line2D([], [], color=CHOSEN_COLOR, linewidth=3, label="chosen path"),
    ]
