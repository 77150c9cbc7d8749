"""The search tree: each node is one reasoning step; the path from the root is a partial solution.

Every strategy builds a `Tree` (Best-of-N builds N chains under the root), so trees from all
strategies plot, export and compare the same way. The tree is mutable while a strategy builds it
and is handed over in the frozen `SearchResult`; nodes are addressed by integer ids.

    tree = Tree(problem)
    a = tree.add(tree.root_id, step_a, prior=0.7)
    tree.path(a)             # (step_a,)
    tree.to_networkx()       # networkx.DiGraph with node attributes
    Tree.from_json(tree.to_json()) == tree   # equal problem and nodes
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx

from treesearch.records import Prefix, Problem, Step, plain_float

ROOT_ID = 0


@dataclass
class Node:
    """One node. id: index in the tree; parent: parent id (None for the root); step: the step that
    leads here (None for the root); children: child ids in creation order; visits / value: search
    statistics, strategy dependent (MCTS: visits and the running mean or max of the values backed
    up through the node; beam search and DVTS: visits 0, value = the aggregated path score that
    ranked the node; Best-of-N: both left 0); prior: the policy's prior for this child among its
    siblings (1.0 unless MCTS set it); score: the scorer's score of this step."""

    id: int
    parent: int | None
    step: Step | None
    depth: int
    children: list[int] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    prior: float = 1.0
    score: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.step is not None and self.step.is_terminal


class Tree:
    """Nodes of one problem's search; node 0 is the root (the bare problem)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.nodes: list[Node] = [Node(id=ROOT_ID, parent=None, step=None, depth=0)]
        self._paths: dict[int, tuple[Step, ...]] = {ROOT_ID: ()}  # node id -> `path`, filled as asked

    @property
    def root_id(self) -> int:
        return ROOT_ID

    def add(self, parent: int, step: Step, prior: float = 1.0, score: float | None = None) -> int:
        """Add a child of `parent` reached by `step`; return its id. A parent that is no node of this
        tree is a ValueError (-1 made a node its own child, and `path` looped forever)."""
        if not (type(parent) is int and 0 <= parent < len(self.nodes)):
            parent = self._node_id(parent, "parent")
        if type(prior) is not float:  # numpy / torch numbers: the tree's JSON could not be written
            prior = plain_float(prior, "prior")
        if score is not None and type(score) is not float:
            score = plain_float(score, "score")
        node = Node(
            id=len(self.nodes),
            parent=parent,
            step=step,
            depth=self.nodes[parent].depth + 1,
            prior=prior,
            score=score,
        )
        self.nodes.append(node)
        self.nodes[parent].children.append(node.id)
        return node.id

    def _node_id(self, value: object, name: str) -> int:
        """value as a node id of this tree, or a ValueError naming it (as the argument `name`)."""
        try:
            node_id = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            node_id = -1
        if isinstance(value, bool) or not 0 <= node_id < len(self.nodes):
            raise ValueError(f"{name}={value!r} is not a node id of this tree (0..{len(self.nodes) - 1})")
        return node_id

    def add_path(self, steps: list[Step] | tuple[Step, ...], scores: list[float] | None = None) -> int:
        """Add a chain of steps under the root; return the leaf id."""
        node = self.root_id
        for i, step in enumerate(steps):
            node = self.add(node, step, score=None if scores is None else scores[i])
        return node

    def path(self, node_id: int) -> tuple[Step, ...]:
        """Steps from the root to node_id. Each node's path is kept once made (nodes never move),
        so a search that asks for the paths of a node's children extends the node's path by one
        step instead of walking up to the root for each."""
        paths = self._paths
        if node_id in paths:
            return paths[node_id]
        # the nodes between node_id and its nearest known ancestor; a negative id is an error, not a
        # node counted from the end
        pending, node = [], self.nodes[self._node_id(node_id, "node_id")]
        while node.id not in paths:
            pending.append(node)
            node = self.nodes[node.parent]  # type: ignore[index]
        path = paths[node.id]
        for node in reversed(pending):
            path = path + (node.step,)
            paths[node.id] = path
        return path

    def prefix(self, node_id: int) -> Prefix:
        return Prefix(self.problem, self.path(node_id))

    def leaves(self) -> list[int]:
        return [n.id for n in self.nodes if not n.children and n.id != ROOT_ID]

    def __len__(self) -> int:
        return len(self.nodes)

    def __eq__(self, other: object) -> bool:
        """Equal problem and nodes (the path cache aside), so two searches that made the same tree,
        and a result read back from its JSON (`experiments.result_json`), compare equal."""
        if not isinstance(other, Tree):
            return NotImplemented
        return self.problem == other.problem and self.nodes == other.nodes

    __hash__ = None  # type: ignore[assignment]  # mutable while a strategy builds it: no dict key, no set member

    def to_networkx(self) -> nx.DiGraph:
        """DiGraph with one node per step (attributes: text, score, visits, value, prior, depth,
        finish; the root has no finish, an unscored node no score: an attribute that is None is
        left out, as GraphML and GEXF cannot write None) and parent -> child edges.

            nx.write_graphml(tree.to_networkx(), "tree.graphml")"""
        graph = nx.DiGraph(problem_id=self.problem.id)
        for node in self.nodes:
            attributes = {
                "text": "" if node.step is None else node.step.text,
                "finish": None if node.step is None else node.step.finish,
                "score": node.score, "visits": node.visits, "value": node.value, "prior": node.prior, "depth": node.depth,
            }
            graph.add_node(node.id, **{key: value for key, value in attributes.items() if value is not None})
            if node.parent is not None:
                graph.add_edge(node.parent, node.id)
        return graph

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (steps included) that `from_json` reads back."""
        return {
            "problem": {**asdict(self.problem), "meta": dict(self.problem.meta)},
            "nodes": [_node_to_json(n) for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Tree":
        tree = cls(Problem(**data["problem"]))
        tree.nodes = [_node_from_json(d) for d in data["nodes"]]  # no path was asked yet: none is stale
        return tree


def _node_to_json(node: Node) -> dict[str, Any]:
    out = asdict(node)
    if node.step is not None:
        out["step"] = {**asdict(node.step), "token_ids": list(node.step.token_ids),
                       "token_logprobs": list(node.step.token_logprobs)}
    return out


def _node_from_json(data: dict[str, Any]) -> Node:
    step = data.get("step")
    if step is not None:
        step = Step(**{**step, "token_ids": tuple(step["token_ids"]),
                       "token_logprobs": tuple(step["token_logprobs"])})
    return Node(**{**data, "step": step, "children": list(data["children"])})
