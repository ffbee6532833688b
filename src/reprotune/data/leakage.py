"""Leakage check of a split: held-out rows with a near-duplicate in an earlier split.

The splits are ordered train < val < test. A val row *leaks* when a train row is a
near-duplicate of it (char n-gram TF-IDF cosine >= ``split.leakage_threshold``); a test row
leaks when a train or a val row is. All three splits are compared in one search
(:func:`reprotune.data.similarity.earlier_group_matches`), whose LSH banding follows the
threshold, so a check at 0.7 is not run with a banding tuned for 0.85. The texts go to a
temporary file and the index counts n-grams partition by partition, so memory stays bounded
(see :class:`~reprotune.data.tfidf.NgramIndex`).

``split.on_leak`` says what happens next: ``report`` keeps every row and counts the leaks,
``drop`` (default) removes the leaking rows from val/test (train is never touched), and
``fail`` stops the stage naming the param and the count.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reprotune.data import SPLITS

logger = logging.getLogger(__name__)

ACTIONS = ("report", "drop", "fail")
TEXT_ROWS = 200  # leaks listed with text excerpts (all are listed with ids and similarity)


class LeakageError(ValueError):
    """``split.on_leak: fail`` and leaks were found; the message names the param and count."""


@dataclass
class Leakage:
    """What the check found and did: one entry per leaking row, counts per split."""

    leaks: list[dict[str, Any]]
    counts: dict[str, Any]


def conversation_text(row: dict[str, Any]) -> str:
    """User and assistant text of a row (messages may be a JSON string, as in Parquet)."""
    msgs = row["messages"]
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    return "\n".join(m.get("content") or "" for m in msgs if m.get("role") in ("user", "assistant"))


def find_leaks(rows: Sequence[dict[str, Any]], names: Sequence[str], *, threshold: float,
               texts: Sequence[str] | None = None, ngram_range: tuple[int, int] = (2, 4),
               progress: bool = False) -> list[dict[str, Any]]:
    """Every val/test row with a near-duplicate in an earlier split, with its best match.

    ``names`` is each row's split; ``texts`` each row's :func:`conversation_text` when the
    caller already has them (the split stage keeps them on disk instead of in its rows).
    """
    from reprotune.data.similarity import earlier_group_matches
    from reprotune.data.spill import DiskTexts

    if not any(n in ("val", "test") for n in names):
        return []
    order = [i for name in SPLITS for i, n in enumerate(names) if n == name]
    where = [names[i] for i in order]
    # in split order (the search wants non-decreasing groups), on disk: memory stays bounded
    ordered = DiskTexts(texts[i] if texts is not None else conversation_text(rows[i])
                        for i in order)
    hits = earlier_group_matches(ordered, [SPLITS.index(w) for w in where], threshold=threshold,
                                 ngram_range=ngram_range, progress=progress)
    leaks = []
    for k, (row, match, sim) in enumerate(hits):
        r, m = rows[order[row]], rows[order[match]]
        leak = {"split": where[row], "id": r["id"], "source": r.get("source"),
                "match_split": where[match], "match_id": m["id"],
                "similarity": round(float(sim), 4)}
        if k < TEXT_ROWS:
            leak.update(text=ordered[row][:300], match_text=ordered[match][:300])
        leaks.append(leak)
    return leaks


def apply_leaks(parts: dict[str, list[dict[str, Any]]], leaks: list[dict[str, Any]], *,
                on_leak: str, threshold: float) -> Leakage:
    """Count the leaks per split and act on them as ``on_leak`` says (drop edits ``parts``)."""
    if on_leak not in ACTIONS:
        raise ValueError(f"split.on_leak: {on_leak!r} is not one of {', '.join(ACTIONS)}")
    found = Counter(leak["split"] for leak in leaks)
    pairs = Counter(f"{leak['split']}_in_{leak['match_split']}" for leak in leaks)
    if on_leak == "fail" and leaks:
        ex = leaks[0]
        raise LeakageError(
            f"split.on_leak: fail: {len(leaks)} held-out rows ({found['val']} val, "
            f"{found['test']} test) have a near-duplicate in an earlier split at "
            f"split.leakage_threshold {threshold:g} (e.g. {ex['split']} row {ex['source'] or ex['id']}"
            f" ~ {ex['match_split']} row {ex['match_id']}, cosine {ex['similarity']}); "
            f"see metrics/split_leakage.json, or set split.on_leak: drop")
    dropped = {"val": 0, "test": 0}
    if on_leak == "drop":
        gone = {(leak["split"], leak["id"]) for leak in leaks}
        for name in ("val", "test"):
            before = len(parts[name])
            parts[name] = [r for r in parts[name] if (name, r["id"]) not in gone]
            dropped[name] = before - len(parts[name])
        for leak in leaks:
            leak["action"] = "dropped"
    counts = {"threshold": threshold, "on_leak": on_leak,
              "val": found.get("val", 0), "test": found.get("test", 0),
              "val_in_train": pairs.get("val_in_train", 0),
              "test_in_train": pairs.get("test_in_train", 0),
              "test_in_val": pairs.get("test_in_val", 0),
              "dropped": dropped}
    logger.info("leakage at %.2f: val %d, test %d (%d of them in val); on_leak=%s, dropped %s",
                threshold, counts["val"], counts["test"], counts["test_in_val"], on_leak, dropped)
    return Leakage(leaks=leaks, counts=counts)
