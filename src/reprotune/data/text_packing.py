"""``format.mode: text``: plain documents packed into training rows for continued pretraining.

No chat template is applied. Each document (a ``{"text": ...}`` row or a ``.txt`` file,
stored by ingest as a record with ``"layout": "text"``, :mod:`reprotune.data.formats`) is
tokenised as written, without special tokens, and followed by the tokenizer's EOS token;
the documents of a split, in the split's order, form one stream that is cut into rows of
``format.max_length`` tokens (the last row of a split may be shorter). A row may hold the
end of one document and the start of the next: the EOS between them marks the boundary, as
in LLaMA-Factory's pretraining stage. Every token is labelled (``labels == input_ids``), so
the loss covers the whole text; no token is truncated or lost.

Counts add up per split: ``documents_in = documents_packed + sum(dropped)``, dropped by
reason (``empty_document``: a document of no tokens; only the EOS would be trained on), and
``tokens_out`` is the packed documents' tokens plus one EOS each. Fidelity: every packed
document must decode back to its text byte for byte (``decode_mismatch`` counts the ones
that do not, as in chat mode). A conversation record in text mode is an error naming
``format.mode``, never silently trained on as text.

``format.max_length: auto`` in text mode is the model's context length, at most
:data:`AUTO_MAX` tokens (LLaMA-Factory's default ``cutoff_len``); a number is used as given,
capped by the model's context length.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reprotune.data.formats import LAYOUT, TEXT
from reprotune.data.formatting import FormatError, _length_stats

log = logging.getLogger(__name__)

AUTO_MAX = 2048
DROP_EMPTY = "empty_document"
DROP_REASONS = (DROP_EMPTY,)
TABLE_ROWS = 256  # packed rows per Arrow table handed to the Parquet writer


def text_max_length(setting: int | str, model_limit: int | None) -> int:
    """``format.max_length`` in text mode (module docstring)."""
    value = (model_limit or AUTO_MAX) if setting == "auto" else int(setting)
    if setting == "auto":
        value = min(value, AUTO_MAX)
    return min(value, model_limit) if model_limit else value


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS token id, appended after every document."""
    if tokenizer.eos_token_id is None:
        raise FormatError("format.mode: text appends the tokenizer's EOS token after each "
                          "document, but this tokenizer has none; use a model whose "
                          "tokenizer defines eos_token")
    return int(tokenizer.eos_token_id)


def document(record: dict[str, Any]) -> str:
    """The text of a text-layout record; a conversation raises :class:`FormatError`."""
    if record.get(LAYOUT) != TEXT:
        raise FormatError(f"format.mode: text, but record {record.get('source', '?')} is a "
                          f"conversation, not a text document; set format.mode: chat to "
                          f"fine-tune on conversations, or remove that input (continued "
                          f"pretraining and SFT are two experiments: docs/training.md)")
    return record["messages"][0]["content"]


def count_documents(path: str | Path) -> int:
    """Text-layout records in a split's JSONL (the format stage in chat mode refuses them);
    lines without the marker are not parsed."""
    marker, n = f'"{LAYOUT}": "{TEXT}"'.encode(), 0
    with Path(path).open("rb") as fh:
        for line in fh:
            n += marker in line and json.loads(line).get(LAYOUT) == TEXT
    return n


class Packer:
    """Packs one split's documents into rows; :attr:`stats` and :attr:`dropped` fill up as
    :meth:`rows` is consumed."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length, self.eos = tokenizer, max_length, eos_id(tokenizer)
        self.lengths: list[int] = []  # tokens per packed document, EOS included
        self.dropped: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {
            "documents_in": 0, "documents_packed": 0, "dropped": dict.fromkeys(DROP_REASONS, 0),
            "rows_out": 0, "tokens_out": 0, "label_tokens": 0, "decode_mismatch": 0,
            "max_length": max_length}

    def _ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids and self.tokenizer.decode(ids) != text:
            self.stats["decode_mismatch"] += 1
        return ids

    def _row(self, ids: list[int], docs: list[tuple[str, str]], start: int) -> dict[str, Any]:
        key = "|".join(i for i, _ in docs) + f"@{start}"
        sources = docs[0][1] if len(docs) == 1 else f"{docs[0][1]} .. {docs[-1][1]}"
        self.stats["rows_out"] += 1
        self.stats["tokens_out"] += len(ids)
        self.stats["label_tokens"] += len(ids)
        return {"id": hashlib.sha1(key.encode()).hexdigest(), "source": sources, "messages": None,
                "tools": None, "label": None, "group": None, "meta": None,
                "text": self.tokenizer.decode(ids), "input_ids": ids, "labels": list(ids),
                "n_tokens": len(ids), "n_label_tokens": len(ids), "truncated": False}

    def rows(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The packed rows of ``records`` (canonical text records), in order."""
        buf: list[int] = []
        docs: list[tuple[str, str]] = []  # (id, source) of the documents in ``buf``
        start = 0  # where in its first document ``buf`` starts (tokens)
        for rec in records:
            self.stats["documents_in"] += 1
            ids = self._ids(document(rec))
            if not ids:
                self.stats["dropped"][DROP_EMPTY] += 1
                self.dropped.append({"id": rec.get("id"), "source": rec.get("source"),
                                     "reason": DROP_EMPTY, "detail": "the document has no tokens"})
                continue
            ids.append(self.eos)
            self.stats["documents_packed"] += 1
            self.lengths.append(len(ids))
            pos = 0
            while pos < len(ids):
                if not buf:
                    docs, start = [], pos
                take = ids[pos:pos + self.max_length - len(buf)]
                buf += take
                docs.append((rec.get("id", ""), rec.get("source", "")))
                pos += len(take)
                if len(buf) == self.max_length:
                    yield self._row(buf, docs, start)
                    buf = []
        if buf:
            yield self._row(buf, docs, start)
        s = self.stats
        assert s["documents_in"] == s["documents_packed"] + sum(s["dropped"].values())
        assert s["tokens_out"] == sum(self.lengths)

    def summary(self) -> dict[str, Any]:
        """The split's stats with the document length statistics."""
        return {**self.stats, "token_length": _length_stats(self.lengths)}


def tables(rows: Iterable[dict[str, Any]]) -> Iterator[Any]:
    """``rows`` as Arrow tables of :func:`~reprotune.data.formatting.formatted_schema`."""
    import pyarrow as pa

    from reprotune.data.formatting import formatted_schema

    schema, batch = formatted_schema(), []
    for row in rows:
        batch.append(row)
        if len(batch) == TABLE_ROWS:
            yield pa.Table.from_pylist(batch, schema=schema)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=schema)


def combine(stats: dict[str, dict[str, Any]], lengths: np.ndarray, *, setting: int | str,
            model_limit: int | None) -> dict[str, Any]:
    """One ``metrics/format.json`` for the splits of a text-mode run."""
    summed = ("documents_in", "documents_packed", "rows_out", "tokens_out", "label_tokens",
              "decode_mismatch")
    first = next(iter(stats.values()))
    out = {"mode": TEXT, "max_length": first["max_length"], "max_length_setting": setting,
           "model_limit": model_limit, **{k: sum(s[k] for s in stats.values()) for k in summed},
           "dropped": {k: sum(s["dropped"][k] for s in stats.values()) for k in DROP_REASONS},
           "token_length": _length_stats(lengths),
           "splits": {name: {k: s[k] for k in (*summed, "dropped", "token_length")}
                      for name, s in stats.items()}}
    assert out["documents_in"] == out["documents_packed"] + sum(out["dropped"].values())
    return out
