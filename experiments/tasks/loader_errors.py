"""Reading the benchmark files row by row, with errors that say where: file, line (or row) and
field.

Every benchmark loader (gsm8k.py, math500.py, aime.py, ceval.py) reads its rows through these
helpers, which yield (RowLocation, record) pairs; `where.require(record, "answer", str)` checks a
field and `raise where.error("...", field="answer")` reports any other fault, so a bad row fails
the same way everywhere:

    DataFormatError: /.../test.jsonl, line 7, field 'answer': expected str, got int (42)

Files must be UTF-8: bytes that are not raise the same DataFormatError, naming the line and the
byte offset in the file.

Where the files are: a path the user gives wins; else `$TREESEARCH_DATA_DIR/<relative>`; else
`<repo>/../shared/data/<relative>` (the shared data folder beside the checkout). The project
reads the files in place and never copies them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

DATA_DIR_ENV = "TREESEARCH_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]

Row = dict[str, Any]


class DataFormatError(ValueError):
    """A row of a data file is malformed. path, line (1-based; a row number for parquet files,
    see unit) and field (None for a row that is not even a record) say where."""

    def __init__(self, path: str | os.PathLike[str], line: int, message: str, field: str | None = None,
                 unit: str = "line") -> None:
        self.path, self.line, self.field, self.unit = str(path), line, field, unit
        where = f"{self.path}, {unit} {line}" + (f", field {field!r}" if field is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class RowLocation:
    """Where a record sits: path, line (1-based; a row number when unit == "row")."""

    path: Path
    line: int
    unit: str = "line"

    def place(self) -> dict[str, Any]:
        """A problem's meta entries for where it comes from: "source" and "line" (a hub or
        parquet row: "row"), as `benchmark_split.check_unique_ids` names them."""
        return {"source": str(self.path), self.unit: self.line}

    def error(self, message: str, field: str | None = None) -> DataFormatError:
        """A DataFormatError at this place (the caller raises it)."""
        return DataFormatError(self.path, self.line, message, field=field, unit=self.unit)

    def require_text(self, record: Row, field: str) -> str:
        """record[field] when it is a string with something besides whitespace; else a
        DataFormatError naming file, line and field."""
        value = self.require(record, field, str)
        if not value.strip():
            raise self.error(f"expected non-empty text, got {value!r:.60}", field=field)
        return value

    def require(self, record: Row, field: str, kind: type | tuple[type, ...]) -> Any:
        """record[field] when present and of type `kind` (a bool never counts as an int); else a
        DataFormatError naming file, line and field."""
        if field not in record:
            raise self.error("missing", field=field)
        value = record[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise self.error(f"expected {expected}, got {type(value).__name__} ({repr(value)[:60]})", field=field)
        return value


def default_data_dir() -> Path:
    """$TREESEARCH_DATA_DIR when set, else <repo>/../shared/data."""
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override) if override else _REPO_ROOT.parent / "shared" / "data"


def _missing_file_hint(relative: str) -> str:
    """How to point a loader elsewhere, saying which data folder was searched and why."""
    folder = default_data_dir()
    other_copy = "or pass task.config.path=... (path=... in Python) to read another copy"
    if os.environ.get(DATA_DIR_ENV):
        return f" (looked in ${DATA_DIR_ENV}={folder}; point it at a folder holding {relative}, {other_copy})"
    return f" (looked in the shared data folder {folder}; set ${DATA_DIR_ENV} to a folder holding {relative}, {other_copy})"


def resolve_data_file(path: str | os.PathLike[str] | None, relative: str) -> Path:
    """The file to read: `path` when given, else default_data_dir() / relative. Raises
    FileNotFoundError that says which path was tried and how to point elsewhere."""
    chosen = Path(path) if path is not None else default_data_dir() / relative
    if not chosen.is_file():
        hint = "" if path is not None else _missing_file_hint(relative)
        raise FileNotFoundError(f"benchmark file not found: {chosen}{hint}")
    return chosen


def _not_utf8(path: Path, line: int, error: UnicodeDecodeError, line_start: int) -> DataFormatError:
    """The DataFormatError for bytes that are not UTF-8; line_start is the file offset of the
    bytes that error.start counts from."""
    offset = line_start + error.start
    bad = error.object[error.start:error.end]
    return DataFormatError(path, line, f"not valid UTF-8: byte 0x{bad[0]:02x} at byte offset {offset} of the file "
                           f"({error.reason}); save the file as UTF-8")


BOM = "\ufeff"  # a byte-order mark some editors write at the start of a UTF-8 file: not part of its text


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line of a UTF-8 file (split on "\\n" only; a leading BOM dropped);
    DataFormatError naming the line and byte offset at the first byte that is not UTF-8."""
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, line_number, error, offset) from None
            yield line_number, text.removeprefix(BOM) if line_number == 1 else text
            offset += len(raw)


