"""`python -m experiments.plot tree | aha` on awkward input: folders and JSONL files given as a
result, nodes that cannot be drawn, unknown finishes, long and non-ASCII step texts, many leaves,
--out paths that cannot be images, non-UTF-8 metrics, a split at the last step; and the CLI's
start-up (no torch).

    .venv/bin/pytest tests/test_plot_cli.py
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from experiments import plot as plot_module
from experiments import plot_output
from experiments.plot import main
from experiments.plot_aha import main as plot_aha_main
from experiments.plot_aha import split_step
from experiments.tree_html import write_tree_html
from experiments.tree_plot import draw_tree_png, short_label
from step_tree_fakes import step_named
from test_scaling import write_run
from treesearch.records import Problem, Step
from treesearch.tree import Tree

ROOT = Path(__file__).resolve().parents[1]


def write_scaling_run(folder: Path) -> None:
    """One run folder of a sweep (best_of_n at N=2, 5 of its 10 problems right)."""
    write_run(folder, "best_of_n", 2, 0, [i < 5 for i in range(10)], 20)


def text_step(text: str, finish: str = "separator") -> Step:
    return Step(text=text, token_ids=(1,), token_logprobs=(-0.1,), finish=finish, tokens_forwarded=2)


def result_json(tree: Tree, chosen_node: int | None = None) -> dict[str, Any]:
    """A result JSON around a hand-built tree (what `experiments.result_json.load_result` checks)."""
    return {"problem": tree.to_json()["problem"], "strategy": "beam_search", "config": {}, "chosen": None,
            "chosen_node": chosen_node, "candidates": [], "tree": tree.to_json(), "compute": {}}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def wide_tree(leaves: int = 16) -> Tree:
    """root -> 4 steps -> leaves/4 final steps each, with step texts of 12 and 19 characters."""
    tree = Tree(Problem(id="wide", question="q", answer="3"))
    for i in range(4):
        mid = tree.add(0, text_step(f"{i} + 12 = {i + 12}.\n\n"), score=0.8)
        for _ in range(leaves // 4):
            tree.add(mid, text_step("</think>Answer: 1234567890", "eos"), score=0.9)
    return tree


@pytest.fixture()
def saved_figures(monkeypatch) -> list[Figure]:
    """Every matplotlib figure saved during the test, drawn as saved (pyplot's too)."""
    figures: list[Figure] = []
    original = Figure.savefig

    def capture(self: Figure, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figures


def test_the_plot_command_starts_without_torch():
    # experiments.aha_metrics re-exported path_scores from scorers.head_training at import time,
    # which loads torch and transformers: ~5 s before every tree or aha plot
    code = "import sys, experiments.plot; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from experiments.aha_metrics import PATH_SCORE_EPS, path_scores  # still importable from here

    assert callable(path_scores) and PATH_SCORE_EPS == 1e-10


def test_a_folder_given_as_result_is_named_also_in_watch_mode(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "search_run"
    run_dir.mkdir()
    assert main(["tree", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}: a folder, not a result JSON file;") and err.count("\n") == 1

    def interrupt(_: float) -> None:  # --watch on a folder used to wait for a file forever
        raise KeyboardInterrupt

    monkeypatch.setattr(plot_module.time, "sleep", interrupt)
    assert main(["tree", str(run_dir), "--watch", "1"]) == 2
    assert "a folder, not a result JSON file" in capsys.readouterr().err


def test_a_records_jsonl_given_as_result_says_it_holds_no_trees(tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    records.write_text('{"problem_id": "a"}\n{"problem_id": "b"}\n')
    assert main(["tree", str(records)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {records}: not JSON") and "records.jsonl holds no trees" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("key, value, must", [
    ("depth", None, "an integer"), ("visits", None, "a finite number"),
    ("score", "high", "a number or null"), ("score", True, "a number or null"),
])
def test_a_node_field_that_cannot_be_drawn_is_a_one_line_error(tmp_path, capsys, key, value, must):
    data = result_json(wide_tree(4))
    data["tree"]["nodes"][2][key] = value
    path = write_json(tmp_path / "bad.json", data)
    assert main(["tree", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {path}: cannot draw the tree: tree.nodes[2].{key}={value!r} must be {must}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing drawn


def test_a_node_with_an_unknown_finish_is_still_drawn(tmp_path, saved_figures):
    tree = Tree(Problem(id="p", question="q", answer=None))
    first = tree.add(0, step_named("a"), score=0.5)
    tree.add(first, step_named("stop here"), score=0.5)
    tree.add(first, step_named("b$"), score=0.5)
    tree_json = tree.to_json()
    tree_json["nodes"][2]["step"]["finish"] = "stop"  # a file from another writer: not separator / eos / length
    draw_tree_png(tree_json, None, tmp_path / "t.png")
    (fig,) = saved_figures
    drawn = sum(len(c.get_offsets()) for c in fig.axes[0].collections if isinstance(c, PathCollection))
    assert drawn == 4  # root, a, the unknown finish, b$ (the unknown one used to be skipped)


def test_step_labels_of_a_wide_tree_do_not_overlap(tmp_path, saved_figures):
    draw_tree_png(wide_tree(20).to_json(), None, tmp_path / "t.png")
    (fig,) = saved_figures
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if not t.get_text().startswith("problem")]
    assert len(labels) == 24 and "Answer: 12345…" in [t.get_text() for t in labels]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    overlapping = [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
    assert overlapping == []


def test_step_labels_of_a_wide_tree_have_room_in_the_html(tmp_path):
    page = write_tree_html(wide_tree(32).to_json(), None, tmp_path / "t.html").read_text(encoding="utf-8")
    labels = [(float(x), float(y)) for x, y in re.findall(r'<text class="step-label" x="([\d.]+)" y="([\d.]+)"', page)]
    assert len(labels) == 36
    for row_y in {y for _, y in labels}:
        xs = sorted(x for x, y in labels if y == row_y)
        assert min(b - a for a, b in zip(xs, xs[1:])) >= 85  # a 14-character label at 10 px is ~80 px wide


def test_the_html_marks_cut_steps_as_the_png_does(tmp_path):
    # a step cut by the length limit was drawn as a final square, the PNG's X ("cut (length)") aside
    tree = Tree(Problem(id="cut", question="q", answer="3"))
    mid = tree.add(0, text_step("1 + 2 = 3.\n\n"), score=0.8)
    tree.add(mid, text_step("</think>Answer: 3", "eos"), score=0.9)
    tree.add(mid, text_step("1 + 2 + 3 + 4 +", "length"), score=0.2)
    page = write_tree_html(tree.to_json(), None, tmp_path / "t.html").read_text(encoding="utf-8")
    assert len(re.findall(r'<circle class="node[^"]*" data-id="[01]"', page)) == 2
    assert re.search(r'<rect class="node" data-id="2"', page) and re.search(r'<polygon class="node" data-id="3"', page)
    assert "✕ cut (length)" in page


def test_a_one_leaf_tree_leaves_room_for_its_root_label(tmp_path):
    # greedy's chain was 80 px wide in the HTML, its "problem arith-..." label cut off
    tree = Tree(Problem(id="arith-4c9d84033159c642", question="q", answer="3"))
    tree.add(tree.add(0, text_step("1 + 2 = 3.\n\n"), score=0.8), text_step("</think>Answer: 3", "eos"), score=0.9)
    page = write_tree_html(tree.to_json(), None, tmp_path / "t.html").read_text(encoding="utf-8")
    width = float(re.search(r'<svg id="tree" viewBox="0 0 ([\d.]+) ', page)[1])
    x = float(re.search(r'<text class="root-label" x="([\d.]+)"', page)[1])
    half = 8.0 * len("problem arith-4c9d84033159c642") / 2  # the label's half width at ~8 px a character
    assert x - half >= 0 and x + half <= width


def test_the_root_label_of_a_deep_tree_stays_below_the_title(tmp_path, saved_figures):
    tree = Tree(Problem(id="deep", question="q", answer=None))
    node = 0
    for depth in range(60):  # e.g. MCTS with max_depth=60: a depth unit is a few points tall
        node = tree.add(node, text_step(f"step {depth}.\n\n"), score=0.5)
    draw_tree_png(tree.to_json(), node, tmp_path / "t.png", title="mcts · problem deep")
    (fig,) = saved_figures
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    (root_label,) = [t for t in ax.texts if t.get_text() == "problem deep"]
    assert not ax.title.get_window_extent(renderer).overlaps(root_label.get_window_extent(renderer))


def test_labels_drop_the_think_markup():
    final = {"step": {"text": "</think>Answer: 42"}}
    assert short_label(final) == "Answer: 42"  # was "</think>Answe…": every final step alike
    assert short_label({"step": {"text": "<think>3 + 4 = 7.\n\n"}}) == "3 + 4 = 7."


def test_text_the_font_cannot_draw_gives_no_warning_per_character(tmp_path):
    tree = Tree(Problem(id="ceval", question="数学", answer=None))
    tree.add(0, text_step("因为 3 + 4 = 7。"), score=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw_tree_png(tree.to_json(), None, tmp_path / "t.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]


def metrics_rows(path: Path, gaps: list[float]) -> Path:
    """A metrics.jsonl as experiments.train writes it (the keys the aha plot reads)."""
    rows = [{"step": step, "fc/correct_prob": 0.5 + gap / 2, "fc/false_prob": 0.5 - gap / 2, "fc/diff_prob": gap}
            for step, gap in enumerate(gaps)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("out, message", [
    ("a_folder", "--out is an existing folder; give a file path such as {out}/aha.png"),
    ("a_file/aha.png", "--out needs a folder here, but it is an existing file"),
    ("aha.txt", "--out must end in an image suffix matplotlib writes"),
])
def test_aha_out_that_cannot_be_an_image_is_a_one_line_error(tmp_path, capsys, out, message):
    metrics = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2])
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / out
    assert main(["aha", str(metrics), "--out", str(target)]) == 2
    out_text, err = capsys.readouterr()
    named = tmp_path / "a_file" if out.startswith("a_file") else target
    assert out_text == "" and err.startswith(f"error: {named}: ") and err.count("\n") == 1
    assert message.format(out=target) in err
    assert not list(tmp_path.rglob("*.png"))


def test_aha_out_without_suffix_is_written_where_it_says(tmp_path, capsys):
    metrics = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2])
    out = tmp_path / "aha_plot"
    assert main(["aha", str(metrics), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # was written to aha_plot.png instead
    assert not (tmp_path / "aha_plot.png").exists()


def test_aha_metrics_that_are_not_utf8_are_a_one_line_error(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'\xff\xfe{"step": 0}\n')
    assert main(["aha", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {metrics}: not UTF-8 text") and err.count("\n") == 1


def test_aha_plot_of_a_run_split_at_its_last_step(tmp_path, monkeypatch, saved_figures):
    """Given as a bare metrics.jsonl inside the run folder: the title names the run; the split at
    the last step is labelled inside the axes (it ran off the right edge and squeezed the plot);
    integer step ticks."""
    run = tmp_path / "joint_run"
    run.mkdir()
    metrics_rows(run / "metrics.jsonl", [0.0, 0.05, 0.3])
    monkeypatch.chdir(run)
    assert main(["aha", "metrics.jsonl"]) == 0
    (fig,) = saved_figures
    top, bottom = fig.axes
    assert top.get_title().endswith(": joint_run")  # was ": " (the parent of a bare file name)
    renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot's own canvas went with plt.close
    (label,) = [t for t in bottom.texts if "aha: step 2" in t.get_text()]
    assert label.get_window_extent(renderer).x1 <= bottom.get_window_extent(renderer).x1
    assert all(float(tick).is_integer() for tick in bottom.get_xticks())


def test_aha_run_with_nothing_for_the_lower_panel_draws_no_empty_legend(tmp_path, saved_figures):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "heldout_fc/correct_prob": 0.6, "heldout_fc/false_prob": 0.5}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["aha", str(metrics)]) == 0
    assert not [w for w in caught if "legend" in str(w.message)]
    (fig,) = saved_figures
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None


def test_importing_the_plots_leaves_the_process_backend_alone():
    """A notebook that imports experiments.plot (the demo does) keeps its own matplotlib backend:
    every plot draws on its own Agg canvas."""
    code = ("import matplotlib; matplotlib.use('svg'); import experiments.plot, experiments.plot_scaling, "
            "experiments.plot_aha; print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "svg"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_live_page_keeps_zoom_and_scroll_across_reloads_and_fits_a_wide_tree(tmp_path):
    # the page's own script under a stub DOM (tests/js/tree_page_view.js): a reload reset the zoom
    # to 1 and scrolled back to the selected node, and "fit" stopped at zoom 0.1 (a tree of
    # 3000 leaves stayed ~2400 px wide on a 1200 px canvas)
    page = write_tree_html(wide_tree(800).to_json(), None, tmp_path / "live.html", refresh_s=1.0)
    script = Path(__file__).parent / "js" / "tree_page_view.js"
    done = subprocess.run(["node", str(script), str(page)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["width"] * view["fit_zoom"] <= 1200  # fits the canvas's width
    assert view["first_scrolled_into_view"] and not view["reload_scrolled_into_view"]
    assert view["reload_zoom"] == pytest.approx(view["fit_zoom"], rel=1e-3)
    assert view["reload_scroll"] == [40, 25]


@pytest.mark.parametrize("period", ["0", "-1", "nan", "inf", "1e308", "1e-9", "abc"])
def test_watch_period_out_of_range_is_a_usage_error(tmp_path, capsys, period):
    # inf failed in the page's JSON (allow_nan=False), 1e308 in time.sleep, each in a traceback; 1e-9
    # reloaded the page without pause; "abc" named argparse's "invalid _positive_float value"
    with pytest.raises(SystemExit) as exit_info:
        main(["tree", str(tmp_path / "r.json"), "--watch", period])
    assert exit_info.value.code == 2
    assert f"argument --watch: {period!r} must be a number of seconds >= 0.1 and <= 86400" in capsys.readouterr().err


def test_a_step_text_with_a_lone_surrogate_is_drawn_and_written_as_its_escape(tmp_path, saved_figures):
    # JSON's "\ud83d" (an emoji cut in two by another writer) loads, then writing the HTML was a UnicodeEncodeError
    tree = wide_tree(4)
    data = result_json(tree)
    data["tree"]["nodes"][1]["step"]["text"] = "abc\ud83d"
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(data), encoding="utf-8")  # ensure_ascii: the escape, as a JS writer leaves it
    assert main(["tree", str(path)]) == 0
    assert page_data((tmp_path / "cut.html").read_text(encoding="utf-8"))["nodes"][1]["text"] == "abc\ud83d"


@pytest.mark.parametrize("command", ["aha", "scaling"])
def test_pgf_without_latex_is_named_before_drawing(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(plot_output.shutil, "which", lambda name: None)
    source = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2]) if command == "aha" else tmp_path
    if command == "scaling":
        write_scaling_run(tmp_path / "run")
    target = tmp_path / "plot.pgf"
    assert main([command, str(source), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target}: matplotlib writes .pgf with ") and "which is not installed" in err
    assert err.count("\n") == 1 and not target.exists()


@pytest.mark.parametrize("command", ["aha", "scaling"])
def test_an_image_matplotlib_cannot_write_is_a_one_line_error_without_a_partial_file(tmp_path, capsys, monkeypatch, command):
    def fail(self, out, **kwargs):
        Path(out).write_bytes(b"%PDF-1.4 half")  # written partly, then the backend fails
        raise RuntimeError("the backend gave up")

    monkeypatch.setattr(Figure, "savefig", fail)
    source = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2]) if command == "aha" else tmp_path
    if command == "scaling":
        write_scaling_run(tmp_path / "run")
    target = tmp_path / "plot.pdf"
    assert main([command, str(source), "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: {target}: the image could not be written: the backend gave up\n"
    assert not target.exists()


def page_data(page: str) -> dict:
    """The side panel's data of a written page."""
    raw = re.search(r'<script type="application/json" id="tree-data">(.*?)</script>', page, re.S)[1]
    return json.loads(raw)


def test_the_panel_shows_path_scores_and_leaves_out_visits_a_strategy_does_not_count(tmp_path):
    # Best-of-N's leaves showed "visits 0, value 0" and never the path score that picked the answer
    tree = wide_tree(4)  # no visits: not MCTS
    leaf = tree.to_json()["nodes"][-1]["id"]
    candidates = [{"node_id": leaf, "score": 0.886, "step_scores": [0.8, 0.9]}]
    page = write_tree_html(tree.to_json(), leaf, tmp_path / "t.html", candidates=candidates).read_text(encoding="utf-8")
    data = page_data(page)
    assert data["counts_visits"] is False and "edge width ∝ visits" not in page
    assert data["nodes"][leaf]["path_score"] == 0.886 and data["nodes"][1]["path_score"] is None
    assert 'if (DATA.counts_visits) rows.push(["visits"' in page
    mcts = wide_tree(4)
    mcts.nodes[1].visits = 3  # a strategy that counts visits keeps them
    page = write_tree_html(mcts.to_json(), None, tmp_path / "m.html").read_text(encoding="utf-8")
    assert page_data(page)["counts_visits"] is True and "edge width ∝ visits" in page
    # beam search ranked its nodes by their value (the path score): hidden with visits before
    assert data["ranks_by_value"] is False  # Best-of-N leaves values 0
    beam = wide_tree(4)
    beam.nodes[1].value = 0.7
    data = page_data(write_tree_html(beam.to_json(), None, tmp_path / "b.html").read_text(encoding="utf-8"))
    assert (data["counts_visits"], data["ranks_by_value"], data["nodes"][1]["value"]) == (False, True, 0.7)
    assert 'else if (DATA.ranks_by_value) rows.push(["value (what ranked or weighted it)", node.value])' in page


def test_outputs_that_cannot_be_written_are_one_error_line(tmp_path, capsys, monkeypatch):
    # a read-only or forbidden folder (chattr +i here; a user's shared results folder) ended each
    # subcommand in a PermissionError traceback from mkdir or the atomic write's temporary file
    import pathlib

    metrics = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2])

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    assert main(["aha", str(metrics), "--out", str(tmp_path / "ro" / "a.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: [Errno 13] Permission denied: '{tmp_path / 'ro'}'\n"


def test_a_dollar_in_a_run_name_is_text_not_maths(tmp_path, capsys):
    # matplotlib read "run_$5_to_$10" as mathtext: a ParseSyntaxException traceback
    run = tmp_path / "run_$5_to_$10"
    run.mkdir()
    metrics_rows(run / "metrics.jsonl", [0.0, 0.2])
    assert main(["aha", str(run), "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_aha_of_a_run_whose_held_out_gap_is_never_a_number_marks_none(tmp_path, saved_figures):
    # every held-out rollout wrong (a small held-out set): the gap is null at each evaluation, and
    # the plot marked an aha from the train batch's self-confirming gap instead
    rows = [{"step": s, "fc/diff_prob": 0.05 * s, "heldout_fc/diff_prob": None, "heldout_fc/correct_prob": None,
             "heldout_fc/false_prob": 0.4} for s in range(5)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["aha", str(metrics)]) == 0
    (fig,) = saved_figures
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert not any("aha: step" in t for t in texts)
    assert texts == ["held-out gap undefined at every evaluation (no correct or no wrong held-out rollout): no aha marked"]
    assert split_step(rows) == (None, "heldout_fc/diff_prob")


def test_aha_lines_break_where_a_value_is_null_and_join_evaluations_between_absent_rows(tmp_path, saved_figures):
    # steps 3-4 had no correct rollout (fc/correct_prob null): the line was drawn straight from 2 to 5;
    # held-out values absent at every fifth step: no break, the line joins its neighbours
    rows = [{"step": s, "fc/correct_prob": None if s in (3, 4) else 0.5 + 0.01 * s, "fc/false_prob": 0.4,
             **({"heldout_fc/correct_prob": 0.6} if s % 5 else {})} for s in range(40)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["aha", str(metrics)]) == 0
    (fig,) = saved_figures
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    correct = next(line for label, line in lines.items() if label.startswith("correct (train"))
    x, y = correct.get_xdata(), correct.get_ydata()
    assert list(x) == list(range(40)) and [s for s, v in zip(x, y) if v != v] == [3, 4]
    assert correct.get_marker() == "o"  # 40 points, but a point between breaks must stay visible
    held = next(line for label, line in lines.items() if label.startswith("correct (held"))
    assert list(held.get_xdata()) == [s for s in range(40) if s % 5] and held.get_marker() in ("None", None, "")


def test_aha_out_whose_folder_cannot_be_made_is_a_one_line_error(tmp_path, capsys):
    # a folder name longer than the file system takes (as a read-only or forbidden folder): a traceback
    metrics = metrics_rows(tmp_path / "metrics.jsonl", [0.0, 0.2])
    assert plot_aha_main([str(metrics), "--out", str(tmp_path / ("x" * 300) / "aha.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "File name too long" in err and err.count("\n") == 1


def test_aha_of_two_runs_rows_in_one_file_is_refused(tmp_path, capsys):
    first = metrics_rows(tmp_path / "a.jsonl", [0.0, 0.0, 0.2, 0.3]).read_text()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(first + metrics_rows(tmp_path / "b.jsonl", [0.2, 0.3]).read_text())
    assert main(["aha", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {metrics}: line 5 is step 0 after step 3: a run's steps increase "
                   "(two runs' rows in one file?)\n")


def test_aha_of_a_run_of_one_step_has_whole_step_ticks(tmp_path, saved_figures):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "fc/correct_prob": 0.6, "fc/false_prob": 0.4, "fc/diff_prob": 0.2}\n')
    assert main(["aha", str(metrics)]) == 0
    (fig,) = saved_figures
    ticks = [t for t in fig.axes[1].get_xticks() if fig.axes[1].get_xlim()[0] <= t <= fig.axes[1].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # were 0.945 .. 1.05
