"""Raw rows → canonical conversation records (docs/DESIGN.md) or rejected-row entries.

Formats (``ingest.format: auto`` detects per row, first match wins):

* ``messages``  – OpenAI ``messages`` [{role, content, tool_calls?}], optional ``tools``;
* ``sharegpt``  – ``conversations`` [{from, value}] with human/gpt/system/function_call/
  observation, optional ``system`` and ``tools``; DPO rows use ``chosen`` as the final answer;
* ``prompt_completion`` – ``prompt``/``completion`` as strings or lists of messages;
* ``alpaca``    – ``instruction``/``input``/``output``, optional ``system``, ``history``.

Every row ends as exactly one record or one reject, so ``rows_in = kept + rejected``.
Empty assistant answers are kept on purpose: the dedup stage's quality filter counts them.

Fidelity: text is stored exactly as the user wrote it (no Unicode normalisation, no
whitespace changes: ``，`` stays ``，``, ``5²`` stays ``5²``, aligned code keeps its spaces).
Only the keys used to *compare* rows are normalised, in dedup and the split leakage check.
Structure is made canonical: roles, OpenAI content parts joined, tool calls as
``{"type": "function", "function": {"name", "arguments"}}`` and tool schemas wrapped the
same way, as the Qwen3 template and LLaMA-Factory expect. Key order inside tool schemas and
arguments is kept.

Rows are rejected, never repaired, when their text contains the tokenizer's control or
markup strings (:mod:`reprotune.markup`), when a tool name is not a plain identifier, or when
a field holds JSON's ``NaN``/``Infinity``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reprotune import markup
from reprotune.data.readers import JSON_DECODER, RAW_LIMIT, RawRow, is_non_finite, json_problem

logger = logging.getLogger(__name__)

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")  # auto-detection order
CANONICAL_COLUMNS = ("instruction", "input", "output", "system", "history", "conversations",
                     "messages", "prompt", "completion", "chosen", "tools")
REASONS = ("parse_error", "unknown_format", "missing_field", "wrong_type", "non_finite_number",
           "unknown_role", "no_assistant_turn", "ends_on_non_assistant", "role_order",
           markup.REASON, "invalid_tool_call", "invalid_tools")
# A tool name is rendered inside JSON quotes by the template; anything but a plain
# identifier could close the quote and forge a second call (OpenAI allows [a-zA-Z0-9_-]{1,64}).
TOOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant", "tool": "tool", "function": "tool"}


class RowError(ValueError):
    """A row cannot become a canonical record: ``reason`` is one of REASONS."""

    def __init__(self, reason: str, fld: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, fld, detail
        self.format: str | None = None  # the detected format, once known


@dataclass
class IngestResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def example(self, source: str, reason: str) -> dict[str, Any]:
        """The first reject of ``source`` for ``reason`` ({} when there is none)."""
        return next((r for r in self.rejects if r["source"] == source and r["reason"] == reason), {})


# --------------------------------------------------------------------------- text
def record_id(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """sha1 of the canonical JSON of (messages, tools): equal conversations, equal ids."""
    blob = json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _text(value: Any, fld: str) -> str:
    """A string field as given; numbers become their text, NaN/Infinity are rejected."""
    if isinstance(value, str):
        return value
    if is_non_finite(value):
        raise RowError("non_finite_number", fld,
                       f"{fld} is {value}, a number that is not finite, not text")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric answer column (e.g. from Parquet) is still text
    raise RowError("wrong_type", fld, f"{fld} must be a string, got {type(value).__name__}")


def _finite(value: Any, fld: str) -> Any:
    """Reject NaN/Infinity anywhere inside a JSON value (tool arguments, tool schemas)."""
    if is_non_finite(value):
        raise RowError("non_finite_number", fld, f"{fld} holds {value}, which is not valid JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{fld}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{fld}[{i}]")
    return value


def _tool_name(name: Any, fld: str, reason: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RowError(reason, fld, f"{fld}: tool name {name!r} is not a plain identifier "
                       f"(letters, digits, '_', '.', '-'; at most 64 characters)")
    return name


def _json_field(value: Any, want: type, fld: str, reason: str = "wrong_type") -> Any:
    """Lists/objects may arrive JSON-encoded (CSV cells, glaive ``tools``): decode them."""
    if isinstance(value, str) and want is not str:
        try:
            value = JSON_DECODER.decode(value)
        except json.JSONDecodeError as exc:
            raise RowError(reason, fld, f"{fld} is a string that is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, want):
        raise RowError(reason, fld, f"{fld} must be a {want.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- tools
def _tool_calls(value: Any, fld: str) -> list[dict[str, Any]]:
    """{"name","arguments"} / OpenAI {"type","function":{...}} (one or a list) → canonical."""
    if isinstance(value, str):
        try:
            value = JSON_DECODER.decode(value)
        except json.JSONDecodeError as exc:
            raise RowError("invalid_tool_call", fld, f"{fld}: tool call is not valid JSON: {exc.msg}") from exc
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RowError("invalid_tool_call", fld, f"{fld}: empty tool call list")
    calls = []
    for item in items:
        fn = item.get("function", item) if isinstance(item, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name is None:
            raise RowError("invalid_tool_call", fld, f"{fld}: tool call needs a string 'name'")
        name = _tool_name(name, f"{fld}.name", "invalid_tool_call")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = JSON_DECODER.decode(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise RowError("invalid_tool_call", fld,
                               f"{fld}: arguments of {name!r} are not valid JSON: {exc.msg}") from exc
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RowError("invalid_tool_call", fld, f"{fld}: arguments of {name!r} must be an object")
        calls.append({"type": "function",
                      "function": {"name": name, "arguments": _finite(args, f"{fld}.arguments")}})
    return calls


def _tool_schema(tool: Any, fld: str) -> dict[str, Any]:
    """One tool as OpenAI's ``{"type": "function", "function": {...}}``, as the Qwen3
    template renders it; a bare function schema (glaive, LLaMA-Factory) is wrapped."""
    if not isinstance(tool, dict):
        raise RowError("invalid_tools", fld, f"{fld} must be a JSON object, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        fn, wrapped = tool["function"], tool
    else:
        fn, wrapped = tool, {"type": "function", "function": tool}
    _tool_name(fn.get("name"), f"{fld}.name", "invalid_tools")
    return _finite(wrapped, fld)


def _tools(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    value = row.get("tools")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json_field(value, list, "tools", "invalid_tools") if not isinstance(value, dict) else [value]
    return [_tool_schema(t, f"tools[{i}]") for i, t in enumerate(value)] or None


# --------------------------------------------------------------------------- formats
def _msg(role: str, content: str, src: str, tool_calls: list | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": role, "content": content, "_src": src}
    if tool_calls:
        m["tool_calls"] = tool_calls
    return m


def _content_parts(parts: list[Any], fld: str) -> str:
    """OpenAI typed content parts ``[{"type": "text", "text": ...}]`` joined; LLaMA-Factory's
    v1 format names the field ``value``. Other part types (images, audio) are rejected."""
    texts = []
    for i, part in enumerate(parts):
        pfld = f"{fld}[{i}]"
        if not isinstance(part, dict):
            raise RowError("wrong_type", pfld, f"{pfld} must be a content part object, "
                           f"got {type(part).__name__}")
        if part.get("type", "text") != "text":
            raise RowError("wrong_type", f"{pfld}.type", f"{pfld}: content part type "
                           f"{part.get('type')!r} is not supported (only text)")
        key = "text" if "text" in part else "value" if "value" in part else None
        if key is None:
            raise RowError("missing_field", f"{pfld}.text", f"{pfld} has neither 'text' nor 'value'")
        texts.append(_text(part[key], f"{pfld}.{key}"))
    return "".join(texts)


def _openai_turn(turn: Any, fld: str, *, role_key: str = "role", content_key: str = "content",
                 roles: Mapping[str, str] = OPENAI_ROLES) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RowError("wrong_type", fld, f"{fld} must be an object, got {type(turn).__name__}")
    raw_role = turn.get(role_key)
    if raw_role is None:
        raise RowError("missing_field", f"{fld}.{role_key}", f"{fld} has no {role_key!r}")
    if not isinstance(raw_role, str) or raw_role.strip().lower() not in roles:
        raise RowError("unknown_role", f"{fld}.{role_key}",
                       f"{fld}: unknown role {raw_role!r}; expected one of {', '.join(roles)}")
    raw_role = raw_role.strip().lower()
    role, content, cfld = roles[raw_role], turn.get(content_key), f"{fld}.{content_key}"
    if raw_role == "function_call":  # sharegpt: the value is the call itself
        return _msg("assistant", "", fld, _tool_calls(content, cfld))
    if content is None:
        if role != "assistant":  # OpenAI: an assistant turn with tool_calls has null content
            raise RowError("missing_field", cfld, f"{fld} has no {content_key!r}")
        content = ""
    elif isinstance(content, list) and role != "tool":
        content = _content_parts(content, cfld)
    elif role == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(_finite(content, cfld), ensure_ascii=False)  # JSON observations
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RowError("invalid_tool_call", f"{fld}.tool_calls", f"{fld}: tool_calls on a {role} message")
    return _msg(role, _text(content, cfld), fld,
                _tool_calls(calls, f"{fld}.tool_calls") if calls else None)


def _turns(value: Any, fld: str, **kw: Any) -> list[dict[str, Any]]:
    turns = _json_field(value, list, fld)
    return [_openai_turn(t, f"{fld}[{i}]", **kw) for i, t in enumerate(turns)]


def _system(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    text = _text(row["system"], "system") if "system" in row else ""
    return [_msg("system", text, "system")] if text.strip() else []


def _decoded(value: Any, role_key: str) -> Any:
    """A message or list of messages stored as JSON text (CSV cells); other text stays text."""
    if not (isinstance(value, str) and value.lstrip().startswith(("{", "["))):
        return value
    try:
        decoded = JSON_DECODER.decode(value)
    except json.JSONDecodeError:
        return value
    if isinstance(decoded, dict) and role_key in decoded:
        return decoded
    if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
        return decoded
    return value


def _chosen(row: Mapping[str, Any], **kw: Any) -> list[dict[str, Any]]:
    """DPO-style rows: the preferred answer becomes the final assistant turn."""
    value = _decoded(row["chosen"], kw.get("role_key", "role"))
    if isinstance(value, list):
        return _turns(value, "chosen", **kw)
    if isinstance(value, dict):
        return [_openai_turn(value, "chosen", **kw)]
    return [_msg("assistant", _text(value, "chosen"), "chosen")]


def _from_alpaca(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    if "instruction" not in row:
        raise RowError("missing_field", "instruction", "alpaca row has no 'instruction'")
    if "output" not in row and "chosen" not in row:
        raise RowError("missing_field", "output", "alpaca row has no 'output'")
    prompt = "\n".join(p for p in (_text(row["instruction"], "instruction"),
                                   _text(row.get("input", ""), "input")) if p.strip())
    msgs = _system(row)
    for i, pair in enumerate(_json_field(row.get("history", []), list, "history")):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowError("wrong_type", f"history[{i}]", f"history[{i}] must be a [query, answer] pair")
        msgs += [_msg("user", _text(pair[0], f"history[{i}][0]"), f"history[{i}][0]"),
                 _msg("assistant", _text(pair[1], f"history[{i}][1]"), f"history[{i}][1]")]
    msgs.append(_msg("user", prompt, "instruction"))
    if "output" in row:
        return msgs + [_msg("assistant", _text(row["output"], "output"), "output")]
    return msgs + _chosen(row)


def _from_sharegpt(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    kw = {"role_key": "from", "content_key": "value", "roles": SHAREGPT_ROLES}
    conv = _json_field(row["conversations"], list, "conversations")
    if conv and isinstance(conv[0], dict) and "from" not in conv[0] and "role" in conv[0]:
        kw = {"roles": {**SHAREGPT_ROLES, **OPENAI_ROLES}}  # sharegpt with role/content tags
    msgs = _system(row) + _turns(conv, "conversations", **kw)
    return msgs + (_chosen(row, **kw) if "chosen" in row else [])


def _from_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    return _system(row) + _turns(row["messages"], "messages")


def _side(row: Mapping[str, Any], key: str, role: str) -> list[dict[str, Any]]:
    value = _decoded(row[key], "role")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return _turns(value, key)
    return [_msg(role, _text(value, key), key)]


def _from_prompt_completion(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    if "completion" not in row and "chosen" not in row:
        raise RowError("missing_field", "completion", "prompt/completion row has no 'completion'")
    answer = _side(row, "completion" if "completion" in row else "chosen", "assistant")
    return _system(row) + _side(row, "prompt", "user") + answer


CONVERTERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages,
              "prompt_completion": _from_prompt_completion}
_MARKERS = {"messages": "messages", "sharegpt": "conversations", "prompt_completion": "prompt",
            "alpaca": "instruction"}


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The first format whose marker field the row has (``output`` alone also means alpaca)."""
    for fmt in FORMATS:
        if _MARKERS[fmt] in row:
            return fmt
    return "alpaca" if "output" in row else None


