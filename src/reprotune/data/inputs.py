"""The files of ``ingest.inputs``: checks, per-file reading, and merging the per-file parts.

The pipeline reads each input in its own DVC stage (``read@<n>``, one per entry of
``ingest.inputs``, generated with ``foreach``), so each stage depends on exactly the file it
reads: an untracked file dropped next to it changes nothing, and editing one input rereads
only that one. A ``read`` stage writes a *part* folder (:func:`read_to_part`): the file's
canonical records, its rejected rows and its counts. The ``ingest`` stage merges the parts
in the order of ``ingest.inputs`` (:func:`merge_part_files`) into the files later stages read.
Both stream: rows are written as they are read and parts are merged by copying bytes, so
their memory does not grow with the data (``ingest_files`` / ``merge_parts`` are the
in-memory forms, for tests and small tools).

File-level rules live here: every input lies under ``data/raw/`` (:func:`check_inputs`), and
a file that yields no rows, or keeps less than ``ingest.min_kept_ratio`` of them, stops the
pipeline with the file's name and its top reject reason (:func:`check_files`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from reprotune import io
from reprotune.data import hub
from reprotune.data.ingest import IngestCounts, IngestResult, convert_rows, ingest_rows
from reprotune.data.readers import RawRow, iter_rows

logger = logging.getLogger(__name__)

RAW_DIR = "data/raw"  # where inputs live: DVC-tracked (dvc add / dvc import) or the demo's
PART_FILES = ("records.jsonl", "rejected.jsonl", "counts.json")
# the fix a file's top reject reason calls for, when it is not the column mapping
FIXES = {"unpaired_preference": "Change the rows as the example says"}


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
            if Path(path).absolute().is_relative_to(Path(raw_dir).absolute()):
                # a link inside data/raw/ to a file elsewhere: `cp` onto itself would fail
                target = Path(path).resolve()
                raise IngestError(
                    f"ingest.inputs: {path} is a symbolic link to {target}, outside "
                    f"{raw_dir}/, so DVC would not see that file change; replace the link "
                    f"with a copy and track it: rm {path} && cp {target} {path} && dvc add "
                    f"{path}")
            raise IngestError(
                f"ingest.inputs: {path} is outside {raw_dir}/, so DVC would not see it change; "
                f"copy it in and track it: cp {path} {raw_dir}/ && dvc add {raw_dir}/{name} "
                f"(or `dvc import <repo> <path> -o {raw_dir}/{name}` from another DVC repo), "
                f"then list {raw_dir}/{name}")


def check_files(res: IngestResult | IngestCounts, paths: Sequence[str], min_kept_ratio: float) -> None:
    """Fail when a file yields no rows, or keeps less than ``min_kept_ratio`` of its rows:
    a wrong column mapping or a broken export must not vanish among other files' rows.
    ``res`` is an in-memory result or the running counts of a streamed read."""
    files = (res.counts if isinstance(res, IngestResult) else res.as_dict()).get("files", {})
    for path in paths:
        b = files.get(str(path), {"rows_in": 0, "kept": 0, "rejected": {}})
        if b["rows_in"] == 0:
            raise IngestError(f"{path}: the file yields no rows (empty, or only blank lines); "
                              f"remove it from ingest.inputs or fix the export")
        kept_ratio = b["kept"] / b["rows_in"]
        if kept_ratio < min_kept_ratio:
            reason, n = max(b["rejected"].items(), key=lambda kv: (kv[1], kv[0]))
            example = res.example(str(path), reason)
            raise IngestError(
                f"{path}: kept {b['kept']} of {b['rows_in']} rows ({kept_ratio:.0%} < "
                f"ingest.min_kept_ratio {min_kept_ratio:g}); top reason {reason} ({n} rows), "
                f"e.g. line {example.get('line')}: {example.get('detail')}. "
                f"{FIXES.get(reason, 'Check ingest.format / ingest.columns')}, or lower "
                f"ingest.min_kept_ratio to accept the losses")


def iter_input_rows(path: str | Path) -> Iterator[RawRow]:
    """The raw rows of one ``ingest.inputs`` entry: a hub dataset's split for a ``*.hub.yaml``
    manifest (:func:`reprotune.data.hub.iter_rows`), else the local file
    (:func:`reprotune.data.readers.iter_rows`). The choice lives here, above both readers,
    because the hub reader reads its snapshot's files through the file readers."""
    return hub.iter_rows(path) if hub.is_manifest(path) else iter_rows(path)


def _rows(paths: Sequence[str]) -> Iterator[RawRow]:
    """The raw rows of every file of ``paths`` in order, with a progress bar per file."""
    for path in paths:
        yield from tqdm(iter_input_rows(path), desc=f"ingest {path}", unit="row", mininterval=2,
                        disable=None)


