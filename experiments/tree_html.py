"""A search tree as one self-contained interactive HTML page (inline CSS, JS, SVG and data; no
network, no CDN), for reading a tree step by step in a browser.

The SVG is drawn here in Python with the PNG's layout and colours (`experiments.tree_plot`):
colour = step score, edge width = visits, chosen path in red, circles for open steps, squares
for final ones. Each node carries a hover tooltip (`<title>`, HTML-escaped step text). Clicking
a node fills the side panel (step text, score, visits, value, prior, finish, depth, the path so
far) from a JSON block embedded in the page; the panel sets text with `textContent`, never
`innerHTML`, and the JSON escapes `<`, `>` and `&` as `\\u003c` etc., so step text such as
"</script>" can neither end the block nor inject markup. The selected node, the zoom and the
scroll position are kept in the URL hash (`#node=12&zoom=0.25&x=300&y=0`), so a reload keeps
them; "fit" zooms out as far as 0.005, so a tree of thousands of leaves fits the canvas.

Live mode (`refresh_s`): the page reloads itself every refresh_s seconds (`location.reload()`,
the hash keeps the selection and the view; a "pause" box stops it). It therefore shows whatever the
HTML file holds at that moment: something has to rewrite the file while the search runs, e.g.
`python -m experiments.plot tree RESULT.json --watch 2`, which re-renders the page whenever the
result JSON changes (the search side writes it with `experiments.result_json.save_result`, and
both files are replaced atomically, so a reload never reads a half-written file). A reload of a
file:// page needs no server, unlike a `fetch` of a sibling JSON, which browsers block there.

    write_tree_html(record.tree, record.chosen_node, "tree.html")
    python -m experiments.plot tree RESULT.json      # writes RESULT.png and RESULT.html

Tests: `.venv/bin/pytest tests/test_tree_plot.py tests/test_plot_cli.py`.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
from matplotlib.colors import to_hex

from experiments.result_json import write_atomic
from experiments.tree_plot import (CHOSEN_COLOR, LABEL_MAX_NODES, NO_SCORE_COLOR, SCORE_CMAP, check_drawable,
                                   chosen_path, edge_widths, label_rows, score_colors, score_range, short_label,
                                   tree_layout)

PAD = 40  # px around the drawing
LABELLED_DX_MIN = 45.0  # px per leaf when steps are labelled: two label rows give a label 90 px (~14 chars at 10 px)
GRADIENT_STOPS = 6  # colour stops of the legend's CSS gradient


def write_tree_html(
    tree_json: dict[str, Any],
    chosen_node: int | None,
    out_path: str | os.PathLike[str],
    refresh_s: float | None = None,
    title: str | None = None,
    candidates: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write the page to out_path (atomically) and return the path. refresh_s: reload the page
    every refresh_s seconds (live mode, see the module docstring); None: a static page.
    candidates: the result's candidates ({"node_id", "score"}): the side panel shows each one's
    path score (what ranked it) on its leaf. Visits, value and prior are shown only for a tree
    whose strategy counts visits (MCTS), the value alone for one whose strategy ranked or weighted
    nodes by it (beam search, DVTS, REBASE, particle filtering); elsewhere they are placeholders.
    TreeJsonError (`experiments.tree_plot.check_drawable`) when a node cannot be drawn."""
    check_drawable(tree_json)
    if refresh_s is not None and not (isinstance(refresh_s, (int, float)) and refresh_s > 0):
        raise ValueError(f"refresh_s={refresh_s!r} must be None or a number > 0")
    title = title or f"search tree · problem {tree_json['problem']['id']}"
    fills = {
        "TITLE": html.escape(title),
        "LEGEND": _legend_html(tree_json, counts_visits(tree_json)),
        "SVG": _svg(tree_json, chosen_node),
        "DATA": _script_json(_page_data(tree_json, chosen_node, refresh_s, candidates)),
    }
    # One pass, so a step text that happens to contain "__DATA__" is never substituted into.
    page = re.sub(r"__(TITLE|LEGEND|SVG|DATA)__", lambda m: fills[m.group(1)], _TEMPLATE)
    return write_atomic(out_path, page)


