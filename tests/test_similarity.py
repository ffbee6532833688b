import json

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from reprotune.data import similarity
from reprotune.data.similarity import (
    NgramIndex,
    cross_near_duplicates,
    find_near_duplicates,
    near_duplicate_pairs,
    record_text,
)
from reprotune.data.spill import DiskTexts

EN = "The quick brown fox jumps over the lazy dog near the river bank this morning."
ZH = "今天天气很好，我们一起去公园散步吧，顺便买一些新鲜的水果回家。"
UNRELATED = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "请把这段英文翻译成中文，并解释其中的语法要点。",
    "Write a haiku about autumn leaves falling in the wind.",
]
# Near-copies: one punctuation edit each (English "." -> "!", Chinese "。" -> "！").
CORPUS = [EN, EN[:-1] + "!", ZH, ZH[:-1] + "！", *UNRELATED]

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


def test_finds_planted_english_and_chinese_near_duplicates() -> None:
    found = find_near_duplicates(CORPUS, threshold=0.85, progress=False)
    assert [(a, b) for a, b, _ in found.pairs] == [(0, 1), (2, 3)]
    for _, _, s in found.pairs:
        assert 0.85 <= s < 1.0
    assert found.n_candidates >= len(found.pairs)


def test_unrelated_texts_are_not_paired() -> None:
    assert near_duplicate_pairs([EN, ZH, *UNRELATED], threshold=0.85, progress=False) == []


def test_threshold_is_respected() -> None:
    sims = {(a, b): s for a, b, s in
            find_near_duplicates(CORPUS, threshold=0.85, progress=False).pairs}
    above = max(sims.values()) + 1e-3
    assert near_duplicate_pairs(CORPUS, threshold=above, progress=False) == []


def test_exact_copy_scores_one() -> None:
    pairs = near_duplicate_pairs([EN, UNRELATED[0], EN], threshold=0.99, progress=False)
    assert [(a, b) for a, b, _ in pairs] == [(0, 2)]
    assert abs(pairs[0][2] - 1.0) < 1e-5


def test_results_are_deterministic() -> None:
    a = near_duplicate_pairs(CORPUS, threshold=0.85, progress=False)
    b = near_duplicate_pairs(list(CORPUS), threshold=0.85, progress=False)
    assert a == b
    i1 = NgramIndex.build(CORPUS, progress=False)
    i2 = NgramIndex.build(CORPUS, progress=False)
    assert np.array_equal(i1.sig, i2.sig)
    assert not np.array_equal(i1.sig, NgramIndex.build(CORPUS, seed=1, progress=False).sig)


def test_cross_near_duplicates_finds_query_copy_in_corpus() -> None:
    queries = [UNRELATED[2], ZH[:-1] + "！", "Completely different question about databases."]
    corpus = [EN, UNRELATED[0], ZH, UNRELATED[1]]
    hits = cross_near_duplicates(queries, corpus, threshold=0.85, progress=False)
    assert [(q, c) for q, c, _ in hits] == [(1, 2)]
    assert hits[0][2] >= 0.85


def test_cross_near_duplicates_prefers_best_then_lowest_corpus_index() -> None:
    query = EN[:-1] + "!"
    corpus = [UNRELATED[0], EN, EN, query]  # 3 is an exact copy, 1 and 2 tie below it
    hits = cross_near_duplicates([query], corpus, threshold=0.85, progress=False)
    assert [(q, c) for q, c, _ in hits] == [(0, 3)]
    hits = cross_near_duplicates([query], corpus[:3], threshold=0.85, progress=False)
    assert [(q, c) for q, c, _ in hits] == [(0, 1)]


