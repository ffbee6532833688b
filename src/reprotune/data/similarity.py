"""Near-duplicate text detection: character n-gram TF-IDF, MinHash-LSH blocking, exact verification.

Used by the dedup stage (pairs within one corpus) and by the split stage's leakage check
(val/test rows against earlier splits). Three steps, in bounded memory (1e6 rows: see
:class:`NgramIndex` and README "Data stages at scale"):

1. **Features.** The char n-grams (``ngram_range``, e.g. 2-4) of every lower-cased text whose
   whitespace runs are collapsed, exactly as scikit-learn's
   ``TfidfVectorizer(analyzer="char", sublinear_tf=True, norm="l2")`` defines them (smooth idf).
   Characters, not words, so Chinese and other unspaced text work. The n-grams are hashed with
   numpy (vectorised over the whole corpus) instead of scikit-learn's per-character Python loop,
   which took 65 s for 20k rows here; tests check the cosines equal scikit-learn's. A feature is
   a 52-bit hash of the n-gram: a collision between two distinct n-grams is expected about
   once per 1e8 distinct n-grams and only merges two features. Document frequencies are
   exact: counted per partition of the hashes (:class:`~reprotune.data.spill.Partitions`),
   never over all (row, n-gram) entries at once (1e6 rows have ~1e9 of them).
2. **Blocking** (:mod:`reprotune.data.minhash`). One-permutation MinHash (one hash per
   feature, ``num_perm`` bins, the minimum per bin, empty bins filled by "optimal
   densification") over the same feature sets, then LSH banding: ``bands`` bands of ``r``
   bins; rows whose band values agree in any band become candidate pairs. A pair with
   n-gram-set Jaccard ``s`` becomes a candidate with probability ``1 - (1 - s**r)**bands``.
   By default the banding follows the cosine threshold (:func:`~reprotune.data.minhash.lsh_banding`:
   0.85 -> 25 x 5, 0.7 -> 42 x 3 of 128 bins); the dedup stage sets it with ``dedup.bands``.
3. **Verification.** Every candidate pair whose signatures agree on at least a third of the
   Jaccard floor's share of bins (:func:`~reprotune.data.minhash.signature_prefilter`: drops
   the unrelated rows that met in one band) gets its exact TF-IDF cosine, its dot product
   and norms summed partition by partition of the features; pairs at or above
   ``threshold`` are returned. No dense n x n matrix is ever built; only the candidate rows' n-grams are
   extracted again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from reprotune.data.minhash import (
    EMPTY,
    densify,
    lsh_banding,
    lsh_candidates,
    minhash_into,
    mix,
    signature_prefilter,
)
from reprotune.data.spill import FEAT_BITS, DiskTexts, Partitions, ordered_map

logger = logging.getLogger(__name__)

SEED = 20240611  # fixed: dedup must not rerun (or change) when the training `seed` changes

_WS = re.compile(r"\s\s+")  # scikit-learn's char analyzer collapses runs of 2+ whitespace
_U64 = np.uint64
_FEAT_BITS = FEAT_BITS
_DOC_BITS = 64 - _FEAT_BITS  # row-in-chunk bits packed above the feature hash for one sort
_CHUNK_DOCS = 1 << _DOC_BITS
_CHUNK_CHARS = 2_000_000  # bounds the temporary arrays of one extraction chunk
_FNV_OFFSET = _U64(0xCBF29CE484222325)
_FNV_PRIME = _U64(0x100000001B3)
# MinHash leaves out n-grams found in more than MAX_DF of the rows (and in more than MIN_DF_CAP
# rows). English bigrams like "th" make any two English texts share ~14% of their 2-4-grams
# (alpaca: LSH candidates for 2% of all pairs, infeasible at 1e5 rows); without them unrelated
# pairs drop to ~0.7% Jaccard (candidates for 0.005-0.03% of pairs) while planted near-duplicates
# at cosine >= 0.85 keep Jaccard >= 0.5. Common n-grams carry little TF-IDF weight anyway.
MAX_DF = 0.05
MIN_DF_CAP = 100
_DF_SAMPLE = 20_000  # rows (evenly spaced) from which the common n-grams are counted
_PART_ENTRIES = 1 << 25  # (row, n-gram) entries counted at once (~256 MB); more: partitions
_DF_ENTRY = np.dtype([("f", "<u8")])  # a feature hash, for the document frequencies
_ROW_ENTRY = np.dtype([("f", "<u8"), ("r", "<i4"), ("c", "<f4")])  # feature, row, count


def record_text(record: dict[str, Any]) -> str:
    """Role-tagged text of a canonical record: ``role: content`` per message, plus tool calls.

    Tool calls are appended as sorted-key JSON so two rows calling the same function with
    different arguments differ. The ``tools`` schemas are left out: rows that differ only in
    the tools offered are the same conversation. ``messages`` may be a JSON string (Parquet).
    """
    msgs = record["messages"]
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    parts = []
    for m in msgs:
        s = f"{m.get('role', '')}: {m.get('content') or ''}"
        if m.get("tool_calls"):
            s += "\n" + json.dumps(m["tool_calls"], ensure_ascii=False, sort_keys=True)
        parts.append(s)
    return "\n".join(parts)


def _chunks(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges of at most _CHUNK_DOCS rows and about _CHUNK_CHARS characters."""
    out, start, chars = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start >= _CHUNK_DOCS or chars + n > _CHUNK_CHARS):
            out.append((start, i))
            start, chars = i, 0
        chars += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def _chunk_features(texts: Sequence[str], nmin: int, nmax: int) -> tuple[np.ndarray, ...]:
    """(row-in-chunk, feature hash, count) of every distinct n-gram of each text, row-sorted."""
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(_U64)
    total, ends = cp.size, np.cumsum(lens)
    doc = np.repeat(np.arange(len(texts), dtype=_U64), lens) << _U64(_FEAT_BITS)
    state = np.full(total, _FNV_OFFSET, dtype=_U64)  # FNV-1a of the n chars starting at i
    keys = []
    for n in range(1, nmax + 1):
        m = total - n + 1
        if m <= 0:
            break
        st = state[:m]
        st ^= cp[n - 1:n - 1 + m]
        st *= _FNV_PRIME
        if n < nmin:
            continue
        valid = np.ones(m, dtype=bool)
        for k in range(1, n):  # n-grams that would run past the end of their text
            e = ends - k
            valid[e[(e >= 0) & (e < m)]] = False
        h = mix(st[valid] ^ _U64(n))
        keys.append(doc[:m][valid] | (h >> _U64(_DOC_BITS)))
    if not keys:
        empty = np.empty(0, dtype=_U64)
        return empty.astype(np.int64), empty, empty.astype(np.float32)
    k = np.sort(np.concatenate(keys))
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    uniq = k[first]
    counts = np.diff(np.r_[first, k.size]).astype(np.float32)
    return (uniq >> _U64(_FEAT_BITS)).astype(np.int64), uniq & _U64((1 << _FEAT_BITS) - 1), counts


