"""The frontier of a step-level search: batched policy / scorer calls over the prefixes of MANY
problems at once, with each call's cost attributed to the problems it served.

Beam search, DVTS and MCTS all run in rounds; in each round every prefix of every problem that
needs a step goes to the policy in ONE call and every path that needs a score goes to the scorer
in ONE call (DESIGN.md section 6.4: search-and-learn's one-problem-at-a-time beam search is the
anti-pattern). A `Ledger` per problem records every step generated for it (pruned, duplicate,
lookahead and rollout steps included), the policy calls that included it and its scorer tokens,
so `Compute` is exactly what best_of_n reports for the same work.

    ledgers = [Ledger() for _ in problems]
    items = [Item(i, Prefix(p)) for i, p in enumerate(problems)]
    rows = propose_rows(policy, items, n=4, seed=round_seed(cfg.seed, 0), ledgers=ledgers)
    paths = [Item(i, item.prefix.extend(row[0])) for i, (item, row) in enumerate(zip(items, rows))]
    scores = score_rows(scorer, paths, ledgers)
    ledgers[0].compute(policy, scorer, wall_time_s=0.1)

Run the tests that pin it: `.venv/bin/pytest tests/test_beam_search.py tests/test_mcts.py`.
"""
from __future__ import annotations

import hashlib
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from treesearch.aggregation import aggregate
from treesearch.compute import Compute, step_compute
from treesearch.protocols import Policy, Scorer, WidthPolicy
from treesearch.records import Prefix, Problem, Step
from treesearch.result import Candidate, SearchResult, argmax_first
from treesearch.tree import Tree


@dataclass(frozen=True)
class Item:
    """One row of a batched call. problem: index of its problem in the search call's problem list;
    prefix: the partial path to extend or score."""

    problem: int
    prefix: Prefix


@dataclass
class Ledger:
    """What one problem's search has cost so far (mutable while that one search call runs).

    steps: every step the policy generated for this problem, each once.
    policy_calls: policy calls (propose / rollout) that included at least one of its prefixes.
    scorer_tokens: sum of `scorer.cost` over the paths of this problem that were scored.
    tokens_generated: running sum of the steps' tokens (read by token budgets).
    """

    steps: list[Step] = field(default_factory=list)
    policy_calls: int = 0
    scorer_tokens: int = 0
    tokens_generated: int = 0

    def add_steps(self, steps: Sequence[Step]) -> None:
        self.steps.extend(steps)
        self.tokens_generated += sum(s.num_tokens for s in steps)

    def compute(self, policy: Policy, scorer: Scorer, wall_time_s: float) -> Compute:
        """The problem's `Compute`, counted as best_of_n counts it."""
        base = step_compute(self.steps, policy.num_parameters, self.scorer_tokens,
                            getattr(scorer, "num_parameters", 0))
        return base + Compute(policy_calls=self.policy_calls, wall_time_s=wall_time_s)


