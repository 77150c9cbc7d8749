"""Step-level beam search (search-and-learn's `beam_search`), batched across problems.

N paths per problem, beam width M: the root is sampled N times; the N/M best unfinished
children by aggregated path score become the beams; every later round samples M next steps for
each beam (N paths while N/M beams are left) and keeps the N/M best unfinished ones. Beams whose
children all finished are not refilled (search-and-learn repeats its active beams back up to N
paths), so a round samples fewer paths once candidates have left. A child whose step is terminal
(finish "eos" or "length") leaves the beam and becomes a candidate. A problem stops when it has N
candidates, when no beam is left, or at max_depth, where the beams that survive the last
selection become candidates as they stand (their last step keeps its finish, "separator").
Every finished child of a round is kept, so a problem can end with up to 2N - 1 candidates
(N = 4, M = 2: three root samples finish, the one beam left adds two: 5; N = M = 8: seven root
samples finish, the one beam left adds eight: 15), each one paid for in compute; the choice
is the best of them all, and only the all-candidates metrics (maj / wmaj / pass over
`candidates`) see the extra ones. search-and-learn cuts its finished beams back to N: the first N
to finish by default, the N best by score with its `sort_completed`.

Defaults that differ from search-and-learn's: paths are ranked by the geometric mean of their
step scores (`aggregation`, MetaStone-S1's path score; search-and-learn's `agg_strategy` is
"last") and lookahead is 0 (its default is 1, which there ranks nothing: see lookahead below);
`aggregation="last"` ranks as it does.

Batching (unlike search-and-learn, which runs one problem at a time): each round sends the beams
of ALL problems to `policy.propose` in one call and all new paths to `scorer.score` in one call;
lookahead k adds k more calls per round, each batched the same way.

Options:
- dedup: among one problem's unfinished children, keep only the first of each identical path
  text before choosing beams (as search-and-learn's `filter_duplicates`); duplicates stay in the
  tree and in compute, they were generated. When fewer distinct paths than beams are left, the
  distinct ones are repeated up to the beams the round would have kept without dedup (as
  search-and-learn repeats its active beams), so dedup does not shrink the next round's samples
  (it did: 0.61x Best-of-N's tokens at the same N on arith).
- lookahead k: before scoring, each unfinished child is extended by up to k more steps, one
  sample each (`propose(n=1)`), and the child is ranked by the aggregated score of that longer
  path (its step scores are read from it: the same as its own path's for a causal scorer, such
  as SPRM, confidence or a PRM; an outcome oracle scores them by the lookahead's ending); the
  lookahead steps are counted in compute but are not tree nodes. The last round (max_depth) has no
  lookahead, as search-and-learn's last iteration, nor has a round's problem whose finished
  children fill its N candidates (its unfinished children are dropped). This is what search-and-learn's
  DVTS does; its beam search generates the lookahead but scores the beam's path without it, so
  there lookahead never changes which beams survive. They are sampled at
  lookahead_temperature, 0 (greedy) by default as in search-and-learn, by
  `policy.with_temperature` (a `TemperaturePolicy`: the three backends; another policy is a
  ValueError naming the setting); lookahead_temperature=None samples them at the policy's own
  temperature.

Node fields set: score (the scorer's score of the node's step), value (the aggregated path score
that ranked it, lookahead included). Ties go to the earlier-generated child.

Compute (`treesearch.frontier.Ledger`): every step generated for a problem (pruned, duplicate and
lookahead steps included), the policy calls that included it, the scorer cost of its paths, and
the call's wall time split evenly over the problems, as best_of_n counts.

    results = beam_search(problems, policy, scorer, BeamSearchConfig(n=8, beam_width=4, max_depth=20))

Tests: `.venv/bin/pytest tests/test_beam_search.py`.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from treesearch.aggregation import aggregate
from treesearch.config_checks import check_aggregation_setting, check_finite, check_int, search_inputs
from treesearch.frontier import Item, Ledger, make_candidate, propose_rows, ranked_results, round_seed, score_rows
from treesearch.protocols import Policy, RoundHook, Scorer, TemperaturePolicy
from treesearch.records import Problem
from treesearch.result import Candidate, SearchResult
from treesearch.tree import ROOT_ID, Tree


def check_beam_shape(owner: str, n: int, beam_width: int, max_depth: int) -> None:
    """Validate the (n, beam_width, max_depth) triple shared by beam search and DVTS."""
    check_int(owner, "n", n, minimum=1)
    check_int(owner, "beam_width", beam_width, minimum=1)
    if beam_width > n:
        raise ValueError(f"{owner}.beam_width={beam_width} must be <= n={n} (n is the budget N; in "
                         "experiments.search: raise budget= or lower search.beam_width=)")
    if n % beam_width:
        raise ValueError(f"{owner}.n={n} must be divisible by beam_width={beam_width} (n is the budget N; in "
                         "experiments.search: pick budget= and search.beam_width= to match)")
    check_int(owner, "max_depth", max_depth, minimum=1)


@dataclass(frozen=True)
class BeamSearchConfig:
    """n: candidates per problem (N); beam_width: samples per beam per round (M), N/M beams are
    kept; max_depth: most steps in a path; aggregation: step scores -> path score; dedup: drop
    duplicate path texts before choosing beams; lookahead: extra steps sampled to score a child;
    lookahead_temperature: their sampling temperature (0: greedy; None: the policy's own);
    seed: base of the per-round policy seeds."""

    n: int = 8
    beam_width: int = 4
    max_depth: int = 40
    aggregation: str = "geometric_mean"
    dedup: bool = False
    lookahead: int = 0
    lookahead_temperature: float | None = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_beam_shape("BeamSearchConfig", self.n, self.beam_width, self.max_depth)
        check_aggregation_setting("BeamSearchConfig", "aggregation", self.aggregation)
        if not isinstance(self.dedup, bool):
            raise ValueError(f"BeamSearchConfig.dedup={self.dedup!r} must be a bool")
        check_lookahead("BeamSearchConfig", self.lookahead, self.lookahead_temperature)
        check_int("BeamSearchConfig", "seed", self.seed)


@dataclass(frozen=True)
class Beam:
    """A path being extended. problem: index of its problem; node: its last node in that
    problem's tree; subtree: which DVTS subtree it belongs to (0 for beam search)."""

    problem: int
    node: int
    subtree: int = 0


@dataclass(frozen=True)
class ScoredChild:
    """A step generated this round, added to its tree and scored.

    problem: index of its problem; beam: index of the beam it extends in the round's beam list;
    sample: its index among that beam's samples; node: its node id; step_scores: the scorer's
    scores of the path's own steps; rank: the aggregated score that ranks it (lookahead steps
    included); terminal: its step ended the sequence.
    """

    problem: int
    beam: int
    sample: int
    node: int
    step_scores: tuple[float, ...]
    rank: float
    terminal: bool


def expand_beams(
    beams: Sequence[Beam], trees: list[Tree], policy: Policy, scorer: Scorer, ledgers: list[Ledger],
    *, n: int, lookahead: int, aggregation: str, seed: int, round_index: int,
    lookahead_policy: Policy | None = None, room: Sequence[int] | None = None,
) -> list[ScoredChild]:
    """One round: sample n steps after every beam (one policy call), add them to the trees,
    extend them by `lookahead` steps (sampled by lookahead_policy, default the policy), score all
    paths (one scorer call). Children in beam order. room: per problem, the candidates it still
    takes (beam search stops a problem at N): a problem whose finished children this round fill
    it keeps none of its unfinished ones, so they get no lookahead steps."""
    items = [Item(b.problem, trees[b.problem].prefix(b.node)) for b in beams]
    rows = propose_rows(policy, items, n, round_seed(seed, round_index), ledgers)
    added = [(bi, j, trees[beam.problem].add(beam.node, step))
             for bi, (beam, row) in enumerate(zip(beams, rows)) for j, step in enumerate(row)]
    paths = [Item(beams[bi].problem, trees[beams[bi].problem].prefix(node)) for bi, _, node in added]
    scored = list(paths)
    if lookahead:
        finished = Counter(p.problem for p in paths if p.prefix.is_terminal)
        kept = [i for i, p in enumerate(paths) if room is None or finished[p.problem] < room[p.problem]]
        extended = extend_by_lookahead(lookahead_policy or policy, [paths[i] for i in kept], lookahead, seed,
                                       round_index, ledgers)
        for i, item in zip(kept, extended):
            scored[i] = item
    scores = score_rows(scorer, scored, ledgers)
    children = []
    for (bi, j, node), path, row in zip(added, paths, scores):
        depth = len(path.prefix.steps)
        rank = aggregate(row, aggregation)
        tree_node = trees[path.problem].nodes[node]
        tree_node.score, tree_node.value = row[depth - 1], rank
        children.append(ScoredChild(path.problem, bi, j, node, tuple(row[:depth]), rank,
                                    path.prefix.is_terminal))
    return children


def extend_by_lookahead(
    policy: Policy, items: list[Item], k: int, seed: int, round_index: int, ledgers: list[Ledger]
) -> list[Item]:
    """Each unfinished path extended by up to k single-sample steps (one batched call per step);
    a path stops early when it ends or the policy returns nothing for it."""
    paths = list(items)
    stalled: set[int] = set()
    for step_index in range(k):
        open_ = [i for i, it in enumerate(paths) if not it.prefix.is_terminal and i not in stalled]
        rows = propose_rows(policy, [paths[i] for i in open_], 1,
                            round_seed(seed, round_index, 1 + step_index), ledgers)
        for i, row in zip(open_, rows):
            if row:
                paths[i] = Item(paths[i].problem, paths[i].prefix.extend(row[0]))
            else:
                stalled.add(i)
    return paths


def check_lookahead(owner: str, lookahead: int, temperature: float | None) -> None:
    """Validate a config's lookahead (an integer >= 0) and lookahead_temperature (None or a finite
    number >= 0), shared by beam search and DVTS."""
    check_int(owner, "lookahead", lookahead, minimum=0)
    if temperature is not None:
        check_finite(owner, "lookahead_temperature", temperature, minimum=0.0)


def lookahead_policy_of(policy: Policy, owner: str, lookahead: int, temperature: float | None) -> Policy:
    """The policy that samples the lookahead steps of a beam search or DVTS config (owner: its
    name, for errors): `policy.with_temperature(temperature)`, or the policy itself when there
    is no lookahead or temperature is None; a ValueError naming the setting when the policy
    cannot change its temperature."""
    if lookahead == 0 or temperature is None:
        return policy
    if not isinstance(policy, TemperaturePolicy):
        raise ValueError(
            f"{owner}.lookahead_temperature={temperature!r} needs a policy with "
            f"with_temperature (treesearch.protocols.TemperaturePolicy; the three backends have it), and a "
            f"{type(policy).__name__} has none: set lookahead_temperature=None (Hydra: "
            f"search.lookahead_temperature=null) to sample the lookahead steps at the policy's own temperature"
        )
    return policy.with_temperature(temperature)


def top_by_rank(children: list[ScoredChild], k: int) -> list[ScoredChild]:
    """The k best children by rank (earlier child on ties), returned in generation order."""
    order = sorted(range(len(children)), key=lambda i: -children[i].rank)[:k]
    return [children[i] for i in sorted(order)]


def _unique_paths(children: list[ScoredChild], tree: Tree) -> list[ScoredChild]:
    seen: set[str] = set()
    out = []
    for child in children:
        text = tree.prefix(child.node).text
        if text not in seen:
            seen.add(text)
            out.append(child)
    return out


def _select_beams(
    children: list[ScoredChild], trees: list[Tree], candidates: list[list[Candidate]],
    cfg: BeamSearchConfig, last_round: bool,
) -> list[Beam]:
    """Finished children -> candidates; the N/M best unfinished ones per problem -> next beams
    (or, in the last round, -> candidates cut by max_depth)."""
    by_problem: dict[int, list[ScoredChild]] = {}
    for child in children:
        by_problem.setdefault(child.problem, []).append(child)
    beams = []
    for problem, kids in by_problem.items():
        tree, mine = trees[problem], candidates[problem]
        mine.extend(make_candidate(tree, c.node, c.step_scores, cfg.aggregation) for c in kids if c.terminal)
        alive = [c for c in kids if not c.terminal]
        width = cfg.n // cfg.beam_width
        kept = top_by_rank(_unique_paths(alive, tree) if cfg.dedup else alive, width)
        if last_round:
            mine.extend(make_candidate(tree, c.node, c.step_scores, cfg.aggregation) for c in kept)
        elif len(mine) < cfg.n:
            beams.extend(Beam(problem, c.node) for c in repeated(kept, min(width, len(alive))))
    return beams


def repeated(kept: list[ScoredChild], count: int) -> list[ScoredChild]:
    """kept repeated in order up to count (the beams dedup left, back up to the beams the round
    keeps without it); kept itself when it is that long already, or empty."""
    if not kept or len(kept) >= count:
        return kept
    return (kept * -(-count // len(kept)))[:count]


def beam_search(
    problems: Sequence[Problem], policy: Policy, scorer: Scorer, cfg: BeamSearchConfig,
    on_round: RoundHook | None = None,
) -> list[SearchResult]:
    """Beam search over every problem at once (module docstring); on_round: see `RoundHook`."""
    problems = search_inputs("beam_search", problems, cfg, BeamSearchConfig, policy, scorer, on_round)
    start = time.perf_counter()
    trees = [Tree(p) for p in problems]
    ledgers = [Ledger() for _ in problems]
    candidates: list[list[Candidate]] = [[] for _ in problems]
    beams = [Beam(i, ROOT_ID) for i in range(len(problems))]
    lookahead_policy = lookahead_policy_of(policy, "BeamSearchConfig", cfg.lookahead, cfg.lookahead_temperature)
    for depth in range(1, cfg.max_depth + 1):
        if not beams:
            break
        # the first round samples the root N times; later rounds sample each of the N/M beams M times;
        # the last one ranks its cut paths without lookahead, as search-and-learn's last iteration
        children = expand_beams(beams, trees, policy, scorer, ledgers,
                                n=cfg.n if depth == 1 else cfg.beam_width,
                                lookahead=cfg.lookahead if depth < cfg.max_depth else 0,
                                aggregation=cfg.aggregation, seed=cfg.seed, round_index=depth - 1,
                                lookahead_policy=lookahead_policy, room=[cfg.n - len(c) for c in candidates])
        beams = _select_beams(children, trees, candidates, cfg, last_round=depth == cfg.max_depth)
        if on_round is not None:
            on_round(trees)
    return ranked_results("beam_search", problems, cfg, trees, candidates, ledgers, policy, scorer, start)
