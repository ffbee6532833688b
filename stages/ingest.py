"""DVC stage `ingest`: merge the per-file parts of ingest.inputs into the canonical records,
the rejected rows and metrics/ingest.json (in the order of ingest.inputs)."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime, scorecard
from reprotune.data import mixture
from reprotune.data.inputs import IngestError, check_inputs, merge_part_files
from reprotune.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="data/interim/read", help="where the read stages write")
    ap.add_argument("--out", default="data/interim/ingested.jsonl")
    ap.add_argument("--rejected", default="data/interim/rejected.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()

    log = runtime.setup("ingest")
    cfg = load_section("ingest")
    io.clean_stale_temporaries(args.out, args.rejected, args.metrics)
    try:
        check_inputs(cfg.inputs)
        # the parts' rows are copied as bytes, in the order of ingest.inputs; counts added;
        # with ingest.mixture.tasks each record gets its input's task
        tasks = cfg.mixture.tasks
        task_of = mixture.input_tasks(tasks)
        counts = merge_part_files(
            args.parts, cfg.inputs, args.out, args.rejected,
            copy_records=(lambda path, src, fh: mixture.tag_part(src, fh, task_of[path]))
            if tasks else None)
        c = counts.as_dict()
        if tasks:  # no tasks: metrics/ingest.json as before
            c["tasks"] = mixture.task_counts(c["files"], tasks)
            mixture.check_task_rows(c["tasks"])
    except (IngestError, mixture.MixtureError) as exc:
        sys.exit(f"ingest: {exc}")
    io.write_json(args.metrics, c)
    scorecard.write(args.metrics, c)
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected"].items() if v) or "none"
    log.info("kept %d of %d rows from %d file(s); rejected %d (%s)", c["kept"], c["rows_in"],
             len(cfg.inputs), c["rejected_total"], reasons)
    for path, b in c["files"].items():
        log.info("  %s: %d rows in, %d kept", path, b["rows_in"], b["kept"])
    for name, t in c.get("tasks", {}).items():
        log.info("  task %s: %d rows in, %d kept", name, t["rows_in"], t["kept"])
    if c["kept"] == 0:  # every file passed its own check, so this is only reachable by hand
        sys.exit(f"ingest: no rows kept out of {c['rows_in']}; see {args.rejected}")
    io.note_empty(args.rejected, "no row was rejected")


if __name__ == "__main__":
    main()
