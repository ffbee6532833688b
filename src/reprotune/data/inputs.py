"""The files of ``ingest.inputs``: checks, per-file reading, and merging the per-file parts.

The pipeline reads each input in its own DVC stage (``read@<n>``, one per entry of
``ingest.inputs``, generated with ``foreach``), so each stage depends on exactly the file it
reads: an untracked file dropped next to it changes nothing, and editing one input rereads
only that one. A ``read`` stage writes a *part* folder (:func:`write_part`): the file's
canonical records, its rejected rows and its counts. The ``ingest`` stage merges the parts
in the order of ``ingest.inputs`` (:func:`merge_parts`) into the files later stages read.

File-level rules live here: every input lies under ``data/raw/`` (:func:`check_inputs`), and
a file that yields no rows, or keeps less than ``ingest.min_kept_ratio`` of them, stops the
pipeline with the file's name and its top reject reason (:func:`check_files`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reprotune import io
from reprotune.data.ingest import IngestResult, ingest_rows, summarize
from reprotune.data.readers import RawRow, iter_rows

logger = logging.getLogger(__name__)

RAW_DIR = "data/raw"  # where inputs live: DVC-tracked (dvc add / dvc import) or the demo's
PART_FILES = ("records.jsonl", "rejected.jsonl", "counts.json")


class IngestError(ValueError):
    """The inputs as a whole are unusable; the message names the file or param and the fix."""


def _check_listed(paths: Sequence[str]) -> None:
    if not paths:
        raise IngestError("ingest.inputs: no input files listed")
    seen = [p for i, p in enumerate(paths) if p in paths[:i]]
    if seen:
        raise IngestError(f"ingest.inputs: {seen[0]} is listed twice (its rows would be "
                          f"counted twice)")


def check_inputs(paths: Sequence[str], raw_dir: str | Path = RAW_DIR) -> None:
    """Every input must lie inside ``raw_dir``, where DVC tracks data: a file elsewhere (a home
    folder, another checkout) could change or vanish without ``dvc repro`` or a teammate's
    ``dvc pull`` knowing. Duplicates are refused too (their rows would count twice)."""
    _check_listed(paths)
    root = Path(raw_dir).resolve()
    for path in paths:
        if not Path(path).resolve().is_relative_to(root):
            name = Path(path).name
            raise IngestError(
                f"ingest.inputs: {path} is outside {raw_dir}/, so DVC would not see it change; "
                f"copy it in and track it: cp {path} {raw_dir}/ && dvc add {raw_dir}/{name} "
                f"(or `dvc import <repo> <path> -o {raw_dir}/{name}` from another DVC repo), "
                f"then list {raw_dir}/{name}")


def check_files(res: IngestResult, paths: Sequence[str], min_kept_ratio: float) -> None:
    """Fail when a file yields no rows, or keeps less than ``min_kept_ratio`` of its rows:
    a wrong column mapping or a broken export must not vanish among other files' rows."""
    files = res.counts.get("files", {})
    for path in paths:
        b = files.get(str(path), {"rows_in": 0, "kept": 0, "rejected": {}})
        if b["rows_in"] == 0:
            raise IngestError(f"{path}: the file yields no rows (empty, or only blank lines); "
                              f"remove it from ingest.inputs or fix the export")
        kept_ratio = b["kept"] / b["rows_in"]
        if kept_ratio < min_kept_ratio:
            reason, n = max(b["rejected"].items(), key=lambda kv: (kv[1], kv[0]))
            example = next((r for r in res.rejects
                            if r["source"] == str(path) and r["reason"] == reason), {})
            raise IngestError(
                f"{path}: kept {b['kept']} of {b['rows_in']} rows ({kept_ratio:.0%} < "
                f"ingest.min_kept_ratio {min_kept_ratio:g}); top reason {reason} ({n} rows), "
                f"e.g. line {example.get('line')}: {example.get('detail')}. Check ingest.format / "
                f"ingest.columns, or lower ingest.min_kept_ratio to accept the losses")


def ingest_files(paths: Sequence[str], *, fmt: str = "auto", columns: Mapping[str, str] | None = None,
                 label_field: str | None = "label", group_field: str | None = "group",
                 keep_fields: Sequence[str] = ()) -> IngestResult:
    """Read and convert every file of ``paths`` in the order given (one result for all).

    File-level problems (missing, unsupported, wrong encoding, broken CSV quoting) raise;
    row-level ones are rejects. Every listed file appears in ``counts["files"]``.
    """
    _check_listed(paths)

    def rows() -> Iterable[RawRow]:
        for path in paths:
            yield from tqdm(iter_rows(path), desc=f"ingest {path}", unit="row", mininterval=2,
                            disable=None)

    res = ingest_rows(rows(), fmt=fmt, columns=columns, label_field=label_field,
                      group_field=group_field, keep_fields=keep_fields)
    for path in paths:  # a file without rows still gets its (zero) line in the metrics
        res.counts["files"].setdefault(str(path), {"rows_in": 0, "kept": 0, "rejected": {}})
    return res


# --------------------------------------------------------------------------- parts
def part_dir(parts_root: str | Path, path: str) -> Path:
    """Where the ``read`` stage of input ``path`` writes its part: the input's path below
    ``parts_root`` (``data/interim/read/data/raw/x.jsonl/``; an absolute path loses its
    root, so a part can never land on top of its input)."""
    rel = Path(os.path.normpath(path)).as_posix().lstrip("/")
    if rel == ".." or rel.startswith("../"):
        raise IngestError(f"ingest.inputs: {path} points outside the repository")
    return Path(parts_root) / rel


def write_part(out_dir: str | Path, res: IngestResult) -> None:
    """One input's records, rejects and counts, written as one folder (atomically)."""
    with io.atomic_dir(out_dir) as tmp:
        io.write_jsonl(tmp / "records.jsonl", res.records)
        io.write_jsonl(tmp / "rejected.jsonl", res.rejects)
        io.write_json(tmp / "counts.json", res.counts)


def read_part(part: str | Path, path: str) -> IngestResult:
    """The part of input ``path``; a missing one names the stage that writes it."""
    part = Path(part)
    if not all((part / f).is_file() for f in PART_FILES):
        raise IngestError(f"{path}: its read part {part} is missing; run `dvc repro` (the read "
                          f"stage of each entry of ingest.inputs writes it)")
    return IngestResult(records=io.read_jsonl(part / "records.jsonl"),
                        rejects=io.read_jsonl(part / "rejected.jsonl"),
                        counts=io.read_json(part / "counts.json"))


def _buckets(per_key: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mapping in per_key:
        for key, b in mapping.items():
            acc = out.setdefault(key, {"rows_in": 0, "kept": 0, "rejected": Counter()})
            acc["rows_in"] += b["rows_in"]
            acc["kept"] += b["kept"]
            acc["rejected"].update(b["rejected"])
    return out


def merge_parts(parts: Sequence[IngestResult]) -> IngestResult:
    """One result from per-file parts, in the order given: records and rejects concatenated,
    per-file and per-format buckets combined, totals recomputed (so they add up exactly as
    if all files had been read at once)."""
    res = IngestResult(records=[r for p in parts for r in p.records],
                       rejects=[r for p in parts for r in p.rejects])
    files = _buckets(p.counts["files"] for p in parts)
    formats = _buckets(p.counts["formats"] for p in parts)
    res.counts = summarize(res, files, formats)
    for p in parts:  # a hub input's pinned dataset/split/commit (reprotune.data.hub)
        for key, b in p.counts["files"].items():
            if "hub" in b:
                res.counts["files"][key]["hub"] = b["hub"]
    return res
