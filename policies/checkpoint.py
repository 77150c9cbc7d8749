"""Saving and loading a policy as an ordinary transformers model directory, atomically.

A checkpoint directory holds config.json, model.safetensors, generation_config.json and the
tokenizer files, so `AutoModelForCausalLM.from_pretrained(dir)` and vLLM read it as is.
Writes go to a temporary sibling directory that is renamed into place, so a reader (or a crash)
never sees a half-written checkpoint. Loading names the file at fault: a missing one is a
FileNotFoundError, one that is there but truncated or corrupted a `DamagedCheckpointError`.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from policies.devices import resolve_device
from policies.disk_full import disk_full_error
from policies.model_folder import (
    HEAD_FILES, TOKENIZER_FILES, WEIGHT_LAYOUTS, DamagedCheckpointError, check_model_folder, damaged,
    missing_folder_error, weight_files,
)

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # the weight dtypes a checkpoint loads in


def torch_dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name in DTYPES (as a config or a command line gives it);
    ValueError names any other value."""
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return getattr(torch, value.removeprefix("torch."))
    raise ValueError(f"dtype={value!r} is not one of {', '.join(DTYPES)}")


REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


# what torch.load raises on a truncated or corrupted file (a zip without its central directory is
# miniz's RuntimeError or an OSError EINVAL; an old-format pickle cut short is EOFError /
# UnpicklingError; other bytes, such as a text file named .pt, reach the legacy unpickler's lookups:
# KeyError, IndexError, UnicodeDecodeError, struct.error); a missing file or a permission error is
# not damage and stays itself
TORCH_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, IndexError, ValueError,
    struct.error,
)
NOT_DAMAGE: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)
# what marks a folder as a model folder, complete or damaged (`check_replaceable`)
MODEL_FOLDER_FILES: tuple[str, ...] = (
    "config.json", *(name for layout in WEIGHT_LAYOUTS for name in layout), *TOKENIZER_FILES, "tokenizer_config.json",
    *HEAD_FILES,
)


def check_json_files(directory: Path) -> None:
    """DamagedCheckpointError naming the first *.json file of directory (config, tokenizer,
    generation config, a weight index) that is not JSON: transformers' own errors name no file
    (a truncated tokenizer.json reads "Expecting ',' delimiter") or end in a traceback."""
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_bytes())
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
            raise damaged(path, error) from error


def check_safetensors(path: Path) -> None:
    """DamagedCheckpointError naming path unless its header parses and the tensors it lists cover
    the file exactly (safetensors' own check, reading only the header)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise damaged(path, error) from error


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a reader's error on a truncated or corrupted file into a DamagedCheckpointError naming
    path (a missing file or a permission error stays itself)."""
    try:
        yield
    except NOT_DAMAGE:
        raise
    except TORCH_LOAD_ERRORS as error:
        raise damaged(path, error) from error


