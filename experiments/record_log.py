"""An append-only JSONL log of per-problem records that survives being killed at any moment.

Writes: `append_rows` encodes complete lines (each ends with a newline), writes them with ONE
`os.write` on a file opened with O_APPEND, then fsyncs; a kill can at worst leave a torn last
line, never a torn line in the middle. Reads: `load_rows` returns every complete row and cuts a
torn last line off the file (so the next append starts on a fresh line); a corrupt line that is
not the last one is an error naming the file and line, not something to guess around. Readers
that do not append (sweep tables, plots) pass `repair=False`: the torn line is skipped and the
file left alone (it may be a row another process is still writing, or a read-only copy).

    rows = load_rows(path)                      # [] when the file does not exist
    rows = load_rows(path, repair=False)        # the same, never writing to the file
    rows = load_rows(path, keys=("problem_id",))  # a row without one is an error naming its line
    append_rows(path, [{"problem_id": "p1", ...}])
    check_row_questions(path, rows, problems)   # rows of other data files (ids are line numbers) refused

Tests: `.venv/bin/pytest tests/test_search_resume.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from treesearch.records import Problem


class RecordLogError(ValueError):
    """A records file that cannot be trusted (a corrupt line before the end)."""


def encode_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    """One JSON document per line, every line newline-terminated."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def append_rows(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as complete lines: one write (O_APPEND), then fsync."""
    if not rows:
        return
    data = encode_rows(rows)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # a short write (rare on regular files): finish it
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_lines(path: Path, raw: bytes, keys: Sequence[str] = ()) -> tuple[list[dict[str, Any]], int]:
    """(rows, byte length of the trusted part). A torn last line (no newline after it: a write
    cut short) or one of NUL bytes (what a crash can leave of a file's end) is left out; any other
    line that does not parse, the last one too, and a complete row without one of keys are errors
    naming their line (a hand edit, not a kill: `append_rows` writes whole lines at once). A blank
    line (`echo >> records.jsonl`) holds no row and is passed over."""
    rows: list[dict[str, Any]] = []
    good = 0
    lines = raw.split(b"\n")
    # after the last "\n" comes b"" (a clean end) or the torn rest of a line
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if number == len(lines) - 1 and not lines[-1] and b"\x00" in line:
                break  # the last line holds a crash's NUL bytes: treat it as torn
            raise RecordLogError(f"{path}: line {number} is not a JSON object ({err}); refusing to guess") from err
        missing = [key for key in keys if key not in row]
        if missing:
            raise RecordLogError(f"{path}: line {number} has no {missing[0]!r}: not a row this log writes; refusing to guess")
        rows.append(row)
        good += len(line) + 1
    return rows, good


def load_rows(path: str | os.PathLike[str], repair: bool = True, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every complete row of the log, in file order; cuts a torn last line off the file unless
    repair is False (a reader that does not append: the file is only read); keys: what every row
    must hold (a search's records: "problem_id")."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good = _parse_lines(path, raw, keys)
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return rows


def check_row_questions(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]],
                        problems: Sequence[Problem]) -> None:
    """A ValueError when a row holds another question than the problem of its id: a benchmark's
    ids are line numbers (gsm8k-test-1), so rows made on other data files ($TREESEARCH_DATA_DIR,
    task.config.path) were taken as done and reported as this slice's. Rows without a question,
    or of a problem not in `problems`, are not compared."""
    questions = {p.id: p.question for p in problems}
    for row in rows:
        expected, held = questions.get(row.get("problem_id")), row.get("question")
        if expected is not None and isinstance(held, str) and held != expected:
            raise ValueError(f"{path}: the row of {row['problem_id']} holds another question than the data file's "
                             f"({held[:60]!r} vs {expected[:60]!r}): it was made on other data files "
                             "($TREESEARCH_DATA_DIR, task.config.path); use another output folder")
