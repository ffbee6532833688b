"""Train/val/test split: seeded (optionally stratified) or by time, with groups and a leakage check.

The split is a pure function of (rows, params). Rows are split in *units*: a group
(``split.group``), or a single row when it has no group, so a group never straddles splits.

* **Seeded** (default): each unit gets a position from a seeded hash of its key, so the
  assignment of a unit does not depend on row order, and adding rows elsewhere does not
  reshuffle existing ones. Within each stratum, units in hash order fill test, then val, up
  to their share of rows; the rest is train.
* **By time** (``split.order_by: <field>``): units are ordered by time, the newest fill test,
  the next newest val, and the oldest rest is train, so the model is evaluated on data newer
  than anything it trained on. A group's time is its *newest* row: a group that is still
  active lands late, so every train row is no newer than the oldest val/test unit's time.
  Ties are broken by the seeded hash. ``split.stratify`` is not applied (label shares are
  still reported): balancing labels would move rows across the time cut.

Tasks (``ingest.mixture``): when the rows carry a ``task``, each task is its own stratum
(with ``split.stratify``, the strata are the (task, stratify value) pairs), so every task
gets its share of val and test; a task left without rows in a part that should have some
(too few rows for the ratio, or all dropped as leaks) is an error naming it. A time-ordered
split does not stratify, but refuses a missing task the same way.

The leakage check then compares val with train and test with train and val
(:mod:`reprotune.data.leakage`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from reprotune.data import SPLITS
from reprotune.data.leakage import Leakage, LeakageError, apply_leaks, find_leaks
from reprotune.data.mixture import TASK_FIELD
from reprotune.data.timeorder import ACCEPTED, iso, meta_value, row_times

logger = logging.getLogger(__name__)


class SplitError(ValueError):
    """The split cannot be made as configured; the message names the param."""

    leaks: list[dict[str, Any]] = []  # set when split.on_leak: fail stopped the split


@dataclass
class SplitResult:
    parts: dict[str, list[dict[str, Any]]]
    metrics: dict[str, Any] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)  # every leaking val/test row
    indices: dict[str, list[int]] = field(default_factory=dict)  # input positions per split


def _unit_key(row: dict[str, Any], group: str | None) -> str:
    g = row.get(group) if group else None
    return f"g:{g}" if g not in (None, "") else f"r:{row['id']}"


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _take(size: int, remaining: int) -> bool:
    """Whether a unit of ``size`` rows brings a part closer to its row target
    (any overshoot is smaller than the current shortfall)."""
    return remaining > 0 and size - remaining < remaining


def check_fields(columns: Collection[str], *, stratify: str | None, group: str | None) -> None:
    """:class:`SplitError` naming the param when ``split.stratify`` or ``split.group`` is not
    one of ``columns``."""
    for name, fld in (("split.stratify", stratify), ("split.group", group)):
        if fld and fld not in columns:
            raise SplitError(f"{name}: field {fld!r} is not a column of the data; "
                             f"available: {', '.join(sorted(columns))} (or null)")


def assign_splits(rows: Sequence[dict[str, Any]], *, val_ratio: float, test_ratio: float,
                  stratify: str | None, group: str | None, seed: int,
                  order_by: str | None = None, task: str | None = None) -> list[str]:
    """Return the split name of every row (same order as ``rows``). ``task``: a field that,
    when rows carry it, is stratified on before ``stratify`` (a mixture's tasks)."""
    if rows:
        check_fields({k for r in rows for k in r}, stratify=stratify, group=group)
    units: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        units[_unit_key(row, group)].append(i)
    if order_by:
        return _assign_by_time(rows, units, val_ratio=val_ratio, test_ratio=test_ratio,
                               order_by=order_by, seed=seed)
    # A unit's stratum is its most common stratify value (ties: smallest string), so a
    # group with mixed labels still lands in one split.
    strata: dict[str, list[str]] = defaultdict(list)
    for key, idx in units.items():
        if stratify:
            counts = Counter(str(rows[i].get(stratify)) for i in idx)
            stratum = min(counts, key=lambda v: (-counts[v], v))
        else:
            stratum = ""
        if task and any(task in rows[i] for i in idx):  # a mixture: strata (task, label)
            counts = Counter(str(rows[i].get(task)) for i in idx)
            stratum = min(counts, key=lambda v: (-counts[v], v)) + "\x00" + stratum
        strata[stratum].append(key)

    out = [""] * len(rows)
    for stratum in sorted(strata):
        keys = sorted(strata[stratum], key=lambda k: _rank(k, seed))
        n_rows = sum(len(units[k]) for k in keys)
        targets = {"test": round(n_rows * test_ratio), "val": round(n_rows * val_ratio)}
        filled = {"test": 0, "val": 0}
        for key in keys:
            size = len(units[key])
            dest = next((p for p in ("test", "val") if _take(size, targets[p] - filled[p])),
                        "train")
            if dest != "train":
                filled[dest] += size
            for i in units[key]:
                out[i] = dest
    return out


def _times(rows: Sequence[dict[str, Any]], order_by: str) -> list[float]:
    """Every row's time, or SplitError naming the field, the count and an example."""
    found = row_times(rows, order_by)
    problems = []
    if found.missing:
        ex = rows[found.missing[0]]
        problems.append(f"{len(found.missing)} of {len(rows)} rows have no {order_by!r} "
                        f"(e.g. {ex.get('source') or ex['id']})")
    if found.unparsable:
        ex = rows[found.unparsable[0]]
        problems.append(f"{len(found.unparsable)} rows have a value that is not {ACCEPTED} "
                        f"(e.g. {ex.get('source') or ex['id']}: {meta_value(ex, order_by)!r})")
    if problems:
        raise SplitError(f"split.order_by: {'; '.join(problems)}; fix those rows, or set "
                         f"split.order_by: null for a seeded random split")
    return found.times  # type: ignore[return-value]  # no None left


def _assign_by_time(rows: Sequence[dict[str, Any]], units: dict[str, list[int]], *,
                    val_ratio: float, test_ratio: float, order_by: str, seed: int) -> list[str]:
    """Newest units to test, then val, the rest to train; one contiguous time range each."""
    times = _times(rows, order_by)
    unit_time = {k: max(times[i] for i in idx) for k, idx in units.items()}
    newest_first = sorted(units, key=lambda k: (-unit_time[k], _rank(k, seed)))
    queue = [("test", round(len(rows) * test_ratio)), ("val", round(len(rows) * val_ratio))]
    out, filled = [""] * len(rows), 0
    for key in newest_first:
        size = len(units[key])
        # once a part stops taking units it is closed, so each part is one time range
        while queue and not _take(size, queue[0][1] - filled):
            queue.pop(0)
            filled = 0
        dest = queue[0][0] if queue else "train"
        filled += size if queue else 0
        for i in units[key]:
            out[i] = dest
    return out


def _time_ranges(parts: dict[str, list[dict[str, Any]]], order_by: str) -> dict[str, Any]:
    """Oldest and newest row time of each split (ISO, UTC)."""
    out: dict[str, Any] = {}
    for name in SPLITS:
        ts = row_times(parts[name], order_by).times
        ts = [t for t in ts if t is not None]
        out[name] = [iso(min(ts)), iso(max(ts))] if ts else None
    return out


def _task_counts(parts: dict[str, list[dict[str, Any]]], task: str) -> dict[str, dict[str, int]]:
    """Rows per task of each split, every task named in every split (0 where it has none)."""
    names = sorted({str(r.get(task)) for rows in parts.values() for r in rows})
    return {s: {t: c.get(t, 0) for t in names}
            for s, c in ((s, Counter(str(r.get(task)) for r in parts[s])) for s in SPLITS)}


def _check_tasks(tasks: dict[str, dict[str, int]], ratios: dict[str, float]) -> None:
    """:class:`SplitError` naming the first task without rows in a split that should have some."""
    for name, ratio in ratios.items():
        for t, n in tasks[name].items():
            if ratio > 0 and n == 0:
                total = sum(tasks[s][t] for s in SPLITS)
                raise SplitError(
                    f"ingest.mixture.tasks.{t}: no {name} rows ({total} rows after the split's "
                    f"leakage check, split.{name}_ratio {ratio:g}): each task needs rows in train, "
                    f"val and test to be trained and evaluated apart; add rows to the task, "
                    f"raise split.{name}_ratio, or merge it into another task")
        for t, n in tasks["train"].items():
            if n == 0:
                raise SplitError(f"ingest.mixture.tasks.{t}: no train rows; add rows to the task "
                                 f"or lower split.val_ratio / split.test_ratio")


def split_rows(rows: Sequence[dict[str, Any]], *, val_ratio: float, test_ratio: float,
               stratify: str | None, group: str | None, seed: int, leakage_threshold: float,
               order_by: str | None = None, on_leak: str = "drop",
               texts: Sequence[str] | None = None, progress: bool = False,
               task: str | None = TASK_FIELD) -> SplitResult:
    """Split rows, check leakage (acting on it as ``on_leak`` says), compute the metrics.
    Rows carrying ``task`` are stratified by it and counted per task (module docstring).

    ``texts``: each row's :func:`~reprotune.data.leakage.conversation_text`, when the rows
    carry no ``messages`` (the stage keeps the texts on disk and the rows small).

    Raises :class:`SplitError` naming the param when the split cannot be made, or when
    ``on_leak`` is ``fail`` and a held-out row leaks.
    """
    if not rows:
        raise SplitError("no rows to split: the dedup stage kept no rows")
    if order_by and stratify and any(r.get(stratify) is not None for r in rows):
        # only rows that carry labels have shares to keep; unlabelled data loses nothing
        logger.warning("split.order_by=%s: split.stratify=%s is not applied to a time-ordered "
                       "split (label shares are reported in metrics/split.json)", order_by, stratify)
    names = assign_splits(rows, val_ratio=val_ratio, test_ratio=test_ratio, stratify=stratify,
                          group=group, seed=seed, order_by=order_by, task=task)
    parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    positions: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        parts[name].append(row)
        positions[name].append(i)
    for name, ratio, param in (("val", val_ratio, "split.val_ratio"),
                               ("test", test_ratio, "split.test_ratio")):
        if ratio > 0 and not parts[name]:
            raise SplitError(f"{param}: {ratio} of {len(rows)} rows gave an empty {name} split; "
                             f"raise {param} or add data")
    held_out = {s: len(parts[s]) for s in ("val", "test")}
    leaks = find_leaks(rows, names, texts=texts, threshold=leakage_threshold, progress=progress)
    try:
        leakage: Leakage = apply_leaks(parts, leaks, on_leak=on_leak, threshold=leakage_threshold)
    except LeakageError as exc:
        err = SplitError(str(exc))
        err.leaks = leaks  # for the stage to write out before it stops
        raise err from exc
    for name in ("val", "test"):
        if held_out[name] and not parts[name]:
            raise SplitError(f"split.on_leak: drop removed all {held_out[name]} {name} rows "
                             f"(each has a near-duplicate in an earlier split at "
                             f"split.leakage_threshold {leakage_threshold:g}); deduplicate harder "
                             f"(dedup.threshold) or use split.on_leak: report")
    tasks = _task_counts(parts, task) if task and any(task in r for r in rows) else None
    if tasks is not None:
        _check_tasks(tasks, {"val": val_ratio, "test": test_ratio})
    gone = {(leak["split"], leak["id"]) for leak in leaks if leak.get("action") == "dropped"}
    positions = {s: [i for i in positions[s] if (s, rows[i]["id"]) not in gone] for s in SPLITS}
    leakage.counts["test_share"] = round(leakage.counts["test"] / max(1, held_out["test"]), 4)
    metrics: dict[str, Any] = {
        "rows": len(rows),
        "order": {"by": order_by, "rule": "a group's time is its newest row"} if order_by
        else {"by": None, "seed": seed},
        "counts": {s: len(parts[s]) for s in SPLITS},
        "leakage": leakage.counts,
    }
    if order_by:
        metrics["order"]["time_ranges"] = _time_ranges(parts, order_by)
    if stratify:
        metrics["strata"] = {s: dict(sorted(Counter(str(r.get(stratify)) for r in parts[s]).items()))
                             for s in SPLITS}
    if tasks is not None:
        metrics["tasks"] = tasks
    if group:
        metrics["groups"] = {s: len({r.get(group) for r in parts[s] if r.get(group) not in (None, "")})
                             for s in SPLITS}
    assert metrics["rows"] == sum(metrics["counts"].values()) + sum(leakage.counts["dropped"].values())
    logger.info("split %s%s; leakage val=%d test=%d at threshold %.2f (on_leak=%s)",
                metrics["counts"], f" by {order_by}" if order_by else "", leakage.counts["val"],
                leakage.counts["test"], leakage_threshold, on_leak)
    return SplitResult(parts=parts, metrics=metrics, leaks=leakage.leaks, indices=positions)
