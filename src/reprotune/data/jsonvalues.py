"""JSON values as input rows hold them: ``NaN``/``Infinity`` kept recognisable
(:class:`NonFinite`, never a float), numbers with their source text (:class:`JsonInt`,
:class:`JsonFloat`: ``1.50`` stays ``1.50`` where a number is used as text), keys given twice
remembered, nesting bounded (:data:`MAX_DEPTH`, :func:`decode`), and :func:`json_problem`
saying why a parsed value cannot be taken as written."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Deepest nesting a row may have. Real rows nest a few levels (messages > tool call >
# arguments); the C decoder itself gives up near the interpreter's recursion limit (1000)
# with a RecursionError, and later steps (JSON writing, the template) recurse too.
MAX_DEPTH = 100


@dataclass(frozen=True)
class NonFinite:
    """A JSON ``NaN``/``Infinity``/``-Infinity`` constant, kept apart from real numbers."""

    constant: str

    def __str__(self) -> str:
        return self.constant


class JsonInt(int):
    """A JSON integer that remembers its source text (``-0`` stays ``-0``)."""

    text: str

    def __new__(cls, text: str) -> JsonInt:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


class JsonFloat(float):
    """A JSON number with a fraction or exponent that remembers its source text (``1.50``,
    ``1e5`` and a decimal longer than a float holds stay as written)."""

    text: str

    def __new__(cls, text: str) -> JsonFloat:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def number_text(value: int | float) -> str:
    """The text of a number: its JSON source text when it came from JSON, else ``str``."""
    return getattr(value, "text", None) or str(value)


def dumps_exact(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)``, but numbers parsed from JSON are written
    with their source text (``21.50`` stays ``21.50``): for a JSON value that becomes text,
    such as a tool's observation object. ``value`` must be at most :data:`MAX_DEPTH` deep."""
    if isinstance(value, (JsonInt, JsonFloat)):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {dumps_exact(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps_exact(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def json_type(value: object) -> str:
    """JSON's name for the type of a parsed value (``object``, not the Python class name)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, NonFinite)):
        return "number"
    for kind, name in ((dict, "object"), (list, "array"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


class _Object(dict):
    """A parsed JSON object that remembers keys given twice (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar is 0, ``[]`` is 1); walked
    with a stack, so any depth is measured without recursion."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def text_depth(text: str, pos: int = 0) -> tuple[int, int | None]:
    """``(deepest nesting, end)`` of the JSON value starting at ``text[pos]``, found by
    counting brackets outside strings (no parse, no recursion): ``end`` is the position
    after the bracket that closes the value, None when the text ends first."""
    level = deepest = 0
    for m in _TOKEN.finditer(text, pos):
        tok = m.group()
        if tok in "[{":
            level += 1
            deepest = max(deepest, level)
        elif tok in "]}":
            level -= 1
            if level <= 0:
                return deepest, m.end()
        elif level == 0:  # a string at the top level: the value is that string
            return 0, m.end()
    return deepest, None


def too_deep(found: int) -> str:
    """The reject text of a value nested ``found`` levels deep."""
    return f"nested {found} levels deep (more than {MAX_DEPTH}: a broken or hostile row)"


def _may_have_problem(value: Any) -> bool:
    """False when :func:`json_problem` surely finds nothing: no object has a key given twice,
    nothing nests deeper than :data:`MAX_DEPTH`, and all strings (keys too) together encode
    as UTF-8. One loop and one encode instead of a call and a path string per value: this
    runs on every input row."""
    level, texts, levels = [value], [], 0
    while level:  # breadth first, a level of nesting at a time: no depth kept per value
        levels += 1  # the values of `level` are nested levels - 1 deep
        if levels > MAX_DEPTH + 1:  # maybe deeper than MAX_DEPTH: json_problem measures
            return True
        below: list[Any] = []
        for v in level:
            if isinstance(v, str):
                texts.append(v)
            elif isinstance(v, dict):
                if getattr(v, "duplicates", ()):
                    return True
                texts.extend(v)
                below.extend(v.values())
            elif isinstance(v, list):
                below.extend(v)
        level = below
    try:
        "".join(texts).encode("utf-8")
    except (UnicodeEncodeError, TypeError):  # TypeError: a key that is not a string
        return True
    return False


def json_problem(value: Any, path: str = "") -> str | None:
    """Why a parsed value cannot be taken as written: nested deeper than :data:`MAX_DEPTH`
    (later steps walk values recursively), a key given twice (which value did the user
    mean?) or an unpaired surrogate escape such as \\ud800 (not Unicode text)."""
    if not _may_have_problem(value):
        return None
    found = depth(value)
    return too_deep(found) if found > MAX_DEPTH else _problem(value, path)


def _problem(value: Any, path: str) -> str | None:
    """:func:`json_problem`'s walk: the first problem in document order, with its path."""
    if isinstance(value, dict):
        dup = getattr(value, "duplicates", ())
        if dup:
            return f"key {dup[0]!r} appears twice in the object at {path or 'the top level'}"
        for k, v in value.items():
            found = _problem(k, path) or _problem(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _problem(v, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"unpaired surrogate {value[exc.start]!r} at {path or 'a key'}: not valid Unicode text"
    return None


# NaN/Infinity stay recognisable, numbers keep their text, duplicate keys are remembered
# (see json_problem)
JSON_DECODER = json.JSONDecoder(parse_constant=NonFinite, object_pairs_hook=_object_hook,
                                parse_int=JsonInt, parse_float=JsonFloat)


def decode(text: str) -> Any:
    """``JSON_DECODER.decode`` with nesting bounded: a value deeper than the decoder can
    recurse raises ``json.JSONDecodeError`` saying how deep it is, like any syntax error
    (deep values it can decode are caught by :func:`json_problem`)."""
    try:
        return JSON_DECODER.decode(text)
    except RecursionError:
        pos = len(text) - len(text.lstrip(" \t\n\r"))
        raise json.JSONDecodeError(too_deep(text_depth(text, pos)[0]), text, pos) from None


def is_non_finite(value: Any) -> bool:
    """True for a NaN/Infinity constant from JSON or a non-finite float (Parquet, CSV readers)."""
    return isinstance(value, NonFinite) or (isinstance(value, float) and not math.isfinite(value))
