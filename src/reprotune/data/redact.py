"""PII redaction of canonical records (脱敏): every trained text field, a policy per type.

Fields read (the names used in the counts, :func:`record_fields`):

* ``messages.<role>`` -- each message's content (``system``, ``user``, ``assistant``, and
  ``tool`` for tool results), ``messages.reasoning_content``, ``messages.tool_calls.arguments``
  (every string, and every integer, inside a call's arguments);
* ``tools`` -- the strings of the tool schemas (descriptions, enums), except ``name``/``type``/
  ``required``, which are identifiers the template needs as they are;
* ``rejected.*`` -- the same for the rejected answer of a preference pair.

``id``, ``source``, ``label``, ``group`` and ``meta`` are not read: they are never trained
on, and masking a group would merge groups in the split. ``id`` stays the ingest id (the
sha1 of the text *before* masking), so a row can be traced back to its input.

A string argument under a secret-looking key (``password``, ``api_key``, ``token``, ...)
is a ``SECRET`` as a whole. Per type the policy (params ``redact.policy``) is ``mask``
(Presidio's ``replace`` operator writes ``<TYPE>``), ``keep``, or ``drop``: the row goes to
the dropped file under the first of :data:`~reprotune.params.PII_TYPES` it holds, so
``in == kept + sum(dropped)``. Text outside a masked span is left byte for byte as it was.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import regex
from tqdm.auto import tqdm

# presidio's classes come through pii, which imports presidio without transformers (it says why)
from reprotune.data import pii
from reprotune.data.pii import AnonymizerEngine, OperatorConfig, RecognizerResult
from reprotune.params import PII_TYPES, RedactParams

logger = logging.getLogger(__name__)

SECRET_KEY = regex.compile(r"(?i)^(?:.*[_-])?(?:password|passwd|pwd|secret|api[_-]?key|apikey"
                           r"|token|access[_-]?key|private[_-]?key)$|^(?:密码|口令)$")
SCHEMA_IDENTIFIERS = frozenset({"name", "type", "required"})
CONTEXT = 40  # characters each side of a span in the review file


def placeholder(pii_type: str) -> str:
    return f"<{pii_type}>"


@lru_cache(maxsize=1)
def _anonymizer() -> AnonymizerEngine:
    return AnonymizerEngine()


def mask(text: str, spans: Iterable[pii.Span], policy: RedactParams) -> str:
    """``text`` with the spans whose policy is ``mask`` replaced by ``<TYPE>`` (Presidio's
    ``replace`` operator); ``spans`` must not overlap (:func:`reprotune.data.pii.resolve`)."""
    todo = [RecognizerResult(s.type, s.start, s.end, s.score) for s in spans
            if policy.action(s.type) == "mask"]
    if not todo:
        return text
    ops = {r.entity_type: OperatorConfig("replace", {"new_value": placeholder(r.entity_type)})
           for r in todo}
    # merge_entities_with_spaces=False: two numbers a space apart stay two placeholders,
    # and the space between them stays
    return _anonymizer().anonymize(text, todo, operators=ops,
                                   merge_entities_with_spaces=False).text


@dataclass
class Found:
    """One text field's detections: ``spans`` index into ``text`` (the original)."""

    field: str
    text: str
    spans: list[pii.Span]


def _detect(text: str, fld: str, key: str | None, out: list[Found]) -> list[pii.Span]:
    spans = pii.find(text)
    if key is not None and SECRET_KEY.match(key) and text.strip() \
            and not pii.is_placeholder(text):
        spans = pii.resolve([*spans, pii.Span(0, len(text), "SECRET")])
    if spans:
        out.append(Found(fld, text, spans))
    return spans


def _json(value: Any, fld: str, fn: Callable[[str, str, str | None], str],
          key: str | None = None, skip: frozenset[str] = frozenset()) -> Any:
    """``value`` with every string (and integer, as its digits) passed through ``fn``."""
    if isinstance(value, str):
        return value if key in skip else fn(value, fld, key)
    if isinstance(value, dict):
        return {k: _json(v, fld, fn, k, skip) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v, fld, fn, key, skip) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):  # {"phone": 13812345678}
        digits = str(value)
        new = fn(digits, fld, key)
        return value if new == digits else new
    return value


def _turns(turns: list[dict[str, Any]], prefix: str,
           fn: Callable[[str, str, str | None], str]) -> list[dict[str, Any]]:
    out = []
    for m in turns:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = fn(m["content"], f"{prefix}.{m.get('role')}", None)
        if isinstance(m.get("reasoning_content"), str):
            m["reasoning_content"] = fn(m["reasoning_content"], f"{prefix}.reasoning_content",
                                        None)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _json(
                    c["function"].get("arguments"), f"{prefix}.tool_calls.arguments", fn)}}
                if isinstance(c.get("function"), dict) else c for c in m["tool_calls"]]
        out.append(m)
    return out


