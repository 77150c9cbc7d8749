"""Scripted step-tree fakes for the step-level strategies (beam search, DVTS, MCTS).

A problem carries its own step tree in `meta`:
    meta["children"]: path key -> child step names; the key of a path is its step names joined by
        "/" ("" for the root). A name ending in "$" is a terminal step (finish "eos"), any other
        name ends on the separator. A path with no entry has no children (the policy returns []).
    meta["scores"]:   step name -> the step's score (ScriptedScorer; 0.5 when absent).
    meta["logprobs"]: step name -> the per-token log-prob of each of its tokens (-1.0 when absent).

A step's text is its name plus "/" for separator steps (so "a/b/c$" is a complete path), one fake
token per character, and tokens_forwarded = tokens + 1 (a made-up one-token prefill), so compute
can be counted by hand: "a/" is 2 tokens generated, 3 forwarded.

ScriptedPolicy.propose returns, for sample j, child j mod (number of children): deterministic,
so known-optimum tests do not depend on luck. With `random_draws=True` child j is drawn by a
seeded RNG from (problem id, path, seed, j) only, independent of batch composition, so
"same seed, same tree; another seed, another tree" can be pinned. `rollout` follows sample 0 to
the end. Both record every call in `calls` (a spy).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from treesearch.records import Prefix, Problem, Step


def step_named(name: str, logprob: float = -1.0) -> Step:
    terminal = name.endswith("$")
    text = name if terminal else name + "/"
    ids = tuple(ord(c) % 97 for c in text)
    return Step(text=text, token_ids=ids, token_logprobs=tuple(logprob for _ in ids),
                finish="eos" if terminal else "separator", tokens_forwarded=len(ids) + 1)


def name_of(step: Step) -> str:
    return step.text[:-1] if step.text.endswith("/") else step.text


def path_key(prefix: Prefix) -> str:
    return "/".join(name_of(s) for s in prefix.steps)


def scripted_problem(pid: str, children: Mapping[str, Sequence[str]], scores: Mapping[str, float],
                     logprobs: Mapping[str, float] | None = None, answer: str | None = None) -> Problem:
    meta = {"children": dict(children), "scores": dict(scores), "logprobs": dict(logprobs or {})}
    return Problem(id=pid, question=f"question {pid}", answer=answer, meta=meta)


@dataclass
class ScriptedPolicy:
    num_parameters: int = 100
    random_draws: bool = False
    calls: list[tuple[str, int, int, int]] = field(default_factory=list)  # (method, rows, n, seed)

    def _child(self, prefix: Prefix, j: int, seed: int) -> Step | None:
        names = prefix.problem.meta["children"].get(path_key(prefix), [])
        if not names:
            return None
        if self.random_draws:
            name = random.Random(f"{prefix.problem.id}|{path_key(prefix)}|{seed}|{j}").choice(list(names))
        else:
            name = names[j % len(names)]
        return step_named(name, prefix.problem.meta["logprobs"].get(name, -1.0))

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        self.calls.append(("propose", len(prefixes), n, seed))
        out = []
        for prefix in prefixes:
            row = [self._child(prefix, j, seed) for j in range(n)]
            out.append([s for s in row if s is not None])
        return out

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        self.calls.append(("rollout", len(prefixes), n, seed))
        out = []
        for prefix in prefixes:
            completions = []
            for j in range(n):
                path, steps = prefix, []
                while not path.is_terminal and len(steps) < 50:
                    step = self._child(path, 0, seed)
                    if step is None:
                        break
                    steps.append(step)
                    path = path.extend(step)
                completions.append(steps)
            out.append(completions)
        return out


@dataclass
class WidthScriptedPolicy(ScriptedPolicy):
    """ScriptedPolicy with `propose_widths` (a `WidthPolicy`): row i holds the first widths[i]
    children of prefixes[i], as propose(n=widths[i]) would; calls record the widths as a tuple."""

    def propose_widths(
        self, prefixes: Sequence[Prefix], widths: Sequence[int], seed: int, stop_at_step: bool = True
    ) -> list[list[Step]]:
        self.calls.append(("propose_widths", len(prefixes), tuple(widths), seed))
        rows = [[self._child(prefix, j, seed) for j in range(width)] for prefix, width in zip(prefixes, widths)]
        return [[s for s in row if s is not None] for row in rows]


@dataclass
class TemperatureScriptedPolicy(ScriptedPolicy):
    """ScriptedPolicy with `with_temperature` (a `TemperaturePolicy`): at temperature 0 every
    sample is a prefix's first scripted child (greedy). The policies it gives share `calls` and
    `temperatures` (the temperature of each call, a spy)."""

    temperature: float = 1.0
    temperatures: list[float] = field(default_factory=list)

    def with_temperature(self, temperature: float) -> "TemperatureScriptedPolicy":
        return replace(self, temperature=temperature)

    def _child(self, prefix: Prefix, j: int, seed: int) -> Step | None:
        return super()._child(prefix, 0 if self.temperature == 0 else j, seed)

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        self.temperatures.append(self.temperature)
        return super().propose(prefixes, n, seed, stop_at_step)


@dataclass
class ScriptedScorer:
    """Step score = meta["scores"][name] (0.5 if absent); cost = tokens_per_step per scored step."""

    tokens_per_step: int = 0
    calls: list[int] = field(default_factory=list)  # paths per call (a spy)

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        self.calls.append(len(paths))
        return [[p.problem.meta["scores"].get(name_of(s), 0.5) for s in p.steps] for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return self.tokens_per_step * sum(len(p.steps) for p in paths)


@dataclass
class EndlessPolicy:
    """A policy that never ends a sequence: every step is `text` with `finish` ("separator": the
    search must stop at max_depth; "length": every step is cut and terminal); `text=""` gives
    empty steps. With `rows_empty=True` it returns no steps at all."""

    text: str = ""
    finish: str = "separator"
    rows_empty: bool = False
    num_parameters: int = 10
    calls: list[tuple[str, int, int, int]] = field(default_factory=list)

    def _step(self) -> Step:
        ids = tuple(range(len(self.text)))
        lps = tuple(-0.5 for _ in ids)
        return Step(self.text, ids, lps, self.finish, tokens_forwarded=len(ids))  # type: ignore[arg-type]

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        self.calls.append(("propose", len(prefixes), n, seed))
        return [[] if self.rows_empty else [self._step() for _ in range(n)] for _ in prefixes]

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        self.calls.append(("rollout", len(prefixes), n, seed))
        return [[[] if self.rows_empty else [self._step()] for _ in range(n)] for _ in prefixes]


# The trap: the greedy first step "a" (0.9) leads only to bad ends; "b" (0.6) leads to the best
# leaf. Geometric-mean path scores: a/a1$ sqrt(.9*.1)=0.300, a/a2$ sqrt(.9*.2)=0.424,
# b/b1$ sqrt(.6*.95)=0.755 (the optimum), b/b2$ sqrt(.6*.3)=0.424.
TRAP_CHILDREN = {"": ["a", "b"], "a": ["a1$", "a2$"], "b": ["b1$", "b2$"]}
TRAP_SCORES = {"a": 0.9, "b": 0.6, "a1$": 0.1, "a2$": 0.2, "b1$": 0.95, "b2$": 0.3}



def trap_problem(pid: str = "trap", swapped: bool = False) -> Problem:
    """The trap; `swapped` lists "b" before "a" at the root (the optimum must not hang on order)."""
    children = dict(TRAP_CHILDREN, **({"": ["b", "a"]} if swapped else {}))
    return scripted_problem(pid, children, TRAP_SCORES, answer="b/b1$")
