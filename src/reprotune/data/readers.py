"""Row readers for .json, .jsonl, .csv and .parquet files, with 1-based line numbers, and
.txt files: one document each, the row ``{"text": <the whole file>}`` (line 1).

Every reader yields :class:`RawRow` objects and never raises on a bad row: a line that is
not valid JSON (or not a JSON object, or not valid UTF-8) becomes a row carrying ``error``
so ingest can reject it with its file and line. Problems with the file as a whole raise
:class:`InputFileError` with one line naming the file and the fix: missing file,
unsupported extension, an encoding other than UTF-8/16/32, an unclosed CSV quote,
unreadable Parquet.

Files are read as streams: JSONL, CSV and Parquet row by row (or batch by batch), a JSON
array element by element from a sliding window of its text (:mod:`reprotune.data.jsonstream`),
so memory does not grow with the file; their encoding is checked in a first streaming pass
(:mod:`reprotune.data.encoding`), so a GBK file still fails before any row.

Rows are counted as rows, never as lines of something else: a ``.json`` file is read as one
document (an array of objects, or one object), and only a file that holds several JSON
values one after another is read as JSON Lines. A truncated or broken array yields its
complete elements plus ONE error row for the unreadable tail.

Line numbers: JSONL and CSV use the file line where the row starts, JSON arrays use the
element index + 1 (the tail error names the file line too), Parquet the row index + 1.

JSON's non-standard ``NaN``/``Infinity`` constants are not turned into floats: they become
``NonFinite`` markers (:mod:`reprotune.data.jsonvalues`), so ingest can reject
``"output": NaN`` instead of training on the answer "nan".
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from reprotune.data import jsonstream
from reprotune.data.encoding import (
    BOMS,
    InputFileError,
    check_decodes,
    decode_text,
    detect,
    first_error,
    sniff_utf16_32,
)
from reprotune.data.jsonvalues import decode, depth, json_problem, json_type

logger = logging.getLogger(__name__)

ROW_FILES = (".json", ".jsonl", ".csv", ".parquet")  # files of rows
SUPPORTED = (*ROW_FILES, ".txt")  # .txt: one document per file
RAW_LIMIT = 500  # characters of an unparseable line kept for the rejected-rows file
# Longest CSV cell read (the csv module's own default, 131,072, is shorter than real long
# answers); a longer one stops the file with a message saying so.
CSV_FIELD_LIMIT = 16 << 20
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
PEEK = 1 << 16  # bytes of a .jsonl read first to tell pretty-printed JSON (grows as needed)


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


# --------------------------------------------------------------------------- JSON / JSONL
def _shown(obj: Any, ensure_ascii: bool) -> str:
    """A parsed value as JSON text for the rejected-rows file (a value too deep to write
    is described instead)."""
    try:
        return json.dumps(obj, ensure_ascii=ensure_ascii, default=str)
    except RecursionError:
        return f"<{json_type(obj)} nested {depth(obj)} levels deep>"


def _object_or_error(source: str, line: int, obj: Any, raw: str | None) -> RawRow:
    if isinstance(obj, dict):
        problem = json_problem(obj)
        if problem is None:
            return RawRow(source, line, data=obj)
        shown = raw if raw is not None else _shown(obj, True)
        return RawRow(source, line, error=f"invalid JSON object: {problem}", raw=shown[:RAW_LIMIT])
    shown = raw if raw is not None else _shown(obj, False)
    return RawRow(source, line, error=f"expected a JSON object, got {json_type(obj)}",
                  raw=shown[:RAW_LIMIT])


def _line_row(source: str, lineno: int, text: str) -> RawRow | None:
    if not text.strip():
        return None
    try:
        obj = decode(text)
    except json.JSONDecodeError as exc:
        return RawRow(source, lineno, error=f"invalid JSON: {exc.msg} (column {exc.colno})",
                      raw=text[:RAW_LIMIT])
    return _object_or_error(source, lineno, obj, text)


def _decodes(text: str) -> bool:
    try:
        decode(text)
    except json.JSONDecodeError:
        return False
    return True


def _line_rows(source: str, lineno: int, text: str) -> Iterator[RawRow]:
    """The row of one line (cut at \\n). A lone \\r inside it is JSON whitespace or a raw
    control character inside a string (one reject for the line, never two half rows);
    only when the line is not JSON but every piece between its \\r is, is it an old
    CR-only file, one row per piece."""
    if "\r" in text and not _decodes(text):
        pieces = text.split("\r")
        if sum(bool(p.strip()) for p in pieces) > 1 and all(
                _decodes(p) for p in pieces if p.strip()):
            for i, piece in enumerate(pieces):
                row = _line_row(source, lineno + i, piece)
                if row is not None:
                    yield row
            return
    row = _line_row(source, lineno, text)
    if row is not None:
        yield row


def _byte_lines(fh: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary stream cut at \\n (a \\r right before it dropped), one at a
    time; a lone \\r stays in its line (see :func:`_line_rows`)."""
    for segment in fh:  # buffered reads, cut at b"\n": \r\n never straddles two segments
        segment = segment[:-1] if segment.endswith(b"\n") else segment
        yield segment[:-1] if segment.endswith(b"\r") else segment


