"""Bad and edge inputs of the evaluation pieces: result JSON trees whose links disagree, records
files left by an interrupted write, the demo's command line.

    .venv/bin/pytest tests/test_eval_cli.py
"""
from __future__ import annotations

import copy

import pytest

from experiments.result_json import ResultFileError, result_from_json, result_to_json
from step_tree_fakes import ScriptedPolicy, ScriptedScorer, trap_problem
from treesearch.registry import run_search


@pytest.fixture(scope="module")
def beam_json():
    result = run_search("beam_search", [trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=4, beam_width=2)[0]
    return result_to_json(result)


def _damaged(data, edit):
    out = copy.deepcopy(data)
    edit(out["tree"]["nodes"], out["chosen_node"])
    return out


def _set(nodes, i, key, value):
    nodes[i][key] = value


@pytest.mark.parametrize("edit, message", [
    # a node its own parent: following parents from the chosen node never reached the root (the plot hung)
    (lambda nodes, chosen: _set(nodes, chosen, "parent", chosen), r"parent=\d+; must be the id of an earlier node"),
    (lambda nodes, chosen: _set(nodes, 1, "children", [1]), "not after it: \\[1\\]"),  # a cycle through children
    (lambda nodes, chosen: _set(nodes, chosen, "parent", 999), "parent=999"),  # an IndexError in the plot
    (lambda nodes, chosen: _set(nodes, 0, "children", None), "children must be a list"),  # a TypeError
    (lambda nodes, chosen: _set(nodes, 0, "parent", 0), "parent=0; must be null"),
    (lambda nodes, chosen: _set(nodes, 0, "children", nodes[0]["children"][1:]),  # a node left out: a KeyError
     "is missing from the children of its parent 0"),
])
def test_result_json_refuses_trees_whose_parents_and_children_disagree(beam_json, edit, message):
    result_from_json(beam_json)  # the real tree passes
    with pytest.raises(ResultFileError, match=message):
        result_from_json(_damaged(beam_json, edit))


def test_write_records_interrupted_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    import json

    from experiments import outcomes as outcomes_module
    from experiments.outcomes import grade_results, write_records

    results = run_search("best_of_n", [trap_problem(), trap_problem()], ScriptedPolicy(), ScriptedScorer(), n=2)
    graded = grade_results(results, lambda problem, text: text.endswith("$"), lambda text: text[-3:])
    path = tmp_path / "records.jsonl"
    write_records(path, results, graded)
    before = path.read_bytes()
    assert [json.loads(line)["problem_id"] for line in before.decode().splitlines()] == ["trap", "trap"]

    dumps = json.dumps
    calls = []

    def ctrl_c_on_the_second_row(obj, *args, **kwargs):  # Ctrl-C while the rows are written
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(outcomes_module.json, "dumps", ctrl_c_on_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        write_records(path, results, graded)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
    with pytest.raises(ValueError):  # a result without its outcome is an error, not a row silently dropped
        write_records(path, results, graded[:1])
