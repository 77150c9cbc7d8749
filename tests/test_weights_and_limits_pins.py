"""Pins from a mutation review of session 51's changes: gradient accumulation syncs only on the
last micro-batch part (`train.accumulate`); the sweep readers attach a run without weights.json
only to a workload / scorer equal to it but for weights, and only one that agrees with what it
records (`attach_unrecorded_weights`), and show the weights in labels only where they alone tell
configs apart (`weights_labels`); `max_token_chars` gives no span for pipelines that drop or merge
characters and widens it by COMPOSED_CHARS = 4 per composing normaliser; plot_aha's `draw` gives
an all-null curve no line and no legend entry.

    .venv/bin/python -m pytest tests/test_weights_and_limits_pins.py
"""
from __future__ import annotations

import contextlib
import math

import pytest
from test_scaling import ARITH, write_run
from test_sweep_weights import NEW, OLD, folder_record, record
from test_train_micro_batches import hand_trainer, mixed_batch

from experiments import train
from experiments.scaling import scaling_by_strategy
from experiments.services.api_schemas import FieldError
from experiments.services.token_chars import COMPOSED_CHARS, check_fits, max_token_chars
from experiments.sweep_metrics import sweep_summaries

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- train.accumulate: only the last part's backward syncs ---------------------------------------

def test_micro_batch_parts_skip_the_gradient_sync_but_the_last():
    t = hand_trainer(micro_batches=2)
    events: list[str] = []

    @contextlib.contextmanager
    def no_sync(model):
        assert model is t.model
        events.append("no_sync enter")
        yield
        events.append("no_sync exit")

    real_backward = t.accelerator.backward
    t.accelerator.no_sync = no_sync
    t.accelerator.backward = lambda loss: (events.append("backward"), real_backward(loss))
    train.accumulate(t, mixed_batch())
    assert events == ["no_sync enter", "backward", "no_sync exit", "backward"]


# -- sweep_metrics.attach_unrecorded_weights ---------------------------------------------------------

def series_of(runs) -> dict[str, list[tuple[int, int]]]:
    return {s.name: [(p.budget, p.runs) for p in s.points] for s in scaling_by_strategy(runs)}


def test_unrecorded_runs_of_another_task_count_stay_their_own_workload(tmp_path):
    for seed in (0, 1):  # count=4 folders saved before weights.json, recorded count=10 folders beside them
        write_run(tmp_path / f"count4-{seed}", "best_of_n", 4, seed, [True] * 4, 40, task={**ARITH, "count": 4})
        write_run(tmp_path / f"count10-{seed}", "best_of_n", 4, seed, [i < 2 for i in range(10)], 40)
        record(tmp_path / f"count10-{seed}", **{"policy.path": folder_record(OLD)})
    runs = sweep_summaries(tmp_path)
    assert {r.run: r.workload for r in runs} == {
        "count4-0": "arith (task.count=4)", "count4-1": "arith (task.count=4)",
        "count10-0": "arith (task.count=10)", "count10-1": "arith (task.count=10)"}
    assert series_of(runs) == {"best_of_n [arith (task.count=4)]": [(4, 2)],
                               "best_of_n [arith (task.count=10)]": [(4, 2)]}


def test_an_unrecorded_scorer_run_joins_the_one_recorded_scorer_weights(tmp_path):
    head = {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "path": "outputs/heads/arith/final"}
    for seed in (0, 1, 2):
        write_run(tmp_path / f"sprm-{seed}", "best_of_n", 4, seed, [True, False], 40, scorer=head)
        if seed:  # sprm-0: saved before weights.json existed
            record(tmp_path / f"sprm-{seed}", **{"policy.path": folder_record(OLD), "scorer.path": folder_record(OLD)})
    runs = sweep_summaries(tmp_path)
    assert {r.run: (r.workload, r.scorer) for r in runs} == {f"sprm-{seed}": ("arith", "SPRMScorer") for seed in (0, 1, 2)}
    assert series_of(runs) == {"best_of_n": [(4, 3)]}


def test_a_run_recording_other_weights_than_a_served_model_run_is_not_pooled_with_it(tmp_path):
    # openai-0 recorded only its local copy (OLD); openai-1 another copy (NEW) and its served model
    write_run(tmp_path / "openai-0", "best_of_n", 4, 0, [True, False], 40)
    record(tmp_path / "openai-0", **{"policy.path": folder_record(OLD)})
    write_run(tmp_path / "openai-1", "best_of_n", 4, 1, [True, True], 40)
    record(tmp_path / "openai-1", **{"policy.path": folder_record(NEW), "policy.served_model": {"model": "tiny-b"}})
    runs = sweep_summaries(tmp_path)
    old = "arith (weights.policy.path=7f6135d7b2f5, weights.policy.served_model=unset)"
    new = "arith (weights.policy.path=6ad2a1decb7d, weights.policy.served_model=tiny-b)"
    assert {r.run: r.workload for r in runs} == {"openai-0": old, "openai-1": new}
    assert series_of(runs) == {f"best_of_n [{old}]": [(4, 1)], f"best_of_n [{new}]": [(4, 1)]}


