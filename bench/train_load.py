"""Loading a big train split: time and peak RSS of the train stage's split loading.

Writes a synthetic split Parquet file of ``--rows`` rows (100-400 token ids each, the first
quarter of every row masked with -100 in ``labels``; zstd, row groups of 50k rows, as the
split stage writes them), then, in a child process, loads and checks it the way the train
stage does, packs it (``train.tokens_per_batch`` 16384) and collates every padded batch of
16 rows once. ``--src`` picks the library tree, so an older checkout measures the old way
(``git archive <commit> src | tar -x -C /tmp/old``): before Arrow loading, that is
``training.read_split`` + ``check_rows`` (Python lists). The child is stopped above
``--cap-gib`` of RSS. Peak RSS is the child's VmHWM, which counts file-backed pages of the
memory-mapped split too; RssAnon/RssFile after each phase say which is which.

    .venv/bin/python bench/train_load.py --rows 100000 [--src /tmp/old/src]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB, POSITIONS, BUDGET, BATCH = 32_000, 512, 16_384, 16


def write_split(path: Path, rows: int, seed: int = 0, chunk: int = 50_000) -> int:
    """The synthetic split; returns its token count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    tokens = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            lengths = rng.integers(100, 401, min(chunk, rows - start))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            ids = rng.integers(5, VOCAB, int(offsets[-1]), dtype=np.int32)
            pos = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
            labels = np.where(pos < np.repeat(lengths // 4, lengths), -100, ids).astype(np.int32)
            writer.write_table(pa.table({
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels))},
                schema=schema))
            tokens += int(offsets[-1])
    return tokens


def _mem() -> dict[str, float]:
    """RSS parts of this process (MiB)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {x.split(":")[0]: round(int(x.split()[1]) / 1024) for x in lines
            if x.startswith(("VmHWM", "RssAnon", "RssFile"))}


def child(path: str) -> None:
    """Load, pack and collate the split with whichever library tree is on sys.path."""
    with contextlib.ExitStack() as stack:
        _child(path, stack)


def _child(path: str, stack: contextlib.ExitStack) -> None:
    from reprotune.train import training
    from reprotune.train.packing import packed_dataset

    out: dict[str, object] = {}
    t0 = time.perf_counter()
    if hasattr(training, "read_split"):  # before: the split as Python lists
        rows = training.read_split(path)
        training.check_rows(rows, path, vocab_size=VOCAB, max_positions=POSITIONS)
        collate = training.PaddingCollator(0)
    else:
        from reprotune.train.data import PaddingCollator, load_split, scratch_dir

        scratch = stack.enter_context(scratch_dir())  # removed when the child is done
        rows = load_split(path, scratch, vocab_size=VOCAB, max_positions=POSITIONS)
        collate = PaddingCollator(0)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out["after_load"] = _mem()
    t0 = time.perf_counter()
    packs = packed_dataset(rows, BUDGET, 42)
    out["pack_s"], out["packs"] = round(time.perf_counter() - t0, 1), len(packs)
    out["after_pack"] = _mem()
    t0 = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        collate([rows[j] for j in range(i, min(i + BATCH, len(rows)))])
    out["collate_epoch_s"] = round(time.perf_counter() - t0, 1)
    out["after_epoch"] = _mem()
    print(json.dumps(out))


def measured(cmd: list[str], env: dict[str, str], cap_mib: float) -> dict[str, object]:
    """Run ``cmd``, stopping it above ``cap_mib`` of RSS; its JSON line, wall time, peak."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    seen = {"peak": 0.0, "stopped": ""}

    def watch() -> None:
        while proc.poll() is None:
            try:
                st = {x.split(":")[0]: int(x.split()[1]) / 1024 for x in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if x.startswith(("VmRSS", "VmHWM"))}
            except OSError:
                return
            seen["peak"] = max(seen["peak"], st.get("VmHWM", 0.0))
            if st.get("VmRSS", 0.0) > cap_mib:
                seen["stopped"] = f"RSS {st['VmRSS']:.0f} MiB > cap"
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, _ = proc.communicate()
    watcher.join()
    res: dict[str, object] = {"wall_s": round(time.perf_counter() - t0, 1),
                              "peak_rss_mib": round(seen["peak"]), "rc": proc.returncode}
    if seen["stopped"]:
        res["stopped"] = seen["stopped"]
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    if lines:
        res.update(json.loads(lines[-1]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--src", default=str(ROOT / "src"), help="library tree to measure")
    ap.add_argument("--cap-gib", type=float, default=7.0)
    ap.add_argument("--work", default=None, help="folder for the split (default: a temp one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="train-load-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"train_{args.rows}.parquet"
    tokens = None
    if not path.exists():
        tokens = write_split(path, args.rows)
    env = {**os.environ, "PYTHONPATH": args.src, "TQDM_DISABLE": "1"}
    res = measured([sys.executable, __file__, "--child", str(path)], env, args.cap_gib * 1024)
    print(json.dumps({"rows": args.rows, "tokens": tokens, "src": args.src,
                      "parquet_mib": round(path.stat().st_size / 2**20), **res}, indent=1))


if __name__ == "__main__":
    main()