def round_seed(seed: int, round_index: int, phase: int = 0) -> int:
    """A policy-call seed from the config seed, the round and the call's phase within the round
    (0: expansion, 1..: lookahead or rollout), so same seed -> same tree. Hashed rather than
    summed so that (seed, round) pairs never collide; 32 bits fit every RNG a backend may use."""
    digest = hashlib.blake2b(f"{seed}|{round_index}|{phase}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _charge_calls(items: Sequence[Item], ledgers: list[Ledger]) -> None:
    for problem in {item.problem for item in items}:
        ledgers[problem].policy_calls += 1


def propose_rows(
    policy: Policy, items: Sequence[Item], n: int, seed: int, ledgers: list[Ledger]
) -> list[list[Step]]:
    """One `policy.propose` call for all items (none when items is empty); rows in item order.
    A row may be shorter than n (even empty): the strategies treat that as fewer children."""
    if not items:
        return []
    rows = policy.propose([item.prefix for item in items], n=n, seed=seed)
    return _charged_rows(items, rows, [n] * len(items), "propose", ledgers)


def propose_width_rows(
    policy: WidthPolicy, items: Sequence[Item], widths: Sequence[int], seed: int, ledgers: list[Ledger]
) -> list[list[Step]]:
    """One `policy.propose_widths` call for all items, widths[i] steps after items[i] (none when
    items is empty); rows in item order, charged as `propose_rows` charges them."""
    if not items:
        return []
    rows = policy.propose_widths([item.prefix for item in items], widths=list(widths), seed=seed)
    return _charged_rows(items, rows, widths, "propose_widths", ledgers)


def _charged_rows(
    items: Sequence[Item], rows: Sequence[Sequence[Step]], widths: Sequence[int], method: str, ledgers: list[Ledger],
) -> list[list[Step]]:
    """A propose call's rows, checked (one per item, at most its width) and charged to their
    problems' ledgers."""
    check_rows(rows, widths, method)
    _charge_calls(items, ledgers)
    for item, row in zip(items, rows):
        ledgers[item.problem].add_steps(row)
    return [list(row) for row in rows]


def rollout_rows(
    policy: Policy, items: Sequence[Item], seed: int, ledgers: list[Ledger]
) -> list[list[Step]]:
    """One `policy.rollout` call (n=1) for all items; row i is the steps that complete item i
    (empty when the policy returned no completion)."""
    if not items:
        return []
    rows = policy.rollout([item.prefix for item in items], n=1, seed=seed)
    check_rows(rows, [1] * len(items), "rollout", completions=True)
    _charge_calls(items, ledgers)
    out = []
    for item, completions in zip(items, rows):
        steps = list(completions[0]) if completions else []
        ledgers[item.problem].add_steps(steps)
        out.append(steps)
    return out


def score_rows(scorer: Scorer, items: Sequence[Item], ledgers: list[Ledger]) -> list[list[float]]:
    """One `scorer.score` call for all items; each problem is charged `scorer.cost` of its own
    paths (computed per problem so a length-dependent cost is attributed exactly)."""
    if not items:
        return []
    paths = [item.prefix for item in items]
    scores = checked_scores(paths, scorer.score(paths))
    by_problem: dict[int, list[Prefix]] = {}
    for item in items:
        by_problem.setdefault(item.problem, []).append(item.prefix)
    for problem, mine in by_problem.items():
        ledgers[problem].scorer_tokens += scorer_cost(scorer, mine)
    return scores


def scorer_cost(scorer: Scorer, paths: Sequence[Prefix]) -> int:
    """scorer.cost(paths), checked: ValueError unless it is an integer >= 0 (None, a float or a
    negative count made scorer_tokens and flops wrong, or failed after the whole search)."""
    cost = scorer.cost(paths)
    if isinstance(cost, bool) or not isinstance(cost, numbers.Integral) or cost < 0:
        raise ValueError(f"scorer.cost returned {cost!r}; it must be the tokens the scorer ran, an integer >= 0 "
                         f"({type(scorer).__name__})")
    return int(cost)


def checked_scores(paths: Sequence[Prefix], scores: Any) -> list[list[float]]:
    """The scorer's rows as lists of Python floats (a numpy array or a tensor of scores is taken;
    stored as such, it made results that JSON cannot hold); ValueError unless the scorer gave one
    row per path, one score per step, each a number in [0, 1] (the `Scorer` protocol: a logit or
    a NaN would rank paths by nothing, silently)."""
    if not _is_list(scores):
        raise ValueError(f"scorer returned {type(scores).__name__}, expected a list with one row of step scores per path")
    if len(scores) != len(paths):
        raise ValueError(f"scorer returned {len(scores)} score rows for {len(paths)} paths")
    out = []
    for path, row in zip(paths, scores):
        if not _is_list(row):
            raise ValueError(f"scorer returned {type(row).__name__} as a score row, expected a list of step scores")
        if len(row) != len(path.steps):
            raise ValueError(f"scorer returned {len(row)} scores for a path of {len(path.steps)} steps")
        floats = [float(value) if _is_unit_score(value) else _bad_score(path, j, value) for j, value in enumerate(row)]
        out.append(floats)
    return out


def _bad_score(path: Prefix, j: int, value: Any) -> float:
    raise ValueError(
        f"scorer returned step score {value!r} for step {j} of a path of problem "
        f"{path.problem.id!r}; a step score must be a number in [0, 1]"
    )


def _is_unit_score(value: Any) -> bool:
    """A number in [0, 1]: NaN fails both comparisons, a string cannot be compared."""
    try:
        return bool(0.0 <= value <= 1.0)
    except TypeError:
        return False


def check_rows(rows: Any, widths: Sequence[int], method: str, completions: bool = False) -> None:
    """ValueError naming the policy method unless it returned a list with one row per prefix, row
    i holding at most widths[i] samples (fewer is allowed: fewer children), each a `Step`
    (completions: each a list of Steps, as `rollout` returns them). A policy returning None, a
    generator, strings or more samples than asked (its own fixed n: every strategy's budget and
    compute silently grew) is named here rather than failing deep inside a strategy."""
    if not _is_list(rows):
        raise ValueError(f"policy.{method} returned {type(rows).__name__}, expected a list with one row per prefix")
    if len(rows) != len(widths):
        raise ValueError(f"policy.{method} returned {len(rows)} rows for {len(widths)} prefixes")
    for i, (row, width) in enumerate(zip(rows, widths)):
        if not _is_list(row):
            raise ValueError(f"policy.{method} returned {type(row).__name__} as row {i}, expected a list of "
                             f"{'completions (lists of Steps)' if completions else 'Steps'}")
        if len(row) > width:
            raise ValueError(f"policy.{method} returned {len(row)} samples for prefix {i}, asked for {width}")
        for sample in row:
            if completions and not _is_list(sample):
                raise ValueError(f"policy.{method} returned {type(sample).__name__} as a completion in row {i}, "
                                 "expected a list of Steps")
            for step in sample if completions else (sample,):
                if not isinstance(step, Step):
                    raise ValueError(f"policy.{method} returned {type(step).__name__} in row {i}, expected "
                                     "treesearch.records.Step")
            if completions:
                check_completion(sample, i, method)


def check_completion(steps: Sequence[Step], row: int, method: str) -> None:
    """ValueError naming the policy method unless a completion (the `Policy.rollout` contract)
    holds at least one step, its last one terminal (eos / length) and every other one ended on
    the separator: an empty one became a candidate at the tree's root, and a separator at the
    end or an eos in the middle a candidate that is not a finished path."""
    if not steps:
        raise ValueError(f"policy.{method} returned a completion with no steps in row {row}: a completion "
                         "ends with a terminal step (finish eos or length)")
    if not steps[-1].is_terminal:
        raise ValueError(f"policy.{method} returned a completion in row {row} whose last step has finish "
                         f"{steps[-1].finish!r}: a completion ends with a terminal step (eos or length)")
    early = next((j for j, step in enumerate(steps[:-1]) if step.is_terminal), None)
    if early is not None:
        raise ValueError(f"policy.{method} returned a completion in row {row} with a terminal step "
                         f"({steps[early].finish!r}) at {early} of {len(steps)}: only its last step may end it")


def _is_list(value: Any) -> bool:
    """A sized, indexable row: a list, a tuple, a numpy array or tensor of scores (not a string,
    a mapping, a generator, None)."""
    return hasattr(value, "__len__") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes, Mapping))


