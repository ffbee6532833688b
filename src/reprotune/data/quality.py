"""Quality filters for canonical conversation records, datatrove style: keep or give a reason.

Each filter is a function ``record -> None | reason``: ``None`` keeps the row, a string names
why it is dropped. :func:`make_filters` binds the thresholds of the ``dedup`` params section;
:func:`apply_filters` runs them in order and the first failing filter gives the reason.

What each filter looks at (the "answer" is what the model is trained to produce):

- ``empty_answer``: an assistant turn with blank content and no tool calls (or no assistant
  turn at all): training on it teaches the model to say nothing; in a preference pair, the
  rejected answer's turns too.
- ``too_short``: the final assistant answer (content plus tool-call JSON) has fewer than
  ``min_chars`` non-blank characters.
- ``too_long``: all message contents plus tool-call JSON exceed ``max_chars`` characters.
- ``repetitive``: in some assistant turn, more than ``max_repetition`` of the word 3-grams of
  its *prose* repeat an earlier 3-gram (char 3-grams for CJK / unspaced text, which has no
  words), or more than ``max_repetition`` of its structured lines repeat an earlier line
  verbatim. Code and lists repeat by nature (``} else {``, ``$green-100: ...``, ``1. ChatGPT
  can ...``), so :func:`split_prose` takes fenced code blocks, code-like lines, list items,
  table/tab lines and enumerations out of the n-gram measure; they are only checked for
  lines looping verbatim.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

REASONS = ("empty_answer", "too_short", "too_long", "repetitive")
Filter = Callable[[dict[str, Any]], "str | None"]

# Han, Hiragana/Katakana, Hangul syllables, CJK punctuation and full-width forms.
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_UNSPACED_SHARE = 0.2  # CJK share of non-space characters from which char 3-grams are used
_MIN_GRAMS = 20  # less prose than this says nothing about looping
_MIN_LOOP_LINES = 5  # occurrences of one structured line needed to call it a loop
_FENCE = re.compile(r"^\s*(```|~~~)")
# list items: "- x", "* x", "+ x", "1. x", "1) x", "(1) x", "a) x", "一、x", "（一）x", "1、x", "①"
_LIST_ITEM = re.compile(r"^\s*(\\?[-*+•·]\s|\(?\d{1,3}[.)、．）:：]|[（(][\d一二三四五六七八九十]+[)）]|"
                        r"[a-zA-Z][.)]\s|[一二三四五六七八九十]+、|[\u2460-\u2473])")
# code-like lines: block punctuation at the end, indentation of 4+, keywords, assignments
_CODE_LINE = re.compile(r"([{};:\[(,]\s*$|^\s*[}\])]|^(\t| {4})|^\s*(if|else|elif|for|while|def|class|"
                        r"return|import|from|public|private|static|var|let|const|function|print|"
                        r"#include|SELECT|INSERT|UPDATE)\b|^\s*[$@]?[\w.\[\]]+\s*[:+\-*/]?=)")
_TABLE_LINE = re.compile(r"^\s*\S*\|.*\|\s*$|^\s*[\w#]?\|[-=\d|\s]+$")
# "label: value" lines (schedules, input/output pairs, outlines): short label, then a colon
_LABEL_LINE = re.compile(r"^\s*(?=[^:：\n]{1,20}[:：])(\S+\s){0,2}\S+?[:：]")
_DIGITS = re.compile(r"\d+")
_URL = re.compile(r"https?://\S+|www\.\S+")
_SPACE = re.compile(r"\s")
_NOT_ALNUM = re.compile(r"[\W_]")


class QualityConfig(Protocol):
    min_chars: int
    max_chars: int
    max_repetition: float


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = record["messages"]
    return json.loads(msgs) if isinstance(msgs, str) else msgs


def _calls_json(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls")
    return json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else ""


def _rejected_answer(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rejected answer's turns of a preference pair ([] without a pair)."""
    pair = record.get("preference")
    pair = json.loads(pair) if isinstance(pair, str) else pair
    return list(pair.get("rejected") or []) if isinstance(pair, dict) else []


def empty_answer(record: dict[str, Any]) -> str | None:
    """Drop rows with an assistant turn that is blank and calls no tool, or no assistant turn;
    for a preference pair, in the chosen answer or in the rejected one (a pair against an
    empty answer teaches only "say something")."""
    answers = [m for m in _messages(record) + _rejected_answer(record)
               if m.get("role") == "assistant"]
    if not answers or any(not (m.get("content") or "").strip() and not m.get("tool_calls")
                          for m in answers):
        return "empty_answer"
    return None


def too_short(record: dict[str, Any], *, min_chars: int) -> str | None:
    """Drop rows whose final assistant answer has fewer than ``min_chars`` characters."""
    answers = [m for m in _messages(record) if m.get("role") == "assistant"]
    last = answers[-1] if answers else {}
    n = len((last.get("content") or "").strip()) + len(_calls_json(last))
    return "too_short" if n < min_chars else None


def too_long(record: dict[str, Any], *, max_chars: int) -> str | None:
    """Drop rows whose message contents plus tool-call JSON exceed ``max_chars`` characters."""
    n = sum(len(m.get("content") or "") + len(_calls_json(m)) for m in _messages(record))
    return "too_long" if n > max_chars else None


