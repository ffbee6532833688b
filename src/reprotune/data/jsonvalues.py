"""JSON values as input rows hold them: ``NaN``/``Infinity`` kept recognisable
(:class:`NonFinite`, never a float), keys given twice remembered, and :func:`json_problem`
saying why a parsed value cannot be taken as written."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NonFinite:
    """A JSON ``NaN``/``Infinity``/``-Infinity`` constant, kept apart from real numbers."""

    constant: str

    def __str__(self) -> str:
        return self.constant


class _Object(dict):
    """A parsed JSON object that remembers keys given twice (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _may_have_problem(value: Any) -> bool:
    """False when :func:`json_problem` surely finds nothing: no object has a key given twice
    and all strings (keys too) together encode as UTF-8. One loop and one encode instead of
    a call and a path string per value: this runs on every input row."""
    stack, texts = [value], []
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, dict):
            if getattr(v, "duplicates", ()):
                return True
            texts.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    try:
        "".join(texts).encode("utf-8")
    except (UnicodeEncodeError, TypeError):  # TypeError: a key that is not a string
        return True
    return False


def json_problem(value: Any, path: str = "") -> str | None:
    """Why a parsed value cannot be taken as written: a key given twice (which value did the
    user mean?) or an unpaired surrogate escape such as \\ud800 (not Unicode text)."""
    return _problem(value, path) if _may_have_problem(value) else None


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


# NaN/Infinity stay recognisable, duplicate keys are remembered (see json_problem)
JSON_DECODER = json.JSONDecoder(parse_constant=NonFinite, object_pairs_hook=_object_hook)


def is_non_finite(value: Any) -> bool:
    """True for a NaN/Infinity constant from JSON or a non-finite float (Parquet, CSV readers)."""
    return isinstance(value, NonFinite) or (isinstance(value, float) and not math.isfinite(value))
