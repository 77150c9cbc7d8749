"""Which tokens are the step separator (`separator_match`): "suffix", every token whose text ends
with it; "exact", the separator's own token, the MetaStone-S1 reference's rule (the id of
'.\\n\\n', 382 in a Qwen vocabulary, where ~30 tokens end with '.\\n\\n'). The Qwen presets use
"exact"; the policies, the SPRM positions, the scorer yamls, the scorer service, search and
train resumes all read it.

    python -m pytest tests/test_separator_match.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from experiments.serve import build_parser
from experiments.train import ADDED_SETTINGS as TRAIN_ADDED_SETTINGS
from policies.sampling_config import SamplingConfig
from policies.step_stops import StepStopRule, separator_mask
from scorers.sprm_positions import StepMarkers, separator_positions
from test_search_resume import ckpt  # noqa: F401 (the module-scoped tiny checkpoint)
from treesearch.config_diff import config_differences, with_added_settings
from treesearch.steps import StepFormat

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "conf"
QWEN_PRESETS = ("xbai_o4", "metastone_s1_1p5b", "metastone_s1_7b", "metastone_s1_32b", "qwen25_math_1p5b",
                "qwen25_math_7b", "r1_distill_qwen_1p5b")


class QwenLikeTokenizer:
    """Decodes each id to its text; like a Qwen vocabulary it holds tokens glued to '.\\n\\n'."""

    TEXTS = ("a", ".\n\n", ").\n\n", "...\n\n", "<think>", "</think>", "<eos>", "b")
    unk_token_id = None

    def __len__(self) -> int:
        return len(self.TEXTS)

    def batch_decode(self, ids: list[list[int]], **_: object) -> list[str]:
        return [self.TEXTS[row[0]] for row in ids]

    def get_vocab(self) -> dict[str, int]:
        return {text: i for i, text in enumerate(self.TEXTS)}


TOK = QwenLikeTokenizer()
A, SEP, PAREN, DOTS, OPEN, CLOSE, EOS, B = range(len(TOK))


def test_exact_marks_the_separator_token_alone_and_suffix_every_token_ending_with_it():
    assert separator_mask(TOK, len(TOK), ".\n\n", "suffix").nonzero().squeeze(-1).tolist() == [SEP, PAREN, DOTS]
    assert separator_mask(TOK, len(TOK), ".\n\n", "exact").nonzero().squeeze(-1).tolist() == [SEP]
    assert separator_mask(TOK, len(TOK) + 3, ".\n\n", "exact").tolist()[len(TOK):] == [False] * 3  # a wider logit layer
    with pytest.raises(ValueError, match=r"separator_match='prefix' must be one of suffix, exact"):
        separator_mask(TOK, len(TOK), ".\n\n", "prefix")
    with pytest.warns(UserWarning, match=r"no token's text is separator='\)\.'"):
        separator_mask(TOK, len(TOK), ").", "exact")


def test_the_decoding_rule_ends_steps_at_the_exact_token_only():
    tokens = [A, PAREN, B, SEP, A, DOTS, SEP, B]  # after <think> (the context)

    def boundaries(match: str) -> list[int]:
        rule = StepStopRule.from_tokenizer(TOK, len(TOK), ".\n\n", "<think>", "</think>", [EOS], separator_match=match)
        state, out = rule.initial_state([[OPEN]], "cpu"), []
        for i, token in enumerate(tokens):
            boundary, state = rule.advance(torch.tensor([token]), state)
            out += [i] if bool(boundary[0]) else []
        return out

    # suffix: ').\n\n' ends a step, and the '.\n\n' right after '...\n\n' is the second of a run
    assert boundaries("suffix") == [1, 3, 5]
    assert boundaries("exact") == [3, 6]


def test_the_sprm_positions_follow_the_step_format():
    sequence = [OPEN, A, PAREN, B, SEP, A, DOTS, SEP, CLOSE]
    exact = StepMarkers.from_tokenizer(TOK, len(TOK), StepFormat(separator_match="exact"))
    suffix = StepMarkers.from_tokenizer(TOK, len(TOK), StepFormat())
    assert exact.separator_ids == {SEP} and suffix.separator_ids == {SEP, PAREN, DOTS}
    assert separator_positions(sequence, exact) == [4, 7]
    assert separator_positions(sequence, suffix) == [2, 4, 6]


def test_settings_are_checked_and_carried_to_the_step_format():
    with pytest.raises(ValueError, match=r"^separator_match='Exact' must be one of suffix, exact"):
        SamplingConfig(separator_match="Exact")
    with pytest.raises(ValueError, match=r"StepFormat.separator_match=1 must be one of"):
        StepFormat(separator_match=1)  # type: ignore[arg-type]
    sampling = SamplingConfig(separator="\n", think_open="<t>", think_close="</t>", separator_match="exact")
    assert sampling.step_format == StepFormat("\n", "<t>", "</t>", "exact")
    assert SamplingConfig().separator_match == "suffix" and StepFormat().separator_match == "suffix"


def composed(overrides: list[str], name: str = "search"):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_the_qwen_presets_use_the_references_token_and_the_scorers_follow(preset):
    assert composed([f"policy={preset}"]).policy.sampling.separator_match == "exact"
    for scorer in ("sprm_forward", "vllm_sprm"):
        assert composed([f"policy={preset}", f"scorer={scorer}"]).scorer.step_format.separator_match == "exact"


def test_the_scorers_follow_the_policy_and_default_to_suffix_when_it_names_none():
    assert composed(["policy=tiny", "scorer=sprm_forward"]).scorer.step_format.separator_match == "suffix"
    assert composed(["policy=tiny", "scorer=sprm_forward", "policy.sampling.separator_match=exact"]
                    ).scorer.step_format.separator_match == "exact"
    # a user's policy node without the key (one written before it existed)
    assert composed(["policy=tiny", "scorer=vllm_sprm", "~policy.sampling.separator_match"]
                    ).scorer.step_format.separator_match == "suffix"
    assert composed([], "train").sampling.separator_match == "suffix"


def test_the_served_scorer_reads_the_references_token_by_default():
    args = build_parser().parse_args(["scorer", "--model", "m"])
    assert args.separator_match == "exact"
    assert build_parser().parse_args(["scorer", "--model", "m", "--separator-match", "suffix"]).separator_match == "suffix"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scorer", "--model", "m", "--separator-match", "prefix"])


def test_a_training_run_saved_before_the_setting_resumes_as_suffix_only():
    current = {"sampling": {"_target_": "policies.sampling_config.SamplingConfig", "separator": ".\n\n",
                            "separator_match": "suffix"}}
    saved = {"sampling": {"_target_": "policies.sampling_config.SamplingConfig", "separator": ".\n\n"}}
    assert config_differences(with_added_settings(saved, current, TRAIN_ADDED_SETTINGS), current) == []
    exact = {"sampling": {**current["sampling"], "separator_match": "exact"}}
    assert config_differences(with_added_settings(saved, exact, TRAIN_ADDED_SETTINGS), exact) == [
        "sampling.separator_match: 'suffix' -> 'exact'"]


def search(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "experiments.search", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                        "PATH": "/usr/bin:/bin"})


def test_a_search_saved_before_the_setting_resumes_and_exact_is_another_run(ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [f"policy.path={ckpt}", "task.count=2", "chunk=1", "search=best_of_n", "search.n=2",
            "policy.sampling.max_total_tokens=8", "progress=false", f"out_dir={out}"]
    first = search(args, ROOT)
    assert first.returncode == 0, first.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["policy"]["sampling"].pop("separator_match") == "suffix"
    (out / "config.yaml").write_text(yaml.safe_dump(config))  # as a folder saved before the setting
    rows = (out / "records.jsonl").read_text()
    again = search(args, ROOT)
    assert again.returncode == 0, again.stderr
    assert (out / "records.jsonl").read_text() == rows  # resumed, nothing to add
    assert len([json.loads(line) for line in rows.splitlines()]) == 2
    other = search([*args, "policy.sampling.separator_match=exact"], ROOT)
    assert other.returncode != 0
    assert "policy.sampling.separator_match: 'suffix' -> 'exact'" in other.stderr


def test_training_refuses_an_exact_separator_no_token_is_and_names_suffix():
    from types import SimpleNamespace

    from experiments.train import check_separator_ends_tokens

    def settings(match: str) -> SimpleNamespace:
        return SimpleNamespace(sampling=SamplingConfig(separator=").", separator_match=match),
                               loss=SimpleNamespace(spr_coef=1.0), init_from="ckpt")

    none = StepMarkers(frozenset())
    with pytest.raises(ValueError, match=r"sampling.separator='\)\.' is no token of ckpt's vocabulary.*"
                                         r"sampling.separator_match=suffix \(every token whose text ends with it\)"):
        check_separator_ends_tokens(settings("exact"), none)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ends no token") as suffix:
        check_separator_ends_tokens(settings("suffix"), none)  # type: ignore[arg-type]
    assert "separator_match" not in str(suffix.value)
    check_separator_ends_tokens(settings("exact"), StepMarkers(frozenset({SEP})))  # type: ignore[arg-type]


def test_a_head_scorers_step_format_is_checked_and_must_match_the_policys_before_loading():
    from experiments.search import check_head_step_format, check_policy_sampling

    def cfg(*overrides: str):
        return composed(["policy=tiny_sprm", "scorer=sprm_forward", *overrides])

    check_head_step_format(cfg())
    check_head_step_format(cfg("policy.sampling.separator_match=exact"))  # the scorer follows the policy
    with pytest.raises(ValueError, match=r"^scorer.step_format.separator_match='Exact' must be one of suffix, exact$"):
        check_head_step_format(cfg("scorer.step_format.separator_match=Exact"))
    with pytest.raises(ValueError, match=r"^scorer.step_format.separator='' must be a non-empty string$"):
        check_head_step_format(cfg("scorer.step_format.separator="))
    with pytest.raises(ValueError, match=r"^scorer.step_format.separator_match='suffix' differs from "
                                         r"policy.sampling.separator_match='exact': the head would read"):
        check_head_step_format(cfg("policy.sampling.separator_match=exact", "scorer.step_format.separator_match=suffix"))
    with pytest.raises(ValueError, match=r"^scorer.step_format.separator='X' differs from policy.sampling.separator="):
        check_head_step_format(cfg("scorer.step_format.separator=X"))
    # a scorer without a step format (confidence) or a policy node without the key (its default, suffix)
    check_head_step_format(composed(["scorer=confidence", "policy.sampling.separator_match=exact"]))
    check_head_step_format(cfg("~policy.sampling.separator_match"))
    with pytest.raises(ValueError, match=r"^policy.sampling.separator_match='Exact' must be one of suffix, exact$"):
        check_policy_sampling(composed(["policy.sampling.separator_match=Exact"]).policy)
    with pytest.raises(ValueError, match=r"^policy.sampling.top_p=2 must be in \(0, 1\]$"):
        check_policy_sampling(composed(["policy.sampling.top_p=2"]).policy)
