"""Row readers for .json, .jsonl, .csv and .parquet files, with 1-based line numbers.

Every reader yields :class:`RawRow` objects and never raises on a bad row: a line that is
not valid JSON (or not a JSON object, or not valid UTF-8) becomes a row carrying ``error``
so ingest can reject it with its file and line. Problems with the file as a whole raise
:class:`InputFileError` with one line naming the file and the fix: missing file,
unsupported extension, an encoding other than UTF-8/16/32, an unclosed CSV quote,
unreadable Parquet.

Rows are counted as rows, never as lines of something else: a ``.json`` file is read as one
document (an array of objects, or one object), and only a file that holds several JSON
values one after another is read as JSON Lines. A truncated or broken array yields its
complete elements plus ONE error row for the unreadable tail.

Line numbers: JSONL and CSV use the file line where the row starts, JSON arrays use the
element index + 1 (the tail error names the file line too), Parquet the row index + 1.

JSON's non-standard ``NaN``/``Infinity`` constants are not turned into floats: they become
:class:`NonFinite` markers, so ingest can reject ``"output": NaN`` instead of training on
the answer "nan".
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED = (".json", ".jsonl", ".csv", ".parquet")
RAW_LIMIT = 500  # characters of an unparseable line kept for the rejected-rows file
# Byte-order marks, longest first (the UTF-32-LE BOM starts with the UTF-16-LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_ENCODINGS_READ = "UTF-8 (with or without BOM), UTF-16 or UTF-32"


class InputFileError(ValueError):
    """A whole input file cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class NonFinite:
    """A JSON ``NaN``/``Infinity``/``-Infinity`` constant, kept apart from real numbers."""

    constant: str

    def __str__(self) -> str:
        return self.constant


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


