"""The library API used as a researcher would, with bad input: every strategy refuses what it
cannot use with an error naming the setting (or the policy / scorer output) and the valid range,
and never pairs a candidate with another problem or a score outside [0, 1].

    .venv/bin/python -m pytest tests/test_library_api.py -q
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pytest

from fakes import FakePolicy, OracleScorer
from scorers.outcome_oracle import OutcomeOracleScorer
from scorers.sprm_head import build_sprm_head, load_score_module, save_score_module
from scorers.sprm_scorer import SPRMScorer
from treesearch.aggregation import check_aggregation
from treesearch.beam_search import BeamSearchConfig, beam_search
from treesearch.best_of_n import BestOfNConfig, best_of_n
from treesearch.concurrent import search_each
from treesearch.dvts import DVTSConfig, dvts
from treesearch.mcts import MCTSConfig, mcts
from treesearch.particle_filtering import ParticleFilteringConfig, particle_filtering
from treesearch.rebase import RebaseConfig, rebase
from treesearch.records import Prefix, Problem, Step
from treesearch.registry import run_search

SMALL = {  # each strategy at a few samples
    "best_of_n": {"n": 2},
    "beam_search": {"n": 2, "beam_width": 2},
    "dvts": {"n": 2, "beam_width": 2},
    "mcts": {"iterations": 3, "expand_width": 2},
    "rebase": {"n": 2},
    "particle_filtering": {"n": 2},
}
STRATEGIES = [(best_of_n, BestOfNConfig(n=2)), (beam_search, BeamSearchConfig(n=2, beam_width=2)),
              (dvts, DVTSConfig(n=2, beam_width=2)), (mcts, MCTSConfig(iterations=3, expand_width=2)),
              (rebase, RebaseConfig(n=2)), (particle_filtering, ParticleFilteringConfig(n=2))]


def problems(k: int = 3) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", str(i), {"answers": [str(i), "x"]}) for i in range(k)]


# -- Best-of-N: what the policy and the scorer return -------------------------------------------


def _owned_step(problem: Problem, j: int) -> Step:
    """A terminal step whose text names its problem, so a candidate shows whose it is."""
    text = f"</think>Answer: {problem.id}-{j}"
    return Step(text, tuple(range(len(text))), tuple(-0.1 for _ in text), "eos")


@dataclass
class ShortRowPolicy:
    """Rollouts that name their problem; the first problem gets one completion fewer than n."""

    num_parameters: int = 10

    def propose(self, prefixes: Sequence[Prefix], n: int, seed: int, stop_at_step: bool = True) -> list[list[Step]]:
        raise AssertionError("Best-of-N only rolls out")

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        rows = [[[_owned_step(p.problem, j)] for j in range(n)] for p in prefixes]
        rows[0] = rows[0][: n - 1]
        return rows


def test_best_of_n_keeps_each_candidate_with_its_own_problem_when_a_row_is_short():
    # before: candidates were cut at fixed offsets of n, so p0's short row shifted the rest by one
    # (p0 got [p0-0, p1-0], p1 got [p1-1, p2-0], p2 got [p2-1])
    results = best_of_n(problems(3), ShortRowPolicy(), OracleScorer(), BestOfNConfig(n=2))
    for r in results:
        assert all(c.text.startswith(f"</think>Answer: {r.problem.id}-") for c in r.candidates)
    assert [len(r.candidates) for r in results] == [1, 2, 2]


class MissingRowPolicy(FakePolicy):
    def rollout(self, prefixes, n, seed):  # type: ignore[override]
        return super().rollout(prefixes, n, seed)[:-1]


def test_best_of_n_refuses_a_policy_that_drops_a_problem():
    # before: the last problem silently had no candidates
    with pytest.raises(ValueError, match="policy.rollout returned 2 rows for 3 prefixes"):
        best_of_n(problems(3), MissingRowPolicy(), OracleScorer(), BestOfNConfig(n=2))


class DropRowScorer(OracleScorer):
    def score(self, paths):  # type: ignore[override]
        return super().score(paths)[:-1]


class DropStepScorer(OracleScorer):
    def score(self, paths):  # type: ignore[override]
        return [row[:-1] for row in super().score(paths)]


@pytest.mark.parametrize("scorer, message", [
    (DropRowScorer(), "scorer returned 5 score rows for 6 paths"),  # before: one candidate silently lost
    (DropStepScorer(), "scorer returned 1 scores for a path of 2 steps"),  # before: IndexError in tree.py
])
def test_best_of_n_refuses_a_scorer_whose_rows_do_not_match_the_paths(scorer, message):
    with pytest.raises(ValueError, match=message):
        best_of_n(problems(3), FakePolicy(), scorer, BestOfNConfig(n=2))


# -- every strategy: what a user's policy returns -----------------------------------------------


class FixedSamplesPolicy(FakePolicy):
    """Eight samples per prefix whatever n asks (a backend's own num_return_sequences)."""

    def propose(self, prefixes, n, seed, stop_at_step=True):  # type: ignore[override]
        return super().propose(prefixes, 8, seed, stop_at_step)

    def rollout(self, prefixes, n, seed):  # type: ignore[override]
        return super().rollout(prefixes, 8, seed)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_strategy_refuses_more_samples_than_it_asked_for(name):
    # before: accepted: 8 candidates at N = 2, particle filtering 224, compute grown to match
    with pytest.raises(ValueError, match=r"policy\.(propose|rollout) returned 8 samples for prefix 0, asked for [12]$"):
        run_search(name, problems(2), FixedSamplesPolicy(), OracleScorer(), **SMALL[name])


class MalformedPolicy(FakePolicy):
    """propose / rollout rows of the right count but the wrong shape (`kind`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def _bad(self, rows: list) -> Any:
        if self.kind == "none":  # a forgotten return
            return None
        if self.kind == "generator":
            return (row for row in rows)
        if self.kind == "text":  # strings where Steps belong
            return [[step.text for step in row] if not isinstance(row[0], list) else [[s.text for s in c] for c in row]
                    for row in rows]
        return [[c[0] for c in row] for row in rows]  # "flat": rollout rows of Steps, one nesting level short

    def propose(self, prefixes, n, seed, stop_at_step=True):  # type: ignore[override]
        return self._bad(super().propose(prefixes, n, seed, stop_at_step)) if self.kind != "flat" else \
            super().propose(prefixes, n, seed, stop_at_step)

    def rollout(self, prefixes, n, seed):  # type: ignore[override]
        return self._bad(super().rollout(prefixes, n, seed))


@pytest.mark.parametrize("kind, name, message", [
    ("none", "beam_search", r"^policy\.propose returned NoneType, expected a list with one row per prefix$"),
    ("generator", "mcts", r"^policy\.propose returned generator, expected a list with one row per prefix$"),
    ("text", "dvts", r"^policy\.propose returned str in row 0, expected treesearch\.records\.Step$"),
    ("none", "best_of_n", r"^policy\.rollout returned NoneType, expected a list"),
    ("text", "best_of_n", r"^policy\.rollout returned str in row 0, expected treesearch\.records\.Step$"),
    ("flat", "best_of_n", r"^policy\.rollout returned Step as a completion in row 0, expected a list of Steps$"),
])
def test_a_policy_row_of_the_wrong_shape_is_named(kind, name, message):
    # before: TypeError "object of type 'NoneType' has no len()", AttributeError "'str' object has
    # no attribute 'num_tokens'", "'Step' object is not iterable", deep inside the strategy
    with pytest.raises(ValueError, match=message):
        run_search(name, problems(2), MalformedPolicy(kind), OracleScorer(), **SMALL[name])


class CountingPolicy:
    """FakePolicy's samples, with `num_parameters` = value (none at all when value is "missing")."""

    def __init__(self, value: Any) -> None:
        self.inner = FakePolicy()
        self.calls = self.inner.calls
        self.propose, self.rollout = self.inner.propose, self.inner.rollout
        if value != "missing":
            self.num_parameters = value


@pytest.mark.parametrize("value", ["missing", "method", -1, 2.5, None])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_policy_without_a_parameter_count_is_named_before_any_call(name, value):
    # compute is tallied at the end: a missing num_parameters (or HF's method, uncalled) failed
    # after every policy call had been made, with "unsupported operand type(s)"
    policy = CountingPolicy(value if value != "method" else (lambda: 1000))
    with pytest.raises(TypeError, match=r"^the policy's num_parameters must be an integer >= 0"):
        run_search(name, problems(2), policy, OracleScorer(), **SMALL[name])
    assert policy.calls == []


def test_a_scorer_without_score_or_with_a_bad_parameter_count_is_named():
    class NoCost:
        def score(self, paths):
            return [[0.5] * len(p.steps) for p in paths]

    with pytest.raises(TypeError, match=r"^the scorer \(NoCost\) has no method cost\(paths\)$"):
        run_search("best_of_n", problems(2), FakePolicy(), NoCost(), n=2)
    scorer = OracleScorer()
    object.__setattr__(scorer, "num_parameters", "7B")
    with pytest.raises(TypeError, match=r"^the scorer's num_parameters must be an integer >= 0 .*got '7B'"):
        run_search("mcts", problems(2), FakePolicy(), scorer, **SMALL["mcts"])


class NoneScorer(OracleScorer):
    def score(self, paths):  # type: ignore[override]
        return None


def test_a_scorer_returning_nothing_is_named():
    with pytest.raises(ValueError, match=r"^scorer returned NoneType, expected a list with one row of step scores"):
        run_search("beam_search", problems(2), FakePolicy(), NoneScorer(), **SMALL["beam_search"])


# -- every strategy: scores outside [0, 1] --------------------------------------------------------


@dataclass(frozen=True)
class ConstantScorer:
    """Every step scores `value` (a logit or NaN: what a misconfigured PRM returns)."""

    value: float

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [[self.value] * len(p.steps) for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0


@pytest.mark.parametrize("value", [-2.5, 1.5, math.nan])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_strategy_refuses_step_scores_outside_the_unit_interval(name, value):
    # before: logits were clamped by the geometric mean or compared as NaN, and a path was
    # chosen by nothing, silently
    with pytest.raises(ValueError, match=r"step score .* must be a number in \[0, 1\]"):
        run_search(name, problems(2), FakePolicy(), ConstantScorer(value), **SMALL[name])


@dataclass(frozen=True)
class ArrayScorer:
    """Scores as numpy float32 rows or torch tensors (what a PRM's code hands back naturally)."""

    kind: str

    def score(self, paths: Sequence[Prefix]) -> list[Any]:
        import numpy as np
        import torch

        rows = [[0.25 + 0.5 * (j % 2) for j in range(len(p.steps))] for p in paths]
        return [np.asarray(r, dtype=np.float32) if self.kind == "numpy" else torch.tensor(r) for r in rows]

    def cost(self, paths: Sequence[Prefix]) -> int:
        return 0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_array_scores_are_kept_as_floats_so_the_results_can_be_saved(name, kind):
    # stored as float32 / Tensor, they made `save_result` and `write_records` fail in json.dumps
    import json

    from experiments.result_json import result_to_json

    results = run_search(name, problems(2), FakePolicy(), ArrayScorer(kind), **SMALL[name])
    for result in results:
        assert all(type(v) is float for c in result.candidates for v in c.step_scores)
        assert all(n.score is None or type(n.score) is float for n in result.tree.nodes)
        json.dumps(result_to_json(result))


@dataclass(frozen=True)
class CostScorer:
    """Every step scores 0.5; cost returns `value` (None, a float, a negative count)."""

    value: Any

    def score(self, paths: Sequence[Prefix]) -> list[list[float]]:
        return [[0.5] * len(p.steps) for p in paths]

    def cost(self, paths: Sequence[Prefix]) -> Any:
        return self.value


@pytest.mark.parametrize("value", [None, 7.5, -15, True])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_scorer_cost_that_is_not_a_token_count_is_named(name, value):
    # None failed in a `+=` (Best-of-N: after every call); -15 or 7.5 went into scorer_tokens and flops
    with pytest.raises(ValueError, match=rf"scorer.cost returned {value!r}; it must be the tokens the scorer ran"):
        run_search(name, problems(2), FakePolicy(), CostScorer(value), **SMALL[name])


# -- every strategy: its own config, a list of problems ---------------------------------------------


@pytest.mark.parametrize("fn, cfg", STRATEGIES)
def test_a_strategy_refuses_another_strategys_config(fn, cfg):
    # before: AttributeError deep inside (e.g. 'BestOfNConfig' object has no attribute 'max_depth')
    wrong = BestOfNConfig(n=2) if fn is not best_of_n else BeamSearchConfig(n=2, beam_width=2)
    with pytest.raises(TypeError, match=f"{fn.__name__} takes a {type(cfg).__name__}, not a {type(wrong).__name__}"):
        fn(problems(1), FakePolicy(), OracleScorer(), wrong)
    with pytest.raises(TypeError, match=f"{fn.__name__} takes a {type(cfg).__name__}, not a dict"):
        fn(problems(1), FakePolicy(), OracleScorer(), {"n": 2})


@pytest.mark.parametrize("fn, cfg", STRATEGIES)
def test_a_strategy_names_a_problem_list_it_cannot_use(fn, cfg):
    (one,) = problems(1)
    # before: "'Problem' object is not iterable" / "'str' object has no attribute 'id'" deep inside
    with pytest.raises(TypeError, match=r"problems must be a list of Problem, not a Problem \(wrap it: \[problem\]\)"):
        fn(one, FakePolicy(), OracleScorer(), cfg)
    with pytest.raises(TypeError, match=r"problems\[1\] is a str, not a Problem"):
        fn([one, "q"], FakePolicy(), OracleScorer(), cfg)


@pytest.mark.parametrize("fn, cfg", STRATEGIES)
def test_a_strategy_takes_any_iterable_of_problems(fn, cfg):
    # before: "object of type 'generator' has no len()"
    results = fn((p for p in problems(2)), FakePolicy(), OracleScorer(), cfg)
    assert [r.problem.id for r in results] == ["p0", "p1"]


# -- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"seed": "1"}, "BestOfNConfig.seed='1' must be an integer"),
    ({"seed": 1.5}, "BestOfNConfig.seed=1.5 must be an integer"),
    ({"n": True}, "BestOfNConfig.n=True must be an integer >= 1"),
])
def test_best_of_n_config_checks_its_settings_as_the_others_do(settings, message):
    # before: accepted (a string seed reached the policy, n=True ran Best-of-1)
    with pytest.raises(ValueError, match=message):
        BestOfNConfig(**settings)


