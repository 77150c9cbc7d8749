"""Result JSON, tree PNG / HTML and the `python -m experiments.plot tree` CLI, on real trees that
MCTS and beam search build on the scripted step trees (tests/step_tree_fakes.py).

    .venv/bin/pytest tests/test_tree_plot.py
"""
from __future__ import annotations

import html
import json
import os
import re

import matplotlib.image
import pytest

from experiments import plot as plot_module
from experiments.plot import main, render_if_changed
from experiments.result_json import ResultFileError, load_result, result_to_json, save_result
from experiments.tree_html import write_tree_html
from experiments.tree_plot import chosen_path, tree_layout
from step_tree_fakes import TRAP_CHILDREN, TRAP_SCORES, ScriptedPolicy, ScriptedScorer, scripted_problem, trap_problem
from treesearch.registry import run_search

# A terminal step whose text tries to break out of the page: markup, a script end tag, an
# ampersand, quotes, a newline and a template placeholder.
HOSTILE = "<script>alert('x')</script> & \"q\" __DATA__\n<b>end$"


def hostile_problem():
    children = dict(TRAP_CHILDREN, **{"b": ["b1$", "b2$", HOSTILE]})
    return scripted_problem("hostile", children, dict(TRAP_SCORES, **{HOSTILE: 0.5}))


def mcts_result(problem):
    return run_search("mcts", [problem], ScriptedPolicy(), ScriptedScorer(), iterations=12, expand_width=3)[0]


def node_texts(tree_json):
    return [n["step"]["text"] for n in tree_json["nodes"] if n["step"] is not None]


@pytest.fixture()
def saved(tmp_path):
    result = mcts_result(hostile_problem())
    path = save_result(tmp_path / "hostile_mcts.json", result)
    return result, path


def test_result_json_round_trip(tmp_path):
    result = run_search("beam_search", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=4, beam_width=2)[0]
    path = save_result(tmp_path / "beam.json", result)
    record = load_result(path)
    assert [p.name for p in tmp_path.iterdir()] == ["beam.json"]  # the temp file was renamed away
    assert record.strategy == "beam_search" and record.config["beam_width"] == 2
    assert record.chosen == result.chosen
    assert record.chosen_node == result.candidates[result.chosen].node_id
    assert [c["node_id"] for c in record.candidates] == [c.node_id for c in result.candidates]
    assert record.candidates[0]["step_scores"] == list(result.candidates[0].step_scores)
    assert record.compute == result.compute.to_dict()
    assert record.to_tree().to_json() == result.tree.to_json()
    assert json.loads(path.read_text()) == result_to_json(result)


def test_layout_centres_parents_over_children():
    tree_json = mcts_result(trap_problem()).tree.to_json()
    pos = tree_layout(tree_json)
    # trap tree: root -> a (1), b (2); a -> a1$, a2$; b -> b1$, b2$: leaves at x = 0, 1, 2, 3 in
    # depth-first order, a at (0+1)/2, b at (2+3)/2, root at (0.5+2.5)/2.
    by_text = {n["step"]["text"]: n["id"] for n in tree_json["nodes"] if n["step"]}
    assert [pos[by_text[t]] for t in ("a1$", "a2$", "b1$", "b2$")] == [(0.0, 2), (1.0, 2), (2.0, 2), (3.0, 2)]
    assert pos[by_text["a/"]] == (0.5, 1) and pos[by_text["b/"]] == (2.5, 1) and pos[0] == (1.5, 0)


def test_cli_writes_png_and_html(saved, tmp_path, capsys):
    result, path = saved
    out_dir = tmp_path / "plots"
    assert main(["tree", str(path), "--out-dir", str(out_dir)]) == 0
    png, page = out_dir / "hostile_mcts.png", out_dir / "hostile_mcts.html"
    assert capsys.readouterr().out.split() == [str(png), str(page)]

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert 250 <= height <= 3000 and 500 <= width <= 5000

    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)  # self-contained: no CDN, no external links
    assert not re.search(r"<(script|link|img)[^>]*\s(src|href)=", text)
    tree_json = result.tree.to_json()
    for step_text in node_texts(tree_json):
        assert html.escape(step_text) in text
    path_ids = chosen_path(tree_json, result.candidates[result.chosen].node_id)
    assert len(path_ids) >= 3 and path_ids[0] == 0
    marked = re.findall(r'class="node chosen" data-id="(\d+)"', text)
    assert sorted(map(int, marked)) == sorted(path_ids)
    assert len(re.findall(r'class="edge chosen"', text)) == len(path_ids) - 1
    data = json.loads(re.search(r'<script type="application/json" id="tree-data">(.*?)</script>', text, re.S).group(1))
    assert data["chosen_path"] == path_ids and [n["text"] for n in data["nodes"][1:]] == node_texts(tree_json)


