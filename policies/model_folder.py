"""What a model folder must hold to load, in any layout the hub ships: config.json, the weights
(one model.safetensors, safetensors shards named by model.safetensors.index.json, or the same two
layouts of pytorch_model.bin) and a tokenizer (tokenizer.json or tokenizer_config.json).
`policies.checkpoint.check_checkpoint` asks for what this project's own checkpoints hold (one
model.safetensors and a generation config); models made elsewhere (a sharded 7B, a PRM without a
generation config) are checked here before they load, so a missing file is named, not met
minutes later inside transformers or vLLM.

    directory = check_model_folder("/models/Qwen2.5-Math-7B-Instruct")   # FileNotFoundError naming what lacks
    weight_files(directory)        # [.../model-00001-of-00004.safetensors, ...]
    weights_fingerprint(directory) # sha256 of config.json, the weights and a head: which model this is
                                   # (heads=False: of the backbone alone, what a rollout cache's features read)

Tests: `.venv/bin/pytest tests/test_model_folder.py`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

READ_CHUNK = 1 << 20
# a reflective model's head beside its backbone (policies.reflective_model's SCORE_MODULE_FILE and
# SPRM_CONFIG_FILE, named here so this module imports no torch)
HEAD_FILES: tuple[str, ...] = ("score_module.pt", "sprm.json")

# (index file, single file) of each weight layout, safetensors first (what loaders prefer)
WEIGHT_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# files that carry a tokenizer's vocabulary (fast, SentencePiece, BPE, WordPiece); a
# tokenizer_config.json alone passed, and transformers then failed naming neither folder nor file
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is there but cannot be read (truncated by a full disk or a copy cut
    short, corrupted): the message names the file."""


def damaged(path: Path, error: BaseException) -> DamagedCheckpointError:
    """The DamagedCheckpointError of `path`, quoting the first sentence of the reader's own error."""
    reason = str(error).split(". ")[0].strip()
    return DamagedCheckpointError(
        f"{path} is damaged or incomplete (truncated or corrupted): {type(error).__name__}: {reason}"
    )


def check_model_folder(directory: str | Path) -> Path:
    """The folder, or FileNotFoundError naming the first thing it lacks: the folder itself,
    config.json, weights (or a shard its index names), a tokenizer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise missing_folder_error(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {directory} has no config.json")
    weight_files(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"checkpoint folder {directory} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return directory


def missing_folder_error(directory: Path) -> FileNotFoundError:
    """The error for a checkpoint folder that is not a folder: missing, or a file inside one
    (`.../final/config.json` names its folder)."""
    if directory.is_file():
        return FileNotFoundError(
            f"{directory} is a file, not a checkpoint folder; pass the folder that holds it ({directory.parent})"
        )
    where = "" if directory.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
    return FileNotFoundError(f"checkpoint folder {directory} does not exist{where}")


def weight_files(directory: Path) -> list[Path]:
    """The folder's weight files in the first layout it has (`WEIGHT_LAYOUTS`): the single file,
    or every shard its index names; FileNotFoundError naming the folder when it has none, or a
    shard the index names that is not there; DamagedCheckpointError naming an index that is no
    JSON object with a "weight_map" of file names."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        index, single = directory / index_name, directory / single_name
        if index.is_file():
            try:
                names = sorted({str(name) for name in json.loads(index.read_bytes())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as error:  # cut short, or no weight_map
                raise damaged(index, error) from error
            shards = [directory / name for name in names]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"checkpoint folder {directory}: {index_name} names {len(missing)} shard(s) that are not "
                    f"there ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                )
            return shards
        if single.is_file():
            return [single]
    names = " or ".join(f"{single} (or {index})" for index, single in WEIGHT_LAYOUTS)
    raise FileNotFoundError(f"checkpoint folder {directory} has no weights: {names}")


def model_files(directory: Path, heads: bool = True) -> list[Path]:
    """The files that make a folder's model compute what it does: config.json, the weights, and a
    reflective model's SPRM head when it has one and heads (score_module.pt, sprm.json:
    `policies.reflective_model`; a head trained again over a frozen backbone changes only them)."""
    head_files = [directory / name for name in HEAD_FILES if heads and (directory / name).is_file()]
    return [directory / "config.json", *weight_files(directory), *head_files]


def weights_signature(directory: str | Path) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of the model's files (`model_files`): what a stat tells of
    them without reading a byte (equal signatures: the same files, untouched; a differing one
    says nothing until `weights_fingerprint` reads them)."""
    directory = Path(directory)
    signature = {}
    for path in model_files(directory):
        stat = path.stat()
        signature[path.name] = [stat.st_size, stat.st_mtime_ns]
    return signature


def weights_fingerprint(directory: str | Path, heads: bool = True) -> str:
    """sha256 over the model's files (`model_files`: names and bytes): the same model gives the
    same value wherever its folder lies or however it is named, a retrained one another. heads=False
    leaves a reflective model's SPRM head out: what a rollout cache keeps, so features of an older
    backbone are not mistaken for this one's, while a head trained again over the same backbone
    keeps its caches. Reads every weight byte: ~0.5 s a GB here (SmolLM2's 0.54 GB: 0.44 s).
    FileNotFoundError as `check_model_folder`'s."""
    directory = Path(directory)
    if not directory.is_dir():
        raise missing_folder_error(directory)
    digest = hashlib.sha256()
    for path in model_files(directory, heads):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
