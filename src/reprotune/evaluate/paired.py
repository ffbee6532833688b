"""Compare two prediction files row by row: every metric's difference with its interval.

The per-row statistics saved with each prediction record (:func:`row_statistics`) are the
basis: BLEU/chrF sufficient statistics, ROUGE/F1/EM per row, NLL and token counts, the
mapped label and the label probabilities. Rows are paired by id; only shared rows count
(records lacking a text statistic, e.g. written by an older version, get it recomputed from
their prediction and reference; NLL and label probabilities cannot be, and are then left
out). See :mod:`reprotune.evaluate.significance` for the bootstrap and the verdicts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from reprotune.evaluate import metrics as M
from reprotune.evaluate import significance as S

log = logging.getLogger(__name__)

# metric -> higher is better; the order a report lists them in
DIRECTION = {"bleu": True, "chrf": True, "rouge1": True, "rouge2": True, "rouge_l": True,
             "f1": True, "em": True, "accuracy": True, "macro_f1": True, "auc": True,
             "perplexity": False, "nll": False}
MEAN_METRICS = ("rouge1", "rouge2", "rouge_l", "f1", "em")


def row_statistics(preds: Sequence[str], refs: Sequence[str], tokenize: str
                   ) -> list[dict[str, Any]]:
    """The text statistics of each row: ``{bleu_stats, chrf_stats, rouge1, rouge2, rouge_l,
    f1, em}`` (``tokenize``: the resolved sacrebleu tokenizer)."""
    bleu, chrf = M.sufficient_stats(preds, refs, tokenize)
    rg = M.rouge(preds, refs)["per_sample"]
    tf = M.token_f1_em(preds, refs)["per_sample"]
    return [{"bleu_stats": b, "chrf_stats": c, **r, "f1": f, "em": e}
            for b, c, r, (f, e) in zip(bleu, chrf, rg, tf, strict=True)]


def pair_by_id(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]
               ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(a, b) record pairs sharing an id, in ``b``'s order; duplicate ids are an error."""
    for name, recs in (("a", a), ("b", b)):
        ids = [str(r["id"]) for r in recs]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"predictions {name} repeat ids {dup}: rows cannot be paired")
    by_id = {str(r["id"]): r for r in a}
    return [(by_id[str(r["id"])], r) for r in b if str(r["id"]) in by_id]


def compare_records(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], *,
                    tokenize: str = "auto", resamples: int = S.N_RESAMPLES,
                    seed: int = S.SEED, min_rows: int = S.MIN_ROWS) -> dict[str, Any]:
    """``b`` against ``a`` on their shared rows: ``{n_a, n_b, n_shared, n_labelled,
    resamples, seed, metrics: {name: significance.summarize record}}``.

    ``tokenize`` is the BLEU tokenizer (``auto``: from the shared references). Stored
    BLEU/chrF statistics are used only when every shared record of both sides has them
    and ``tokenize`` is not given (they were computed with that run's tokenizer).
    """
    pairs = pair_by_id(a, b)
    n = len(pairs)
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(b), "n_shared": n, "n_labelled": 0,
                           "resamples": resamples, "seed": seed, "metrics": {}}
    if n == 0:
        return out
    ra, rb = [p[0] for p in pairs], [p[1] for p in pairs]
    tok = M.resolve_bleu_tokenize([r.get("reference") or "" for r in rb], tokenize)
    if tokenize != "auto" or not all("bleu_stats" in r for r in ra + rb):
        ra, rb = _recomputed(ra, tok), _recomputed(rb, tok)
    out["bleu_tokenize"] = tok
    idx = S.resample_indices(n, resamples, seed)
    mets = out["metrics"]

    def put(name: str, a_val: float, b_val: float, samples: np.ndarray, rows: int) -> None:
        mets[name] = S.summarize(a_val, b_val, samples, rows, higher_is_better=DIRECTION[name],
                                 min_rows=min_rows)

    from sacrebleu.metrics import BLEU, CHRF

    for name, metric, key in (("bleu", BLEU(tokenize=tok), "bleu_stats"),
                              ("chrf", CHRF(), "chrf_stats")):
        fa, fb, sa, sb = S.paired_corpus([r[key] for r in ra], [r[key] for r in rb],
                                         S.sacrebleu_scorer(metric), idx)
        put(name, fa, fb, sb - sa, n)
    for name in MEAN_METRICS:
        ma, mb, d = S.paired_mean([r[name] for r in ra], [r[name] for r in rb], idx)
        put(name, ma, mb, d, n)
    if all("nll" in r and "n_tokens" in r for r in ra + rb):
        args = ([r["nll"] for r in ra], [r["n_tokens"] for r in ra],
                [r["nll"] for r in rb], [r["n_tokens"] for r in rb], idx)
        fa, fb, sa, sb = S.paired_ratio(*args, transform=lambda x: x)
        put("nll", fa, fb, sb - sa, n)
        fa, fb, sa, sb = S.paired_ratio(*args, transform=np.exp)
        put("perplexity", fa, fb, sb - sa, n)
    _classification(ra, rb, put, resamples, seed, out)
    return out


