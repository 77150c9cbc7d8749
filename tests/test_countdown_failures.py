"""experiments.countdown_failures: the first fault and the last step of countdown completions."""
from __future__ import annotations

from experiments.countdown_failures import (
    RolloutDiagnosis, arithmetic_rows, arithmetic_table, diagnose, fault_table, last_step_table,
)
from experiments.tasks.countdown_steps import Rules, check_step

RULES = Rules(max_value=99)
NUMBERS, TARGET = (8, 5, 6, 6), 24


def completion(*steps: str) -> str:
    return "".join(s + ".\n\n" for s in steps) + "</think>Answer: 1"


def test_a_solution_has_no_fault_and_lands_honestly():
    d = diagnose(NUMBERS, TARGET, RULES, completion("8 - 5 = 3, left 6 6 3", "6 * 3 = 18, left 6 18", "18 + 6 = 24, left 24"), True)
    assert d == RolloutDiagnosis(True, None, None, True, True)


def test_a_dead_end_that_lies_on_its_last_step():
    # 8 + 5 = 13 leaves 6 6 13, from which 24 cannot be made; the last step then writes the target
    # with false arithmetic (13 + 36 is 49)
    d = diagnose(NUMBERS, TARGET, RULES, completion("8 + 5 = 13, left 6 6 13", "6 * 6 = 36, left 13 36", "36 + 13 = 24, left 24"), False)
    assert (d.fault, d.fault_step, d.wrote_target, d.last_step_true) == ("dead end", 0, True, False)


def test_each_fault_kind_is_named():
    state = (5, 6, 6, 8)
    assert check_step(state, TARGET, "8 - 5 = 4, left 6 6 4", RULES).kind == "arithmetic"
    assert check_step(state, TARGET, "9 - 5 = 4, left 6 6 4", RULES).kind == "operands"
    assert check_step(state, TARGET, "5 - 8 = 3, left 6 6 3", RULES).kind == "not allowed"
    assert check_step(state, TARGET, "8 - 5 = 3, left 6 3", RULES).kind == "left list"
    assert check_step(state, TARGET, "eight minus five", RULES).kind == "malformed"
    assert check_step(state, TARGET, "8 - 5 = 3, left 6 6 3", RULES).kind == ""


def test_unfinished_and_unparsed_last_steps():
    assert diagnose(NUMBERS, TARGET, RULES, "8 - 5 = 3, left 6 6 3.\n\n", False).fault == "unfinished"
    d = diagnose(NUMBERS, TARGET, RULES, completion("8 - 5 = 3, left 6 6 3", "garbage"), False)
    assert (d.fault, d.fault_step, d.last_step_true) == ("malformed", 1, None)


def test_an_unclosed_span_keeps_what_its_last_step_wrote_and_a_true_result_over_the_cap_is_true():
    # an unfinished rollout that honestly wrote the target was "| False | unparsed |"
    d = diagnose(NUMBERS, TARGET, RULES, "<think>8 - 5 = 3, left 6 6 3.\n\n6 * 3 = 18, left 6 18.\n\n18 + 6 = 24, left 24.\n\n", False)
    assert d == RolloutDiagnosis(False, "unfinished", None, True, True)
    early = diagnose(NUMBERS, TARGET, RULES, "<think>8 + 5 = 13, left 6 6 13.\n\n6 * 6 = 36", False)
    assert (early.fault, early.fault_step, early.wrote_target, early.last_step_true) == ("dead end", 0, False, True)
    # cut mid-step by the token limit while on track: unfinished, not a malformed or left-list fault
    on_track = "<think>8 - 5 = 3, left 6 6 3.\n\n6 * 3 = 18, left 6 18.\n\n"
    for cut in ("18 + 6 = 2", "18 + 6 = 24, left 2"):
        d = diagnose(NUMBERS, TARGET, RULES, on_track + cut, False)
        assert (d.fault, d.fault_step) == ("unfinished", None), cut
    # 36 * 12 = 432 is true arithmetic above the cap of 99: a rule fault, not a false result (the
    # arithmetic table counted it right, the last-step table false)
    over = diagnose((36, 12, 2, 1), TARGET, RULES, completion("36 * 12 = 432, left 2 1 432"), False)
    assert (over.fault, over.last_step_true) == ("not allowed", True)


