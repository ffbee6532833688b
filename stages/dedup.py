"""DVC stage `dedup`: quality filters, exact and near-duplicate removal, with reasons per row."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime
from reprotune.data.dedup import run_dedup
from reprotune.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/interim/ingested.jsonl")
    ap.add_argument("--out", default="data/interim/deduped.jsonl")
    ap.add_argument("--dropped", default="data/interim/dedup_dropped.jsonl")
    ap.add_argument("--metrics", default="metrics/dedup.json")
    ap.add_argument("--pairs", default="metrics/dedup_pairs.json")
    args = ap.parse_args()

    log = runtime.setup("dedup")
    cfg = load_section("dedup")
    io.clean_stale_temporaries(args.out, args.dropped, args.metrics, args.pairs)
    records = io.read_jsonl(args.data)
    res = run_dedup(records, cfg, progress=sys.stderr.isatty())
    io.write_jsonl(args.out, res.kept)
    io.write_jsonl(args.dropped, res.dropped)
    io.write_json(args.metrics, res.metrics)
    io.write_json(args.pairs, {"threshold": cfg.threshold, "pairs": res.sample_pairs})
    m = res.metrics
    log.info("kept %d of %d rows; dropped %s; %d near-duplicate clusters", m["kept"], m["in"],
             ", ".join(f"{k}={v}" for k, v in m["dropped"].items()), m["near_dup_clusters"])
    if not res.kept:
        sys.exit(f"dedup: no rows kept out of {m['in']} from {args.data}: {m['dropped']}")


if __name__ == "__main__":
    main()