@pytest.mark.parametrize("name", ["c_puct", "virtual_loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_mcts_config_refuses_a_weight_that_is_not_finite(name, value):
    # before: accepted; with c_puct=nan every PUCT score is NaN and selection always takes the first child
    with pytest.raises(ValueError, match=f"MCTSConfig.{name}={value} must be a finite number >= 0"):
        MCTSConfig(**{name: value})


def test_an_aggregation_that_is_not_a_string_is_named():
    # before: TypeError: unhashable type: 'list'
    with pytest.raises(ValueError, match=r"unknown aggregation \['mean'\]; valid: geometric_mean"):
        check_aggregation(["mean"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name, settings, valid", [
    ("mcts", {"n": 8}, "iterations"),
    ("best_of_n", {"beam_width": 2}, "n, aggregation, seed"),
])
def test_run_search_names_a_setting_the_strategy_does_not_take_and_lists_its_settings(name, settings, valid):
    # before: "MCTSConfig.__init__() got an unexpected keyword argument 'n'", no list of settings
    with pytest.raises(TypeError, match=f"{name} has no setting {sorted(settings)[0]!r}; valid: .*{valid}"):
        run_search(name, problems(1), FakePolicy(), OracleScorer(), **settings)


def test_an_unknown_strategy_that_is_not_a_string_is_named():
    # before: TypeError: unhashable type: 'list'
    with pytest.raises(ValueError, match=r"unknown strategy \['mcts'\]; valid: beam_search, best_of_n, dvts, mcts, particle_filtering, rebase"):
        run_search(["mcts"], problems(1), FakePolicy(), OracleScorer())  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", ["2", 2.5, True, 0])
def test_search_each_names_a_bad_worker_count(workers):
    # before: '2' raised "'<' not supported between instances of 'str' and 'int'"; 2.5 and True ran
    with pytest.raises(ValueError, match=f"search_each workers={workers!r} must be an integer >= 1"):
        search_each(best_of_n, problems(2), FakePolicy(), OracleScorer(), BestOfNConfig(n=2), workers=workers)


# -- scorers --------------------------------------------------------------------------------------


def _grade(problem: Problem, text: str) -> bool:
    return text.endswith(f"Answer: {problem.answer}")


@pytest.mark.parametrize("unfinished", ["0.5", None, True, math.nan, 1.5])
def test_outcome_oracle_names_an_unfinished_score_that_is_not_a_number_in_the_unit_interval(unfinished):
    # before: "0.5" and None raised "'<=' not supported between ...", True was accepted
    with pytest.raises(ValueError, match=r"OutcomeOracleScorer.unfinished=.* must be a number in \[0, 1\]"):
        OutcomeOracleScorer(grade=_grade, unfinished=unfinished)  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"not a torch file", "half"])
