"""DVC stage `ingest`: read ingest.inputs, write canonical records and rejected rows."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime
from reprotune.ingest import ingest_files
from reprotune.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/interim/ingested.jsonl")
    ap.add_argument("--rejected", default="data/interim/rejected.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()

    log = runtime.setup("ingest")
    cfg = load_section("ingest")
    try:
        res = ingest_files(cfg.inputs, fmt=cfg.format, columns=cfg.columns,
                           label_field=cfg.label_field, group_field=cfg.group_field)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"ingest: {exc}")
    io.write_jsonl(args.out, res.records)
    io.write_jsonl(args.rejected, res.rejects)
    io.write_json(args.metrics, res.counts)
    c = res.counts
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected"].items() if v) or "none"
    log.info("kept %d of %d rows from %d file(s); rejected %d (%s)", c["kept"], c["rows_in"],
             len(cfg.inputs), c["rejected_total"], reasons)
    for rej in res.rejects[:5]:
        log.info("  rejected %s:%s %s (%s): %s", rej["source"], rej["line"], rej["reason"],
                 rej["field"], rej["detail"])
    if c["kept"] == 0:
        sys.exit(f"ingest: no rows kept out of {c['rows_in']} from {', '.join(cfg.inputs)}; "
                 f"see {args.rejected} for the reasons (check ingest.format / ingest.columns)")


if __name__ == "__main__":
    main()