def test_tables_count_per_outcome():
    ds = [RolloutDiagnosis(True, None, None, True, True), RolloutDiagnosis(False, "dead end", 0, True, False),
          RolloutDiagnosis(False, "dead end", 1, False, True)]
    faults = fault_table(ds)
    assert "| none | 1 | 0 | 0.333 |" in faults and "| dead end | 0 | 2 | 0.667 |" in faults
    last = last_step_table(ds)
    assert "| True | True | 1 | 0 |" in last and "| True | False | 0 | 1 |" in last and "| False | True | 0 | 1 |" in last


def test_check_bon_ranks_by_the_check_then_by_confidence():
    from experiments.countdown_failures import check_bon
    from test_train_head import synthetic_cache

    # problem 0: rollout 0 is correct; rollout 1 writes the target with false arithmetic and is
    # more confident. Problem 1: neither is correct.
    cache = synthetic_cache([True, False, False, False], n=2, steps_per_rollout=[1, 1, 1, 1],
                            mean_logprobs=[-1.0, -1.0, -0.1, -0.1, -0.5, -0.5, -0.2, -0.2], task="countdown")
    ds = [RolloutDiagnosis(True, None, None, True, True), RolloutDiagnosis(False, "dead end", 0, True, False),
          RolloutDiagnosis(False, "dead end", 0, False, True), RolloutDiagnosis(False, "arithmetic", 0, False, False)]
    got = check_bon(cache, ds)
    assert got == {"confidence alone": 0.0, "last step writes the target": 0.0, "... with true arithmetic": 0.5}


def test_arithmetic_rows_count_true_results_by_step_operator_and_size():
    rollouts = [
        ["8 - 5 = 3, left 6 6 3.\n\n", "6 * 3 = 18, left 6 18.\n\n", "18 + 6 = 24, left 24.\n\n", "</think>Answer: 1"],
        ["8 - 5 = 4, left 6 6 4.\n\n", "garbage.\n\n", "14 + 6 = 21, left 21.\n\n"],
    ]
    rows = arithmetic_rows(rollouts)
    # step 0: both "-" with one-digit operands, one right (8 - 5 = 3) and one wrong (= 4); the
    # malformed step 1 of the second rollout is skipped but still counts as a step index
    assert rows[(0, "-", "1 digit")] == (2, 1)
    assert rows[(1, "*", "1 digit")] == (1, 1)
    assert rows[(2, "+", "2 digits")] == (2, 1)  # 18 + 6 = 24 right, 14 + 6 = 21 wrong
    assert len(rows) == 3  # the answer step is not a think step
    table = arithmetic_table(rows)
    assert "| 2 | + | 2 digits | 2 | 0.500 |" in table


def test_cli_bad_caches_are_one_line_errors(tmp_path, capsys):
    from experiments.countdown_failures import main
    from experiments.rollout_cache import save_cache
    from test_train_head import synthetic_cache

    arith = save_cache(synthetic_cache([True, False], n=2, steps_per_rollout=[1, 1]), tmp_path / "arith.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(arith.read_bytes()[:200])
    cases = [(tmp_path / "missing.pt", "no rollout cache"), (arith, "a countdown rollout cache is needed"),
             (truncated, "truncated.pt is damaged")]
    for path, message in cases:
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_part_of_dots_is_no_step_in_an_unclosed_span_either():
    # ".." between two steps: no fault with the span closed, "malformed at step 1" with it open
    steps = "8 - 5 = 3, left 6 6 3.\n\n..\n\n6 * 3 = 18, left 6 18.\n\n"
    assert diagnose(NUMBERS, TARGET, RULES, steps, False).fault == "unfinished"
    assert diagnose(NUMBERS, TARGET, RULES, steps + "18 + 6 = 24, left 24.\n\n</think>Answer: x", True).fault is None


def test_fc_metrics_names_differing_lengths_whatever_holds_the_groups():
    import numpy as np
    import pytest

    from experiments.aha_metrics import fc_metrics

    for groups in ([0, 0, 1], np.array([0, 0, 1])):  # an array's truth value was the error raised
        with pytest.raises(ValueError, match="4 scores, 4 outcomes, 3 groups: lengths differ"):
            fc_metrics([0.1, 0.2, 0.3, 0.4], [True, False, True, False], groups)
