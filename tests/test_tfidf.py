"""tfidf.NgramIndex: cosines equal scikit-learn's, partitioned = one partition, bounded df memory."""

import numpy as np
import pytest
from ngram_texts import bench_texts
from sklearn.feature_extraction.text import TfidfVectorizer

from reprotune.data import tfidf
from reprotune.data.similarity import find_near_duplicates
from reprotune.data.spill import DiskTexts
from reprotune.data.tfidf import NgramIndex

# Mixed case, whitespace runs (collapsed by both sides), tabs, digits, CJK and mixed rows.
MIXED = [
    "Hello   World, hello world!",
    "hello world\t\tand  GOODBYE",
    "计算 12 加 7 等于多少？答案是 19。",
    "答案是 19。计算很简单。",
    "Translate 'apple' into Chinese: 苹果",
    "把“苹果”翻译成英文：apple",
    "aaaa aaaa aaaa",
    "x",  # no 2-gram at all: a zero row on both sides
]


def test_tfidf_cosines_equal_scikit_learn() -> None:
    index = NgramIndex.build(MIXED, (2, 4), progress=False)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(2, 4), sublinear_tf=True, norm="l2")
    x = vec.fit_transform(MIXED)
    want = (x @ x.T).toarray()
    assert index.vocab.size == len(vec.vocabulary_)
    i, j = np.triu_indices(len(MIXED), 1)
    np.testing.assert_allclose(index.cosine(i, j), want[i, j], atol=1e-5)
    # The whole matrix too, diagonal included (unit rows, except the featureless one).
    m = index.tfidf_matrix()
    np.testing.assert_allclose((m @ m.T).toarray(), want, atol=1e-5)
    assert index.has_features.tolist() == [True] * 7 + [False]
    assert 0.0 < want[0, 1] < 1.0  # the comparison is not trivially all zeros / ones


def test_cosines_equal_scikit_learn_for_other_ngram_range() -> None:
    index = NgramIndex.build(MIXED, (1, 3), progress=False)
    x = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True,
                        norm="l2").fit_transform(MIXED)
    i, j = np.triu_indices(len(MIXED), 1)
    np.testing.assert_allclose(index.cosine(i, j), (x @ x.T).toarray()[i, j], atol=1e-5)


def test_partitioned_index_equals_one_partition(monkeypatch) -> None:
    texts = bench_texts(300) + MIXED
    one = find_near_duplicates(texts, threshold=0.85, progress=False)
    assert one.index.parts.count == 1
    monkeypatch.setattr(tfidf, "_PART_ENTRIES", 2_000)
    many = find_near_duplicates(DiskTexts(texts), threshold=0.85, progress=False)
    assert many.index.parts.count >= 64  # spilled to files, counted one partition at a time
    assert many.index.n_features == one.index.n_features == one.index.vocab.size
    assert many.pairs == one.pairs and len(one.pairs) >= 50  # identical floats too
    i, j = np.triu_indices(len(texts), 1)
    np.testing.assert_array_equal(many.index.cosine(i, j), one.index.cosine(i, j))
    with pytest.raises(ValueError, match="partitions"):
        _ = many.index.vocab  # the whole vocabulary is never in memory


def test_df_partitions_stay_bounded_as_rows_grow(monkeypatch) -> None:
    """What one partition holds while counted does not grow with the corpus: more rows give
    more partitions, each about ``_PART_ENTRIES`` (row, n-gram) entries at most."""
    monkeypatch.setattr(tfidf, "_PART_ENTRIES", 20_000)
    largest, counts = [], []
    for n in (100, 400):
        index = NgramIndex.build(bench_texts(n), progress=False)
        entries = [int(index.parts.derived(p)["df"].sum()) for p in range(index.parts.count)]
        largest.append(max(entries))
        counts.append(index.parts.count)
    assert counts[1] >= 4 * counts[0] >= 4
    assert max(largest) <= 20_000 and min(largest) > 20_000 / 4


def test_worker_processes_give_the_same_index() -> None:
    texts = bench_texts(200)
    a = find_near_duplicates(texts, threshold=0.85, progress=False)
    b = find_near_duplicates(texts, threshold=0.85, workers=2, progress=False)
    assert a.pairs == b.pairs and np.array_equal(a.index.sig, b.index.sig)
