"""DVC stage `ingest`: read ingest.inputs, write canonical records and rejected rows."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime
from reprotune.ingest import IngestError, check_files, check_inputs, ingest_files
from reprotune.params import load_section
from reprotune.readers import InputFileError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/interim/ingested.jsonl")
    ap.add_argument("--rejected", default="data/interim/rejected.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()

    log = runtime.setup("ingest")
    cfg = load_section("ingest")
    io.clean_stale_temporaries(args.out, args.rejected, args.metrics)
    try:
        check_inputs(cfg.inputs)
        res = ingest_files(cfg.inputs, fmt=cfg.format, columns=cfg.columns,
                           label_field=cfg.label_field, group_field=cfg.group_field)
    except (FileNotFoundError, InputFileError, IngestError) as exc:
        sys.exit(f"ingest: {exc}")
    # the rejects are written even when a check below fails: they say what went wrong
    io.write_jsonl(args.rejected, res.rejects)
    c = res.counts
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected"].items() if v) or "none"
    log.info("kept %d of %d rows from %d file(s); rejected %d (%s)", c["kept"], c["rows_in"],
             len(cfg.inputs), c["rejected_total"], reasons)
    for path, b in c["files"].items():
        log.info("  %s: %d rows in, %d kept", path, b["rows_in"], b["kept"])
    for rej in res.rejects[:5]:
        log.info("  rejected %s:%s %s (%s): %s", rej["source"], rej["line"], rej["reason"],
                 rej["field"], rej["detail"])
    try:
        check_files(res, cfg.inputs, cfg.min_kept_ratio)
    except IngestError as exc:
        sys.exit(f"ingest: {exc} (rejected rows: {args.rejected})")
    io.write_jsonl(args.out, res.records)
    io.write_json(args.metrics, res.counts)


if __name__ == "__main__":
    main()
