"""One-permutation MinHash signatures and LSH banding: the candidate-blocking half of the
near-duplicate search over the char n-gram features of :mod:`reprotune.data.ngrams`
(:mod:`reprotune.data.similarity` verifies the candidates with the exact TF-IDF cosine of
:mod:`reprotune.data.tfidf`).

The hashed set of a row leaves out its common n-grams (:func:`common_features`).

A pair of rows whose n-gram sets have Jaccard similarity ``s`` agrees on each MinHash bin
with probability ``s``. LSH banding cuts a signature into ``bands`` bands of ``rows`` bins;
two rows become candidates when all bins of some band agree, which happens with probability
``1 - (1 - s**rows)**bands``. :func:`lsh_banding` picks the banding from the *cosine*
threshold actually checked, through the Jaccard floor of pairs at that cosine
(:func:`jaccard_floor`), so a check at 0.7 does not run with a banding tuned for 0.85.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from reprotune.data.ngrams import U64, chunk_features, features, mix, normalise, sorted_counts

logger = logging.getLogger(__name__)

SEED = 20240611  # fixed: dedup must not rerun (or change) when the training `seed` changes
EMPTY = np.uint32(0xFFFFFFFF)  # MinHash bin with no feature (a real 0xFFFFFFFF is just refilled)
# Jaccard of the hashed n-gram sets (common n-grams left out) of pairs at TF-IDF cosine c is at
# least ~c**2.5: measured on bench/dedup.py's en/zh/mixed generator with 0.3-8 edits per 100
# characters, the 1st percentile of the Jaccard estimate per 0.05-wide cosine bucket was
# 0.29/0.37/0.41/0.53/0.57/0.67/0.77 at c = 0.60/0.65/0.70/0.75/0.80/0.85/0.90, against
# c**2.5 = 0.28/0.34/0.41/0.49/0.57/0.67/0.77. (Equal-size binary sets would give c/(2-c).)
JACCARD_EXPONENT = 2.5
TARGET_RECALL = 0.95  # candidate probability wanted at the Jaccard floor (typical pairs: ~1.0)
# Candidates whose signatures agree on fewer bins than a third of the Jaccard floor are not
# verified: at 1e6 rows most LSH candidates are unrelated rows that met in one band (bin
# agreement ~0.04), while a pair that far below the floor is a candidate at all with
# probability < 7% (32 x 4 bands at 0.85), so recall does not move.
PREFILTER_SHARE = 1 / 3
# MinHash leaves out n-grams found in more than MAX_DF of the rows (and in more than MIN_DF_CAP
# rows). English bigrams like "th" make any two English texts share ~14% of their 2-4-grams
# (alpaca: LSH candidates for 2% of all pairs, infeasible at 1e5 rows); without them unrelated
# pairs drop to ~0.7% Jaccard (candidates for 0.005-0.03% of pairs) while planted near-duplicates
# at cosine >= 0.85 keep Jaccard >= 0.5. Common n-grams carry little TF-IDF weight anyway.
MAX_DF = 0.05
MIN_DF_CAP = 100
_DF_SAMPLE = 20_000  # rows (evenly spaced) from which the common n-grams are counted


# ---------------------------------------------------------------------------- banding
def jaccard_floor(cosine: float) -> float:
    """The n-gram-set Jaccard that pairs at TF-IDF ``cosine`` reach (1st percentile, measured)."""
    return float(cosine) ** JACCARD_EXPONENT


def banding_recall(jaccard: float, bands: int, rows: int) -> float:
    """Probability that a pair with this Jaccard shares at least one of ``bands`` bands."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def lsh_banding(threshold: float, num_perm: int = 128,
                target: float = TARGET_RECALL) -> tuple[int, int]:
    """``(bands, rows)`` for a cosine ``threshold``: the most rows per band (fewest random
    candidates) whose recall at :func:`jaccard_floor` is still ``target``; ``bands * rows``
    may leave a few bins unused. E.g. 128 bins: 0.85 -> 25 x 5, 0.7 -> 42 x 3."""
    s = jaccard_floor(threshold)
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if banding_recall(s, bands, rows) >= target:
            return bands, rows
    return num_perm, 1


def signature_prefilter(sig: np.ndarray, cand: np.ndarray, threshold: float,
                        chunk: int = 1 << 16) -> np.ndarray:
    """Which candidate pairs (m x 2) to verify: share of agreeing MinHash bins (the Jaccard
    estimate) at least ``PREFILTER_SHARE * jaccard_floor(threshold)``."""
    keep = np.zeros(len(cand), dtype=bool)
    cut = PREFILTER_SHARE * jaccard_floor(threshold)
    for a in range(0, len(cand), chunk):
        c = cand[a:a + chunk]
        keep[a:a + chunk] = (sig[c[:, 0]] == sig[c[:, 1]]).mean(axis=1) >= cut
    return keep


# ---------------------------------------------------------------------------- signatures
def common_features(texts: Sequence[str], nmin: int, nmax: int) -> np.ndarray:
    """Sorted features in more than MAX_DF (and MIN_DF_CAP rows) of an evenly spaced sample."""
    n = len(texts)
    take = np.unique(np.linspace(0, n - 1, min(n, _DF_SAMPLE)).astype(np.int64)) if n else []
    sample = [texts[i] for i in take]
    parts = [f for _, _, f, _ in features(sample, nmin, nmax)]
    feats = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=U64)
    uniq, df = sorted_counts(feats)
    return uniq[df > max(MAX_DF, MIN_DF_CAP / max(n, 1)) * len(sample)]


