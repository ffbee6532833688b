"""The evaluation report (Markdown) and the confusion-matrix plot.

The report shows base vs fine-tuned vs gain, the settings the numbers were taken with, the
best and worst examples by sentence score, and (classification) the confusion matrix.
Everything is sorted deterministically so identical results give identical bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.evaluate.significance import MIN_ROWS

log = logging.getLogger(__name__)

ROWS = (("bleu", "BLEU (0-100)"), ("chrf", "chrF (0-100)"), ("rouge1", "ROUGE-1 F"),
        ("rouge2", "ROUGE-2 F"), ("rouge_l", "ROUGE-L F"), ("f1", "token F1"),
        ("em", "exact match"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
        ("auc", "ROC-AUC"))
MAX_CELL = 300
# Fonts with CJK glyphs, tried in order; matplotlib's bundled DejaVu has none.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC",
             "Hiragino Sans GB", "Arial Unicode MS")


def _cell(text: Any) -> str:
    """Markdown-table-safe text: pipes escaped, newlines as <br>, long text shortened."""
    s = "" if text is None else str(text)
    if len(s) > MAX_CELL:
        s = s[:MAX_CELL] + " …"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "∅"


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def sentence_score(rec: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key of one prediction record: sentence BLEU, then ROUGE-L, then token F1."""
    return (rec.get("bleu") or 0.0, rec.get("rouge_l") or 0.0, rec.get("f1") or 0.0)


