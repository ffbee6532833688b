"""Paired-bootstrap confidence intervals and verdicts for a metric difference between two runs.

Both runs were scored on the same rows (paired by id upstream). One resampling of the row
indices (``rng.choice(n, size=(resamples, n))``, numpy's ``default_rng(seed)``, the draw
sacrebleu's paired bootstrap makes) is shared by every metric, so all intervals of one
comparison come from the same resamples. The interval is the percentile one: the 2.5th and
97.5th percentiles of the resampled differences ``b - a``.

Verdicts: ``better`` when the whole interval lies on the improving side of 0, ``worse`` on
the other side, ``no detectable change`` when it contains 0, and ``too few rows to tell``
below :data:`MIN_ROWS` shared rows (a bootstrap of a handful of rows is not an interval).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

N_RESAMPLES = 1000
# sacrebleu's default SACREBLEU_SEED: the BLEU/chrF resamples are exactly sacrebleu's
SEED = 12345
MIN_ROWS = 30
CONFIDENCE = 0.95
BETTER, WORSE, NO_CHANGE, TOO_FEW = "better", "worse", "no detectable change", "too few rows to tell"
MET, MISSED = "met", "missed"
DIGITS = 6


def resample_indices(n: int, resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` row indices drawn with replacement, as sacrebleu draws them."""
    if n <= 0:
        raise ValueError("no rows to resample")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE
                        ) -> tuple[float, float]:
    """(low, high) percentile interval of ``samples``; NaN samples (an undefined statistic
    on that resample, e.g. AUC without both classes) are left out."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def verdict(low: float, high: float, n: int, *, higher_is_better: bool = True,
            min_rows: int = MIN_ROWS) -> str:
    """``better`` / ``worse`` / ``no detectable change`` / ``too few rows to tell``."""
    if n < min_rows or not (math.isfinite(low) and math.isfinite(high)):
        return TOO_FEW
    if low > 0 or high < 0:
        improved = low > 0
        return BETTER if improved == higher_is_better else WORSE
    return NO_CHANGE


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), DIGITS) + 0.0


def summarize(a: float, b: float, samples: np.ndarray, n: int, *,
              higher_is_better: bool = True, min_rows: int = MIN_ROWS) -> dict[str, Any]:
    """One metric's comparison record: ``{a, b, diff, low, high, verdict, n,
    higher_is_better}`` (rounded; ``diff = b - a``, the interval is of ``b - a``)."""
    low, high = percentile_interval(samples)
    return {"a": _r(a), "b": _r(b), "diff": _r(b - a), "low": _r(low), "high": _r(high),
            "verdict": verdict(low, high, n, higher_is_better=higher_is_better,
                               min_rows=min_rows),
            "n": n, "higher_is_better": higher_is_better}


# --------------------------------------------------------------------------- statistics
def paired_mean(a: Sequence[float], b: Sequence[float], idx: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean a, mean b, resampled mean differences) of per-row scores."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = y - x
    return float(x.mean()), float(y.mean()), d[idx].mean(axis=1)


def paired_corpus(stats_a: Sequence[Sequence[float]], stats_b: Sequence[Sequence[float]],
                  score: Callable[[np.ndarray], float], idx: np.ndarray
                  ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Corpus-level metric from summed per-row sufficient statistics (BLEU, chrF):
    (score a, score b, resampled scores a, resampled scores b). float32 sums, as sacrebleu."""
    sa, sb = np.asarray(stats_a, dtype="float32"), np.asarray(stats_b, dtype="float32")
    full_a, full_b = score(sa.sum(0)), score(sb.sum(0))
    ra = np.array([score(s.sum(0)) for s in sa[idx]])
    rb = np.array([score(s.sum(0)) for s in sb[idx]])
    return full_a, full_b, ra, rb


def sacrebleu_scorer(metric: Any) -> Callable[[np.ndarray], float]:
    """``summed stats -> score`` of a sacrebleu metric object (BLEU or CHRF)."""
    return lambda s: float(metric._compute_score_from_stats(s).score)


