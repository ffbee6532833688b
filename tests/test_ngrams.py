"""ngrams: normalisation and the hashed char n-grams of a chunk of texts."""

import numpy as np

from reprotune.data.ngrams import CHUNK_DOCS, chunk_features, chunks, normalise
from reprotune.data.similarity import near_duplicate_pairs


def test_normalise_lowercases_and_collapses_whitespace_runs() -> None:
    assert normalise("Hello \t World\n\nX y") == "hello world x y"  # a lone tab or newline stays
    assert normalise("A\tB") == "a\tb"


def test_chunk_features_counts_distinct_ngrams_per_text() -> None:
    rows, feats, counts = chunk_features(["abab", "cd"], 2, 2)
    # "abab": ab x2, ba x1; "cd": cd x1; no "bc" across the two texts
    assert rows.tolist() == [0, 0, 1]
    assert sorted(counts[:2].tolist()) == [1.0, 2.0] and counts[2] == 1.0
    assert len(set(feats.tolist())) == 3
    again = chunk_features(["cd"], 2, 2)[1]
    assert again.tolist() == feats[2:].tolist()  # a feature does not depend on its neighbours


def test_texts_shorter_than_the_ngrams_have_no_features() -> None:
    rows, feats, counts = chunk_features(["a", "b"], 2, 4)
    assert rows.size == feats.size == counts.size == 0
    assert (rows.dtype, feats.dtype, counts.dtype) == (np.int64, np.uint64, np.float32)
    assert near_duplicate_pairs(["a", "b", "c"], threshold=0.85, progress=False) == []


def test_chunks_bound_rows_and_characters() -> None:
    assert chunks([10, 20, 30]) == [(0, 3)]
    assert chunks([1_500_000, 1_500_000, 10]) == [(0, 1), (1, 3)]
    assert chunks([1] * (CHUNK_DOCS + 1)) == [(0, CHUNK_DOCS), (CHUNK_DOCS, CHUNK_DOCS + 1)]
    assert chunks([]) == []
