"""A ``.json`` input file read as a stream: its top-level array decoded element by element
from a sliding window of its text, so memory holds about one chunk plus the element being
decoded, never the whole file (a 5 GB array is read in tens of MiB).

:class:`TextWindow` decodes the file chunk by chunk and keeps only the text from the
element being decoded on; it counts the lines it drops, so file line and column numbers
stay exact. An element is decoded with ``json.JSONDecoder.raw_decode`` on the window; a
result that may depend on where the window ends (the element or the text after it runs
into the window end, or an error close to it) is thrown away, the window grows and the
element is decoded again. A window therefore grows only while one element (or one run of
whitespace) is longer than a chunk, and it grows geometrically, so re-decoding costs O(its
size) in all. Anything else is decided exactly as on the whole text in memory: same rows,
same line numbers, same error text.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

from reprotune.data.encoding import InputFileError
from reprotune.data.jsonvalues import JSON_DECODER, text_depth, too_deep

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and decoded per refill of the window
# A decode error this close to the window end may come from the cut (a literal like
# -Infinity or a \uXXXX escape cut short is reported at its start): grow and decode again.
MARGIN = 16
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as the decoder skips it
_STRUCTURE = re.compile(r'[\s,\[\]{}:"]')  # what separates or delimits JSON tokens


class Item(NamedTuple):
    """One array element (``value``) or one problem row (``error`` and ``raw``), with the
    row's line: the element index + 1."""

    line: int
    value: Any = None
    error: str | None = None
    raw: str | None = None


class TextWindow:
    """The decoded text of a binary stream, held from a moving start: ``buf`` is the text
    from that start to as far as has been read; ``eof`` says whether that is the end."""

    def __init__(self, fh: BinaryIO, encoding: str, chunk: int | None = None) -> None:
        self._fh = fh
        self._chunk = chunk  # bytes read at least per refill (None: CHUNK)
        self._decoder = codecs.getincrementaldecoder(encoding)()
        self.buf = ""
        self.eof = False
        self._lines = 0  # "\n" before buf[0]
        self._col = 0  # characters after the last "\n" before buf[0]

    def refill(self, drop: int) -> None:
        """Forget ``buf[:drop]`` (read and done with) and append more text: at least one
        chunk, and at least twice the bytes of what is kept, so a long element is decoded
        again only O(log) times. At the end of the stream, sets ``eof`` instead."""
        newlines = self.buf.count("\n", 0, drop)
        if newlines:
            self._lines += newlines
            self._col = drop - self.buf.rfind("\n", 0, drop) - 1
        else:
            self._col += drop
        kept = self.buf[drop:]
        want = max(self._chunk or CHUNK, 2 * len(kept))
        while True:
            data = self._fh.read(want)
            text = self._decoder.decode(data, final=not data)
            if text or not data:
                break
        self.eof = not data
        self.buf = kept + text

    def skip_ws(self, pos: int) -> int:
        """Position of the first non-whitespace character at or after ``pos``, refilling
        (and forgetting the whitespace) at the window end; ``len(buf)`` only at ``eof``."""
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or self.eof:
                return pos
            self.refill(pos)
            pos = 0

    def line_of(self, pos: int) -> int:
        """1-based file line of ``buf[pos]``."""
        return self._lines + self.buf.count("\n", 0, pos) + 1

    def column_of(self, pos: int) -> int:
        """1-based file column of ``buf[pos]``, as ``json.JSONDecodeError.colno`` counts."""
        newline = self.buf.rfind("\n", 0, pos)
        return pos - newline if newline >= 0 else self._col + pos + 1

    def maybe_cut(self, exc: json.JSONDecodeError) -> bool:
        """Whether an error in ``buf`` may be due to the window ending where it does (then
        grow and decode again), or whether the file may end in whitespace after it (which
        makes it a truncation instead of a break). Never at ``eof``."""
        return not self.eof and (exc.msg.startswith("Unterminated string")
                                 or exc.pos + MARGIN > len(self.buf)
                                 or self.buf[exc.pos:].isspace())


def _deep_end(win: TextWindow, start: int) -> tuple[int, int | None] | None:
    """``(depth, end)`` of a value at ``buf[start]`` too deep for the decoder
    (:func:`~reprotune.data.jsonvalues.text_depth`); None when the window ends inside it
    and more text follows (grow and look again)."""
    found, end = text_depth(win.buf, start)
    return None if end is None and not win.eof else (found, end)


