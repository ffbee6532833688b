"""Deduplication of canonical records: quality filters -> exact duplicates -> near-duplicates.

Each step is a separate, tested function; :func:`run_dedup` chains them. Every input row ends
up either kept or in ``dropped`` with one reason, so ``in == kept + sum(dropped)``.

- Exact duplicates: same SHA-256 (first 16 bytes) of the normalised role-tagged text
  (:func:`normalize_text`).
- Near duplicates: char n-gram TF-IDF cosine >= ``threshold`` (:mod:`reprotune.data.similarity`)
  between rows of at least ``near_min_chars`` content characters (shorter rows: exact keys
  only, see :data:`NEAR_MIN_CHARS_WHY`); pairs are joined transitively (union-find), so a chain a~b~c is one cluster even when a and
  c are further apart; each dropped row records its actual similarity to the kept row.
- The kept row of a cluster is its earliest row in input order: the result depends on the
  input order only, never on hashing or pair order. (Reordering the input can change which
  member of a cluster is kept, never how many rows are kept.)

Memory (:func:`dedup_stream`): the rows are read twice, never held. Held globally per input
row: 1 byte (its reason code); per distinct text (first occurrence passing the filters):
8 bytes (its row number), 12 bytes for its text in a temporary file, ~130 bytes of exact key
(a 16-byte SHA-256 prefix in a dict, Python overhead included), 4 * ``num_perm`` bytes of
MinHash signature (512 with 128 permutations) and 1 byte: ~660 bytes, ~0.65 GB at 1e6 rows.
On top: one partition of n-gram entries while it is counted (<= ~256 MB of 8-byte entries,
:class:`~reprotune.data.tfidf.NgramIndex`), the pairs, and the chunk temporaries.
Measured peak RSS of the stage (bench/data_scale.py rows, docs/data.md "Data stages at scale"):
0.9 GiB at 1e5 rows (2.6 GiB with one unpartitioned index); 1e6 rows: see docs/data.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from reprotune.data import quality
from reprotune.data.minhash import SEED
from reprotune.data.similarity import content_chars, find_near_duplicates, record_text
from reprotune.data.spill import DiskTexts, ordered_map

logger = logging.getLogger(__name__)

REASONS = (*quality.REASONS, "exact_duplicate", "near_duplicate")
_WS = re.compile(r"\s+")


# Why rows shorter than dedup.near_min_chars (default 20) are compared on exact keys only:
# measured (bench/results/dedup_short_rows_cpu.json), one changed character takes the cosine
# of two 2-turn rows below 0.85 until their contents reach 20 (Chinese) to 24 (English)
# characters, so below 20 the n-grams cannot find a near copy, and the pairs they do find
# are distinct rows matched on the shared role tags ("user: q1111 / a1111" vs "q111 / a111",
# cosine 0.866: 566 distinct rows of 200k tiny ones were dropped).
NEAR_MIN_CHARS_WHY = "content shorter than dedup.near_min_chars: compared on exact keys only"


class DedupConfig(quality.QualityConfig, Protocol):
    threshold: float
    near_min_chars: int
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


def exact_key(text: str) -> bytes:
    """The exact-duplicate key: the first 16 bytes of the SHA-256 of :func:`normalize_text`."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).digest()[:16]


def exact_duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text with the same normalised form."""
    first: dict[bytes, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        j = first.setdefault(exact_key(t), i)
        out.append(None if j == i else j)
    return out


def union_find_clusters(n: int, pairs: Iterable[tuple[int, int] | tuple[int, int, float]]
                        ) -> list[list[int]]:
    """Connected components of ``pairs`` over ``range(n)``: sorted clusters of 2+ members,
    ordered by their first member. Independent of the order of ``pairs``; memory grows with
    the rows in pairs, not with ``n``."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for pair in pairs:
        if not (0 <= pair[0] < n and 0 <= pair[1] < n):
            raise IndexError(f"pair {pair[:2]} outside range({n})")
        a, b = find(pair[0]), find(pair[1])
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is always the smallest member
    groups: dict[int, list[int]] = {}
    for i in sorted(parent):
        groups.setdefault(find(i), []).append(i)
    return [g for _, g in sorted(groups.items()) if len(g) > 1]


def choose_representative(cluster: Iterable[int]) -> int:
    """The row kept for a cluster: its earliest row in input order (indices are unique)."""
    return min(cluster)


