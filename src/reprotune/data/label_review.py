"""Suspect labels: rows whose given class an out-of-sample classifier finds unlikely.

For rows that carry a classification label (``record["label"]``), a TF-IDF (character
1-3-grams, so Chinese and English alike) + logistic-regression classifier predicts each row's
class probabilities from the row's prompt text with k-fold cross-validation: every row is
scored by a model that never saw it. cleanlab's ``find_label_issues`` (confident learning)
then picks the rows whose given label disagrees with those probabilities, ranked by
self-confidence (the probability of the given label; lowest first). Nothing is removed here:
the user reviews the rows and lists the ones to drop in ``split.exclude_ids``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

MIN_PER_CLASS = 2  # k-fold needs every class in several folds


class LabelReviewError(ValueError):
    """The labelled rows cannot be reviewed (too few, or a single class)."""


def prompt_text(record: dict[str, Any]) -> str:
    """The text a label describes: the system and user turns, joined by newlines."""
    return "\n".join(str(m.get("content") or "") for m in record.get("messages") or []
                     if m.get("role") in ("system", "user"))


def label_issues(texts: Sequence[str], labels: Sequence[str], *, folds: int = 5,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Rows (by index) cleanlab flags, lowest self-confidence first:
    ``{"index", "given", "likely", "self_confidence", "likely_prob"}``."""
    import numpy as np
    from cleanlab.filter import find_label_issues
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    counts = Counter(labels)
    if len(counts) < 2:
        raise LabelReviewError(f"labels: {len(counts)} class in {len(labels)} rows; "
                               "a review needs at least 2")
    rare = sorted(c for c, n in counts.items() if n < MIN_PER_CLASS)
    if rare:
        raise LabelReviewError(f"labels: classes {rare} have fewer than {MIN_PER_CLASS} rows")
    classes = sorted(counts)
    y = np.array([classes.index(label) for label in labels])
    k = max(2, min(folds, min(counts.values())))
    features = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True,
                               min_df=1).fit_transform(texts)
    probs = cross_val_predict(LogisticRegression(max_iter=2000, C=4.0), features, y,
                              cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    log.info("label review: %d rows, %d classes, %d-fold: %d suspect labels", len(labels),
             len(classes), k, len(ranked))
    return [{"index": int(i), "given": classes[y[i]], "likely": classes[int(probs[i].argmax())],
             "self_confidence": round(float(probs[i, y[i]]), 4),
             "likely_prob": round(float(probs[i].max()), 4)} for i in ranked]


def robust_outliers(values: Sequence[float], *, z: float = 3.5) -> list[int]:
    """Indices whose modified z-score (median and MAD, Iglewicz & Hoaglin) is above ``z``,
    highest value first: a high loss on a row the model trained on (noise, contradiction,
    a row it could not learn)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) < 3:
        return []
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    if mad == 0:
        return []
    score = 0.6745 * (x - med) / mad
    return [int(i) for i in np.argsort(-x, kind="stable") if score[i] > z]
