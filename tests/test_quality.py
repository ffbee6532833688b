import json
import sys
from types import SimpleNamespace

import pytest

from reprotune.data import quality
from reprotune.data.quality import (
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


JS_TUTORIAL = '下面是 JavaScript 中 `if...else` 语句的用法示例，根据分数输出等级：\n\n```javascript\nlet score = 85;\nif (score >= 90) {\n  console.log("成绩等级：优秀");\n} else if (score >= 80) {\n  console.log("成绩等级：良好");\n} else if (score >= 70) {\n  console.log("成绩等级：中等");\n} else if (score >= 60) {\n  console.log("成绩等级：及格");\n} else {\n  console.log("成绩等级：不及格");\n}\n```\n\n程序从上到下依次判断条件，第一个为真的分支会被执行。'
JAVA_GETTERS = '这是一个 Java 类，每个属性都有对应的 getter 和 setter 方法：\n\n```java\npublic class Student {\n    private String name;\n    private String school;\n    private String major;\n    public String getName() { return this.name; }\n    public void setName(String name) { this.name = name; }\n    public String getSchool() { return this.school; }\n    public void setSchool(String school) { this.school = school; }\n    public String getMajor() { return this.major; }\n    public void setMajor(String major) { this.major = major; }\n}\n```'
SCALA_MATCH = '在 Scala 中可以用模式匹配代替多重判断：\n\n```scala\ndef weekday(d: Int): String = d match {\n  case 1 => "星期一"\n  case 2 => "星期二"\n  case 3 => "星期三"\n  case 4 => "星期四"\n  case 5 => "星期五"\n  case 6 => "星期六"\n  case 7 => "星期日"\n  case _ => "无效的日期"\n}\n```'
DICE_ZH = '掷两个骰子，点数之和为 7 的所有情况如下：\n第一个骰子 1 点，第二个骰子 6 点\n第一个骰子 2 点，第二个骰子 5 点\n第一个骰子 3 点，第二个骰子 4 点\n第一个骰子 4 点，第二个骰子 3 点\n第一个骰子 5 点，第二个骰子 2 点\n第一个骰子 6 点，第二个骰子 1 点\n共 6 种情况，概率为 6/36 = 1/6。'
SCHEDULE_ZH = "\n".join(f"第{w}周：\n周一：3英里轻松跑\n周二：间歇跑\n周三：3英里轻松跑\n周四：节奏跑\n"
                        f"周五：休息\n周六：{w + 5}英里长跑" for w in range(1, 5))


@pytest.mark.parametrize("text", [JS_TUTORIAL, JAVA_GETTERS, SCALA_MATCH, DICE_ZH, SCHEDULE_ZH])
def test_code_lists_and_schedules_are_not_repetitive(text: str) -> None:
    assert repetitive(_rec(("user", "q"), ("assistant", text)), max_repetition=0.5) is None
    assert quality.turn_repetition(text) < 0.2


# Real answers from ../shared/data/sharegpt_zh_1K_format.jsonl that the whole-text measure
# dropped as repetitive: code, a colour palette, guitar tabs, a numbered list.
REAL_CODE_AND_LISTS = ["$cool-green-100", "write\\_to\\_disk\\_with\\_WAL", "e|---2---|",
                       "1. 高效内容创作：ChatGPT", "`axiom` 和 `axiom2`"]


def test_real_code_and_lists_are_kept(shared_dir) -> None:
    from reprotune.data.inputs import ingest_files

    res = ingest_files([str(shared_dir / "data" / "sharegpt_zh_1K_format.jsonl")])
    for snippet in REAL_CODE_AND_LISTS:
        rec = next(r for r in res.records if any(snippet in m["content"] for m in r["messages"]))
        text = "\n".join(m["content"] for m in rec["messages"] if m["role"] == "assistant")
        assert repetition_share(text) > 0.5, snippet  # what the old filter measured
        assert repetitive(rec, max_repetition=0.5) is None, snippet


def test_real_looping_is_still_caught() -> None:
    looped_lines = "\n".join(["- I cannot help with that request."] * 8)
    looped_code = "```\n" + "print('hello world')\n" * 10 + "```"
    prose_loop = "The answer is yes. " * 12 + "\n```python\nx = 1\n```"
    for text in (looped_lines, looped_code, prose_loop):
        assert repetitive(_rec(("user", "q"), ("assistant", text)), max_repetition=0.5) == "repetitive"
    # each answer is judged on its own: one looping turn is enough
    two = _rec(("user", "a"), ("assistant", "Fine, thanks for asking today."), ("user", "b"),
               ("assistant", "again " * 30))
    assert repetitive(two, max_repetition=0.5) == "repetitive"


def test_split_prose_takes_structure_out() -> None:
    prose, structured = quality.split_prose(JS_TUTORIAL)
    assert "console.log" not in prose and "第一个为真的分支会被执行" in prose
    assert any("console.log" in line for line in structured)


def test_real_chinese_data_is_rarely_flagged(shared_dir) -> None:
    from reprotune.data.inputs import ingest_files

    res = ingest_files([str(shared_dir / "data" / "sharegpt_zh_1K_format.jsonl")])
    flagged = [r for r in res.records if repetitive(r, max_repetition=0.5)]
    assert len(flagged) <= 5  # was 63 of 993 with the whole-text measure
    assert any("SUBSTITUTE（SUBSTITUTE（SUBSTITUTE" in r["messages"][-1]["content"] for r in flagged)


def test_is_art_regexes_count_exactly_like_str_methods() -> None:
    # \s and [\W_] in Unicode mode are str.isspace and "not str.isalnum" for every code point
    for c in map(chr, range(sys.maxunicode + 1)):
        assert c.isspace() == bool(quality._SPACE.match(c)), hex(ord(c))
        assert (not c.isalnum()) == bool(quality._NOT_ALNUM.match(c)), hex(ord(c))

    def by_chars(line: str) -> bool:  # the definition, one character at a time
        chars = [c for c in line if not c.isspace()]
        return bool(chars) and sum(c.isalnum() for c in chars) * 2 < len(chars)

    lines = ["", "   ", "-----", "| a | b |", "a-b-c", "ab--", "ab---", "═══ 标题 ═══", "１２３—",
             "x_y_z", "٣٤٥ ...", "\u00a0\u2003--", "½¾ --"]
    assert [quality._is_art(x) for x in lines] == [by_chars(x) for x in lines]
    assert quality._is_art("-----") and not quality._is_art("ab--")
