"""Near-duplicate text detection: character n-gram TF-IDF, MinHash-LSH blocking, exact verification.

Used by the dedup stage (pairs within one corpus) and by the split stage's leakage check
(val/test rows against earlier splits). Three steps, in bounded memory (1e6 rows: see
:class:`~reprotune.data.tfidf.NgramIndex` and docs/data.md "Data stages at scale"):

1. **Features** (:mod:`reprotune.data.ngrams`, :mod:`reprotune.data.tfidf`). The char
   n-grams (``ngram_range``, e.g. 2-4) of every lower-cased text whose whitespace runs are
   collapsed, hashed, with exact document frequencies counted partition by partition: the
   TF-IDF of scikit-learn's ``TfidfVectorizer(analyzer="char", sublinear_tf=True,
   norm="l2")``. Characters, not words, so Chinese and other unspaced text work.
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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reprotune.data.formats import REASONING
from reprotune.data.minhash import SEED, lsh_banding, lsh_candidates, signature_prefilter
from reprotune.data.preference import PAIR_FIELD
from reprotune.data.tfidf import NgramIndex

logger = logging.getLogger(__name__)


def _turns(msgs: list[dict[str, Any]]) -> list[str]:
    """``role: content`` per turn, plus its reasoning trace and its tool calls."""
    parts = []
    for m in msgs:
        s = f"{m.get('role', '')}: {m.get('content') or ''}"
        if m.get(REASONING):
            s += f"\n{REASONING}: {m[REASONING]}"
        if m.get("tool_calls"):
            s += "\n" + json.dumps(m["tool_calls"], ensure_ascii=False, sort_keys=True)
        parts.append(s)
    return parts


Turns = list[dict[str, Any]]


def _compared_turns(record: dict[str, Any]) -> tuple[Turns, Turns]:
    """(messages, a preference pair's rejected turns or []) of a record; either may be a
    JSON string (Parquet)."""
    msgs = record["messages"]
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    pair = record.get(PAIR_FIELD)
    if isinstance(pair, str):
        pair = json.loads(pair)
    return msgs, (pair["rejected"] if pair else [])


def record_text(record: dict[str, Any]) -> str:
    """Role-tagged text of a canonical record: ``role: content`` per message, plus each
    turn's reasoning trace and tool calls, and a preference pair's rejected answer.

    Tool calls are appended as sorted-key JSON so two rows calling the same function with
    different arguments differ; two rows that differ only in their thinking trace, or two
    pairs that share prompt and chosen answer but reject different answers, differ too (both
    are training examples). The ``tools`` schemas are left out: rows that differ only in
    the tools offered are the same conversation.
    """
    msgs, rejected = _compared_turns(record)
    return "\n".join(_turns(msgs) + (["rejected:", *_turns(rejected)] if rejected else []))


def content_chars(record: dict[str, Any]) -> int:
    """Characters a record's messages say (contents, reasoning and tool calls, and a pair's
    rejected answer, without the tags :func:`record_text` adds): what decides whether char
    n-grams can tell two rows apart."""
    msgs, rejected = _compared_turns(record)
    return sum(len(m.get("content") or "") + len(m.get(REASONING) or "")
               + (len(json.dumps(m["tool_calls"], ensure_ascii=False)) if m.get("tool_calls")
                  else 0) for m in [*msgs, *rejected])


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
                         progress: bool = True, eligible: np.ndarray | None = None
                         ) -> NearDuplicates:
    """Blocking + verification over ``texts``; see :func:`near_duplicate_pairs`.

    ``bands=None`` derives the LSH banding from ``threshold`` (:func:`lsh_banding`); a number
    uses ``num_perm / bands`` bins per band. With ``groups``, only pairs across groups count.
    ``workers`` processes extract the n-grams (:meth:`NgramIndex.build`; same result).
    ``eligible`` (bool per text): rows that may be near-duplicates at all; the others are
    never candidates (the dedup stage leaves rows too short for n-grams to exact keys).
    """
    if bands is None:
        bands, rows_per_band = lsh_banding(threshold, num_perm)
    else:
        rows_per_band = None
    t0 = time.perf_counter()
    index = NgramIndex.build(texts, ngram_range, num_perm=num_perm, seed=seed, workers=workers,
                             progress=progress)
    t1 = time.perf_counter()
    ok = index.has_features if eligible is None else index.has_features & eligible
    cand = lsh_candidates(index.sig, ok, bands, rows_per_band=rows_per_band,
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