# --------------------------------------------------------------------------- validation
def _check(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Role order, final assistant turn and the special-token injection guard."""
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
    row = _remap(row, columns or {})
    detected = detect_format(row) if fmt == "auto" else fmt
    if detected is None:
        raise RowError("unknown_format", None, "no known format: expected messages, conversations, "
                       f"prompt/completion or instruction/output; got keys {sorted(row)}")
    try:
        if detected != "alpaca" and _MARKERS[detected] not in row:
            raise RowError("missing_field", _MARKERS[detected], f"{detected} row has no "
                           f"{_MARKERS[detected]!r}")
        messages = CONVERTERS[detected](row)
        tools = _tools(row)
        problem = json_problem({"messages": messages, "tools": tools})  # JSON text in cells too
        if problem:
            raise RowError("parse_error", None, problem)
        _check(messages, tools)
    except RowError as exc:
        exc.format = detected
        raise
    messages = [{k: v for k, v in m.items() if k != "_src"} for m in messages]
    return detected, {"id": record_id(messages, tools), "messages": messages, "tools": tools,
                      "label": _meta(row, label_field), "group": _meta(row, group_field),
                      "meta": meta}


def _raw_text(raw: RawRow) -> str:
    if raw.data is None:
        return (raw.raw or "")[:RAW_LIMIT]
    return json.dumps(raw.data, ensure_ascii=False, default=str)[:RAW_LIMIT]


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
    _SUMS = ("tool_calls", "with_tools", "with_label", "with_group", "with_meta", "empty_answers")

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.formats: dict[str, dict[str, Any]] = {}
        self.reasons: Counter[str] = Counter()
        self.roles: Counter[str] = Counter()
        self.sums: dict[str, int] = dict.fromkeys(self._SUMS, 0)
        self.kept = self.rejected_total = 0
        self.examples: dict[tuple[str, str], dict[str, Any]] = {}
        self.first: list[dict[str, Any]] = []

    def file(self, source: str) -> dict[str, Any]:
        """The bucket of file ``source`` (created empty: a file without rows still counts)."""
        return self.files.setdefault(source, _bucket())

    def add(self, source: str, fmt: str, record: dict[str, Any] | None = None,
            reject: dict[str, Any] | None = None) -> None:
        """Count one row of ``source`` (detected format ``fmt``): a record or a reject."""
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
        self.roles.update(m["role"] for m in msgs)
        self.sums["tool_calls"] += sum(len(m.get("tool_calls", [])) for m in msgs)
        self.sums["with_tools"] += record["tools"] is not None
        self.sums["with_label"] += record["label"] is not None
        self.sums["with_group"] += record["group"] is not None
        self.sums["with_meta"] += record.get("meta") is not None
        self.sums["empty_answers"] += not last["content"] and not last.get("tool_calls")

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
        for key in self._SUMS:
            self.sums[key] += counts[key]
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
        record = reject = None
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
                      "reason": exc.reason, "detail": exc.detail, "raw": _raw_text(raw)}
        else:
            record = {"source": raw.where, **rec}
        counts.add(raw.source, detected, record, reject)
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