def _normalise(text: str) -> str:
    """scikit-learn's char-analyzer preprocessing: lower-case, whitespace runs -> one space."""
    return _WS.sub(" ", text.lower())


def _lengths(texts: Sequence[str]) -> np.ndarray:
    """Length in characters of each text (before normalisation: an upper bound after it)."""
    if isinstance(texts, DiskTexts):
        return texts.lengths
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


def _features(texts: Sequence[str], nmin: int, nmax: int, *, desc: str | None = None):
    """Yield (first row, rows, feats, counts) per chunk of ``texts`` (normalised here)."""
    chunks = _chunks(_lengths(texts))
    for a, b in tqdm(chunks, desc=desc, unit="chunk", disable=desc is None or len(chunks) < 4,
                     leave=False):
        r, f, c = _chunk_features([_normalise(t) for t in texts[a:b]], nmin, nmax)
        yield a, r + a, f, c


def _sorted_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts of an already sorted array."""
    if not x.size:
        return x[:0].copy(), np.empty(0, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    return x[first], np.diff(np.r_[first, x.size])


def _columns(vocab: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Position in the sorted ``vocab`` of each feature hash in ``q`` (all present).

    Hashes are uniform, so a table of bucket starts on their top bits lands within a few
    steps of the answer, where a binary search would take ~25 cache misses per query.
    """
    bits = min(max(1, int(vocab.size).bit_length() - 2), _FEAT_BITS)
    shift = _U64(_FEAT_BITS - bits)
    start = np.zeros((1 << bits) + 1, dtype=np.int64)
    np.cumsum(np.bincount((vocab >> shift).astype(np.int64), minlength=1 << bits), out=start[1:])
    pos = start[(q >> shift).astype(np.int64)]
    todo = np.flatnonzero(vocab[pos.clip(max=max(vocab.size - 1, 0))] != q)
    while todo.size:
        pos[todo] += 1
        todo = todo[vocab[pos[todo]] != q[todo]]
    return pos


