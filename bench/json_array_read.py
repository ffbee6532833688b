"""Peak RSS and wall time of the read stage on one big ``.json`` array, and whether checkouts
write the same bytes for it.

Writes ``--rows`` alpaca rows (en, zh and mixed text, 1 in 100 with an emoji; pretty-printed
with ``indent=2``, as LLaMA-Factory-style data sets are) as one JSON array, then runs
``stages/read.py`` of each ``--repo`` checkout (default: this one) on it, each in its own
process and scratch folder, with bench/data_scale.py's measurement (VmHWM sampled every
0.1 s, stopped above ``--cap-gib``). With several checkouts (before/after a change), their
part folders are compared byte for byte. Everything generated is deleted at the end.

    .venv/bin/python bench/json_array_read.py --rows 1000000 --repo ../main --repo .
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from data_scale import run_measured  # noqa: E402

EN = ("the model answers each question in a short and friendly way while the data set keeps "
      "every example exactly as written by its author for training").split()
ZH = "我们今天讨论的问题是如何在有限的内存里读取很大的数据文件并且保持每一行的原样不变"
EMOJI = "😀🚀📚"


def _text(rng: random.Random, words: int) -> str:
    """Pseudo-text: English, Chinese, or both; an emoji in 1 row of 100."""
    kind = rng.random()
    if kind < 0.4:
        text = " ".join(rng.choice(EN) for _ in range(words))
    elif kind < 0.8:
        text = "".join(ZH[rng.randrange(len(ZH) - 4):][:4] for _ in range(words // 2)) + "。"
    else:
        text = " ".join(rng.choice(EN) if rng.random() < 0.5 else rng.choice(ZH) * 2
                        for _ in range(words))
    return text + (rng.choice(EMOJI) if rng.random() < 0.01 else "")


def write_array(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` alpaca rows as one pretty-printed JSON array, written as they are made."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(rows):
            row = {"instruction": _text(rng, rng.randint(8, 40)), "input": "",
                   "output": _text(rng, rng.randint(40, 240))}
            fh.write(("  " if i == 0 else ",\n  ")
                     + json.dumps(row, ensure_ascii=False, indent=2).replace("\n", "\n  "))
        fh.write("\n]\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repo", action="append", type=Path,
                    help="a checkout whose stages/read.py and src/ are run (repeatable)")
    ap.add_argument("--cap-gib", type=float, default=8.0, help="stop the stage above this RSS")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    repos = [r.resolve() for r in (args.repo or [ROOT])]
    work = Path(tempfile.mkdtemp(prefix="json-array-read-"))
    try:
        data = work / "bench.json"
        write_array(data, args.rows)
        result = {"rows": args.rows, "file_mib": round(data.stat().st_size / 2**20), "runs": []}
        parts = []
        for n, repo in enumerate(repos):
            cwd = work / f"run{n}"
            (cwd / "data" / "raw").mkdir(parents=True)
            os.link(data, cwd / "data" / "raw" / "bench.json")
            (cwd / "params.yaml").write_text("ingest:\n  inputs: [data/raw/bench.json]\n")
            part = cwd / "data" / "interim" / "read" / "bench"
            cmd = [sys.executable, str(repo / "stages" / "read.py"), "--input",
                   "data/raw/bench.json", "--out", str(part)]
            run = run_measured(cmd, cwd, args.cap_gib * 1024, args.timeout, src=repo / "src")
            result["runs"].append({"repo": str(repo), **run})
            print(json.dumps(result["runs"][-1]), flush=True)
            parts.append(part)
        if len(parts) > 1:
            names = sorted(p.name for p in parts[0].iterdir())
            result["identical_outputs"] = all(
                sorted(p.name for p in other.iterdir()) == names
                and all(filecmp.cmp(parts[0] / f, other / f, shallow=False) for f in names)
                for other in parts[1:])
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
