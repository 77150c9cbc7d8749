"""Pins of `separator_match` wiring and user config folders that a mutation review found no test
holding: VLLMPolicy, OpenAIPolicy and training's step markers read sampling.separator_match (under
"exact" the separator's own token only); the served scorer's --separator-match reaches its
TextSPRM; an in-process search with a head scorer whose step format differs from the policy's is
refused before any run folder is written; the sweep settles a run saved before
scorer.step_format.separator_match (or policy.sampling.separator_match) into the series of runs
that ran alike, against every peer, not the first sorted one; and the early group check reads
`++hydra.searchpath=[file://DIR]`, quoted entries, `pkg://a/b` with slashes and a trailing
`--config-dir` with no value.

No vLLM, no server, no trained model: a fake tokenizer (tests/test_separator_match.py), the tiny
random checkpoint (tests/tiny_checkpoint.py) with a random SPRM head, and hand-written run folders
(tests/test_scaling.py's write_run).

    .venv/bin/python -m pytest tests/test_separator_pins.py
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from experiments.group_options import unknown_group_option, user_config_dirs
from experiments.sweep_metrics import sweep_summaries
from policies.sampling_config import SamplingConfig
from scorers.sprm_head import build_sprm_head, save_score_module
from test_scaling import write_run
from test_search_resume import CONFIG_DIR, run_in_process
from test_separator_match import DOTS, EOS, PAREN, SEP, TOK
from tiny_checkpoint import TINY_SHAPE, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sprm_ckpt(tmp_path_factory) -> Path:
    """The tiny random checkpoint plus a random SPRM head (for policy=tiny_sprm)."""
    out = save_tiny_checkpoint(tmp_path_factory.mktemp("sprm") / "last")
    save_score_module(build_sprm_head(TINY_SHAPE.hidden, seed=0), out)
    return out


# --- the policies and training read sampling.separator_match --------------------------------------


@pytest.mark.parametrize("match, expected", [("exact", {SEP}), ("suffix", {SEP, PAREN, DOTS})])
def test_vllm_policy_marks_the_separator_tokens_its_sampling_separator_match_names(match, expected):
    from policies.vllm_policy import VLLMPolicy

    # no engine is started: the constructor only reads the tokenizer
    policy = VLLMPolicy(object(), TOK, SamplingConfig(separator_match=match), lambda q: q.question, 0, (EOS,), len(TOK))
    assert set(policy.marks.separator_ids) == expected


def test_openai_policy_marks_the_separator_tokens_its_sampling_separator_match_names(sprm_ckpt):
    from policies.openai_policy import OpenAIPolicy

    def separators(match: str) -> list[str]:
        sampling = SamplingConfig(separator="\n", separator_match=match)
        # nothing listens there: the server is first asked at the first call
        with OpenAIPolicy("http://127.0.0.1:9/v1", "m", sprm_ckpt, sampling, lambda q: q.question) as policy:
            return sorted(policy.tokenizer.decode([i]) for i in policy.marks.separator_ids)

    assert separators("exact") == ["\n"]
    assert len(separators("suffix")) > 1 and "\n" in separators("suffix")  # the tokenizer has tokens ending with it


@pytest.mark.parametrize("match, expected", [("exact", {SEP}), ("suffix", {SEP, PAREN, DOTS})])
def test_training_step_markers_follow_sampling_separator_match(match, expected):
    from experiments.train import step_markers

    s = SimpleNamespace(sampling=SamplingConfig(separator_match=match), loss=SimpleNamespace(spr_coef=1.0))
    reflective = SimpleNamespace(config=SimpleNamespace(vocab_size=len(TOK)))
    assert set(step_markers(s, reflective, TOK).separator_ids) == expected  # type: ignore[arg-type]


# --- the served scorer ----------------------------------------------------------------------------


@pytest.mark.parametrize("match", ["exact", "suffix"])
def test_the_served_scorer_builds_its_text_sprm_with_the_flags_separator_match(match, monkeypatch):
    import experiments.serve as serve
    import experiments.services.scorer_service as scorer_service
    import policies.reflective_model as reflective_model

    seen = {}

    class RecordingSPRM:
        def __init__(self, model, tokenizer, step_format, **_):
            seen["format"] = step_format

    monkeypatch.setattr(reflective_model.ReflectiveModel, "from_pretrained", staticmethod(lambda *a, **k: (object(), object())))
    monkeypatch.setattr(scorer_service, "TextSPRM", RecordingSPRM)
    monkeypatch.setattr(scorer_service, "build_scorer_app", lambda *a, **k: None)
    serve.build_scorer(serve.build_parser().parse_args(["scorer", "--model", "m", "--separator-match", match]))
    assert seen["format"].separator_match == match


# --- search refuses a head scorer reading other separators than the policy -------------------------


def test_a_search_whose_head_scorer_reads_other_separators_than_the_policy_is_refused_before_writing(sprm_ckpt, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"scorer.step_format.separator_match='exact' differs from "
                                         r"policy.sampling.separator_match='suffix'"):
        run_in_process(["policy=tiny_sprm", "scorer=sprm_forward", f"policy.path={sprm_ckpt}", "task.count=1",
                        "search.n=2", "policy.sampling.max_total_tokens=8", "progress=false",
                        "scorer.step_format.separator_match=exact", f"out_dir={out}"])
    assert not out.exists()


# --- the sweep settles runs saved before a setting ------------------------------------------------


def test_a_head_scorer_run_saved_before_separator_match_is_one_scorer_series_with_suffix_runs(tmp_path):
    fmt = {"_target_": "treesearch.steps.StepFormat", "separator": ".\n\n", "think_open": "<think>",
           "think_close": "</think>"}
    for name, step_format in (("old", fmt), ("new", {**fmt, "separator_match": "suffix"}),
                              ("exact", {**fmt, "separator_match": "exact"})):
        scorer = {"_target_": "scorers.sprm_scorer.SPRMScorer.from_pretrained", "path": "ckpt/final",
                  "step_format": step_format}
        write_run(tmp_path / name, "best_of_n", 2, 0, [True, False], 10, scorer=scorer)
    runs = {r.run: r for r in sweep_summaries(tmp_path)}
    assert {name: r.scorer for name, r in runs.items()} == {
        "old": "SPRMScorer (scorer.step_format.separator_match=suffix)",
        "new": "SPRMScorer (scorer.step_format.separator_match=suffix)",
        "exact": "SPRMScorer (scorer.step_format.separator_match=exact)"}
    assert runs["old"].scorer_key == runs["new"].scorer_key != runs["exact"].scorer_key


def test_a_run_lacking_a_setting_that_sorts_first_does_not_keep_the_others_from_settling(tmp_path):
    # ckpt/0's run sorts first and lacks the key: model A's old run must still join A's new one
    target = {"_target_": "policies.sampling_config.SamplingConfig", "temperature": 0.7}
    for name, path, sampling in (("A-old", "ckpt/A", target), ("A-new", "ckpt/A", {**target, "separator_match": "suffix"}),
                                 ("0-old", "ckpt/0", target)):
        write_run(tmp_path / name, "best_of_n", 2, 0, [True, False], 10, policy_path=path)
        config = OmegaConf.load(tmp_path / name / "config.yaml")
        config.policy.sampling = sampling
        (tmp_path / name / "config.yaml").write_text(OmegaConf.to_yaml(config))
    runs = {r.run: r for r in sweep_summaries(tmp_path)}
    assert {name: r.workload for name, r in runs.items()} == {
        "A-old": "arith (policy.path=ckpt/A)", "A-new": "arith (policy.path=ckpt/A)", "0-old": "arith (policy.path=ckpt/0)"}
    assert runs["A-old"].workload_key == runs["A-new"].workload_key


# --- user config folders on the command line ------------------------------------------------------


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A config folder of one's own holding a task option the repository's folder lacks."""
    conf = tmp_path / "my_conf"
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "arith_small.yaml").write_text((CONFIG_DIR / "task" / "arith.yaml").read_text())
    return conf


