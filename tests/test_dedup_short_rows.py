"""Rows too short for char n-grams to separate (dedup.near_min_chars) are compared on exact
keys only: distinct tiny rows are never near-duplicates, exact copies still go, and longer
near-duplicates are still found."""

from __future__ import annotations

from reprotune.data.dedup import run_dedup
from reprotune.data.similarity import content_chars
from reprotune.params import DedupParams


def _rec(rid: str, q: str, a: str) -> dict:
    return {"id": rid, "source": "t.jsonl",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TINY = [_rec(f"r{i}", f"q{i}", f"a{i}") for i in range(3000)]
LONG_Q = "Explain briefly why the sky appears blue during a clear sunny afternoon."
LONG_A = ("Sunlight is scattered by the molecules of the air, and short blue wavelengths "
          "scatter much more strongly than long red ones.")
ZH_Q, ZH_A = "请简单介绍一下长城的历史和它在古代的主要作用。", "长城始建于春秋战国时期，主要用于抵御北方游牧民族。"


def test_content_chars_leave_the_role_tags_out() -> None:
    assert content_chars(_rec("x", "q1111", "a1111")) == 10
    assert content_chars(_rec("x", "你好", "好")) == 3
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert content_chars({"messages": [{"role": "user", "content": "hi"}, call]}) > 30


def test_distinct_tiny_rows_are_not_near_duplicates() -> None:
    # every row compared: q1111/a1111 ~ q111/a111 at cosine 0.866 (the role tags dominate)
    every = run_dedup(TINY, DedupParams(near_min_chars=0), progress=False)
    wrong = {(d["id"], d["duplicate_of"]) for d in every.dropped if d["reason"] == "near_duplicate"}
    assert ("r1111", "r111") in wrong and ("r2222", "r222") in wrong
    res = run_dedup(TINY, DedupParams(), progress=False)
    assert res.metrics["kept"] == 3000 and res.dropped == []
    assert res.metrics["near_dup_exact_only_rows"] == 3000
    assert res.metrics["lsh_candidate_pairs"] == 0


def test_exact_copies_of_short_rows_still_go_and_long_near_copies_are_found() -> None:
    rows = [*TINY[:50],
            _rec("c1", "Q7 ", "A7"),  # case/whitespace copy of r7: exact key
            _rec("c2", "q７", "a７"),  # full-width digit: NFKC folds it to r7's key
            _rec("long0", LONG_Q, LONG_A),
            _rec("long1", LONG_Q.replace("clear", "cleer"), LONG_A.replace("red", "rad")),
            _rec("zh0", ZH_Q, ZH_A),
            _rec("zh1", ZH_Q.replace("。", "？"), ZH_A.replace("主要", "重要"))]
    res = run_dedup(rows, DedupParams(), progress=False)
    dropped = {d["id"]: (d["reason"], d["duplicate_of"]) for d in res.dropped}
    assert dropped == {"c1": ("exact_duplicate", "r7"), "c2": ("exact_duplicate", "r7"),
                       "long1": ("near_duplicate", "long0"), "zh1": ("near_duplicate", "zh0")}
    assert res.metrics["in"] == res.metrics["kept"] + len(res.dropped) == len(rows)
    assert res.metrics["near_dup_exact_only_rows"] == 50


def test_near_min_chars_is_a_validated_param(tmp_path) -> None:
    import pytest

    from reprotune.params import ParamsError, load_section

    p = tmp_path / "params.yaml"
    p.write_text("dedup:\n  near_min_chars: -1\n")
    with pytest.raises(ParamsError, match=r"dedup\.near_min_chars: -1 must be >= 0"):
        load_section("dedup", p)
