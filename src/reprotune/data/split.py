"""Seeded train/val/test split with optional stratification and groups, plus a leakage check.

The split is a pure function of (rows, params): each *unit* (a group, or a single row when it
has no group) gets a position from a seeded hash of its key, so the assignment of a unit does
not depend on row order, and adding rows elsewhere does not reshuffle existing ones. Within
each stratum, units in hash order fill test, then val, up to their share of rows; the rest is
train. A group never straddles splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The split cannot be made as configured; the message names the param."""


@dataclass
class SplitResult:
    parts: dict[str, list[dict[str, Any]]]
    metrics: dict[str, Any] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)


def _unit_key(row: dict[str, Any], group: str | None) -> str:
    g = row.get(group) if group else None
    return f"g:{g}" if g not in (None, "") else f"r:{row['id']}"


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def assign_splits(rows: Sequence[dict[str, Any]], *, val_ratio: float, test_ratio: float,
                  stratify: str | None, group: str | None, seed: int) -> list[str]:
    """Return the split name of every row (same order as ``rows``)."""
    for name, fld in (("split.stratify", stratify), ("split.group", group)):
        if fld and rows and all(fld not in r for r in rows):
            raise SplitError(f"{name}: field {fld!r} is not a column of the data; "
                             f"available: {', '.join(sorted(rows[0]))} (or null)")
    units: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        units[_unit_key(row, group)].append(i)
    # A unit's stratum is its most common stratify value (ties: smallest string), so a
    # group with mixed labels still lands in one split.
    strata: dict[str, list[str]] = defaultdict(list)
    for key, idx in units.items():
        if stratify:
            counts = Counter(str(rows[i].get(stratify)) for i in idx)
            stratum = min(counts, key=lambda v: (-counts[v], v))
        else:
            stratum = ""
        strata[stratum].append(key)

    out = [""] * len(rows)
    for stratum in sorted(strata):
        keys = sorted(strata[stratum], key=lambda k: _rank(k, seed))
        n_rows = sum(len(units[k]) for k in keys)
        targets = {"test": round(n_rows * test_ratio), "val": round(n_rows * val_ratio)}
        filled = {"test": 0, "val": 0}
        for key in keys:
            size = len(units[key])
            dest = "train"
            for part in ("test", "val"):
                # Take the unit if it brings the part closer to its row target
                # (any overshoot is smaller than the current shortfall).
                remaining = targets[part] - filled[part]
                if remaining > 0 and size - remaining < remaining:
                    dest = part
                    break
            if dest != "train":
                filled[dest] += size
            for i in units[key]:
                out[i] = dest
    return out


def conversation_text(row: dict[str, Any]) -> str:
    """User and assistant text of a row (messages may be a JSON string, as in Parquet)."""
    msgs = row["messages"]
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    return "\n".join(m.get("content") or "" for m in msgs if m.get("role") in ("user", "assistant"))


def find_leaks(parts: dict[str, list[dict[str, Any]]], *, threshold: float,
               ngram_range: tuple[int, int] = (2, 4)) -> list[dict[str, Any]]:
    """Val/test rows with a near-duplicate (TF-IDF cosine >= threshold) in train."""
    from reprotune.data.similarity import cross_near_duplicates

    train = parts["train"]
    if not train:
        return []
    train_text = [conversation_text(r) for r in train]
    leaks = []
    for name in ("val", "test"):
        rows = parts[name]
        if not rows:
            continue
        hits = cross_near_duplicates([conversation_text(r) for r in rows], train_text,
                                     threshold=threshold, ngram_range=ngram_range)
        for qi, ci, sim in hits:
            leaks.append({"split": name, "id": rows[qi]["id"], "train_id": train[ci]["id"],
                          "similarity": round(float(sim), 4),
                          "text": conversation_text(rows[qi])[:300],
                          "train_text": train_text[ci][:300]})
    return leaks


def split_rows(rows: Sequence[dict[str, Any]], *, val_ratio: float, test_ratio: float,
               stratify: str | None, group: str | None, seed: int,
               leakage_threshold: float) -> SplitResult:
    """Split rows, check leakage, and compute the split metrics."""
    if not rows:
        raise SplitError("no rows to split: the format stage produced an empty table")
    names = assign_splits(rows, val_ratio=val_ratio, test_ratio=test_ratio,
                          stratify=stratify, group=group, seed=seed)
    parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for row, name in zip(rows, names, strict=True):
        parts[name].append(row)
    for name, ratio, param in (("val", val_ratio, "split.val_ratio"),
                               ("test", test_ratio, "split.test_ratio")):
        if ratio > 0 and not parts[name]:
            raise SplitError(f"{param}: {ratio} of {len(rows)} rows gave an empty {name} split; "
                             f"raise {param} or add data")
    leaks = find_leaks(parts, threshold=leakage_threshold)
    leak_counts = Counter(leak["split"] for leak in leaks)
    metrics: dict[str, Any] = {
        "rows": len(rows),
        "counts": {s: len(parts[s]) for s in SPLITS},
        "leakage": {
            "threshold": leakage_threshold,
            "val": leak_counts.get("val", 0),
            "test": leak_counts.get("test", 0),
            "test_share": round(leak_counts.get("test", 0) / max(1, len(parts["test"])), 4),
        },
    }
    if stratify:
        metrics["strata"] = {s: dict(sorted(Counter(str(r.get(stratify)) for r in parts[s]).items()))
                             for s in SPLITS}
    if group:
        metrics["groups"] = {s: len({r.get(group) for r in parts[s] if r.get(group) not in (None, "")})
                             for s in SPLITS}
    logger.info("split %s; leakage val=%d test=%d at threshold %.2f", metrics["counts"],
                metrics["leakage"]["val"], metrics["leakage"]["test"], leakage_threshold)
    return SplitResult(parts=parts, metrics=metrics, leaks=leaks)