def _iter_lines(source: str, fh: BinaryIO) -> Iterator[RawRow]:
    """One JSON object per non-blank line of ``fh`` (blank lines are not rows and are skipped),
    read line by line: memory does not grow with the file.

    UTF-8 is decoded line by line, so one corrupt line is one rejected row; a file whose
    lines are mostly not UTF-8 is in another encoding and raises :class:`InputFileError`
    (checked in a first pass, before any row). UTF-16/32 files (BOM or sniffed) are checked
    whole, then decoded as a stream. Lines end at \\n only there (str.splitlines would also
    split at U+2028 inside a JSON string).
    """
    begin = fh.tell()
    head = fh.read(4)
    fh.seek(begin)
    if not head.startswith(codecs.BOM_UTF8) and (
            any(head.startswith(bom) for bom, _ in BOMS) or sniff_utf16_32(head)):
        encoding, _ = check_decodes(source, fh)  # raises, naming the file and the iconv fix
        text = io.TextIOWrapper(fh, encoding=encoding, newline="\n")
        try:
            for lineno, line in enumerate(text, 1):
                yield from _line_rows(source, lineno, line.removesuffix("\n").removesuffix("\r"))
        finally:
            text.detach()  # the caller owns (and closes) fh
        return
    if head.startswith(codecs.BOM_UTF8):
        fh.seek(begin + len(codecs.BOM_UTF8))
    body = fh.tell()
    if first_error(fh, "utf-8") is not None:
        bad = nonblank = 0
        for raw_line in _byte_lines(fh):
            nonblank += bool(raw_line.strip())
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
        if bad * 2 > nonblank:
            fh.seek(body)
            check_decodes(source, fh)  # raises, naming the file and the iconv fix
        fh.seek(body)
    for lineno, raw_line in enumerate(_byte_lines(fh), 1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(source, lineno, error=f"invalid UTF-8: {exc.reason} at byte {exc.start}",
                         raw=raw_line.decode("utf-8", "replace")[:RAW_LIMIT])
            continue
        yield from _line_rows(source, lineno, text)


def _iter_json(source: str, path: Path) -> Iterator[RawRow]:
    """A JSON array of objects, one object, or (a .json file that is really) JSON Lines.

    Read as a stream (:mod:`reprotune.data.jsonstream`): array elements are decoded and
    yielded one at a time from a window of the text, so memory does not grow with the file;
    only a single top-level object is held whole. The encoding is checked in a first
    streaming pass, so a GBK file still fails before any row.
    """
    with path.open("rb") as fh:
        encoding, start = check_decodes(source, fh)  # raises, naming the file and the iconv fix
        win = jsonstream.TextWindow(fh, encoding)
        kind, found = jsonstream.classify(win)
        if kind == "array":
            for item in jsonstream.iter_array(source, win, found, RAW_LIMIT):
                yield (_object_or_error(source, item.line, item.value, None) if item.error is None
                       else RawRow(source, item.line, error=item.error, raw=item.raw))
            return
        if kind == "object":
            yield _object_or_error(source, 1, found, None)
        if kind == "deep":
            yield RawRow(source, 1, error=f"invalid JSON: {found}", raw=win.buf[:RAW_LIMIT])
        if kind != "lines":
            return
        fh.seek(start)
        win = jsonstream.TextWindow(fh, encoding)
        if jsonstream.first_value_span(win) is not None:  # pretty-printed objects in a row
            logger.info("%s: JSON values one after another, each over several lines", source)
            fh.seek(start)
            for item in jsonstream.iter_values(source, jsonstream.TextWindow(fh, encoding),
                                               RAW_LIMIT):
                yield (_object_or_error(source, item.line, item.value, None) if item.error is None
                       else RawRow(source, item.line, error=item.error, raw=item.raw))
            return
        # Several values in a row (or a broken first one): read it as one object per line,
        # from the text re-encoded as UTF-8 (a UTF-8 file's bytes after any BOM are that).
        logger.info("%s: not a single JSON document, reading one object per line", source)
        fh.seek(start)
        if encoding == "utf-8":
            yield from _iter_lines(source, fh)
            return
        with jsonstream.utf8_copy(fh, encoding) as copy:
            yield from _iter_lines(source, copy)


# --------------------------------------------------------------------------- CSV, Parquet
def _iter_csv(source: str, fh: BinaryIO) -> Iterator[RawRow]:
    """Header row + one row per record; cells are strings, empty cells stay ``""``.

    The encoding is checked in a first streaming pass, then the rows are parsed from a text
    stream: memory does not grow with the file.
    """
    encoding, _ = check_decodes(source, fh)
    # process-wide, and only ever raised: one long answer is not a broken file
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    text = io.TextIOWrapper(fh, encoding=encoding, newline="")
    try:
        yield from _csv_rows(source, csv.reader(text, strict=True))
    finally:
        text.detach()  # the caller owns (and closes) fh


def _csv_rows(source: str, reader: Any) -> Iterator[RawRow]:
    """The rows of a ``csv.reader``, each with the file line where it starts."""
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise InputFileError(f"{source}: line 1: malformed CSV header: {exc}") from exc
    header = [h.strip() for h in header]
    if header and header[0].startswith("\ufeff"):  # a second BOM (a file saved twice with one)
        logger.info("%s: removed a stray byte-order mark (U+FEFF) before the CSV header", source)
        header[0] = header[0].lstrip("\ufeff").strip()
    for i, name in enumerate(header):
        if name in header[:i]:  # dict(zip()) would keep the last column's text silently
            raise InputFileError(
                f"{source}: line 1: the CSV header names column {name!r} twice (columns "
                f"{header.index(name) + 1} and {i + 1}), so one of them would be lost; "
                f"rename or remove one of them")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field limit" in str(exc):
                raise InputFileError(
                    f"{source}: line {start}: a cell starting on or after this line is longer "
                    f"than {CSV_FIELD_LIMIT:,} characters, the most the CSV reader takes "
                    f"(or a quote is never closed and the cell runs on); store rows this long "
                    f"as JSONL, or check the quoting there") from exc
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
        # buffered, not pre-buffered: pages are read as they are decoded instead of a whole
        # row group's column chunks at once (400k rows in one row group: 150 MiB, not 410)
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(f"{source}: not a readable Parquet file ({exc})") from exc
    line = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            line += 1
            yield RawRow(source, line, data=obj)


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield the rows of one local input file (format chosen by extension). A ``*.hub.yaml``
    manifest is not a file of rows: :func:`reprotune.data.inputs.iter_input_rows` sends it to
    :func:`reprotune.data.hub.iter_rows`, which reads the snapshot's files through this one.

    Raises FileNotFoundError when the file does not exist and :class:`InputFileError` when
    the file as a whole cannot be read; everything wrong with a single row is reported on
    that row instead.
    """
    source = str(path)
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{source}: is a directory, not a file; list the files in it "
                             f"one by one in ingest.inputs")
    if not p.is_file():
        raise FileNotFoundError(f"{source}: input file not found (listed in params.yaml "
                                f"ingest.inputs; paths are relative to the repository root)")
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        unpack = (f"; it is compressed: unpack it first (e.g. `gunzip -k {source}` for .gz) "
                  f"and list the unpacked file" if ext in COMPRESSED else "")
        raise InputFileError(f"{source}: unsupported file type {ext or '(none)'!r} in "
                             f"ingest.inputs; supported: {', '.join(SUPPORTED)} "
                             f"and *.hub.yaml manifests of hub datasets{unpack}")
    if ext == ".parquet":
        yield from _iter_parquet(source, p)
        return
    if ext == ".txt":  # one document: the whole file, as written (a BOM is not text)
        yield RawRow(source, 1, data={"text": decode_text(source, p.read_bytes())})
        return
    if ext == ".json":
        yield from _iter_json(source, p)
        return
    with p.open("rb") as fh:
        if ext == ".jsonl":
            _refuse_pretty_printed(source, fh)
        yield from (_iter_lines if ext == ".jsonl" else _iter_csv)(source, fh)


def _refuse_pretty_printed(source: str, fh: BinaryIO) -> None:
    """A ``.jsonl`` file whose first object spans several lines is pretty-printed JSON, not
    JSON Lines: read line by line, every line would be a reject. Stop with the fix."""
    begin = fh.tell()
    encoding, bom = detect(fh.read(4))
    fh.seek(begin + bom)
    try:
        span = jsonstream.first_value_span(jsonstream.TextWindow(fh, encoding, PEEK))
    except UnicodeDecodeError:  # not text in that encoding: the line reader reports it
        span = None
    fh.seek(begin)
    if span is not None:
        out = Path(source).with_suffix(".json")
        raise InputFileError(
            f"{source}: line {span[0]}: one JSON value spans lines {span[0]}-{span[1]}, so the "
            f"file is pretty-printed JSON, not JSON Lines (one object per line); rename it to "
            f".json, which reads pretty-printed objects one after another or one array "
            f"(mv {source} {out}, dvc add it and list it in ingest.inputs), or write one "
            f"object per line: jq -c . {source} > {Path(source).with_suffix('.oneline.jsonl')}")