def test_a_damaged_score_module_is_named(tmp_path, content: Any):
    path = save_score_module(build_sprm_head(4, seed=0), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    # before: a raw EOFError (with no message), UnpicklingError or PytorchStreamReader RuntimeError
    with pytest.raises(ValueError, match=f"{path} is damaged or incomplete"):
        load_score_module(tmp_path)


def test_sprm_scorer_checks_batch_size_before_loading_anything(tmp_path):
    # before: the model loaded first, so a missing folder hid the bad batch size (and a big model
    # loaded for minutes before the refusal)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        SPRMScorer.from_pretrained(tmp_path / "absent", lambda p: p.question, batch_size=0)


def test_a_file_given_as_a_checkpoint_folder_names_the_folder_that_holds_it(tmp_path):
    from policies.checkpoint import check_checkpoint

    (tmp_path / "final").mkdir()
    config = tmp_path / "final" / "config.json"
    config.write_text("{}")
    message = rf"{config} is a file, not a checkpoint folder; pass the folder that holds it \({tmp_path / 'final'}\)"
    with pytest.raises(FileNotFoundError, match=message):
        check_checkpoint(config)
    with pytest.raises(FileNotFoundError, match=message):
        SPRMScorer.from_pretrained(config, prompt_fn=str)
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder .*nope does not exist"):
        check_checkpoint(tmp_path / "nope")


def test_the_continuous_engine_names_a_policy_it_cannot_drive():
    from policies.continuous_engine import ContinuousEngine

    with pytest.raises(TypeError, match=r"takes a TransformersPolicy .*not a FakePolicy; call search_each without"):
        with ContinuousEngine.attached(FakePolicy()):
            pass


@pytest.mark.parametrize("content", [b"hello world, not a torch file\n", b"", b'{"a": 1}', bytes(range(256)) * 3])
def test_a_torch_file_of_other_bytes_is_named_as_damaged(content, tmp_path):
    """A text file named .pt reaches torch's legacy unpickler, which raises KeyError / IndexError /
    UnicodeDecodeError / struct.error rather than an unpickling error: still damage, named."""
    from experiments.rollout_cache import load_cache
    from policies.checkpoint import DamagedCheckpointError, load_torch_file

    path = tmp_path / "cache.pt"
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpointError, match=str(path)):
        load_torch_file(path, weights_only=True)
    with pytest.raises(ValueError, match=rf"{path} is damaged \(truncated or not a torch file"):
        load_cache(path)


