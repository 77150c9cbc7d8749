"""The result JSON file: one problem's `SearchResult` as plain JSON, the record plots read.

A result JSON holds (keys in `RESULT_KEYS`):
    problem      the problem: {"id", "question", "answer", "meta"}
    strategy     registry name of the strategy ("mcts", "beam_search", ...)
    config       the strategy config as a dict
    chosen       index into candidates of the chosen answer, or null
    chosen_node  tree node id of the chosen candidate's leaf, or null
    candidates   [{"node_id", "score", "step_scores"}] in generation order (their steps are the
                 tree path to node_id)
    tree         `Tree.to_json()`: {"problem", "nodes": [...]}, node i has id i
    compute      `Compute.to_dict()`
    live         (only in a live tree's file, `experiments.live_tree`) {"state": "searching" or
                 "stopped", "round": rounds so far, "reason": why it stopped}; a finished
                 search's result has none

`save_result` writes atomically (temp file in the same folder + `os.replace`), so a reader (the
plots, a live HTML page being regenerated) never sees a half-written file, even while a running
search rewrites it.

    save_result("runs/trap_mcts.json", result)
    record = load_result("runs/trap_mcts.json")   # ResultRecord, or ResultFileError naming the problem
    result = record.to_result()                    # the SearchResult again (meta tuples come back as lists)
    python -m experiments.plot tree runs/trap_mcts.json

Tests: `.venv/bin/pytest tests/test_tree_plot.py tests/test_library_api.py` (read back: `to_result`).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from treesearch.compute import Compute
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult
from treesearch.tree import Tree

RESULT_KEYS = ("problem", "strategy", "config", "chosen", "chosen_node", "candidates", "tree", "compute")
NODE_KEYS = ("id", "parent", "step", "depth", "children", "visits", "value", "prior", "score")
LIVE_KEY = "live"
LIVE_STATES = ("searching", "stopped")


class ResultFileError(ValueError):
    """A file that is missing, not JSON, or not a result JSON; the message names what is wrong."""


@dataclass(frozen=True)
class ResultRecord:
    """A result JSON as read back (fields as in the module docstring; dicts are the JSON's own).

    problem: {"id", "question", "answer", "meta"}.
    strategy: registry name of the strategy.
    config: strategy config dict.
    chosen: index into candidates, or None.
    chosen_node: tree node id of the chosen leaf, or None.
    candidates: [{"node_id", "score", "step_scores"}] in generation order.
    tree: `Tree.to_json()` dict (what the plots draw).
    compute: `Compute.to_dict()`.
    live: a live tree's state ({"state", "round", "reason"}), None for a finished search's result.
    """

    problem: dict[str, Any]
    strategy: str
    config: dict[str, Any]
    chosen: int | None
    chosen_node: int | None
    candidates: list[dict[str, Any]]
    tree: dict[str, Any]
    compute: dict[str, Any]
    live: dict[str, Any] | None = None

    def to_tree(self) -> Tree:
        return Tree.from_json(self.tree)

    def to_result(self) -> SearchResult:
        """The `SearchResult` this record was written from (`result_from_record`)."""
        return result_from_record(self)


def result_to_json(result: SearchResult) -> dict[str, Any]:
    """The result as a JSON-ready dict (see the module docstring)."""
    chosen = result.chosen_candidate
    return {
        "problem": {**asdict(result.problem), "meta": dict(result.problem.meta)},
        "strategy": result.strategy,
        "config": dict(result.config),
        "chosen": result.chosen,
        "chosen_node": None if chosen is None else chosen.node_id,
        "candidates": [
            {"node_id": c.node_id, "score": c.score, "step_scores": list(c.step_scores)}
            for c in result.candidates
        ],
        "tree": result.tree.to_json(),
        "compute": result.compute.to_dict(),
    }


def result_from_record(record: ResultRecord) -> SearchResult:
    """The `SearchResult` a record was written from: its problem, tree (nodes with their steps,
    scores, priors, visits and values), candidates (each one's steps the tree path to its node),
    chosen, config and compute, such that `load_result(save_result(path, r)).to_result() == r`,
    except that JSON has no tuples: a tuple in a problem's meta or the config comes back as a list
    (and a meta key that is no str as a str). A ResultFileError names a field that cannot be
    rebuilt (`result_from_json` checked the tree and the candidates' node ids already)."""
    tree = _rebuilt("tree", lambda: Tree.from_json(record.tree))
    candidates = tuple(_candidate(tree, i, c) for i, c in enumerate(record.candidates))
    chosen_node = None if record.chosen is None else candidates[record.chosen].node_id
    if record.chosen_node != chosen_node:
        raise ResultFileError(f"chosen_node={record.chosen_node!r} is not the node of the chosen candidate "
                              f"({record.chosen!r}: node {chosen_node!r})")
    return SearchResult(
        problem=_rebuilt("problem", lambda: Problem(**record.problem)),
        strategy=record.strategy,
        config=dict(record.config),
        candidates=candidates,
        chosen=record.chosen,
        tree=tree,
        compute=_rebuilt("compute", lambda: Compute(**record.compute)),
    )


def _candidate(tree: Tree, index: int, data: Mapping[str, Any]) -> Candidate:
    """Candidate `index` of a record: its steps are the tree's path to its node."""
    scores = data.get("step_scores")
    if not isinstance(scores, list):
        raise ResultFileError(f"candidates[{index}].step_scores={scores!r:.80} must be a list of numbers")
    return Candidate(tree.path(data["node_id"]), tuple(scores), data["score"], data["node_id"])


def _rebuilt(name: str, build: Callable[[], Any]) -> Any:
    """build(), with its TypeError / ValueError / KeyError (a key missing or unknown) as a
    ResultFileError naming the field."""
    try:
        return build()
    except (TypeError, ValueError, KeyError) as err:
        raise ResultFileError(f"{name} cannot be rebuilt: {err}") from None


def result_from_json(data: Any) -> ResultRecord:
    """Check a parsed result JSON and wrap it; ResultFileError names the first missing key."""
    if not isinstance(data, dict):
        raise ResultFileError(f"expected a JSON object with keys {', '.join(RESULT_KEYS)}; got {type(data).__name__}")
    _require_keys(data, RESULT_KEYS, "result", hint=_bare_tree_hint(data))
    _check_tree(data["tree"])
    if not isinstance(data["problem"], dict) or "id" not in data["problem"]:
        raise ResultFileError(f"problem must be an object with key 'id'; got {data['problem']!r:.80}")
    chosen_node = data["chosen_node"]
    num_nodes = len(data["tree"]["nodes"])
    _check_candidates(data["candidates"], num_nodes)
    chosen = data["chosen"]
    if chosen is not None and not (_is_id(chosen) and chosen < len(data["candidates"])):
        raise ResultFileError(f"chosen={chosen!r} is not an index into candidates (0..{len(data['candidates']) - 1})")
    if chosen_node is not None and not (_is_id(chosen_node) and chosen_node < num_nodes):
        raise ResultFileError(f"chosen_node={chosen_node!r} is not a node id of the tree (0..{num_nodes - 1})")
    live = data.get(LIVE_KEY)
    if live is not None and not (isinstance(live, dict) and live.get("state") in LIVE_STATES):
        raise ResultFileError(f"{LIVE_KEY}={live!r} must be an object whose state is one of {', '.join(LIVE_STATES)}")
    return ResultRecord(**{key: data[key] for key in RESULT_KEYS}, live=live)


def load_result(path: str | os.PathLike[str]) -> ResultRecord:
    """Read and check a result JSON file; ResultFileError says which file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultFileError(f"{path}: not JSON ({err})") from None
    try:
        return result_from_json(data)
    except ResultFileError as err:
        raise ResultFileError(f"{path}: not a result JSON: {err}") from None


def save_result(path: str | os.PathLike[str], result: SearchResult, live: Mapping[str, Any] | None = None) -> Path:
    """Write `result_to_json(result)` (with a live tree's state under LIVE_KEY when given) to path
    atomically; return the path."""
    data = result_to_json(result) if live is None else {**result_to_json(result), LIVE_KEY: dict(live)}
    return write_atomic(path, json.dumps(data, ensure_ascii=False))


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write content to a temp file next to path, then `os.replace` it over path (atomic on POSIX
    and Windows when both lie on one file system, which the same folder guarantees)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a lone surrogate (JSON's "\ud83d", a split emoji) is written as that escape: a traceback before
    data = content.encode("utf-8", errors="backslashreplace") if isinstance(content, str) else content
    # Not tempfile.mkstemp: its files are mode 0600; open(..., "xb") keeps the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _require_keys(data: Mapping[str, Any], keys: tuple[str, ...], where: str, hint: str = "") -> None:
    for key in keys:
        if key not in data:
            raise ResultFileError(f"{where} is missing key {key!r}{hint}")


def _bare_tree_hint(data: Mapping[str, Any]) -> str:
    """A bare tree (what `Tree.to_json()` writes, without the result around it) is the likeliest wrong file."""
    if "nodes" in data and "problem" in data:
        return (" (this looks like a bare Tree.to_json(); plots need a result JSON written by"
                " experiments.result_json.save_result)")
    return ""


def _check_tree(tree: Any) -> None:
    if not isinstance(tree, dict):
        raise ResultFileError(f"tree must be an object; got {type(tree).__name__}")
    _require_keys(tree, ("problem", "nodes"), "tree")
    if not isinstance(tree["problem"], dict) or "id" not in tree["problem"]:
        raise ResultFileError("tree.problem is missing key 'id'")
    nodes = tree["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise ResultFileError("tree.nodes must be a non-empty list")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise ResultFileError(f"tree.nodes[{i}] must be an object")
        _require_keys(node, NODE_KEYS, f"tree.nodes[{i}]")
        if node["id"] != i:
            raise ResultFileError(f"tree.nodes[{i}] has id {node['id']!r}; node i must have id i")
        if node["step"] is not None and not (isinstance(node["step"], dict) and "text" in node["step"]):
            raise ResultFileError(f"tree.nodes[{i}].step is missing key 'text'")
        _check_links(nodes, i)
    for i, node in enumerate(nodes):  # parents and children agree: no cycle for a plot to loop on
        stray = [c for c in node["children"] if nodes[c]["parent"] != i]
        if stray:
            raise ResultFileError(f"tree.nodes[{i}].children {stray} name another node as their parent")
        if i and i not in nodes[node["parent"]]["children"]:
            raise ResultFileError(f"tree.nodes[{i}] is missing from the children of its parent {node['parent']}")


def _check_candidates(candidates: Any, num_nodes: int) -> None:
    """Each candidate an object whose node_id is a node of the tree and whose score is a number."""
    if not isinstance(candidates, list):
        raise ResultFileError(f"candidates must be a list; got {type(candidates).__name__}")
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            raise ResultFileError(f"candidates[{i}] must be an object")
        _require_keys(candidate, ("node_id", "score"), f"candidates[{i}]")
        node_id, score = candidate["node_id"], candidate["score"]
        if not (_is_id(node_id) and node_id < num_nodes):
            raise ResultFileError(f"candidates[{i}].node_id={node_id!r} is not a node id of the tree (0..{num_nodes - 1})")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ResultFileError(f"candidates[{i}].score={score!r:.80} must be a number")


def _check_links(nodes: list[dict[str, Any]], i: int) -> None:
    """Node i's parent is null for the root and an earlier node's id otherwise (`Tree.add` appends
    each child after its parent), and its children are later nodes' ids."""
    parent, children = nodes[i]["parent"], nodes[i]["children"]
    if (parent is not None) if i == 0 else not (_is_id(parent) and parent < i):
        must = "null (the root)" if i == 0 else f"the id of an earlier node (0..{i - 1})"
        raise ResultFileError(f"tree.nodes[{i}].parent={parent!r}; must be {must}")
    if not isinstance(children, list):
        raise ResultFileError(f"tree.nodes[{i}].children must be a list; got {type(children).__name__}")
    bad = [c for c in children if not (_is_id(c) and i < c < len(nodes))]
    if bad:
        raise ResultFileError(f"tree.nodes[{i}].children has ids outside the tree or not after it: {bad}")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
