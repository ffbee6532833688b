"""The train stage's data: split Parquet -> checked, memory-mapped Arrow rows -> padded batches.

:func:`load_split` streams a split Parquet file record batch by record batch, checks every
batch with vectorised numpy over the flattened ``input_ids``/``labels`` list arrays
(:func:`check_rows`; an error names the file and the 1-based row) and writes it to an Arrow
IPC file in a scratch folder (:func:`scratch_dir`). The rows are then read back
memory-mapped (:class:`ArrowSplit`): a row is a pair of zero-copy numpy views into the
mapped buffers, so no split is ever held as Python lists, and only the pages a batch
touches are read. :class:`PaddingCollator` builds each batch's tensors from those views.

A progress bar (tqdm) follows loading when a split has at least :data:`PROGRESS_MIN_ROWS`
rows, on the main process only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io
from reprotune.constants import IGNORE_INDEX
from reprotune.train import distributed
from reprotune.train.methods import TrainSetupError

log = logging.getLogger(__name__)

COLUMNS = ("input_ids", "labels")
BATCH_ROWS = 8192          # rows per record batch read, checked and written
PROGRESS_MIN_ROWS = 20_000  # smaller splits load in about a second: no bar
SCRATCH_KIND = "train"
SCRATCH_PREFIX = f"reprotune-{SCRATCH_KIND}-"  # + pid: io.scratch_prefix


def progress(total: int, desc: str, *, items: Iterable[Any] | None = None) -> Any:
    """A tqdm bar over ``total`` rows (iterating ``items`` if given; else call ``update``),
    shown only for big jobs on the main process."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="row", unit_scale=True, mininterval=2,
                disable=total < PROGRESS_MIN_ROWS or not distributed.is_main())


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temp folder for the memory-mapped splits, removed on exit. Folders that killed runs
    left behind (named after a process id that is gone) are removed first."""
    io.remove_dead_scratch(SCRATCH_KIND)
    with tempfile.TemporaryDirectory(prefix=io.scratch_prefix(SCRATCH_KIND)) as path:
        yield Path(path)


def split_size(path: str | Path) -> int:
    """Rows of a split Parquet file (from its footer), after checking it has the columns."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    missing = set(COLUMNS) - set(meta.schema.to_arrow_schema().names)
    if missing:
        raise TrainSetupError(f"{path}: missing column(s) {sorted(missing)}; rerun the format "
                              f"and split stages")
    return meta.num_rows