@dataclass(frozen=True)
class Expansion:
    """A node to sample in a round. problem: index of its problem; node: its id in that problem's
    tree; width: how many children to sample."""

    problem: int
    node: int
    width: int


@dataclass(frozen=True)
class Child:
    """A step generated in a round, added to its problem's tree and scored.

    problem: index of its problem; node: its node id; step_scores: the scorer's scores of its
    path's steps; reward: their aggregation by the strategy's `reward` setting; terminal: its
    step ended the sequence (finish "eos" or "length").
    """

    problem: int
    node: int
    step_scores: tuple[float, ...]
    reward: float
    terminal: bool


def grow_nodes(
    parents: Sequence[Expansion], trees: list[Tree], policy: Policy, scorer: Scorer,
    ledgers: list[Ledger], seed: int, round_index: int, reward: str,
) -> list[list[Child]]:
    """Sample each parent node `width` times: with a `WidthPolicy` (the three backends) one
    `propose_widths` call, seeded `round_seed(seed, round_index)`; with any other policy one
    `propose(n=width)` call per distinct width, in increasing width, seeded `round_seed(seed,
    round_index, width)`. The children join their trees in parent order whatever the grouping, all
    their paths are scored in one call, and each child node gets score = its step's score, value =
    the `reward` aggregation of its path. Returns each parent's children (fewer than width when
    the policy returned fewer steps). REBASE's widths and particle filtering's draws use it."""
    items = [Item(p.problem, trees[p.problem].prefix(p.node)) for p in parents]
    if isinstance(policy, WidthPolicy):
        rows = propose_width_rows(policy, items, [p.width for p in parents], round_seed(seed, round_index), ledgers)
    else:
        rows = _propose_by_width(policy, items, [p.width for p in parents], seed, round_index, ledgers)
    added = [(entry, trees[p.problem].add(p.node, step)) for entry, (p, row) in enumerate(zip(parents, rows)) for step in row]
    paths = [Item(parents[entry].problem, trees[parents[entry].problem].prefix(node)) for entry, node in added]
    grown: list[list[Child]] = [[] for _ in parents]
    for (entry, node), path, row in zip(added, paths, score_rows(scorer, paths, ledgers)):
        value = aggregate(row, reward)
        tree_node = trees[path.problem].nodes[node]
        tree_node.score, tree_node.value = row[-1], value
        grown[entry].append(Child(path.problem, node, tuple(row), value, path.prefix.is_terminal))
    return grown


