"""Tests of the SPRM head (reference shapes, the score_module.pt file), its positions (hand-made
sequences, and a cross-check against the reference's vectorised training mask) and the
second-forward `SPRMScorer` (positions against a manual forward, step mapping, the terminal-step
rule, empty paths, batching, cost).

    .venv/bin/pytest tests/test_sprm.py
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from policies.checkpoint import DamagedCheckpointError
from policies.reflective_model import ReflectiveModel
from scorers.sprm_head import (
    SCORE_MODULE_FILE, build_sprm_head, load_score_module, save_score_module, sprm_head_num_parameters,
    sprm_logits,
)
from scorers.sprm_positions import (
    StepMarkers, path_step_scores, score_positions, separator_positions, step_of_positions, step_score,
)
from scorers.sprm_scorer import SPRMScorer
from test_transformers_policy import ID, SEP, TOK, ids, make_model
from treesearch.aggregation import geometric_mean
from treesearch.protocols import Scorer
from treesearch.records import Prefix, Problem, Step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_head(c: int) -> nn.Sequential:
    """The head exactly as the reference's score service builds it."""
    return nn.Sequential(nn.Linear(c, c * 2), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(c * 2, 1))


# -- the head -------------------------------------------------------------------------------------


def test_head_has_the_reference_keys_shapes_and_size():
    head = build_sprm_head(1536)
    shapes = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"0.weight": [3072, 1536], "0.bias": [3072], "3.weight": [1, 3072], "3.bias": [1]}
    # 1536*3072 + 3072 + 3072 + 1 = 4,718,592 + 6,144 + 1 = 4,724,737 (the "4.7M" of the paper)
    assert sum(p.numel() for p in head.parameters()) == sprm_head_num_parameters(1536) == 4_724_737
    with torch.device("meta"):  # the 32B model's head, counted without allocating it
        big = build_sprm_head(5120)
    # 5120*10240 + 10240 + 10240 + 1 = 52,428,800 + 20,480 + 1 = 52,449,281 ("52.4M")
    assert sum(p.numel() for p in big.parameters()) == sprm_head_num_parameters(5120) == 52_449_281


def test_a_reference_state_dict_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    theirs = reference_head(1536)
    torch.save(theirs.state_dict(), tmp_path / "score_module.pt")  # as the reference writes it
    ours = load_score_module(tmp_path)  # C read from the file
    assert not ours.training
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(3, 1536)
    assert torch.allclose(sprm_logits(ours, x), theirs.eval()(x).squeeze(-1), atol=1e-5)
    assert load_score_module(tmp_path, hidden_size=1536) is not None


def test_save_and_load_round_trip(tmp_path):
    head = build_sprm_head(8, seed=3)
    assert torch.equal(head[0].weight, build_sprm_head(8, seed=3)[0].weight)  # seeded
    path = save_score_module(head, tmp_path / "model")
    assert path.name == SCORE_MODULE_FILE and [p.name for p in path.parent.iterdir()] == [SCORE_MODULE_FILE]
    loaded = load_score_module(tmp_path / "model", 8)
    x = torch.randn(4, 8)
    assert torch.equal(sprm_logits(loaded, x), sprm_logits(head, x))
    # the head lands where it is loaded to (the LM's device; meta stands in for a GPU here): it
    # stayed on the CPU beside a GPU model, and its first step failed on mixed devices
    elsewhere = load_score_module(tmp_path / "model", 8, map_location="meta")
    assert {p.device.type for p in elsewhere.parameters()} == {"meta"}
    bf16 = save_score_module(build_sprm_head(8, seed=3).to(torch.bfloat16), tmp_path / "bf16")
    assert {p.dtype for p in load_score_module(bf16.parent).parameters()} == {torch.bfloat16}


def test_saved_checkpoints_are_readable_as_the_umask_allows(tmp_path):
    """tempfile's 0700 folders and 0600 files (and the writers' own) made every checkpoint
    unreadable to another user, e.g. a vLLM server's; now the umask's modes."""
    import os
    import stat

    from policies.checkpoint import current_umask

    mask = current_umask()
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        model = ReflectiveModel(make_model(len(TOK), seed=2), build_sprm_head(64, seed=5), feature_layer=-1)
        folder = tmp_path / "ckpt"
        model.save_pretrained(folder, TOK)
        save_score_module(build_sprm_head(8), tmp_path / "alone")
    finally:
        os.umask(old)
    assert current_umask() == mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "alone" / SCORE_MODULE_FILE).stat().st_mode) == 0o644