def test_step_text_with_script_is_escaped(saved, tmp_path):
    result, _ = saved
    page = write_tree_html(result.tree.to_json(), None, tmp_path / "t.html")
    text = page.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "</script> &" not in text and "<b>end" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;" in text  # SVG tooltip
    assert "\\u003cscript\\u003ealert" in text  # the JSON block
    assert text.count("<script") == 2  # the data block and the page's own script, nothing injected
    # the step's own "__DATA__", verbatim in its tooltip and in the JSON, was not substituted into
    assert text.count("__DATA__") == 2 and '"chosen_path": []' in text


def test_live_mode_reloads_and_rerenders_on_change(saved, tmp_path, capsys):
    result, path = saved
    page = write_tree_html(result.tree.to_json(), None, tmp_path / "live.html", refresh_s=2.5)
    text = page.read_text(encoding="utf-8")
    assert '"refresh_s": 2.5' in text and "location.reload()" in text
    assert '"refresh_s": null' in write_tree_html(result.tree.to_json(), None, tmp_path / "s.html").read_text()

    out_dir = tmp_path / "live"
    assert render_if_changed(tmp_path / "not_yet.json", out_dir, 1.0, None) is None
    mtime = render_if_changed(path, out_dir, 1.0, None)
    assert len(capsys.readouterr().out.split()) == 2  # rendered: PNG and HTML paths printed
    assert render_if_changed(path, out_dir, 1.0, mtime) == mtime
    assert capsys.readouterr().out == ""  # unchanged file: nothing re-rendered
    assert '"refresh_s": 1.0' in (out_dir / "hostile_mcts.html").read_text()


def set_mtime(path, ns: int) -> None:
    """A distinct modification time, so the watcher sees a change whatever the clock's resolution."""
    os.utime(path, ns=(ns, ns))


