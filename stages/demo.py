"""DVC stage `demo`: write the seeded bilingual demo data set (with planted defects);
`demo.kind: assistant` adds self-cognition rows for a pretrained model."""

from __future__ import annotations

import argparse

from reprotune import io, runtime
from reprotune.data.demo import generate_demo_with_stats
from reprotune.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/raw/demo.jsonl")
    ap.add_argument("--metrics", default="metrics/demo.json")
    args = ap.parse_args()

    log = runtime.setup("demo")
    cfg = load_section("demo")
    io.clean_stale_temporaries(args.out, args.metrics)
    lines, stats = generate_demo_with_stats(cfg.rows, cfg.seed, cfg.kind)
    # Lines are written verbatim: a few are deliberately not valid JSON.
    with io.atomic_path(args.out) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(line + "\n" for line in lines)
    io.write_json(args.metrics, stats)
    log.info("wrote %d lines to %s (tasks: %s; planted: %s)", len(lines), args.out,
             ", ".join(f"{k}={v}" for k, v in stats["tasks"].items()),
             ", ".join(f"{k}={v}" for k, v in stats["defects"].items()))


if __name__ == "__main__":
    main()
