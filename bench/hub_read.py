"""The `read` stage on a hub dataset vs the same rows as a local Parquet file.

Writes ``--rows`` rows from bench/scale_data.py's generator once as ``data/raw/bench.parquet``
and once as the single train shard of a pinned dataset in an HF-cache-like folder
(``hf/datasets--bench--sft/snapshots/<sha>/data/``, read offline through
``data/raw/bench.hub.yaml``), then runs ``stages/read.py`` on each (``--inputs``), measured
like bench/data_scale.py (wall time, peak RSS, an RSS cap), and checks that both give the
same records but for their ``source``.

    .venv/bin/python bench/hub_read.py --rows 100000 --inputs parquet hub
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from data_scale import run_measured  # noqa: E402
from scale_data import generate  # noqa: E402

from reprotune import io  # noqa: E402

SHA = "5" * 40
INPUTS = {"parquet": "data/raw/bench.parquet", "hub": "data/raw/bench.hub.yaml"}


def write_rows(d: Path, rows: int, seed: int) -> None:
    """The generated rows as a local Parquet file and as a cached hub snapshot (100k-row
    row groups), converted 100k rows at a time."""
    snap = d / "hf/datasets--bench--sft/snapshots" / SHA / "data"
    snap.mkdir(parents=True, exist_ok=True)
    generate(d / "bench.jsonl", rows, seed=seed)
    targets = (d / INPUTS["parquet"], snap / "train-00000-of-00001.parquet")
    writers: list[pq.ParquetWriter] = []
    with open(d / "bench.jsonl", encoding="utf-8") as fh:
        chunk: list[dict] = []
        for n, line in enumerate(fh, 1):
            chunk.append(json.loads(line))
            if len(chunk) == 100_000 or n == rows:
                tbl = pa.Table.from_pylist(chunk)
                writers = writers or [pq.ParquetWriter(t, tbl.schema) for t in targets]
                for w in writers:
                    w.write_table(tbl)
                chunk = []
    for w in writers:
        w.close()
    (d / "bench.jsonl").unlink()
    (d / INPUTS["hub"]).write_text(f'hub: bench/sft\nsplit: train\nrevision: "{SHA}"\n')


def _digest(records: Path) -> str:
    h = hashlib.sha256()
    with open(records, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            r["source"] = r["source"].rsplit(":", 1)[-1]  # the line number only
            h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=["parquet", "hub"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/reprotune_hub_read", help="scratch folder")
    ap.add_argument("--cap-gib", type=float, default=8.0, help="stop the stage above this RSS")
    args = ap.parse_args()
    d = Path(args.work) / f"rows_{args.rows}"
    (d / "data/raw").mkdir(parents=True, exist_ok=True)
    if not (d / INPUTS["hub"]).exists():
        write_rows(d, args.rows, args.seed)
    (d / "params.yaml").write_text("ingest:\n  inputs: [" + ", ".join(INPUTS[i] for i in args.inputs)
                                   + "]\n  keep_fields: [created_at]\n")
    os.environ.update(HF_HUB_CACHE=str(d / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name in args.inputs:
        res = run_measured([sys.executable, str(ROOT / "stages/read.py"), "--input", INPUTS[name],
                            "--out", f"data/interim/read/{INPUTS[name]}"], d, args.cap_gib * 1024, 3600)
        counts = d / f"data/interim/read/{INPUTS[name]}/counts.json"
        rows_in = io.read_json(counts)["rows_in"] if res["rc"] == 0 else None
        print(f"{args.rows:>9} {name:8s} rows_in={rows_in} {res}", flush=True)
    if set(args.inputs) == set(INPUTS):
        a, b = (_digest(d / f"data/interim/read/{INPUTS[n]}/records.jsonl") for n in INPUTS)
        print(f"same records but for the source file: {a == b}")


if __name__ == "__main__":
    main()
