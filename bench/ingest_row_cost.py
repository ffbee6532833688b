"""CPU cost of reading and converting rows (readers + ingest), for comparing two checkouts.

Builds a JSONL file from the real data in ../shared/data (English alpaca and Chinese
sharegpt rows alternating, each with a float and an int field), then times
``ingest_files`` on it: CPU seconds of this process (``time.process_time``, so other load
on the machine counts less than in wall time), best of ``--repeat``. Run it once per
checkout and compare, e.g.:

    PYTHONPATH=/work/main/src python bench/ingest_row_cost.py --label main
    PYTHONPATH=src python bench/ingest_row_cost.py --label branch --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build(path: Path, rows: int) -> None:
    alpaca = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    zh = [json.loads(line) for line in
          (SHARED / "sharegpt_zh_1K_format.jsonl").read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            r = alpaca[i % len(alpaca)] if i % 2 else zh[i % len(zh)]
            fh.write(json.dumps({**r, "score": i * 0.25, "n": i}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", help="append the result to this JSON file")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"needs the real data in {SHARED}")
    from reprotune.data.inputs import ingest_files

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        build(data, args.rows)
        best = float("inf")
        for _ in range(args.repeat):
            t = time.process_time()
            res = ingest_files([str(data)])
            best = min(best, time.process_time() - t)
        result = {"label": args.label, "rows": args.rows, "kept": res.counts["kept"],
                  "bytes": data.stat().st_size, "cpu_s_best": round(best, 3),
                  "us_per_row": round(best / args.rows * 1e6, 1)}
    print(json.dumps(result))
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(old + [result], indent=2) + "\n")


if __name__ == "__main__":
    main()
