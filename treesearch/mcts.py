"""A light MCTS over reasoning steps (PUCT, batched across leaves and problems).

Each round, for every problem still within budget:
  select   descend from the root by PUCT (`treesearch.puct`) to a leaf, up to `leaves_per_round`
           distinct leaves, with virtual loss on the paths already chosen this round;
  expand   sample `expand_width` next steps after every open leaf of every problem in ONE
           `policy.propose` call; identical sibling texts are merged (the first is kept; all are
           counted in compute); priors = softmax over the siblings' per-token mean log-probs;
  evaluate value of each new node = aggregated scorer score of its path, ONE `scorer.score`
           call for all problems; with rollout=True a non-terminal new node is first completed by
           one `policy.rollout` sample (one call for all) and the full path is scored instead;
  backup   every new child's value is backed up from the child to the root (each counts one
           visit on its path); a selected closed leaf just backs up its own value again.
Node value is the mean of the values backed up through it (backup="mean") or their max ("max").
A node's own evaluation (of its partial path) is among them, so under "max" a step scored high
early keeps that value whatever its continuations score (a geometric-mean path score falls with
every later step scored below it), and PUCT keeps returning to it (on the tests' trap tree, 20
and 60 simulations with final="visits" chose a worse answer than "mean" did).

Closed leaves, never expanded: a terminal step (finish "eos" / "length"), a node at max_depth (a
path cut there keeps its last step's finish), and a node the policy returned no steps for. One
simulation = one selected leaf; a problem stops after `iterations` simulations, once it has
generated `token_budget` tokens (checked before each round), or when its root is closed. Under a
token budget a round selects only as many leaves as the tokens left pay for at the problem's
mean cost of a leaf's expansion so far (its children's steps and their rollouts; at least one,
`leaves_within_budget`), so the last round overshoots by about one leaf's expansion, not a whole
round's (compute-matched sweeps). The estimate is the cost seen so far: where a policy's later
steps are much longer than its first ones, an early round may spend several leaves' worth more
(a fake policy with 2-token first steps and 30-token later ones, budget 40: 368 tokens; the tiny
arith policy at Best-of-N's tokens: 0.89-1.10x the budget on average, 1.29x at worst).

Result: candidates are the closed leaves in creation order; if none is closed, the open leaves
cut by the budget. With rollout=True each candidate leaf that was rolled out (not terminal: cut
by the budget or max_depth, or a dead end) is completed by its rollout (the rollout's steps are
added to the tree under the leaf, with their scores: a complete, paid-for answer instead of a
partial path). The chosen one has the most visits (ties: higher value, then earlier) with
final="visits", or the highest node value with final="value" (a completed leaf ranks by the
leaf's own visits and value). Policy seeds come from (cfg.seed, round), so the same seed gives
the same tree.

Compute (`treesearch.frontier.Ledger`): every step generated for a problem (merged duplicates and
rollout steps included; rollout steps are tree nodes only where they complete a candidate, above),
the policy calls that included it (a round that only revisits closed leaves makes no call) and the
scorer cost of its paths.

    results = mcts(problems, policy, scorer, MCTSConfig(iterations=32, expand_width=4))

Tests: `.venv/bin/pytest tests/test_mcts.py`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Sequence

from treesearch.aggregation import aggregate
from treesearch.config_checks import check_aggregation_setting, check_finite, check_int, is_int, search_inputs
from treesearch.frontier import Item, Ledger, make_candidate, propose_rows, rollout_rows, round_seed, score_rows
from treesearch.protocols import Policy, RoundHook, Scorer
from treesearch.puct import puct_score, sibling_priors, step_prior_logit, with_virtual_loss
from treesearch.records import Prefix, Problem, Step
from treesearch.result import Candidate, SearchResult, argmax_first
from treesearch.tree import ROOT_ID, Tree

BACKUPS = ("mean", "max")
FINALS = ("visits", "value")


@dataclass(frozen=True)
class MCTSConfig:
    """iterations: simulations (selected leaves) per problem; expand_width: steps sampled per
    expansion; c_puct: exploration weight (values lie in [0, 1]); leaves_per_round: leaves
    selected per problem per round; virtual_loss: zero-valued visits added per pending selection;
    backup: "mean" | "max"; final: "visits" | "value"; rollout: value new nodes by one completed
    rollout; max_depth: most steps in a path; token_budget: stop a problem once it has generated
    this many tokens (None: no limit); aggregation: step scores -> path value; seed: base of the
    per-round policy seeds."""

    iterations: int = 32
    expand_width: int = 4
    c_puct: float = 1.0
    leaves_per_round: int = 4
    virtual_loss: float = 1.0
    backup: str = "mean"
    final: str = "visits"
    rollout: bool = False
    max_depth: int = 40
    token_budget: int | None = None
    aggregation: str = "geometric_mean"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "expand_width", "leaves_per_round", "max_depth"):
            check_int("MCTSConfig", name, getattr(self, name), minimum=1)
        for name in ("c_puct", "virtual_loss"):  # NaN or inf would make every PUCT score NaN / inf
            check_finite("MCTSConfig", name, getattr(self, name), minimum=0.0)
        if self.backup not in BACKUPS:
            raise ValueError(f"MCTSConfig.backup={self.backup!r}; valid: {', '.join(BACKUPS)}")
        if self.final not in FINALS:
            raise ValueError(f"MCTSConfig.final={self.final!r}; valid: {', '.join(FINALS)}")
        if not isinstance(self.rollout, bool):
            raise ValueError(f"MCTSConfig.rollout={self.rollout!r} must be a bool")
        if self.token_budget is not None and (not is_int(self.token_budget) or self.token_budget < 1):
            raise ValueError(f"MCTSConfig.token_budget={self.token_budget!r} must be None or an integer >= 1")
        check_aggregation_setting("MCTSConfig", "aggregation", self.aggregation)
        check_int("MCTSConfig", "seed", self.seed)


@dataclass
class _ProblemSearch:
    """One problem's search state, alive only during one `mcts` call.

    evals: node -> value from its evaluation; path_scores: node -> scores of its path's steps
    from that evaluation; value_sums: node -> sum of values backed up through it (mean backup);
    pending: node -> selections through it this round (virtual loss); closed: leaves never to be
    expanded; simulations: selected leaves so far; expansions: leaves sent to the policy so far;
    rollouts: node -> (the steps of its rollout, the scores of the whole completed path).
    """

    tree: Tree
    evals: dict[int, float] = field(default_factory=dict)
    path_scores: dict[int, tuple[float, ...]] = field(default_factory=dict)
    value_sums: dict[int, float] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    simulations: int = 0
    expansions: int = 0
    rollouts: dict[int, tuple[tuple[Step, ...], tuple[float, ...]]] = field(default_factory=dict)


def _ancestry(tree: Tree, node_id: int) -> list[int]:
    """node_id and its ancestors up to the root."""
    ids = [node_id]
    while tree.nodes[ids[-1]].parent is not None:
        ids.append(tree.nodes[ids[-1]].parent)  # type: ignore[arg-type]
    return ids


def _descend(search: _ProblemSearch, cfg: MCTSConfig) -> int:
    """Follow the best PUCT child (virtual loss applied) from the root to a leaf."""
    tree, pending = search.tree, search.pending
    node = tree.nodes[ROOT_ID]
    while node.children:
        _, parent_n = with_virtual_loss(node.value, node.visits, pending.get(node.id, 0), cfg.virtual_loss)
        scores = []
        for child_id in node.children:
            child = tree.nodes[child_id]
            q, n = with_virtual_loss(child.value, child.visits, pending.get(child_id, 0), cfg.virtual_loss)
            scores.append(puct_score(q, child.prior, parent_n, n, cfg.c_puct))
        node = tree.nodes[node.children[argmax_first(scores)]]  # type: ignore[index]
    return node.id


def leaves_within_budget(ledger: Ledger, expansions: int, cfg: MCTSConfig) -> int:
    """The most leaves this round may select: leaves_per_round, or under a token budget as many
    as the tokens left pay for at the problem's mean tokens per leaf expansion so far (its
    children's steps and, with rollout, their rollouts; at least 1; no cap before the first
    expansion; a deeper leaf's steps may cost more than that mean, module docstring).
    expansions: the leaves expanded so far."""
    if cfg.token_budget is None or expansions == 0 or ledger.tokens_generated == 0:
        return cfg.leaves_per_round
    per_leaf = ledger.tokens_generated / expansions
    left = cfg.token_budget - ledger.tokens_generated
    return max(1, min(cfg.leaves_per_round, int(left // per_leaf)))


def select(search: _ProblemSearch, cfg: MCTSConfig, most: int | None = None) -> list[int]:
    """Up to `most` (default leaves_per_round) distinct leaves; stops early when a descent
    repeats a leaf (virtual loss was not enough to divert it: the tree has no other leaf worth a
    simulation now)."""
    leaves: list[int] = []
    most = cfg.leaves_per_round if most is None else most
    for _ in range(min(most, cfg.iterations - search.simulations)):
        leaf = _descend(search, cfg)
        if leaf in leaves:
            break
        leaves.append(leaf)
        for node_id in _ancestry(search.tree, leaf):
            search.pending[node_id] = search.pending.get(node_id, 0) + 1
    return leaves


def _distinct(steps: list[Step]) -> list[Step]:
    seen: set[str] = set()
    out = []
    for step in steps:
        if step.text not in seen:
            seen.add(step.text)
            out.append(step)
    return out


def expand(
    searches: list[_ProblemSearch], selected: dict[int, list[int]], policy: Policy, cfg: MCTSConfig,
    round_index: int, ledgers: list[Ledger],
) -> list[tuple[int, int]]:
    """Expand every open selected leaf of every problem in one policy call; return the new
    (problem, node) pairs. A leaf that gets no steps is closed (a dead end)."""
    leaves = [(p, leaf) for p, ids in selected.items() for leaf in ids if leaf not in searches[p].closed]
    for p, _ in leaves:
        searches[p].expansions += 1
    items = [Item(p, searches[p].tree.prefix(leaf)) for p, leaf in leaves]
    rows = propose_rows(policy, items, cfg.expand_width, round_seed(cfg.seed, round_index), ledgers)
    new = []
    for (p, leaf), row in zip(leaves, rows):
        search, steps = searches[p], _distinct(row)
        if not steps:
            search.closed.add(leaf)
        priors = sibling_priors([step_prior_logit(s) for s in steps])
        for step, prior in zip(steps, priors):
            child = search.tree.add(leaf, step, prior=prior)
            if step.is_terminal or search.tree.nodes[child].depth >= cfg.max_depth:
                search.closed.add(child)
            new.append((p, child))
    return new


def evaluate(
    searches: list[_ProblemSearch], new: list[tuple[int, int]], policy: Policy, scorer: Scorer,
    cfg: MCTSConfig, round_index: int, ledgers: list[Ledger],
) -> None:
    """Score every new node's path (completed by one rollout when cfg.rollout) in one scorer call;
    set node.score and the node's evaluation value."""
    items = [Item(p, searches[p].tree.prefix(node)) for p, node in new]
    scored = list(items)
    if cfg.rollout:
        open_ = [i for i, item in enumerate(items) if not item.prefix.is_terminal]
        rows = rollout_rows(policy, [items[i] for i in open_], round_seed(cfg.seed, round_index, 1), ledgers)
        for i, steps in zip(open_, rows):
            path = items[i].prefix
            scored[i] = Item(items[i].problem, Prefix(path.problem, path.steps + tuple(steps)))
    scores = score_rows(scorer, scored, ledgers)
    for (p, node), item, path, row in zip(new, items, scored, scores):
        depth = len(item.prefix.steps)
        searches[p].tree.nodes[node].score = row[depth - 1]
        searches[p].path_scores[node] = tuple(row[:depth])
        searches[p].evals[node] = aggregate(row, cfg.aggregation)
        if len(path.prefix.steps) > depth:  # completed by a rollout: kept in case the leaf is a candidate
            searches[p].rollouts[node] = (path.prefix.steps[depth:], tuple(row))


