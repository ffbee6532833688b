"""One near-duplicate step for bench/data_scale.py, in its own process (for its own peak RSS).

    python bench/scale_compare.py {ours|datasketch} <bench folder> <result.json>

Both start from the rows the dedup stage's near-duplicate step sees (ingested rows that pass
the quality filters, exact duplicates removed) and use the dedup params (threshold 0.85,
char 2-4-grams, 128 permutations, 32 bands of 4):

* ``ours``: :func:`reprotune.data.similarity.find_near_duplicates` (one-permutation MinHash
  over the n-gram hashes, common n-grams left out, numpy banding, TF-IDF verification);
* ``datasketch``: ``MinHash(num_perm=128).update_batch`` over each row's set of char
  2-4-grams (the same normalisation), ``MinHashLSH(num_perm=128, params=(32, 4))`` insert and
  query, then the same TF-IDF cosine verification of its candidates.

Recall: planted near pairs at cosine >= threshold (``near_eligible.npy``, written by
scale_data.score_dedup) whose rows end in one cluster (union-find over the found pairs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io  # noqa: E402
from reprotune.data import quality  # noqa: E402
from reprotune.data.dedup import exact_duplicates, union_find_clusters  # noqa: E402
from reprotune.data.similarity import find_near_duplicates, record_text  # noqa: E402
from reprotune.data.tfidf import NgramIndex  # noqa: E402
from reprotune.params import DedupParams  # noqa: E402


def _rows(d: Path) -> tuple[list[str], list[int]]:
    """Texts of the near-duplicate step's input and each one's file position."""
    cfg = DedupParams()
    filters = quality.make_filters(cfg)
    texts, where = [], []
    for rec in io.read_jsonl(d / "data/interim/ingested.jsonl"):
        if quality.first_failure(rec, filters) is None:
            texts.append(record_text(rec))
            where.append(int(rec["source"].rsplit(":", 1)[1]) - 1)
    first = exact_duplicates(texts)
    keep = [i for i, f in enumerate(first) if f is None]
    return [texts[i] for i in keep], [where[i] for i in keep]


def _datasketch_pairs(texts: list[str], cfg: DedupParams) -> tuple[np.ndarray, dict]:
    """Candidate pairs from datasketch's MinHash + MinHashLSH (same n-gram sets and banding)."""
    from datasketch import MinHash, MinHashLSH

    from reprotune.data.ngrams import normalise  # the char analyzer's preprocessing

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.num_perm // cfg.bands))
    sigs = []
    for i, text in enumerate(texts):
        t = normalise(text)
        grams = {t[k:k + n] for n in range(cfg.ngram_min, cfg.ngram_max + 1)
                 for k in range(len(t) - n + 1)}
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([g.encode("utf-8") for g in grams])
        lsh.insert(i, m)
        sigs.append(m)
    t_build = time.perf_counter() - t0
    pairs = set()
    for i, m in enumerate(sigs):
        pairs.update((min(i, j), max(i, j)) for j in lsh.query(m) if j != i)
    cand = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return cand, {"minhash_and_insert_s": round(t_build, 1),
                  "query_s": round(time.perf_counter() - t0 - t_build, 1)}


def main() -> None:
    impl, d, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = DedupParams()
    texts, where = _rows(d)
    # high-water mark before the step (VmHWM: ru_maxrss would count the parent's pre-exec pages)
    rss_in = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                  if x.startswith("VmHWM")) / 1024
    t0 = time.perf_counter()
    if impl == "ours":
        found = find_near_duplicates(texts, threshold=cfg.threshold,
                                     ngram_range=(cfg.ngram_min, cfg.ngram_max),
                                     num_perm=cfg.num_perm, bands=cfg.bands, progress=False)
        pairs, n_cand, extra = found.pairs, found.n_candidates, {}
    else:
        cand, extra = _datasketch_pairs(texts, cfg)
        t1 = time.perf_counter()
        index = NgramIndex.build(texts, (cfg.ngram_min, cfg.ngram_max), num_perm=8, progress=False)
        sims = index.cosine(cand[:, 0], cand[:, 1])
        hit = sims >= cfg.threshold - 1e-6
        pairs = [(int(a), int(b), float(s)) for (a, b), s in zip(cand[hit], sims[hit], strict=True)]
        n_cand = len(cand)
        extra["verify_s"] = round(time.perf_counter() - t1, 1)
    wall = time.perf_counter() - t0
    cluster = np.arange(len(texts))
    for members in union_find_clusters(len(texts), pairs):
        cluster[members] = members[0]
    at = {p: i for i, p in enumerate(where)}
    eligible = np.load(d / "near_eligible.npy")
    ok = [(a, b) for a, b in eligible.tolist() if a in at and b in at]
    found_n = sum(cluster[at[a]] == cluster[at[b]] for a, b in ok)
    io.write_json(out, {"impl": impl, "rows": len(texts), "step_s": round(wall, 1), **extra,
                        "rss_before_step_mib": round(rss_in), "candidates": int(n_cand),
                        "pairs": len(pairs), "recall": round(float(found_n) / max(1, len(ok)), 5),
                        "eligible": len(ok)})


if __name__ == "__main__":
    main()
