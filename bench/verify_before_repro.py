"""Cost of `make repro`'s first step, `python -m reprotune.verify --before-repro`, end to end.

Copies each ``--folders`` entry into a temporary project as ``models/<name>``, writes a
dvc.lock whose entries match them (what dvc.lock holds after a `dvc repro`), and times the
whole command, a fresh Python process as make starts it: interpreter start, dvc.lock parse,
rehashing every byte. Baseline in the same run: the same command on the same dvc.lock with
the folders' entries removed (start-up and lock parse only), so the hashing's share shows.
Warm page cache (each timed run follows a warm-up run); best of ``--repeats``.

    .venv/bin/python bench/verify_before_repro.py --folders /tmp/smol_base:models/base \
        /tmp/smol_base:models/merged --out bench/results/verify_before_repro_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io, verify  # noqa: E402


def _lock(entries: dict[str, str]) -> str:
    lines = ["schema: '2.0'", "stages:"]
    for i, (path, md5) in enumerate(entries.items()):
        lines += [f"  stage{i}:", "    cmd: x", "    outs:", f"    - path: {path}",
                  "      hash: md5", f"      md5: {md5}"]
    return "\n".join(lines) + "\n"


def _timed(project: Path, repeats: int) -> float:
    cmd = [sys.executable, "-m", "reprotune.verify", "--before-repro"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folders", nargs="+", required=True,
                    help="SOURCE:models/NAME pairs (the folder copied to that path)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        entries, size = {}, 0
        for pair in args.folders:
            src, dst = pair.split(":", 1)
            shutil.copytree(src, project / dst)
            entries[dst] = verify.listing_md5(verify.folder_listing(project / dst))
            size += sum(p.stat().st_size for p in (project / dst).rglob("*") if p.is_file())
        (project / "dvc.lock").write_text(_lock(entries))
        seconds = _timed(project, args.repeats)
        (project / "dvc.lock").write_text(_lock({}))
        baseline = _timed(project, args.repeats)
    report = {"what": "make repro's first step (python -m reprotune.verify --before-repro), a "
                      "fresh process, warm page cache, best of repeats",
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "folders": args.folders, "bytes": size, "seconds": round(seconds, 3),
              "baseline_no_folders_seconds": round(baseline, 3),
              "ratio_vs_baseline": round(seconds / baseline, 2),
              # below the noise of process start-up for small folders: not given then
              "hashing_mb_per_s": round(size / 2**20 / (seconds - baseline), 1)
              if seconds > baseline * 1.5 else None,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_1m": round(os.getloadavg()[0], 2)}}
    print(f"{len(entries)} folders, {size / 2**20:.1f} MiB: {seconds:.3f} s (start-up + lock "
          f"parse alone {baseline:.3f} s, x{report['ratio_vs_baseline']}; hashing "
          f"{report['hashing_mb_per_s'] or '-'} MiB/s); load {report['machine']['load_average_1m']}")
    if args.out:
        io.write_json(args.out, report)


if __name__ == "__main__":
    main()
