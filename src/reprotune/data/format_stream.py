"""The format stage's data path on Hugging Face ``datasets``: JSONL in, Parquet out, bounded memory.

1. :func:`load_lines`: the lines of each split's JSONL (and their numbers) become an Arrow
   dataset on disk (``Dataset.from_generator``), read back memory-mapped.
2. :func:`render_dataset`: a batched ``map`` over ``data.num_proc`` processes parses each
   line and renders, tokenises and masks it (:class:`~reprotune.data.rendering.Renderer`),
   keeping the full token ids and labels in a second Arrow file.
3. :func:`~reprotune.data.formatting.plan` reads only the small columns (lengths, first
   label position, drop reason) as numpy to resolve ``format.max_length: auto`` (from the
   train split's lengths) and decide each row's fate; the rows are then cut batch by batch
   and written to Parquet in bounded row groups (:func:`write_parquet`), the dropped rows to
   JSONL, all atomically.

The Arrow files live in a temporary folder beside the output (``.<name>.cache.*.tmp``, which
the stage removes, and :func:`reprotune.io.clean_stale_temporaries` after a killed run), never
in the user's ``~/.cache``: a fresh folder per run also means no stale ``datasets`` cache hit.
Rows never depend on ``num_proc``: each row's result depends on that row alone, the shards
are contiguous and concatenated in order, and row groups are cut by row count and bytes.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io
from reprotune.data.formatting import (
    SUMMARY_FIELDS,
    FormatError,
    Plan,
    cut_tables,
    dropped_rows,
    formatted_schema,
    plan,
    rendered_schema,
)
from reprotune.data.rendering import Renderer

log = logging.getLogger(__name__)

MAP_BATCH = 256             # rows per map call (one tokenizer call each)
ROW_GROUP_ROWS = 65_536     # a Parquet row group ends at this many rows ...
ROW_GROUP_BYTES = 128 << 20  # ... or this many bytes of Arrow data, whichever comes first


def _lines(path: str) -> Iterator[dict[str, Any]]:
    """Non-blank lines of a JSONL file with their 1-based numbers (what io.read_jsonl reads)."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield {"lineno": lineno, "line": line}


def load_lines(path: str | Path, cache_dir: str | Path) -> Any:
    """The JSONL file's lines as a memory-mapped ``datasets.Dataset`` cached in ``cache_dir``."""
    from datasets import Dataset, Features, Value

    return Dataset.from_generator(_lines, gen_kwargs={"path": str(path)},
                                  features=Features({"lineno": Value("int64"),
                                                     "line": Value("string")}),
                                  cache_dir=str(cache_dir), fingerprint="format-lines")


def _render_lines(batch: dict[str, list[Any]], render: Renderer, path: str) -> dict[str, list]:
    records = []
    for lineno, line in zip(batch["lineno"], batch["line"], strict=True):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:  # written by the dedup stage: should not happen
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
    return render(records)


def render_dataset(lines: Any, render: Renderer, *, num_proc: int, path: str) -> Any:
    """Every line rendered (:class:`Renderer` columns), by a batched map over ``num_proc``."""
    from datasets import Features

    return lines.map(_render_lines, batched=True, batch_size=MAP_BATCH,
                     num_proc=num_proc if num_proc > 1 else None,
                     fn_kwargs={"render": render, "path": path},
                     remove_columns=lines.column_names,
                     features=Features.from_arrow_schema(rendered_schema(render.tasks)),
                     new_fingerprint=f"format-render-{num_proc}", desc="format: tokenise")


def _batches(ds: Any) -> Any:
    """A reader of ``ds``'s columns, batch by batch, in row order.

    It reads the map's Arrow files as streams rather than through the memory map that
    ``datasets`` keeps: every page of a mapped file that was read counts in the process's
    resident memory until the kernel needs it back, which for a million rows' token ids
    would be gigabytes of "RSS" that is only page cache. Read this way, only the batch at
    hand is resident.
    """
    import pyarrow as pa

    files = [f["filename"] for f in ds.cache_files]
    if ds._indices is not None or not files:  # not the plain concatenation of map outputs
        raise RuntimeError("format: expected the map's output files, got a view")

    def read(columns: Sequence[str]) -> Iterator[Any]:
        n = 0
        for name in files:
            with pa.OSFile(name) as src:
                for batch in pa.ipc.open_stream(src):
                    n += batch.num_rows
                    yield pa.Table.from_batches([batch]).select(list(columns))
        if n != ds.num_rows:
            raise RuntimeError(f"format: read {n} rows of {ds.num_rows} from {files}")
    return read


