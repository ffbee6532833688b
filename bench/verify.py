"""Cost of `make verify` / the model stages' rehash step (reprotune.verify).

Times :func:`reprotune.verify.folder_listing` + :func:`listing_md5` (every byte read and
md5-hashed, as the stage step does) on the given model folders and on a generated folder
holding one ``--big-mb`` file, plus the dvc.lock parse the step starts with. Figures are with
the files in the page cache (second read); the first read after a reboot adds the disk's time.

    .venv/bin/python bench/verify.py --folders models/base models/finetuned \
        --out bench/results/verify_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io, verify  # noqa: E402


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def time_folder(folder: Path, repeats: int) -> dict:
    """Best-of-``repeats`` seconds to rehash ``folder`` (after one warm-up read)."""
    verify.listing_md5(verify.folder_listing(folder))
    best = min(_timed(folder) for _ in range(repeats))
    size = _size(folder)
    return {"folder": str(folder), "files": len(verify.folder_listing(folder)),
            "bytes": size, "seconds": round(best, 4), "mb_per_s": round(size / 2**20 / best, 1)}


def _timed(folder: Path) -> float:
    t0 = time.perf_counter()
    verify.listing_md5(verify.folder_listing(folder))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folders", nargs="*", default=["models/base", "models/finetuned"])
    ap.add_argument("--big-mb", type=int, default=1229, help="size of the generated file (MiB)")
    ap.add_argument("--lock", default=str(ROOT / "dvc.lock"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    results = [time_folder(Path(f), args.repeats) for f in args.folders if Path(f).is_dir()]
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        big = Path(tmp) / "model.safetensors"
        block = os.urandom(1 << 20)
        with big.open("wb") as fh:
            for i in range(args.big_mb):
                fh.write(block[i % 997:] + block[:i % 997])
        results.append({**time_folder(Path(tmp), args.repeats), "folder": f"one {args.big_mb} MiB file"})
    t0 = time.perf_counter()
    outs = verify.locked_outputs(verify.read_lock(args.lock))
    lock_s = time.perf_counter() - t0
    report = {"what": "rehash a folder against dvc.lock (reprotune.verify), warm page cache, "
                      "best of repeats",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine(),
                          # the machine is shared: a high load slows md5 (~500 MiB/s unloaded)
                          "load_average_1m": round(os.getloadavg()[0], 2)},
              "folders": results,
              "lock_parse": {"path": args.lock, "outs": len(outs), "seconds": round(lock_s, 4)}}
    for r in results:
        print(f"{r['folder']}: {r['files']} files, {r['bytes'] / 2**20:.1f} MiB, "
              f"{r['seconds']:.3f} s ({r['mb_per_s']} MiB/s)")
    print(f"dvc.lock parse: {lock_s:.3f} s ({len(outs)} outputs)")
    if args.out:
        io.write_json(args.out, report)


if __name__ == "__main__":
    main()
