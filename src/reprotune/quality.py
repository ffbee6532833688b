"""Quality filters for canonical conversation records, datatrove style: keep or give a reason.

Each filter is a function ``record -> None | reason``: ``None`` keeps the row, a string names
why it is dropped. :func:`make_filters` binds the thresholds of the ``dedup`` params section;
:func:`apply_filters` runs them in order and the first failing filter gives the reason.

What each filter looks at (the "answer" is what the model is trained to produce):

- ``empty_answer``: an assistant turn with blank content and no tool calls (or no assistant
  turn at all): training on it teaches the model to say nothing.
- ``too_short``: the final assistant answer (content plus tool-call JSON) has fewer than
  ``min_chars`` non-blank characters.
- ``too_long``: all message contents plus tool-call JSON exceed ``max_chars`` characters.
- ``repetitive``: more than ``max_repetition`` of the word 3-grams of the assistant text are
  repeats of an earlier 3-gram (char 3-grams for CJK / unspaced text, which has no words).
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


def empty_answer(record: dict[str, Any]) -> str | None:
    """Drop rows with an assistant turn that is blank and calls no tool, or no assistant turn."""
    answers = [m for m in _messages(record) if m.get("role") == "assistant"]
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


def repetitive(record: dict[str, Any], *, max_repetition: float) -> str | None:
    """Drop rows whose assistant text repeats more than ``max_repetition`` of its 3-grams."""
    text = "\n".join(m.get("content") or "" for m in _messages(record)
                     if m.get("role") == "assistant")
    return "repetitive" if repetition_share(text) > max_repetition else None


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
