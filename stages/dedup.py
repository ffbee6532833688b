"""DVC stage `dedup`: quality filters, exact and near-duplicate removal, with reasons per row."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime, scorecard
from reprotune.data.dedup import dedup_stream
from reprotune.params import load_section

# processes for the filters and n-gram extraction (the outputs do not depend on the number)
WORKERS = min(4, runtime.usable_cpus())


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
    with io.open_jsonl(args.out) as kept, io.open_jsonl(args.dropped) as dropped:
        # two passes over the input, rows streamed: memory does not hold the records
        m, pairs = dedup_stream(lambda: io.iter_jsonl(args.data), cfg, kept=kept.write,
                                dropped=dropped.write, workers=WORKERS,
                                progress=sys.stderr.isatty())
    io.write_json(args.metrics, m)
    scorecard.write(args.metrics, m)
    io.write_json(args.pairs, {"threshold": cfg.threshold, "pairs": pairs})
    log.info("kept %d of %d rows; dropped %s; %d near-duplicate clusters", m["kept"], m["in"],
             ", ".join(f"{k}={v}" for k, v in m["dropped"].items()), m["near_dup_clusters"])
    if not m["kept"]:
        sys.exit(f"dedup: no rows kept out of {m['in']} from {args.data}: {m['dropped']}")
    io.note_empty(args.dropped, "no row was dropped")


if __name__ == "__main__":
    main()