class _Object(dict):
    """A parsed JSON object that remembers keys given twice (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def json_problem(value: Any, path: str = "") -> str | None:
    """Why a parsed value cannot be taken as written: a key given twice (which value did the
    user mean?) or an unpaired surrogate escape such as \\ud800 (not Unicode text)."""
    if isinstance(value, dict):
        dup = getattr(value, "duplicates", ())
        if dup:
            return f"key {dup[0]!r} appears twice in the object at {path or 'the top level'}"
        for k, v in value.items():
            found = json_problem(k, path) or json_problem(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = json_problem(v, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"unpaired surrogate {value[exc.start]!r} at {path or 'a key'}: not valid Unicode text"
    return None


# NaN/Infinity stay recognisable, duplicate keys are remembered (see json_problem)
JSON_DECODER = json.JSONDecoder(parse_constant=NonFinite, object_pairs_hook=_object_hook)


def is_non_finite(value: Any) -> bool:
    """True for a NaN/Infinity constant from JSON or a non-finite float (Parquet, CSV readers)."""
    return isinstance(value, NonFinite) or (isinstance(value, float) and not math.isfinite(value))


def _loads(text: str) -> Any:
    return JSON_DECODER.decode(text)


# --------------------------------------------------------------------------- encodings
def _sniff_utf16_32(data: bytes) -> str | None:
    """RFC 4627 §3: a JSON text starts with ASCII, so the NUL pattern of its first four
    bytes tells UTF-16/32 without a BOM."""
    head = data[:4]
    if len(head) < 4 or b"\x00" not in head:
        return None
    nul = tuple(b == 0 for b in head)
    return {(True, True, True, False): "utf-32-be", (False, True, True, True): "utf-32-le",
            (True, False, True, False): "utf-16-be", (False, True, False, True): "utf-16-le",
            }.get(nul)


def decode_text(source: str, data: bytes) -> str:
    """Decode a whole text file: BOM-marked UTF-8/16/32, BOM-less UTF-16/32, else UTF-8.

    Anything else (GBK, Latin-1, ...) raises :class:`InputFileError` naming the file and the
    ``iconv`` command that converts it, instead of being misread line by line.
    """
    encoding, start = None, 0
    for bom, enc in _BOMS:
        if data.startswith(bom):
            encoding, start = enc, len(bom)
            break
    encoding = encoding or _sniff_utf16_32(data) or "utf-8"
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[start + exc.start:start + exc.start + 2].hex(" ")
        stem = Path(source)
        raise InputFileError(
            f"{source}: not {encoding.upper()} text (bytes {bad} at offset {start + exc.start}); "
            f"ingest reads {_ENCODINGS_READ}. Convert the file first, e.g. for Chinese data "
            f"saved as GBK: iconv -f GBK -t UTF-8 {source} > "
            f"{stem.with_name(stem.stem + '.utf8' + stem.suffix)}") from exc


# --------------------------------------------------------------------------- JSON / JSONL
def _object_or_error(source: str, line: int, obj: Any, raw: str | None) -> RawRow:
    if isinstance(obj, dict):
        problem = json_problem(obj)
        if problem is None:
            return RawRow(source, line, data=obj)
        shown = raw if raw is not None else json.dumps(obj, ensure_ascii=True, default=str)
        return RawRow(source, line, error=f"invalid JSON object: {problem}", raw=shown[:RAW_LIMIT])
    shown = raw if raw is not None else json.dumps(obj, ensure_ascii=False, default=str)
    return RawRow(source, line, error=f"expected a JSON object, got {type(obj).__name__}",
                  raw=shown[:RAW_LIMIT])


def _line_row(source: str, lineno: int, text: str) -> RawRow | None:
    if not text.strip():
        return None
    try:
        obj = _loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(source, lineno, error=f"invalid JSON: {exc.msg} (column {exc.colno})",
                      raw=text[:RAW_LIMIT])
    return _object_or_error(source, lineno, obj, text)


def _iter_lines(source: str, data: bytes) -> Iterator[RawRow]:
    """One JSON object per non-blank line (blank lines are not rows and are skipped).

    UTF-8 is decoded line by line, so one corrupt line is one rejected row; a file whose
    lines are mostly not UTF-8 is in another encoding and raises :class:`InputFileError`.
    UTF-16/32 files (BOM or sniffed) are decoded whole first. Lines end at \\n only
    (str.splitlines would also split at U+2028 inside a JSON string).
    """
    if not data.startswith(codecs.BOM_UTF8) and (
            any(data.startswith(bom) for bom, _ in _BOMS) or _sniff_utf16_32(data)):
        for lineno, text in enumerate(decode_text(source, data).split("\n"), 1):
            row = _line_row(source, lineno, text.removesuffix("\r"))
            if row is not None:
                yield row
        return
    data = data.removeprefix(codecs.BOM_UTF8)
    lines = data.splitlines()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        bad = 0
        for raw_line in lines:
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
        if bad * 2 > sum(1 for ln in lines if ln.strip()):
            decode_text(source, data)  # raises, naming the file and the iconv fix
    for lineno, raw_line in enumerate(lines, 1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(source, lineno, error=f"invalid UTF-8: {exc.reason} at byte {exc.start}",
                         raw=raw_line.decode("utf-8", "replace")[:RAW_LIMIT])
            continue
        row = _line_row(source, lineno, text)
        if row is not None:
            yield row


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_array(source: str, text: str, pos: int) -> Iterator[RawRow]:
    """Elements of the JSON array starting at ``text[pos] == "["``, element by element.

    A file that simply ends too early (an interrupted download or export) yields its
    complete elements as rows and ONE error row for the cut-off tail, saying where it
    starts. A syntax error with more text after it (a missing comma in the middle) is an
    :class:`InputFileError`: the rows after it can be neither read nor counted.
    """
    end = len(text.rstrip())
    pos, index = _skip_ws(text, pos + 1), 0
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start = pos
        try:
            obj, pos = JSON_DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if pos >= len(text):  # a complete element, then the end of the file
                yield _object_or_error(source, index + 1, obj, None)
                yield RawRow(source, index + 2, raw="", error=(
                    f"the file ends after array element {index + 1} without the closing ']': "
                    f"truncated; any later elements are missing"))
                return
            if text[pos] not in ",]":
                raise json.JSONDecodeError("expected ',' or ']' after an element", text, pos)
        except json.JSONDecodeError as exc:
            line = text.count("\n", 0, start) + 1
            if not (exc.msg.startswith("Unterminated string") or exc.pos >= end):
                raise InputFileError(
                    f"{source}: line {exc.lineno} column {exc.colno}: {exc.msg} (in array "
                    f"element {index + 1}, which starts on line {line}); the array is broken "
                    f"before its end, so the rows after it cannot be read or counted. Fix the "
                    f"file (`python -m json.tool {source}` points at the spot)") from exc
            tail = text[start:]
            yield RawRow(source, index + 1, raw=tail[:RAW_LIMIT], error=(
                f"the file ends inside array element {index + 1} (file line {line}): truncated "
                f"({exc.msg}); {index} complete elements before it were read, the last "
                f"{tail.count(chr(10)) + 1} lines ({len(tail)} characters) were not"))
            return
        yield _object_or_error(source, index + 1, obj, None)
        index += 1
        if text[pos] == "]":
            rest = _skip_ws(text, pos + 1)
            if rest < len(text):
                yield RawRow(source, index + 1, raw=text[rest:rest + RAW_LIMIT],
                             error=f"unexpected text after the closing ']' at file line "
                                   f"{text.count(chr(10), 0, rest) + 1}")
            return
        pos = _skip_ws(text, pos + 1)


def _iter_json(source: str, data: bytes) -> Iterator[RawRow]:
    """A JSON array of objects, one object, or (a .json file that is really) JSON Lines."""
    text = decode_text(source, data)
    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return
    if text[pos] == "[":
        yield from _iter_array(source, text, pos)
        return
    try:
        obj, end = JSON_DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        obj, end = None, -1
    if end >= 0 and _skip_ws(text, end) >= len(text):
        yield _object_or_error(source, 1, obj, None)
        return
    # Several values in a row (or a broken first one): read it as one object per line.
    logger.info("%s: not a single JSON document, reading one object per line", source)
    yield from _iter_lines(source, text.encode("utf-8"))


# --------------------------------------------------------------------------- CSV, Parquet
def _iter_csv(source: str, data: bytes) -> Iterator[RawRow]:
    """Header row + one row per record; cells are strings, empty cells stay ``""``."""
    text = decode_text(source, data)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise InputFileError(f"{source}: line 1: malformed CSV header: {exc}") from exc
    header = [h.strip() for h in header]
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # csv cannot resync after a bad quote: every later row is in doubt, so stop here
            # rather than count a swallowed file as one reject.
            raise InputFileError(
                f"{source}: line {start}: {exc} (a quoted field opened on or after this line "
                f"is never closed, so the rest of the file cannot be split into rows); fix "
                f"the quoting, e.g. double the \" inside quoted cells") from exc
        end = reader.line_num  # a quoted cell may span several lines
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if len(cells) != len(header):
            yield RawRow(source, start, error=f"expected {len(header)} CSV fields, got {len(cells)}",
                         raw=",".join(cells)[:RAW_LIMIT])
            continue
        yield RawRow(source, start, data=dict(zip(header, cells, strict=True)))


def _iter_parquet(source: str, path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(f"{source}: not a readable Parquet file ({exc})") from exc
    line = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            line += 1
            yield RawRow(source, line, data=obj)


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield the rows of one input file (format chosen by extension; a ``*.hub.yaml``
    manifest names a hub dataset, read by :func:`reprotune.data.hub.iter_rows`).

    Raises FileNotFoundError when the file does not exist and :class:`InputFileError` when
    the file as a whole cannot be read; everything wrong with a single row is reported on
    that row instead.
    """
    source = str(path)
    if source.endswith(".hub.yaml"):  # a Hugging Face hub dataset, pinned by a manifest
        from reprotune.data import hub

        yield from hub.iter_rows(path)
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{source}: input file not found (listed in params.yaml "
                                f"ingest.inputs; paths are relative to the repository root)")
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        raise InputFileError(f"{source}: unsupported file type {ext or '(none)'!r} in "
                             f"ingest.inputs; supported: {', '.join(SUPPORTED)}")
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
