"""Scale of the data stages: read -> ingest -> dedup -> format -> split at growing row counts.

For each ``--rows`` N: writes N alpaca rows (``data/raw/bench.jsonl``, en/zh/mixed text from
bench/dedup.py's generator, a ``created_at`` time each) with planted near duplicates (light
edits) and exact duplicates (case and whitespace changes), then runs the real stage scripts
(``stages/{read,ingest,dedup,format,split}.py``, each in its own process, in a scratch
folder with its own params.yaml: dedup defaults, ``split.order_by: created_at``) and records
each stage's wall time and peak RSS (its VmHWM). A stage above ``--cap-gib`` of RSS or
``--stage-timeout`` seconds is stopped and reported as such, never left to exhaust the machine.

Then planted-duplicate recall and precision of the dedup stage, and, on the same rows and
threshold, the near-duplicate step two ways, each in its own process: the project's
(:func:`reprotune.data.similarity.find_near_duplicates`, the dedup params) and datasketch's
``MinHashLSH`` with the same banding (``params=(bands, rows)``) over the same character
n-gram sets, its candidates verified with the same TF-IDF cosine. Rows: the quality-passed,
exact-deduplicated texts that the dedup stage's near-duplicate step sees.

    .venv/bin/python bench/data_scale.py --rows 10000 100000 1000000 \\
        --out bench/results/data_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from scale_data import THRESHOLD, generate, score_dedup  # noqa: E402

from reprotune import io  # noqa: E402

PARAMS = """ingest:
  inputs: [data/raw/bench.jsonl]
  keep_fields: [created_at]
split:
  stratify:
  order_by: created_at