def repetition_share(text: str) -> float:
    """Share of 3-gram occurrences that repeat an earlier one (0 = none, ->1 = one phrase looped).

    Word 3-grams (case-folded) for spaced text; character 3-grams of the non-space characters
    when CJK characters make up at least a fifth of them or the text has a single "word".
    """
    chars = "".join(text.split())
    if not chars:
        return 0.0
    words = text.casefold().split()
    if len(words) < 2 or len(_CJK.findall(chars)) >= _UNSPACED_SHARE * len(chars):
        grams: list[Any] = [chars[i:i + 3] for i in range(len(chars) - 2)]
    else:
        grams = list(zip(words, words[1:], words[2:], strict=False))  # shorter tails
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def split_prose(text: str) -> tuple[str, list[str]]:
    """``(prose, structured lines)`` of a text: fenced code blocks, code-like lines, list
    items, table/tab and ``label: value`` lines, art and enumerations are structured."""
    prose: list[str] = []
    structured: list[str] = []
    lines = text.split("\n")
    in_fence = False
    template_run = _template_runs(lines)
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence or template_run[i] or _LIST_ITEM.match(line) or _CODE_LINE.search(line) \
                or _TABLE_LINE.match(line) or _LABEL_LINE.match(line) or _is_art(line):
            structured.append(line)
        else:
            prose.append(_URL.sub(" ", line))  # repeated citations are not looping prose
    return "\n".join(prose), structured


def _is_art(line: str) -> bool:
    """Separators, ASCII art, box drawing: mostly neither letters nor digits.

    Counted with regexes, whose Unicode ``\\s`` and ``[\\W_]`` are exactly ``str.isspace``
    and ``not str.isalnum`` per character (a Python loop per character was a hot spot).
    """
    visible = len(line) - len(_SPACE.findall(line))  # characters that are not whitespace
    alnum = len(line) - len(_NOT_ALNUM.findall(line))
    return visible > 0 and alnum * 2 < visible


def _shape(line: str) -> str:
    return _DIGITS.sub("#", line.strip())


def _template_runs(lines: Sequence[str]) -> list[bool]:
    """Lines inside a run of 3+ consecutive lines that are enumerations: each starts with a
    digit, or all share their first 3 characters, or all have the same shape once digits are
    masked ("第一个骰子 1 点，第二个骰子 6 点" ...)."""
    def same(a: str, b: str) -> bool:
        a, b = a.strip(), b.strip()
        if not a or not b:
            return False
        return (a[0].isdigit() and b[0].isdigit()) or a[:3] == b[:3] or _shape(a) == _shape(b)

    out = [False] * len(lines)
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and same(lines[j - 1], lines[j]):
            j += 1
        if j - i >= 3:
            out[i:j] = [True] * (j - i)
        i = j
    return out


def looped_line_share(lines: Sequence[str]) -> float:
    """Share of the non-blank lines taken by the most frequent one, when it occurs at least
    :data:`_MIN_LOOP_LINES` times (a model stuck on one line); else 0. Schedules and code
    repeat many different lines a few times each, which is not a loop."""
    body = [ln.strip() for ln in lines if ln.strip() and not _is_art(ln)]  # not separators
    if not body:
        return 0.0
    top = Counter(body).most_common(1)[0][1]
    return top / len(body) if top >= _MIN_LOOP_LINES else 0.0


def turn_repetition(text: str) -> float:
    """The repetition of one answer: its prose's 3-gram repetition, or the verbatim looping
    of its structured lines, whichever is higher (see the module docstring)."""
    prose, structured = split_prose(text)
    chars = "".join(prose.split())
    prose_share = repetition_share(prose) if len(chars) >= _MIN_GRAMS + 2 else 0.0
    return max(prose_share, looped_line_share(structured))


def repetitive(record: dict[str, Any], *, max_repetition: float) -> str | None:
    """Drop rows with an assistant turn repeating more than ``max_repetition`` of itself."""
    for m in _messages(record):
        if m.get("role") == "assistant" and turn_repetition(m.get("content") or "") > max_repetition:
            return "repetitive"
    return None


def make_filters(cfg: QualityConfig) -> list[tuple[str, Filter]]:
    """The filters in the order they are applied, thresholds bound from ``cfg``."""
    return [
        ("empty_answer", empty_answer),
        ("too_short", functools.partial(too_short, min_chars=cfg.min_chars)),
        ("too_long", functools.partial(too_long, max_chars=cfg.max_chars)),
        ("repetitive", functools.partial(repetitive, max_repetition=cfg.max_repetition)),
    ]


def first_failure(record: dict[str, Any], filters: Sequence[tuple[str, Filter]]) -> str | None:
    """The reason of the first filter that rejects ``record``, or None to keep it."""
    for _, check in filters:
        reason = check(record)
        if reason is not None:
            return reason
    return None


def apply_filters(records: Iterable[dict[str, Any]], cfg: QualityConfig
                  ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Split records into kept ones and (record, reason) pairs, preserving input order."""
    filters = make_filters(cfg)
    kept, dropped = [], []
    for record in records:
        reason = first_failure(record, filters)
        if reason is None:
            kept.append(record)
        else:
            dropped.append((record, reason))
    logger.info("quality filters: kept %d, dropped %s", len(kept), reason_counts(dropped))
    return kept, dropped


def reason_counts(dropped: Iterable[tuple[dict[str, Any], str]]) -> dict[str, int]:
    """Rows dropped per reason, every reason present (zeros included)."""
    counts = Counter(reason for _, reason in dropped)
    return {r: counts.get(r, 0) for r in REASONS}
