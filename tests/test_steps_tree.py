"""Step splitting, the records and the tree."""
from __future__ import annotations

import json

import networkx as nx
import pytest
from hypothesis import given, settings, strategies as st

from treesearch.records import Prefix, Problem, Step
from treesearch.steps import StepFormat, split_steps
from treesearch.tree import Tree


def test_split_reference_format():
    text = "<think>1 + 2 = 3.\n\n3 * 2 = 6.\n\n</think>Answer: 6"
    assert split_steps(text) == ["<think>1 + 2 = 3.\n\n", "3 * 2 = 6.\n\n", "</think>Answer: 6"]


def test_split_runs_and_separator_after_think():
    # the separator right after <think> and the second of a run do not start steps
    text = "<think>.\n\nA.\n\n.\n\nB.\n\n</think>C"
    assert split_steps(text) == ["<think>.\n\nA.\n\n.\n\n", "B.\n\n", "</think>C"]


def test_separators_outside_think_do_not_split():
    assert split_steps("a.\n\n</think>b.\n\nc") == ["a.\n\n", "</think>b.\n\nc"]
    assert split_steps("pre.\n\n<think>a.\n\nb") == ["pre.\n\n<think>a.\n\n", "b"]


def test_custom_separator():
    fmt = StepFormat(separator="\n", think_open="", think_close="")
    assert split_steps("a\nb\n\nc", fmt) == ["a\n", "b\n\n", "c"]  # "\n\n" is a run of two


def test_empty_separator_rejected():
    with pytest.raises(ValueError, match="separator"):
        StepFormat(separator="")


@settings(deadline=None)  # a collector pause in the whole suite passed Hypothesis's 200 ms
@given(st.lists(st.sampled_from(["a", ".", "\n", "<think>", "</think>", ".\n\n", " "]), max_size=40).map("".join))
def test_split_is_lossless_and_has_no_empty_steps(text):
    steps = split_steps(text)
    assert "".join(steps) == text
    assert all(steps)


def test_step_validation():
    with pytest.raises(ValueError, match="finish='stop'"):
        Step("a", (1,), (-0.1,), "stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 token_ids but 1 token_logprobs"):
        Step("a", (1, 2), (-0.1,), "eos")
    s = Step("ab", (1, 2), (-0.5, -0.25), "separator")
    assert s.logprob == -0.75 and not s.is_terminal


def _tree() -> Tree:
    tree = Tree(Problem("p", "q", "3", {"k": 1}))
    a = tree.add(0, Step("a.\n\n", (1, 2), (-0.1, -0.2), "separator"), prior=0.6, score=0.7)
    tree.add(a, Step("b", (3,), (-0.3,), "eos", tokens_forwarded=4), prior=1.0, score=0.4)
    tree.add(0, Step("c", (5,), (-1.0,), "length"), prior=0.4, score=0.1)
    return tree


def test_tree_paths_and_leaves():
    tree = _tree()
    assert [s.text for s in tree.path(2)] == ["a.\n\n", "b"]
    assert tree.leaves() == [2, 3]
    assert tree.prefix(2) == Prefix(tree.problem, tree.path(2))
    assert tree.nodes[2].depth == 2 and tree.nodes[2].is_terminal


def test_tree_paths_in_any_order_match_the_walk_from_the_root():
    """Paths are kept once made: asking a deep node first, then its ancestors and siblings (and
    a tree read back from JSON) gives each node exactly its root-to-node steps."""
    tree = _tree()
    d = tree.add(2, Step("d", (6,), (-0.5,), "eos"))
    e = tree.add(1, Step("e", (7,), (-0.6,), "eos"))
    texts = lambda path: [s.text for s in path]  # noqa: E731
    assert texts(tree.path(d)) == ["a.\n\n", "b", "d"]
    assert texts(tree.path(1)) == ["a.\n\n"] and texts(tree.path(e)) == ["a.\n\n", "e"]
    assert tree.path(0) == () and texts(tree.path(3)) == ["c"]
    back = Tree.from_json(json.loads(json.dumps(tree.to_json())))
    assert [back.path(n.id) for n in reversed(back.nodes)] == [tree.path(n.id) for n in reversed(tree.nodes)]


def test_tree_networkx_export(tmp_path):
    g = _tree().to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert sorted(g.edges) == [(0, 1), (0, 3), (1, 2)]
    assert g.nodes[1]["score"] == 0.7 and g.nodes[3]["finish"] == "length"
    assert "finish" not in g.nodes[0] and "score" not in g.nodes[0]  # None: GraphML / GEXF refused the tree
    nx.write_graphml(g, tmp_path / "tree.graphml")
    nx.write_gexf(g, tmp_path / "tree.gexf")
    assert sorted(nx.read_graphml(tmp_path / "tree.graphml").edges) == [("0", "1"), ("0", "3"), ("1", "2")]


