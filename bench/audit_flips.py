"""How many planted label flips the label review (make audit) finds.

The embedded demo (``demo.kind: tiny``, ``--rows`` rows) carries sentiment rows with a
``label`` (positive / negative, English and Chinese). A seeded ``--flip`` share of them gets
the other label; the review (k-fold TF-IDF + logistic regression, cleanlab's confident
learning: ``reprotune.data.label_review``) ranks suspect rows. Reported: the share of flipped
rows among the top-k (k = number flipped), recall and precision of everything cleanlab
flags, per seed, with the command.

    python bench/audit_flips.py --out bench/results/audit_label_flips.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprotune import io  # noqa: E402
from reprotune.data.demo import generate_demo_with_stats  # noqa: E402
from reprotune.data.label_review import label_issues  # noqa: E402


def labelled_rows(rows: int, seed: int) -> list[dict[str, Any]]:
    """The demo's parseable rows that carry a label, with their prompt text."""
    lines, _ = generate_demo_with_stats(rows, seed, "tiny")
    out = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the demo's planted bad lines
        if isinstance(row, dict) and isinstance(row.get("label"), str):
            out.append({"text": f"{row.get('instruction', '')}\n{row.get('input', '')}",
                        "label": row["label"]})
    return out


def one_seed(rows: list[dict[str, Any]], flip: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    labels = [r["label"] for r in rows]
    classes = sorted(set(labels))
    flipped = sorted(rng.sample(range(len(rows)), max(1, round(flip * len(rows)))))
    for i in flipped:
        labels[i] = next(c for c in classes if c != labels[i])
    issues = [x["index"] for x in label_issues([r["text"] for r in rows], labels, seed=seed)]
    k, planted = len(flipped), set(flipped)
    found = planted & set(issues)
    return {"seed": seed, "rows": len(rows), "flipped": k,
            "top_k_share": round(len(planted & set(issues[:k])) / k, 4),
            "flagged": len(issues), "recall": round(len(found) / k, 4),
            "precision": round(len(found) / len(issues), 4) if issues else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="demo rows generated")
    ap.add_argument("--flip", type=float, default=0.05, help="share of labels flipped")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = labelled_rows(args.rows, 0)
    runs = [one_seed(rows, args.flip, s) for s in range(args.seeds)]
    report = {"command": "python bench/audit_flips.py " + shlex.join(
                  argv if argv is not None else sys.argv[1:]),
              "labelled_rows": len(rows), "flip_share": args.flip,
              "mean_top_k_share": round(statistics.mean(r["top_k_share"] for r in runs), 4),
              "mean_recall": round(statistics.mean(r["recall"] for r in runs), 4),
              "mean_precision": round(statistics.mean(r["precision"] or 0 for r in runs), 4),
              "runs": runs}
    print(json.dumps(report, indent=1))
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