@dataclass(frozen=True)
class NgramIndex:
    """A corpus' char n-gram statistics: exact document frequencies and MinHash signatures.

    The document frequencies are counted partition by partition of the feature hashes: the
    (row, distinct n-gram) entries of a partition (at most ~``_PART_ENTRIES``) are sorted and
    counted on their own, so memory does not grow with the corpus (more partitions spill to
    disk instead). Row features are not stored: TF-IDF rows are re-extracted on demand for
    the rows being compared, typically the few that are LSH candidates. ``texts`` may be a
    :class:`~reprotune.data.spill.DiskTexts`, so they need not be in memory either.
    """

    texts: Sequence[str]  # as given; normalised as scikit-learn's char analyzer does when read
    parts: Partitions  # per partition: sorted distinct feature hashes ("vocab") and their df
    sig: np.ndarray  # MinHash signatures, n_rows x num_perm uint32
    has_features: np.ndarray  # rows with at least one n-gram (others are never candidates)
    ngram_range: tuple[int, int]
    n_features: int  # distinct n-gram hashes in the corpus (the TF-IDF columns)

    @property
    def n_rows(self) -> int:
        return len(self.texts)

    @property
    def vocab(self) -> np.ndarray:
        """Sorted distinct feature hashes (one partition only: small corpora and tests)."""
        return self._single()["vocab"]

    @property
    def df(self) -> np.ndarray:
        """Document frequency of each :attr:`vocab` entry (one partition only)."""
        return self._single()["df"]

    def _single(self) -> dict[str, np.ndarray]:
        if self.parts.count != 1:
            raise ValueError(f"the index has {self.parts.count} partitions: use cosine()")
        return self.parts.derived(0)

    @classmethod
    def build(cls, texts: Sequence[str], ngram_range: tuple[int, int] = (2, 4), *,
              num_perm: int = 128, seed: int = SEED, workers: int = 1,
              progress: bool = True) -> NgramIndex:
        """One pass over ``texts``: signatures per chunk, features routed to partitions.

        ``workers`` > 1 extracts the chunks in that many processes (same result).

        Memory: the signatures (4 * num_perm bytes per row) and one partition's entries
        (8 bytes each, ``_PART_ENTRIES`` at most, ~256 MB) while it is counted.
        """
        nmin, nmax = ngram_range
        if not 1 <= nmin <= nmax:
            raise ValueError(f"ngram_range {ngram_range}: need 1 <= min <= max")
        n = len(texts)
        lens = _lengths(texts)
        cap = int(sum(np.clip(lens - k + 1, 0, None).sum() for k in range(nmin, nmax + 1)))
        parts = Partitions(max(0, int(np.ceil(np.log2(max(cap, 1) / _PART_ENTRIES)))), _DF_ENTRY)
        sig = np.full((n, num_perm), EMPTY, dtype=np.uint32)
        has = np.zeros(n, dtype=bool)
        salt = mix(np.array([seed], dtype=_U64))[0]
        common = _common_features(texts, nmin, nmax)
        chunks = _chunks(lens)
        jobs = ((texts[a:b], nmin, nmax, common, salt, num_perm) for a, b in chunks)
        for (a, b), (rows, feats, block) in zip(
                tqdm(chunks, desc="n-grams + MinHash", unit="chunk", leave=False,
                     disable=not progress or len(chunks) < 4),
                ordered_map(_minhash_chunk, jobs, workers), strict=True):
            parts.add(feats.view(_DF_ENTRY))
            has[rows + a] = True
            sig[a:b] = block
        n_features = 0
        for p in range(parts.count):
            entries = parts.load(p).view(_U64)
            entries.sort()
            vocab, df = _sorted_counts(entries)
            del entries
            parts.replace(p, {"vocab": vocab, "df": df.astype(np.int32)})
            n_features += vocab.size
        densify(sig, has, salt)
        logger.debug("%d rows, %d distinct n-grams, %d partitions", n, n_features, parts.count)
        return cls(texts, parts, sig, has, (nmin, nmax), n_features)

    # ------------------------------------------------------------------ TF-IDF
    def _row_entries(self, rows: np.ndarray) -> Partitions:
        """(feature, position in ``rows``, count) of every distinct n-gram of those rows,
        routed like the index's partitions, rows in order."""
        nmin, nmax = self.ngram_range
        out = Partitions(self.parts.bits, _ROW_ENTRY)
        for a in range(0, rows.size, _CHUNK_DOCS):
            batch = [self.texts[k] for k in rows[a:a + _CHUNK_DOCS].tolist()]
            for _, r, f, c in _features(batch, nmin, nmax):
                e = np.empty(f.size, dtype=_ROW_ENTRY)
                e["f"], e["r"], e["c"] = f, r + a, c
                out.add(e)
        return out

    def _weights(self, p: int, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vocab column, TF-IDF weight) of partition ``p``'s entries (sublinear tf, smooth idf)."""
        d = self.parts.derived(p)
        cols = _columns(d["vocab"], entries["f"])
        idf = np.log((1.0 + self.n_rows) / (1.0 + d["df"][cols])) + 1.0
        return cols, ((1.0 + np.log(entries["c"])) * idf).astype(np.float32)

    def tfidf_rows(self, rows: Sequence[int] | np.ndarray) -> Any:
        """L2-normalised TF-IDF rows (scipy CSR, float32, sorted column indices).

        Equal to scikit-learn's ``TfidfVectorizer(analyzer="char", ngram_range=...,
        sublinear_tf=True)`` rows fitted on the whole corpus, up to column order. One
        partition only (small corpora); :meth:`cosine` works at any size.
        """
        import scipy.sparse as sp

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        e = self._row_entries(rows).load(0)
        cols, w = self._weights(0, e)
        r = e["r"].astype(np.int64)
        ptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=rows.size), out=ptr[1:])
        sq = np.bincount(r, weights=w.astype(np.float64) ** 2, minlength=rows.size)
        w /= np.sqrt(np.where(sq > 0, sq, 1.0))[r].astype(np.float32)
        m = sp.csr_matrix((w, cols.astype(np.int32), ptr), shape=(rows.size, self.vocab.size))
        m.has_sorted_indices = True  # features sorted per row and vocab sorted
        return m

    def tfidf_matrix(self) -> Any:
        """The whole TF-IDF matrix (for small corpora and tests)."""
        return self.tfidf_rows(np.arange(self.n_rows))

    def cosine(self, i: Sequence[int] | np.ndarray, j: Sequence[int] | np.ndarray, *,
               progress: bool = False) -> np.ndarray:
        """Exact TF-IDF cosine of each pair (i[k], j[k]); rows of either side may repeat.

        Summed partition by partition: dot products and squared norms add up over disjoint
        sets of features, so only one partition's weights are in memory at a time.
        """
        import scipy.sparse as sp

        i = np.asarray(i, dtype=np.int64).reshape(-1)
        j = np.asarray(j, dtype=np.int64).reshape(-1)
        if not i.size:
            return np.zeros(0, dtype=np.float32)
        rows = np.unique(np.concatenate([i, j]))
        li, lj = np.searchsorted(rows, i), np.searchsorted(rows, j)
        entries = self._row_entries(rows)
        dot = np.zeros(i.size, dtype=np.float64)
        sq = np.zeros(rows.size, dtype=np.float64)
        for p in tqdm(range(entries.count), desc="verify", unit="part",
                      disable=not progress or entries.count < 4, leave=False):
            e = entries.load(p)
            cols, w = self._weights(p, e)
            r = e["r"].astype(np.int64)
            w64 = w.astype(np.float64)
            sq += np.bincount(r, weights=w64 ** 2, minlength=rows.size)
            ptr = np.zeros(rows.size + 1, dtype=np.int64)
            np.cumsum(np.bincount(r, minlength=rows.size), out=ptr[1:])
            sub = sp.csr_matrix((w64, cols, ptr), shape=(rows.size, int(cols.max(initial=0)) + 1))
            sub.has_sorted_indices = True
            # Chunks of pairs bounded by stored entries, so the gathered rows stay ~100 MB.
            nnz = np.diff(ptr)
            cost = np.cumsum(nnz[li] + nnz[lj])
            ends = np.unique(np.r_[np.searchsorted(cost, np.arange(4_000_000, cost[-1], 4_000_000)),
                                   i.size].clip(1, i.size))
            start = 0
            for end in ends.tolist():
                a, b = sub[li[start:end]], sub[lj[start:end]]
                dot[start:end] += np.asarray(a.multiply(b).sum(axis=1)).ravel()
                start = end
        norm = np.sqrt(sq[li] * sq[lj])
        out = np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- MinHash
