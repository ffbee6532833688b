"""Input formats → canonical messages (docs/DESIGN.md), text exactly as written; a row that
cannot be converted raises :class:`RowError`. Formats (``ingest.format: auto`` detects per
row, first match wins, :func:`detect_format`):

* ``messages``  – OpenAI ``messages`` [{role, content, tool_calls?, reasoning_content?,
  loss_weight?}], optional ``tools``; LLaMA-Factory v1 writes ``content`` as typed parts
  (``text``, ``reasoning``, ``tool_call``: :func:`_content_parts`);
* ``sharegpt``  – ``conversations`` [{from, value}] with human/gpt/system/function_call/
  observation, optional ``system`` and ``tools``; DPO rows use ``chosen`` as the final answer;
* ``prompt_completion`` – ``prompt``/``completion`` as strings or lists of messages;
* ``alpaca``    – ``instruction``/``input``/``output``, optional ``system``, ``history``;
* ``text``      – ``{"text": ...}``, a document for continued pretraining (``format.mode:
  text``), detected last: a row with any chat field or a chosen/rejected pair is a
  conversation. It is stored as one assistant turn holding the document (``"layout":
  "text"`` on the record), so dedup's filters and the split read it as they read an answer;
  the format stage in text mode renders no template (:mod:`reprotune.data.text_packing`).

Per message, besides role and content: an assistant's ``reasoning_content`` (its thinking
trace, rendered by the Qwen3 template inside ``<think>``) is kept as written, and
``loss_weight`` (LLaMA-Factory v1: 0 or 1) is kept on assistant turns as ``loss_weight: 0``
when it is 0 (the format step then leaves that turn unlabelled). Any other message key
(``name``, ``tool_call_id``, ...) is not rendered by the template and is not kept: each
message lists it under ``_dropped`` and ingest counts it per key
(``dropped_message_keys``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from reprotune.data.jsonvalues import (
    MAX_DEPTH,
    decode,
    depth,
    dumps_exact,
    is_non_finite,
    json_type,
    number_text,
    too_deep,
)

logger = logging.getLogger(__name__)

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")  # detection order
TEXT = "text"  # the layout of plain documents (continued pretraining)
LAYOUT = "layout"  # the record field marking a text document (absent on conversations)
# A tool name is rendered inside JSON quotes by the template; anything but a plain
# identifier could close the quote and forge a second call (OpenAI allows [a-zA-Z0-9_-]{1,64}).
TOOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant", "tool": "tool", "function": "tool"}
REASONING = "reasoning_content"  # the key the Qwen3 template reads a thinking trace from
LOSS_WEIGHT = "loss_weight"


class RowError(ValueError):
    """A row cannot become a canonical record: ``reason`` is one of ``ingest.REASONS``."""

    def __init__(self, reason: str, fld: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, fld, detail
        self.format: str | None = None  # the detected format, once known

    def rename(self, name: Callable[[str], str]) -> None:
        """Rewrite the field names in ``field`` and ``detail`` (a stand-in read in place of
        the row's own field, e.g. ``messages`` for ``chosen``)."""
        self.field = name(self.field) if self.field else self.field
        self.detail = name(self.detail)
        self.args = (self.detail,)


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
        # a numeric answer is still text, exactly as the file wrote it (1.50, 1e5, -0)
        return number_text(value)
    raise RowError("wrong_type", fld, f"{fld} must be a string, got {json_type(value)}")


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
            value = decode(value)
        except json.JSONDecodeError as exc:
            raise RowError(reason, fld, f"{fld} is a string that is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, want):
        raise RowError(reason, fld, f"{fld} must be a {json_type(want())}, got {json_type(value)}")
    return value


# --------------------------------------------------------------------------- tools
def _tool_calls(value: Any, fld: str) -> list[dict[str, Any]]:
    """{"name","arguments"} / OpenAI {"type","function":{...}} (one or a list) → canonical."""
    if isinstance(value, str):
        try:
            value = decode(value)
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
                args = decode(args) if args.strip() else {}
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
        raise RowError("invalid_tools", fld, f"{fld} must be a JSON object, got {json_type(tool)}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        fn, wrapped = tool["function"], tool
    else:
        fn, wrapped = tool, {"type": "function", "function": tool}
    _tool_name(fn.get("name"), f"{fld}.name", "invalid_tools")
    return _finite(wrapped, fld)


def tools_of(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
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


PART_KEYS = frozenset(("type", "text", "value"))


def _content_parts(parts: list[Any], fld: str, role: str = "assistant"
                   ) -> tuple[str, str | None, list[dict[str, Any]] | None]:
    """Typed content parts → ``(text, reasoning, tool calls)``, each part's text as written.

    OpenAI names a text part's field ``text``; LLaMA-Factory's v1 format names it ``value`` and
    adds ``reasoning`` parts (the thinking trace, joined into ``reasoning_content``) and
    ``tool_call`` parts (one ``{"name", "arguments"}`` JSON each, into ``tool_calls``), both on
    assistant turns only. Text parts are joined with nothing between them, as LLaMA-Factory's
    Qwen3 rendering joins them (tool calls then follow the text, as the template puts them).
    Other part types (images, audio) are rejected, naming the part."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        pfld = f"{fld}[{i}]"
        if not isinstance(part, dict):
            raise RowError("wrong_type", pfld, f"{pfld} must be a content part object, "
                           f"got {json_type(part)}")
        kind = part.get("type", "text")
        if kind not in ("text", "reasoning", "tool_call"):
            raise RowError("wrong_type", f"{pfld}.type", f"{pfld}: content part type "
                           f"{kind!r} is not supported (only text, reasoning, tool_call)")
        if kind != "text" and role != "assistant":
            raise RowError("wrong_type", f"{pfld}.type", f"{pfld}: a {kind} part on a {role} "
                           f"turn (only assistant turns reason or call tools)")
        key = "text" if "text" in part else "value" if "value" in part else None
        if key is None:
            raise RowError("missing_field", f"{pfld}.text", f"{pfld} has neither 'text' nor 'value'")
        if kind == "tool_call":
            calls += _tool_calls(part[key], f"{pfld}.{key}")
        else:
            (texts if kind == "text" else reasoning).append(_text(part[key], f"{pfld}.{key}"))
    return "".join(texts), ("".join(reasoning) if reasoning else None), calls or None


def _typed_parts(value: Any) -> bool:
    """A tool turn's content that is a list of typed parts (LLaMA-Factory v1), not a JSON
    observation to keep as JSON text."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, dict) and "type" in p and p.keys() <= PART_KEYS for p in value)


def _loss_weight(turn: Mapping[str, Any], fld: str) -> int:
    """A message's ``loss_weight``: 0 or 1 (absent or null: 1); anything else refuses the row."""
    w = turn.get(LOSS_WEIGHT)
    if w is None:
        return 1
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        shown = number_text(w) if isinstance(w, (int, float)) and not isinstance(w, bool) \
            else json.dumps(w, ensure_ascii=False, default=str)
        raise RowError("invalid_loss_weight", f"{fld}.{LOSS_WEIGHT}",
                       f"{fld}.{LOSS_WEIGHT} is {shown}; it must be 0 (do not train on this "
                       f"turn) or 1 (train on it)")
    return int(w)


@lru_cache(maxsize=8)
def _known_keys(role_key: str, content_key: str) -> tuple[frozenset[str], frozenset[str]]:
    """The role and content keys of a format, and all the message keys it reads (the others
    are counted as dropped)."""
    return (frozenset((role_key, content_key)),
            frozenset((role_key, content_key, "tool_calls", REASONING, LOSS_WEIGHT)))


def _extras(turn: Mapping[str, Any], msg: dict[str, Any],
            keys: tuple[frozenset[str], frozenset[str]], fld: str) -> dict[str, Any]:
    """``msg`` with the turn's reasoning trace and loss weight, and ``_dropped``: the keys
    the template does not render (counted by ingest, never dropped silently)."""
    plain, known = keys
    if turn.keys() <= plain:  # role and content only (most rows): nothing to keep or count
        return msg
    weight = _loss_weight(turn, fld)
    dropped = [k for k in turn if k not in known]
    calls = turn.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():  # e.g. OpenAI's call "id"
        if isinstance(call, dict):
            fn = call.get("function")
            dropped += [f"tool_calls.{k}" for k in call if k not in ("type", "function", "name",
                                                                      "arguments")]
            dropped += [f"tool_calls.function.{k}" for k in (fn if isinstance(fn, dict) else ())
                        if k not in ("name", "arguments")]
    if msg["role"] == "assistant":
        reasoning = turn.get(REASONING)
        if reasoning is not None:
            text = _text(reasoning, f"{fld}.{REASONING}")
            if text:
                msg[REASONING] = text
        if weight == 0:
            msg[LOSS_WEIGHT] = 0
    elif turn.get(REASONING) is not None:
        dropped.append(REASONING)  # the template renders it on assistant turns only
    if dropped:
        msg["_dropped"] = dropped
    return msg


def _openai_turn(turn: Any, fld: str, *, role_key: str = "role", content_key: str = "content",
                 roles: Mapping[str, str] = OPENAI_ROLES) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RowError("wrong_type", fld, f"{fld} must be an object, got {json_type(turn)}")
    raw_role = turn.get(role_key)
    if raw_role is None:
        raise RowError("missing_field", f"{fld}.{role_key}", f"{fld} has no {role_key!r}")
    if not isinstance(raw_role, str) or raw_role.strip().lower() not in roles:
        raise RowError("unknown_role", f"{fld}.{role_key}",
                       f"{fld}: unknown role {raw_role!r}; expected one of {', '.join(roles)}")
    raw_role = raw_role.strip().lower()
    role, content, cfld = roles[raw_role], turn.get(content_key), f"{fld}.{content_key}"
    known = _known_keys(role_key, content_key)
    if raw_role == "function_call":  # sharegpt: the value is the call itself
        return _extras(turn, _msg("assistant", "", fld, _tool_calls(content, cfld)), known, fld)
    if content is None:
        if role != "assistant":  # OpenAI: an assistant turn with tool_calls has null content
            raise RowError("missing_field", cfld, f"{fld} has no {content_key!r}")
        content = ""
    elif isinstance(content, list) and (role != "tool" or _typed_parts(content)):
        content, reasoning, part_calls = _content_parts(content, cfld, role)
        if reasoning is not None or part_calls:
            turn = _with_parts(turn, reasoning, part_calls, fld)
    elif role == "tool" and isinstance(content, (dict, list)):
        if depth(content) > MAX_DEPTH:
            raise RowError("parse_error", cfld, f"{cfld} is {too_deep(depth(content))}")
        content = dumps_exact(_finite(content, cfld))  # JSON observations, numbers as written
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RowError("invalid_tool_call", f"{fld}.tool_calls", f"{fld}: tool_calls on a {role} message")
    return _extras(turn, _msg(role, _text(content, cfld), fld,
                              _tool_calls(calls, f"{fld}.tool_calls") if calls else None),
                   known, fld)


def _with_parts(turn: Mapping[str, Any], reasoning: str | None,
                calls: list[dict[str, Any]] | None, fld: str) -> dict[str, Any]:
    """The turn with its reasoning and tool_call parts moved to ``reasoning_content`` and
    ``tool_calls`` (a turn giving the same thing both ways is refused, not merged)."""
    turn = dict(turn)
    for key, value in ((REASONING, reasoning), ("tool_calls", calls)):
        if value is None:
            continue
        if turn.get(key) is not None:
            raise RowError("wrong_type", f"{fld}.{key}", f"{fld} has both {key!r} and "
                           f"{'reasoning' if key == REASONING else 'tool_call'} content parts; "
                           f"give one of them")
        turn[key] = value
    return turn


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
        decoded = decode(value)
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


def _from_text(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A document, exactly as written, as the one turn dedup and split read."""
    return [_msg("assistant", _text(row[TEXT], TEXT), TEXT)]


CONVERTERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages,
              "prompt_completion": _from_prompt_completion, TEXT: _from_text}
MARKERS = {"messages": "messages", "sharegpt": "conversations", "prompt_completion": "prompt",
            "alpaca": "instruction", TEXT: TEXT}


V1_PAIR = {"chosen_messages": "chosen", "rejected_messages": "rejected"}
_V1_SIDE = re.compile(r"\b(chosen|rejected)\b(?!_)")


def v1_pair(row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """LLaMA-Factory v1's preference rows (its ``pair`` converter's output):
    ``chosen_messages``/``rejected_messages``, each a whole v1 conversation (typed parts)
    whose common leading turns are the prompt. They are TRL's implicit-prompt layout under
    other names, so the row is read as ``chosen``/``rejected``; ``(row, True)`` when it was
    renamed (:func:`v1_names` then names the user's fields in errors)."""
    if not all(k in row for k in V1_PAIR) or any(v in row for v in V1_PAIR.values()):
        return row, False
    out = {k: v for k, v in row.items() if k not in V1_PAIR}
    return {**out, **{new: row[old] for old, new in V1_PAIR.items()}}, True


def v1_names(text: str) -> str:
    """``chosen``/``rejected`` in an error about a renamed v1 pair row, as the row names them."""
    return _V1_SIDE.sub(r"\1_messages", text)


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The first format whose marker field the row has (``output`` alone also means alpaca);
    ``text`` only for a row with none of the chat fields (nor a ``chosen``/``rejected``)."""
    for fmt in FORMATS[:-1]:
        if MARKERS[fmt] in row:
            return fmt
    if "output" in row:
        return "alpaca"
    return TEXT if TEXT in row and "chosen" not in row and "rejected" not in row else None