def test_watch_keeps_the_last_render_through_a_half_written_file(saved, tmp_path, capsys):
    result, path = saved
    good = path.read_text()
    out_dir = tmp_path / "live"
    mtime = render_if_changed(path, out_dir, 1.0, None)
    png = (out_dir / "hostile_mcts.png").read_bytes()
    capsys.readouterr()
    path.write_text(good[: len(good) // 2])  # a writer caught mid-write
    set_mtime(path, mtime + 1)
    with pytest.raises(ResultFileError, match="not JSON"):  # no good render yet: still an error
        render_if_changed(path, out_dir, 1.0, mtime)
    assert render_if_changed(path, out_dir, 1.0, mtime, keep_last=True) == mtime + 1
    out, err = capsys.readouterr()
    assert out == "" and (out_dir / "hostile_mcts.png").read_bytes() == png  # the last render stays
    assert err.count("\n") == 1 and err.startswith("note: ") and "not JSON" in err and "keeping the last render" in err
    assert render_if_changed(path, out_dir, 1.0, mtime + 1, keep_last=True) == mtime + 1  # unchanged: no retry
    assert capsys.readouterr() == ("", "")


def test_watch_cli_survives_a_half_written_file_after_a_good_render(saved, tmp_path, monkeypatch, capsys):
    """--watch: good file, then a half-written one, then a good one again: two renders and one
    note, no exit; a file that is bad on the first read is still the usual error."""
    _, path = saved
    good = path.read_text()
    base = path.stat().st_mtime_ns
    contents = [good[:100], good]  # what the writer leaves before each later poll

    def fake_sleep(_: float) -> None:
        if not contents:
            raise KeyboardInterrupt
        path.write_text(contents.pop(0))
        set_mtime(path, base + 1_000_000 * (2 - len(contents)))  # a new, distinct mtime

    monkeypatch.setattr(plot_module.time, "sleep", fake_sleep)
    assert main(["tree", str(path), "--out-dir", str(tmp_path / "live"), "--watch", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 4  # rendered twice (PNG + HTML each): before and after the bad file
    assert err.count("note: ") == 3 and err.count("not JSON") == 1 and err.count("finished") == 2  # a result: final

    junk = tmp_path / "junk.json"
    junk.write_text("{oops")
    assert main(["tree", str(junk), "--watch", "1"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_out_dir_that_is_a_file_is_a_one_line_error(saved, tmp_path, capsys):
    _, path = saved
    a_file = tmp_path / "plots"
    a_file.write_text("not a folder")
    for out_dir in (a_file, a_file / "sub"):
        assert main(["tree", str(path), "--out-dir", str(out_dir)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: {a_file}: --out-dir needs a folder here, but it is an existing file\n"
    assert main(["tree", str(path), "--out-dir", str(a_file), "--watch", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {a_file}: ")


def test_cli_errors_name_the_problem(saved, tmp_path, capsys):
    result, _ = saved
    missing = tmp_path / "nope.json"
    assert main(["tree", str(missing)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err

    not_json = tmp_path / "junk.json"
    not_json.write_text("{oops")
    assert main(["tree", str(not_json)]) == 2
    assert "not JSON" in capsys.readouterr().err

    no_tree = tmp_path / "no_tree.json"
    no_tree.write_text(json.dumps({k: v for k, v in result_to_json(result).items() if k != "tree"}))
    assert main(["tree", str(no_tree)]) == 2
    assert "not a result JSON: result is missing key 'tree'" in capsys.readouterr().err

    bare_tree = tmp_path / "tree_example.json"
    bare_tree.write_text(json.dumps(result.tree.to_json()))
    assert main(["tree", str(bare_tree)]) == 2
    err = capsys.readouterr().err
    assert "missing key 'strategy'" in err and "bare Tree.to_json()" in err

    bad_node = result_to_json(result)
    del bad_node["tree"]["nodes"][2]["visits"]
    with pytest.raises(ResultFileError, match=r"tree.nodes\[2\] is missing key 'visits'"):
        load_result(save_result_json(tmp_path / "bad_node.json", bad_node))
    assert not list(tmp_path.glob("*.png"))  # nothing was drawn for a bad file


@pytest.mark.parametrize("field, value, message", [
    ("candidates", [{"node": 1}], r"candidates\[0\] is missing key 'node_id'"),  # a KeyError traceback before
    ("candidates", None, "candidates must be a list; got NoneType"),
    ("candidates", [{"node_id": 10**6, "score": 0.5}], r"candidates\[0\].node_id=1000000 is not a node id"),
    ("candidates", [{"node_id": 1, "score": "high"}], r"candidates\[0\].score='high' must be a number"),
    ("problem", "p", "problem must be an object with key 'id'"),  # killed the --watch viewer
    ("chosen", 99, "chosen=99 is not an index into candidates"),
])
def test_a_result_file_with_bad_candidates_or_problem_is_named_not_a_traceback(saved, tmp_path, capsys,
                                                                               field, value, message):
    result, _ = saved
    data = {**result_to_json(result), field: value}
    path = save_result_json(tmp_path / "bad.json", data)
    with pytest.raises(ResultFileError, match=message):
        load_result(path)
    for args in ([], ["--watch", "1"]):
        assert main(["tree", str(path), "--out-dir", str(tmp_path / "plots"), *args]) == 2
        assert f"error: {path}: not a result JSON: " in capsys.readouterr().err


def save_result_json(path, data):
    path.write_text(json.dumps(data))
    return path



def test_watch_says_once_that_it_waits_for_a_missing_file_and_when_the_file_goes(saved, tmp_path, monkeypatch, capsys):
    # --watch on a mistyped path (or before the search's first round) printed nothing, forever
    _, good = saved
    watched = tmp_path / "runs" / "live_tree.json"
    steps = iter([
        lambda: None, lambda: None,  # two polls of a missing file: one note
        lambda: (watched.parent.mkdir(), watched.write_text(good.read_text())),  # appears: rendered
        lambda: watched.unlink(), lambda: None,  # removed after a render: one note
    ])

    def next_poll(_: float) -> None:
        step = next(steps, None)
        if step is None:
            raise KeyboardInterrupt
        step()

    monkeypatch.setattr(plot_module.time, "sleep", next_poll)
    assert main(["tree", str(watched), "--watch", "1", "--out-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: waiting for {watched} to appear (its folder {watched.parent} does not exist yet): a search with "
        "live_tree=true writes it after its first round (a finished run searches nothing again and writes none)",
        f"note: {watched}: the search of problem hostile finished (its chosen path marked); still watching the file "
        "(a live tree's next problem replaces it)",
        f"note: {watched} was removed; keeping the last render, waiting for it to appear again",
    ]
    assert len(captured.out.split()) == 2  # the one render: PNG and HTML


def test_an_out_dir_that_cannot_be_made_is_one_error_line(saved, tmp_path, capsys, monkeypatch):
    import pathlib

    _, path = saved

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    assert main(["tree", str(path), "--out-dir", str(tmp_path / "ro" / "sub")]) == 2
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'ro' / 'sub'}'\n"


@pytest.mark.parametrize("visits", [float("nan"), float("inf")])
def test_non_finite_visits_are_named_before_anything_is_drawn(saved, tmp_path, capsys, visits):
    # NaN visits passed the check, the PNG was written, then the HTML's strict JSON failed (traceback)
    result, _ = saved
    data = result_to_json(result)
    data["tree"]["nodes"][1]["visits"] = visits
    path = save_result_json(tmp_path / "odd.json", data)
    assert main(["tree", str(path)]) == 2
    assert f"tree.nodes[1].visits={visits!r} must be a finite number" in capsys.readouterr().err
    assert not list(tmp_path.glob("odd.*[lg]"))  # no .png, no .html