"""
STAGES = [
    ("read", ["--input", "data/raw/bench.jsonl", "--out", "data/interim/read/data/raw/bench.jsonl"]),
    ("ingest", ["--parts", "data/interim/read", "--out", "data/interim/ingested.jsonl",
                "--rejected", "data/interim/rejected.jsonl", "--metrics", "metrics/ingest.json"]),
    ("dedup", ["--data", "data/interim/ingested.jsonl", "--out", "data/interim/deduped.jsonl",
               "--dropped", "data/interim/dedup_dropped.jsonl", "--metrics", "metrics/dedup.json",
               "--pairs", "metrics/dedup_pairs.json"]),
    ("split", ["--data", "data/interim/deduped.jsonl", "--out-dir", "data/interim/splits",
               "--metrics", "metrics/split.json", "--leaks", "metrics/split_leakage.json"]),
    ("format", ["--data-dir", "data/interim/splits", "--base", "base",
                "--out-dir", "data/processed",
                "--dropped", "data/interim/format_dropped.jsonl", "--metrics", "metrics/format.json",
                "--plot", "metrics/plots/token_lengths.png"]),
]


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) of a live process; empty once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {x.split(":")[0]: int(x.split()[1]) / 1024 for x in lines
            if x.startswith(("VmRSS", "VmHWM"))}


def _descendants(pid: int) -> list[int]:
    """The live child processes of ``pid``, recursively (a stage's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir()
                    for k in (t / "children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _runs(pid: int, cmd: list[str]) -> bool:
    """Whether ``pid`` has exec'ed ``cmd`` (its /proc/<pid>/cmdline names the script)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1] == cmd[1].encode()


def run_measured(cmd: list[str], cwd: Path, cap_mib: float, timeout: float,
                 src: Path | None = None) -> dict:
    """Run ``cmd``; wall time, peak RSS (MiB), exit code, and why it was stopped.

    Peak RSS is the process's own high-water mark (VmHWM, sampled every 0.1 s), not
    wait4's ru_maxrss, which also counts the parent's pages the child had before exec.
    ``peak_tree_rss_mib`` adds its worker processes: the largest sampled sum of VmRSS over
    the stage and all its descendants (what the machine must hold); the cap applies to it.
    ``src``: the package folder the stage imports (default: this checkout's ``src``).
    """
    env = {**os.environ, "PYTHONPATH": str(src or ROOT / "src"), "TQDM_DISABLE": "1"}
    log = (cwd / "logs").joinpath(Path(cmd[1]).stem + ".log")
    log.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seen = {"peak": 0.0, "tree": 0.0, "stopped": ""}

    def watch() -> None:  # the RSS cap: stop the stage before it exhausts shared memory
        started = False
        while proc.poll() is None:
            if not started:  # before exec, /proc shows the forked bench's own small figures
                started = _runs(proc.pid, cmd)
                if not started:
                    time.sleep(0.005)
                    continue
            st = _status(proc.pid)
            seen["peak"] = max(seen["peak"], st.get("VmHWM", 0.0))
            tree = st.get("VmRSS", 0.0) + sum(_status(k).get("VmRSS", 0.0)
                                              for k in _descendants(proc.pid))
            seen["tree"] = max(seen["tree"], tree)
            if tree > cap_mib or time.perf_counter() - t0 > timeout:
                seen["stopped"] = (f"RSS {tree:.0f} MiB > cap" if tree > cap_mib else "timeout")
                for k in _descendants(proc.pid):  # workers first: they would outlive it
                    try:
                        os.kill(k, 9)
                    except OSError:
                        pass
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc = proc.wait()
    watcher.join()
    # a stage that ends before its first sample (read/ingest of a few rows) has no figure:
    # None, not 0, and never wait4's ru_maxrss (see above)
    # (a sample taken while it exits can read < 1 MiB: also no figure)
    peak = round(seen["peak"]) if seen["peak"] >= 1 else None
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": peak,
            "peak_tree_rss_mib": round(max(seen["tree"], seen["peak"])) if peak else None,
            "rc": rc, **({"stopped": seen["stopped"]} if seen["stopped"] else {})}


def make_base(work: Path) -> None:
    """The embedded tiny base (default shape), its tokenizer trained on 5,000 generated rows."""
    from reprotune.modeling import create_tiny_base
    from reprotune.params import TinyModelParams

    sample = work / "sample.jsonl"
    generate(sample, 5000, seed=99)
    texts = [r["instruction"] + "\n" + r["output"] for r in io.read_jsonl(sample)]
    create_tiny_base(work / "base", texts, TinyModelParams(), seed=0)


def one_size(rows: int, work: Path, args: argparse.Namespace) -> dict:
    """Generate ``rows`` rows, run the five stages and the near-duplicate comparison."""
    d = work / f"rows_{rows}"
    (d / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(PARAMS, encoding="utf-8")
    if not (d / "base").exists():
        (d / "base").symlink_to(work / "base")
    t0 = time.perf_counter()
    truth = generate(d / "data" / "raw" / "bench.jsonl", rows, seed=args.seed)
    out: dict = {"rows": rows, "generate_s": round(time.perf_counter() - t0, 1), "stages": {}}
    cap = args.cap_gib * 1024
    for name, stage_args in STAGES:
        res = run_measured([sys.executable, str(ROOT / "stages" / f"{name}.py"), *stage_args],
                           d, cap, args.stage_timeout)
        out["stages"][name] = res
        print(f"{rows:>9} {name:7s} {res}", flush=True)
        if res["rc"] != 0:
            break
    done = [s for s, r in out["stages"].items() if r["rc"] == 0]
    out["stages_total"] = {"wall_s": round(sum(out["stages"][s]["wall_s"] for s in done), 1),
                           "max_peak_rss_mib": max(out["stages"][s]["peak_rss_mib"] or 0 for s in done),
                           "max_peak_tree_rss_mib": max(out["stages"][s]["peak_tree_rss_mib"] or 0
                                                        for s in done)}
    if "dedup" in done:
        out["dedup_quality"] = score_dedup(d, truth)
        print(f"{rows:>9} dedup quality {out['dedup_quality']}", flush=True)
    if "dedup" in done and rows <= args.datasketch_max_rows:  # the comparison, when it has a rival
        out["near_dup_step"] = {}
        for impl in ("ours", "datasketch"):
            res_file = d / f"near_{impl}.json"
            res = run_measured([sys.executable, str(ROOT / "bench" / "scale_compare.py"), impl,
                                str(d), str(res_file)], d, cap, args.stage_timeout)
            if res["rc"] == 0:
                res.update(io.read_json(res_file))
            out["near_dup_step"][impl] = res
            print(f"{rows:>9} near-dup {impl:10s} {res}", flush=True)
    for name in ("split", "dedup", "format"):
        f = d / "metrics" / f"{name}.json"
        if f.exists():
            out.setdefault("metrics", {})[name] = io.read_json(f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/reprotune_data_scale", help="scratch folder")
    ap.add_argument("--cap-gib", type=float, default=8.0, help="stop a stage above this RSS")
    ap.add_argument("--stage-timeout", type=float, default=3600.0, help="seconds per stage")
    ap.add_argument("--datasketch-max-rows", type=int, default=1_000_000)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base").exists():
        make_base(work)
    results = [one_size(n, work, args) for n in args.rows]
    import datasketch

    report = {"machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                         f"{platform.system()} {platform.release()}",
              "versions": {"python": platform.python_version(), "numpy": np.__version__,
                           "datasketch": datasketch.__version__},
              "command": "python bench/data_scale.py " + " ".join(sys.argv[1:]),
              "threshold": THRESHOLD, "results": results}
    print(json.dumps([{k: r[k] for k in ("rows", "stages", "stages_total")} for r in results]))
    if args.out:
        io.write_json(args.out, report)


if __name__ == "__main__":
    main()
