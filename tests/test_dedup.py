import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from reprotune.data.dedup import (
    REASONS,
    choose_representative,
    dedup_stream,
    exact_duplicates,
    normalize_text,
    run_dedup,
    union_find_clusters,
)
from reprotune.data.similarity import record_text
from reprotune.data.tfidf import NgramIndex


def _cfg(**over) -> SimpleNamespace:  # defaults of params.yaml `dedup`
    base = dict(threshold=0.85, near_min_chars=20, ngram_min=2, ngram_max=4, num_perm=128, bands=32,
                sample_pairs=50, min_chars=1, max_chars=20000, max_repetition=0.5)
    return SimpleNamespace(**{**base, **over})


def _rec(rid: str, user: str, answer: str, source: str = "t.jsonl") -> dict:
    return {"id": rid, "source": source,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


EN_Q = "Explain briefly why the sky appears blue during a clear sunny afternoon."
EN_A = ("Sunlight is scattered by the molecules of the air, and short blue wavelengths "
        "scatter much more strongly than long red ones, so blue light reaches us from every direction.")
ZH_Q = "请简单介绍一下长城的历史和它在古代的主要作用。"
ZH_A = "长城始建于春秋战国时期，秦朝统一后连接成万里长城，主要用于抵御北方游牧民族的侵扰，保护农耕地区的安全。"

RECORDS = [
    _rec("a0", "What is the capital of France?", "The capital of France is Paris."),
    _rec("a1", "  what is the CAPITAL of  france? ", "The capital of france is\nParis."),  # exact dup
    _rec("b0", EN_Q, EN_A),
    _rec("c0", "Name three primary colours.", "Red, yellow and blue are the three primary colours."),
    _rec("b1", EN_Q, EN_A[:-1] + "!"),  # English near-dup of b0
    _rec("d0", ZH_Q, ZH_A),
    _rec("e0", "Say something.", "   "),  # empty answer
    _rec("d1", ZH_Q, ZH_A[:-1] + "！"),  # Chinese near-dup of d0
    _rec("f0", "把下面的句子翻译成英文：我喜欢读书。", "I like reading books."),
    _rec("b2", EN_Q.upper(), EN_A[:-1] + "!"),  # exact dup of b1 (case only)
]


def test_normalize_text() -> None:
    assert normalize_text("ＡＢＣ，１２３！") == "abc,123!"  # NFKC folds full-width forms
    assert normalize_text("Straße") == "strasse"  # casefold, not just lower
    assert normalize_text("  a\t\tb \n\n c  ") == "a b c"
    assert normalize_text("你好，世界") == "你好,世界"
    assert normalize_text("a.b") != normalize_text("a b")  # punctuation is kept


def test_exact_duplicates_point_at_first_occurrence() -> None:
    texts = ["Hello  World", "other", "hello world", "ＨＥＬＬＯ world ", "other", "else"]
    assert exact_duplicates(texts) == [None, None, 0, 0, 1, None]
    assert exact_duplicates([]) == []


def test_union_find_chain_is_one_cluster_regardless_of_pair_order() -> None:
    pairs = [(0, 1), (1, 2), (4, 6)]
    want = [[0, 1, 2], [4, 6]]  # 3 and 5 are singletons: left out
    for perm in itertools.permutations(pairs):
        assert union_find_clusters(7, perm) == want
        assert union_find_clusters(7, [(b, a) for a, b in perm]) == want
    # (i, j, similarity) triples are accepted; merging through later roots joins clusters
    assert union_find_clusters(5, [(3, 4, 0.9), (1, 2, 0.9), (2, 4, 0.88)]) == [[1, 2, 3, 4]]
    assert union_find_clusters(6, [(4, 5), (1, 3)]) == [[1, 3], [4, 5]]  # by first member
    assert union_find_clusters(3, []) == []


def test_choose_representative_is_earliest() -> None:
    assert choose_representative([5, 2, 9]) == 2
    assert choose_representative(iter([7])) == 7


def test_run_dedup_counts_and_kept_rows() -> None:
    res = run_dedup(RECORDS, _cfg(), progress=False)
    m = res.metrics
    assert m["dropped"] == {"empty_answer": 1, "too_short": 0, "too_long": 0, "repetitive": 0,
                            "exact_duplicate": 2, "near_duplicate": 2}
    assert list(m["dropped"]) == list(REASONS)
    assert m["in"] == len(RECORDS) == m["kept"] + sum(m["dropped"].values())
    assert [r["id"] for r in res.kept] == ["a0", "b0", "c0", "d0", "f0"]
    assert m["near_dup_clusters"] == 2 and m["near_dup_pairs"] == 2
    assert m["near_dup_below_threshold_to_kept"] == 0
    assert len(res.sample_pairs) == 2
    assert {(p["a"]["id"], p["b"]["id"]) for p in res.sample_pairs} == {("b0", "b1"), ("d0", "d1")}


def test_run_dedup_dropped_rows_name_kept_row() -> None:
    res = run_dedup(RECORDS, _cfg(), progress=False)
    by_id = {d["id"]: d for d in res.dropped}
    assert [d["id"] for d in res.dropped] == ["a1", "b1", "e0", "d1", "b2"]  # input order
    assert by_id["e0"] == {"id": "e0", "source": "t.jsonl", "reason": "empty_answer",
                           "duplicate_of": None, "similarity": None}
    assert (by_id["a1"]["reason"], by_id["a1"]["duplicate_of"]) == ("exact_duplicate", "a0")
    assert by_id["a1"]["similarity"] == 1.0
    for dup, kept in (("b1", "b0"), ("d1", "d0")):
        assert (by_id[dup]["reason"], by_id[dup]["duplicate_of"]) == ("near_duplicate", kept)
        assert 0.85 <= by_id[dup]["similarity"] < 1.0
    # b2 is an exact copy of b1, which is itself dropped: it points at b1's kept row b0
    assert (by_id["b2"]["reason"], by_id["b2"]["duplicate_of"]) == ("exact_duplicate", "b0")
    assert by_id["b2"]["similarity"] == by_id["b1"]["similarity"]
    kept_ids = {r["id"] for r in res.kept}
    assert all(d["duplicate_of"] in kept_ids for d in res.dropped if d["duplicate_of"])


def test_run_dedup_keeps_first_occurrence_and_count_is_order_free() -> None:
    rev = run_dedup(RECORDS[::-1], _cfg(), progress=False)
    assert [r["id"] for r in rev.kept] == ["b2", "f0", "d1", "c0", "a1"]
    assert rev.metrics["kept"] == 5
    assert rev.metrics["dropped"] == run_dedup(RECORDS, _cfg(), progress=False).metrics["dropped"]
    assert run_dedup(RECORDS, _cfg(), progress=False) == run_dedup(RECORDS, _cfg(), progress=False)


def test_run_dedup_chain_joins_rows_below_threshold_to_kept() -> None:
    # a~b and b~c are near-duplicates, a and c are further apart: one cluster, kept a.
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
             "mike november oscar papa quebec romeo sierra tango").split()
    a = " ".join(words)
    b = " ".join(words[:6] + ["X" + words[6]] + words[7:])
    c = " ".join(words[:6] + ["X" + words[6]] + words[7:14] + ["X" + words[14]] + words[15:])
    recs = [_rec("a", "spell", a), _rec("b", "spell", b), _rec("c", "spell", c),
            _rec("z", "Something else", "An entirely unrelated reply about cooking rice.")]
    index = NgramIndex.build([record_text(r) for r in recs], progress=False)
    ab, bc, ac = index.cosine([0, 1, 0], [1, 2, 2])
    assert ac < min(ab, bc)
    threshold = float(ac + min(ab, bc)) / 2
    res = run_dedup(recs, _cfg(threshold=threshold), progress=False)
    assert [r["id"] for r in res.kept] == ["a", "z"]
    assert [(d["id"], d["duplicate_of"]) for d in res.dropped] == [("b", "a"), ("c", "a")]
    assert res.metrics["near_dup_clusters"] == 1
    assert res.metrics["near_dup_below_threshold_to_kept"] == 1
    np.testing.assert_allclose(res.dropped[1]["similarity"], ac, atol=1e-4)