def record_fields(rec: dict[str, Any], fn: Callable[[str, str, str | None], str]
                  ) -> dict[str, Any]:
    """A copy of ``rec`` with each text field (module docstring) replaced by
    ``fn(text, field name, JSON key or None)``; everything else is the same object."""
    out = dict(rec)
    out["messages"] = _turns(rec["messages"], "messages", fn)
    if rec.get("tools"):
        out["tools"] = _json(rec["tools"], "tools", fn, skip=SCHEMA_IDENTIFIERS)
    pair = rec.get("preference")
    if isinstance(pair, dict) and isinstance(pair.get("rejected"), list):
        out["preference"] = {**pair, "rejected": _turns(pair["rejected"], "rejected", fn)}
    return out


def redact_record(rec: dict[str, Any], policy: RedactParams
                  ) -> tuple[dict[str, Any], list[Found]]:
    """(the masked record, the detections per field); a record without PII comes back as is."""
    found: list[Found] = []

    def fn(text: str, fld: str, key: str | None) -> str:
        spans = _detect(text, fld, key, found)
        return mask(text, spans, policy) if spans else text

    new = record_fields(rec, fn)
    return (new if found else rec), found


def drop_reason(found: list[Found], policy: RedactParams) -> str | None:
    """The first type of :data:`PII_TYPES` with a ``drop`` policy that the row holds."""
    held = {s.type for f in found for s in f.spans}
    return next((t for t in PII_TYPES if t in held and policy.action(t) == "drop"), None)


def _review(rec: dict[str, Any], f: Found, s: pii.Span, action: str) -> dict[str, Any]:
    before = f.text[max(0, s.start - CONTEXT):s.start]
    after = f.text[s.end:s.end + CONTEXT]
    return {"id": rec.get("id"), "source": rec.get("source"), "field": f.field, "type": s.type,
            "action": action, "span": f.text[s.start:s.end],
            "context": f"{before}[[{placeholder(s.type)}]]{after}"}


@dataclass
class RedactCounts:
    rows_in: int = 0
    kept: int = 0
    rows_masked: int = 0
    dropped: Counter = field(default_factory=Counter)
    found: Counter = field(default_factory=Counter)  # spans per type, all rows
    masked: Counter = field(default_factory=Counter)  # spans replaced, kept rows
    by_field: dict[str, Counter] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The small metrics file (dvc exp show stays narrow): rows and spans per type."""
        return {"in": self.rows_in, "kept": self.kept,
                "dropped": sum(self.dropped.values()), "rows_masked": self.rows_masked,
                "found": {t: self.found[t] for t in PII_TYPES}}

    def report(self, cfg: RedactParams) -> dict[str, Any]:
        """The detail: drops by reason, spans masked, spans per field and type."""
        return {"enabled": cfg.enabled, "in": self.rows_in, "kept": self.kept,
                "dropped": {t: self.dropped[t] for t in PII_TYPES},
                "policy": {t: cfg.action(t) for t in PII_TYPES},
                "found": {t: self.found[t] for t in PII_TYPES},
                "masked": {t: self.masked[t] for t in PII_TYPES},
                "by_field": {f: dict(sorted(c.items())) for f, c in sorted(self.by_field.items())}}


def redact_stream(rows: Iterable[dict[str, Any]], cfg: RedactParams, *,
                  kept: Callable[[dict[str, Any]], None],
                  dropped: Callable[[dict[str, Any]], None],
                  review: Callable[[dict[str, Any]], None],
                  progress: bool = False) -> tuple[RedactCounts, float]:
    """Redact ``rows`` in order: each goes to ``kept`` (masked) or, as ``{id, source,
    reason, fields}``, to ``dropped``; up to ``review_per_type`` spans per type go to
    ``review``. Returns the counts and the seconds spent."""
    t0 = time.perf_counter()
    c = RedactCounts()
    reviewed: Counter = Counter()
    for rec in tqdm(rows, desc="redact", unit="row", disable=not progress, leave=False,
                    mininterval=1):
        c.rows_in += 1
        if not cfg.enabled:
            c.kept += 1
            kept(rec)
            continue
        new, found = redact_record(rec, cfg)
        reason = drop_reason(found, cfg)
        masked_here = 0
        for f in found:
            per = c.by_field.setdefault(f.field, Counter())
            for s in f.spans:
                c.found[s.type] += 1
                per[s.type] += 1
                action = "drop" if reason else cfg.action(s.type)
                if action == "mask":
                    c.masked[s.type] += 1
                    masked_here += 1
                if reviewed[s.type] < cfg.review_per_type:
                    reviewed[s.type] += 1
                    review(_review(rec, f, s, action))
        if reason:
            c.dropped[reason] += 1
            dropped({"id": rec.get("id"), "source": rec.get("source"), "reason": reason,
                     "fields": sorted({f.field for f in found})})
            continue
        c.kept += 1
        c.rows_masked += masked_here > 0
        kept(new)
    assert c.rows_in == c.kept + sum(c.dropped.values())
    seconds = time.perf_counter() - t0
    logger.info("redact: in %d, kept %d (%d with spans masked), dropped %s; spans %s; %.1f s",
                c.rows_in, c.kept, c.rows_masked, dict(c.dropped) or "none",
                dict(c.found) or "none", seconds)
    return c, seconds