def minhash_chunk(texts: list[str], nmin: int, nmax: int, common: np.ndarray, salt: np.uint64,
                  num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row in chunk, feature) of every distinct n-gram, and the chunk's MinHash signatures
    (empty bins not yet filled: :func:`densify` runs over all rows at the end)."""
    rows, feats, _ = chunk_features([normalise(t) for t in texts], nmin, nmax)
    block = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    minhash_into(block, rows, feats, common, salt)
    return rows, feats, block


def minhash_into(sig: np.ndarray, rows: np.ndarray, feats: np.ndarray, common: np.ndarray,
                  salt: np.uint64) -> None:
    """Fold the (row, feature) entries into one-permutation MinHash signatures ``sig``.

    The hashed set of a row is its features minus ``common``; a row made only of common
    features keeps them all. Each feature is hashed once: its top 32 bits pick a bin, its low
    32 bits are the value, and a bin keeps its minimum.
    """
    k = sig.shape[1]
    use = np.ones(feats.size, dtype=bool)
    if common.size:  # membership in the small sorted `common` array
        use = common[np.searchsorted(common, feats).clip(max=common.size - 1)] != feats
    if rows.size:
        r0 = int(rows.min())
        only_common = np.bincount(rows[use] - r0, minlength=int(rows.max()) - r0 + 1) == 0
        use |= only_common[rows - r0]
    g = mix(feats[use] ^ salt)
    bins = (((g >> U64(32)) * U64(k)) >> U64(32)).astype(np.int64)
    np.minimum.at(sig.reshape(-1), rows[use] * k + bins, (g & U64(0xFFFFFFFF)).astype(np.uint32))


def densify(sig: np.ndarray, ok: np.ndarray, salt: np.uint64) -> None:
    """Fill empty bins in place ("optimal densification", Shrivastava 2017).

    An empty bin copies a non-empty bin chosen by a probe sequence that depends only on
    (bin, attempt), so two rows fill it alike and agreement per bin still estimates the
    Jaccard similarity. Rows without any feature (``ok`` False) stay empty.
    """
    k = sig.shape[1]
    empty = sig == EMPTY
    rows_e, bins_e = np.nonzero(empty & ok[:, None])
    attempt = 0
    while rows_e.size:
        attempt += 1
        probe = (mix(bins_e.astype(U64) * U64(0x9E3779B97F4A7C15) + U64(attempt) + salt)
                 % U64(k)).astype(np.int64)
        hit = ~empty[rows_e, probe]
        sig[rows_e[hit], bins_e[hit]] = sig[rows_e[hit], probe[hit]]
        rows_e, bins_e = rows_e[~hit], bins_e[~hit]


# ---------------------------------------------------------------------------- blocking
def group_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (p, q), p < q, of every pair of equal ``keys`` (all pairs within each group)."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    sizes = np.diff(np.r_[starts, ks.size])
    starts, sizes = starts[sizes > 1], sizes[sizes > 1]
    if not starts.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pos = np.repeat(starts, sizes) + (np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    partners = np.repeat(starts + sizes - 1, sizes) - pos  # later members of the same group
    first = np.repeat(pos, partners)
    second = first + 1 + (np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners))
    return order[first], order[second]


def lsh_candidates(sig: np.ndarray, ok: np.ndarray, bands: int, *, rows_per_band: int | None = None,
                   groups: np.ndarray | None = None, progress: bool = True) -> np.ndarray:
    """Candidate pairs (m x 2, i < j, sorted, unique): rows agreeing on every bin of some band.

    A band is ``rows_per_band`` bins (default ``num_perm / bands``, which must then divide).
    Rows without features (``ok`` False) are never candidates. With ``groups`` set (one
    integer per row), only pairs from different groups are kept (the cross-corpus search).
    """
    n, k = sig.shape
    if rows_per_band is None:
        if k % bands:
            raise ValueError(f"bands={bands} must divide num_perm={k}")
        rows_per_band = k // bands
    r = rows_per_band
    if bands * r > k:
        raise ValueError(f"{bands} bands x {r} rows need {bands * r} MinHash bins, have {k}")
    rows = np.flatnonzero(ok)
    codes = []
    for b in tqdm(range(bands), desc="LSH bands", disable=not progress, leave=False):
        key = np.full(rows.size, mix(np.array([b], dtype=U64))[0], dtype=U64)
        for c in range(b * r, (b + 1) * r):
            key = mix(key ^ sig[rows, c].astype(U64))
        p, q = group_pairs(key)
        i, j = rows[np.minimum(p, q)], rows[np.maximum(p, q)]
        if groups is not None:
            keep = groups[i] != groups[j]
            i, j = i[keep], j[keep]
        codes.append(np.unique(i * n + j))
    code = np.unique(np.concatenate(codes)) if codes else np.empty(0, np.int64)
    return np.stack([code // n, code % n], axis=1) if n else np.empty((0, 2), np.int64)