class BrokenRolloutPolicy(FakePolicy):
    """Rollouts that break the contract: `kind` "empty" (no steps), "open" (the last step ended on
    the separator) or "early" (an eos before the last step)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def rollout(self, prefixes: Sequence[Prefix], n: int, seed: int) -> list[list[list[Step]]]:
        rows = super().rollout(prefixes, n, seed)
        if self.kind == "empty":
            return [[[] for _ in row] for row in rows]
        if self.kind == "open":
            return [[[s for s in c[:-1]] for c in row] for row in rows]
        return [[[c[-1], *c] for c in row] for row in rows]


@pytest.mark.parametrize("kind, message", [
    ("empty", "returned a completion with no steps in row 0"),  # a candidate at the tree's root before
    ("open", "returned a completion in row 0 whose last step has finish 'separator'"),
    ("early", r"returned a completion in row 0 with a terminal step \('eos'\) at 0 of 3: only its last step"),
])
@pytest.mark.parametrize("fn, cfg", [(best_of_n, BestOfNConfig(n=2)), (mcts, MCTSConfig(iterations=4, rollout=True))])
def test_a_rollout_that_breaks_the_completion_contract_is_named(fn, cfg, kind, message):
    with pytest.raises(ValueError, match=rf"policy.rollout {message}"):
        fn(problems(2), BrokenRolloutPolicy(kind), OracleScorer(), cfg)


# -- a user's own policy, scorer and call shapes ----------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_steps_array_token_ids_and_logprobs_become_python_numbers_so_results_save(kind):
    # a policy wrapping generate() passed arrays: the search ran, then save_result failed in json.dumps
    import json

    import numpy as np
    import torch

    from experiments.result_json import result_to_json

    make = (lambda v, dt: np.asarray(v, dtype=dt)) if kind == "numpy" else (lambda v, dt: torch.tensor(v))
    step = Step("12", make([5, 7], np.int64), make([-0.5, -0.25], np.float32), "eos", tokens_forwarded=np.int64(3))
    assert step.token_ids == (5, 7) and step.token_logprobs == (-0.5, -0.25) and step.tokens_forwarded == 3
    assert all(type(v) is int for v in step.token_ids) and all(type(v) is float for v in step.token_logprobs)

    class ArrayPolicy(FakePolicy):
        def rollout(self, prefixes, n, seed):
            return [[[Step(s.text, make(list(s.token_ids), np.int64), make(list(s.token_logprobs), np.float32), s.finish,
                           np.int64(s.tokens_forwarded)) for s in path] for path in row]
                    for row in super().rollout(prefixes, n, seed)]

    for result in run_search("best_of_n", problems(2), ArrayPolicy(), OracleScorer(), n=2):
        json.dumps(result_to_json(result))


@pytest.mark.parametrize("value, shown", [(None, "None"), (-3, "-3"), (2.5, "2.5"), (True, "True")])
def test_a_steps_tokens_forwarded_must_be_a_count(value, shown):
    # None passed the whole search and failed in the compute tally; -3 or 2.5 went into the FLOPs
    with pytest.raises(ValueError, match=rf"^Step.tokens_forwarded={shown} must be an integer >= 0"):
        Step("a", (1,), (-0.1,), "eos", tokens_forwarded=value)
    with pytest.raises(ValueError, match=r"^Step.token_ids must hold integers"):
        Step("a", (1.5,), (-0.1,), "eos")


def test_search_each_checks_the_policy_scorer_and_problems_as_run_search_does():
    # merged_for_threads read num_parameters first: int() of a method, and a missing cost after a policy call
    class MethodCount(OracleScorer):
        def num_parameters(self):  # type: ignore[override]
            return 1000

    class NoCost:
        num_parameters = 10

        def score(self, paths):
            return [[0.5] * len(p.steps) for p in paths]

    policy = FakePolicy()
    with pytest.raises(TypeError, match=r"the scorer's num_parameters must be an integer >= 0 .*\(a method: call it\)"):
        search_each(best_of_n, problems(2), policy, MethodCount(), BestOfNConfig(n=2))
    with pytest.raises(TypeError, match=r"^the scorer \(NoCost\) has no method cost\(paths\)$"):
        search_each(best_of_n, problems(2), policy, NoCost(), BestOfNConfig(n=2))
    assert policy.calls == []
    with pytest.raises(TypeError, match=r"not a Problem \(wrap it: \[problem\]\)"):
        search_each(best_of_n, problems(1)[0], policy, OracleScorer(), BestOfNConfig(n=2))  # type: ignore[arg-type]
    generated = search_each(best_of_n, (p for p in problems(2)), policy, OracleScorer(), BestOfNConfig(n=2))
    assert [r.problem.id for r in generated] == ["p0", "p1"]


def test_run_search_takes_the_strategys_config_object_and_a_hook_only_by_keyword():
    # a config given fifth was taken for the round hook: the default n=8 ran, then "'BestOfNConfig' object is not callable"
    policy = FakePolicy()
    (result,) = run_search("best_of_n", problems(1), policy, OracleScorer(), BestOfNConfig(n=3))
    assert policy.calls == [("rollout", 1, 3)] and len(result.candidates) == 3
    with pytest.raises(TypeError, match=r"config object or its settings as keywords, not both"):
        run_search("best_of_n", problems(1), policy, OracleScorer(), BestOfNConfig(n=3), n=2)
    with pytest.raises(TypeError, match=r"best_of_n takes a BestOfNConfig, not a BeamSearchConfig"):
        run_search("best_of_n", problems(1), policy, OracleScorer(), BeamSearchConfig(n=2, beam_width=2))
    with pytest.raises(TypeError, match=r"on_round must be callable"):
        run_search("best_of_n", problems(1), policy, OracleScorer(), on_round=BestOfNConfig(n=3))
    # search_each took it, and failed with a bare TypeError after the first round's policy call
    from treesearch.concurrent import search_each

    policy.calls.clear()
    with pytest.raises(TypeError, match=r"on_round must be callable .* not a int"):
        search_each(best_of_n, problems(2), policy, OracleScorer(), BestOfNConfig(n=3), on_round=3)
    assert policy.calls == []


def test_the_merged_scorer_calls_its_inner_scorer_from_one_thread_at_a_time():
    # score calls were serialised but cost went to the inner scorer from every search thread at once
    import threading
    import time

    class Overlaps(OracleScorer):
        inside, most = 0, 0
        lock = threading.Lock()

        def _enter(self):
            with Overlaps.lock:
                Overlaps.inside += 1
                Overlaps.most = max(Overlaps.most, Overlaps.inside)
            time.sleep(0.002)
            with Overlaps.lock:
                Overlaps.inside -= 1

        def score(self, paths):
            self._enter()
            return super().score(paths)

        def cost(self, paths):
            self._enter()
            return super().cost(paths)

    scorer = Overlaps()
    object.__setattr__(scorer, "num_parameters", 10)  # a scorer that forwards a model: merged
    search_each(beam_search, problems(8), FakePolicy(), scorer, BeamSearchConfig(n=2, beam_width=2))
    assert Overlaps.most == 1


def test_a_numpy_number_in_a_config_is_named_as_such():
    import numpy as np

    with pytest.raises(ValueError, match=r"BestOfNConfig.n=np.int64\(4\) must be an integer >= 1 \(a Python int: int\(value\)"):
        BestOfNConfig(n=np.int64(4))


# -- problems, equal results, results read back, a cell run again, on_round, no outcomes ----------


def _bad_problems() -> list[tuple[Problem, str]]:
    import pathlib

    import numpy as np

    meta = {"answers": ["3", "x"]}
    return [
        (Problem("q", None, "3", meta), r"^problems\[1\] \(problem 'q'\) has question=None, not a non-empty str$"),  # type: ignore[arg-type]
        (Problem("q", 7, "3", meta), r"has question=7, not a non-empty str$"),  # type: ignore[arg-type]
        (Problem("q", "  ", "3", meta), r"has question='  ', not a non-empty str$"),
        (Problem(1, "q", "3", meta), r"^problems\[1\] has id=1, not a str$"),  # type: ignore[arg-type]
        (Problem("q", "q", 3, meta), r"has answer=3, not a str or None \(the reference answer; None: unknown\)$"),  # type: ignore[arg-type]
        (Problem("q", "q", "3", None), r"has meta=None, not a dict$"),  # type: ignore[arg-type]
        (Problem("q", "q", "3", {**meta, "level": np.int64(3)}), r"has meta\['level'\]=.*3.*, not JSON \(Object of type int64"),
        (Problem("q", "q", "3", {**meta, "tags": {"a"}}), r"has meta\['tags'\]=\{'a'\}, not JSON \(Object of type set"),
        (Problem("q", "q", "3", {**meta, "src": pathlib.Path("/x")}), r"has meta\['src'\]=.*PosixPath.*, not JSON"),
    ]


@pytest.mark.parametrize("fn, cfg", STRATEGIES)
def test_a_strategy_names_a_problem_it_cannot_search_before_any_policy_call(fn, cfg):
    # before: question=None was searched as the prompt "None", meta=None / a numpy number searched and then
    # failed save_result with a TypeError naming no key
    for bad, message in _bad_problems():
        policy = FakePolicy()
        with pytest.raises(ValueError, match=message):
            fn([problems(1)[0], bad], policy, OracleScorer(), cfg)
        assert policy.calls == []
    unknown = Problem("u", "q", None, {"answers": ["1"]})  # an unknown answer is a problem the library searches
    assert [r.problem.id for r in fn([unknown], FakePolicy(), OracleScorer(), cfg)] == ["u"]


def test_search_each_names_a_problem_it_cannot_search_before_any_policy_call():
    policy = FakePolicy()
    with pytest.raises(ValueError, match=r"^problems\[1\] \(problem 'q'\) has meta=None, not a dict$"):
        search_each(best_of_n, [problems(1)[0], Problem("q", "q", "3", None)], policy, OracleScorer(),  # type: ignore[arg-type]
                    BestOfNConfig(n=2))
    assert policy.calls == []


def _without_wall_time(results: list) -> list:
    import dataclasses

    return [dataclasses.replace(r, compute=dataclasses.replace(r.compute, wall_time_s=0.0)) for r in results]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_two_identical_searches_give_equal_results(name):
    # before: Tree had no __eq__, so results compared their trees by identity and never were equal
    first = run_search(name, problems(2), FakePolicy(), OracleScorer(), **SMALL[name])
    second = run_search(name, problems(2), FakePolicy(), OracleScorer(), **SMALL[name])
    assert [r.tree for r in first] == [r.tree for r in second]
    assert _without_wall_time(first) == _without_wall_time(second)  # wall time is all that differs
    second[0].tree.nodes[-1].visits += 1
    assert first[0].tree != second[0].tree and first[0].tree != "a tree"
    second[0].tree.path(second[0].tree.leaves()[0])  # the path cache is no part of a tree's value
    assert first[1].tree == second[1].tree
    with pytest.raises(TypeError, match="unhashable"):
        hash(first[0].tree)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_saved_result_reads_back_as_the_search_result_it_was(name, tmp_path):
    # before: load_result gave a ResultRecord of dicts, and grade_results on it an AttributeError
    from experiments.outcomes import grade_results
    from experiments.result_json import load_result, save_result
    from experiments.tasks import arith

    results = run_search(name, problems(3), FakePolicy(), OracleScorer(), **SMALL[name])
    back = [load_result(save_result(tmp_path / f"{r.problem.id}.json", r)).to_result() for r in results]
    assert back == results
    assert any(r.candidates and r.tree.nodes[-1].score is not None for r in back)
    grades = grade_results(back, arith.grade, arith.extract_answer)
    assert grades == grade_results(results, arith.grade, arith.extract_answer)


def test_a_read_back_result_has_lists_for_tuples_and_names_a_field_it_cannot_rebuild(tmp_path):
    import json

    from experiments.result_json import ResultFileError, load_result, save_result

    (result,) = run_search("best_of_n", [Problem("t", "q", "1", {"answers": ("1",)})], FakePolicy(), OracleScorer(), n=2)
    back = load_result(save_result(tmp_path / "t.json", result)).to_result()
    assert back.problem.meta == {"answers": ["1"]} and back.tree.problem.meta == {"answers": ["1"]}
    assert back.tree.nodes == result.tree.nodes and back.candidates == result.candidates
    data = json.loads((tmp_path / "t.json").read_text())
    data["compute"]["gpu_hours"] = 1.0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"^compute cannot be rebuilt: .*'gpu_hours'"):
        load_result(tmp_path / "bad.json").to_result()
    data = json.loads((tmp_path / "t.json").read_text())
    data["chosen_node"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"^chosen_node=0 is not the node of the chosen candidate"):
        load_result(tmp_path / "bad.json").to_result()


def test_registering_a_strategy_again_from_a_cell_run_again_replaces_it():
    # before: re-running the notebook cell that registers a strategy: "strategy cell is registered already"
    import functools

    from treesearch.registry import STRATEGIES, register

    cell = '''
from dataclasses import dataclass
@dataclass(frozen=True)
class CellConfig:
    n: int = 4
    seed: int = 0

def cell_search(problems, policy, scorer, cfg, on_round=None):
    return []

spec = register("cell", cell_search, CellConfig)
'''
    saved = dict(STRATEGIES)
    try:
        first, again = {"register": register, "__name__": "__main__"}, {"register": register, "__name__": "__main__"}
        exec(cell, first)
        exec(cell, again)
        assert again["cell_search"] is not first["cell_search"] and STRATEGIES["cell"] == again["spec"]
        assert run_search("cell", [], FakePolicy(), OracleScorer(), n=1) == []  # cell_search returns no result
        elsewhere = {"register": register, "__name__": "fakes"}  # the same names in another module
        with pytest.raises(ValueError, match=r"^strategy cell is registered already"):
            exec(cell, elsewhere)
        bare = [{"register": register} for _ in range(2)]  # exec'd without a __name__: the function's module is None
        for namespace in bare:
            exec(cell.replace('"cell"', '"cell_bare"'), namespace)
        assert STRATEGIES["cell_bare"] == bare[1]["spec"]
        register("cell_partial", functools.partial(bare[0]["cell_search"]), bare[0]["CellConfig"])
        with pytest.raises(ValueError, match=r"^strategy cell_partial is registered already \(fn functools.partial"):
            register("cell_partial", functools.partial(bare[1]["cell_search"]), bare[1]["CellConfig"])
        with pytest.raises(ValueError, match=r"^strategy best_of_n is registered already"):
            register("best_of_n", bare[1]["cell_search"], bare[1]["CellConfig"])
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(saved)


@pytest.mark.parametrize("fn, cfg", STRATEGIES)
def test_a_strategy_called_with_a_hook_that_is_not_callable_names_it_before_any_policy_call(fn, cfg):
    # before: the whole first round ran, then "'int' object is not callable"
    policy = FakePolicy()
    with pytest.raises(TypeError, match=r"^on_round must be callable \(a RoundHook: trees -> None\), not a int$"):
        fn(problems(2), policy, OracleScorer(), cfg, on_round=5)
    assert policy.calls == []


def test_accuracy_of_no_outcomes_names_the_argument():
    # before: "bootstrap needs at least one value"
    from experiments import metrics

    with pytest.raises(ValueError, match=r"^accuracy: outcomes is empty \(no problem's outcome was given\)"):
        metrics.accuracy([], 1, "first")
    with pytest.raises(ValueError, match=r"^accuracy: outcomes is empty"):
        metrics.accuracy(iter([]), 1, "first")