def test_load_errors_name_the_file_key_and_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="score_module.pt"):
        load_score_module(tmp_path)
    save_score_module(build_sprm_head(8), tmp_path)
    with pytest.raises(ValueError, match=r"score_module.pt is the SPRM head of a model with hidden size 8, not of this "
                                         r"model \(hidden size 16\)"):
        load_score_module(tmp_path, hidden_size=16)
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / SCORE_MODULE_FILE)
    with pytest.raises(ValueError, match=r"missing keys \['0.weight'.*unexpected keys \['weight'\]"):
        load_score_module(tmp_path, hidden_size=8)


def test_inference_logits_skip_dropout_even_in_train_mode():
    head = build_sprm_head(16, seed=0).train()
    x = torch.randn(64, 16)
    first, again = sprm_logits(head, x), sprm_logits(head, x)
    assert torch.equal(first, again)
    assert torch.allclose(first, head.eval()(x).squeeze(-1), atol=1e-6)


# -- positions ------------------------------------------------------------------------------------

SEP_ID, OPEN, CLOSE = 9, 7, 8
MARKERS = StepMarkers(frozenset({SEP_ID}), OPEN, CLOSE)


def test_positions_follow_the_reference_rules():
    # idx:  0  1     2    3  4    5    6  7    8      9  10
    seq = [1, OPEN, SEP_ID, 2, SEP_ID, SEP_ID, 3, SEP_ID, CLOSE, 4, SEP_ID]
    # 2: right after <think> (skipped); 4: counts; 5: second of a run; 7: counts; 10: after </think>
    assert separator_positions(seq, MARKERS) == [4, 7]
    assert score_positions(seq, MARKERS) == [3, 6]  # the token just before each separator
    assert score_positions(seq, MARKERS, start=5) == [6]  # only separators of the completion


def test_a_prompt_that_opens_think_starts_the_span_and_may_hold_the_read_token():
    prompt, completion = [1, OPEN, 2], [SEP_ID, 3, SEP_ID]
    # the first separator's read position is the prompt's last token (2)
    assert score_positions(prompt + completion, MARKERS, start=len(prompt)) == [2, 4]
    assert score_positions([1, 2, SEP_ID, 3, SEP_ID], MARKERS) == []  # no <think>: nothing counts


def test_without_think_markers_every_first_separator_counts():
    markers = StepMarkers(frozenset({SEP_ID, 10}))
    seq = [SEP_ID, 1, SEP_ID, 10, 2, 10]  # a run may mix separator ids
    assert separator_positions(seq, markers) == [0, 2, 5]
    assert score_positions(seq, markers) == [1, 4]  # position 0 has no token before it


def test_markers_validate():
    with pytest.raises(ValueError, match="give both or neither"):
        StepMarkers(frozenset({1}), 2, None)
    with pytest.raises(ValueError, match="also a separator"):
        StepMarkers(frozenset({2}), 2, 3)
    markers = StepMarkers.from_tokenizer(TOK, len(TOK))
    assert markers == StepMarkers(frozenset({ID[SEP]}), ID["<think>"], ID["</think>"])


def reference_training_mask(x: torch.Tensor) -> torch.Tensor:
    """The reference's get_score_mask (dp_actor.py), re-typed: separators [B, L] that are first
    of a run, not right after <think>, between the first <think> and the last </think>."""
    mask = x == SEP_ID
    first = mask & ~nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    after_open = nn.functional.pad((x == OPEN)[:, :-1], (1, 0), value=False)
    final = first & ~after_open
    is_start, is_end = x == OPEN, x == CLOSE
    length = x.shape[1]
    start = torch.where(is_start.any(1), is_start.float().argmax(1), torch.zeros(x.shape[0], dtype=torch.long))
    end = length - 1 - torch.flip(is_end, dims=[1]).float().argmax(1)
    positions = torch.arange(length)[None]
    return final & (positions >= start[:, None]) & (positions <= end[:, None])


def test_positions_equal_the_reference_mask_on_well_formed_traces():
    rng = random.Random(0)
    for _ in range(200):
        body = lambda n: [rng.choice([1, 2, 3, SEP_ID, SEP_ID]) for _ in range(n)]  # noqa: E731
        seq = body(rng.randint(0, 3)) + [OPEN] + body(rng.randint(0, 12))
        if rng.random() < 0.7:
            seq += [CLOSE] + body(rng.randint(0, 4))
        expected = reference_training_mask(torch.tensor([seq]))[0].nonzero().squeeze(-1).tolist()
        assert separator_positions(seq, MARKERS) == expected, seq


