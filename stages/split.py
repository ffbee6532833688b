"""DVC stage `split`: train/val/test split of the formatted table (seeded or by time) + leakage check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprotune import io, runtime
from reprotune.data.split import SPLITS, SplitError, split_rows
from reprotune.params import load_section


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
    rows = io.read_parquet(args.data)
    try:
        result = split_rows(rows, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                            stratify=cfg.stratify, group=cfg.group, seed=cfg.seed,
                            leakage_threshold=cfg.leakage_threshold, order_by=cfg.order_by,
                            on_leak=cfg.on_leak, progress=sys.stderr.isatty())
    except SplitError as exc:
        if exc.leaks:  # on_leak: fail: the rows to review
            io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                                       "count": len(exc.leaks), "rows": exc.leaks})
        sys.exit(f"split: {exc}")
    import pyarrow.parquet as pq

    schema = pq.read_schema(args.data)  # keep column types even for an empty part
    for name in SPLITS:
        io.write_parquet(Path(args.out_dir) / f"{name}.parquet", result.parts[name], schema=schema)
    io.write_json(args.metrics, result.metrics)
    # every leaking row (ids, split, best match, similarity; text excerpts for the first ones)
    io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                               "count": len(result.leaks), "rows": result.leaks})
    log.info("wrote %s", ", ".join(f"{k}={v}" for k, v in result.metrics["counts"].items()))


if __name__ == "__main__":
    main()
