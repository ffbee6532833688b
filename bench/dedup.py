"""Benchmark the dedup stage: wall time, peak memory, recall and precision on planted duplicates.

Generates ``--rows`` synthetic canonical records (English, Chinese and mixed text, 50-800
characters, Zipf-distributed vocabularies so unrelated rows share common n-grams as real text
does), plants near-duplicates (a few character / word substitutions and punctuation changes,
scaled to the text length) and exact duplicates (the same text with case and whitespace
changes), shuffles, and runs :func:`reprotune.data.dedup.run_dedup` with the default ``dedup`` params.

Recall counts a planted pair as found when both rows end with the same kept row. Planted
near-duplicate pairs whose actual TF-IDF cosine (fitted on the whole generated corpus) is
below the threshold are reported but not counted: they are not near-duplicates by definition.
Precision is the share of near-duplicate drops whose kept row is in the same planted family.

    .venv/bin/python bench/dedup.py --rows 100000 --out bench/results/dedup_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io  # noqa: E402
from reprotune.data.dedup import run_dedup  # noqa: E402
from reprotune.data.similarity import record_text  # noqa: E402
from reprotune.data.tfidf import NgramIndex  # noqa: E402
from reprotune.params import DedupParams, as_dict  # noqa: E402

HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
EN_PUNCT, ZH_PUNCT = [",", ".", ";", "!", "?"], ["，", "。", "、", "！", "？"]


class TextMaker:
    """Seeded generator of English, Chinese and mixed pseudo-text with Zipf word frequencies."""

    def __init__(self, rng: np.random.Generator, n_words: int = 20000) -> None:
        self.rng = rng
        cons, vow = "bcdfghjklmnprstvwyz", "aeiou"
        words: set[str] = set()
        while len(words) < n_words:
            k = int(rng.integers(1, 4))
            w = "".join(cons[rng.integers(19)] + vow[rng.integers(5)] for _ in range(k))
            words.add(w + (cons[rng.integers(19)] if rng.random() < 0.5 else ""))
        self.words = sorted(words)
        self.w_cdf = np.cumsum(1 / np.arange(1, n_words + 1) ** 1.05)
        self.h_cdf = np.cumsum(1 / np.arange(1, len(HAN) + 1) ** 0.9)

    def _pick(self, cdf: np.ndarray, k: int) -> np.ndarray:
        return np.searchsorted(cdf, self.rng.random(k) * cdf[-1])

    def english(self, length: int) -> str:
        idx = self._pick(self.w_cdf, length // 4 + 4)
        out = []
        for n, i in enumerate(idx):
            out.append(self.words[i])
            if n % 9 == 8:
                out[-1] += EN_PUNCT[n % 5]
        return " ".join(out)[:length]

    def chinese(self, length: int) -> str:
        chars = [HAN[i] for i in self._pick(self.h_cdf, length)]
        for p in range(11, length, 13):
            chars[p] = ZH_PUNCT[p % 5]
        return "".join(chars)

    def mixed(self, length: int) -> str:
        zh = list(self.chinese(length))
        for p in self.rng.integers(0, max(1, length), size=length // 25):
            zh[p] = f" {self.words[self._pick(self.w_cdf, 1)[0]]} "
        return "".join(zh)[:length]

    def text(self, length: int) -> str:
        u = self.rng.random()
        return self.english(length) if u < 0.45 else self.chinese(length) if u < 0.85 else self.mixed(length)

    def edit(self, text: str, k: int) -> str:
        """``k`` random edits: character or word substitutions and punctuation changes."""
        t = list(text)
        for _ in range(k):
            p, kind = int(self.rng.integers(len(t))), self.rng.random()
            zh = not t[p].isascii()  # Han characters and CJK punctuation
            if kind < 0.4:  # character substitution within the same script
                t[p] = HAN[self._pick(self.h_cdf, 1)[0]] if zh else "abcdefghijklmnopqrstuvwxyz"[self.rng.integers(26)]
            elif kind < 0.7:  # word substitution (two characters for Chinese)
                if zh:
                    t[p:p + 2] = [HAN[i] for i in self._pick(self.h_cdf, 2)]
                else:
                    while p > 0 and t[p - 1].isascii() and t[p - 1].isalpha():
                        p -= 1
                    end = p
                    while end < len(t) and t[end].isascii() and t[end].isalpha():
                        end += 1
                    t[p:end] = list(self.words[self._pick(self.w_cdf, 1)[0]])
            else:  # punctuation inserted, removed or replaced
                punct = ZH_PUNCT if zh else EN_PUNCT
                if t[p] in punct:
                    t[p] = "" if self.rng.random() < 0.5 else punct[self.rng.integers(5)]
                else:
                    t.insert(p, punct[self.rng.integers(5)])
        return "".join(t)


def _record(i: int, user: str, answer: str) -> dict:
    return {"id": f"b{i:07d}", "source": f"bench:{i + 1}", "tools": None, "label": None, "group": None,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def make_corpus(rows: int, seed: int, near_frac: float, exact_frac: float,
                lengths: tuple[int, int] = (50, 800)):
    """Records (shuffled), planted near pairs and exact pairs (as row indices), and families."""
    rng = np.random.default_rng(seed)
    maker = TextMaker(rng)
    n_near, n_exact = int(rows * near_frac), int(rows * exact_frac)
    n_orig = rows - n_near - n_exact
    convs = []
    for _ in range(n_orig):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        cut = int(length * rng.uniform(0.2, 0.4))
        text = maker.text(length)
        convs.append((text[:cut], text[cut:]))
    family = list(range(n_orig))
    near, exact = [], []
    for _ in range(n_near):  # a light edit of a random original, scaled to its length
        src = int(rng.integers(n_orig))
        u, a = convs[src]
        k = max(1, int((len(u) + len(a)) * rng.uniform(0.3, 1.2) / 100))
        ku = int(rng.binomial(k, len(u) / (len(u) + len(a))))
        convs.append((maker.edit(u, ku) if ku else u, maker.edit(a, k - ku) if k - ku else a))
        family.append(src)
        near.append((src, len(convs) - 1))
    for _ in range(n_exact):  # same text, other case and a doubled space (n-grams unchanged)
        src = int(rng.integers(len(convs)))
        u, a = convs[src]
        convs.append((u.upper(), a.replace(" ", "  ", 1)))
        family.append(family[src])
        exact.append((src, len(convs) - 1))
    perm = rng.permutation(len(convs))  # perm[new position] = generated index
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    records = [_record(new, *convs[old]) for new, old in enumerate(perm)]
    fam = [family[old] for old in perm]
    near = [(int(where[a]), int(where[b])) for a, b in near]
    exact = [(int(where[a]), int(where[b])) for a, b in exact]
    return records, near, exact, fam


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near-frac", type=float, default=0.10)
    ap.add_argument("--exact-frac", type=float, default=0.03)
    ap.add_argument("--min-len", type=int, default=50, help="shortest conversation (characters)")
    ap.add_argument("--max-len", type=int, default=800, help="longest conversation (characters)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    cfg = DedupParams()

    t0 = time.perf_counter()
    records, near, exact, fam = make_corpus(args.rows, args.seed, args.near_frac, args.exact_frac,
                                            (args.min_len, args.max_len))
    gen_s = time.perf_counter() - t0
    rss_before = rss_mib()

    t0 = time.perf_counter()
    result = run_dedup(records, cfg)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    index = {r["id"]: i for i, r in enumerate(records)}
    kept_as = list(range(len(records)))
    for d in result.dropped:
        if d["duplicate_of"] is not None:
            kept_as[index[d["id"]]] = index[d["duplicate_of"]]
    quality_dropped = {index[d["id"]] for d in result.dropped if d["duplicate_of"] is None}
    texts = [record_text(r) for r in records]
    pairs = np.array(near, dtype=np.int64).reshape(-1, 2)
    cos = NgramIndex.build(texts, (cfg.ngram_min, cfg.ngram_max), progress=False).cosine(pairs[:, 0], pairs[:, 1])
    eligible = [(a, b) for (a, b), c in zip(near, cos, strict=True)
                if c >= cfg.threshold and a not in quality_dropped and b not in quality_dropped]
    found = sum(kept_as[a] == kept_as[b] for a, b in eligible)
    exact_found = sum(kept_as[a] == kept_as[b] for a, b in exact)
    near_drops = [d for d in result.dropped if d["reason"] == "near_duplicate"]
    true_drops = sum(fam[index[d["id"]]] == fam[index[d["duplicate_of"]]] for d in near_drops)

    figures = {
        "rows": len(records), "generate_s": round(gen_s, 1), "dedup_wall_s": round(wall, 1),
        "rss_before_dedup_mib": round(rss_before), "peak_rss_mib": round(peak),
        "planted_near_pairs": len(near),
        "planted_near_below_threshold": int(np.sum(cos < cfg.threshold)),
        "planted_near_cosine_min_median": [round(float(cos.min()), 4), round(float(np.median(cos)), 4)],
        "near_recall": round(found / max(1, len(eligible)), 5), "near_found": found,
        "near_eligible": len(eligible),
        "exact_recall": round(exact_found / max(1, len(exact)), 5), "planted_exact_pairs": len(exact),
        "near_precision": round(true_drops / max(1, len(near_drops)), 5),
        "near_drops_not_planted": len(near_drops) - true_drops,
        "metrics": result.metrics,
    }
    command = "python bench/dedup.py " + " ".join(sys.argv[1:])
    import scipy
    import sklearn

    report = {"machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                         f"{platform.system()} {platform.release()}",
              "versions": {"python": platform.python_version(), "numpy": np.__version__,
                           "scipy": scipy.__version__, "scikit-learn": sklearn.__version__},
              "command": command, "params": as_dict(cfg), "figures": figures}
    for k, v in figures.items():
        print(f"{k:32s} {v}")
    print(f"command: {command}")
    if args.out:
        io.write_json(args.out, report)


if __name__ == "__main__":
    main()