def ingest_files(paths: Sequence[str], *, fmt: str = "auto", columns: Mapping[str, str] | None = None,
                 label_field: str | None = "label", group_field: str | None = "group",
                 keep_fields: Sequence[str] = ()) -> IngestResult:
    """Read and convert every file of ``paths`` in the order given into one in-memory result
    (the stages stream instead: :func:`read_to_part`, :func:`merge_part_files`).

    File-level problems (missing, unsupported, wrong encoding, broken CSV quoting) raise;
    row-level ones are rejects. Every listed file appears in ``counts["files"]``.
    """
    _check_listed(paths)
    res = ingest_rows(_rows(paths), fmt=fmt, columns=columns, label_field=label_field,
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


def read_to_part(path: str, out_dir: str | Path, *, fmt: str = "auto",
                 columns: Mapping[str, str] | None = None, label_field: str | None = "label",
                 group_field: str | None = "group", keep_fields: Sequence[str] = (),
                 file_info: Mapping[str, Any] | None = None) -> IngestCounts:
    """Read input ``path`` and write its part folder as a stream: each row is converted and
    written as it is read, so memory does not grow with the file. ``file_info`` is added to
    the file's entry in ``counts.json`` (e.g. a hub input's pinned revision).

    The folder appears complete or not at all: a file-level error (raised as by
    :func:`~reprotune.data.readers.iter_rows`) leaves any earlier part in place.
    Returns the counts (also in ``counts.json``).
    """
    counts = IngestCounts()
    with io.atomic_dir(out_dir) as tmp:
        with io.open_jsonl(tmp / "records.jsonl") as recs, \
                io.open_jsonl(tmp / "rejected.jsonl") as rejs:
            for record, reject in convert_rows(_rows([path]), counts, fmt=fmt, columns=columns,
                                               label_field=label_field, group_field=group_field,
                                               keep_fields=keep_fields):
                if record is not None:
                    recs.write(record)
                else:
                    rejs.write(reject)
        counts.file(str(path)).update(file_info or {})
        io.write_json(tmp / "counts.json", counts.as_dict())
    return counts


def write_part(out_dir: str | Path, res: IngestResult) -> None:
    """One input's in-memory records, rejects and counts, written as one folder (atomically)."""
    with io.atomic_dir(out_dir) as tmp:
        io.write_jsonl(tmp / "records.jsonl", res.records)
        io.write_jsonl(tmp / "rejected.jsonl", res.rejects)
        io.write_json(tmp / "counts.json", res.counts)


def _checked_part(part: str | Path, path: str) -> Path:
    """The part folder of input ``path``; a missing one names the stage that writes it."""
    part = Path(part)
    if not all((part / f).is_file() for f in PART_FILES):
        raise IngestError(f"{path}: its read part {part} is missing; run `dvc repro` (the read "
                          f"stage of each entry of ingest.inputs writes it)")
    return part


def read_part(part: str | Path, path: str) -> IngestResult:
    """The part of input ``path``, in memory."""
    part = _checked_part(part, path)
    return IngestResult(records=io.read_jsonl(part / "records.jsonl"),
                        rejects=io.read_jsonl(part / "rejected.jsonl"),
                        counts=io.read_json(part / "counts.json"))


def merge_parts(parts: Sequence[IngestResult]) -> IngestResult:
    """One in-memory result from per-file parts, in the order given: records and rejects
    concatenated, counts added (:meth:`IngestCounts.add_counts`)."""
    counts = IngestCounts()
    for p in parts:
        counts.add_counts(p.counts)
    return IngestResult(records=[r for p in parts for r in p.records],
                        rejects=[r for p in parts for r in p.rejects], counts=counts.as_dict())


def merge_part_files(parts_root: str | Path, paths: Sequence[str], out: str | Path,
                     rejected: str | Path,
                     copy_records: Callable[[str, Path, BinaryIO], int] | None = None,
                     ) -> IngestCounts:
    """Merge the parts of ``paths`` (in that order) into ``out`` and ``rejected`` by copying
    their JSONL bytes, chunk by chunk, and adding their counts: memory does not grow with
    the data, and the files are exactly what concatenating the rows would write.
    ``copy_records(input path, part records file, out)``, when given, writes the part's
    records instead of the byte copy and returns how many (``ingest.mixture`` adds each
    input's task: :func:`reprotune.data.mixture.tag_part`).

    A part whose row files disagree with its ``counts.json`` (edited or cut short by hand)
    raises, naming it; both outputs appear complete or not at all.
    """
    parts = [_checked_part(part_dir(parts_root, p), p) for p in paths]
    counts = IngestCounts()
    with io.atomic_path(out) as out_tmp, io.atomic_path(rejected) as rej_tmp, \
            out_tmp.open("wb") as out_fh, rej_tmp.open("wb") as rej_fh:
        for path, part in zip(paths, parts, strict=True):
            c = io.read_json(part / "counts.json")
            got = (copy_records(path, part / "records.jsonl", out_fh) if copy_records
                   else io.append_file(part / "records.jsonl", out_fh),
                   io.append_file(part / "rejected.jsonl", rej_fh))
            if got != (c["kept"], c["rejected_total"]):
                raise IngestError(
                    f"{path}: its read part {part} holds {got[0]} records and {got[1]} rejects "
                    f"but its counts.json says {c['kept']} and {c['rejected_total']}; rerun its "
                    f"read stage (`dvc repro --force` of it)")
            counts.add_counts(c)
    return counts
