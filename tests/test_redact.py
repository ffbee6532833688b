"""PII redaction (the redact stage): each type found at its exact span, look-alikes left
alone, text outside spans byte-identical, policies and counts, and the stage end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.params import PII_TYPES, ParamsError, RedactParams, build

pii = pytest.importorskip("reprotune.data.pii")
redact = pytest.importorskip("reprotune.data.redact")

SHAREGPT_ZH = Path("/work/shared/data/sharegpt_zh_1K_format.jsonl")

# (text, [(type, exact span text)])
FOUND = [
    ("身份证号110101199003074514，请核对", [("ID_CARD", "110101199003074514")]),
    ("ID: 11010119900307451x.", []),  # the check char is 4: x is wrong
    ("公民身份号码 44030119851231008X 已登记", [("ID_CARD", "44030119851231008X")]),
    ("我的手机13812345678，谢谢", [("PHONE", "13812345678")]),
    ("call +86 139 1234 5678 today", [("PHONE", "+86 139 1234 5678")]),
    ("座机010-88886666转分机", [("PHONE", "010-88886666")]),
    ("Office: +1 415-555-0132 (PST)", [("PHONE", "+1 415-555-0132")]),
    ("London +44 20 7946 0958.", [("PHONE", "+44 20 7946 0958")]),
    ("邮箱zhang.san@example.com.cn有问题", [("EMAIL", "zhang.san@example.com.cn")]),
    ("mail ops+alerts@corp-mail.io now", [("EMAIL", "ops+alerts@corp-mail.io")]),
    ("卡号 6222 0212 3456 7890 128 已绑定", [("BANK_CARD", "6222 0212 3456 7890 128")]),
    ("visa 4111111111111111 exp 12/27", [("BANK_CARD", "4111111111111111")]),
    ("server 192.168.1.10:8080 up", [("IP", "192.168.1.10")]),
    ("addr fe80::1ff:fe23:4567:890a here", [("IP", "fe80::1ff:fe23:4567:890a")]),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx123456",
     [("SECRET", "sk-proj-abcdefghijklmnopqrstuvwx123456")]),
    ("key AKIAZ3MHQ7TN4KD2WXPL leaked", [("SECRET", "AKIAZ3MHQ7TN4KD2WXPL")]),
    ("git clone https://bob:hunter2pw@github.com/x/y.git", [("SECRET", "hunter2pw")]),
    ("password: Secr3t!pass;", [("SECRET", "Secr3t!pass")]),
    ("数据库密码：abc12345，别外传", [("SECRET", "abc12345")]),
    ("Authorization: Bearer abcdef0123456789ABCDEF.xyz", [("SECRET", "abcdef0123456789ABCDEF.xyz")]),
]

LOOK_ALIKES = [
    "身份证号110101199003074515有误",  # wrong check digit
    "编号 110101199013074514",  # month 13
    "订单号20240615123456789已发货",  # date-prefixed order number
    "Order #4000123412341234567 shipped",  # 19 digits, Luhn fails
    "时间戳1718438400000，时间 2024-06-15 12:30:45",
    "版本 v1.2.3.4, version 2.0.1.1, 版本号：10.0.19041.1",
    "价格¥1,299.00元，共 3 件，合计 ¥3,897.00",
    "Price: $13,812.34; qty 12345678",
    "ratio 3.1415926535 and 1.0e-5",
    "std::vector<int> a; 12:30:45 ::",
    "序列号 AB12-CD34-EF56-7890",
    "api_key=<SECRET>",  # already masked
]


def _spans(text: str) -> list[tuple[str, str]]:
    return [(s.type, text[s.start:s.end]) for s in pii.find(text)]


@pytest.mark.parametrize("text,want", FOUND)
def test_each_type_found_at_its_span(text: str, want: list[tuple[str, str]]) -> None:
    assert _spans(text) == want


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_not_pii(text: str) -> None:
    assert _spans(text) == []


def test_resident_id_check_digit_and_layout() -> None:
    assert pii.id_check_char("11010119900307451") == "4"
    assert pii.valid_resident_id("110101199003074514")
    assert not pii.valid_resident_id("990101199003074514")  # no province 99
    assert not pii.valid_resident_id("110101199002304514")  # 30 February


def _rec(*turns: tuple[str, str], **extra: object) -> dict:
    return {"id": "r", "source": "t", "messages": [{"role": r, "content": c} for r, c in turns],
            "tools": None, "label": None, "group": None, "meta": None, **extra}


def test_text_outside_spans_is_byte_identical() -> None:
    text = "  联系：13812345678 或 a.b@example.org\t\n结尾 😀 \\u00e9  "
    spans = pii.find(text)
    out = redact.mask(text, spans, RedactParams())
    assert out == ("  联系：<PHONE> 或 <EMAIL>\t\n结尾 😀 \\u00e9  ")
    # rebuild: the pieces between spans are the original's, byte for byte
    pieces, prev = [], 0
    for s in spans:
        pieces.append(text[prev:s.start])
        prev = s.end
    pieces.append(text[prev:])
    rest = out
    for p in pieces:
        assert p in rest
        rest = rest[rest.index(p) + len(p):]


def test_adjacent_spans_keep_the_space_between() -> None:
    text = "13812345678 13912345678"
    assert redact.mask(text, pii.find(text), RedactParams()) == "<PHONE> <PHONE>"


def test_every_field_is_read_and_keys_stay() -> None:
    rec = _rec(("system", "客服 kefu@example.cn"), ("user", "hi"))
    rec["messages"].append({"role": "assistant", "content": "", "reasoning_content": "IP 10.0.0.1",
                            "tool_calls": [{"type": "function", "function": {
                                "name": "call", "arguments": {"phone": 13812345678,
                                                              "password": "hunter22",
                                                              "n": 3}}}]})
    rec["messages"].append({"role": "tool", "content": '{"card": "4111 1111 1111 1111"}'})
    rec["messages"].append({"role": "assistant", "content": "ok"})
    rec["tools"] = [{"type": "function", "function": {"name": "call",
                                                      "description": "ops@corp.com"}}]
    rec["preference"] = {"prompt_turns": 2, "rejected": [{"role": "assistant",
                                                          "content": "x@y.com"}]}
    new, found = redact.redact_record(rec, RedactParams())
    m = new["messages"]
    assert m[0]["content"] == "客服 <EMAIL>" and m[2]["reasoning_content"] == "IP <IP>"
    assert m[2]["tool_calls"][0]["function"]["arguments"] == {
        "phone": "<PHONE>", "password": "<SECRET>", "n": 3}
    assert m[3]["content"] == '{"card": "<BANK_CARD>"}'
    assert new["tools"][0]["function"] == {"name": "call", "description": "<EMAIL>"}
    assert new["preference"]["rejected"][0]["content"] == "<EMAIL>"
    assert list(new) == list(rec) and new["id"] == rec["id"]
    assert {f.field for f in found} == {
        "messages.system", "messages.reasoning_content", "messages.tool_calls.arguments",
        "messages.tool", "tools", "rejected.assistant"}
    assert rec["messages"][0]["content"] == "客服 kefu@example.cn"  # the input is not changed


def _run(rows: list[dict], cfg: RedactParams) -> tuple[list, list, list, redact.RedactCounts]:
    kept, dropped, review = [], [], []
    counts, _ = redact.redact_stream(rows, cfg, kept=kept.append, dropped=dropped.append,
                                     review=review.append)
    return kept, dropped, review, counts


def test_drop_and_keep_policies_count_up() -> None:
    rows = [_rec(("user", "手机13812345678"), ("assistant", "ok")),
            _rec(("user", "ID 110101199003074514, mail a@b.co"), ("assistant", "ok")),
            _rec(("user", "mail a@b.co"), ("assistant", "ok")),
            _rec(("user", "nothing here"), ("assistant", "ok"))]
    cfg = build(RedactParams, {"policy": {"PHONE": "drop", "ID_CARD": "drop", "EMAIL": "keep"}},
                "redact")
    kept, dropped, review, c = _run(rows, cfg)
    assert [d["reason"] for d in dropped] == ["ID_CARD", "PHONE"] or \
        [d["reason"] for d in dropped] == ["PHONE", "ID_CARD"]
    assert c.rows_in == 4 == c.kept + sum(c.dropped.values())
    assert c.dropped == {"PHONE": 1, "ID_CARD": 1} and c.rows_masked == 0
    assert kept == rows[2:]  # kept e-mail as is; the clean row untouched
    assert c.found == {"PHONE": 1, "ID_CARD": 1, "EMAIL": 2} and sum(c.masked.values()) == 0
    m = c.metrics()
    assert m["in"] == m["kept"] + m["dropped"] and set(m["found"]) == set(PII_TYPES)
    assert len(review) == 4 and all("[[<" in r["context"] for r in review)


def test_disabled_passes_rows_through_and_same_input_same_output() -> None:
    rows = [_rec(("user", "手机13812345678"), ("assistant", "ok"))]
    kept, _, _, c = _run(rows, RedactParams(enabled=False))
    assert kept == rows and c.kept == 1 and sum(c.found.values()) == 0
    a, b = _run(rows, RedactParams())[0], _run(rows, RedactParams())[0]
    assert a == b and a[0]["messages"][0]["content"] == "手机<PHONE>"


def test_policy_keys_are_validated() -> None:
    with pytest.raises(ParamsError, match=r"redact\.policy\.PHONES: unknown PII type .*'PHONE'"):
        build(RedactParams, {"policy": {"PHONES": "mask"}}, "redact")
    with pytest.raises(ParamsError, match=r"redact\.policy\.EMAIL: 'hide' is not one of"):
        build(RedactParams, {"policy": {"EMAIL": "hide"}}, "redact")


@pytest.mark.skipif(not SHAREGPT_ZH.is_file(), reason="no /work/shared/data")
def test_real_chinese_row_without_pii_is_unchanged() -> None:
    from reprotune.data.ingest import convert_row

    for line in SHAREGPT_ZH.read_text(encoding="utf-8").splitlines()[:40]:
        _, rec = convert_row(json.loads(line))
        new, found = redact.redact_record(rec, RedactParams())
        if not found:
            assert new is rec and json.dumps(new, ensure_ascii=False) == json.dumps(
                rec, ensure_ascii=False)
            return
    pytest.fail("no row without PII in the first 40 rows")


@pytest.mark.slow  # > 5 s: make test runs it, make test-fast does not
def test_stage_end_to_end(tmp_path: Path, repo_root: Path) -> None:
    rows = [_rec(("user", f"row {i}: 手机1381234{i:04d}" if i % 3 == 0 else f"row {i}"),
                 ("assistant", "身份证110101199003074514" if i == 4 else "ok"))
            for i in range(12)]
    for i, r in enumerate(rows):
        r["id"] = f"r{i}"
    io.write_jsonl(tmp_path / "in.jsonl", rows)
    (tmp_path / "params.yaml").write_text("redact:\n  policy: {ID_CARD: drop}\n",
                                          encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo_root / "src")}
    proc = subprocess.run(
        [sys.executable, str(repo_root / "stages/redact.py"), "--data", "in.jsonl", "--out",
         "out.jsonl", "--dropped", "drop.jsonl", "--review", "rev.jsonl", "--metrics", "m.json",
         "--report", "rep.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, rep = io.read_json(tmp_path / "m.json"), io.read_json(tmp_path / "rep.json")
    out = io.read_jsonl(tmp_path / "out.jsonl")
    assert m["in"] == 12 == m["kept"] + m["dropped"] and m["dropped"] == 1
    assert rep["dropped"]["ID_CARD"] == 1 and sum(rep["dropped"].values()) == m["dropped"]
    assert [r["id"] for r in out] == [f"r{i}" for i in range(12) if i != 4]
    assert m["found"]["PHONE"] == 4 and rep["by_field"]["messages.user"]["PHONE"] == 4
    assert out[0]["messages"][0]["content"] == "row 0: 手机<PHONE>"
    assert out[1] == rows[1]  # untouched rows: the same JSON
    assert [json.loads(x)["id"] for x in (tmp_path / "drop.jsonl").read_text().splitlines()] \
        == ["r4"]
    assert len(io.read_jsonl(tmp_path / "rev.jsonl")) == 5
    assert not list(tmp_path.glob(".*.tmp"))
    # a bad policy key: one line naming it, no traceback
    (tmp_path / "params.yaml").write_text("redact:\n  policy: {IDCARD: drop}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(repo_root / "stages/redact.py"), "--data",
                           "in.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()  # one line: no traceback, no import noise
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("redact: params.yaml: redact.policy.IDCARD: unknown PII type")


def _stage_main(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch,
                params: str) -> str:
    """stages/redact.py's main() in this process (the analyzer is already built): its exit
    message."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("redact_stage", repo_root / "stages/redact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["redact.py", "--data", "in.jsonl", "--out", "o.jsonl",
                                      "--dropped", "d.jsonl", "--review", "r.jsonl",
                                      "--metrics", "m.json", "--report", "p.json"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # runtime.setup replaces it
    with pytest.raises(SystemExit) as exc:
        mod.main()
    return str(exc.value.code)


def test_stage_stops_in_one_line(tmp_path: Path, repo_root: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    io.write_jsonl(tmp_path / "in.jsonl", [_rec(("user", "ID 110101199003074514"),
                                                ("assistant", "ok"))])
    msg = _stage_main(tmp_path, repo_root, monkeypatch, "redact:\n  policy: {ID_CARD: drop}\n")
    assert msg.startswith("redact: no rows kept out of 1 from in.jsonl") and "ID_CARD" in msg
    with (tmp_path / "in.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    msg = _stage_main(tmp_path, repo_root, monkeypatch, "redact: {}\n")
    assert msg.startswith("redact: in.jsonl:2: invalid JSON")
    with pytest.raises(ParamsError, match=r"redact\.enabeld: unknown key .*'enabled'"):
        build(RedactParams, {"enabeld": True}, "redact")


def test_bench_labelled_set_smoke() -> None:
    """bench/pii_bench.py: planted spans are where the labels say, and found (300 rows)."""
    from bench_scripts import load_bench

    bench = load_bench("pii_bench")
    r = random.Random(3)
    for _ in range(50):
        text, spans = bench.labelled_text(r)
        for start, end, kind in spans:
            assert (start, end, kind) in {(s.start, s.end, s.type) for s in pii.find(text)}
    res = bench.quality(300, seed=1)
    assert res["look_alikes_planted"] > 50
    assert all(v["recall"] == 1.0 and v["precision"] == 1.0 for v in res["per_type"].values())
