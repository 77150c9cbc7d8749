"""Getting an external PRM's folder into memory, and checking before its weights load that its
tokenizer fits the format (`scorers.lm_prm_scorer.LMPRMScorer.from_pretrained`): a missing folder,
config.json or weights file named; the model's own code in the folder never runs; a slow
tokenizer, a good or bad token of several tokens, one id for both, a chat layout without a chat
template named before minutes of loading a large model.

    directory = check_prm_folder(Path(path))
    tokenizer = load_prm_tokenizer(directory)
    good_id, bad_id = check_tokenizer(tokenizer, fmt, None, None)
    model = load_prm_model(directory, torch.bfloat16, causal_lm=True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from policies.checkpoint import DamagedCheckpointError, check_json_files, check_safetensors
from policies.model_folder import missing_folder_error
from scorers.prm_format import PRMFormat, check_chat_template, tokenizer_name


def check_prm_folder(directory: Path) -> Path:
    """FileNotFoundError naming a missing folder or its missing config.json; DamagedCheckpointError
    naming a JSON file (config, tokenizer, weight index) or safetensors file of it that is truncated
    or corrupted (their readers' own errors name no file)."""
    if not directory.is_dir():
        raise missing_folder_error(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"PRM folder {directory} has no config.json (a transformers model folder)")
    check_json_files(directory)
    for weights in sorted(directory.glob("*.safetensors")):  # headers only
        check_safetensors(weights)
    return directory


def load_prm_tokenizer(directory: Path) -> Any:
    """The folder's tokenizer, never fetched from a hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_prm_model(directory: Path, dtype: torch.dtype, causal_lm: bool = True) -> Any:
    """The folder's causal LM (causal_lm) or base model (the transformers class of its config,
    never the folder's own code) in dtype, weights in any layout transformers reads (one or
    sharded safetensors or .bin files); DamagedCheckpointError naming the folder when they do not
    load, FileNotFoundError when the folder lacks weights the model needs (transformers filled
    them at random: Qwen2.5-Math-PRM, which has no lm_head, read as a reader 'lm' PRM scored
    noise that changed with the torch seed)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model, info = auto.from_pretrained(str(directory), dtype=dtype, local_files_only=True, trust_remote_code=False,
                                           output_loading_info=True)
    except OSError as error:  # no weights file, or one transformers cannot read
        raise DamagedCheckpointError(f"PRM folder {directory}: its weights do not load: {error}") from error
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        what = "a reader 'lm' PRM is a causal LM with an output layer" if causal_lm else "the PRM's base model"
        raise FileNotFoundError(
            f"PRM folder {directory} lacks weights the model needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), which would be random: {what}; is scorer.prm_format the "
            "folder's? (Qwen2.5-Math-PRM is prm_format=qwen_prm)")
    return model


def check_tokenizer(tokenizer: Any, fmt: PRMFormat, good_id: int | None, bad_id: int | None) -> tuple[int, int]:
    """(good id, bad id) for fmt in tokenizer (reader "head" reads no tokens: -1, -1, but the
    chat layout's answer token, the good one, is still looked up: a step is read before it);
    ValueError naming what does not fit: a slow tokenizer, a good or bad token of several tokens,
    one id for both, no chat template for a chat layout."""
    check_fast(tokenizer)
    if fmt.layout != "tag":
        check_chat_template(tokenizer)
    if fmt.reader == "head":
        return (one_token(tokenizer, fmt.good, good_id, "good") if fmt.layout == "chat" else -1), -1
    good, bad = one_token(tokenizer, fmt.good, good_id, "good"), one_token(tokenizer, fmt.bad, bad_id, "bad")
    if good == bad:
        raise ValueError(f"good and bad are the same token id {good}: a score needs two")
    return good, bad


def check_cache_bytes(cache_bytes: object) -> None:
    """ValueError unless cache_bytes (the memory's budget) is an integer >= 0."""
    if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
        raise ValueError(f"cache_bytes={cache_bytes!r} must be an integer >= 0 (0: keep nothing across calls)")


def check_fast(tokenizer: Any) -> None:
    """ValueError naming the tokenizer unless it is a fast one (it maps characters to tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the tokenizer of {tokenizer_name(tokenizer)} is not a fast tokenizer: the PRM scorer "
            "needs its character offsets (a folder with tokenizer.json)"
        )


def one_token(tokenizer: Any, text: str, given: int | None, name: str) -> int:
    """The id of text as one token (given wins); ValueError naming it when it encodes to several."""
    if given is not None:
        if not isinstance(given, int) or isinstance(given, bool) or not 0 <= given < len(tokenizer):
            raise ValueError(f"{name}_id={given!r} must be a token id in [0, {len(tokenizer)})")
        return given
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the {name} token {text!r} encodes to {len(ids)} tokens {ids} in {tokenizer_name(tokenizer)}: "
            f"give {name}_id"
        )
    return int(ids[0])


def prm_parameters(config: Any, fmt: PRMFormat) -> int:
    """The weights a scored token goes through, as `LMPRMScorer` counts them: the base model
    (counted on the meta device, no memory) and, for reader "head", the two-class head; an LM
    reader's two rows of the output layer are not counted."""
    from transformers import AutoModel

    with torch.device("meta"):
        base = AutoModel.from_config(config)
    hidden = int(config.hidden_size)
    head = hidden * hidden + hidden + 2 * hidden + 2 if fmt.reader == "head" else 0
    return sum(p.numel() for p in base.parameters()) + head
