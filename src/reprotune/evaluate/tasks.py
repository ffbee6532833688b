"""Per-task evaluation of a data mixture: each task's metrics and paired intervals, beside the
pooled ones.

When the test rows carry a ``task`` (``ingest.mixture.tasks``), :func:`task_metrics` scores
each task's rows with the functions the pooled evaluation uses (sacrebleu BLEU/chrF with the
pooled run's tokenizer, ROUGE, token F1/EM, the label mapping; perplexity as the pooled
``exp(sum NLL / sum tokens)`` over the task's rows), and :func:`task_intervals` runs the
paired bootstrap of :func:`reprotune.evaluate.paired.compare_records` on each task's rows
(same resamples count and seed as the pooled comparison), so a review sees one task gain
while another loses. ROC-AUC stays pooled-only. Without tasks every function returns
``{}`` and no file gains a key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from reprotune.evaluate import metrics as M
from reprotune.evaluate.paired import DIRECTION, compare_records, intervals_file

log = logging.getLogger(__name__)

TASK = "task"  # the field of a test row / prediction record naming its task
DIGITS = 6
# the rows of the per-task tables (reports/eval.md, make report), in this order
TABLE_METRICS = ("bleu", "chrf", "rouge_l", "f1", "accuracy", "perplexity")


def _round(x: Any) -> Any:
    return round(x, DIGITS) + 0.0 if isinstance(x, float) else x


def by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The records of each task, in their order, tasks sorted; {} when none has a task."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get(TASK) is not None:
            out.setdefault(str(r[TASK]), []).append(r)
    return dict(sorted(out.items()))


def task_metrics(rows: Sequence[Mapping[str, Any]], *, tokenize: str, classify: bool
                 ) -> dict[str, dict[str, Any]]:
    """Each task's metrics from its rows' ``prediction``, ``reference``, ``capped``,
    ``label`` and, when every row has them, unrounded ``nll`` / ``n_tokens``:
    ``{task: {bleu, chrf, rouge1, rouge2, rouge_l, f1, em, n_rows, n_empty_predictions,
    n_capped_predictions[, accuracy, macro_f1, n_labelled, n_other][, perplexity, nll,
    ppl_tokens]}}``. ``tokenize`` is the pooled run's resolved BLEU tokenizer."""
    out: dict[str, dict[str, Any]] = {}
    for task, recs in by_task(rows).items():
        preds = [r["prediction"] for r in recs]
        refs = [r["reference"] for r in recs]
        bc, rg, tf = M.bleu_chrf(preds, refs, tokenize), M.rouge(preds, refs), M.token_f1_em(preds, refs)
        m: dict[str, Any] = {"bleu": bc["bleu"], "chrf": bc["chrf"], "rouge1": rg["rouge1"],
                             "rouge2": rg["rouge2"], "rouge_l": rg["rouge_l"], "f1": tf["f1"],
                             "em": tf["em"], "n_rows": len(recs),
                             "n_empty_predictions": sum(not p.strip() for p in preds),
                             "n_capped_predictions": sum(bool(r.get("capped")) for r in recs)}
        labelled = [r for r in recs if r.get("label") is not None]
        if classify and labelled:
            cm = M.classification_metrics([r["prediction"] for r in labelled],
                                          [r["label"] for r in labelled])
            m.update(accuracy=cm["accuracy"], macro_f1=cm["macro_f1"], n_labelled=len(labelled),
                     n_other=cm["n_other"])
        if all(r.get("n_tokens") is not None for r in recs):
            tokens = sum(r["n_tokens"] for r in recs)
            if tokens:
                nll = math.fsum(r["nll"] for r in recs) / tokens
                m.update(perplexity=math.exp(nll), nll=nll, ppl_tokens=tokens)
        out[task] = {k: _round(v) for k, v in m.items()}
    return out


def compare_by_task(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]
                    ) -> dict[str, dict[str, Any]]:
    """Per task, :func:`~reprotune.evaluate.paired.compare_records` of ``b`` against ``a`` on
    the task's rows (those ``b`` gives the task, paired by id with ``a``'s)."""
    out = {}
    for task, recs in by_task(b).items():
        ids = {str(r["id"]) for r in recs}
        out[task] = compare_records([r for r in a if str(r.get("id")) in ids], list(recs))
    return out


def task_intervals(base: Sequence[dict[str, Any]], finetuned: Sequence[dict[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
    """Per task, the paired bootstrap of the fine-tuned (b) against the base (a) predictions
    on the task's shared rows, as :func:`~reprotune.evaluate.paired.intervals_file` writes it."""
    return {t: intervals_file(c) for t, c in compare_by_task(base, finetuned).items()}


def gain_record(gains: Mapping[str, Any], intervals: Mapping[str, Any]
                ) -> dict[str, dict[str, Any]]:
    """eval_gain.json's ``tasks``: per task its ``gain`` (fine-tuned - base, perplexity as
    ``ppl_reduction``) and its paired ``intervals``."""
    return {t: {"gain": gains.get(t, {}), "intervals": intervals.get(t, {})}
            for t in sorted(set(gains) | set(intervals))}


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def report_section(finetuned: Mapping[str, Any], base: Mapping[str, Any],
                   gains: Mapping[str, Any]) -> str:
    """Markdown: one row per task and metric, base, fine-tuned, gain, 95% CI and verdict
    ('' without tasks). ``gains`` is eval_gain.json's ``tasks``."""
    ft_tasks, bs_tasks = finetuned.get("tasks") or {}, base.get("tasks") or {}
    if not ft_tasks:
        return ""
    lines = ["", "## Per task", "",
             "Each task of the mixture scored on its own test rows (the pooled table above "
             "holds them all); the interval is the paired bootstrap on that task's rows.", "",
             "| task | rows | metric | base | fine-tuned | gain | 95% CI of the gain | verdict |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for task, ft in ft_tasks.items():
        bs, g = bs_tasks.get(task, {}), gains.get(task, {})
        for name in TABLE_METRICS:
            if name not in ft:
                continue
            gain = g.get("gain", {}).get("ppl_reduction" if name == "perplexity" else name)
            iv = g.get("intervals", {}).get(name) or {}
            lo, hi = iv.get("low"), iv.get("high")
            if lo is not None and not DIRECTION[name]:  # shown as a reduction, like the gain
                lo, hi = -hi, -lo
            ci = "–" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"
            label = "perplexity (reduction)" if name == "perplexity" else name
            lines.append(f"| {task} | {ft['n_rows']} | {label} | {_num(bs.get(name))} | "
                         f"{_num(ft.get(name))} | {_num(gain)} | {ci} | "
                         f"{iv.get('verdict', '–')} |")
    return "\n".join(lines) + "\n"