def _backup_value(search: _ProblemSearch, node_id: int, value: float, how: str) -> None:
    """One visit with `value` on node_id and every ancestor."""
    for nid in _ancestry(search.tree, node_id):
        node = search.tree.nodes[nid]
        node.visits += 1
        if how == "mean":
            search.value_sums[nid] = search.value_sums.get(nid, 0.0) + value
            node.value = search.value_sums[nid] / node.visits
        else:
            node.value = value if node.visits == 1 else max(node.value, value)


def backup(search: _ProblemSearch, leaves: list[int], cfg: MCTSConfig) -> None:
    """Back up this round's simulations: an expanded leaf backs up each new child's value; a
    closed leaf (or one that just proved a dead end) backs up its own value."""
    for leaf in leaves:
        children = search.tree.nodes[leaf].children
        if children:  # only leaves expanded this round have children
            for child in children:
                _backup_value(search, child, search.evals[child], cfg.backup)
        else:
            _backup_value(search, leaf, search.evals.get(leaf, 0.0), cfg.backup)
    search.pending.clear()
    search.simulations += len(leaves)


def _within_budget(search: _ProblemSearch, ledger: Ledger, cfg: MCTSConfig) -> bool:
    if search.simulations >= cfg.iterations or ROOT_ID in search.closed:
        return False
    return cfg.token_budget is None or ledger.tokens_generated < cfg.token_budget