def _decoded_text(path: Path) -> str:
    """The whole file as text (a leading BOM dropped); DataFormatError naming the line and byte offset at the first byte
    that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data.count(b"\n", 0, error.start) + 1, error, 0) from None


def read_jsonl(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each non-blank line; bytes that are not UTF-8, bad JSON or a
    non-object raise DataFormatError naming the line."""
    for line_number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, line_number, f"bad JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
        yield RowLocation(Path(path), line_number), record


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def read_json_array(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """(where the item starts, record) for each item of a file holding one JSON array of
    objects. Items are decoded one at a time (json.load gives no positions), so bad JSON, a
    missing comma, a non-object or bytes that are not UTF-8 raise DataFormatError naming the line."""
    text = _decoded_text(path)
    decoder = json.JSONDecoder()
    index = _skip_whitespace(text, 0)
    if not text.startswith("[", index):
        raise DataFormatError(path, _line_of(text, index), "expected a JSON array ('[')")
    index = _skip_whitespace(text, index + 1)
    if text.startswith("]", index):
        _check_nothing_after(path, text, index + 1)
        return
    # text[counted] is on `line`, counted on from the last item (from the start of the text for
    # every item was quadratic: a 27k-item file took 86 s)
    line, counted = 1, 0
    while True:
        line, counted = line + text.count("\n", counted, index), index
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, error.lineno, f"bad JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, line, f"expected a JSON object, got {type(record).__name__}")
        yield RowLocation(Path(path), line), record
        index = _skip_whitespace(text, index)
        if text.startswith("]", index):
            _check_nothing_after(path, text, index + 1)
            return
        if not text.startswith(",", index):
            raise DataFormatError(path, _line_of(text, index), "bad JSON: expected ',' or ']' after an item")
        index = _skip_whitespace(text, index + 1)


def _check_nothing_after(path: Path, text: str, index: int) -> None:
    """DataFormatError naming the line when anything but whitespace follows the array's ']' (a
    second array or rows appended after it would be dropped without a word)."""
    index = _skip_whitespace(text, index)
    if index < len(text):
        raise DataFormatError(path, _line_of(text, index), "bad JSON: text after the array's closing ']'")


def read_parquet_rows(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each row of a parquet file, rows numbered from 1 (needs pyarrow)."""
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataFormatError(path, 0, f"unreadable parquet file: {error}", unit="row") from None
    for row_number, record in enumerate(table.to_pylist(), start=1):
        yield RowLocation(Path(path), row_number, unit="row"), record


def _first_character(path: Path) -> str:
    """The first character of the file that is not a blank or a byte-order mark ("" for none)."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            text = chunk.lstrip(b" \t\r\n").removeprefix(BOM.encode()).lstrip(b" \t\r\n")
            if text:
                return chr(text[0])
    return ""


def read_rows(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """The records of a data file in the formats the benchmarks are published in: parquet (by the
    .parquet suffix; the hubs' GSM8K), one JSON array (a file starting with "["), else JSON Lines.
    A .csv file is a DataFormatError naming the formats read (it was read as JSON Lines: "bad
    JSON", and a parquet file "not valid UTF-8 ... save the file as UTF-8")."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return read_parquet_rows(path)
    if suffix in (".csv", ".tsv"):
        raise DataFormatError(path, 1, f"a {suffix[1:].upper()} file: the benchmark loaders read JSON Lines, a JSON "
                                       "array or parquet (.parquet); convert it to one of those")
    return read_json_array(path) if _first_character(path) == "[" else read_jsonl(path)


def read_hub_rows(dataset: str, config: str | None, split: str) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each row of a datasets-hub split, rows numbered from 1. Needs the
    `datasets` package and a reachable hub (or its local cache); only used when a loader is asked
    with hub=True."""
    try:
        import datasets
    except ImportError as error:  # a ValueError: one `error:` line, not a traceback beside a left-over run folder
        raise ValueError("task.config.hub=true needs the `datasets` package (pip install datasets), or leave hub "
                         "false to read the files under $TREESEARCH_DATA_DIR") from error
    rows = datasets.load_dataset(dataset, config, split=split)
    source = Path(f"hub:{dataset}" + (f"/{config}" if config else "") + f"[{split}]")
    for row_number, record in enumerate(rows, start=1):
        yield RowLocation(source, row_number, unit="row"), dict(record)
