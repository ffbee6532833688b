"""Character n-gram features: the hashed n-grams that MinHash and TF-IDF both work on.

The char n-grams (``ngram_range``, e.g. 2-4) of every lower-cased text whose whitespace runs
are collapsed, exactly as scikit-learn's ``TfidfVectorizer(analyzer="char")`` defines them.
Characters, not words, so Chinese and other unspaced text work. The n-grams are hashed with
numpy (vectorised over a chunk of texts) instead of scikit-learn's per-character Python loop,
which took 65 s for 20k rows here; tests check the TF-IDF cosines built on them
(:mod:`reprotune.data.tfidf`) equal scikit-learn's. A feature is a
:data:`~reprotune.data.spill.FEAT_BITS`-bit (52) hash of the n-gram: a collision between two
distinct n-grams is expected about once per 1e8 distinct n-grams and only merges two features.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from reprotune.data.spill import FEAT_BITS, DiskTexts

U64 = np.uint64
_WS = re.compile(r"\s\s+")  # scikit-learn's char analyzer collapses runs of 2+ whitespace
DOC_BITS = 64 - FEAT_BITS  # row-in-chunk bits packed above the feature hash for one sort
CHUNK_DOCS = 1 << DOC_BITS  # rows per extraction chunk at most
_CHUNK_CHARS = 2_000_000  # bounds the temporary arrays of one extraction chunk
_FNV_OFFSET = U64(0xCBF29CE484222325)
_FNV_PRIME = U64(0x100000001B3)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: a well-spread 64-bit hash of each element (new array)."""
    x = x ^ (x >> U64(30))
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


def normalise(text: str) -> str:
    """scikit-learn's char-analyzer preprocessing: lower-case, whitespace runs -> one space."""
    return _WS.sub(" ", text.lower())


def lengths(texts: Sequence[str]) -> np.ndarray:
    """Length in characters of each text (before normalisation: an upper bound after it)."""
    if isinstance(texts, DiskTexts):
        return texts.lengths
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


def sorted_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts of an already sorted array."""
    if not x.size:
        return x[:0].copy(), np.empty(0, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    return x[first], np.diff(np.r_[first, x.size])


def chunks(lens: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges of at most CHUNK_DOCS rows and about _CHUNK_CHARS characters."""
    out, start, chars = [], 0, 0
    for i, n in enumerate(lens):
        if i > start and (i - start >= CHUNK_DOCS or chars + n > _CHUNK_CHARS):
            out.append((start, i))
            start, chars = i, 0
        chars += n
    if start < len(lens):
        out.append((start, len(lens)))
    return out


def chunk_features(texts: Sequence[str], nmin: int, nmax: int) -> tuple[np.ndarray, ...]:
    """(row-in-chunk, feature hash, count) of every distinct n-gram of each (already
    normalised) text, row-sorted; at most CHUNK_DOCS texts."""
    lens = lengths(texts)
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(U64)
    total, ends = cp.size, np.cumsum(lens)
    doc = np.repeat(np.arange(len(texts), dtype=U64), lens) << U64(FEAT_BITS)
    state = np.full(total, _FNV_OFFSET, dtype=U64)  # FNV-1a of the n chars starting at i
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
        h = mix(st[valid] ^ U64(n))
        keys.append(doc[:m][valid] | (h >> U64(DOC_BITS)))
    uniq, counts = sorted_counts(np.sort(np.concatenate(keys)) if keys else np.empty(0, U64))
    return ((uniq >> U64(FEAT_BITS)).astype(np.int64), uniq & U64((1 << FEAT_BITS) - 1),
            counts.astype(np.float32))


def features(texts: Sequence[str], nmin: int, nmax: int, *, desc: str | None = None
             ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (first row, rows, feats, counts) per chunk of ``texts`` (normalised here)."""
    spans = chunks(lengths(texts))
    for a, b in tqdm(spans, desc=desc, unit="chunk", disable=desc is None or len(spans) < 4,
                     leave=False):
        r, f, c = chunk_features([normalise(t) for t in texts[a:b]], nmin, nmax)
        yield a, r + a, f, c
