"""The partitioned char n-gram TF-IDF index of a corpus: exact document frequencies, TF-IDF
rows and exact cosines, in bounded memory (1e6 rows: docs/data.md "Data stages at scale").

TF-IDF as scikit-learn's ``TfidfVectorizer(analyzer="char", sublinear_tf=True, norm="l2")``
defines it (smooth idf) over the hashed n-grams of :mod:`reprotune.data.ngrams`. Document
frequencies are exact: counted per partition of the hashes
(:class:`~reprotune.data.spill.Partitions`), never over all (row, n-gram) entries at once
(1e6 rows have ~1e9 of them). Cosines are summed partition by partition of the features, so
no dense n x n matrix is ever built and only the compared rows' n-grams are extracted again.
The same pass over the texts computes the rows' MinHash signatures
(:mod:`reprotune.data.minhash`), which the near-duplicate search
(:mod:`reprotune.data.similarity`) blocks on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from reprotune.data.minhash import EMPTY, SEED, common_features, densify, minhash_chunk
from reprotune.data.ngrams import CHUNK_DOCS, U64, chunks, features, lengths, mix, sorted_counts
from reprotune.data.spill import FEAT_BITS, Partitions, ordered_map

logger = logging.getLogger(__name__)

_PART_ENTRIES = 1 << 25  # (row, n-gram) entries counted at once (~256 MB); more: partitions
_DF_ENTRY = np.dtype([("f", "<u8")])  # a feature hash, for the document frequencies
_ROW_ENTRY = np.dtype([("f", "<u8"), ("r", "<i4"), ("c", "<f4")])  # feature, row, count


def _columns(vocab: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Position in the sorted ``vocab`` of each feature hash in ``q`` (all present).

    Hashes are uniform, so a table of bucket starts on their top bits lands within a few
    steps of the answer, where a binary search would take ~25 cache misses per query.
    """
    bits = min(max(1, int(vocab.size).bit_length() - 2), FEAT_BITS)
    shift = U64(FEAT_BITS - bits)
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
        lens = lengths(texts)
        cap = int(sum(np.clip(lens - k + 1, 0, None).sum() for k in range(nmin, nmax + 1)))
        parts = Partitions(max(0, int(np.ceil(np.log2(max(cap, 1) / _PART_ENTRIES)))), _DF_ENTRY)
        sig = np.full((n, num_perm), EMPTY, dtype=np.uint32)
        has = np.zeros(n, dtype=bool)
        salt = mix(np.array([seed], dtype=U64))[0]
        common = common_features(texts, nmin, nmax)
        spans = chunks(lens)
        jobs = ((texts[a:b], nmin, nmax, common, salt, num_perm) for a, b in spans)
        for (a, b), (rows, feats, block) in zip(
                tqdm(spans, desc="n-grams + MinHash", unit="chunk", leave=False,
                     disable=not progress or len(spans) < 4),
                ordered_map(minhash_chunk, jobs, workers), strict=True):
            parts.add(feats.view(_DF_ENTRY))
            has[rows + a] = True
            sig[a:b] = block
        n_features = 0
        for p in range(parts.count):
            entries = parts.load(p).view(U64)
            entries.sort()
            vocab, df = sorted_counts(entries)
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
        for a in range(0, rows.size, CHUNK_DOCS):
            batch = [self.texts[k] for k in rows[a:a + CHUNK_DOCS].tolist()]
            for _, r, f, c in features(batch, nmin, nmax):
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