def _recomputed(recs: list[dict[str, Any]], tok: str) -> list[dict[str, Any]]:
    fresh = row_statistics([r.get("prediction") or "" for r in recs],
                           [r.get("reference") or "" for r in recs], tok)
    return [{**r, **f} for r, f in zip(recs, fresh, strict=True)]


def _classification(ra: list[dict[str, Any]], rb: list[dict[str, Any]], put: Any,
                    resamples: int, seed: int, out: dict[str, Any]) -> None:
    """accuracy, macro-F1 and (with label probabilities) ROC-AUC on the labelled rows."""
    both = [(x, y) for x, y in zip(ra, rb, strict=True)
            if x.get("label") is not None and x.get("label") == y.get("label")
            and "pred_label" in x and "pred_label" in y]
    m = len(both)
    out["n_labelled"] = m
    if m == 0:
        return
    classes = sorted({x["label"] for x, _ in both})
    code = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    gold = np.array([code[x["label"]] for x, _ in both])
    pa = np.array([code.get(x["pred_label"], k) for x, _ in both])
    pb = np.array([code.get(y["pred_label"], k) for _, y in both])
    idx = S.resample_indices(m, resamples, seed)
    ma, mb, d = S.paired_mean(pa == gold, pb == gold, idx)
    put("accuracy", ma, mb, d, m)
    fa, fb = S.macro_f1_codes(gold, pa, k), S.macro_f1_codes(gold, pb, k)
    put("macro_f1", fa, fb, S.resampled(lambda i: S.macro_f1_codes(gold[i], pb[i], k)
                                        - S.macro_f1_codes(gold[i], pa[i], k), idx), m)
    if k >= 2 and all(isinstance(x.get("label_probs"), dict) and isinstance(
            y.get("label_probs"), dict) for x, y in both):
        qa = np.array([[x["label_probs"].get(c, 0.0) for c in classes] for x, _ in both])
        qb = np.array([[y["label_probs"].get(c, 0.0) for c in classes] for _, y in both])
        aa, ab = S.roc_auc(gold, qa, k), S.roc_auc(gold, qb, k)
        if math.isfinite(aa) and math.isfinite(ab):
            put("auc", aa, ab, S.resampled(lambda i: S.roc_auc(gold[i], qb[i], k)
                                           - S.roc_auc(gold[i], qa[i], k), idx), m)


def intervals_file(comparison: dict[str, Any]) -> dict[str, Any]:
    """The metrics-file form of :func:`compare_records`: shared-row counts, then per metric
    ``{diff, low, high, verdict}`` (``diff`` = b - a; the verdict knows the direction)."""
    out: dict[str, Any] = {k: comparison[k] for k in ("n_a", "n_b", "n_shared", "n_labelled",
                                                      "resamples", "seed")}
    for name, m in comparison["metrics"].items():
        out[name] = {k: m[k] for k in ("diff", "low", "high", "verdict")}
    return out


def quantise_gate(reference: Sequence[dict[str, Any]], candidate: Sequence[dict[str, Any]],
                  main_metric: str, target_pct: float, *, min_rows: int = S.MIN_ROWS
                  ) -> dict[str, Any]:
    """Whether a quantised artifact (``candidate`` records) stays within ``target_pct`` of
    the merged model (``reference``), judged on the 95% interval of its loss, never on the
    point change alone: perplexity by the relative change of the mean token NLL (below
    ``target_pct`` %), the main task metric by its absolute change on its own 0-1 scale
    (below ``target_pct / 100``). Returns the flat metrics-row fields ``{gate, gate_rows,
    within_target, ppl_loss_pct, ppl_loss_pct_high, main_loss, main_loss_high, main_rows}``.
    """
    cmp = compare_records(reference, candidate, min_rows=min_rows)
    mets = cmp["metrics"]
    out: dict[str, Any] = {"gate_rows": cmp["n_shared"]}
    verdicts = []
    if "nll" in mets:
        g = S.gate(mets["nll"], target_pct / 100, relative=True, higher_is_better=False)
        verdicts.append(g["verdict"])
        out["ppl_loss_pct"] = None if g["loss"] is None else round(100 * g["loss"], 4) + 0.0
        out["ppl_loss_pct_high"] = (None if g["loss_high"] is None
                                    else round(100 * g["loss_high"], 4) + 0.0)
    if main_metric in mets:
        g = S.gate(mets[main_metric], target_pct / 100, relative=False, higher_is_better=True)
        verdicts.append(g["verdict"])
        out["main_loss"], out["main_loss_high"] = g["loss"], g["loss_high"]
        out["main_rows"] = mets[main_metric]["n"]  # accuracy: the labelled rows only
    if not verdicts or S.TOO_FEW in verdicts:
        out["gate"] = S.TOO_FEW
    else:
        out["gate"] = S.MET if all(v == S.MET for v in verdicts) else S.MISSED
    out["within_target"] = out["gate"] == S.MET
    return out
