"""The forgetting check: perplexity on general text that no stage trains on.

Fine-tuning on a narrow data set can make a pretrained model worse at everything else
(catastrophic forgetting). ``eval.general_text`` names a JSONL file of ``{"text": ...}`` rows
(the project ships ``data/reference/general_text.jsonl``: 40 English and 20 Chinese
encyclopedic paragraphs written for this check, in no split of any data set). ``eval_base``
and ``evaluate`` score the same rows under teacher forcing, plain text without a chat
template, and keep each row's summed NLL and token count; the fine-tuned run's perplexity is
compared with the base's by the same paired bootstrap as every other metric
(:mod:`reprotune.evaluate.significance`). A ``worse`` verdict means measurable forgetting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reprotune.evaluate import metrics as M
from reprotune.evaluate import significance as S

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # a general-text row longer than this is scored on its first 512 tokens


class GeneralTextError(ValueError):
    """The general-text file cannot be used (names file, line and the fix)."""


def load_general_text(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"text", ...}`` of a JSONL file; a bad line stops with file, line and fix."""
    path = Path(path)
    if not path.is_file():
        raise GeneralTextError(f"eval.general_text: {str(path)!r}: no such file (relative to the "
                               f"repository root); the project ships data/reference/general_text.jsonl")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GeneralTextError(f"{path}:{n}: not JSON ({exc.msg}); eval.general_text "
                                       f"must be JSONL with one {{\"text\": ...}} per line") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                    or not row["text"].strip():
                raise GeneralTextError(f"{path}:{n}: field 'text' missing or empty; each line "
                                       f"of eval.general_text needs a non-empty \"text\" string")
            rows.append(row)
    if not rows:
        raise GeneralTextError(f"{path}: no rows; eval.general_text needs general text to "
                               f"measure forgetting on")
    return rows


def score_general_text(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                       batch_size: int, *, progress: bool = True
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-row records) of ``model`` on the general text, every token scored.

    Records are ``{id, lang, n_tokens, nll}`` in row order (``nll`` summed in nats), what
    :func:`compare_general` pairs. The text is tokenised as it is (no template, no added
    special tokens), so base and fine-tuned models see the same ids.
    """
    encoded = []
    for row in rows:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        encoded.append({"input_ids": ids, "labels": list(ids)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ppl = M.corpus_perplexity(model, encoded, batch_size, pad_id=pad, progress=progress)
    records = [{"id": i, "lang": row.get("lang"), "n_tokens": int(t), "nll": round(float(nll), 6)}
               for i, (row, nll, t) in enumerate(zip(rows, ppl["row_nll"], ppl["row_tokens"],
                                                     strict=True))]
    metrics = {"perplexity": round(float(ppl["perplexity"]), 6), "rows": len(rows),
               "tokens": int(ppl["n_tokens"])}
    return metrics, records


def compare_general(base: Sequence[dict[str, Any]], finetuned: Sequence[dict[str, Any]],
                    *, resamples: int = S.N_RESAMPLES, seed: int = S.SEED) -> dict[str, Any]:
    """Fine-tuned vs base perplexity on the general text: ``{base, finetuned, diff, low, high,
    verdict, rows}`` (``diff`` = fine-tuned - base; lower is better, so ``worse`` = forgetting).

    The rows must be the same rows (same ids and token counts): a changed file or tokenizer
    is refused rather than compared."""
    if [(r["id"], r["n_tokens"]) for r in base] != [(r["id"], r["n_tokens"]) for r in finetuned]:
        raise GeneralTextError("the base and fine-tuned general-text records differ in rows or "
                               "token counts (eval.general_text changed?): rerun eval_base")
    idx = S.resample_indices(len(base), resamples, seed)
    a, b, ra, rb = S.paired_ratio([r["nll"] for r in base], [r["n_tokens"] for r in base],
                                  [r["nll"] for r in finetuned], [r["n_tokens"] for r in finetuned],
                                  idx, transform=np.exp)
    m = S.summarize(a, b, rb - ra, len(base), higher_is_better=False)
    return {"base": m["a"], "finetuned": m["b"], "diff": m["diff"], "low": m["low"],
            "high": m["high"], "verdict": m["verdict"], "rows": len(base)}


def report_section(forgetting: dict[str, Any]) -> str:
    """Markdown for reports/eval.md."""
    return (f"\n## Forgetting check\n\nPerplexity on {forgetting['rows']} rows of general text "
            f"no stage trained on (`eval.general_text`): base {forgetting['base']}, fine-tuned "
            f"{forgetting['finetuned']}, change {forgetting['diff']:+} [{forgetting['low']}, "
            f"{forgetting['high']}] (95% paired bootstrap): **{forgetting['verdict']}** "
            f"(lower is better; `worse` means the model forgot some general language).\n")