def _pick_pairs(pairs: list[tuple[int, int, float]], k: int) -> list[tuple[int, int, float]]:
    """``k`` pairs spread evenly over the similarity range (lowest = most borderline first)."""
    if not pairs or k <= 0:
        return []
    ordered = sorted(pairs, key=lambda p: (p[2], p[0], p[1]))
    picks = sorted({int(round(x)) for x in np.linspace(0, len(ordered) - 1, min(k, len(ordered)))})
    return [ordered[p] for p in picks]


@dataclass
class _Scan:
    """Pass 1 over the rows: what is kept globally, per row (see :func:`dedup_stream`)."""

    reason: np.ndarray  # int8 per row: 0 kept, else 1 + index in REASONS
    uniq: np.ndarray  # rows that passed the filters and are first of their exact key, in order
    texts: DiskTexts  # record_text of each ``uniq`` row, on disk
    exact_first: dict[int, int]  # exact-duplicate row -> first row with the same key
    chars: np.ndarray  # int32 per ``uniq`` row: its content_chars


def _check_batch(batch: list[dict[str, Any]], min_chars: int, max_chars: int,
                 max_repetition: float) -> list[tuple[str | None, bytes, str, int]]:
    """(first failing filter or None, exact key, role-tagged text, content characters) of
    each record."""
    filters = quality.make_filters(SimpleNamespace(min_chars=min_chars, max_chars=max_chars,
                                                   max_repetition=max_repetition))
    out: list[tuple[str | None, bytes, str, int]] = []
    for rec in batch:
        failed = quality.first_failure(rec, filters)
        text = "" if failed else record_text(rec)
        out.append((failed, b"" if failed else exact_key(text), text,
                    0 if failed else content_chars(rec)))
    return out


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for rec in rows:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _scan(rows: Iterable[dict[str, Any]], cfg: DedupConfig, workers: int, progress: bool
          ) -> _Scan:
    """Quality filters and exact-duplicate keys (:func:`exact_key`) in one pass."""
    code = {r: k + 1 for k, r in enumerate(REASONS)}
    reason, uniq, chars = array("b"), array("q"), array("i")
    texts = DiskTexts()
    first: dict[bytes, int] = {}
    exact_first: dict[int, int] = {}
    jobs = ((b, cfg.min_chars, cfg.max_chars, cfg.max_repetition) for b in _batches(rows, 2048))
    checked = (x for out in ordered_map(_check_batch, jobs, workers) for x in out)
    for i, (failed, key, text, n_chars) in enumerate(tqdm(checked, desc="quality + exact", unit="row",
                                                 disable=not progress, leave=False,
                                                 mininterval=1)):
        if failed is not None:
            reason.append(code[failed])
            continue
        j = first.setdefault(key, i)
        if j != i:
            reason.append(code["exact_duplicate"])
            exact_first[i] = j
        else:
            reason.append(0)
            uniq.append(i)
            chars.append(min(n_chars, 2**31 - 1))
            texts.append(text)
    return _Scan(np.frombuffer(reason, dtype=np.int8).copy(), np.frombuffer(uniq, np.int64).copy(),
                 texts, exact_first, np.frombuffer(chars, np.int32).copy())


