"""Reading the benchmark files row by row, with errors that say where: file, line (or row) and
field.

Every benchmark loader (gsm8k.py, math500.py, aime.py, ceval.py) reads its rows through these
helpers, which yield (RowLocation, record) pairs; `where.require(record, "answer", str)` checks a
field and `raise where.error("...", field="answer")` reports any other fault, so a bad row fails
the same way everywhere:

    DataFormatError: /.../test.jsonl, line 7, field 'answer': expected str, got int (42)

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

    def error(self, message: str, field: str | None = None) -> DataFormatError:
        """A DataFormatError at this place (the caller raises it)."""
        return DataFormatError(self.path, self.line, message, field=field, unit=self.unit)

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


def resolve_data_file(path: str | os.PathLike[str] | None, relative: str) -> Path:
    """The file to read: `path` when given, else default_data_dir() / relative. Raises
    FileNotFoundError that says which path was tried and how to point elsewhere."""
    chosen = Path(path) if path is not None else default_data_dir() / relative
    if not chosen.is_file():
        hint = "" if path is not None else f" (set ${DATA_DIR_ENV} or pass path=... to read another copy)"
        raise FileNotFoundError(f"benchmark file not found: {chosen}{hint}")
    return chosen


def read_jsonl(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each non-blank line; bad JSON or a non-object raises
    DataFormatError naming the line."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
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
    missing comma or a non-object raises DataFormatError naming the line."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    index = _skip_whitespace(text, 0)
    if not text.startswith("[", index):
        raise DataFormatError(path, _line_of(text, index), "expected a JSON array ('[')")
    index = _skip_whitespace(text, index + 1)
    if text.startswith("]", index):
        return
    while True:
        line = _line_of(text, index)
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, error.lineno, f"bad JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, line, f"expected a JSON object, got {type(record).__name__}")
        yield RowLocation(Path(path), line), record
        index = _skip_whitespace(text, index)
        if text.startswith("]", index):
            return
        if not text.startswith(",", index):
            raise DataFormatError(path, _line_of(text, index), "bad JSON: expected ',' or ']' after an item")
        index = _skip_whitespace(text, index + 1)


def read_parquet_rows(path: Path) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each row of a parquet file, rows numbered from 1 (needs pyarrow)."""
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataFormatError(path, 0, f"unreadable parquet file: {error}", unit="row") from None
    for row_number, record in enumerate(table.to_pylist(), start=1):
        yield RowLocation(Path(path), row_number, unit="row"), record


def read_hub_rows(dataset: str, config: str | None, split: str) -> Iterator[tuple[RowLocation, Row]]:
    """(where, record) for each row of a datasets-hub split, rows numbered from 1. Needs the
    `datasets` package and a reachable hub (or its local cache); only used when a loader is asked
    with hub=True."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hub=True needs the `datasets` package (pip install datasets)") from error
    rows = datasets.load_dataset(dataset, config, split=split)
    source = Path(f"hub:{dataset}" + (f"/{config}" if config else "") + f"[{split}]")
    for row_number, record in enumerate(rows, start=1):
        yield RowLocation(source, row_number, unit="row"), dict(record)