def _minhash_chunk(texts: list[str], nmin: int, nmax: int, common: np.ndarray, salt: np.uint64,
                   num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row in chunk, feature) of every distinct n-gram, and the chunk's MinHash signatures."""
    rows, feats, _ = _chunk_features([_normalise(t) for t in texts], nmin, nmax)
    block = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    minhash_into(block, rows, feats, common, salt)
    return rows, feats, block


def _common_features(texts: Sequence[str], nmin: int, nmax: int) -> np.ndarray:
    """Sorted features in more than MAX_DF (and MIN_DF_CAP rows) of an evenly spaced sample."""
    n = len(texts)
    take = np.unique(np.linspace(0, n - 1, min(n, _DF_SAMPLE)).astype(np.int64)) if n else []
    sample = [texts[i] for i in take]
    parts = [f for _, _, f, _ in _features(sample, nmin, nmax)]
    feats = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=_U64)
    uniq, df = _sorted_counts(feats)
    return uniq[df > max(MAX_DF, MIN_DF_CAP / max(n, 1)) * len(sample)]


@dataclass
class NearDuplicates:
    """Verified pairs plus what produced them (kept for metrics and follow-up cosines)."""

    pairs: list[tuple[int, int, float]]
    index: NgramIndex
    n_candidates: int