def pick_examples(records: Sequence[dict[str, Any]], n: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(best n, worst n) records by :func:`sentence_score`, ties broken by id; a record is
    never in both lists (with fewer than 2n records, "worst" gets the rest)."""
    best = sorted(records, key=lambda r: (tuple(-x for x in sentence_score(r)), str(r["id"])))[:n]
    chosen = {id(r) for r in best}
    rest = [r for r in records if id(r) not in chosen]
    return best, sorted(rest, key=lambda r: (sentence_score(r), str(r["id"])))[:n]


def _interval(m: dict[str, Any] | None, flip: bool = False) -> tuple[str, str]:
    """(95% CI cell, verdict cell) of one paired-comparison record; ``flip`` negates the
    interval (perplexity is shown as a reduction)."""
    if not m or m.get("low") is None:
        return "–", (m or {}).get("verdict", "–")
    lo, hi = (-m["high"], -m["low"]) if flip else (m["low"], m["high"])
    return f"[{lo:+.4f}, {hi:+.4f}]", m["verdict"]


def headline_table(comparison: dict[str, Any]) -> list[str]:
    ft, bs, gain = comparison["finetuned"], comparison.get("base", {}), comparison.get("gain", {})
    paired = (comparison.get("paired") or {}).get("metrics")
    if paired is None:
        lines = ["| metric | base | fine-tuned | gain |", "|---|---:|---:|---:|"]
    else:
        lines = ["| metric | base | fine-tuned | gain | 95% CI of the gain | verdict |",
                 "|---|---:|---:|---:|---:|---|"]

    def extra(key: str, flip: bool = False) -> str:
        return "" if paired is None else " {} | {} |".format(*_interval(paired.get(key), flip))

    for key, name in ROWS:
        if key in ft or key in bs:
            lines.append(f"| {name} | {_num(bs.get(key))} | {_num(ft.get(key))} | "
                         f"{_num(gain.get(key))} |" + extra(key))
    if "perplexity" in ft or "perplexity" in bs:
        lines.append(f"| perplexity (lower is better) | {_num(bs.get('perplexity'))} | "
                     f"{_num(ft.get('perplexity'))} | {_num(gain.get('ppl_reduction'))} "
                     f"(reduction) |" + extra("perplexity", flip=True))
    return lines


def _examples_table(title: str, recs: Sequence[dict[str, Any]],
                    base_by_id: dict[str, dict[str, Any]] | None) -> list[str]:
    lines = [f"### {title}", ""]
    if not recs:
        return [*lines, "(none)", ""]
    head = "| id | prompt | reference | fine-tuned | BLEU | ROUGE-L |"
    sep = "|---|---|---|---|---:|---:|"
    if base_by_id is not None:
        head, sep = head + " base |", sep + "---|"
    lines += [head, sep]
    for r in recs:
        row = (f"| {_cell(str(r['id'])[:12])} | {_cell(r['prompt'])} | {_cell(r['reference'])} | "
               f"{_cell(r['prediction'])} | {_num(r.get('bleu'))} | {_num(r.get('rouge_l'))} |")
        if base_by_id is not None:
            row += f" {_cell(base_by_id.get(r['id'], {}).get('prediction'))} |"
        lines.append(row)
    return [*lines, ""]


def confusion_table(confusion: dict[str, Any]) -> list[str]:
    cols = confusion["columns"]
    lines = ["| gold \\ predicted | " + " | ".join(_cell(c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for lab, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        lines.append(f"| {_cell(lab)} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def render_report(comparison: dict[str, Any], settings: dict[str, Any],
                  predictions: Sequence[dict[str, Any]], *, examples: int,
                  confusion: dict[str, Any] | None = None, confusion_png: str | None = None,
                  base_predictions: Sequence[dict[str, Any]] | None = None) -> str:
    """The Markdown report. ``confusion_png`` is a path relative to the report's folder."""
    ft = comparison["finetuned"]
    lines = ["# Evaluation report", "",
             f"Test rows: {ft.get('n_rows')}; empty fine-tuned predictions: "
             f"{ft.get('n_empty_predictions')}. Gain = fine-tuned − base "
             f"(perplexity: base − fine-tuned), so positive is better.", "",
             *headline_table(comparison), ""]
    paired = comparison.get("paired")
    if paired:
        lines += [f"Intervals: 95% paired bootstrap over the {paired['n_shared']} rows both "
                  f"runs answered ({paired['resamples']} resamples, seed {paired['seed']}; "
                  f"BLEU/chrF resample sacrebleu's sufficient statistics). A verdict needs at "
                  f"least {MIN_ROWS} rows.", ""]
    if comparison.get("settings_mismatch"):
        lines += [f"**Warning**: base and fine-tuned were evaluated with different "
                  f"{', '.join(comparison['settings_mismatch'])}; the gain is not like for like.",
                  ""]
    lines += ["## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in sorted(settings.items())]
    lines.append("")
    if confusion is not None:
        lines += ["## Classification", "",
                  f"Scored on {ft.get('n_labelled')} labelled rows; {ft.get('n_other')} "
                  f"predictions matched no label (`<other>`).", "", *confusion_table(confusion), ""]
        if confusion_png:
            lines += [f"![confusion matrix]({confusion_png})", ""]
    base_by_id = ({str(r["id"]): r for r in base_predictions}
                  if base_predictions is not None else None)
    best, worst = pick_examples(predictions, examples)
    lines += ["## Examples", "",
              "Ranked by sentence BLEU, then ROUGE-L, then token F1.", "",
              *_examples_table(f"Best {len(best)}", best, base_by_id),
              *_examples_table(f"Worst {len(worst)}", worst, base_by_id)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(path: str | Path, text: str) -> None:
    with io.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def relative_link(target: str | Path, report: str | Path) -> str:
    """``target`` as a POSIX path relative to the report's folder (for Markdown links)."""
    return Path(os.path.relpath(Path(target), Path(report).parent)).as_posix()


def plot_confusion(confusion: dict[str, Any] | None, path: str | Path) -> None:
    """Confusion-matrix heat map (gold rows, predicted columns incl. ``<other>``) as PNG.

    With ``confusion=None`` (no classification labels) a placeholder figure saying so is
    written, so the DVC plot output always exists.
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    from reprotune.evaluate.metrics import has_cjk

    installed = {f.name for f in font_manager.fontManager.ttflist}
    family = [f for f in CJK_FONTS if f in installed] + ["DejaVu Sans"]
    if confusion is not None and any(has_cjk(c) for c in confusion["columns"]) and len(family) == 1:
        log.warning("no CJK font installed: Chinese labels in %s render as boxes (the report's "
                    "confusion table has them as text)", path)
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": family}):
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        _draw_confusion(plt, confusion, path)


def _draw_confusion(plt: Any, confusion: dict[str, Any] | None, path: str | Path) -> None:
    if confusion is None:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no classification labels in the test split", ha="center", va="center")
    else:
        labels, cols, matrix = confusion["labels"], confusion["columns"], confusion["matrix"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.7 * len(labels)))
        im = ax.imshow(matrix, cmap="Blues", aspect="auto")
        top = max((max(r) for r in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if top and v > top / 2 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        # no Software/date metadata: identical matrices give identical bytes
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
