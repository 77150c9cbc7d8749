"""Argument types for the argparse command lines (the benchmarks, `experiments/bench_*.py`): a bad
number fails at parse time, before any model loads, as argparse's own one-line error
(`usage: ...` then `<prog>: error: argument --problems: '0' must be an integer >= 1`, exit 2).

    ap.add_argument("--problems", type=positive_int, default=16)
    ap.add_argument("--top", type=nonnegative_int, default=10)         # 0 means something here
    ap.add_argument("--kv-cache-gib", type=positive_float, default=1.0)
    ap.add_argument("--port", type=port_number, default=8000)          # 1-65535
    ap.add_argument("--device", type=device_name, default="cpu")       # cpu, cuda, cuda:N torch sees here
    ap.add_argument("--ns", type=int_list(), default=(4, 8, 16, 32))    # "4,8,16": each >= 1
    args = ap.parse_args(argv)
    check_beam_shape(ap, args.n, args.beam_width)                       # N / M across two options
    check_file_target(args.out, "--out")                                # ValueError: a folder, under a file

Tests: `.venv/bin/python -m pytest tests/test_bench_args.py`.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Callable, Mapping


def bounded_int(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (ArgumentTypeError naming the bound otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = bounded_int(1)
positive_int.__doc__ = "An argparse type: an integer >= 1 (a count where 0 means nothing)."
nonnegative_int = bounded_int(0)
nonnegative_int.__doc__ = "An argparse type: an integer >= 0 (where 0 means something documented)."


TORCH_SEEDS = range(-2**63, 2**64)  # what torch.manual_seed takes (a larger one failed with "Overflow when unpacking long long")
SEED_RULE = f"must be an integer from {TORCH_SEEDS.start} to {TORCH_SEEDS.stop - 1} (torch's seeds)"


def check_seed(name: str, value: int) -> None:
    """ValueError naming the setting when value is not a seed torch takes (TORCH_SEEDS)."""
    if value not in TORCH_SEEDS:
        raise ValueError(f"{name}={value} {SEED_RULE}")


def seed_int(text: str) -> int:
    """An argparse type: an integer torch takes as a seed (`check_seed`)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value not in TORCH_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r} {SEED_RULE}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, an integer in 1-65535 (a larger one would wrap around to
    another port: 70000 bound 4464)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port number in 1-65535")
    return value


def device_name(text: str) -> str:
    """An argparse type: a device the model can run on here ("cpu", "cuda", "cuda:N"), text
    unchanged once `policies.devices.resolve_device` accepts it; its ValueError (a GPU torch cannot
    see, an unknown name) is argparse's error, before any model loads."""
    from policies.devices import resolve_device  # torch: imported only where a --device is parsed

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def named_as_flag(message: str, owner: str, flags: Mapping[str, str]) -> str:
    """A config class's error as the flag typed: a leading "Owner.field=" (field in flags, the
    field's flag without its dashes) becomes "--flag " ("SFTConfig.num_threads=0; must be >= 1"
    -> "--threads 0; must be >= 1"); any other message unchanged."""
    match = re.match(rf"{re.escape(owner)}\.(\w+)=", message)
    if match is None or match[1] not in flags:
        return message
    return f"--{flags[match[1]]} {message[match.end():]}"


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan made every comparison false, and inf no number JSON takes)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def int_list(minimum: int = 1, allow_empty: bool = False) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each >= minimum ("16,32" -> (16, 32); blanks
    between commas are skipped); an empty list only when allow_empty."""
    one = bounded_int(minimum)

    def parse(text: str) -> tuple[int, ...]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            values = tuple(one(part) for part in parts)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}" if len(parts) > 1 else str(error)) from None
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"{text!r} must list at least one integer >= {minimum}")
        return values

    parse.__name__ = f"list of integers >= {minimum}"
    return parse


def check_beam_shape(
    parser: argparse.ArgumentParser, n: int, beam_width: int, n_option: str = "--n",
    width_option: str = "--beam-width",
) -> None:
    """parser.error (exit 2) unless beam search can run N = n paths with beam width M = beam_width:
    M <= N and N divisible by M (`treesearch.beam_search.check_beam_shape`, checked here before
    any model loads)."""
    if beam_width > n:
        parser.error(f"argument {width_option}: {beam_width} must be <= {n_option} ({n})")
    if n % beam_width:
        parser.error(f"argument {n_option}: {n} must be divisible by {width_option} ({beam_width})")


def check_file_target(path: Path, flag: str, example_name: str = "out.json") -> None:
    """ValueError naming a path option (`--out FILE`) no file can be written at: an existing
    folder (the message suggests example_name inside it), or a path under an existing file.
    Called before the work, which would fail only after it."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path such as {path / example_name}")
    if unexpanded_home(path):
        raise ValueError(f"{flag} {path} {UNEXPANDED_HOME}")
    check_parents_are_folders(path, flag)


UNEXPANDED_HOME = "starts with '~', which no shell expanded here (it would be a folder named '~'): give $HOME/... or the full path"


def unexpanded_home(path: Path) -> bool:
    """A path whose first part is "~" or "~user" as typed (`--out=~/x`, `out_dir='~/x'`): the shell
    expands it only as a word of its own, so the run wrote into ./~ (and a later `rm -rf ~` ...)."""
    return bool(path.parts) and path.parts[0].startswith("~")


def check_folder_target(path: Path, flag: str) -> None:
    """ValueError naming a folder option (`--out DIR`, `--save DIR`) that is no folder one can
    write (`folder_problem`). Called before the work, which would fail only after it."""
    problem = folder_problem(path)
    if problem is not None:
        raise ValueError(f"{flag} {path} {problem}{'; give a folder' if problem == EXISTING_FILE else ''}")


EXISTING_FILE = "is an existing file"


def folder_problem(path: Path) -> str | None:
    """Why a run cannot write its folder at path, or None: a "~" no shell expanded, a symbolic link to nothing (a missing
    folder or a loop: "File exists" when made), an existing file, a path under a file, or a place
    the user may not write (PermissionError after the work)."""
    if unexpanded_home(path):
        return UNEXPANDED_HOME
    if path.is_symlink() and not path.exists():
        return "is a symbolic link to nothing (a missing folder, or a loop)"
    if path.exists() and not path.is_dir():
        return EXISTING_FILE
    above = file_above(path)
    if above is not None:
        return f"lies under {above}, an existing file"
    ancestor = next((p for p in (path, *path.parents) if p.exists()), None)
    if ancestor is not None and not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be written (no write permission on {ancestor})"
    return None


def check_parents_are_folders(path: Path, flag: str) -> None:
    above = file_above(path)
    if above is not None:
        raise ValueError(f"{flag} {path} lies under {above}, an existing file")


def file_above(path: Path) -> Path | None:
    """The first of path's parents that exists and is not a folder (nothing can be written under
    it), or None."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