def find_near_duplicates(texts: Sequence[str], *, threshold: float,
                         ngram_range: tuple[int, int] = (2, 4), num_perm: int = 128,
                         bands: int | None = None, seed: int = SEED,
                         groups: np.ndarray | None = None, workers: int = 1,
                         progress: bool = True) -> NearDuplicates:
    """Blocking + verification over ``texts``; see :func:`near_duplicate_pairs`.

    ``bands=None`` derives the LSH banding from ``threshold`` (:func:`lsh_banding`); a number
    uses ``num_perm / bands`` bins per band. With ``groups``, only pairs across groups count.
    ``workers`` processes extract the n-grams (:meth:`NgramIndex.build`; same result).
    """
    if bands is None:
        bands, rows_per_band = lsh_banding(threshold, num_perm)
    else:
        rows_per_band = None
    t0 = time.perf_counter()
    index = NgramIndex.build(texts, ngram_range, num_perm=num_perm, seed=seed, workers=workers,
                             progress=progress)
    t1 = time.perf_counter()
    cand = lsh_candidates(index.sig, index.has_features, bands, rows_per_band=rows_per_band,
                          groups=groups, progress=progress)
    t2 = time.perf_counter()
    check = cand[signature_prefilter(index.sig, cand, threshold)]
    sims = index.cosine(check[:, 0], check[:, 1], progress=progress)
    # float32 rounding: an exact copy may score 0.99999994, so allow a rounding margin.
    hit = sims >= threshold - 1e-6
    pairs = [(int(a), int(b), float(s)) for (a, b), s in zip(check[hit], sims[hit], strict=True)]
    logger.info("%d rows: %d candidate pairs (%d bands x %d bins), %d verified, %d at cosine "
                ">= %.3f; %.1f s index (%d partitions), %.1f s LSH, %.1f s verification",
                len(texts), len(cand), bands, rows_per_band or num_perm // bands, len(check),
                len(pairs), threshold, t1 - t0, index.parts.count, t2 - t1,
                time.perf_counter() - t2)
    return NearDuplicates(pairs, index, len(cand))