def test_positions_map_to_the_step_holding_the_separator():
    # steps of 2 and 3 tokens from position 3: [3, 5) and [5, 8)
    assert step_of_positions([4, 5, 7], [2, 3], start=3) == [0, 1, 1]
    with pytest.raises(ValueError, match="beyond the last step"):
        step_of_positions([8], [2, 3], start=3)


def test_step_scores_own_reading_else_the_mean_of_earlier_steps():
    assert step_score([0.3], []) == 0.3
    assert step_score([0.25, 1.0], []) == pytest.approx(0.5)  # geometric mean of its own readings
    assert step_score([], [0.25, 1.0]) == pytest.approx(0.5)  # sqrt(0.25 * 1.0)
    assert step_score([], []) == 0.0  # no separator anywhere: the reference's 0
    assert step_score([], [0.5, None]) is None  # an unscored earlier step: unknown
    scores = path_step_scores([[0.25], [1.0], []])
    assert scores == pytest.approx([0.25, 1.0, 0.5])
    # the terminal step keeps the path's geometric mean: (0.25 * 1 * 0.5)^(1/3) = 0.5
    assert geometric_mean(scores) == pytest.approx(geometric_mean([0.25, 1.0]))


# -- the second-forward scorer --------------------------------------------------------------------

LM = make_model(len(TOK))
HEAD = build_sprm_head(64, seed=1)
with torch.no_grad():
    HEAD[3].weight.mul_(8)  # spread the scores over (0, 1) rather than ~0.5
MODEL = ReflectiveModel(LM, HEAD)
SCORER = SPRMScorer(MODEL, TOK, prompt_fn=lambda p: p.question)


def step(text: str, finish: str = "separator") -> Step:
    token_ids = tuple(ids(text)) + ((ID["<eos>"],) if finish == "eos" else ())
    return Step(text, token_ids, (0.0,) * len(token_ids), finish)


def manual_scores(sequence: list[int], positions: list[int], layer: int = -2) -> list[float]:
    with torch.no_grad():
        hidden = LM(input_ids=torch.tensor([sequence]), output_hidden_states=True).hidden_states[layer][0]
        return torch.sigmoid(HEAD.eval()(hidden[positions]).squeeze(-1)).tolist()


def test_scorer_reads_the_token_before_each_separator_and_maps_steps():
    path = Prefix(
        Problem("a", "<think>1"),
        (step("+2=3" + SEP), step(SEP + "3x2=6" + SEP + SEP), step("</think>6" + SEP, "eos")),
    )
    reading = SCORER.read([path])[0]
    prompt = TOK("<think>1").input_ids  # <bos> <think> 1
    sequence = prompt + [t for s in path.steps for t in s.token_ids]
    assert reading.token_ids == tuple(sequence) and reading.prompt_length == 3
    # the 1st separator is at 3 + 4 = 7 (read 6); the 2nd step's leading separator (8) follows one
    # (skipped), its own is at 8 + 1 + 5 = 14 (read 13), then 15 continues the run; the separator
    # after </think> (18) is outside the span
    assert reading.positions == (6, 13)
    expected = manual_scores(sequence, [6, 13])
    assert reading.position_scores == pytest.approx(expected, abs=1e-5)
    a, b = expected
    assert reading.step_scores == pytest.approx([a, b, math.sqrt(a * b)], abs=1e-5)
    assert reading.value == pytest.approx(math.sqrt(a * b), abs=1e-5)  # the reference's value
    assert geometric_mean(reading.step_scores) == pytest.approx(reading.value, abs=1e-5)
    assert isinstance(SCORER, Scorer) and SCORER.score([path])[0] == list(reading.step_scores)


def test_paths_without_separators_score_zero():
    empty, direct = Prefix(Problem("a", "<think>1")), Prefix(Problem("b", "<think>"), (step("</think>4", "eos"),))
    readings = SCORER.read([empty, direct])
    assert [r.step_scores for r in readings] == [(), (0.0,)]
    assert [r.value for r in readings] == [0.0, 0.0]
    assert SCORER.path_scores([empty]) == [0.0]


def test_batches_mixing_lengths_equal_each_path_alone_and_cost_counts_tokens():
    paths = [
        Prefix(Problem("a", "<think>1"), (step("+2=3" + SEP), step("</think>3", "eos"))),
        Prefix(Problem("b", "<think>12+34=46-7"), (step("=39" + SEP),)),
        Prefix(Problem("c", "<think>5"), (step("x2=10" + SEP), step("+1=11" + SEP), step("1", "length"))),
    ]
    batched = SPRMScorer(MODEL, TOK, prompt_fn=lambda p: p.question, batch_size=2).score(paths)
    for path, row in zip(paths, batched):
        assert row == pytest.approx(SCORER.score([path])[0], abs=1e-5)
    lengths = [len(TOK(p.problem.question).input_ids) + sum(s.num_tokens for s in p.steps) for p in paths]
    assert SCORER.cost(paths) == sum(lengths)