# -- sweep_metrics.weights_labels: the path tells them apart, the weights are not shown ---------------

def test_policies_at_other_paths_are_labelled_by_their_path_not_their_weights(tmp_path):
    for name, fingerprint in (("a", OLD), ("b", NEW), ("c", None)):
        path = f"ckpt/{name}"
        write_run(tmp_path / name, "best_of_n", 4, 0, [True, False], 40, policy_path=path)
        if fingerprint:
            record(tmp_path / name, **{"policy.path": folder_record(fingerprint, path)})
    labels = {r.run: r.workload for r in sweep_summaries(tmp_path)}
    assert labels == {n: f"arith (policy.path=ckpt/{n})" for n in "abc"}


def test_scorer_heads_at_other_paths_are_labelled_by_their_path_not_their_weights(tmp_path):
    for name, fingerprint in (("a", OLD), ("b", NEW)):
        head = {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "path": f"heads/{name}"}
        write_run(tmp_path / name, "best_of_n", 4, 0, [True, False], 40, scorer=head)
        record(tmp_path / name, **{"policy.path": folder_record(OLD), "scorer.path": folder_record(fingerprint)})
    labels = {r.run: r.scorer for r in sweep_summaries(tmp_path)}
    assert labels == {n: f"SPRMScorer (scorer.path=heads/{n})" for n in "ab"}


# -- token_chars.max_token_chars ---------------------------------------------------------------

@pytest.fixture(scope="module")
def base_tokenizer():
    from policies.tiny_tokenizer import build_tokenizer

    return build_tokenizer()  # byte-level BPE: every character kept, a span of its longest token


def changed(base, edit):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(base.backend_tokenizer.to_str())
    edit(raw)
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def test_no_span_for_a_normaliser_sequence_that_strips(base_tokenizer):
    from tokenizers import normalizers

    assert max_token_chars(base_tokenizer) is not None
    strip = normalizers.Sequence([normalizers.NFC(), normalizers.Strip()])
    assert max_token_chars(changed(base_tokenizer, lambda raw: setattr(raw, "normalizer", strip))) is None


def test_no_span_for_pre_tokenizers_that_drop_blanks(base_tokenizer):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    removed = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"), byte_level])
    assert max_token_chars(changed(base_tokenizer, lambda raw: setattr(raw, "pre_tokenizer", removed))) is None
    whitespace = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), byte_level])
    assert max_token_chars(changed(base_tokenizer, lambda raw: setattr(raw, "pre_tokenizer", whitespace))) is None


def test_no_span_for_unknown_token_models():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -1.5)],
                                       unk_id=0, byte_fallback=False))
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    for raw in (unigram, word_level):
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
        assert max_token_chars(tok) is None, raw.model


def test_each_composing_normaliser_widens_the_span_four_times(base_tokenizer):
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    assert COMPOSED_CHARS == 4  # Unicode's longest canonical decomposition
    span = max_token_chars(base_tokenizer)
    both = normalizers.Sequence([normalizers.NFC(), normalizers.NFKC()])
    assert max_token_chars(changed(base_tokenizer, lambda raw: setattr(raw, "normalizer", both))) == 16 * span
    # NFC makes "e" + U+0301 one "é" token: 800 characters in 400 tokens fit a context of 512
    raw = Tokenizer(models.BPE(vocab={"é": 0, "a": 1}, merges=[]))
    raw.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    text = "e\u0301" * 400
    assert len(tok(text, add_special_tokens=False).input_ids) == 400
    check_fits("prefix_prompt", text, 512, max_token_chars(tok), "the model's context is 512")  # no FieldError
    with pytest.raises(FieldError):
        check_fits("prefix_prompt", text * 3, 512, max_token_chars(tok), "the model's context is 512")


# -- plot_aha.draw -----------------------------------------------------------------------------

def test_an_all_null_curve_gets_no_line_and_no_legend_entry():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plot_aha import draw

    rows = [{"step": s, "fc/a": 0.1 * s, "fc/b": None} for s in range(5)]
    fig, ax = plt.subplots()
    try:
        draw(ax, rows, [("fc/a", "curve a", "C0", "-"), ("fc/b", "curve b (all null)", "C1", "--")])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["curve a"]
        assert len(ax.lines) == 1 and not any(math.isnan(y) for y in ax.lines[0].get_ydata())
    finally:
        plt.close(fig)
