"""Pins for the extension checks and search rules that a mutation review found unpinned.

What is pinned:
- beam search's `room` rule (`expand_beams`): a problem whose finished children this round
  exactly fill the candidates it still takes gets no lookahead call; one whose finished children
  are one short still gets its lookahead, which changes the beam kept;
- DVTS drops lookahead only in the max_depth round (rounds before it still look ahead);
- `experiments.search` checks what a user's strategy returns and what a user's task generates:
  more results than problems, a compute that is a dict, candidates=None, a candidate that is a
  dict, chosen=True, chosen == len(candidates), a problem whose id is an int, a task returning
  dicts: each a one-line ValueError naming the strategy or task module, nothing written to
  records.jsonl; a TUPLE of results is accepted;
- `experiments.outcomes`: `chosen_fault` refuses a bool and an index one past the end, and
  `record()` refuses chosen=-1 (the library path, without experiments.search's check);
- `treesearch.registry.register("")` is refused; `StepStopRule.from_tokenizer`'s default
  separator_match is "suffix"; `check_target_located` restores the "hydra.utils" logger level.

Scripted step trees (tests/step_tree_fakes.py) and the tiny checkpoint of
tests/test_search_resume.py; the user's strategy / task modules extend those of
tests/test_extension_errors.py (its `user_modules` folder and registry restore).

    .venv/bin/python -m pytest tests/test_extension_pins.py -q
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from omegaconf import OmegaConf

import test_extension_errors
import test_search_resume
from experiments.config_keys import check_target_located
from experiments.outcomes import chosen_fault, grade_result, record
from policies.step_stops import StepStopRule
from step_tree_fakes import ScriptedPolicy, ScriptedScorer, TemperatureScriptedPolicy, scripted_problem, trap_problem
from test_extension_errors import TINY, UNWRITTEN, first_ids, rows_of
from test_search_resume import run_in_process
from test_separator_match import DOTS, EOS, PAREN, SEP, TOK
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.dvts import DVTSConfig, dvts
from treesearch.registry import STRATEGIES, register

torch.set_num_threads(1)
ckpt = test_search_resume.ckpt  # its module fixture: a tiny policy checkpoint
user_modules = test_extension_errors.user_modules  # its module fixture: a folder on sys.path, registry restored

# -- beam search: the room rule of expand_beams -------------------------------------------------


def test_beam_search_finished_children_exactly_filling_the_room_get_no_lookahead_call():
    # N=4, M=2: round 1 finishes c$ d$ (room 2 left) and keeps beams a, b (one lookahead call);
    # round 2's a1$ a2$ fill that room exactly, so b1 b2 get no lookahead (they are dropped):
    # tokens: root a/ b/ c$ d$ (8) + lookahead a1$ b1/ (6) + a1$ a2$ b1/ b2/ (12) = 26, and no
    # fourth policy call (the lookahead y$ z$ would add 4 tokens)
    children = {"": ["a", "b", "c$", "d$"], "a": ["a1$", "a2$"], "b": ["b1", "b2"], "b/b1": ["y$"], "b/b2": ["z$"]}
    problem = scripted_problem("p", children, {"a": .9, "b": .8, "c$": .5, "d$": .5})
    policy = TemperatureScriptedPolicy()
    (result,) = beam_search([problem], policy, ScriptedScorer(),
                            BeamSearchConfig(n=4, beam_width=2, max_depth=10, lookahead=1))
    assert [c.text for c in result.candidates] == ["c$", "d$", "a/a1$", "a/a2$"]
    assert [call[1:3] for call in policy.calls] == [(1, 4), (2, 1), (2, 2)]  # expand, lookahead, expand
    assert result.compute.tokens_generated == 26


def test_beam_search_finished_children_one_short_of_the_room_still_look_ahead():
    # N=4, one beam (M=4): round 1 finishes c$ d$ (room 2) and keeps a; round 2 samples a1$ p q r:
    # one finished child, one short of the room, so p q r look ahead: p/x$ (0.05) sinks p (0.9)
    # under q/y$ (0.95) and the beam follows q. Without the lookahead p would win (a/p/x$).
    children = {"": ["a", "b", "c$", "d$"], "a": ["a1$", "p", "q", "r"], "a/p": ["x$"], "a/q": ["y$"]}
    scores = {"a": .9, "b": .1, "c$": .5, "d$": .5, "p": .9, "x$": .05, "q": .6, "y$": .95, "r": .1}
    policy = TemperatureScriptedPolicy()
    (result,) = beam_search([scripted_problem("p", children, scores)], policy, ScriptedScorer(),
                            BeamSearchConfig(n=4, beam_width=4, max_depth=10, lookahead=1))
    assert [c.text for c in result.candidates] == ["c$", "d$", "a/a1$"] + ["a/q/y$"] * 4
    assert result.chosen_text == "a/q/y$"
    assert policy.temperatures[:4] == [1.0, 0.0, 1.0, 0.0]  # round 2 has its greedy lookahead call


# -- DVTS: lookahead in every round but the last --------------------------------------------------


def test_dvts_looks_ahead_in_every_round_before_max_depth():
    # one subtree (N = M = 2), max_depth 3: round 2 (< 3) ranks s's children p, q by their
    # lookahead ends x$ (0.05) and y$ (0.95), so the subtree follows q; only round 3 has none
    children = {"": ["s"], "s": ["p", "q"], "s/p": ["x$"], "s/q": ["y$"]}
    scores = {"s": .8, "p": .9, "x$": .05, "q": .6, "y$": .95}
    policy = TemperatureScriptedPolicy()
    (result,) = dvts([scripted_problem("p", children, scores)], policy, ScriptedScorer(),
                     DVTSConfig(n=2, beam_width=2, max_depth=3, lookahead=1))
    assert result.chosen_text == "s/q/y$"
    assert [c.text for c in result.candidates] == ["s/q/y$", "s/q/y$"]
    assert policy.temperatures == [1.0, 0.0, 1.0, 0.0, 1.0]  # expand + lookahead twice, then the last expand
    assert result.compute.tokens_generated == 20


# -- experiments.search: what a user's strategy returns and a user's task generates ---------------

PIN_LABEL = r"strategy ext_pin \(ext_pin_strategy\.PinConfig\)"
PIN = ["search._target_=ext_pin_strategy.PinConfig", "~search.aggregation"]

# Best-of-N that breaks what it returns as `mode` says
PIN_STRATEGY = '''
import dataclasses
from dataclasses import dataclass
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.registry import register

@dataclass(frozen=True)
class PinConfig:
    n: int = 2
    seed: int = 0
    mode: str = "ok"

def pin_search(problems, policy, scorer, cfg, on_round=None):
    results = best_of_n(problems, policy, scorer, BestOfNConfig(n=cfg.n, seed=cfg.seed), on_round)
    results = [dataclasses.replace(r, strategy="ext_pin", config=dataclasses.asdict(cfg)) for r in results]
    return {
        "ok": lambda: results,
        "extra": lambda: results + results[:1],
        "tuple": lambda: tuple(results),
        "compute_dict": lambda: [dataclasses.replace(r, compute=dataclasses.asdict(r.compute)) for r in results],
        "cands_none": lambda: [dataclasses.replace(r, candidates=None) for r in results],
        "cand_dict": lambda: [dataclasses.replace(r, candidates=[dataclasses.asdict(c) for c in r.candidates])
                              for r in results],
        "chosen_true": lambda: [dataclasses.replace(r, chosen=True) for r in results],
        "chosen_len": lambda: [dataclasses.replace(r, chosen=len(r.candidates)) for r in results],
    }[cfg.mode]()

register("ext_pin", pin_search, PinConfig)
'''
# arith problems broken as task.split says
PIN_TASK = '''
import dataclasses
from experiments.tasks import arith
from experiments.tasks.arith import prompt_text, grade, extract_answer
def generate_problems(split, count, seed, cfg=None):
    problems = arith.generate_problems("test", count, seed)
    if split == "int_id":
        return [dataclasses.replace(p, id=i) for i, p in enumerate(problems)]
    return [dataclasses.asdict(p) for p in problems]  # "dicts"
'''


@pytest.fixture(scope="module")
def pin_modules(user_modules: Path) -> Iterator[Path]:
    """This file's strategy and task modules beside test_extension_errors's (importable)."""
    (user_modules / "ext_pin_strategy.py").write_text(PIN_STRATEGY)
    (user_modules / "ext_pin_task.py").write_text(PIN_TASK)
    try:
        yield user_modules
    finally:
        for name in ("ext_pin_strategy", "ext_pin_task"):
            sys.modules.pop(name, None)


def refused(overrides: list[str], checkpoint: Path, out: Path) -> str:
    """Run the search; the one-line ValueError it must raise (nothing written to records.jsonl)."""
    with pytest.raises(ValueError) as info:
        run_in_process([*overrides, f"policy.path={checkpoint}", f"out_dir={out}", *TINY])
    message = str(info.value)
    assert "\n" not in message
    assert not (out / "records.jsonl").exists() and not out.exists()  # refused before its first row
    return message


@pytest.mark.parametrize("mode, fault", [
    ("extra", r"returned 3 results for 2 problems: one SearchResult per problem, in the problems' order"),
    ("compute_dict", r"gave problem '[^']+' compute=\{'tokens_generated': .*, not a treesearch\.compute\.Compute"),
    ("cands_none", r"gave problem '[^']+' candidates=None, not a tuple of Candidate"),
    ("cand_dict", r"gave candidate 0 of problem '[^']+' as a dict, not a Candidate"),
    ("chosen_true", r"gave problem '[^']+' chosen=True, not None or an index of its 2 candidates \(0 to 1\)"),
    ("chosen_len", r"gave problem '[^']+' chosen=2, not None or an index of its 2 candidates \(0 to 1\)"),
])
def test_a_broken_strategy_result_is_a_one_line_error_naming_the_strategy(ckpt, pin_modules, tmp_path, mode, fault):
    """An extra result was written as a third row; True graded as candidate 1; the others were
    tracebacks (AttributeError, TypeError, IndexError) from the row writer."""
    message = refused([*PIN, f"+search.mode={mode}"], ckpt, tmp_path / "run")
    assert re.fullmatch(rf"{PIN_LABEL} {fault}; {UNWRITTEN}", message), message


def test_a_strategy_returning_a_tuple_of_results_is_accepted(ckpt, pin_modules, tmp_path):
    out = tmp_path / "run"
    run_in_process([*PIN, "+search.mode=tuple", f"policy.path={ckpt}", f"out_dir={out}", *TINY])
    rows = rows_of(out)
    assert [row["problem_id"] for row in rows] == first_ids(2)
    assert {row["strategy"] for row in rows} == {"ext_pin"} and all(row["chosen"] in (0, 1) for row in rows)


@pytest.mark.parametrize("split, fault", [
    ("int_id", r"problem 1 has id=0, not a str"),
    ("dicts", r"problem 1 is a dict, not a treesearch\.records\.Problem"),
])
def test_a_task_with_an_int_id_or_dict_problems_is_a_one_line_error_naming_the_task(
    ckpt, pin_modules, tmp_path, split, fault,
):
    """An int id was a TypeError hashing the chunk's seed; dicts an AttributeError."""
    out = tmp_path / "run"
    message = refused(["task.module=ext_pin_task", f"task.split={split}", "~task.config"], ckpt, out)
    assert re.fullmatch(rf"task module ext_pin_task: {fault}", message), message


