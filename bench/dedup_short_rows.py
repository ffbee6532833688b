"""Near-duplicates on very short rows: where char n-grams stop separating rows, and what
``dedup.near_min_chars`` does to 200k distinct tiny rows.

1. ``curve``: the median TF-IDF cosine (the dedup stage's own index, role tags included) of a
   2-turn row and the same row with ONE character substituted, per content length (English
   letters and Chinese characters, 40 pairs each, IDF fitted with 5,000 filler rows). Below
   the length where it reaches ``dedup.threshold`` the n-grams cannot find a near copy at all.
2. ``tiny``: 200,000 distinct rows ``user: q<i> / assistant: a<i>`` through
   :func:`reprotune.data.dedup.run_dedup` with the default params and ``near_min_chars`` 0
   (every row compared) and 20 (the default), each in a fresh process: near-duplicate drops
   (every one wrong: the rows are distinct), LSH candidate pairs, wall time, peak RSS.

    .venv/bin/python bench/dedup_short_rows.py --out bench/results/dedup_short_rows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io  # noqa: E402
from reprotune.params import DedupParams  # noqa: E402

LETTERS = list("abcdefghijklmnopqrstuvwxyz     ")
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]


def _rec(i: int | str, q: str, a: str) -> dict:
    return {"id": f"r{i}", "source": "bench", "messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def curve(threshold: float, seed: int = 1) -> dict:
    """Median cosine of a one-character edit, per content length and script."""
    from reprotune.data.similarity import record_text
    from reprotune.data.tfidf import NgramIndex

    rng = np.random.default_rng(seed)

    def rnd(n: int, zh: bool) -> str:
        return "".join(rng.choice(HAN if zh else LETTERS, n))

    texts, pairs, keys = [], [], []
    for zh in (False, True):
        for n in range(4, 64, 2):
            for _ in range(40):
                q, a = rnd(n // 2, zh), rnd(n - n // 2, zh)
                s = list(q + a)
                s[int(rng.integers(0, n))] = str(rng.choice(HAN if zh else LETTERS[:26]))
                edited = "".join(s)
                texts += [record_text(_rec(0, q, a)),
                          record_text(_rec(0, edited[:n // 2], edited[n // 2:]))]
                pairs.append((len(texts) - 2, len(texts) - 1))
                keys.append(("zh" if zh else "en", n))
    for _ in range(5000):
        zh, n = bool(rng.integers(0, 2)), int(rng.integers(4, 200))
        texts.append(record_text(_rec(0, rnd(n // 2, zh), rnd(n - n // 2, zh))))
    index = NgramIndex.build(texts, (2, 4), num_perm=128, progress=False)
    cos = index.cosine(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]),
                       progress=False)
    by: dict[tuple[str, int], list[float]] = defaultdict(list)
    for k, c in zip(keys, cos.tolist(), strict=True):
        by[k].append(c)
    out: dict = {}
    for script in ("en", "zh"):
        med = {n: round(float(np.median(by[(script, n)])), 3) for n in range(4, 64, 2)}
        out[script] = {"median_cosine_by_content_chars": med,
                       "first_length_at_threshold": min((n for n, c in med.items()
                                                         if c >= threshold - 1e-6), default=None)}
    return out


def tiny_once(rows: int, near_min_chars: int) -> dict:
    """One run of the tiny-rows case in this process (called in a fresh one)."""
    from reprotune.data.dedup import run_dedup

    records = [_rec(i, f"q{i}", f"a{i}") for i in range(rows)]
    cfg = DedupParams(near_min_chars=near_min_chars)
    t0 = time.perf_counter()
    res = run_dedup(records, cfg, progress=False)
    wall = time.perf_counter() - t0
    m = res.metrics
    wrong = [d for d in res.dropped if d["reason"] == "near_duplicate"]
    return {"rows": rows, "near_min_chars": near_min_chars, "kept": m["kept"],
            "near_duplicate_drops": m["dropped"]["near_duplicate"],
            "distinct_rows_dropped": len(wrong), "lsh_candidate_pairs": m["lsh_candidate_pairs"],
            "exact_only_rows": m.get("near_dup_exact_only_rows"), "dedup_wall_s": round(wall, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "example_drops": wrong[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--near-min-chars", type=int, nargs="+", default=[0, 20])
    ap.add_argument("--once", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.once is not None:
        print(json.dumps(tiny_once(args.rows, args.once)))
        return
    threshold = DedupParams().threshold
    report = {"command": "python bench/dedup_short_rows.py " + " ".join(sys.argv[1:]),
              "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), load "
                         f"{os.getloadavg()[0]:.1f} at start",
              "threshold": threshold, "one_edit_curve": curve(threshold), "tiny_rows": []}
    for k in args.near_min_chars:
        proc = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--once",
                               str(k)], capture_output=True, text=True, check=True)
        report["tiny_rows"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(report["tiny_rows"][-1])
    for s in ("en", "zh"):
        print(s, "one edit reaches the threshold at", report["one_edit_curve"][s][
            "first_length_at_threshold"], "content characters")
    if args.out:
        io.write_json(args.out, report)


if __name__ == "__main__":
    main()
