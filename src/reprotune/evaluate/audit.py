"""``make audit``: rows to review before they teach the model the wrong thing.

Two reviews of the train split, written to ``reports/audit/`` (not a DVC stage: it reads the
pipeline's outputs and changes none of them):

* ``label_issues.jsonl``: rows with a classification label that an out-of-sample classifier
  (k-fold TF-IDF + logistic regression) finds unlikely, picked by cleanlab's confident
  learning, with the given and the likely label (:mod:`reprotune.data.label_review`);
* ``loss_outliers.jsonl``: the fine-tuned model's loss on each of its own training rows
  (mean NLL per answer token); rows far above the rest (modified z-score > 3.5) are noisy,
  contradictory or unlearnable answers.

It never deletes a row: list the ids to drop in ``split.exclude_ids`` (the split stage then
leaves them out and counts them), e.g. ``dvc exp run -S 'split.exclude_ids=[<id>, ...]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from reprotune import io, runtime
from reprotune.data.label_review import (
    LabelReviewError,
    label_issues,
    prompt_text,
    robust_outliers,
)

log = logging.getLogger(__name__)
EXCERPT = 200  # characters of text shown per row


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT else text[:EXCERPT] + "…"


def _answer(record: dict[str, Any]) -> str:
    messages = record.get("messages")
    if isinstance(messages, str):  # the formatted parquet keeps messages as JSON
        messages = json.loads(messages)
    answers = [m for m in messages or [] if m.get("role") == "assistant"]
    return str(answers[-1].get("content") or "") if answers else ""


def review_labels(records: list[dict[str, Any]], *, folds: int, seed: int
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(suspect rows, summary) for the records that carry a label."""
    labelled = [r for r in records if isinstance(r.get("label"), str) and r["label"]]
    summary: dict[str, Any] = {"rows": len(records), "labelled_rows": len(labelled)}
    if not labelled:
        summary["skipped"] = "no row carries a label"
        return [], summary
    try:
        issues = label_issues([prompt_text(r) for r in labelled], [r["label"] for r in labelled],
                              folds=folds, seed=seed)
    except LabelReviewError as exc:
        summary["skipped"] = str(exc)
        return [], summary
    rows = [{"id": labelled[i["index"]]["id"], "source": labelled[i["index"]].get("source"),
             **{k: v for k, v in i.items() if k != "index"},
             "text": _excerpt(prompt_text(labelled[i["index"]]))} for i in issues]
    summary["suspect_labels"] = len(rows)
    return rows, summary


def review_losses(model_dir: Path, base_dir: Path, formatted: Path, *, batch_size: int
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(outlier rows, summary): the fine-tuned model's loss on each of its training rows."""
    from reprotune.evaluate import metrics as M
    from reprotune.train.loading import load_finetuned

    rows = io.read_parquet(formatted)
    model, tok, _ = load_finetuned(model_dir, base_dir=base_dir)
    ppl = M.corpus_perplexity(model, rows, batch_size, pad_id=tok.pad_token_id or 0,
                              progress=sys.stderr.isatty())
    losses = [nll / n if n else 0.0 for nll, n in zip(ppl["row_nll"], ppl["row_tokens"],
                                                       strict=True)]
    scored = [i for i, n in enumerate(ppl["row_tokens"]) if n]
    picked = robust_outliers([losses[i] for i in scored])
    out = [{"id": rows[scored[j]]["id"], "source": rows[scored[j]].get("source"),
            "loss": round(losses[scored[j]], 4), "answer_tokens": ppl["row_tokens"][scored[j]],
            "answer": _excerpt(_answer(rows[scored[j]]))} for j in picked]
    ordered = sorted(losses[i] for i in scored)
    summary = {"rows": len(rows), "rows_scored": len(scored), "loss_outliers": len(out),
               "median_loss": round(ordered[len(ordered) // 2], 4) if ordered else None,
               "model": str(model_dir)}
    return out, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprotune.evaluate.audit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=Path("data/interim/splits/train.jsonl"))
    ap.add_argument("--formatted", type=Path, default=Path("data/processed/train.parquet"))
    ap.add_argument("--model", type=Path, default=Path("models/finetuned"))
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    ap.add_argument("--out", type=Path, default=Path("reports/audit"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-loss", action="store_true", help="skip the model's per-row losses")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runtime.quiet_third_party()
    if not args.train.is_file():
        print(f"make audit: {args.train} is missing: run `dvc repro split` first", file=sys.stderr)
        return 2
    records = io.read_jsonl(args.train)
    labels, summary = review_labels(records, folds=args.folds, seed=args.seed)
    io.write_jsonl(args.out / "label_issues.jsonl", labels)
    report: dict[str, Any] = {"labels": summary}
    if args.no_loss:
        report["losses"] = {"skipped": "--no-loss"}
    elif not (args.model.is_dir() and args.formatted.is_file()):
        report["losses"] = {"skipped": f"{args.model} or {args.formatted} is missing: "
                                       "run `dvc repro train` first"}
    else:
        outliers, report["losses"] = review_losses(args.model, args.base, args.formatted,
                                                   batch_size=args.batch_size)
        io.write_jsonl(args.out / "loss_outliers.jsonl", outliers)
    io.write_json(args.out / "summary.json", report)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"review {args.out}/label_issues.jsonl and loss_outliers.jsonl; to leave rows out: "
          "dvc exp run -S 'split.exclude_ids=[<id>, ...]' (nothing is deleted by this review)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