# -- experiments.outcomes: chosen on the library path --------------------------------------------


def test_chosen_fault_refuses_a_bool_and_the_index_one_past_the_end():
    (result,) = best_of_n([trap_problem()], ScriptedPolicy(), ScriptedScorer(), BestOfNConfig(n=2))
    assert len(result.candidates) == 2 and chosen_fault(result) is None
    assert chosen_fault(dataclasses.replace(result, chosen=1)) is None
    for bad in (True, False, 2):
        assert chosen_fault(dataclasses.replace(result, chosen=bad)) == (
            f"chosen={bad!r}, not None or an index of its 2 candidates (0 to 1)")


@pytest.mark.parametrize("chosen", [-1, 2, True])
def test_record_refuses_a_chosen_that_is_no_index(chosen):
    """record() without experiments.search's check: -1 was written as the last candidate's grade."""
    (result,) = best_of_n([trap_problem()], ScriptedPolicy(), ScriptedScorer(), BestOfNConfig(n=2))
    result = dataclasses.replace(result, chosen=chosen)
    outcome = grade_result(result, lambda p, t: t == p.answer, lambda t: t)
    with pytest.raises(ValueError, match=rf"^the result of problem 'trap' has chosen={chosen!r}, not None or an "
                                         r"index of its 2 candidates \(0 to 1\)$"):
        record(result, outcome)