def passes_the_group_check(argv: list[str]) -> bool:
    error = unknown_group_option([*argv, "task=arith_small"], CONFIG_DIR, "search")
    assert error is None or error.startswith("error: task=arith_small is not an option"), error
    return error is None


def test_the_users_folder_alone_makes_its_option_known():
    assert not passes_the_group_check([])


@pytest.mark.parametrize("template", ["++hydra.searchpath=[file://{conf}]", "+hydra.searchpath=[file://{conf}]",
                                      "hydra.searchpath=['file://{conf}']", 'hydra.searchpath=["file://{conf}"]',
                                      "hydra.searchpath=[pkg://experiments.conf, 'file://{conf}']"])
def test_searchpath_entries_with_plus_signs_and_quotes_add_the_users_folder(user_conf, template):
    argument = template.format(conf=user_conf)
    assert user_conf in user_config_dirs([argument])
    assert passes_the_group_check([argument])


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
    """An importable package `sep49_user_pkg` whose `conf` subpackage holds task/arith_small.yaml."""
    conf = tmp_path / "pkgroot" / "sep49_user_pkg" / "conf"
    (conf / "task").mkdir(parents=True)
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    (conf / "task" / "arith_small.yaml").write_text((CONFIG_DIR / "task" / "arith.yaml").read_text())
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    yield str(conf)
    for name in ("sep49_user_pkg.conf", "sep49_user_pkg"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("entry", ["pkg://sep49_user_pkg/conf", "pkg://sep49_user_pkg.conf"])
def test_a_pkg_searchpath_entry_with_slashes_or_dots_adds_the_packages_folder(user_package, entry):
    argument = f"hydra.searchpath=[{entry}]"
    assert user_config_dirs([argument]) == [Path(user_package)]
    assert passes_the_group_check([argument])


@pytest.mark.parametrize("flag", ["--config-dir", "-cd"])
def test_a_trailing_config_dir_flag_without_a_folder_adds_none_and_does_not_raise(flag):
    assert user_config_dirs(["task=arith", flag]) == []
    assert unknown_group_option(["task=arith", flag], CONFIG_DIR, "search") is None
    assert unknown_group_option(["task=arith_small", flag], CONFIG_DIR, "search").startswith(
        "error: task=arith_small is not an option of group task")
