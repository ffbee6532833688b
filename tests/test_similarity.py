"""similarity: near-duplicate search within and across corpora, record_text."""

import json

import numpy as np

from reprotune.data.similarity import (
    cross_near_duplicates,
    find_near_duplicates,
    near_duplicate_pairs,
    record_text,
)
from reprotune.data.tfidf import NgramIndex

EN = "The quick brown fox jumps over the lazy dog near the river bank this morning."
ZH = "今天天气很好，我们一起去公园散步吧，顺便买一些新鲜的水果回家。"
UNRELATED = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "请把这段英文翻译成中文，并解释其中的语法要点。",
    "Write a haiku about autumn leaves falling in the wind.",
]
# Near-copies: one punctuation edit each (English "." -> "!", Chinese "。" -> "！").
CORPUS = [EN, EN[:-1] + "!", ZH, ZH[:-1] + "！", *UNRELATED]


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
