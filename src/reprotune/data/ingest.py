"""Raw rows → canonical conversation records (docs/DESIGN.md) or rejected-row entries.

Formats and their conversion: :mod:`reprotune.data.formats` (``ingest.format: auto``
detects per row). Here: validation, the per-row outcome, and the counts.

Every row ends as exactly one record or one reject, so ``rows_in = kept + rejected``; rows
are converted one at a time (:func:`convert_rows`) with running counts (:class:`IngestCounts`),
so a stage can stream them to disk.
Empty assistant answers are kept on purpose: the dedup stage's quality filter counts them.

Fidelity: text is stored exactly as the user wrote it (no Unicode normalisation, no
whitespace changes: ``，`` stays ``，``, ``5²`` stays ``5²``, aligned code keeps its spaces).
Only the keys used to *compare* rows are normalised, in dedup and the split leakage check.
Structure is made canonical: roles, OpenAI content parts joined, tool calls as
``{"type": "function", "function": {"name", "arguments"}}`` and tool schemas wrapped the
same way, as the Qwen3 template and LLaMA-Factory expect. Key order inside tool schemas and
arguments is kept.

Message keys the template does not render (``name``, ``tool_call_id``, ...) are not kept;
``dropped_message_keys`` counts them per key, so none vanishes unseen. ``reasoning_content``
and ``loss_weight`` are kept (:mod:`reprotune.data.formats`); a row whose every assistant
turn has ``loss_weight: 0`` trains nothing and is rejected (``no_trained_turn``).

Rows are rejected, never repaired, when their text contains the tokenizer's control or
markup strings (:mod:`reprotune.markup`), when a tool name is not a plain identifier, or when
a field holds JSON's ``NaN``/``Infinity``.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reprotune import markup
from reprotune.data import preference
from reprotune.data.formats import (
    CONVERTERS,
    FORMATS,
    LAYOUT,
    MARKERS,
    TEXT,
    RowError,
    detect_format,
    record_id,
    tools_of,
    v1_names,
    v1_pair,
)
from reprotune.data.jsonvalues import is_non_finite, json_problem, number_text
from reprotune.data.readers import RAW_LIMIT, RawRow

logger = logging.getLogger(__name__)

CANONICAL_COLUMNS = ("instruction", "input", "output", "system", "history", "conversations",
                     "messages", "prompt", "completion", "chosen", "rejected", "tools", "text")
REASONS = ("parse_error", "unknown_format", "missing_field", "wrong_type", "non_finite_number",
           "unknown_role", "no_assistant_turn", "ends_on_non_assistant", "role_order",
           markup.REASON, "invalid_tool_call", "invalid_tools", "invalid_loss_weight",
           "no_trained_turn", *preference.REASONS)
@dataclass
class IngestResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def example(self, source: str, reason: str) -> dict[str, Any]:
        """The first reject of ``source`` for ``reason`` ({} when there is none)."""
        return next((r for r in self.rejects if r["source"] == source and r["reason"] == reason), {})


# --------------------------------------------------------------------------- validation
def _check(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           text: bool = False) -> None:
    """Role order, final assistant turn and the special-token injection guard (a text
    document: the guard only)."""
    if text:
        _check_markup(messages, tools)
        return
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant_turn", None, "conversation has no assistant turn")
    prev: dict[str, Any] | None = None
    for i, m in enumerate(messages):
        role, before = m["role"], prev["role"] if prev else None
        ok = {"system": i == 0,
              "user": before in (None, "system", "assistant"),
              "assistant": before in ("user", "tool"),
              "tool": before == "tool" or (before == "assistant" and bool(prev.get("tool_calls")))}[role]
        if not ok:
            raise RowError("role_order", m["_src"],
                           f"{m['_src']}: {role} turn after {before or 'the start'}")
        prev = m
    if messages[-1]["role"] != "assistant":
        raise RowError("ends_on_non_assistant", messages[-1]["_src"],
                       f"conversation ends on a {messages[-1]['role']} turn")
    if all(m.get("loss_weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RowError("no_trained_turn", messages[-1]["_src"] + ".loss_weight",
                       "every assistant turn has loss_weight 0, so the row trains nothing; "
                       "set loss_weight 1 on the turns to learn")
    _check_markup(messages, tools)


def _check_markup(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    hit = markup.find_forbidden(messages, tools, markup.default_forbidden())
    if hit is not None:
        where, tok = hit
        fld = messages[int(where[9:where.index("]")])]["_src"] if where.startswith("messages[") else where
        raise RowError(markup.REASON, fld, f"{fld} contains {tok!r}, a control/markup token of "
                       f"the tokenizer or chat template (it would change the rendered conversation)")


def _remap(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Rename user columns to canonical names; null values count as absent (Parquet/CSV gaps)."""
    picked = {canon: row[user] for canon, user in columns.items() if user in row}
    out = {k: v for k, v in row.items() if k not in set(columns.values())}
    out.update(picked)
    # An empty CSV cell in an optional structured column means "none", not bad JSON.
    return {k: v for k, v in out.items()
            if v is not None and not (k in ("history", "tools") and v == "")}