def _propose_by_width(
    policy: Policy, items: Sequence[Item], widths: Sequence[int], seed: int, round_index: int, ledgers: list[Ledger]
) -> list[list[Step]]:
    """`grow_nodes`'s rows from a policy without `propose_widths`: one propose call per width."""
    rows: list[list[Step]] = [[] for _ in items]
    for width in sorted(set(widths)):
        chosen = [i for i, w in enumerate(widths) if w == width]
        sampled = propose_rows(policy, [items[i] for i in chosen], width, round_seed(seed, round_index, width), ledgers)
        for i, row in zip(chosen, sampled):
            rows[i] = row
    return rows


def make_candidate(tree: Tree, node_id: int, step_scores: Sequence[float], aggregation: str) -> Candidate:
    """The candidate ending at node_id, ranked by the aggregation of its own step scores."""
    scores = tuple(float(s) for s in step_scores)
    return Candidate(tree.path(node_id), scores, aggregate(scores, aggregation), node_id)



def ranked_results(
    strategy: str, problems: Sequence[Problem], cfg: Any, trees: Sequence[Tree],
    candidates: Sequence[Sequence[Candidate]], ledgers: Sequence[Ledger], policy: Policy,
    scorer: Scorer, start: float,
) -> list[SearchResult]:
    """One SearchResult per problem choosing the best-scored candidate (first on ties), with the
    call's wall time since `start` (time.perf_counter) split evenly over the problems."""
    wall = (time.perf_counter() - start) / max(len(problems), 1)
    return [
        SearchResult(problem, strategy, asdict(cfg), tuple(cands),
                     argmax_first([c.score for c in cands]), tree, ledger.compute(policy, scorer, wall))
        for problem, tree, cands, ledger in zip(problems, trees, candidates, ledgers)
    ]