def classify(win: TextWindow) -> tuple[str, Any]:
    """What the text is: ``("empty", None)``, ``("array", position of its "[")``,
    ``("object", the one value)``, ``("deep", why)`` for one value nested too deep to
    decode, or ``("lines", None)``: several values in a row (or a broken first one), to be
    read one object per line."""
    pos = win.skip_ws(0)
    if pos >= len(win.buf):
        return "empty", None
    if win.buf[pos] == "[":
        return "array", pos
    while True:
        try:
            obj, end = JSON_DECODER.raw_decode(win.buf, pos)
        except RecursionError:
            deep = _deep_end(win, pos)
            if deep is None:
                win.refill(pos)
                pos = 0
                continue
            if deep[1] is not None and _WS.match(win.buf, deep[1]).end() < len(win.buf):
                return "lines", None
            return "deep", too_deep(deep[0])
        except json.JSONDecodeError as exc:
            if win.maybe_cut(exc):
                win.refill(pos)
                pos = 0
                continue
            return "lines", None
        if _WS.match(win.buf, end).end() < len(win.buf):
            return "lines", None
        if win.eof:
            return "object", obj
        win.refill(pos)
        pos = 0


def iter_array(source: str, win: TextWindow, pos: int, raw_limit: int) -> Iterator[Item]:
    """Elements of the JSON array starting at ``win.buf[pos] == "["``, element by element.

    A file that simply ends too early (an interrupted download or export) yields its
    complete elements and ONE error item for the cut-off tail, saying where it starts. A
    syntax error with more text after it (a missing comma in the middle) is an
    :class:`InputFileError`: the rows after it can be neither read nor counted.
    """
    pos, index = win.skip_ws(pos + 1), 0
    if pos < len(win.buf) and win.buf[pos] == "]":
        return
    while True:
        start, buf, item = pos, win.buf, None
        try:
            try:
                obj, pos = JSON_DECODER.raw_decode(buf, start)
            except RecursionError:  # too deep to decode: one reject, then the next element
                deep = _deep_end(win, start)
                if deep is None:
                    win.refill(start)
                    pos = 0
                    continue
                if deep[1] is None:  # the file ends inside it
                    yield Item(index + 1, raw=buf[start:start + raw_limit],
                               error=f"the file ends inside array element {index + 1}, which "
                                     f"is {too_deep(deep[0])}: truncated")
                    return
                obj, pos = None, deep[1]
                item = Item(index + 1, raw=buf[start:min(pos, start + raw_limit)],
                            error=f"invalid JSON: array element {index + 1} is {too_deep(deep[0])}")
            pos = _WS.match(buf, pos).end()
            if pos >= len(buf) and not win.eof:  # the element or the text after it may go on
                win.refill(start)
                pos = 0
                continue
            if pos >= len(buf):  # a complete element, then the end of the file
                yield item or Item(index + 1, obj)
                yield Item(index + 2, raw="", error=(
                    f"the file ends after array element {index + 1} without the closing ']': "
                    f"truncated; any later elements are missing"))
                return
            if buf[pos] not in ",]":
                raise json.JSONDecodeError("expected ',' or ']' after an element", buf, pos)
        except json.JSONDecodeError as exc:
            if win.maybe_cut(exc):
                win.refill(start)
                pos = 0
                continue
            yield _tail_or_raise(source, win, exc, start, index, raw_limit)
            return
        yield item or Item(index + 1, obj)
        index += 1
        if buf[pos] == "]":
            yield from _after_close(win, pos + 1, index, raw_limit)
            return
        pos = win.skip_ws(pos + 1)


def _last_token(rest: str) -> bool:
    """Whether the text from a decode error to the end of the file is at most one token
    cut short (``tru``, ``-``, ``2.``, the ``u4e2`` of a ``\\u`` escape, or nothing): the
    file simply ends there, so no element after it can be lost."""
    rest = rest.rstrip()
    return len(rest) <= MARGIN and not _STRUCTURE.search(rest)


def _tail_or_raise(source: str, win: TextWindow, exc: json.JSONDecodeError, start: int,
                   index: int, raw_limit: int) -> Item:
    """The error item for an array cut off inside element ``index + 1`` (starting at
    ``buf[start]``), or :class:`InputFileError` when text follows the error: a break."""
    buf, line = win.buf, win.line_of(start)
    if not (exc.msg.startswith("Unterminated string") or _last_token(buf[exc.pos:])):
        raise InputFileError(
            f"{source}: line {win.line_of(exc.pos)} column {win.column_of(exc.pos)}: "
            f"{exc.msg} (in array element {index + 1}, which starts on line {line}); the "
            f"array is broken before its end, so the rows after it cannot be read or "
            f"counted. Fix the file (`python -m json.tool {source}` points at the spot)"
        ) from exc
    tail = buf[start:]  # at eof: the window holds the rest of the file
    return Item(index + 1, raw=tail[:raw_limit], error=(
        f"the file ends inside array element {index + 1} (file line {line}): truncated "
        f"({exc.msg}); {index} complete elements before it were read, the last "
        f"{tail.count(chr(10)) + 1} lines ({len(tail)} characters) were not"))