def flat(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of an Arrow list array as numpy, offsets rebased to start at 0."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, (offsets - offsets[0]).astype(np.int64)


def _row_problem(ids: np.ndarray, labels: np.ndarray, *, vocab_size: int, max_positions: int,
                 extra_positions: int) -> str | None:
    """What is wrong with one row (the first failed check, in the order below), or None."""
    if len(ids) == 0 or len(ids) != len(labels):
        return (f"input_ids ({len(ids)}) and labels ({len(labels)}) must be non-empty and of "
                f"equal length; rerun the format stage")
    hi, lo = int(ids.max()), int(ids.min())
    if hi >= vocab_size or lo < 0:
        return (f"token id {hi if hi >= vocab_size else lo} outside the model's vocab of "
                f"{vocab_size}; the data was tokenised for another base model (rerun the "
                f"format stage)")
    if bool((labels == IGNORE_INDEX).all()):
        return "no label tokens (every label is -100)"
    if len(ids) + extra_positions > max_positions:
        what = f" + prompt.num_virtual_tokens {extra_positions}" if extra_positions else ""
        return (f"{len(ids)} tokens{what} exceed the model's {max_positions} positions; lower "
                f"format.max_length")
    return None


def _first(mask: np.ndarray) -> int:
    """Index of the first True, or the length (none)."""
    hit = np.flatnonzero(mask)
    return int(hit[0]) if len(hit) else len(mask)


def check_rows(rows: Any, path: str | Path, *, vocab_size: int, max_positions: int,
               extra_positions: int = 0, first_row: int = 1) -> None:
    """Fail on rows the model cannot train on, naming file and row (``first_row`` numbers
    the first row of ``rows``: a record batch, a table or a list of row dicts).

    Each check runs over the whole batch at once; the first row failing any of them is then
    described by :func:`_row_problem`, so the message is the one a row-by-row check gives.
    """
    import pyarrow as pa

    if len(rows) == 0:
        return
    if isinstance(rows, list):
        rows = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.list_(pa.int64()))
                                                            for c in COLUMNS]))
    cols = {}
    for name in COLUMNS:
        col = rows.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if not (pa.types.is_list(col.type) and pa.types.is_integer(col.type.value_type)):
            raise TrainSetupError(f"{path}: {name} is {col.type}, not lists of integer token "
                                  f"ids; rerun the format stage")
        if col.null_count or col.values.null_count:
            raise TrainSetupError(f"{path}: {name} has null entries; rerun the format stage")
        cols[name] = flat(col)
    (ids, ids_off), (labels, lab_off) = cols["input_ids"], cols["labels"]
    n_ids, n_lab = np.diff(ids_off), np.diff(lab_off)
    bad_value = _first((ids >= vocab_size) | (ids < 0))
    labelled = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    firsts = [_first((n_ids == 0) | (n_ids != n_lab)),
              int(np.searchsorted(ids_off, bad_value, side="right")) - 1 if bad_value < len(ids)
              else len(n_ids),
              _first(labelled[lab_off[1:]] - labelled[lab_off[:-1]] == 0),
              _first(n_ids + extra_positions > max_positions)]
    i = min(firsts)
    if i == len(n_ids):
        return
    problem = _row_problem(ids[ids_off[i]:ids_off[i + 1]], labels[lab_off[i]:lab_off[i + 1]],
                           vocab_size=vocab_size, max_positions=max_positions,
                           extra_positions=extra_positions)
    raise TrainSetupError(f"{path}: row {first_row + i}: {problem}")


def check_sizes(n_train: int, n_val: int, batch_size: int, grad_accum: int,
                paths: tuple[str, str] = ("train split", "val split"), processes: int = 1) -> None:
    """The val split must be non-empty and one optimizer step (of every process) must fit in
    the train split."""
    if n_train == 0:
        raise TrainSetupError(f"{paths[0]}: no training rows; check the format and split metrics")
    if n_val == 0:
        raise TrainSetupError(f"{paths[1]}: the val split is empty; raise split.val_ratio (val "
                              f"loss drives evaluation, early stopping and the best checkpoint)")
    if batch_size * grad_accum * processes > n_train:
        procs = f" x train.num_processes {processes}" if processes > 1 else ""
        raise TrainSetupError(
            f"batch_size: {batch_size} x train.grad_accum {grad_accum}{procs} = "
            f"{batch_size * grad_accum * processes} sequences per optimizer step, but the train "
            f"split has only {n_train} rows; use batch_size <= "
            f"{max(1, n_train // (grad_accum * processes))}")


class ArrowSplit:
    """A split's rows, memory-mapped: ``split[i]`` is ``{"input_ids", "labels"}`` as
    read-only numpy views into the mapped Arrow buffers (a map-style torch dataset)."""

    def __init__(self, table: Any, path: str | Path = "") -> None:
        self.table = table  # keeps the memory map alive
        self.path = str(path)  # the mapped Arrow file
        self._chunks = [tuple(flat(c) for c in chunks) for chunks in zip(
            *(table.column(name).chunks for name in COLUMNS), strict=True)]
        sizes = [len(ids_off) - 1 for (_, ids_off), _ in self._chunks]
        self._starts = np.cumsum([0, *sizes])
        self.lengths = (np.concatenate([np.diff(ids_off) for (_, ids_off), _ in self._chunks])
                        if self._chunks else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        (ids, ids_off), (labels, lab_off) = self._chunks[c]
        j = i - int(self._starts[c])
        return {"input_ids": ids[ids_off[j]:ids_off[j + 1]],
                "labels": labels[lab_off[j]:lab_off[j + 1]]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))


def eval_indices(n: int, cap: int) -> np.ndarray:
    """Rows of an ``n``-row val split that evaluation uses (``train.eval_rows``): all of them
    when ``cap`` is 0 or at least ``n``, else ``cap`` rows evenly spaced over the split's
    stored order (row ``i * n // cap``), so a split made of several inputs is sampled from
    each, with no seed, and every evaluation of the run sees the same rows."""
    if cap == 0 or cap >= n:
        return np.arange(n, dtype=np.int64)
    return np.arange(cap, dtype=np.int64) * n // cap