def paired_ratio(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                 den_b: Sequence[float], idx: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]
                 ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``transform(sum num / sum den)`` per run (mean NLL per token, perplexity):
    (full a, full b, resampled a, resampled b)."""
    na, da = np.asarray(num_a, np.float64), np.asarray(den_a, np.float64)
    nb, db = np.asarray(num_b, np.float64), np.asarray(den_b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ra = transform(na[idx].sum(1) / da[idx].sum(1))
        rb = transform(nb[idx].sum(1) / db[idx].sum(1))
        return (float(transform(np.array(na.sum() / da.sum()))),
                float(transform(np.array(nb.sum() / db.sum()))), ra, rb)


def macro_f1_codes(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over classes ``0..k-1`` (``pred`` may hold ``k`` = no label), as
    scikit-learn's ``f1_score(average="macro", zero_division=0)`` over those labels."""
    tp = np.bincount(gold[gold == pred], minlength=k + 1)[:k]
    denom = np.bincount(pred, minlength=k + 1)[:k] + np.bincount(gold, minlength=k + 1)[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]
    return ranks


def roc_auc(gold: np.ndarray, probs: np.ndarray, k: int) -> float:
    """ROC-AUC of label probabilities (rows x k): binary for 2 classes, else one-vs-rest
    macro, as scikit-learn's ``roc_auc_score`` computes them (ties share their average
    rank: the Mann-Whitney form, fast enough for a thousand resamples); NaN when the rows
    do not hold every class."""
    if k < 2 or len(np.unique(gold)) < k:
        return math.nan
    classes = [1] if k == 2 else range(k)
    aucs = []
    for c in classes:
        pos = gold == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        ranks = average_ranks(probs[:, c])
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def resampled(stat: Callable[[np.ndarray], float], idx: np.ndarray) -> np.ndarray:
    """``stat(rows)`` on every resample (rows = one line of ``idx``)."""
    return np.array([stat(rows) for rows in idx], dtype=np.float64)


def single_interval(stat: Callable[[np.ndarray], float], n: int, *,
                    resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """A statistic of one run with its percentile-bootstrap interval: ``{value, low, high}``."""
    idx = resample_indices(n, resamples, seed)
    low, high = percentile_interval(resampled(stat, idx))
    return {"value": _r(stat(np.arange(n))), "low": _r(low), "high": _r(high)}


# --------------------------------------------------------------------------- quantise gate
def gate(comparison: dict[str, Any], target: float, *, relative: bool,
         higher_is_better: bool) -> dict[str, Any]:
    """Whether a candidate (``b``) stays within ``target`` of the reference (``a``).

    ``comparison`` is one :func:`summarize` record. The loss is ``a - b`` for a
    higher-is-better metric and ``b - a`` otherwise; with ``relative`` it is divided by
    ``|a|`` (perplexity: relative NLL change). ``met`` when the whole interval of the loss
    lies below ``target``, ``missed`` when any of it reaches the target (the data cannot
    show the loss is small enough), ``too few rows to tell`` below the row minimum.
    Identical predictions give the interval [0, 0]: ``met`` whatever the score's size.
    """
    n = comparison["n"]
    lo, hi = comparison["low"], comparison["high"]
    out = {"target": target, "relative": relative, "n": n}
    if comparison["verdict"] == TOO_FEW or lo is None or hi is None:
        return {**out, "loss": None, "loss_high": None, "verdict": TOO_FEW}
    scale = abs(comparison["a"]) if relative else 1.0
    if relative and not scale:
        scale = 1.0  # a reference of exactly 0: fall back to the absolute scale
    sign = -1.0 if higher_is_better else 1.0
    loss, worst = sign * comparison["diff"] / scale, max(sign * lo, sign * hi) / scale
    return {**out, "loss": _r(loss), "loss_high": _r(worst),
            "verdict": MET if worst < target else MISSED}
