"""The leakage check's LSH banding follows its threshold: recall on planted pairs at 0.7."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reprotune.data.minhash import banding_recall, jaccard_floor, lsh_banding
from reprotune.data.similarity import earlier_group_matches, find_near_duplicates
from reprotune.data.tfidf import NgramIndex


def _planted_edge_pairs(n: int = 800) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` train texts (English-like words, or Chinese characters) and one edited copy of
    each in test, edited just enough to land at TF-IDF cosine ~0.70-0.80: the pairs a check at
    0.7 must find and a banding tuned for 0.85 starts to miss."""
    rnd = random.Random(0)
    vocab = ["".join(rnd.choice("bcdfghjklmnprstvwz") + rnd.choice("aeiou")
                     for _ in range(rnd.randint(1, 3))) for _ in range(3000)]
    han = [chr(0x4E00 + i) for i in range(2000)]
    train = []
    for i in range(n):
        size = rnd.randint(100, 600)
        train.append("".join(rnd.choice(han) for _ in range(size // 2)) if i % 2 else
                     " ".join(rnd.choice(vocab) for _ in range(size // 5)))
    test = []
    for i, t in enumerate(train):
        unit, pool = (list(t), han) if i % 2 else (t.split(" "), vocab)
        for k in rnd.sample(range(len(unit)), max(1, int(len(unit) * (0.095 if i % 2 else 0.25)))):
            unit[k] = rnd.choice(pool)
        test.append("".join(unit) if i % 2 else " ".join(unit))
    texts = train + test
    groups = np.array([0] * n + [1] * n)
    cos = NgramIndex.build(texts, progress=False).cosine(np.arange(n), np.arange(n, 2 * n))
    return texts, groups, cos


def test_banding_follows_the_threshold() -> None:
    assert lsh_banding(0.85) == (25, 5)
    assert lsh_banding(0.7) == (42, 3)
    for t in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        bands, rows = lsh_banding(t)
        assert bands * rows <= 128
        assert banding_recall(jaccard_floor(t), bands, rows) >= 0.95
        if rows < 128:  # one more row per band would miss the target
            assert banding_recall(jaccard_floor(t), 128 // (rows + 1), rows + 1) < 0.95
    # the old fixed 32 x 4 banding was tuned for 0.85 and catches only 60% at 0.7's floor
    assert banding_recall(jaccard_floor(0.7), 32, 4) == pytest.approx(0.60, abs=0.01)


def test_recall_on_planted_pairs_at_0_7() -> None:
    texts, groups, cos = _planted_edge_pairs()
    n = len(texts) // 2
    eligible = {k for k in range(n) if cos[k] >= 0.7}
    edge = {k for k in eligible if cos[k] < 0.75}
    assert len(eligible) == 790 and len(edge) == 434  # the generator's planted pairs
    hits = earlier_group_matches(texts, groups, threshold=0.7, progress=False)
    found = {row - n for row, _, _ in hits}
    assert all(match == row - n for row, match, _ in hits)  # each found its own original
    assert found == eligible  # recall 1.0, precision 1.0
    old = find_near_duplicates(texts, threshold=0.7, bands=32, groups=groups, progress=False)
    old_found = {b - n for _, b, _ in old.pairs}
    assert len(old_found & eligible) == 760 and len(old_found & edge) == 417  # 96%: misses


def test_earlier_group_matches_keeps_the_best_earlier_row() -> None:
    a = "the quick brown fox jumps over the lazy dog near the river bank"
    texts = [a, a + " today", "unrelated text about databases and indexes", a + "!", a]
    hits = earlier_group_matches(texts, [0, 0, 1, 1, 2], threshold=0.8, progress=False)
    # row 3 (group 1) best matches row 0; row 4 (group 2) is an exact copy of row 0
    assert [(r, m) for r, m, _ in hits] == [(3, 0), (4, 0)]
    with pytest.raises(ValueError, match="non-decreasing"):
        earlier_group_matches(texts, [1, 0, 0, 0, 0], threshold=0.8, progress=False)