def _candidates(search: _ProblemSearch, cfg: MCTSConfig) -> list[tuple[Candidate, int]]:
    """(candidate, the node that ranks it): the closed leaves, or else the open leaves, each
    completed by its rollout if it has one (module docstring; a leaf closed at max_depth kept its
    paid-for rollout out of the candidates too)."""
    leaves = search.tree.leaves()
    finished = [n for n in leaves if n in search.closed]
    return [(_completed(search, n, cfg), n) for n in finished or leaves]


def _completed(search: _ProblemSearch, leaf: int, cfg: MCTSConfig) -> Candidate:
    """The candidate of an open leaf: its path, continued by its rollout's steps (added to the
    tree under it, with their scores) when it was rolled out."""
    if leaf not in search.rollouts:
        return make_candidate(search.tree, leaf, search.path_scores[leaf], cfg.aggregation)
    steps, row = search.rollouts[leaf]
    end = leaf
    for step, score in zip(steps, row[len(row) - len(steps):]):
        end = search.tree.add(end, step, score=score)
    return make_candidate(search.tree, end, row, cfg.aggregation)


def _choose(ranked: list[tuple[Candidate, int]], tree: Tree, final: str) -> int | None:
    nodes = [tree.nodes[node_id] for _, node_id in ranked]
    if final == "visits":
        return argmax_first([(n.visits, n.value) for n in nodes])  # type: ignore[arg-type]
    return argmax_first([n.value for n in nodes])