def test_the_feature_layer_is_a_setting():
    path = Prefix(Problem("a", "<think>1"), (step("+2=3" + SEP),))
    last = SPRMScorer(ReflectiveModel(LM, HEAD, feature_layer=-1), TOK, prompt_fn=lambda p: p.question)
    reading = last.read([path])[0]
    assert reading.position_scores == pytest.approx(manual_scores(list(reading.token_ids), [6], layer=-1), abs=1e-5)
    assert reading.position_scores != pytest.approx(SCORER.read([path])[0].position_scores, abs=1e-3)
    with pytest.raises(ValueError, match="feature_layer=3 must index the 3 hidden states"):
        ReflectiveModel(LM, HEAD, feature_layer=3)
    with pytest.raises(ValueError, match="reads 8 features"):
        ReflectiveModel(LM, build_sprm_head(8))


def test_a_step_with_text_but_no_token_ids_is_named():
    # a step built from text (a reference solution) scored [0.0, 1e-10] over the prompt alone
    path = Prefix(Problem("a", "<think>1"), (Step("+2=3" + SEP, (), (), "separator"),))
    with pytest.raises(ValueError, match=r"problem 'a': step 0 has text but no token_ids; the model reads a "
                                         r"path's exact token ids"):
        SCORER.read([path])


def test_steps_of_another_tokenizer_are_named_by_the_scorer_before_any_forward():
    lookups = []
    hook = SCORER.model.lm.get_input_embeddings().register_forward_pre_hook(lambda module, args: lookups.append(args))
    path = Prefix(Problem("a", "<think>1"), (Step("x", (10_000,), (-0.1,), "separator"),))
    try:
        with pytest.raises(ValueError, match=r"problem 'a': token id 10000 of its path lies outside this model's vocabulary"):
            SCORER.read([Prefix(Problem("b", "<think>1"), ()), path])  # one good path in the batch: no forward of it either
    finally:
        hook.remove()
    assert lookups == []


def test_a_path_longer_than_the_context_window_is_named():
    # a 150-step path of a 512-token model was scored at positions the model never saw, in silence
    window = MODEL.lm.config.max_position_embeddings
    prompt = len(TOK("<think>1").input_ids)
    fits = Prefix(Problem("a", "<think>1"), (Step("x", (ID["1"],) * (window - prompt), (-0.1,) * (window - prompt), "length"),))
    assert len(SCORER.read([fits])[0].token_ids) == window
    over = Prefix(Problem("b", "<think>1"), (Step("x", (ID["1"],) * (window - prompt + 1), (-0.1,) * (window - prompt + 1), "length"),))
    with pytest.raises(ValueError, match=rf"problem 'b': the SPRM reads {window + 1} tokens \(prompt \+ steps\), more "
                                         rf"than its model's context window of {window}"):
        SCORER.read([fits, over])