def counts_visits(tree_json: dict[str, Any]) -> bool:
    """Whether the tree's strategy counts visits (MCTS): some node has one."""
    return any(n["visits"] for n in tree_json["nodes"])


def ranks_by_value(tree_json: dict[str, Any]) -> bool:
    """Whether the strategy set the nodes' values (beam search, DVTS: the aggregated path score
    that ranked a node; REBASE, particle filtering: the reward that weighted it): some node has
    one (Best-of-N leaves them 0)."""
    return any(n["value"] for n in tree_json["nodes"])


def _page_data(tree_json: dict[str, Any], chosen_node: int | None, refresh_s: float | None,
               candidates: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """What the side panel reads: every node's fields (non-finite numbers as strings, so the
    JSON stays strict; a candidate's leaf with its path score), which fields mean something for
    this strategy, the chosen path and the live-mode settings."""
    problem = tree_json["problem"]
    path_scores = {int(c["node_id"]): c["score"] for c in candidates}
    nodes = [
        {
            "id": n["id"], "parent": n["parent"], "depth": n["depth"], "children": list(n["children"]),
            "text": "" if n["step"] is None else str(n["step"]["text"]),
            "finish": None if n["step"] is None else _finite(n["step"].get("finish")),
            "score": _finite(n["score"]), "visits": n["visits"], "value": _finite(n["value"]),
            "prior": _finite(n["prior"]), "path_score": _finite(path_scores.get(n["id"])),
        }
        for n in tree_json["nodes"]
    ]
    return {
        "problem": {"id": str(problem["id"]), "question": str(problem.get("question", "")),
                    "answer": _finite(problem.get("answer"))},
        "chosen_node": chosen_node,
        "chosen_path": chosen_path(tree_json, chosen_node),
        "refresh_s": refresh_s,
        "counts_visits": counts_visits(tree_json),
        "ranks_by_value": ranks_by_value(tree_json),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "nodes": nodes,
    }


def _finite(value: Any) -> Any:
    """value with each non-finite float in it as a string ("nan"), so the page's JSON stays strict:
    a hand-edited file's NaN score, answer or finish (in a list or object too) is shown, not a
    ValueError after the PNG was written."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' outside escapes, so '</script>' or
    '<!--' in a step text cannot end the block; U+2028/9 escaped for old JS parsers."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _svg(tree_json: dict[str, Any], chosen_node: int | None) -> str:
    """The tree as inline SVG: edges (chosen ones last, on top), then nodes, then labels."""
    pos = tree_layout(tree_json)
    n = len(tree_json["nodes"])
    leaves = max(x for x, _ in pos.values()) + 1
    labelled = n <= LABEL_MAX_NODES
    dx, dy = min(max(900.0 / leaves, LABELLED_DX_MIN if labelled else 16.0), 80.0), 90.0 if labelled else 70.0
    radius = 10.0 if n <= LABEL_MAX_NODES else (6.0 if n <= 150 else 4.5)
    root_label = 8.0 * len(f"problem {tree_json['problem']['id']}")  # its 13 px bold text, about 8 px a character
    width = max(PAD * 2 + (leaves - 1) * dx, root_label + PAD * 2)  # a narrow tree (greedy) keeps its title
    left = (width - (leaves - 1) * dx) / 2  # the tree centred in that width
    xy = {i: (left + x * dx, PAD + 20 + d * dy) for i, (x, d) in pos.items()}
    height = PAD * 2 + 40 + max(d for _, d in pos.values()) * dy
    path = chosen_path(tree_json, chosen_node)
    parts = [f'<svg id="tree" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
             f'data-width="{width:.0f}" data-height="{height:.0f}">']
    parts += _svg_edges(tree_json, xy, set(path[1:]))
    parts += _svg_nodes(tree_json, xy, set(path), radius)
    parts += _svg_labels(tree_json, pos, xy, radius, with_steps=labelled)
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_edges(tree_json: dict[str, Any], xy: dict[int, tuple[float, float]], on_path: set[int]) -> list[str]:
    widths = edge_widths(tree_json, thin=0.6, thick=6.0)
    lines = []
    for child in sorted(widths, key=lambda c: c in on_path):
        (x1, y1), (x2, y2) = xy[tree_json["nodes"][child]["parent"]], xy[child]
        cls, width = ("edge chosen", max(widths[child], 2.5) + 1.5) if child in on_path else ("edge", widths[child])
        lines.append(f'<line class="{cls}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'stroke-width="{width:.2f}"/>')
    return lines


def _svg_nodes(tree_json: dict[str, Any], xy: dict[int, tuple[float, float]], on_path: set[int],
               radius: float) -> list[str]:
    """Circle per open step, square per final step (finish eos), X per cut one (finish length), as
    the PNG draws them; class "chosen" on the chosen path; the tooltip is the escaped step text."""
    colors = score_colors(tree_json)
    shapes = []
    for node in tree_json["nodes"]:
        i, (x, y) = node["id"], xy[node["id"]]
        cls = "node chosen" if i in on_path else "node"
        attrs = f'class="{cls}" data-id="{i}" fill="{colors[i]}"'
        tip = f"<title>{html.escape(_tooltip(node))}</title>"
        step = node["step"]
        finish = None if step is None else step.get("finish")
        if finish == "eos":
            shapes.append(f'<rect {attrs} x="{x - radius:.1f}" y="{y - radius:.1f}" '
                          f'width="{2 * radius:.1f}" height="{2 * radius:.1f}">{tip}</rect>')
        elif finish == "length":
            shapes.append(f'<polygon {attrs} points="{cross_points(x, y, radius * 1.25)}">{tip}</polygon>')
        else:
            shapes.append(f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}">{tip}</circle>')
    return shapes


def cross_points(x: float, y: float, r: float) -> str:
    """The SVG points of an X of half-size r centred on (x, y), its arms r / 3 thick."""
    t = r / 3 / math.sqrt(2)  # half the arm's thickness, along each axis
    outline = [(0, t), (r - t, r), (r, r - t), (t, 0), (r, t - r), (r - t, -r),
               (0, -t), (t - r, -r), (-r, t - r), (-t, 0), (-r, r - t), (t - r, r)]
    return " ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in outline)


def _tooltip(node: dict[str, Any]) -> str:
    if node["step"] is None:
        return "root (the problem)"
    score = node["score"]
    return f"#{node['id']}  score {score if score is None else format(score, '.3g')}\n{node['step']['text']}"


def _svg_labels(tree_json: dict[str, Any], pos: dict[int, tuple[float, int]], xy: dict[int, tuple[float, float]],
                radius: float, with_steps: bool) -> list[str]:
    """The problem id over the root; with_steps: each step's short label under its node, in the
    PNG's two alternating rows (`experiments.tree_plot.label_rows`)."""
    root_x, root_y = xy[0]
    labels = [f'<text class="root-label" x="{root_x:.1f}" y="{root_y - radius - 8:.1f}">'
              f'problem {html.escape(str(tree_json["problem"]["id"]))}</text>']
    if with_steps:
        rows = label_rows(tree_json, pos)
        for node in tree_json["nodes"][1:]:
            x, y = xy[node["id"]]
            labels.append(f'<text class="step-label" x="{x:.1f}" y="{y + radius + 12 + 12 * rows[node["id"]]:.1f}">'
                          f'{html.escape(short_label(node))}</text>')
    return labels


def _legend_html(tree_json: dict[str, Any], visits: bool = True) -> str:
    """The score colour bar as a CSS gradient sampled from the same colormap as the PNG; edge
    widths are explained only where they show visits (MCTS)."""
    lo, hi = score_range(tree_json)
    cmap = matplotlib.colormaps[SCORE_CMAP]
    stops = ", ".join(to_hex(cmap(k / (GRADIENT_STOPS - 1))) for k in range(GRADIENT_STOPS))
    return (f'<span>score {lo:.3g}</span><span class="bar" style="background: linear-gradient(to right, {stops})">'
            f'</span><span>{hi:.3g}</span><span class="swatch" style="background:{NO_SCORE_COLOR}"></span>'
            f'<span>none</span><span class="swatch line" style="background:{CHOSEN_COLOR}"></span>'
            f'<span>chosen path</span><span>{"· edge width ∝ visits " if visits else ""}· ○ step □ final ✕ cut (length)</span>')


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { margin: 0; font: 13px/1.4 system-ui, sans-serif; color: #222; display: flex; height: 100vh; }
  #main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  header { padding: 6px 10px; border-bottom: 1px solid #ddd; display: flex; gap: 8px; align-items: center;
           flex-wrap: wrap; }
  header h1 { font-size: 14px; margin: 0 8px 0 0; }
  #legend { display: flex; gap: 4px; align-items: center; }
  #legend .bar { width: 120px; height: 10px; display: inline-block; }
  #legend .swatch { width: 10px; height: 10px; display: inline-block; margin-left: 8px; }
  #legend .swatch.line { height: 3px; width: 16px; }
  #live { color: #555; }
  #canvas { flex: 1; overflow: auto; background: #fafafa; }
  svg { display: block; }
  .edge { stroke: #8a8a8a; }
  .edge.chosen { stroke: __CHOSEN__; }
  .node { stroke: #333; stroke-width: 1; cursor: pointer; }
  .node.chosen { stroke: __CHOSEN__; stroke-width: 3; }
  .node.selected { stroke: #000; stroke-width: 4; }
  .root-label { font-weight: bold; text-anchor: middle; font-size: 13px; }
  .step-label { text-anchor: middle; font-size: 10px; fill: #444; pointer-events: none; }
  aside { width: 380px; border-left: 1px solid #ddd; padding: 10px; overflow: auto; }
  aside h2 { font-size: 14px; margin: 4px 0; }
  aside table { border-collapse: collapse; }
  aside td { padding: 1px 8px 1px 0; vertical-align: top; }
  aside td:first-child { color: #666; }
  pre { white-space: pre-wrap; word-break: break-word; background: #f3f3f3; padding: 6px; margin: 4px 0 10px; }
  button { font: inherit; }
</style>
</head>
<body>
<div id="main">
  <header>
    <h1>__TITLE__</h1>
    <span id="legend">__LEGEND__</span>
    <span>zoom <button id="zoom-out">−</button><button id="zoom-in">+</button>
      <button id="zoom-fit">fit</button></span>
    <span id="live"></span>
  </header>
  <div id="canvas">
__SVG__
  </div>
</div>
<aside>
  <h2 id="node-title">click a node</h2>
  <table id="fields"></table>
  <div>step text</div><pre id="step-text"></pre>
  <div>path so far</div><pre id="path-text"></pre>
  <details><summary>problem</summary><pre id="question"></pre></details>
</aside>
<script type="application/json" id="tree-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("tree-data").textContent);
const NODES = DATA.nodes;
const ON_PATH = new Set(DATA.chosen_path);
const svg = document.getElementById("tree");
let zoom = 1, timer = null;

function hashParams() {
  return new URLSearchParams(location.hash.slice(1));
}
function setHash(params) {
  history.replaceState(null, "", "#" + params.toString());
}
function fmt(v) {
  if (v === null || v === undefined) return "—";
  return typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v);
}
function pathIds(id) {
  const ids = [];
  for (let i = id; i !== null; i = NODES[i].parent) ids.push(i);
  return ids.reverse();
}
function show(id, scroll) {
  const node = NODES[id];
  if (!node) return;
  document.querySelectorAll(".node.selected").forEach(el => el.classList.remove("selected"));
  const shape = document.querySelector('.node[data-id="' + id + '"]');
  shape.classList.add("selected");
  if (scroll) shape.scrollIntoView({block: "center", inline: "center"});
  document.getElementById("node-title").textContent =
    (id === 0 ? "root" : "node " + id) + (ON_PATH.has(id) ? " (chosen path)" : "");
  const rows = [["step score", node.score]];
  if (node.path_score !== null) rows.push([DATA.counts_visits ? "path score" : "path score (ranks the candidate)", node.path_score]);
  if (DATA.counts_visits) rows.push(["visits", node.visits], ["value", node.value], ["prior", node.prior]);
  else if (DATA.ranks_by_value) rows.push(["value (what ranked or weighted it)", node.value]);
  rows.push(["finish", node.finish], ["depth", node.depth], ["parent", node.parent],
            ["children", node.children.length]);
  const table = document.getElementById("fields");
  table.replaceChildren();
  for (const [name, value] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = fmt(value);
  }
  document.getElementById("step-text").textContent = id === 0 ? "(root: the problem)" : node.text;
  document.getElementById("path-text").textContent = pathIds(id).map(i => NODES[i].text).join("");
  const params = hashParams();
  params.set("node", id);
  setHash(params);
}
function setZoom(z) {
  // floor 0.005: "fit" brings a tree of thousands of leaves (~16 px each) onto the canvas
  zoom = Math.min(Math.max(z, 0.005), 8);
  svg.setAttribute("width", svg.dataset.width * zoom);
  svg.setAttribute("height", svg.dataset.height * zoom);
  saveView();
}
function saveView() {
  // zoom and scroll live in the hash, as node and pause do: a live page's reload keeps the view
  const box = document.getElementById("canvas");
  const p = hashParams();
  p.set("zoom", String(Number(zoom.toFixed(4))));
  p.set("x", String(Math.round(box.scrollLeft)));
  p.set("y", String(Math.round(box.scrollTop)));
  setHash(p);
}
function restoreView(params) {
  // true when the hash held a scroll position (then the selected node is not scrolled to)
  const z = Number(params.get("zoom"));
  if (params.has("zoom") && z > 0) setZoom(z);
  if (!params.has("x") || !params.has("y")) return false;
  const box = document.getElementById("canvas");
  box.scrollLeft = Number(params.get("x")) || 0;
  box.scrollTop = Number(params.get("y")) || 0;
  return true;
}
function fit() {
  const box = document.getElementById("canvas");
  setZoom(Math.min(box.clientWidth / svg.dataset.width, box.clientHeight / svg.dataset.height, 1));
}
function startLive() {
  // Live mode: reload the whole page; whoever rewrites this file (plot --watch) brings new data.
  const live = document.getElementById("live");
  const params = hashParams();
  const paused = params.get("pause") === "1";
  live.textContent = "live · written " + DATA.written_at + " · reloads every " + DATA.refresh_s + " s ";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = paused;
  box.onchange = () => {
    const p = hashParams();
    if (box.checked) { p.set("pause", "1"); clearTimeout(timer); } else { p.delete("pause"); schedule(); }
    setHash(p);
  };
  const label = document.createElement("label");
  label.append(box, " pause");
  live.append(label);
  if (!paused) schedule();
}
function schedule() {
  timer = setTimeout(() => location.reload(), DATA.refresh_s * 1000);
}

svg.addEventListener("click", e => {
  const el = e.target.closest("[data-id]");
  if (el) show(Number(el.dataset.id));
});
document.getElementById("zoom-in").onclick = () => setZoom(zoom * 1.25);
document.getElementById("zoom-out").onclick = () => setZoom(zoom / 1.25);
document.getElementById("zoom-fit").onclick = fit;
document.getElementById("question").textContent =
  DATA.problem.question + (DATA.problem.answer === null ? "" : "\\n\\nreference answer: " + DATA.problem.answer);
let scrollTimer = null;
document.getElementById("canvas").addEventListener("scroll", () => {
  clearTimeout(scrollTimer);
  scrollTimer = setTimeout(saveView, 150);
});
const loaded = hashParams();
const start = loaded.has("node") ? Number(loaded.get("node")) : NaN;
const restored = restoreView(loaded);
show(Number.isInteger(start) && NODES[start] ? start : (DATA.chosen_node ?? 0), !restored);
if (DATA.refresh_s) startLive();
</script>
</body>
</html>
""".replace("__CHOSEN__", CHOSEN_COLOR)