def test_record_text_with_tool_calls() -> None:
    calls = [{"type": "function",
              "function": {"name": "get_weather", "arguments": {"unit": "c", "city": "巴黎"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": '{"temp": 21}'},
                {"role": "assistant", "content": "It is 21 °C."}]
    rec = {"id": "t", "messages": messages, "tools": [{"name": "get_weather"}]}
    text = record_text(rec)
    assert text == (
        "user: Weather in Paris?\n"
        "assistant: \n"
        '[{"function": {"arguments": {"city": "巴黎", "unit": "c"}, "name": "get_weather"}, '
        '"type": "function"}]\n'
        'tool: {"temp": 21}\n'
        "assistant: It is 21 °C.")
    # messages stored as a JSON string (Parquet) give the same text; the tools offered do not count
    assert record_text({"messages": json.dumps(messages)}) == text
    other = json.loads(json.dumps(messages))
    other[1]["tool_calls"][0]["function"]["arguments"]["city"] = "Rome"
    assert record_text({"messages": other}) != text


def _bench_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` pseudo-texts (English-like words and Chinese characters), every 5th a light edit
    of the one before: near duplicates, unrelated rows and a large n-gram vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("bcdfghklmnprstvz")) + rng.choice(list("aeiou"))
                     for _ in range(int(rng.integers(1, 4)))) for _ in range(400)]
    out = []
    for i in range(n):
        if i % 5 == 4:
            t = list(out[-1])
            for k in rng.integers(0, len(t), 3):
                t[k] = "x"
            out.append("".join(t))
        elif i % 2:
            out.append("".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 3000, 120)))
        else:
            out.append(" ".join(rng.choice(words, 60)))
    return out


def test_partitioned_index_equals_one_partition(monkeypatch) -> None:
    texts = _bench_texts(300) + MIXED
    one = find_near_duplicates(texts, threshold=0.85, progress=False)
    assert one.index.parts.count == 1
    monkeypatch.setattr(similarity, "_PART_ENTRIES", 2_000)
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
    monkeypatch.setattr(similarity, "_PART_ENTRIES", 20_000)
    largest, counts = [], []
    for n in (100, 400):
        index = NgramIndex.build(_bench_texts(n), progress=False)
        entries = [int(index.parts.derived(p)["df"].sum()) for p in range(index.parts.count)]
        largest.append(max(entries))
        counts.append(index.parts.count)
    assert counts[1] >= 4 * counts[0] >= 4
    assert max(largest) <= 20_000 and min(largest) > 20_000 / 4


def test_disk_texts_read_back_exactly() -> None:
    texts = ["", "héllo wörld", "今天天气很好", "a\nb\tc", "🙂 emoji", "x" * 5000]
    store = DiskTexts(texts)
    assert len(store) == len(texts) and list(store) == texts
    assert store[1] == texts[1] and store[-1] == texts[-1] and store[2:5] == texts[2:5]
    assert store[4:2] == [] and store[::2] == texts[::2]
    assert store.lengths.tolist() == [len(t) for t in texts]
    with pytest.raises(IndexError):
        _ = store[len(texts)]


def test_worker_processes_give_the_same_index() -> None:
    texts = _bench_texts(200)
    a = find_near_duplicates(texts, threshold=0.85, progress=False)
    b = find_near_duplicates(texts, threshold=0.85, workers=2, progress=False)
    assert a.pairs == b.pairs and np.array_equal(a.index.sig, b.index.sig)


def test_signature_prefilter_keeps_near_duplicates_drops_unrelated() -> None:
    from reprotune.data.minhash import signature_prefilter

    texts = _bench_texts(100)
    index = NgramIndex.build(texts, progress=False)
    planted = np.array([(i - 1, i) for i in range(4, 100, 5)])  # each a 3-character edit
    unrelated = np.array([(i, i + 2) for i in range(5, 90, 10)])  # two random Chinese texts
    assert signature_prefilter(index.sig, planted, 0.85).all()
    assert not signature_prefilter(index.sig, unrelated, 0.85).any()
    assert (index.cosine(planted[:, 0], planted[:, 1]) >= 0.85).all()  # pairs the check must keep


def test_disk_texts_remove_what_a_killed_run_left(tmp_path, monkeypatch) -> None:
    """A SIGKILLed dedup/split cannot remove its text store; the next one does (dead pid only)."""
    import os
    import subprocess
    import sys
    import tempfile

    from reprotune.data.spill import DiskTexts

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale, live = tmp_path / f"reprotune-texts-{gone}-a", tmp_path / f"reprotune-texts-{os.getppid()}-b"
    for d in (stale, live):
        d.mkdir()
    texts = DiskTexts(["一，二", "b"])
    assert list(texts) == ["一，二", "b"]
    assert not stale.exists() and live.exists()
    assert [p.name.startswith(f"reprotune-texts-{os.getpid()}-") for p in tmp_path.iterdir()
            if p not in (live,)] == [True]
