"""The numbers a reviewer compares across experiments, apart from each stage's full record.

Every stage writes its full record (counts by reason, notes, dtypes, hashes, settings,
per-split and per-method detail) to ``metrics/<stage>.json``: a DVC-cached output, restored
by ``dvc checkout``/``dvc pull`` like a model. What a person compares between runs (losses,
the eval metrics, gains with their intervals and verdicts, sizes, row counts) is a subset of
it, written to ``metrics/scorecard/<stage>.json``: those are the project's DVC metrics, in
git, so ``dvc exp show``, ``dvc metrics diff``, Studio and the VS Code extension show a table
of a few dozen columns instead of several hundred.

A scorecard keeps its record's key names and nesting (``best_val_loss``, ``gain.bleu``,
``intervals.bleu.low``): a name that reads a full record reads the scorecard the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprotune import io

SCORECARD_DIR = "scorecard"  # beside the full records: metrics/scorecard/<stage>.json

# Eval metrics a reviewer compares, when the test set produced them (accuracy for a
# labelled test set, the text metrics for generation). Perplexity on the test answers and on
# the general text no stage trains on (the forgetting check).
_EVAL = ["accuracy", "bleu", "rouge_l", "perplexity", "general_perplexity"]

# dotted keys kept per full-record file name (its stem); absent keys are skipped
KEYS: dict[str, list[str]] = {
    "ingest": ["rows_in", "rejected_total"],
    "dedup": ["kept"],
    "redact": ["rows_masked", "dropped"],
    "split": ["counts.train", "counts.val", "counts.test"],
    "format": ["tokens_out", "truncated"],
    "train": ["best_val_loss", "final_train_loss", "train_steps"],
    "align": ["best_val_loss", "val_accuracy.ratio"],
    "eval": _EVAL,
    "eval_gain": [f"gain.{m}" for m in ("accuracy", "bleu")]
    + [f"intervals.{m}.{k}" for m in ("accuracy", "bleu") for k in ("low", "high", "verdict")]
    + ["forgetting.diff", "forgetting.verdict", "preference.reward_accuracy"],
    "merge": ["size_mb"],
}
# quantize: per method, its size, perplexity change and whether it met the quality gate
QUANTIZE_KEYS = ["size_mb", "ppl_delta_pct", "gate"]


def path_for(record_path: str | Path) -> Path:
    """``metrics/train.json`` -> ``metrics/scorecard/train.json``."""
    record = Path(record_path)
    return record.parent / SCORECARD_DIR / record.name


def lookup(data: dict[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None when a part is missing."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[leaf] = value


def select(stem: str, record: dict[str, Any]) -> dict[str, Any]:
    """The scorecard of a full record named ``<stem>.json``: its compared keys, same nesting."""
    if stem == "quantize":
        keys = [f"{method}.{k}" for method, v in record.items()
                if isinstance(v, dict) and method != "merged" for k in QUANTIZE_KEYS]
    else:
        keys = KEYS.get(stem, [])
    out: dict[str, Any] = {}
    for key in keys:
        value = lookup(record, key)
        if value is not None and not isinstance(value, dict | list):  # leaves only
            _put(out, key, value)
    return out


def write(record_path: str | Path, record: dict[str, Any]) -> Path:
    """Write the scorecard of ``record`` (just written to ``record_path``) beside it."""
    path = path_for(record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(path, select(Path(record_path).stem, record))
    return path