def test_run_dedup_on_shared_data(shared_dir) -> None:
    from reprotune.data.inputs import ingest_files

    names = ["alpaca_en_demo.json", "identity.json", "glaive_toolcall_en_demo.json"]
    ingested = ingest_files([str(shared_dir / "data" / n) for n in names])
    records = ingested.records
    assert records
    res = run_dedup(records, _cfg(), progress=False)
    m = res.metrics
    assert m["in"] == len(records) == m["kept"] + sum(m["dropped"].values())
    assert m["kept"] > 0 and len(res.kept) == m["kept"]
    assert len(res.dropped) == sum(m["dropped"].values())
    kept_ids = [r["id"] for r in res.kept]
    # ids hash the messages, so rows sharing an id are exact duplicates: kept ids are unique
    assert len(set(kept_ids)) == len(kept_ids)
    assert all(d["duplicate_of"] in set(kept_ids) for d in res.dropped
               if d["reason"] in ("exact_duplicate", "near_duplicate"))


def test_run_dedup_same_with_worker_processes() -> None:
    assert run_dedup(RECORDS, _cfg(), workers=2, progress=False) == run_dedup(RECORDS, _cfg(),
                                                                             progress=False)


def test_dedup_stream_refuses_input_that_changes_between_passes() -> None:
    reads = iter([RECORDS, RECORDS[:-1]])
    with pytest.raises(ValueError, match="changed between passes"):
        dedup_stream(lambda: next(reads), _cfg(), kept=lambda r: None, dropped=lambda r: None,
                     progress=False)


def test_exact_key_covers_reasoning_and_the_rejected_answer() -> None:
    """Rows that differ only in their thinking trace, or pairs that reject different answers
    to the same prompt and chosen answer, are not exact copies (a true copy is); a short
    rejected answer under a long shared prompt is still a near-duplicate by cosine."""
    think = _rec("t0", ZH_Q, ZH_A)
    think["messages"][1]["reasoning_content"] = "先回顾长城的修建年代。"
    other = _rec("t1", ZH_Q, ZH_A)
    other["messages"][1]["reasoning_content"] = "Start from who built it and why, then what it did."

    def pair(rid: str, rejected: str) -> dict:
        rec = _rec(rid, EN_Q, EN_A)
        rec["preference"] = {"prompt_turns": 1,
                             "rejected": [{"role": "assistant", "content": rejected}]}
        return rec

    rows = [think, other, dict(think, id="t2"), pair("p0", "Because the ocean reflects it."),
            pair("p1", "天空是蓝色的，因为它倒映着大海。"), pair("p2", "Because the ocean reflects it.")]
    res = run_dedup(rows, _cfg(), progress=False)
    assert [r["id"] for r in res.kept] == ["t0", "t1", "p0"]
    assert res.metrics["dropped"]["exact_duplicate"] == 2  # t2, p2
    assert res.metrics["dropped"]["near_duplicate"] == 1  # p1 (cosine 0.906 to p0)
    assert res.kept[2]["preference"] == rows[3]["preference"]
    assert "reasoning_content: 先回顾长城的修建年代。" in record_text(think)
    assert record_text(rows[4]).endswith("rejected:\nassistant: 天空是蓝色的，因为它倒映着大海。")
