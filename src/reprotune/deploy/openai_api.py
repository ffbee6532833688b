"""The OpenAI chat-completions wire format the server speaks: request validation and response
bodies, as pure functions (no model, no HTTP).

Only what the server really does is accepted: greedy decoding (``temperature`` absent or 0,
``top_p`` absent or 1), one choice (``n`` absent or 1), text messages with the roles the
training template knows. Anything else is an :class:`ApiError` with a 4xx status and the
field it is about, so a client learns exactly what to change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
# keys the OpenAI client may send that do not change a greedy single-choice answer
IGNORED_KEYS = ("user", "metadata", "store", "service_tier", "seed", "stream_options",
                "frequency_penalty", "presence_penalty")
# keys accepted only at their neutral value: {key: (neutral values, what the server does)}
NEUTRAL = {"temperature": ((0, 0.0), "decoding is greedy: send temperature 0 or leave it out"),
           "top_p": ((1, 1.0), "decoding is greedy: send top_p 1 or leave it out"),
           "n": ((1,), "one choice per request: send n 1 or leave it out"),
           "logprobs": ((False,), "logprobs are not returned: leave logprobs out"),
           "tools": (([],), "tool calls are not served: leave tools out"),
           "tool_choice": (("none",), "tool calls are not served: leave tool_choice out"),
           "stop": (([],), "custom stop sequences are not supported: leave stop out")}
KNOWN_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "stream",
              *IGNORED_KEYS, *NEUTRAL}


# line breaks str.splitlines() knows, escaped in error messages so each stays one line
_BREAKS = {c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
MAX_BODY_DEPTH = 32  # nesting a request body may have (a chat request needs 5 levels)


def _safe(text: str) -> str:
    """``text`` with any unpaired surrogate written as its escape, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body whose
    message is one line (line breaks a client sent are shown escaped)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str = "invalid_request_error") -> None:
        message = _safe(message).translate(str.maketrans(_BREAKS))
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param = None if param is None else _safe(param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.code, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """One validated chat-completions request."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    stream: bool
    include_usage: bool


def _check_values(body: Any) -> None:
    """Nesting at most :data:`MAX_BODY_DEPTH` and every string real text: JSON lets a client
    send an unpaired surrogate escape (``"\\ud800"``), which no tokenizer (nor UTF-8) can
    encode. Walked without recursion, so no body can exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, where, level = stack.pop()
        if level > MAX_BODY_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_BODY_DEPTH} levels deep "
                                f"(at {where.lstrip('.')}); a chat request needs about 5")
        items = value.items() if isinstance(value, dict) else enumerate(value) \
            if isinstance(value, list) else ()
        for key, item in items:
            at = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise ApiError(400, f"{at.lstrip('.')} holds an unpaired UTF-16 "
                                            f"surrogate escape ({text[exc.start]!a}), which is "
                                            f"no character; send the character itself or a "
                                            f"valid surrogate pair",
                                       param=at.lstrip(".")) from None
            if isinstance(item, (dict, list)):
                stack.append((item, at, level + 1))


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; malformed JSON, a non-object, nesting deeper than
    :data:`MAX_BODY_DEPTH` or a string that is no text (a lone surrogate) is a 400."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:  # the decoder recursing through thousands of [ or {
        raise ApiError(400, f"request body is nested too deeply to parse (more than "
                            f"{MAX_BODY_DEPTH} levels are refused)") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    _check_values(body)
    return body


def _int_field(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{key} must be a positive integer, got {value!r}", param=key)
    return value


def validate_chat(body: dict[str, Any], *, model_ids: Sequence[str], default_max_tokens: int,
                  max_tokens_limit: int) -> ChatRequest:
    """Check a chat-completions body against what this server serves (``model_ids``: the
    names the ``model`` field may take); raise :class:`ApiError`."""
    unknown = sorted(set(body) - KNOWN_KEYS)
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or model not in model_ids:
        served = (f"the model is {model_ids[0]!r}" if len(model_ids) == 1 else
                  f"the models are {', '.join(repr(m) for m in model_ids)}")
        raise ApiError(404, f"model {model!r} is not served here; {served} (GET /v1/models)",
                       param="model", code="model_not_found")
    for key, (neutral, why) in NEUTRAL.items():
        if key in body and body[key] is not None and body[key] not in neutral:
            raise ApiError(400, f"{key}={body[key]!r} is not supported: {why}", param=key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string",
                           param=f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})  # the user's text, unchanged
    if clean[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's: the server "
                            "answers after it", param="messages")
    max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
    max_tokens = max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows "
                            f"({max_tokens_limit})", param="max_tokens")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    return ChatRequest(model, clean, max_tokens, stream,
                       bool(isinstance(options, dict) and options.get("include_usage")))


def completion_body(request_id: str, model_id: str, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` response."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_body(request_id: str, model_id: str, *, delta: dict[str, str] | None = None,
               finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a stream (the usage chunk has no choices)."""
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model_id}
    body["choices"] = [] if usage is not None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
    if usage is not None:
        body["usage"] = usage
    return body


def sse(body: dict[str, Any] | str) -> str:
    """A server-sent event line carrying ``body`` (``[DONE]`` ends the stream)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"