def write_parquet(path: str | Path, tables: Iterator[Any], schema: Any) -> int:
    """Write ``tables`` to Parquet (zstd) atomically; returns the rows written.

    A row group ends at ``ROW_GROUP_ROWS`` rows, or after the incoming table (one map batch,
    ``MAP_BATCH`` rows) that brings it to ``ROW_GROUP_BYTES``, so memory stays bounded
    whatever the row lengths; the layout depends on the data only, never on ``num_proc``.

    A file of one row group has the bytes of ``pyarrow.parquet.write_table`` on the same rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, pending, rows, size = 0, [], 0, 0
    with io.atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for t in tables:
            while t.num_rows:
                part = t.slice(0, ROW_GROUP_ROWS - rows)
                t = t.slice(part.num_rows)
                pending.append(part)
                rows, size = rows + part.num_rows, size + part.nbytes
                if rows >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                    w.write_table(pa.concat_tables(pending).combine_chunks())
                    n, pending, rows, size = n + rows, [], 0, 0
        if pending:
            w.write_table(pa.concat_tables(pending).combine_chunks())
            n += rows
    return n


def _render_file(data: str | Path, render: Renderer, cache: Path, num_proc: int) -> tuple[Any, Any]:
    """``data`` rendered as a dataset in ``cache`` (None when it has no rows) and its
    SUMMARY_FIELDS columns as a small in-memory table."""
    import pyarrow as pa

    summary = rendered_schema().empty_table().select(SUMMARY_FIELDS)
    if next(_lines(str(data)), None) is None:  # datasets refuses an empty file
        return None, summary
    lines = load_lines(data, cache)
    log.info("%s: %d rows; rendering with num_proc=%d (Arrow cache in %s)", data,
             lines.num_rows, num_proc, cache)
    ds = render_dataset(lines, render, num_proc=num_proc, path=str(data))
    del lines
    # the small columns, copied out of their batches (a selected column alone would keep
    # its whole batch, token ids included, alive)
    return ds, pa.concat_tables([summary] + [t.take(np.arange(t.num_rows))
                                             for t in _batches(ds)(SUMMARY_FIELDS)])


def format_splits(datas: Mapping[str, str | Path], tokenizer: Any, *,
                  outs: Mapping[str, str | Path], dropped: str | Path, max_length: int | str,
                  enable_thinking: bool, model_limit: int | None, warn_truncated: float,
                  num_proc: int, limit_from: str = "train", progress: bool = True,
                  train_reasoning: bool = True, tasks: bool = False) -> dict[str, Plan]:
    """Format each split's canonical JSONL (``datas``) into its Parquet file (``outs``).

    ``format.max_length: auto`` is resolved from the ``limit_from`` split's lengths alone
    (train: held-out rows never shape the inputs) and applied to every split. Every dropped
    row goes to ``dropped`` (JSONL) with its ``split``. Returns each split's
    :class:`~reprotune.data.formatting.Plan` (``stats`` complete, ``lengths`` for the plot).
    Raises :class:`~reprotune.data.formatting.FormatError`, naming the split, before writing
    anything when the limit leaves most of a split's rows without labels, or when a split
    that had rows (and ``limit_from`` in any case) keeps none. ``tasks``: the rows carry a
    mixture's ``task``, written as a column of the Parquet files.
    """
    from datasets.utils import logging as ds_logging

    first = Path(next(iter(outs.values())))
    first.parent.mkdir(parents=True, exist_ok=True)
    render = Renderer.create(tokenizer, enable_thinking=enable_thinking,
                             train_reasoning=train_reasoning, tasks=tasks)
    shown = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if progress else ds_logging.disable_progress_bar)()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{first.name}.cache.", suffix=".tmp",
                                         dir=first.parent) as cache:
            rendered = {name: _render_file(path, render, Path(cache) / name, num_proc)
                        for name, path in datas.items()}
            plans: dict[str, Plan] = {}
            # limit_from first: its plan resolves the limit every other split is cut to
            for name in sorted(rendered, key=lambda n: n != limit_from):
                setting = max_length if name == limit_from else plans[limit_from].limit
                try:
                    p = plan(rendered[name][1], max_length=setting,
                             enable_thinking=enable_thinking, model_limit=model_limit,
                             warn_truncated=warn_truncated, train_reasoning=train_reasoning)
                except FormatError as exc:
                    hint = (f" (auto is the p99 of the {limit_from} split's lengths, {setting}; "
                            f"this split's prompts are longer: set format.max_length to a "
                            f"number that fits them)" if max_length == "auto"
                            and name != limit_from else "")
                    raise FormatError(f"{name} split: {exc}{hint}") from None
                p.stats["max_length_setting"] = max_length
                if not p.stats["rows_out"] and (p.stats["rows_in"] or name == limit_from):
                    raise FormatError(f"{datas[name]}: no {name} rows left after formatting: "
                                      f"{p.stats['dropped']}")
                plans[name] = p
            plans = {name: plans[name] for name in rendered}  # back in the splits' order
            io.write_jsonl(dropped, ({**row, "split": name} for name, p in plans.items()
                                     for row in dropped_rows(p)))
            for name, (ds, _) in rendered.items():
                tables = (cut_tables(_batches(ds), plans[name], tasks) if ds is not None
                          else iter(()))
                write_parquet(outs[name], tables, formatted_schema(tasks))
            del rendered, ds  # release the memory maps before the folder goes
    finally:
        (ds_logging.enable_progress_bar if shown else ds_logging.disable_progress_bar)()
    return plans