def near_duplicate_pairs(texts: Sequence[str], *, threshold: float,
                         ngram_range: tuple[int, int] = (2, 4), num_perm: int = 128,
                         bands: int | None = None, seed: int = SEED,
                         progress: bool = True) -> list[tuple[int, int, float]]:
    """All pairs (i, j, cosine), i < j, sorted, whose char n-gram TF-IDF cosine >= threshold.

    Only pairs that share a MinHash-LSH band are scored, so recall is probabilistic (see the
    module docstring); every returned pair is verified exactly.
    """
    return find_near_duplicates(texts, threshold=threshold, ngram_range=ngram_range,
                                num_perm=num_perm, bands=bands, seed=seed,
                                progress=progress).pairs


def earlier_group_matches(texts: Sequence[str], groups: Sequence[int], *, threshold: float,
                          ngram_range: tuple[int, int] = (2, 4), num_perm: int = 128,
                          seed: int = SEED, progress: bool = True) -> list[tuple[int, int, float]]:
    """For each row with a text at cosine >= threshold in an earlier group: (row, best
    earlier-group row, cosine), sorted by row; ties go to the lowest index. ``groups`` must
    be non-decreasing (e.g. 0 = train, 1 = val, 2 = test). The TF-IDF vocabulary and idf
    are fitted on all texts together; the LSH banding follows ``threshold``."""
    g = np.asarray(groups, dtype=np.int64)
    if g.size != len(texts) or np.any(np.diff(g) < 0):
        raise ValueError("groups: one non-decreasing integer per text")
    found = find_near_duplicates(texts, threshold=threshold, ngram_range=ngram_range,
                                 num_perm=num_perm, seed=seed, groups=g, progress=progress)
    best: dict[int, tuple[float, int]] = {}
    for a, b, s in found.pairs:  # a < b and groups differ: b is the later row
        if b not in best or s > best[b][0] or (s == best[b][0] and a < best[b][1]):
            best[b] = (s, a)
    return [(b, a, s) for b, (s, a) in sorted(best.items())]


def cross_near_duplicates(queries: Sequence[str], corpus: Sequence[str], *, threshold: float,
                          ngram_range: tuple[int, int] = (2, 4), num_perm: int = 128,
                          seed: int = SEED, progress: bool = True) -> list[tuple[int, int, float]]:
    """For each query with a corpus text at cosine >= threshold: (query index, best corpus
    index, cosine), sorted by query. Ties go to the lowest corpus index."""
    nc = len(corpus)
    hits = earlier_group_matches(list(corpus) + list(queries), [0] * nc + [1] * len(queries),
                                 threshold=threshold, ngram_range=ngram_range, num_perm=num_perm,
                                 seed=seed, progress=progress)
    return [(q - nc, c, s) for q, c, s in hits]