def test_a_head_of_another_model_is_named_as_such_and_a_truncated_one_once(tmp_path):
    # an intact head of hidden size 64 beside a 32-wide model was "damaged or incomplete (truncated
    # or corrupted)", and a truncated one said "damaged" twice
    folder = MODEL.save_pretrained(tmp_path / "run", TOK)
    save_score_module(build_sprm_head(32), folder)
    with pytest.raises(ValueError, match=r"the SPRM head of a model with hidden size 32, not of this model \(hidden size 64\)") as caught:
        ReflectiveModel.from_pretrained(folder)
    assert not isinstance(caught.value, DamagedCheckpointError)
    data = (folder / SCORE_MODULE_FILE).read_bytes()
    (folder / SCORE_MODULE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError) as caught:
        ReflectiveModel.from_pretrained(folder)
    assert str(caught.value).count("damaged") == 1, str(caught.value)


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2, -3])
def test_the_feature_tap_gives_the_hidden_state_output_hidden_states_gives(layer):
    from policies.feature_tap import tap_or_none

    ids = torch.tensor([TOK("<think>1+2=3").input_ids])
    with torch.inference_mode():
        expected = LM(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        tap = tap_or_none(LM, layer)
        assert tap is not None
        with tap:
            LM(input_ids=ids)
    assert torch.equal(tap.states, expected)


def test_an_inference_forward_keeps_only_the_feature_layer_and_training_keeps_every_layer(monkeypatch):
    # every layer's states were kept for the read of one: ~45 MB a layer on 16 paths of 2775 tokens
    asked: list[bool] = []
    forward = type(LM).forward

    def spy(self, *args, **kwargs):
        asked.append(bool(kwargs.get("output_hidden_states")))
        return forward(self, *args, **kwargs)

    ids = torch.tensor([TOK("<think>1+2=3").input_ids])
    with torch.inference_mode():
        plain = LM(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    monkeypatch.setattr(type(LM), "forward", spy)
    with torch.inference_mode():
        tapped = MODEL(ids).features
    assert asked[-1] is False and torch.equal(tapped, plain)
    training = ReflectiveModel(LM, HEAD)
    training.train()
    try:
        training(ids)
    finally:
        training.eval()
    assert asked[-1] is True


def test_a_model_of_another_layout_keeps_asking_for_hidden_states():
    from policies.feature_tap import tap_or_none

    class Wrapped(nn.Module):  # no get_decoder(): the tap cannot find its layer
        def __init__(self):
            super().__init__()
            self.inner = LM

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    assert tap_or_none(Wrapped().eval(), -2) is None


def test_the_forward_scorer_loads_its_model_in_the_dtype_asked(tmp_path):
    # scorer=sprm_forward always loaded float32: a 7B reflective model took ~28 GB
    folder = MODEL.save_pretrained(tmp_path / "run", TOK)
    half = SPRMScorer.from_pretrained(folder, lambda p: p.question, dtype="bfloat16")
    assert next(half.model.lm.parameters()).dtype == torch.bfloat16
    path = Prefix(Problem("a", "<think>1"), (step("+2=3" + SEP), step("x2=6" + SEP)))
    assert half.score([path])[0] == pytest.approx(SCORER.score([path])[0], abs=0.05)


def test_scores_attached_through_the_feature_tap_equal_the_forward_scorers(monkeypatch):
    # the reflective-policy tests drive a ScriptedLM, which the tap cannot find its layer in: here a
    # plain Llama, whose prefill keeps only the feature layer, must attach what SPRMScorer reads
    from policies import decode_loop
    from policies.sampling_config import SamplingConfig
    from policies.transformers_policy import TransformersPolicy

    tapped: list[bool] = []
    real = decode_loop.tap_or_none

    def counted(lm, layer):
        tap = real(lm, layer)
        tapped.append(tap is not None)
        return tap

    monkeypatch.setattr(decode_loop, "tap_or_none", counted)
    policy = TransformersPolicy.from_reflective(MODEL, TOK, SamplingConfig(temperature=1.0, max_step_tokens=6,
                                                                           max_total_tokens=24), lambda p: p.question)
    rows = policy.rollout([Prefix(Problem("a", "<think>1")), Prefix(Problem("b", "<think>12+3"))], n=4, seed=5)
    paths = [Prefix(Problem(pid, q), tuple(steps)) for (pid, q), row in zip([("a", "<think>1"), ("b", "<think>12+3")], rows)
             for steps in row]
    assert tapped and all(tapped)  # every prefill kept the feature layer alone
    attached = [[s.score for s in p.steps] for p in paths]
    read = SCORER.score(paths)
    pairs = [(a, r) for row_a, row_r in zip(attached, read) for a, r in zip(row_a, row_r) if a is not None]
    assert pairs and all(a == pytest.approx(r, abs=1e-5) for a, r in pairs)


def test_a_feature_layer_other_than_the_heads_saved_one_is_refused(tmp_path):
    # search took scorer.feature_layer=-1 over a head trained on -2 in silence (other scores), as
    # training refuses the same mismatch; a reference folder (no sprm.json) takes any layer
    from policies.reflective_model import SPRM_CONFIG_FILE, check_reflective_folder

    folder = ReflectiveModel(LM, HEAD, feature_layer=-2).save_pretrained(tmp_path / "m", TOK)
    assert check_reflective_folder(folder)[0] == check_reflective_folder(folder, -2)[0] == -2
    for refuse in (lambda: check_reflective_folder(folder, -1), lambda: ReflectiveModel.from_pretrained(folder, feature_layer=-1)):
        with pytest.raises(ValueError, match=r"feature_layer=-1, but the head of .* was trained on hidden layer -2 "
                                             r"\(sprm.json\): leave feature_layer unset"):
            refuse()
    states = LM.config.num_hidden_layers + 1
    assert check_reflective_folder(folder, states - 2)[0] == states - 2  # the same layer, counted from the front
    (folder / SPRM_CONFIG_FILE).unlink()
    assert ReflectiveModel.from_pretrained(folder, feature_layer=-1)[0].feature_layer == -1
