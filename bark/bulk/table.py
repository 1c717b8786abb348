"""Bulk synthesis's input: a table of texts (JSONL, CSV, Parquet or a plain text file) -> checked rows.

A table has an ``id`` and a ``text`` column, and optionally ``voice`` (a preset name or an ``.npz`` path), ``seed``
(an int >= 0) and per-row generation settings: ``greedy`` (bool), ``temperature`` (a positive number: the semantic
and coarse stages), ``semantic_max_new_tokens`` (int >= 1), ``continuity`` ("preset" or "previous") and
``max_tokens`` (the longest piece in text tokens). Other columns are carried along unread (a warning names them). A
plain text file (any other extension, e.g. ``.txt``) has one text per line; a line's id is its line number, zero
padded (``000001``), and blank lines are skipped (their numbers are not reused).

Two kinds of problem:

- a bad *input* (the file is missing or unreadable, not the format its extension says, has no ``id`` or ``text``
  column, has no row) raises :class:`BulkError`: one line, before any model is loaded;
- a bad *row* (empty text, text that is not a string, an id that is not a usable file name, a repeated id, a bad
  seed or setting) becomes a :class:`Row` with ``problem`` set: it is recorded as failed with that one-line reason and
  the rest of the table goes on. (An unknown voice is found by the caller, who knows the checkpoint's presets.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..cli.setup import MAX_SEED, MIN_TEMPERATURE, SpeakError

__all__ = ["BulkError", "Row", "read_table", "SETTING_COLUMNS", "KNOWN_COLUMNS", "table_format"]

SETTING_COLUMNS = ("greedy", "temperature", "semantic_max_new_tokens", "continuity", "max_tokens")
KNOWN_COLUMNS = ("id", "text", "voice", "seed") + SETTING_COLUMNS
MAX_ID_CHARS = 200  # an id is a file name ({id}.wav): well under every file system's 255-byte limit
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=,-]*$")
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


class BulkError(SpeakError):
    """A user-facing error of bulk synthesis (a bad input, an unusable output directory): one line, exit code 1."""


@dataclass
class Row:
    """One row of the table. ``number``: 1-based (the data row; for JSONL and text files the line number);
    ``id``: the file name stem, as given (None when the row has none; a row with ``problem`` set writes no file);
    ``settings``: the row's own generation settings (column -> checked value); ``problem``: why the row cannot be spoken (None: it can)."""

    number: int
    id: str | None
    text: Any
    voice: str | None = None
    seed: int | None = None
    settings: dict = field(default_factory=dict)
    problem: str | None = None

    def key(self, defaults: dict) -> str:
        """A digest of everything that decides this row's audio (text, voice, seed, settings and the run's defaults
        ``defaults``: model, format, flags): a finished row is skipped on resume only while its key is unchanged."""
        blob = json.dumps({"text": self.text, "voice": self.voice, "seed": self.seed, "settings": self.settings,
                           "defaults": defaults}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def table_format(path: str) -> str:
    """"jsonl", "csv", "parquet" or "text", from the file's extension."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def read_table(path: str) -> tuple[list[Row], list[str]]:
    """Read and check the table at ``path`` -> (rows in table order, warnings). Raises :class:`BulkError` for a bad
    input (module docstring); bad rows come back with ``problem`` set."""
    if not os.path.exists(path):
        raise BulkError(f"INPUT: {path!r} does not exist")
    if os.path.isdir(path):
        raise BulkError(f"INPUT: {path!r} is a directory; expected a .jsonl, .csv, .parquet or text file")
    kind = table_format(path)
    warnings: list[str] = []
    if kind == "text":
        records, columns = _read_text(path), ["id", "text"]
    elif kind == "jsonl":
        records, columns = _read_jsonl(path)
    elif kind == "csv":
        records, columns = _read_csv(path)
    else:
        records, columns = _read_parquet(path)
    if not records:
        raise BulkError(f"INPUT: {path!r} has no rows")
    missing = [c for c in ("id", "text") if c not in columns]
    if missing:
        raise BulkError(f"INPUT: {path!r} has no {' and no '.join(repr(c) for c in missing)} column (columns: "
                        f"{', '.join(map(repr, columns)) or 'none'}); expected 'id' and 'text', optionally "
                        f"{', '.join(KNOWN_COLUMNS[2:])}")
    unknown = [c for c in columns if c not in KNOWN_COLUMNS]
    if unknown:
        warnings.append(f"INPUT: columns {', '.join(map(repr, unknown))} are not read (known: "
                        f"{', '.join(KNOWN_COLUMNS)})")
    from_text = kind in ("csv", "text")  # every value is a string there: numbers and booleans are parsed
    rows = [_check_row(number, record, from_text) for number, record in records]
    _mark_duplicates(rows)
    return rows, warnings


# ----------------------------------------------------------------------------------------------------------------------
# readers: (1-based row number, {column: value}) pairs and the column names


def _open_error(path: str, e: Exception) -> BulkError:
    if isinstance(e, UnicodeDecodeError):
        return BulkError(f"INPUT: cannot read {path!r} as UTF-8 text: {e}")
    return BulkError(f"INPUT: cannot read {path!r}: {getattr(e, 'strerror', None) or e}")


def _read_text(path: str) -> list[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _open_error(path, e) from None
    width = max(6, len(str(len(lines))))
    return [(n, {"id": f"{n:0{width}d}", "text": line.strip()}) for n, line in enumerate(lines, 1) if line.strip()]


def _read_jsonl(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    records, columns = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BulkError(f"INPUT: {path!r} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    f"expected one JSON object per line") from None
                if not isinstance(record, dict):
                    raise BulkError(f"INPUT: {path!r} line {n}: expected a JSON object "
                                    f"({{\"id\": ..., \"text\": ...}}), got {type(record).__name__}")
                records.append((n, record))
                columns.update(dict.fromkeys(record))
    except (OSError, UnicodeDecodeError) as e:
        raise _open_error(path, e) from None
    return records, list(columns)


def _read_csv(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = list(reader.fieldnames or [])
            records = []
            for n, record in enumerate(reader, 1):
                if None in record:  # more cells than columns
                    raise BulkError(f"INPUT: {path!r} data row {n}: {len(columns) + len(record[None])} cells for "
                                    f"{len(columns)} columns")
                records.append((n, {k: v for k, v in record.items() if v is not None}))
    except csv.Error as e:
        raise BulkError(f"INPUT: {path!r}: not a valid CSV file: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _open_error(path, e) from None
    return records, columns


def _read_parquet(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BulkError(f"INPUT: {path!r} is Parquet, which needs pyarrow (pip install pyarrow, or "
                        f"bark-kernels[ray]); or give the table as .jsonl or .csv") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow.ArrowInvalid (not Parquet), OSError ...
        raise BulkError(f"INPUT: cannot read {path!r} as Parquet: {str(e).splitlines()[0] if str(e) else e}") from None
    return list(enumerate(table.to_pylist(), 1)), list(table.column_names)


# ----------------------------------------------------------------------------------------------------------------------
# row checks


def _absent(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or \
        (isinstance(value, float) and math.isnan(value))


def _check_id(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"id: expected a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ValueError("id: empty")
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"id: {len(text)} characters; expected at most {MAX_ID_CHARS} (it becomes a file name)")
    if not _SAFE_ID.match(text):
        raise ValueError(f"id {text!r}: expected letters, digits and _ . @ + = , - (not first: . @ + = , -), as it "
                         f"becomes the file name {text}.wav")
    return text


def _int_value(column: str, value, from_text: bool, low: int, high: int | None = None) -> int:
    if from_text and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{column}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{column}: expected an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{column}: expected an integer from {low} to {high}, got {value}" if high is not None
                         else f"{column}: expected an integer >= {low}, got {value}")
    return value


def _setting(column: str, value, from_text: bool):
    if column == "greedy":
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise ValueError(f"greedy: expected true or false, got {value!r}")
        return value
    if column == "temperature":
        if from_text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"temperature: expected a positive number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < MIN_TEMPERATURE:
            raise ValueError(f"temperature: expected a finite number >= {MIN_TEMPERATURE:g}, got {value!r}")
        return float(value)
    if column == "continuity":
        if value not in ("preset", "previous"):
            raise ValueError(f"continuity: expected 'preset' or 'previous', got {value!r}")
        return value
    return _int_value(column, value, from_text, 1)  # semantic_max_new_tokens, max_tokens


def _check_row(number: int, record: dict, from_text: bool) -> Row:
    raw_id = record.get("id")
    row = Row(number, None, record.get("text"))
    try:
        if _absent(raw_id):
            raise ValueError("id: missing")
        row.id = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
        _check_id(raw_id)
        text = record.get("text")
        if text is None:
            raise ValueError("text: missing")
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text: empty; give some words to speak")
        row.text = text
        voice = record.get("voice")
        if not _absent(voice):
            if not isinstance(voice, str):
                raise ValueError(f"voice: expected a preset name or an .npz path, got {type(voice).__name__}")
            row.voice = voice.strip()
        seed = record.get("seed")
        if not _absent(seed):
            row.seed = _int_value("seed", seed, from_text, 0, MAX_SEED)
        for column in SETTING_COLUMNS:
            value = record.get(column)
            if not _absent(value):
                row.settings[column] = _setting(column, value, from_text)
        if row.settings.get("greedy") and "temperature" in row.settings:
            raise ValueError("greedy and temperature: greedy decoding uses no temperature; give one of the two")
    except ValueError as e:
        row.problem = str(e)
    return row


def _mark_duplicates(rows: Iterable[Row]) -> None:
    """Every row after the first with an id fails (the first owns the id and its file)."""
    first: dict[str, int] = {}
    for row in rows:
        if row.id is None:
            continue
        if row.id in first:
            if row.problem is None:
                row.problem = f"id {row.id!r}: repeats row {first[row.id]} (ids must be unique: one file per id)"
        elif row.problem is None or not row.problem.startswith("id"):
            first[row.id] = row.number
