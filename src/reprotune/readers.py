"""Row readers for .json, .jsonl, .csv and .parquet files, with 1-based line numbers.

Every reader yields :class:`RawRow` objects and never raises on a bad row: a line that is
not valid JSON (or not a JSON object, or not valid UTF-8) becomes a row carrying ``error``
so ingest can reject it with its file and line. Only problems with the file as a whole
(missing, unsupported extension, unreadable Parquet) raise.

Line numbers: JSONL and CSV use the file line where the row starts, JSON arrays use the
element index + 1, Parquet the row index + 1.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED = (".json", ".jsonl", ".csv", ".parquet")
RAW_LIMIT = 500  # characters of an unparseable line kept for the rejected-rows file


@dataclass(frozen=True)
class RawRow:
    """One input row: its origin and either the parsed object or why it could not be parsed."""

    source: str
    line: int
    data: dict[str, Any] | None = None
    error: str | None = None
    raw: str | None = None  # the offending text when ``error`` is set

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _object_or_error(source: str, line: int, obj: Any, raw: str | None) -> RawRow:
    if isinstance(obj, dict):
        return RawRow(source, line, data=obj)
    return RawRow(source, line, error=f"expected a JSON object, got {type(obj).__name__}",
                  raw=(raw if raw is not None else json.dumps(obj, ensure_ascii=False))[:RAW_LIMIT])


def _iter_lines(source: str, data: bytes) -> Iterator[RawRow]:
    """One JSON object per non-blank line (blank lines are not rows and are skipped)."""
    for lineno, raw_line in enumerate(data.splitlines(), 1):
        if lineno == 1 and raw_line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            raw_line = raw_line[3:]
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(source, lineno, error=f"invalid UTF-8: {exc.reason} at byte {exc.start}",
                         raw=raw_line.decode("utf-8", "replace")[:RAW_LIMIT])
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(source, lineno, error=f"invalid JSON: {exc.msg} (column {exc.colno})",
                         raw=text[:RAW_LIMIT])
            continue
        yield _object_or_error(source, lineno, obj, text)


def _iter_json(source: str, data: bytes) -> Iterator[RawRow]:
    """A JSON array of objects (or one object); falls back to object-per-line."""
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Many "json" files are really JSONL; per-line parsing then reports the bad lines.
        logger.info("%s: not a single JSON document, reading one object per line", source)
        yield from _iter_lines(source, data)
        return
    if isinstance(doc, list):
        for i, obj in enumerate(doc):
            yield _object_or_error(source, i + 1, obj, None)
    else:
        yield _object_or_error(source, 1, doc, None)


def _iter_csv(source: str, data: bytes) -> Iterator[RawRow]:
    """Header row + one row per record; cells are strings, empty cells stay ``""``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num  # a quoted cell may span several lines
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if len(cells) != len(header):
            yield RawRow(source, start, error=f"expected {len(header)} CSV fields, got {len(cells)}",
                         raw=",".join(cells)[:RAW_LIMIT])
            continue
        yield RawRow(source, start, data=dict(zip(header, cells, strict=True)))


def _iter_parquet(source: str, path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    line = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            line += 1
            yield RawRow(source, line, data=obj)


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield the rows of one input file (format chosen by extension).

    Raises FileNotFoundError when the file does not exist and ValueError for an unsupported
    extension; everything wrong with a single row is reported on that row instead.
    """
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{source}: input file not found (listed in params.yaml "
                                f"ingest.inputs; paths are relative to the repository root)")
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        raise ValueError(f"{source}: unsupported file type {ext or '(none)'!r} in ingest.inputs; "
                         f"supported: {', '.join(SUPPORTED)}")
    if ext == ".parquet":
        yield from _iter_parquet(source, p)
        return
    data = p.read_bytes()
    if ext == ".jsonl":
        yield from _iter_lines(source, data)
    elif ext == ".json":
        yield from _iter_json(source, data)
    else:
        yield from _iter_csv(source, data)
