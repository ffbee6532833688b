"""Evaluation of packed text rows (``format.mode: text``, continued pretraining).

A packed row holds a stretch of documents, not a question and an answer, so there is
nothing to generate: the model is scored by its perplexity on the test split's rows, every
token (the rows' ``labels`` are their ``input_ids``), with the general-text forgetting check
the stage runs for every model. Per-row records ``{id, n_tokens, nll}`` go to the
predictions file, so two runs can be compared row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reprotune.evaluate.evaluation import _perplexity, _round


def is_packed_text(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether a test split holds packed text rows (no ``messages``, token ids only)."""
    return bool(rows) and all(r.get("messages") is None and r.get("input_ids") is not None
                              for r in rows)


def evaluate_text(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: Any, *,
                  source: str = "test split", progress: bool = True,
                  shard: tuple[int, int] = (0, 1)) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(metrics, records)`` of ``model`` on packed text rows; ``cfg`` is the ``eval``
    section (``max_rows``, ``batch_size``). Rank 0 alone scores (the others return empty)."""
    if shard[0] > 0:
        return {}, []
    rows = list(rows[: cfg.max_rows] if cfg.max_rows else rows)
    ppl = _perplexity(model, tokenizer, rows, cfg.batch_size, source, progress)
    records = [{"id": r.get("id"), "n_tokens": int(t), "nll": _round(float(nll))}
               for r, nll, t in zip(rows, ppl.pop("row_nll"), ppl.pop("row_tokens"), strict=True)]
    out = {**ppl, "n_rows": len(rows), "n_empty_predictions": 0, "n_capped_predictions": 0,
           "capped_share": 0.0, "cap_warning": False}
    out["settings"] = {"mode": "text", "n_rows": len(rows), "max_rows": cfg.max_rows,
                       "max_new_tokens": 0, "max_new_tokens_setting": cfg.max_new_tokens,
                       "batch_size": cfg.batch_size}
    return {k: _round(v) for k, v in out.items()}, records
