"""Control and markup strings that user text must not contain, and the check for them.

A chat template turns a conversation into one string, and the tokenizer turns strings such
as ``<|im_start|>``, ``<think>`` or ``<tool_call>`` into single added-token ids. The same
characters inside user content would therefore forge structure: a fake turn, a think block
that the Qwen3 template strips from earlier answers (``...</think>answer`` is trained as only
``answer``), or a second tool call smuggled in through a tool name. Such rows are rejected
with reason ``special_token``, never rewritten.

The forbidden strings are derived, not hard-coded:

* :func:`forbidden_strings` — from a tokenizer: every special token, every added token that
  looks like markup (``<...>``/``[...]``; some tokenizers add plain whitespace runs, which
  are harmless), and the tag-like literals of its chat template (``<tools>``, ``<think>``…).
  The format stage uses this with the real base tokenizer.
* :func:`default_forbidden` — the same for Qwen3 (its 26 added tokens, shipped as package
  data and also reserved by the embedded tiny tokenizer, plus the embedded template's
  markers). The ingest stage uses it, before any base model exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

REASON = "special_token"
ADDED_TOKENS_FILE = "qwen3_added_tokens.json"
# Tag-like literals in a template: <|im_start|>, <think>, </tool_call>, <start_of_turn> ...
_TAG = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?[A-Za-z_][A-Za-z0-9_-]{0,63}>")
_MARKUP = re.compile(r"^(<.*>|\[.*\])$", re.S)


@lru_cache(maxsize=1)
def qwen3_added_tokens() -> tuple[tuple[str, bool], ...]:
    """Qwen3's added tokens as ``(content, special)``, in id order (151643 ... 151668)."""
    ref = resources.files("reprotune").joinpath("templates", ADDED_TOKENS_FILE)
    return tuple((t["content"], bool(t["special"])) for t in json.loads(ref.read_text("utf-8")))


def template_markers(template: str) -> set[str]:
    """Tag-like strings a chat template writes or parses (``<|im_end|>``, ``</think>``...)."""
    return set(_TAG.findall(template or ""))


def _ordered(strings: Iterable[str]) -> tuple[str, ...]:
    # longest first, so the reported token is the most specific one that matched
    return tuple(sorted({s for s in strings if s}, key=lambda s: (-len(s), s)))


def forbidden_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings that must not occur in user text for ``tokenizer`` and its chat template."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    markup = {t for t in added if t in special or _MARKUP.match(t)}
    return _ordered(special | markup | template_markers(tokenizer.chat_template or ""))


@lru_cache(maxsize=1)
def default_forbidden() -> tuple[str, ...]:
    """:func:`forbidden_strings` for Qwen3 with the embedded template, without a tokenizer."""
    from reprotune.chat_template import qwen3_template

    return _ordered([t for t, _ in qwen3_added_tokens()] + list(template_markers(qwen3_template())))


def tool_call_text(call: dict[str, Any]) -> str:
    """What a template writes for one tool call: its name and its arguments as JSON."""
    fn = call.get("function", call) if isinstance(call, dict) else {}
    args = fn.get("arguments")
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f"{fn.get('name')}\n{args}"


def conversation_fields(messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None,
                        ) -> Iterator[tuple[str, str]]:
    """``(field, text)`` of every user-supplied string that a template renders."""
    for i, m in enumerate(messages):
        yield f"messages[{i}].content", m.get("content") or ""
        if m.get("reasoning_content"):
            yield f"messages[{i}].reasoning_content", m["reasoning_content"]
        for j, call in enumerate(m.get("tool_calls") or []):
            yield f"messages[{i}].tool_calls[{j}]", tool_call_text(call)
    for k, tool in enumerate(tools or []):
        yield f"tools[{k}]", json.dumps(tool, ensure_ascii=False)


@lru_cache(maxsize=8)
def forbidden_pattern(forbidden: tuple[str, ...]) -> re.Pattern[str]:
    # one alternation, longest first: one pass over each text instead of one per token
    return re.compile("|".join(map(re.escape, forbidden)))


def find_forbidden(messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None,
                   forbidden: Sequence[str]) -> tuple[str, str] | None:
    """The first ``(field, string)`` where a forbidden string occurs, or None if clean."""
    if not forbidden:
        return None
    pattern = forbidden_pattern(tuple(forbidden))
    for fld, text in conversation_fields(messages, tools):
        hit = pattern.search(text)
        if hit:
            return fld, hit.group(0)
    return None
