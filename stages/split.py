"""DVC stage `split`: train/val/test split of the formatted table (seeded or by time) + leakage check.

Only the columns the split and the leakage check read become Python rows (id, source,
messages, and the split.stratify / split.group fields and meta when the params use them), read
batch by batch; the token columns stay in Arrow and each split is written by streaming the
formatted table's batches through a row filter, so the stage never holds the
``input_ids``/``labels`` of every row as Python lists (100,000 rows: 5.6 GiB before).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io, runtime
from reprotune.data.split import SPLITS, SplitError, check_fields, split_rows
from reprotune.params import load_section

HEAVY = ("text", "input_ids", "labels")  # never needed to decide the split
BATCH_ROWS = 16_384


def write_parts(src: str, out_dir: str, indices: dict[str, list[int]]) -> None:
    """Each split's rows of ``src``, in input order, as ``<out_dir>/<split>.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    dest = np.full(pf.metadata.num_rows, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        dest[indices[name]] = k
    with contextlib.ExitStack() as stack:
        writers = [pq.ParquetWriter(stack.enter_context(io.atomic_path(Path(out_dir) / f"{n}.parquet")),
                                    pf.schema_arrow, compression="zstd") for n in SPLITS]
        for w in writers:
            stack.callback(w.close)  # closed before atomic_path renames (LIFO)
        start = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            d = dest[start:start + len(table)]
            start += len(table)
            for k, w in enumerate(writers):
                if (d == k).any():
                    w.write_table(table.filter(pa.array(d == k)))


def split_columns(src: str, cfg: Any) -> list[dict[str, Any]]:
    """The rows of ``src`` with only the columns the split reads, built batch by batch."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    names = [c for c in pf.schema_arrow.names if c not in HEAVY]
    check_fields(names, stratify=cfg.stratify, group=cfg.group)
    wanted = {"id", "source", "messages", cfg.stratify, cfg.group}
    if cfg.order_by:
        wanted.add("meta")
    rows: list[dict[str, Any]] = []
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[c for c in names if c in wanted]):
        rows.extend(batch.to_pylist())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/processed/formatted.parquet")
    ap.add_argument("--out-dir", default="data/processed")
    ap.add_argument("--metrics", default="metrics/split.json")
    ap.add_argument("--leaks", default="metrics/split_leakage.json")
    args = ap.parse_args()

    log = runtime.setup("split")
    cfg = load_section("split")
    io.clean_stale_temporaries(args.out_dir, args.metrics, args.leaks)
    try:
        rows = split_columns(args.data, cfg)
        result = split_rows(rows, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                            stratify=cfg.stratify, group=cfg.group, seed=cfg.seed,
                            leakage_threshold=cfg.leakage_threshold, order_by=cfg.order_by,
                            on_leak=cfg.on_leak, progress=sys.stderr.isatty())
    except SplitError as exc:
        if exc.leaks:  # on_leak: fail: the rows to review
            io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                                       "count": len(exc.leaks), "rows": exc.leaks})
        sys.exit(f"split: {exc}")
    del rows
    write_parts(args.data, args.out_dir, result.indices)
    io.write_json(args.metrics, result.metrics)
    # every leaking row (ids, split, best match, similarity; text excerpts for the first ones)
    io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                               "count": len(result.leaks), "rows": result.leaks})
    log.info("wrote %s", ", ".join(f"{k}={v}" for k, v in result.metrics["counts"].items()))


if __name__ == "__main__":
    main()
