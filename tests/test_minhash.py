"""minhash: the signature prefilter of LSH candidates."""

import numpy as np
from ngram_texts import bench_texts

from reprotune.data.minhash import signature_prefilter
from reprotune.data.tfidf import NgramIndex


def test_signature_prefilter_keeps_near_duplicates_drops_unrelated() -> None:
    texts = bench_texts(100)
    index = NgramIndex.build(texts, progress=False)
    planted = np.array([(i - 1, i) for i in range(4, 100, 5)])  # each a 3-character edit
    unrelated = np.array([(i, i + 2) for i in range(5, 90, 10)])  # two random Chinese texts
    assert signature_prefilter(index.sig, planted, 0.85).all()
    assert not signature_prefilter(index.sig, unrelated, 0.85).any()
    assert (index.cosine(planted[:, 0], planted[:, 1]) >= 0.85).all()  # pairs the check must keep
