"""What a search returns for one problem: its candidates, the chosen one, the tree, the compute."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treesearch.compute import Compute
from treesearch.records import Problem, Step
from treesearch.tree import Tree


@dataclass(frozen=True)
class Candidate:
    """One complete (or cut) solution the search produced.

    steps: the path from the root.
    step_scores: the scorer's score of each step, same length as steps.
    score: the aggregated path score, which ranks the candidates of every strategy but MCTS (it
        chooses by visits or value, `MCTSConfig.final`: its chosen candidate need not score highest).
    node_id: the leaf of this path in the result's tree.
    """

    steps: tuple[Step, ...]
    step_scores: tuple[float, ...]
    score: float
    node_id: int

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.steps)


@dataclass(frozen=True)
class SearchResult:
    """One problem's search.

    problem: the problem searched.
    strategy: registry name of the strategy.
    config: the strategy config as a plain dict (for records).
    candidates: every candidate, in generation order: finished paths, and paths the search cut short
        (at max_depth; for MCTS, see `treesearch.mcts`).
    chosen: index into candidates of the answer the strategy returns (None if there is none).
    tree: every node the search made.
    compute: what it cost.
    """

    problem: Problem
    strategy: str
    config: dict[str, Any]
    candidates: tuple[Candidate, ...]
    chosen: int | None
    tree: Tree
    compute: Compute

    @property
    def chosen_candidate(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    @property
    def chosen_text(self) -> str:
        cand = self.chosen_candidate
        return "" if cand is None else cand.text


def argmax_first(values: list[float] | tuple[float, ...]) -> int | None:
    """Index of the largest value, the first one on ties; None for an empty list. A NaN is below
    every number (a NaN first no longer wins by comparing False both ways)."""
    if not values:
        return None
    best = 0
    for i, v in enumerate(values):
        if v > values[best] or (values[best] != values[best] and v == v):  # x != x: NaN
            best = i
    return best