def _meta(row: Mapping[str, Any], key: str | None) -> str | None:
    """A label/group value as text, exactly as given; null, NaN and blank mean "none"
    (pandas writes a missing value as NaN)."""
    if not key or row.get(key) is None or is_non_finite(row[key]):
        return None
    v = row[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = number_text(v)  # as written: label 1.50 stays "1.50"
    v = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
    return v if v.strip() else None


def _kept(row: Mapping[str, Any], keep_fields: Sequence[str]) -> dict[str, Any] | None:
    """The raw fields of ``keep_fields`` the row has, values as given; null and NaN mean
    absent, dates (from Parquet) become ISO text. None when the row has none of them."""
    out = {}
    for key in keep_fields:
        v = row.get(key)
        if v is None or is_non_finite(v):
            continue
        out[key] = v.isoformat() if isinstance(v, (datetime.date, datetime.time)) else v
    return out or None


def convert_row(row: dict[str, Any], *, fmt: str = "auto", columns: Mapping[str, str] | None = None,
                label_field: str | None = "label", group_field: str | None = "group",
                keep_fields: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """One parsed row → ``(format, record without source)``; raises RowError on rejection."""
    meta = _kept(row, keep_fields)
    row, v1 = v1_pair(_remap(row, columns or {}))
    detected = detect_format(row) if fmt == "auto" else fmt
    convert = CONVERTERS.get(detected)
    if detected is None and preference.implicit_prompt(row):
        # TRL's implicit prompt: chosen and rejected are whole conversations
        detected, convert = "messages", preference.implicit_converter(CONVERTERS["messages"])
        row = {**row, "messages": row["chosen"]}
    if detected is None:
        raise RowError("unknown_format", None, "no known format: expected messages, conversations, "
                       f"prompt/completion, instruction/output or text; got keys {sorted(row)}")
    try:
        kto = preference.unpaired_flag(row)  # (column, desirable) of a KTO row
        if detected != "alpaca" and MARKERS[detected] not in row:
            raise RowError("missing_field", MARKERS[detected], f"{detected} row has no "
                           f"{MARKERS[detected]!r}")
        messages = convert(row)
        pair = preference.convert_pair(row, convert, messages) if preference.has_pair(row) else None
        prompt_turns = preference.split_unpaired(messages, kto[0]) if kto else None
        tools = tools_of(row)
        problem = json_problem({"messages": messages, "tools": tools,  # JSON text in cells too
                                "rejected": pair and pair["rejected"]})
        if problem:
            raise RowError("parse_error", None, problem)
        _check(messages, tools, text=detected == TEXT)
        if pair is not None:  # the rejected conversation passes the same checks
            _check(messages[:pair["prompt_turns"]] + pair["rejected"], tools)
    except RowError as exc:
        exc.format = detected
        if v1:  # name chosen_messages/rejected_messages, the fields the row has
            exc.rename(v1_names)
        raise
    dropped = [k for m in messages if "_dropped" in m for k in m.pop("_dropped")]
    messages = [{k: v for k, v in m.items() if k != "_src"} for m in messages]
    rec = {"id": record_id(messages, tools), "messages": messages, "tools": tools,
           "label": _meta(row, label_field) if not kto or kto[0] != label_field else None,
           "group": _meta(row, group_field), "meta": meta}
    if dropped:  # popped by convert_rows into the counts; never written
        rec[DROPPED_KEYS] = dict(Counter(dropped))
    if detected == TEXT:  # a document for continued pretraining (format.mode: text)
        rec[LAYOUT] = TEXT
    if pair is not None:  # SFT keeps training on chosen (messages); the pair rides along
        rec[preference.PAIR_FIELD] = preference.strip_sources(pair)
    if kto:  # the flag judges the trailing answer; format keeps undesirable ones out of SFT
        rec[preference.KTO_FIELD] = {"prompt_turns": prompt_turns, "desirable": kto[1]}
    return detected, rec


DROPPED_KEYS = "_dropped_message_keys"  # message key -> how many messages of the row had it


def _utf8_safe(text: str) -> str:
    """``text`` as-is, or with lone surrogates (``"\\ud800"`` in a JSON file) shown as their
    escapes: they cannot be written as UTF-8, and the rejects file must still be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _raw_text(raw: RawRow) -> str:
    text = (raw.raw or "") if raw.data is None else json.dumps(raw.data, ensure_ascii=False, default=str)
    return _utf8_safe(text[:RAW_LIMIT])


def _bucket() -> dict[str, Any]:
    return {"rows_in": 0, "kept": 0, "rejected": Counter()}


class IngestCounts:
    """Running counts of an ingest, kept row by row so no record has to stay in memory:
    totals, rejects per reason, per-file and per-format buckets, roles, tools, labels,
    groups. :meth:`as_dict` is what ``counts.json`` / ``metrics/ingest.json`` hold;
    :meth:`add_counts` adds another run's dict (merging per-file parts gives exactly the
    counts of reading all files at once). The first reject of each (file, reason) is kept
    as an example for error messages, and the first :attr:`FIRST` rejects for the log."""

    FIRST = 5
    _SUMS = ("tool_calls", "with_tools", "with_label", "with_group", "with_meta", "empty_answers",
             "text_documents",
             "with_reasoning", "loss_weight_zero_turns",
             "with_preference", "kto_desirable", "kto_undesirable")

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.formats: dict[str, dict[str, Any]] = {}
        self.reasons: Counter[str] = Counter()
        self.roles: Counter[str] = Counter()
        self.sums: dict[str, int] = dict.fromkeys(self._SUMS, 0)
        self.kept = self.rejected_total = 0
        self.examples: dict[tuple[str, str], dict[str, Any]] = {}
        self.first: list[dict[str, Any]] = []
        self.dropped_keys: Counter[str] = Counter()  # message keys not kept, per key

    def file(self, source: str) -> dict[str, Any]:
        """The bucket of file ``source`` (created empty: a file without rows still counts)."""
        return self.files.setdefault(source, _bucket())

    def add(self, source: str, fmt: str, record: dict[str, Any] | None = None,
            reject: dict[str, Any] | None = None,
            dropped_keys: Mapping[str, int] | None = None) -> None:
        """Count one row of ``source`` (detected format ``fmt``): a record or a reject, and
        the message keys the record did not keep."""
        if dropped_keys:
            self.dropped_keys.update(dropped_keys)
        for b in (self.file(source), self.formats.setdefault(fmt, _bucket())):
            b["rows_in"] += 1
            if record is not None:
                b["kept"] += 1
            else:
                b["rejected"][reject["reason"]] += 1
        if record is None:
            self.rejected_total += 1
            self.reasons[reject["reason"]] += 1
            self.examples.setdefault((source, reject["reason"]), reject)
            if len(self.first) < self.FIRST:
                self.first.append(reject)
            return
        self.kept += 1
        msgs, last = record["messages"], record["messages"][-1]
        self.sums["with_label"] += record["label"] is not None
        self.sums["with_group"] += record["group"] is not None
        self.sums["with_meta"] += record.get("meta") is not None
        if record.get(LAYOUT) == TEXT:  # a document: no roles, tools or turns to count
            self.sums["text_documents"] += 1
            self.sums["empty_answers"] += not last["content"]
            return
        self.roles.update(m["role"] for m in msgs)
        self.sums["tool_calls"] += sum(len(m.get("tool_calls", [])) for m in msgs)
        self.sums["with_tools"] += record["tools"] is not None
        self.sums["empty_answers"] += not last["content"] and not last.get("tool_calls")
        if len(msgs) != sum(len(m) == 2 for m in msgs):  # some message has more than role/content
            self.sums["with_reasoning"] += any("reasoning_content" in m for m in msgs)
            self.sums["loss_weight_zero_turns"] += sum(m.get("loss_weight") == 0 for m in msgs)
        self.sums["with_preference"] += record.get(preference.PAIR_FIELD) is not None
        if kto := record.get(preference.KTO_FIELD):
            self.sums["kto_desirable" if kto["desirable"] else "kto_undesirable"] += 1

    def add_counts(self, counts: Mapping[str, Any]) -> None:
        """Add the :meth:`as_dict` of another run (one file's part). Extra keys of a file's
        bucket (e.g. a hub input's pinned revision) are carried over as they are."""
        for mine, theirs in ((self.files, counts["files"]), (self.formats, counts["formats"])):
            for key, b in theirs.items():
                acc = mine.setdefault(key, _bucket())
                acc["rows_in"] += b["rows_in"]
                acc["kept"] += b["kept"]
                acc["rejected"].update(b["rejected"])
                acc.update({k: v for k, v in b.items() if k not in ("rows_in", "kept", "rejected")})
        self.reasons.update({k: v for k, v in counts["rejected"].items() if v})
        self.roles.update(counts["messages_by_role"])
        self.dropped_keys.update(counts.get("dropped_message_keys", {}))
        for key in self._SUMS:
            self.sums[key] += counts.get(key, 0)  # a part written before the key existed
        self.kept += counts["kept"]
        self.rejected_total += counts["rejected_total"]

    def example(self, source: str, reason: str) -> dict[str, Any]:
        """The first reject of ``source`` for ``reason`` ({} when there is none)."""
        return self.examples.get((source, reason), {})

    def as_dict(self) -> dict[str, Any]:
        def plain(b: dict[str, Any]) -> dict[str, Any]:
            return {**b, "rejected": dict(sorted(b["rejected"].items()))}

        return {
            "rows_in": self.kept + self.rejected_total,
            "kept": self.kept,
            "rejected_total": self.rejected_total,
            "rejected": {k: self.reasons.get(k, 0) for k in REASONS},
            "files": {k: plain(v) for k, v in self.files.items()},
            "formats": {k: plain(v) for k, v in sorted(self.formats.items())},
            "messages_by_role": dict(sorted(self.roles.items())),
            "dropped_message_keys": dict(sorted(self.dropped_keys.items())),
            **self.sums,
        }


def _check_options(fmt: str, columns: Mapping[str, str] | None) -> None:
    if fmt != "auto" and fmt not in CONVERTERS:
        raise ValueError(f"ingest.format: {fmt!r} is not auto or one of {', '.join(FORMATS)}")
    unknown = sorted(set(columns or {}) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(f"ingest.columns: unknown canonical field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(CANONICAL_COLUMNS)}")


def convert_rows(rows: Iterable[RawRow], counts: IngestCounts, *, fmt: str = "auto",
                 columns: Mapping[str, str] | None = None, label_field: str | None = "label",
                 group_field: str | None = "group", keep_fields: Sequence[str] = (),
                 ) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Convert raw rows one at a time: yields ``(record, None)`` or ``(None, reject)`` per row,
    in input order, and counts each in ``counts`` (see module docstring)."""
    _check_options(fmt, columns)
    for raw in rows:
        record = reject = dropped = None
        try:
            if raw.data is None:
                raise RowError("parse_error", None, raw.error or "unparseable row")
            detected, rec = convert_row(raw.data, fmt=fmt, columns=columns,
                                        label_field=label_field, group_field=group_field,
                                        keep_fields=keep_fields)
        except RowError as exc:
            detected = exc.format or (
                "unparsed" if exc.reason == "parse_error" else "unknown")
            reject = {"source": raw.source, "line": raw.line, "field": exc.field,
                      "reason": exc.reason, "detail": _utf8_safe(exc.detail), "raw": _raw_text(raw)}
        else:
            dropped = rec.pop(DROPPED_KEYS, None)
            record = {"source": raw.where, **rec}
        counts.add(raw.source, detected, record, reject, dropped)
        yield record, reject


def ingest_rows(rows: Iterable[RawRow], *, fmt: str = "auto", columns: Mapping[str, str] | None = None,
                label_field: str | None = "label", group_field: str | None = "group",
                keep_fields: Sequence[str] = ()) -> IngestResult:
    """Convert raw rows into one in-memory result (every row one record or one reject)."""
    res, counts = IngestResult(), IngestCounts()
    for record, reject in convert_rows(rows, counts, fmt=fmt, columns=columns,
                                       label_field=label_field, group_field=group_field,
                                       keep_fields=keep_fields):
        if record is not None:
            res.records.append(record)
        else:
            res.rejects.append(reject)
    res.counts = counts.as_dict()
    return res