def dedup_stream(read: Callable[[], Iterable[dict[str, Any]]], cfg: DedupConfig, *,
                 kept: Callable[[dict[str, Any]], None],
                 dropped: Callable[[dict[str, Any]], None],
                 workers: int = 1, progress: bool = True
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Quality filters, exact, then near-duplicate removal over two passes of ``read()``.

    Pass 1 (:func:`_scan`) keeps per row one byte (the reason code) and, per first
    occurrence, 8 bytes (its row number) plus its role-tagged text in a temporary file
    (:class:`~reprotune.data.spill.DiskTexts`, 12 bytes in memory), and a 16-byte key per
    distinct text in a dict (~130 bytes with Python's overhead); the near-duplicate index adds
    the MinHash signatures (4 * num_perm bytes per first occurrence). Pass 2 hands every row,
    in input order, to ``kept`` or (as ``{id, source, reason, duplicate_of, similarity}``)
    to ``dropped``. Returns the metrics and the sample pairs. ``workers`` processes run the
    filters and extract the n-grams; the result does not depend on their number.
    """
    t0 = time.perf_counter()
    scan = _scan(read(), cfg, workers, progress)
    t1 = time.perf_counter()
    n, uniq = scan.reason.size, scan.uniq
    eligible = scan.chars >= cfg.near_min_chars
    found = find_near_duplicates(scan.texts, threshold=cfg.threshold,
                                 ngram_range=(cfg.ngram_min, cfg.ngram_max),
                                 num_perm=cfg.num_perm, bands=cfg.bands, seed=SEED,
                                 workers=workers, progress=progress, eligible=eligible)
    clusters = union_find_clusters(uniq.size, found.pairs)
    rep_of = np.arange(uniq.size)  # position in `uniq` of each row's kept row
    for cluster in clusters:
        rep_of[cluster] = choose_representative(cluster)
    members = np.flatnonzero(rep_of != np.arange(uniq.size))
    # Each dropped row's cosine to its kept row: most pairs were verified already (the same
    # per-pair arithmetic, so the same float); only rows joined through a chain are computed.
    verified = {(a, b): s for a, b, s in found.pairs}
    sims = np.array([verified.get((r, u), np.nan) for u, r in
                     zip(members.tolist(), rep_of[members].tolist(), strict=True)], dtype=np.float32)
    chain = np.flatnonzero(np.isnan(sims))
    sims[chain] = found.index.cosine(members[chain], rep_of[members[chain]])
    sim_to_rep = dict(zip(members.tolist(), sims.tolist(), strict=True))
    dup_of: dict[int, tuple[int, float]] = {}  # dropped row -> (kept row, similarity)
    for u, s in sim_to_rep.items():
        dup_of[int(uniq[u])] = (int(uniq[rep_of[u]]), s)
    scan.reason[uniq[members]] = REASONS.index("near_duplicate") + 1
    for i, f in scan.exact_first.items():  # point at the row finally kept for the first one
        u = int(np.searchsorted(uniq, f))
        dup_of[i] = (int(uniq[rep_of[u]]), sim_to_rep.get(u, 1.0))
    t2 = time.perf_counter()
    picks = _pick_pairs(found.pairs, cfg.sample_pairs)
    wanted = {k for k, _ in dup_of.values()} | {int(uniq[x]) for a, b, _ in picks for x in (a, b)}
    ids: dict[int, tuple[str, Any]] = {}
    count = 0
    for i, rec in enumerate(read()):
        if i >= n:
            raise ValueError(f"dedup: the input grew between passes (over {n} rows)")
        count += 1
        if i in wanted:
            ids[i] = (rec["id"], rec.get("source"))
        if not scan.reason[i]:
            kept(rec)
            continue
        d = dup_of.get(i)
        dropped({"id": rec["id"], "source": rec.get("source"),
                 "reason": REASONS[scan.reason[i] - 1],
                 "duplicate_of": None if d is None else ids[d[0]][0],
                 "similarity": None if d is None else round(float(d[1]), 4)})
    if count != n:
        raise ValueError(f"dedup: the input changed between passes ({n} rows, then {count})")
    counts = {r: int(np.sum(scan.reason == k + 1)) for k, r in enumerate(REASONS)}
    metrics = {
        "in": n, "kept": int(np.sum(scan.reason == 0)), "dropped": counts,
        "threshold": cfg.threshold, "near_dup_clusters": len(clusters),
        "near_dup_pairs": len(found.pairs), "lsh_candidate_pairs": found.n_candidates,
        # distinct rows too short for n-grams (< near_min_chars): compared on exact keys only
        "near_dup_exact_only_rows": int(eligible.size - eligible.sum()),
        # near-duplicates joined through a chain, less similar to the kept row than threshold
        "near_dup_below_threshold_to_kept": int(np.sum(sims < cfg.threshold - 1e-6)),
    }
    assert metrics["in"] == metrics["kept"] + sum(counts.values())
    logger.info("dedup: in %d, kept %d, dropped %s; %.1f s filters + exact keys, %.1f s "
                "near duplicates, %.1f s writing", n, metrics["kept"], counts, t1 - t0, t2 - t1,
                time.perf_counter() - t2)

    def side(u: int) -> dict[str, Any]:
        i = int(uniq[u])
        return {"id": ids[i][0], "source": ids[i][1], "text": scan.texts[u][:300]}

    samples = [{"similarity": round(s, 4), "a": side(a), "b": side(b)} for a, b, s in picks]
    return metrics, samples


def run_dedup(records: Sequence[dict[str, Any]], cfg: DedupConfig, *, workers: int = 1,
              progress: bool = True) -> DedupResult:
    """:func:`dedup_stream` over rows in memory (see the module docstring)."""
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    metrics, samples = dedup_stream(lambda: records, cfg, kept=kept.append,
                                    dropped=dropped.append, workers=workers, progress=progress)
    return DedupResult(kept=kept, dropped=dropped, metrics=metrics, sample_pairs=samples)