# -- registry, step stops, config keys ----------------------------------------------------------


def test_register_refuses_the_empty_name():
    config = dataclasses.make_dataclass("EmptyNameConfig", [("n", int, 2), ("seed", int, 0)])
    saved = dict(STRATEGIES)
    try:
        with pytest.raises(ValueError, match=r"^a strategy's name must be a non-empty str, not ''$"):
            register("", lambda *args, **kwargs: [], config)
        assert "" not in STRATEGIES
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(saved)


def test_step_stop_rule_default_separator_match_is_suffix():
    rule = StepStopRule.from_tokenizer(TOK, len(TOK), ".\n\n", "<think>", "</think>", [EOS])
    assert rule.is_separator.nonzero().squeeze(-1).tolist() == [SEP, PAREN, DOTS]  # every token ending with it


@pytest.mark.parametrize("before", [logging.INFO, logging.NOTSET])
def test_a_refused_target_restores_the_hydra_utils_log_level(before):
    hydra_log = logging.getLogger("hydra.utils")
    saved = hydra_log.level
    hydra_log.setLevel(before)
    try:
        with pytest.raises(ValueError, match=r"_target_='no_such_module_ext49\.Thing' cannot be imported"):
            check_target_located(OmegaConf.create({"_target_": "no_such_module_ext49.Thing"}))
        assert hydra_log.level == before
    finally:
        hydra_log.setLevel(saved)