def mcts(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: MCTSConfig, on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """MCTS over every problem at once (module docstring); on_round: see `RoundHook`."""
    problems = search_inputs("mcts", problems, cfg, MCTSConfig, policy, scorer, on_round)
    start = time.perf_counter()
    searches = [_ProblemSearch(Tree(p)) for p in problems]
    ledgers = [Ledger() for _ in problems]
    for round_index in count():
        active = [i for i, s in enumerate(searches) if _within_budget(s, ledgers[i], cfg)]
        if not active:  # every round adds >= 1 simulation per active problem, so this is reached
            break
        selected = {i: select(searches[i], cfg, leaves_within_budget(ledgers[i], searches[i].expansions, cfg)) for i in active}
        new = expand(searches, selected, policy, cfg, round_index, ledgers)
        evaluate(searches, new, policy, scorer, cfg, round_index, ledgers)
        for i, leaves in selected.items():
            backup(searches[i], leaves, cfg)
        if on_round is not None:
            on_round([s.tree for s in searches])
    wall = (time.perf_counter() - start) / max(len(problems), 1)
    results = []
    for problem, search, ledger in zip(problems, searches, ledgers):
        ranked = _candidates(search, cfg)
        results.append(SearchResult(problem, "mcts", asdict(cfg), tuple(c for c, _ in ranked),
                                    _choose(ranked, search.tree, cfg.final), search.tree,
                                    ledger.compute(policy, scorer, wall)))
    return results