def load_torch_file(path: str | Path, **kwargs: Any) -> Any:
    """torch.load(path, **kwargs); FileNotFoundError when it is not there, DamagedCheckpointError
    naming it when it is truncated or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    with reading(path):
        return torch.load(path, **kwargs)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside out_dir; on success it replaces out_dir.

    The old directory (if any) is first renamed aside and removed only after the new one is in
    place; on an exception the temporary directory is removed and out_dir is left untouched.
    The new folder and its files get the modes the umask gives new files (tempfile's 0700 / 0600,
    and some writers' own, made checkpoints unreadable to a server running as another user).
    An out_dir that is a symlink is written where it points, the link kept (a link to an empty
    folder was replaced by a folder, a dangling one failed with NotADirectoryError and left the
    temporary folder behind). Every folder written here is a model folder: an existing out_dir
    with files but none of a model folder's (`check_replaceable`) is someone else's folder and is
    refused (FileExistsError), before anything is written (replacing it deleted what it held).
    A writer that fills the disk raises an OSError (ENOSPC) naming out_dir (`policies.disk_full`).
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        share_as_umask(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(err, out_dir)  # torch's / safetensors' full disk: an OSError a CLI names in one line
        if full is not None:
            raise full from err
        raise
    old = None
    try:
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # the old folder back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out_dir: Path) -> None:
    """FileExistsError naming out_dir when it is a folder with files in it but none of a model
    folder's (MODEL_FOLDER_FILES: a config, weights, a tokenizer, a head): someone else's folder,
    not a model folder a save may replace (a damaged one, its config.json gone, is replaced: a
    resumed training's last/, a SmolLM2 conversion converted again)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / name).exists() for name in MODEL_FOLDER_FILES):
        raise FileExistsError(
            f"{out_dir} holds files but none of a model folder's ({', '.join(MODEL_FOLDER_FILES[:3])}, ...): "
            "saving there would delete them; give a new or empty folder"
        )


def check_loaded_keys(directory: Path, info: dict[str, Any]) -> None:
    """DamagedCheckpointError naming the folder when its weight files lack weights the model of
    its config.json needs (transformers gives them random values), hold weights it has no place
    for (dropped) or of other shapes than the config makes (a config.json of another size: loaded
    with ignore_mismatched_sizes, so this names them instead of transformers' RuntimeError after a
    table of every weight): the config and the weights do not belong together."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    resized = [f"{name} {list(saved)} in the file, {list(wanted)} by config.json"
               for name, saved, wanted in sorted(info.get("mismatched_keys") or ())]
    if not missing and not unexpected and not resized:
        return
    problems = [f"{len(names)} weight(s) {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for names, what in ((missing, "the model needs are not in its weight files"),
                                    (unexpected, "in its weight files are not the model's"),
                                    (resized, "of other shapes than config.json makes")) if names]
    raise DamagedCheckpointError(
        f"checkpoint folder {directory}: {'; '.join(problems)}; config.json and the weights do not belong "
        "together (a model would run with random weights)"
    )


@contextlib.contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    """Silence transformers' per-shard progress bars (they would break a training bar)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_load_report() -> Iterator[None]:
    """Silence transformers' load report (a warning table of every missing, unexpected or
    resized weight): `check_loaded_keys` names those in one error."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def write_checkpoint_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """save_pretrained of model (safetensors, generation config) and tokenizer into directory."""
    with _no_hf_progress_bars():
        model.save_pretrained(str(directory), safe_serialization=True)
    if not (directory / "generation_config.json").exists():  # only written when non-default
        model.generation_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write model + tokenizer to out_dir atomically (replacing what was there); return out_dir."""
    with atomic_directory(out_dir) as tmp:
        write_checkpoint_files(model, tokenizer, tmp)
    return Path(out_dir)


def current_umask() -> int:
    """The process's umask (Linux: read from /proc, untouched; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask(folder: Path) -> None:
    """folder and everything in it: the modes the umask gives a new folder (0777) or file (0666)."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def check_checkpoint(directory: str | Path) -> Path:
    """Raise FileNotFoundError naming the first missing required file (and the folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise missing_folder_error(directory)
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {directory} has no {name}")
    return directory


def load_checkpoint(
    directory: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a directory written by save_checkpoint (or any model
    folder `policies.model_folder` accepts: shards, .bin weights); dtype: the
    weights' (a torch dtype or its name in DTYPES); device: where the model goes ("cpu",
    "cuda[:N]"; one torch cannot see is a ValueError naming it, raised before anything loads).
    A missing file is a FileNotFoundError, a truncated safetensors or JSON file a
    DamagedCheckpointError, both naming the file; so are weights the config's model lacks or
    has no place for (`check_loaded_keys`)."""
    dtype, target = torch_dtype(dtype), resolve_device(device)
    directory = check_model_folder(directory)  # any hub layout: sharded, .bin, no generation config
    check_json_files(directory)
    for file in weight_files(directory):
        if file.suffix == ".safetensors":
            check_safetensors(file)
    with _no_hf_progress_bars(), _no_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    check_loaded_keys(directory, info)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model.eval()
    return model.to(target), tokenizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, path: Path) -> None:
    """Load a saved optimizer state (from the file `path`) into optimizer; a DamagedCheckpointError
    naming path when it is another model's: other parameter groups (torch's own error named no
    file), or moments of other shapes (torch loads those in silence and the first step failed
    inside AdamW with a size mismatch)."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedCheckpointError(f"{path} holds the optimizer state of another model ({err})") from err
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise DamagedCheckpointError(
                        f"{path} holds the optimizer state of another model ({name} of shape {tuple(value.shape)} "
                        f"for a parameter of shape {tuple(param.shape)})")
