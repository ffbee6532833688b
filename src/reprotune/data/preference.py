"""Preference pairs at ingest: a row with ``chosen`` and ``rejected`` → one canonical record.

The record's ``messages`` are the shared prompt turns followed by the *chosen* answer, so
every SFT stage trains on ``chosen`` exactly as before. The pair lives beside them::

    "preference": {"prompt_turns": k, "rejected": [<the rejected answer's turns>]}

``messages[:k]`` is the prompt both answers share, ``messages[k:]`` the chosen answer and
``preference.rejected`` the rejected one, each turn canonical (role, content, tool calls)
and its text byte for byte as written.

Accepted layouts (the converters of :mod:`reprotune.data.formats` read ``chosen``; the
rejected side is converted the same way, with ``rejected`` in its place):

* sharegpt ``conversations`` + ``chosen``/``rejected`` as ``{from, value}`` objects or strings
  (LLaMA-Factory's ranking format), alpaca ``instruction`` + ``chosen``/``rejected``;
* TRL's ``prompt``/``chosen``/``rejected``, plain strings or message lists (conversational);
* TRL's implicit prompt: only ``chosen``/``rejected``, each a whole OpenAI message list
  whose common leading turns are the prompt.
* LLaMA-Factory v1's ``chosen_messages``/``rejected_messages`` (typed content parts): the
  implicit-prompt layout under other names (:func:`reprotune.data.formats.v1_pair`); errors
  name the row's own fields.

A pair is rejected (never repaired) when its two answers are identical (``identical_pair``)
or when the two sides do not share their prompt (``prompt_mismatch``: they differ before
the first answer turn, or an answer holds a user turn).

Unpaired KTO rows (:func:`unpaired_flag`: a true/false ``label`` or LLaMA-Factory's
``kto_tag`` marking one answer as desirable or not) become records whose ``messages`` are
the prompt and the judged answer, with ``"kto": {"prompt_turns": k, "desirable": bool}``.
An undesirable answer is never an SFT target: format drops it from the SFT splits
(``kto_undesirable``) and writes it, with the desirable ones, to the unpaired files align's
KTO trains on; only ``align.method: kto`` accepts such data (:func:`check_pairs`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reprotune.data.formats import RowError

log = logging.getLogger(__name__)

PAIR_FIELD = "preference"
REASONS = ("identical_pair", "prompt_mismatch", "invalid_kto_row")
# roles an answer may hold: the assistant's turns, its tool calls and their results
_ANSWER_ROLES = ("assistant", "tool")


KTO_FIELD = "kto"  # an unpaired (KTO) record: {"prompt_turns": k, "desirable": bool}
_FLAGS = {"true": True, "false": False}


def _flag(value: Any, col: str) -> bool:
    """A desirable/undesirable flag: a boolean or the text true/false (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _FLAGS:
        return _FLAGS[value.strip().lower()]
    raise RowError("invalid_kto_row", col, f"{col} {json.dumps(value, default=str)}: a KTO "
                   f"flag must be true (desirable answer) or false (undesirable)")


def unpaired_flag(row: Mapping[str, Any]) -> tuple[str, bool] | None:
    """``(column, desirable)`` of an unpaired KTO row, None for any other row: LLaMA-Factory's
    ``kto_tag``, a boolean ``label`` (TRL's prompt/completion/label, LLaMA-Factory's
    messages + label) or a "true"/"false" text label beside a ``completion``. Any other
    label (a class name) stays an ordinary label."""
    if has_pair(row):
        return None
    if "kto_tag" in row:
        return "kto_tag", _flag(row["kto_tag"], "kto_tag")
    label = row.get("label")
    if isinstance(label, bool) or (isinstance(label, str) and "completion" in row
                                   and label.strip().lower() in _FLAGS):
        return "label", _flag(label, "label")
    return None


def split_unpaired(messages: list[dict[str, Any]], col: str) -> int:
    """The prompt turns of an unpaired row's conversation: its trailing answer turns (the
    last assistant turn, with its tool calls and results) are the completion."""
    k = len(messages)
    while k and messages[k - 1]["role"] in _ANSWER_ROLES:
        k -= 1
    if k == len(messages):
        raise RowError("invalid_kto_row", col, f"a KTO row ({col}) must end with the assistant "
                       f"answer its flag judges; the last turn is a {messages[-1]['role']} turn"
                       if messages else f"a KTO row ({col}) has no turns")
    if not k:
        raise RowError("invalid_kto_row", col, f"a KTO row ({col}) needs a prompt before its answer")
    return k


def unpaired_sides(record: Mapping[str, Any]) -> tuple[list[dict], list[dict], bool] | None:
    """``(prompt, completion, desirable)`` of a canonical unpaired record, None otherwise."""
    kto = record.get(KTO_FIELD)
    if not kto:
        return None
    k = kto["prompt_turns"]
    return record["messages"][:k], record["messages"][k:], bool(kto["desirable"])


def has_pair(row: Mapping[str, Any]) -> bool:
    """Whether a raw row carries a preference pair (both ``chosen`` and ``rejected``)."""
    return row.get("chosen") is not None and row.get("rejected") is not None


def implicit_prompt(row: Mapping[str, Any]) -> bool:
    """TRL's implicit-prompt layout: ``chosen``/``rejected`` only, each a whole conversation."""
    markers = ("messages", "conversations", "prompt", "instruction", "output", "completion")
    return has_pair(row) and not any(k in row for k in markers)


def implicit_converter(messages: Callable[[Mapping[str, Any]], list]
                       ) -> Callable[[Mapping[str, Any]], list]:
    """A converter reading a whole OpenAI conversation from ``chosen`` with the ``messages``
    converter ``messages`` (errors name ``chosen[i]``)."""
    def convert(row: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            turns = messages({**row, "messages": row["chosen"]})
        except RowError as exc:
            exc.rename(lambda s: s.replace("messages", "chosen", 1))
            raise
        for m in turns:
            m["_src"] = m["_src"].replace("messages", "chosen", 1)
        return turns
    return convert


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two canonical turns are equal, wherever in the row they came from."""
    return {k: v for k, v in a.items() if k != "_src"} == {k: v for k, v in b.items() if k != "_src"}


def _prefix(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    n = 0
    while n < min(len(a), len(b)) and _same(a[n], b[n]):
        n += 1
    return n


def split_pair(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
               ) -> tuple[int, list[dict[str, Any]]]:
    """``(prompt_turns, rejected answer turns)`` of two converted conversations (canonical
    messages, ``_src`` kept) that should differ only in their answers; raises RowError."""
    k = _prefix(chosen, rejected)
    if k == len(chosen) and k == len(rejected):
        raise RowError("identical_pair", "rejected", "rejected is identical to chosen: a pair "
                       "needs two different answers")
    # the shared prompt ends before the first turn of either answer
    while k and chosen[k - 1]["role"] in _ANSWER_ROLES:
        k -= 1
    answers = (chosen[k:], rejected[k:])
    for side, turns in zip(("chosen", "rejected"), answers, strict=True):
        if not turns:
            raise RowError("prompt_mismatch", side, f"{side} has no answer after the shared "
                           f"prompt (the two sides differ only in their prompt)")
        bad = next((t for t in turns if t["role"] not in _ANSWER_ROLES), None)
        if bad is not None:
            raise RowError("prompt_mismatch", bad["_src"], f"{bad['_src']}: a {bad['role']} "
                           f"turn in the {side} answer: chosen and rejected must share their "
                           f"prompt and differ only in the assistant's answer")
    if not k:
        raise RowError("prompt_mismatch", "rejected", "chosen and rejected share no prompt turn")
    return k, rejected[k:]


def convert_pair(row: Mapping[str, Any], converter: Callable[[Mapping[str, Any]], list],
                 messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``preference`` field of a pair row whose chosen side ``converter`` gave as
    ``messages``: the rejected side is converted with ``rejected`` in place of ``chosen``."""
    try:
        rejected = converter({**row, "chosen": row["rejected"]})
    except RowError as exc:
        exc.rename(lambda s: s.replace("chosen", "rejected", 1))
        raise
    for m in rejected:  # name the user's field in errors, not the stand-in
        m["_src"] = m["_src"].replace("chosen", "rejected", 1)
    k, answer = split_pair(messages, rejected)
    return {"prompt_turns": k, "rejected": answer}


def strip_sources(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair as stored: turns without their ``_src`` bookkeeping."""
    return {"prompt_turns": pair["prompt_turns"],
            "rejected": [{k: v for k, v in m.items() if k != "_src"} for m in pair["rejected"]]}


def sides(record: Mapping[str, Any]) -> tuple[list[dict], list[dict], list[dict]] | None:
    """``(prompt, chosen, rejected)`` turns of a canonical record, or None without a pair."""
    pair = record.get(PAIR_FIELD)
    if not pair:
        return None
    k = pair["prompt_turns"]
    return record["messages"][:k], record["messages"][k:], pair["rejected"]


class PairsError(ValueError):
    """The params ask for preference tuning the data cannot give; the message names the key."""


def count_pairs(path: str | Path) -> int:
    """Records of a canonical JSONL file (a split) that carry a pair; lines without the
    field's name are not parsed."""
    marker, n = f'"{PAIR_FIELD}":'.encode(), 0
    with Path(path).open("rb") as fh:
        for line in fh:
            n += marker in line and bool(json.loads(line).get(PAIR_FIELD))
    return n


def built_from(path: str | Path, inputs: list[str]) -> bool:
    """Whether every ``ingest.inputs`` entry (a file or a folder) has rows in the split at
    ``path`` (its records' ``source`` is ``file:line``). False after an input was added or
    swapped: the split predates it, so its pair count says nothing about the next run."""
    files = set()
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            files.add(str(json.loads(line).get("source", "")).rsplit(":", 1)[0])
    return all(any(f == entry or f.startswith(entry.rstrip("/") + "/") for f in files)
               for entry in inputs)


def count_unpaired(path: str | Path) -> dict[str, int]:
    """``{"desirable": n, "undesirable": m}``: the unpaired (KTO) records of a canonical JSONL
    file; lines without the field's name are not parsed."""
    marker, out = f'"{KTO_FIELD}":'.encode(), {"desirable": 0, "undesirable": 0}
    with Path(path).open("rb") as fh:
        for line in fh:
            if marker in line and (kto := json.loads(line).get(KTO_FIELD)):
                out["desirable" if kto["desirable"] else "undesirable"] += 1
    return out


def check_unpaired(method: str, counts: Mapping[str, int], where: str) -> None:
    """Unpaired (KTO) rows are trained on by ``align.method: kto`` only: with any other
    method the desirable ones would be SFT targets and the undesirable ones ignored."""
    n = sum(counts.values())
    if n and method != "kto":
        raise PairsError(f"{where} has {n} unpaired KTO rows ({counts.get('desirable', 0)} "
                         f"desirable, {counts.get('undesirable', 0)} undesirable) that only KTO "
                         f"trains on; set align.method: kto (align.method: {method} would "
                         f"ignore them), or remove them from ingest.inputs")


def check_pairs(method: str, patience: int, n_train: int, n_val: int | None, where: str,
                unpaired_train: int = 0, unpaired_val: int = 0) -> None:
    """``align.method`` other than none needs pairs in train (and, to stop early, in val:
    without val pairs align trains without evaluation); kto also trains on unpaired rows."""
    if method == "kto":  # each pair is two KTO examples
        n_train, n_val = n_train + unpaired_train, None if n_val is None else n_val + unpaired_val
    if method != "none" and n_train == 0:
        raise PairsError(f"align.method: {method} needs preference pairs, but the train split "
                         f"has 0 ({where}); add rows with chosen and rejected to ingest.inputs "
                         f"or set align.method: none")
    if method != "none" and n_val == 0 and patience > 0:
        raise PairsError(f"align.patience: {patience} stops early on the val pairs, but the val "
                         f"split has 0; set align.patience: 0 (align then trains without "
                         f"evaluation) or give val pairs: add pair rows, or raise "
                         f"format.max_length if format dropped them as too long "
                         f"(data/processed/pairs/dropped.jsonl)")