class RowSubset:
    """Some rows of an :class:`ArrowSplit` (a map-style dataset, ``lengths`` like a split's)."""

    def __init__(self, rows: ArrowSplit, indices: np.ndarray) -> None:
        self.rows, self.indices = rows, indices
        self.lengths = rows.lengths[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[int(self.indices[i])]


def eval_subset(rows: ArrowSplit, cap: int) -> ArrowSplit | RowSubset:
    """The val rows evaluation uses (:func:`eval_indices`); the split itself when all."""
    idx = eval_indices(len(rows), cap)
    return rows if len(idx) == len(rows) else RowSubset(rows, idx)


def load_split(path: str | Path, scratch: str | Path, *, vocab_size: int, max_positions: int,
               extra_positions: int = 0) -> ArrowSplit:
    """Check a split Parquet file batch by batch and memory-map it as Arrow (see the module
    docstring); the Arrow copy goes to ``scratch``, which the caller removes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = split_size(path)
    # no pre-buffering: it would hold the whole file's column chunks in memory at once
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    schema = pa.schema([parquet.schema_arrow.field(name) for name in COLUMNS])
    fd, name = tempfile.mkstemp(prefix=f"{Path(path).stem}-", suffix=".arrow", dir=scratch)
    os.close(fd)
    out = Path(name)
    first = 1
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, schema) as writer, \
            progress(n, f"load {Path(path).name}") as bar:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            check_rows(batch, path, vocab_size=vocab_size, max_positions=max_positions,
                       extra_positions=extra_positions, first_row=first)
            writer.write_batch(batch)
            first += batch.num_rows
            bar.update(batch.num_rows)
    split = map_split(out)
    log.info("%s: %d rows, %d tokens, memory-mapped from %s", path, len(split),
             int(split.lengths.sum()), out)
    return split


def map_split(arrow: str | Path) -> ArrowSplit:
    """An Arrow file written by :func:`load_split`, memory-mapped."""
    import pyarrow as pa

    return ArrowSplit(pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all(), arrow)


def load_splits(paths: Sequence[str | Path], scratch: str | Path, **checks: Any) -> list[ArrowSplit]:
    """:func:`load_split` of each path (``checks``: its keyword arguments), once per machine.

    When several ranks share one machine, rank 0 checks and writes the Arrow copies and the
    other ranks map rank 0's files (a mapped file stays readable after rank 0's scratch
    folder goes), so the node holds one copy on disk and in its page cache instead of one
    per rank. A failure on rank 0 is raised on every rank with rank 0's message, at once.
    With one process, or ranks on several machines, each rank loads its own copy.
    """
    if not distributed.shares_node():
        return [load_split(p, scratch, **checks) for p in paths]
    splits: list[ArrowSplit] = []
    outcome: tuple[str, Any] = ("", None)
    if distributed.is_main():
        try:
            splits = [load_split(p, scratch, **checks) for p in paths]
            outcome = ("ok", [s.path for s in splits])
            log.info("the %d ranks on this machine map these copies", distributed.world_size())
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc))
            distributed.broadcast(outcome)
            raise
    outcome = distributed.broadcast(outcome)
    if outcome[0] != "ok":
        err = TrainSetupError if outcome[0] == "TrainSetupError" else RuntimeError
        raise err(outcome[1] if err is TrainSetupError else f"rank 0: {outcome[0]}: {outcome[1]}")
    if distributed.is_main():
        return splits
    return [map_split(f) for f in outcome[1]]


@dataclass
class PaddingCollator:
    """Right-pad a batch: input_ids with ``pad_id``, labels with -100, attention mask 0.

    Rows are dicts of token sequences (numpy views from :class:`ArrowSplit`, or lists).
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(features), n), self.pad_id, dtype=np.int64)
        labels = np.full((len(features), n), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(features), n), dtype=np.int64)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = f["input_ids"]
            labels[i, :k] = f["labels"]
            mask[i, :k] = 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}
