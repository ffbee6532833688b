"""DVC stage `review_wins`: committed human judgments (data/review/) -> win rates.

Per review session (a page written by `make review`) and per reviewer: B's win rate over A
with its 95% bootstrap interval and a verdict, into metrics/review.json, so a pull request
carries human evidence next to BLEU in `dvc metrics diff`.
"""

from __future__ import annotations

import argparse

from reprotune import io, runtime
from reprotune.team.judgments import JudgmentError, review_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="data/review", help="keys and judgments files")
    ap.add_argument("--out", default="metrics/review.json")
    args = ap.parse_args()
    log = runtime.setup("review_wins")
    try:
        metrics = review_metrics(args.dir)
    except JudgmentError as exc:
        raise SystemExit(f"review_wins: {exc}") from None
    io.write_json(args.out, metrics)
    for name, s in metrics["sessions"].items():
        o = s["overall"]
        log.info("%s: B (%s) over A (%s): win rate %s [%s, %s] on %d judged rows (%d skipped) by "
                 "%d reviewers: %s", name, s["b"], s["a"], o["win_rate_b"], o["low"], o["high"],
                 o["n"], o["skipped"], len(s["reviewers"]), o["verdict"])
    if not metrics["sessions"]:
        log.info("%s: no review session yet (`make review` writes one)", args.dir)


if __name__ == "__main__":
    main()
