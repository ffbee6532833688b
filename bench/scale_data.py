"""Rows for bench/data_scale.py, written as they are made, and the dedup stage's score on them.

:func:`generate` streams N alpaca rows to a JSONL file in O(1) memory per row: every row's
text is a pure function of (seed, its generation index), so a planted duplicate regenerates
its source instead of keeping all texts. Generation order: originals, near duplicates (a
light edit of a random original: 0.3-1.2 character/word/punctuation edits per 100 characters),
exact duplicates (a random earlier row, upper-cased with one space doubled: the same
comparison key); the rows are written in a seeded random order. :func:`score_dedup` reads
the dedup stage's outputs back and scores them against the planted pairs.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from dedup import TextMaker  # bench/dedup.py: en/zh/mixed pseudo-text with Zipf frequencies

from reprotune.data.similarity import record_text
from reprotune.data.tfidf import NgramIndex

THRESHOLD = 0.85  # dedup.threshold's default, the one the dedup stage runs with
NEAR_FRAC, EXACT_FRAC = 0.10, 0.03
ELIGIBILITY_SAMPLE = 100_000  # rows whose idf the planted pairs' cosines are measured with


def _text(maker: TextMaker, seed: int, g: int, src: np.ndarray, n_orig: int, n_near: int
          ) -> tuple[str, str]:
    """(instruction, output) of generated row ``g``."""
    maker.rng = np.random.default_rng([seed, g])
    if g < n_orig:
        length = int(maker.rng.integers(50, 801))
        cut = int(length * maker.rng.uniform(0.2, 0.4))
        text = maker.text(length)
        return text[:cut], text[cut:]
    u, a = _text(maker, seed, int(src[g]), src, n_orig, n_near)
    maker.rng = np.random.default_rng([seed, g, 1])
    if g < n_orig + n_near:
        k = max(1, int((len(u) + len(a)) * maker.rng.uniform(0.3, 1.2) / 100))
        ku = int(maker.rng.binomial(k, len(u) / (len(u) + len(a))))
        return (maker.edit(u, ku) if ku else u), (maker.edit(a, k - ku) if k - ku else a)
    return u.upper(), a.replace(" ", "  ", 1)


def generate(path: Path, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Write ``rows`` rows to ``path``; return the planted truth by file position:
    ``family`` (the original each row derives from), ``near`` and ``exact`` pairs."""
    rng = np.random.default_rng(seed)
    n_near, n_exact = int(rows * NEAR_FRAC), int(rows * EXACT_FRAC)
    n_orig = rows - n_near - n_exact
    src = np.full(rows, -1, dtype=np.int64)
    src[n_orig:n_orig + n_near] = rng.integers(n_orig, size=n_near)
    src[n_orig + n_near:] = [rng.integers(g) for g in range(n_orig + n_near, rows)]
    family = np.arange(rows)
    for g in range(n_orig, rows):  # sources come earlier, so their family is known
        family[g] = family[src[g]]
    order = rng.permutation(rows)  # order[position] = generation index
    pos = np.empty(rows, dtype=np.int64)
    pos[order] = np.arange(rows)
    times = 1.6e9 + rng.uniform(0, 1e8, size=rows)
    maker = TextMaker(np.random.default_rng(seed))
    with path.open("w", encoding="utf-8") as fh:
        for p in range(rows):
            g = int(order[p])
            u, a = _text(maker, seed, g, src, n_orig, n_near)
            when = datetime.fromtimestamp(times[g], tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            fh.write(json.dumps({"instruction": u, "output": a, "created_at": when},
                                ensure_ascii=False) + "\n")
    kinds = np.arange(n_orig, rows)
    pairs = np.stack([pos[src[kinds]], pos[kinds]], axis=1)
    return {"family": family[order], "near": pairs[: n_near], "exact": pairs[n_near:]}


def _line(source: str) -> int:
    return int(source.rsplit(":", 1)[1]) - 1


def _texts(raw: Path, keep: set[int]) -> dict[int, str]:
    """record_text of the raw rows at positions ``keep`` (as the dedup stage sees them)."""
    out = {}
    with raw.open(encoding="utf-8") as fh:
        for p, line in enumerate(fh):
            if p in keep:
                r = json.loads(line)
                out[p] = record_text({"messages": [{"role": "user", "content": r["instruction"]},
                                                   {"role": "assistant", "content": r["output"]}]})
    return out


def score_dedup(d: Path, truth: dict[str, np.ndarray]) -> dict:
    """Planted-duplicate recall and precision of the dedup stage in folder ``d``.

    A planted pair is found when both rows end with the same kept row. Near pairs whose
    TF-IDF cosine is below the threshold are not near-duplicates by definition: they are
    counted apart. The cosines use the idf of all rows up to ELIGIBILITY_SAMPLE rows, above
    that of an evenly spaced sample plus the pair rows (the generator is stationary).
    """
    n = truth["family"].size
    kept_id = {}
    with (d / "data/interim/deduped.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            kept_id[r["id"]] = _line(r["source"])
    kept_as = np.arange(n)
    quality = set()
    reasons: dict[str, list[tuple[int, int]]] = {}
    with (d / "data/interim/dedup_dropped.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            p = _line(r["source"])
            if r["duplicate_of"] is None:
                quality.add(p)
            else:
                kept_as[p] = kept_id[r["duplicate_of"]]
                reasons.setdefault(r["reason"], []).append((p, kept_as[p]))
    near = truth["near"]
    rows = set(near.ravel().tolist()) | set(np.linspace(0, n - 1, min(n, ELIGIBILITY_SAMPLE))
                                            .astype(np.int64).tolist())
    texts = _texts(d / "data/raw/bench.jsonl", rows)
    order = sorted(texts)
    at = {p: i for i, p in enumerate(order)}
    index = NgramIndex.build([texts[p] for p in order], progress=False)
    cos = index.cosine([at[a] for a in near[:, 0]], [at[b] for b in near[:, 1]])
    eligible = [(a, b) for (a, b), c in zip(near.tolist(), cos, strict=True)
                if c >= THRESHOLD and a not in quality and b not in quality]
    np.save(d / "near_eligible.npy", np.array(eligible, dtype=np.int64).reshape(-1, 2))
    found = sum(kept_as[a] == kept_as[b] for a, b in eligible)
    exact_found = sum(kept_as[a] == kept_as[b] for a, b in truth["exact"].tolist())
    fam = truth["family"]
    prec = {k: round(float(sum(fam[p] == fam[q] for p, q in v)) / max(1, len(v)), 5)
            for k, v in sorted(reasons.items())}
    return {"near_recall": round(float(found) / max(1, len(eligible)), 5), "near_found": int(found),
            "near_eligible": len(eligible), "planted_near": int(len(near)),
            "planted_near_below_threshold": int(np.sum(cos < THRESHOLD)),
            "exact_recall": round(float(exact_found) / max(1, len(truth["exact"])), 5),
            "planted_exact": int(len(truth["exact"])), "precision": prec,
            "drops": {k: len(v) for k, v in sorted(reasons.items())}, "quality_drops": len(quality)}
