import json
from types import SimpleNamespace

import pytest

from reprotune import quality
from reprotune.quality import (
    REASONS,
    apply_filters,
    empty_answer,
    first_failure,
    make_filters,
    reason_counts,
    repetition_share,
    repetitive,
    too_long,
    too_short,
)

CFG = SimpleNamespace(min_chars=1, max_chars=20000, max_repetition=0.5)
CALL = [{"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]


def _rec(*turns: tuple[str, str], calls: list | None = None) -> dict:
    msgs = [{"role": r, "content": c} for r, c in turns]
    if calls is not None:
        msgs[-1]["tool_calls"] = calls
    return {"id": "x", "messages": msgs}


def test_empty_answer() -> None:
    assert empty_answer(_rec(("user", "hi"), ("assistant", "hello"))) is None
    assert empty_answer(_rec(("user", "hi"), ("assistant", "  \n "))) == "empty_answer"
    assert empty_answer(_rec(("user", "hi"))) == "empty_answer"  # no assistant turn
    none_content = {"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": None}]}
    assert empty_answer(none_content) == "empty_answer"
    # any blank assistant turn counts, not only the last one
    assert empty_answer(_rec(("user", "a"), ("assistant", ""), ("user", "b"),
                             ("assistant", "ok"))) == "empty_answer"


def test_tool_call_only_answer_is_kept() -> None:
    rec = _rec(("user", "time?"), ("assistant", ""), calls=CALL)
    assert empty_answer(rec) is None
    assert too_short(rec, min_chars=10) is None  # the call JSON counts as answer text
    assert first_failure(rec, make_filters(CFG)) is None
    # messages as a JSON string (Parquet) are read the same way
    assert empty_answer({"messages": json.dumps(rec["messages"])}) is None


def test_too_short_counts_stripped_final_answer() -> None:
    rec = _rec(("user", "a long question " * 5), ("assistant", "  ok  "))
    assert too_short(rec, min_chars=2) is None
    assert too_short(rec, min_chars=3) == "too_short"
    # only the final assistant answer counts
    rec = _rec(("user", "q"), ("assistant", "a long first answer"), ("user", "q2"), ("assistant", "k"))
    assert too_short(rec, min_chars=2) == "too_short"


def test_too_long_counts_all_messages_and_calls() -> None:
    rec = _rec(("system", "s" * 10), ("user", "u" * 10), ("assistant", "a" * 10))
    assert too_long(rec, max_chars=30) is None
    assert too_long(rec, max_chars=29) == "too_long"
    with_call = _rec(("user", "u" * 10), ("assistant", ""), calls=CALL)
    n = 10 + len(json.dumps(CALL, ensure_ascii=False, sort_keys=True))
    assert too_long(with_call, max_chars=n) is None
    assert too_long(with_call, max_chars=n - 1) == "too_long"


def test_repetition_share_english() -> None:
    assert repetition_share("") == 0.0
    assert repetition_share("the cat sat on the mat today") == 0.0
    # "a b c" x 4: 10 word 3-grams, 3 distinct -> 0.7 repeated
    assert repetition_share("a b c a b c a b c a b c") == pytest.approx(0.7)
    assert repetition_share("A b C a B c") == pytest.approx(1 - 3 / 4)  # case-folded


def test_repetition_share_chinese_uses_char_trigrams() -> None:
    assert repetition_share("今天天气很好") == 0.0
    # 12 chars -> 10 char 3-grams, 3 distinct (你好吗 / 好吗你 / 吗你好)
    assert repetition_share("你好吗你好吗你好吗你好吗") == pytest.approx(0.7)
    # spaces between CJK words do not hide the loop
    assert repetition_share("你好吗 你好吗 你好吗 你好吗") == pytest.approx(0.7)
    # a single unspaced "word" is also read as characters
    assert repetition_share("abcabcabcabc") == pytest.approx(0.7)


def test_repetitive_filter_english_and_chinese() -> None:
    looped_en = _rec(("user", "q"), ("assistant", "I am sorry. " * 10))
    looped_zh = _rec(("user", "问"), ("assistant", "对不起。" * 10))
    normal_en = _rec(("user", "q"), ("assistant", "Paris is the capital and largest city of France."))
    normal_zh = _rec(("user", "问"), ("assistant", "巴黎是法国的首都，也是它最大的城市。"))
    assert repetitive(looped_en, max_repetition=0.5) == "repetitive"
    assert repetitive(looped_zh, max_repetition=0.5) == "repetitive"
    assert repetitive(normal_en, max_repetition=0.5) is None
    assert repetitive(normal_zh, max_repetition=0.5) is None
    # only the assistant text is checked: a looping user prompt is fine
    assert repetitive(_rec(("user", "go go go go go go go go"), ("assistant", "Going now, see you.")),
                      max_repetition=0.5) is None
    # the threshold is strict: a share equal to max_repetition is kept
    text = "alpha beta gamma delta epsilon alpha beta gamma delta epsilon"  # 8 grams, 3 repeats
    share = _rec(("user", "q"), ("assistant", text))
    assert repetitive(share, max_repetition=0.375) is None
    assert repetitive(share, max_repetition=0.37) == "repetitive"


def test_make_filters_order_and_bound_thresholds() -> None:
    cfg = SimpleNamespace(min_chars=5, max_chars=100, max_repetition=0.3)
    filters = make_filters(cfg)
    assert [name for name, _ in filters] == list(REASONS) == [
        "empty_answer", "too_short", "too_long", "repetitive"]
    by_name = dict(filters)
    assert by_name["too_short"](_rec(("user", "q"), ("assistant", "four"))) == "too_short"
    assert by_name["too_long"](_rec(("user", "q" * 99), ("assistant", "ab"))) == "too_long"
    # first failure wins: empty answer is also too short, but reported as empty_answer
    assert first_failure(_rec(("user", "q"), ("assistant", "")), filters) == "empty_answer"
    # too short and too long at once -> too_short (earlier in the order)
    assert first_failure(_rec(("user", "q" * 200), ("assistant", "ab")), filters) == "too_short"


def test_apply_filters_and_reason_counts_add_up() -> None:
    cfg = SimpleNamespace(min_chars=3, max_chars=200, max_repetition=0.5)
    records = [
        _rec(("user", "q1"), ("assistant", "A fine answer.")),
        _rec(("user", "q2"), ("assistant", "")),
        _rec(("user", "q3"), ("assistant", "ok")),
        _rec(("user", "q" * 300), ("assistant", "A fine answer.")),
        _rec(("user", "q5"), ("assistant", "yes yes yes yes yes yes yes yes")),
        _rec(("user", "q6"), ("assistant", ""), calls=CALL),
        _rec(("user", "q7"), ("assistant", "好的，我明白了。")),
        _rec(("user", "q8"), ("assistant", "   ")),
    ]
    for i, r in enumerate(records):
        r["id"] = f"r{i}"
    kept, dropped = apply_filters(records, cfg)
    assert [r["id"] for r in kept] == ["r0", "r5", "r6"]
    assert [(r["id"], reason) for r, reason in dropped] == [
        ("r1", "empty_answer"), ("r2", "too_short"), ("r3", "too_long"),
        ("r4", "repetitive"), ("r7", "empty_answer")]
    counts = reason_counts(dropped)
    assert counts == {"empty_answer": 2, "too_short": 1, "too_long": 1, "repetitive": 1}
    assert len(records) == len(kept) + sum(counts.values())


def test_reason_counts_lists_every_reason() -> None:
    assert reason_counts([]) == dict.fromkeys(quality.REASONS, 0)