def _after_close(win: TextWindow, pos: int, count: int, raw_limit: int) -> Iterator[Item]:
    """One error item when anything but whitespace follows the closing "]" at ``pos - 1``."""
    rest = win.skip_ws(pos)
    if rest >= len(win.buf):
        return
    while len(win.buf) - rest < raw_limit and not win.eof:
        win.refill(rest)
        rest = 0
    yield Item(count + 1, raw=win.buf[rest:rest + raw_limit],
               error=f"unexpected text after the closing ']' at file line {win.line_of(rest)}")


def _next_value(win: TextWindow, pos: int) -> tuple[Any, int, int]:
    """``(value, its start, its end)`` of the JSON value at ``win.buf[pos]``, growing the
    window until the value and what follows it are decided; raises ``json.JSONDecodeError``
    or ``RecursionError`` (too deep) where the text is not a JSON value."""
    while True:
        try:
            obj, end = JSON_DECODER.raw_decode(win.buf, pos)
        except json.JSONDecodeError as exc:
            if win.maybe_cut(exc):
                win.refill(pos)
                pos = 0
                continue
            raise
        if end >= len(win.buf) and not win.eof:  # a number may go on past the window end
            win.refill(pos)
            pos = 0
            continue
        return obj, pos, end


def first_value_span(win: TextWindow) -> tuple[int, int] | None:
    """``(first line, last line)`` of the text's first JSON value when its first line alone
    is not JSON but the value is, ending on a later line: a pretty-printed object (or
    array) in a file meant to hold one value per line. None otherwise."""
    pos = win.skip_ws(0)
    if pos >= len(win.buf) or win.buf[pos] not in "{[":
        return None
    newline = win.buf.find("\n", pos)
    try:
        if newline < 0:  # a first line longer than the window: not an object's "{" line
            return None
        JSON_DECODER.decode(win.buf[pos:newline].rstrip("\r"))
        return None  # the first line is a whole value: JSON Lines
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        _, start, end = _next_value(win, pos)
    except (json.JSONDecodeError, RecursionError):
        return None
    return win.line_of(start), win.line_of(end - 1)


def iter_values(source: str, win: TextWindow, raw_limit: int) -> Iterator[Item]:
    """Each JSON value of a text holding values one after another (pretty-printed objects
    in a row), as an :class:`Item` whose line is the file line where the value starts.

    As for an array: a text that ends inside a value yields ONE error item for that tail;
    a value broken with more text after it is an :class:`InputFileError` (the values after
    it cannot be told apart or counted)."""
    pos = win.skip_ws(0)
    while pos < len(win.buf):
        try:
            obj, start, end = _next_value(win, pos)
        except RecursionError:
            found, _ = text_depth(win.buf, pos)
            raise InputFileError(f"{source}: line {win.line_of(pos)}: a value "
                                 f"{too_deep(found)}; fix or remove it") from None
        except json.JSONDecodeError as exc:
            line = win.line_of(pos)
            if exc.msg.startswith("Unterminated string") or _last_token(win.buf[exc.pos:]):
                tail = win.buf[pos:]
                yield Item(line, raw=tail[:raw_limit], error=(
                    f"the file ends inside the value starting on line {line}: truncated "
                    f"({exc.msg}); the last {tail.count(chr(10)) + 1} lines were not read"))
                return
            raise InputFileError(
                f"{source}: line {win.line_of(exc.pos)} column {win.column_of(exc.pos)}: "
                f"{exc.msg} (in the value starting on line {line}); the values after it "
                f"cannot be read or counted. Fix the file (`jq . {source}` points at the "
                f"spot)") from exc
        yield Item(win.line_of(start), obj)
        pos = win.skip_ws(end)


def utf8_copy(fh: BinaryIO, encoding: str) -> BinaryIO:
    """The text from ``fh``'s position on, re-encoded as UTF-8 into an anonymous temporary
    file (gone when closed, or when the process dies), positioned at its start."""
    out = tempfile.TemporaryFile()
    decoder = codecs.getincrementaldecoder(encoding)()
    while True:
        data = fh.read(CHUNK)
        out.write(decoder.decode(data, final=not data).encode("utf-8"))
        if not data:
            break
    out.seek(0)
    return out
