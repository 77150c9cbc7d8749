"""The plug-in interfaces the search core consumes: `Policy` and `Scorer`.

They are owned here (the consumer); `policies/` and `scorers/` implement them without inheriting
from anything. Both are batch-first and keep the input order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

from treesearch.records import Prefix, Step

if TYPE_CHECKING:
    from treesearch.tree import Tree


@runtime_checkable
class Policy(Protocol):
    """A generator of reasoning steps.

    num_parameters: parameter count of the model, for FLOPs estimates (2 x params x tokens).
    """

    num_parameters: int

    def propose(
        self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """Sample n next steps for each prefix: result[i][j] is the j-th sample after prefixes[i].

        With stop_at_step=False a "step" runs to the end of the sequence (one step per sample).
        Same inputs and seed give the same outputs.
        """
        ...

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        """Sample n completions to the end for each prefix, split into steps:
        result[i][j] is the j-th completion of prefixes[i] as a list of steps, the last one
        terminal (finish "eos" or "length"), the others ending on the separator."""
        ...


@runtime_checkable
class WidthPolicy(Protocol):
    """A `Policy` that can also sample a different number of steps after each prefix in ONE call.

    Optional: REBASE and particle filtering give each node its own width; with this method a
    round is one call (`frontier.grow_nodes`), without it one `propose` call per distinct width.
    The three backends (`policies/`) have it.
    """

    def propose_widths(
        self, prefixes: Sequence[Prefix], widths: Sequence[int], seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        """widths[i] sampled next steps after prefixes[i] (each width >= 1), as `propose` samples
        them: propose(prefixes, n, seed) is propose_widths(prefixes, [n] * len(prefixes), seed)."""
        ...


@runtime_checkable
class TemperaturePolicy(Protocol):
    """A `Policy` that can give another policy on the same model sampling at another temperature.

    Optional: beam search's lookahead steps are greedy (temperature 0), as search-and-learn's;
    the three backends (`policies/`) have it.
    """

    def with_temperature(self, temperature: float) -> Policy:
        """A policy like this one (same model, engine, caches and other sampling settings) that
        samples at `temperature` (0: greedy)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores partial or complete paths step by step."""

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        """One score in [0, 1] per step of each path, in input order."""
        ...

    def cost(self, paths: Sequence[Prefix]) -> int:
        """Tokens the scorer runs through a model to score these paths (0 when it reads what the
        policy already computed, such as token log-probs or head scores from generation)."""
        ...


# `on_round=` of every strategy: called with every problem's tree (in input order) after each
# round, from the thread running the search, while no node of them changes (beam search, DVTS and
# MCTS grow their trees by rounds; Best-of-N calls it once, with its finished trees). It lets a
# caller watch a search as it grows: `experiments/live_tree.py` writes one tree to a result JSON
# that `python -m experiments.plot tree FILE --watch 1` re-renders.
RoundHook = Callable[[Sequence["Tree"]], None]