def test_tree_json_round_trip():
    tree = _tree()
    data = json.loads(json.dumps(tree.to_json()))
    back = Tree.from_json(data)
    assert back.problem == tree.problem
    assert [n.step for n in back.nodes] == [n.step for n in tree.nodes]
    assert [n.children for n in back.nodes] == [n.children for n in tree.nodes]
    assert back.to_json() == tree.to_json()  # scores, priors, visits and values too (they were not compared)


def test_records_are_hashable_and_keep_no_list_that_could_change():
    # hash(Problem(...)) failed on its meta dict (no {problem: result}, no set of prefixes), and
    # Step(token_ids=[...]) kept the list: appending to it changed num_tokens afterwards
    from treesearch.records import Prefix, Problem, Step

    problem = Problem("a", "q", meta={"line": 3})
    assert {problem: 1}[Problem("a", "q", meta={"line": 3})] == 1
    assert problem != Problem("a", "q", meta={"line": 4})  # meta still compared, only left out of the hash
    step = Step("x", [1, 2], [-0.1, -0.2], "eos")
    assert step.token_ids == (1, 2) and step.token_logprobs == (-0.1, -0.2) and step.num_tokens == 2
    prefix = Prefix(problem, [step])
    assert prefix.steps == (step,) and len({prefix, Prefix(problem, (step,))}) == 1
    with pytest.raises(ValueError, match=r"Step.text=None must be a string"):
        Step(None, (), (), "eos")


@pytest.mark.parametrize("parent", [-1, 3, 1.0, True, "0", None])
def test_adding_under_a_parent_that_is_no_node_is_a_value_error(parent):
    # add(-1, ...) made the new node its own child, and path() then looped forever
    tree = Tree(Problem("p", "Q"))
    tree.add(0, Step("a", (1,), (-0.1,), "separator"))
    with pytest.raises(ValueError, match=f"parent={parent!r} is not a node id of this tree \\(0..1\\)"):
        tree.add(parent, Step("b", (2,), (-0.1,), "eos"))
    assert len(tree) == 2 and tree.nodes[1].children == []


@pytest.mark.parametrize("node_id", [-1, -2, 2])
def test_the_path_of_a_node_id_that_is_no_node_is_a_value_error(node_id):
    # path(-1) was the last node's path (Python's negative index) and was kept under -1
    tree = Tree(Problem("p", "Q"))
    tree.add(0, Step("a", (1,), (-0.1,), "separator"))
    for ask in (tree.path, tree.prefix, tree.path):
        with pytest.raises(ValueError, match=f"node_id={node_id} is not a node id of this tree \\(0..1\\)"):
            ask(node_id)
    assert [s.text for s in tree.path(1)] == ["a"]


def test_a_node_id_of_another_integer_type_is_taken():
    np = pytest.importorskip("numpy")
    tree = Tree(Problem("p", "Q"))
    child = tree.add(np.int64(0), Step("a", (1,), (-0.1,), "eos"))
    assert tree.nodes[child].parent == 0 and type(tree.nodes[child].parent) is int


def test_a_step_score_is_a_plain_float_or_refused():
    # a numpy score passed through, and the tree holding it could not be saved as JSON
    np = pytest.importorskip("numpy")
    import torch

    for score in (np.float32(0.75), torch.tensor(0.75), 3 / 4):
        step = Step("a", (1,), (-0.1,), "eos", score=score)
        assert type(step.score) is float and step.score == 0.75
    tree = Tree(Problem("p", "Q"))
    tree.add(0, Step("a", (1,), (-0.1,), "eos", score=np.float32(0.5)))
    json.dumps(tree.to_json())
    for bad in ("high", True, [0.5], torch.tensor([0.5, 0.6])):
        with pytest.raises(ValueError, match="Step.score=.* must be a number"):
            Step("a", (1,), (-0.1,), "eos", score=bad)
    # the node's own score and prior too
    child = tree.add(torch.tensor(1), Step("b", (2,), (-0.1,), "eos"), prior=np.float64(0.5), score=np.float32(0.25))
    assert (type(tree.nodes[child].prior), type(tree.nodes[child].score)) == (float, float)
    json.dumps(tree.to_json())
    with pytest.raises(ValueError, match="score='x' must be a number"):
        tree.add(0, Step("c", (3,), (-0.1,), "eos"), score="x")


def test_a_think_tag_after_the_span_closed_opens_nothing():
    # "...</think>Answer: 3<think>": the first <think> was taken for the opener, at the end: one step
    from treesearch.steps import split_steps

    text = "6 * 2 = 12.\n\n12 - 9 = 3.\n\n</think>Answer: 3<think>"
    assert split_steps(text) == ["6 * 2 = 12.\n\n", "12 - 9 = 3.\n\n", "</think>Answer: 3<think>"]
    assert split_steps("Q?\n<think>1.\n\n2.\n\n</think>A: 2") == ["Q?\n<think>1.\n\n", "2.\n\n", "</think>A: 2"]
