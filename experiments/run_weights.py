"""Which weights a search run's rows came from: `weights.json` in the run folder, so a model
(or a reflective model's head) trained again at the same path is not resumed into the rows of
the old one.

config.yaml names the policy and the scorer by their folders (`policy.path`, `scorer.path`); a
folder's weights can change under the same name (an SFT policy trained again in place, a head
saved over). A run folder keeps, for each such folder that holds weights, its resolved path, a
stat signature and the sha256 fingerprint of its files (config.json, the weights, a reflective
model's head: `policies.model_folder.model_files`). A rerun over rows compares them: equal signatures (the files were not
touched) pass without reading the weights; otherwise the weights are hashed, and other weights
refuse the run (`WeightsChangedError`, a ValueError: `error: ...`, exit 2) before anything loads.
A folder without rows yet is simply bound to today's weights, as is one written before
weights.json existed. A served component (policy=openai, scorer=served_prm) has no folder of
weights: the model id its server names is kept instead ("policy.served_model"), and a server
restarted with another model refuses the rerun alike (`check_served_models`).

    check_run_weights(out, model_folders(config), has_records=True)
    check_served_models(out, served_models({"policy": policy, "scorer": scorer}), has_records=True)

Tests: `.venv/bin/pytest tests/test_run_weights.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.result_json import write_atomic
from policies.model_folder import weights_fingerprint, weights_signature, weight_files

WEIGHTS_FILE = "weights.json"
MODEL_NODES: tuple[str, ...] = ("policy", "scorer")  # config nodes whose `path` may be a model folder
# (folder, signature) -> fingerprint already read in this process (a sweep's jobs share one model)
_FINGERPRINTS: dict[tuple[str, str], str] = {}


class WeightsChangedError(ValueError):
    """The run folder's rows came from other weights than its model folder holds now."""


def model_folders(config: dict[str, Any]) -> dict[str, Path]:
    """{"policy.path": folder, ...}: the resolved config's model folders that hold weights (a
    served policy's tokenizer folder holds none; a missing folder is the loader's error)."""
    folders = {}
    for node in MODEL_NODES:
        value = config.get(node, {}).get("path") if isinstance(config.get(node), dict) else None
        if not isinstance(value, str):
            continue
        folder = Path(value)
        try:
            weight_files(folder)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError):
            continue
        folders[f"{node}.path"] = folder.resolve()
    return folders


def fingerprint(folder: Path, signature: dict[str, list[int]]) -> str:
    """`weights_fingerprint(folder)`, read once per process for an untouched folder."""
    key = (str(folder), json.dumps(signature, sort_keys=True))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = weights_fingerprint(folder)
    return _FINGERPRINTS[key]


def read_saved(path: Path) -> dict[str, Any]:
    """weights.json as written; a ValueError naming it when it is not such a JSON object."""
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable ({err}): delete it to bind the run to today's weights") from None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ValueError(f"{path} is not a weights record (a JSON object of model folders)")
    return saved


def compare(saved: dict[str, Any], folders: dict[str, Path]) -> tuple[list[str], dict[str, Any]]:
    """(the keys whose folder holds other weights than their saved record, the record of today's
    folders): a saved key not among `folders` (a folder missing today, moved away to retrain?)
    keeps its record; untouched files (equal path and stat signature) are not read."""
    changed, now = [], dict(saved)
    for key, folder in folders.items():
        signature = weights_signature(folder)
        old = saved.get(key)
        if old is not None and old.get("path") == str(folder) and old.get("signature") == signature:
            continue  # the same files, untouched: nothing to read
        digest = fingerprint(folder, signature)
        if old is not None and old.get("fingerprint") != digest:
            changed.append(key)
        else:
            now[key] = {"path": str(folder), "signature": signature, "fingerprint": digest}
    return changed, now


def changed_folders(out: Path, folders: dict[str, Path]) -> list[str]:
    """The keys of out/weights.json whose folder (as the run's config resolves it now: `folders`,
    `model_folders`) holds other weights than the rows came from: what a caller that owns the run
    folder, such as the demo's sweep, searches again instead of being refused."""
    path = out / WEIGHTS_FILE
    return compare(read_saved(path), folders)[0] if path.is_file() else []


def served_models(components: dict[str, Any]) -> dict[str, str]:
    """{"policy.served_model": model id}: the model each served component's server names
    (`client.served_model()`: the one asked for, or the first listed), for each component that
    has such a client."""
    served = {}
    for node, component in components.items():
        ask = getattr(getattr(component, "client", None), "served_model", None)
        if callable(ask):
            served[f"{node}.served_model"] = str(ask().name)
    return served


def check_served_models(out: Path, served: dict[str, str], has_records: bool) -> None:
    """Refuse (WeightsChangedError) when out's rows came from another served model than its server
    names now (restarted with another checkpoint: its rows were resumed into the old ones); then
    keep the ids in out/weights.json beside the folders' records."""
    path = out / WEIGHTS_FILE
    saved = read_saved(path) if path.is_file() else {}
    for key, name in served.items():
        old = saved.get(key, {}).get("model")
        if has_records and old is not None and old != name:
            raise WeightsChangedError(
                f"{out} holds rows searched with the served model {old!r}, but its server now serves {name!r} "
                f"({key}): use another out_dir, or delete that folder to search again"
            )
    now = {**saved, **{key: {"model": name} for key, name in served.items()}}
    if now != saved:
        write_atomic(path, json.dumps(now, indent=1, sort_keys=True) + "\n")


def check_run_weights(out: Path, folders: dict[str, Path], has_records: bool) -> None:
    """Refuse (WeightsChangedError) when out's rows came from other weights than `folders` hold;
    then write out/weights.json for them (module docstring)."""
    path = out / WEIGHTS_FILE
    saved = read_saved(path) if has_records and path.is_file() else {}
    changed, now = compare(saved, folders)
    if changed:
        key = changed[0]
        raise WeightsChangedError(
            f"{out} holds rows searched with other weights than {key}={folders[key]} holds now (trained again in "
            f"place?): use another out_dir, or delete that folder to search again"
        )
    if now != saved:
        write_atomic(path, json.dumps(now, indent=1, sort_keys=True) + "\n")
