"""DVC stage `redact`: mask (or drop rows with) PII in every trained text field (脱敏).

Between dedup and split: the split, the tokenizer and every later stage see redacted text
only. Writes the kept rows, the dropped rows (``{id, source, reason, fields}``), a capped
review file of detected spans with their context (it holds the raw values: a DVC output,
never committed to git), the small metrics file (rows and spans per type) and the per-field
report. See docs/data.md "PII redaction" for the types, the policy and the limits.
"""

from __future__ import annotations

import argparse
import logging
import sys

from reprotune import io, runtime, scorecard
from reprotune.data.redact import redact_stream
from reprotune.params import load_section
from reprotune.timing import write_timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/interim/deduped.jsonl")
    ap.add_argument("--out", default="data/interim/redacted.jsonl")
    ap.add_argument("--dropped", default="data/interim/redact_dropped.jsonl")
    ap.add_argument("--review", default="data/interim/redact_review.jsonl")
    ap.add_argument("--metrics", default="metrics/redact.json")
    ap.add_argument("--report", default="reports/redact_fields.json")
    args = ap.parse_args()

    log = runtime.setup("redact")
    for name in ("presidio-analyzer", "presidio-anonymizer"):  # one line per text at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = load_section("redact")
    io.clean_stale_temporaries(args.out, args.dropped, args.review, args.metrics, args.report)
    try:
        with io.open_jsonl(args.out) as kept, io.open_jsonl(args.dropped) as dropped, \
                io.open_jsonl(args.review) as review:
            counts, seconds = redact_stream(io.iter_jsonl(args.data), cfg, kept=kept.write,
                                            dropped=dropped.write, review=review.write,
                                            progress=sys.stderr.isatty())
    except OSError as exc:
        raise SystemExit(f"redact: cannot read {args.data}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a line that is not JSON: io.iter_jsonl names file and line
        raise SystemExit(f"redact: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"redact: {args.data}: a row is not a canonical record (written by "
                         f"dedup): {type(exc).__name__} {exc}") from None
    record = counts.metrics()
    io.write_json(args.metrics, record)
    scorecard.write(args.metrics, record)
    io.write_json(args.report, counts.report(cfg))
    write_timing("redact", {"elapsed_s": round(seconds, 2),  # varies run to run: untracked
                            "rows_per_s": round(counts.rows_in / seconds, 1) if seconds else None})
    log.info("kept %d of %d rows (%d with PII masked); dropped %d; wrote %s",
             counts.kept, counts.rows_in, counts.rows_masked, sum(counts.dropped.values()),
             args.out)
    if not counts.kept:
        sys.exit(f"redact: no rows kept out of {counts.rows_in} from {args.data}: every row "
                 f"holds PII whose redact.policy is drop ({dict(counts.dropped)})")
    io.note_empty(args.dropped, "no row held PII with a drop policy")
    io.note_empty(args.review, "no PII was found")


if __name__ == "__main__":
    main()
