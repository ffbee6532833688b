"""Deduplication of canonical records: quality filters -> exact duplicates -> near-duplicates.

Each step is a separate, tested function; :func:`run_dedup` chains them. Every input row ends
up either kept or in ``dropped`` with one reason, so ``in == kept + sum(dropped)``.

- Exact duplicates: same SHA-256 of the normalised role-tagged text (:func:`normalize_text`).
- Near duplicates: char n-gram TF-IDF cosine >= ``threshold`` (:mod:`reprotune.data.similarity`);
  pairs are joined transitively (union-find), so a chain a~b~c is one cluster even when a and
  c are further apart; each dropped row records its actual similarity to the kept row.
- The kept row of a cluster is its earliest row in input order: the result depends on the
  input order only, never on hashing or pair order. (Reordering the input can change which
  member of a cluster is kept, never how many rows are kept.)
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from reprotune.data import quality
from reprotune.data.similarity import SEED, find_near_duplicates, record_text

logger = logging.getLogger(__name__)

REASONS = (*quality.REASONS, "exact_duplicate", "near_duplicate")
_WS = re.compile(r"\s+")


class DedupConfig(quality.QualityConfig, Protocol):
    threshold: float
    ngram_min: int
    ngram_max: int
    num_perm: int
    bands: int
    sample_pairs: int


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]  # {id, source, reason, duplicate_of, similarity}
    metrics: dict[str, Any]
    sample_pairs: list[dict[str, Any]] = field(default_factory=list)


def normalize_text(text: str) -> str:
    """Key text for exact duplicates: NFKC, case-folded, whitespace runs -> one space, stripped.

    NFKC folds full-width / half-width variants (``，`` -> ``,``); punctuation is kept because
    it can change meaning (code, numbers) -- punctuation-only variants are near-duplicates.
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text with the same normalised form."""
    first: dict[bytes, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        key = hashlib.sha256(normalize_text(t).encode("utf-8")).digest()
        j = first.setdefault(key, i)
        out.append(None if j == i else j)
    return out


def union_find_clusters(n: int, pairs: Iterable[tuple[int, int] | tuple[int, int, float]]
                        ) -> list[list[int]]:
    """Connected components of ``pairs`` over ``range(n)``: sorted clusters of 2+ members,
    ordered by their first member. Independent of the order of ``pairs``."""
    parent = list(range(n))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for pair in pairs:
        a, b = find(pair[0]), find(pair[1])
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is always the smallest member
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for _, g in sorted(groups.items()) if len(g) > 1]


def choose_representative(cluster: Iterable[int]) -> int:
    """The row kept for a cluster: its earliest row in input order (indices are unique)."""
    return min(cluster)


def _sample_pairs(pairs: list[tuple[int, int, float]], k: int, texts: dict[int, str],
                  records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``k`` pairs spread evenly over the similarity range (lowest = most borderline first)."""
    if not pairs or k <= 0:
        return []
    ordered = sorted(pairs, key=lambda p: (p[2], p[0], p[1]))
    picks = sorted({int(round(x)) for x in np.linspace(0, len(ordered) - 1, min(k, len(ordered)))})
    return [{"similarity": round(s, 4),
             "a": {"id": records[i]["id"], "source": records[i].get("source"), "text": texts[i][:300]},
             "b": {"id": records[j]["id"], "source": records[j].get("source"), "text": texts[j][:300]}}
            for i, j, s in (ordered[p] for p in picks)]


def run_dedup(records: Sequence[dict[str, Any]], cfg: DedupConfig, *,
              progress: bool = True) -> DedupResult:
    """Quality filters, then exact, then near-duplicate removal (see the module docstring)."""
    filters = quality.make_filters(cfg)
    dropped: dict[int, dict[str, Any]] = {}

    def drop(i: int, reason: str, dup_of: int | None = None, sim: float | None = None) -> None:
        dropped[i] = {"id": records[i]["id"], "source": records[i].get("source"), "reason": reason,
                      "duplicate_of": None if dup_of is None else records[dup_of]["id"],
                      "similarity": None if sim is None else round(float(sim), 4)}

    good = []
    for i, rec in enumerate(tqdm(records, desc="quality", unit="row", disable=not progress,
                                 leave=False, mininterval=1)):
        reason = quality.first_failure(rec, filters)
        if reason is None:
            good.append(i)
        else:
            drop(i, reason)

    texts = [record_text(records[i]) for i in good]
    first_of = exact_duplicates(texts)
    uniq = [k for k, f in enumerate(first_of) if f is None]  # positions in `good`
    found = find_near_duplicates([texts[k] for k in uniq], threshold=cfg.threshold,
                                 ngram_range=(cfg.ngram_min, cfg.ngram_max),
                                 num_perm=cfg.num_perm, bands=cfg.bands, seed=SEED,
                                 progress=progress)
    clusters = union_find_clusters(len(uniq), found.pairs)
    rep_of = np.arange(len(uniq))  # position in `uniq` of each row's kept row
    for cluster in clusters:
        rep_of[cluster] = choose_representative(cluster)
    members = np.flatnonzero(rep_of != np.arange(len(uniq)))
    sims = found.index.cosine(members, rep_of[members])
    sim_to_rep = dict(zip(members.tolist(), sims.tolist(), strict=True))
    for u, s in zip(members.tolist(), sims.tolist(), strict=True):
        drop(good[uniq[u]], "near_duplicate", good[uniq[rep_of[u]]], s)
    pos_in_uniq = {k: u for u, k in enumerate(uniq)}
    for k, f in enumerate(first_of):
        if f is not None:  # point at the row finally kept for the first occurrence
            u = pos_in_uniq[f]
            drop(good[k], "exact_duplicate", good[uniq[rep_of[u]]], sim_to_rep.get(u, 1.0))

    kept = [records[i] for i in range(len(records)) if i not in dropped]
    counts = {r: 0 for r in REASONS}
    for d in dropped.values():
        counts[d["reason"]] += 1
    metrics = {
        "in": len(records), "kept": len(kept), "dropped": counts,
        "threshold": cfg.threshold, "near_dup_clusters": len(clusters),
        "near_dup_pairs": len(found.pairs), "lsh_candidate_pairs": found.n_candidates,
        # near-duplicates joined through a chain, less similar to the kept row than threshold
        "near_dup_below_threshold_to_kept": int(np.sum(sims < cfg.threshold - 1e-6)),
    }
    assert metrics["in"] == metrics["kept"] + sum(counts.values())
    logger.info("dedup: in %d, kept %d, dropped %s", len(records), len(kept), counts)
    return DedupResult(kept=kept, dropped=[dropped[i] for i in sorted(dropped)], metrics=metrics,
                       sample_pairs=_sample_pairs(
                           [(good[uniq[a]], good[uniq[b]], s) for a, b, s in found.pairs],
                           cfg.sample_pairs, dict(zip(good, texts, strict=True)), records))

