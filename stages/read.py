"""DVC stage `read@<n>`: one file of ingest.inputs -> its canonical records, rejects, counts,
streamed row by row (memory does not grow with the file).

dvc.yaml generates one such stage per entry of `ingest.inputs` (`foreach`), so each depends
on exactly the file it reads. The `ingest` stage merges the parts.
"""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime
from reprotune.data import hub
from reprotune.data.inputs import IngestError, check_files, check_inputs, read_to_part
from reprotune.data.readers import InputFileError
from reprotune.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, help="one entry of ingest.inputs")
    ap.add_argument("--out", required=True, help="the part folder to write")
    args = ap.parse_args()

    log = runtime.setup("read")
    cfg = load_section("ingest")
    io.clean_stale_temporaries(args.out)
    try:
        check_inputs([args.input])
        # a hub manifest: snapshot, subset, split and ingest.columns checked before any row
        source = hub.check(args.input, cfg.columns) if hub.is_manifest(args.input) else None
        # streamed into the part folder, row by row; written even when check_files below
        # fails: rejected.jsonl says what went wrong. A hub input's pinned commit goes into
        # metrics/ingest.json.
        counts = read_to_part(args.input, args.out, fmt=cfg.format, columns=cfg.columns,
                              label_field=cfg.label_field, group_field=cfg.group_field,
                              keep_fields=cfg.keep_fields,
                              file_info={"hub": source.info()} if source is not None else None)
    except (FileNotFoundError, InputFileError, IngestError) as exc:
        sys.exit(f"read: {exc}")
    c = counts.as_dict()
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected"].items() if v) or "none"
    log.info("%s: kept %d of %d rows; rejected %d (%s)", args.input, c["kept"], c["rows_in"],
             c["rejected_total"], reasons)
    for rej in counts.first:
        log.info("  rejected %s:%s %s (%s): %s", rej["source"], rej["line"], rej["reason"],
                 rej["field"], rej["detail"])
    try:
        check_files(counts, [args.input], cfg.min_kept_ratio)
    except IngestError as exc:
        sys.exit(f"read: {exc} (rejected rows: {args.out}/rejected.jsonl)")


if __name__ == "__main__":
    main()
