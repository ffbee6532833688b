"""The data layouts users bring (docs/data.md, "Layouts"), each on a small sample written here:
LLaMA-Factory v1 typed content parts (text, reasoning, tool_call), v1 preference rows
(``chosen_messages``/``rejected_messages``), and plain text for continued pretraining
(``{"text": ...}`` rows and ``.txt`` files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprotune.data.formatting import format_records
from reprotune.data.inputs import IngestError, check_files, ingest_files
from reprotune.data.rendering import IGNORE_INDEX


def _official() -> Path | None:
    """The official Qwen3 chat template (shared/fixtures), looked for above the checkout."""
    for parent in Path(__file__).resolve().parents:
        path = parent / "shared" / "fixtures" / "qwen3_chat_template.jinja"
        if path.is_file():
            return path
    return None


OFFICIAL = _official()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    return load_tokenizer(tiny_base_dir)


def _part(kind: str, value: str) -> dict:
    return {"type": kind, "value": value}


# --------------------------------------------------------------------------- v1 typed parts
THINK = "用户要两个面积。\n先算 r=1.5，再算 r=3。\n"
CALL_1 = '{"name": "circle_area", "arguments": {"radius": 1.50}}'
CALL_2 = '{"name": "circle_area", "arguments": {"radius": 3, "unit": "平方米"}}'
TOOLS = ('[{"type": "function", "function": {"name": "circle_area", "description": "圆面积", '
         '"parameters": {"type": "object", "properties": {"radius": {"type": "number"}}}}}]')
RESULT = '[{"area": 7.0686}, {"area": 28.2743}]'


def _v1_row() -> dict:
    """reason_tool_use_demo_50.jsonl's shape: every content a list of typed parts."""
    return {"messages": [
        {"role": "system", "content": [_part("text", "你是助手。")], "loss_weight": 0.0},
        {"role": "user", "content": [_part("text", "半径 1.5 和 3 的圆面积？")], "loss_weight": 0.0},
        {"role": "assistant", "content": [_part("reasoning", THINK), _part("tool_call", CALL_1),
                                          _part("tool_call", CALL_2)], "loss_weight": 1.0},
        {"role": "tool", "content": [_part("text", RESULT)]},
        {"role": "assistant", "content": [_part("reasoning", "两个结果都到了。"),
                                          _part("text", "面积是 "), _part("text", "7.07 和 28.27。")],
         "loss_weight": 1.0}],
        "tools": TOOLS}


def _openai_row() -> dict:
    """The same conversation as OpenAI messages with reasoning_content and tool_calls."""
    def call(text: str) -> dict:
        c = json.loads(text)
        return {"type": "function", "function": {"name": c["name"], "arguments": json.dumps(
            c["arguments"], ensure_ascii=False)}}
    return {"messages": [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "半径 1.5 和 3 的圆面积？"},
        {"role": "assistant", "content": "", "reasoning_content": THINK,
         "tool_calls": [call(CALL_1), call(CALL_2)]},
        {"role": "tool", "content": RESULT},
        {"role": "assistant", "content": "面积是 7.07 和 28.27。",
         "reasoning_content": "两个结果都到了。"}],
        "tools": TOOLS}


def test_v1_reasoning_and_tool_call_parts_become_template_fields(tmp_path: Path) -> None:
    res = ingest_files([str(_jsonl(tmp_path / "v1.jsonl", [_v1_row()]))])
    assert res.counts["kept"] == 1 and res.counts["formats"]["messages"]["kept"] == 1
    msgs = res.records[0]["messages"]
    assert msgs[2]["reasoning_content"] == THINK  # byte for byte, trailing newline kept
    assert [c["function"]["name"] for c in msgs[2]["tool_calls"]] == ["circle_area"] * 2
    assert json.dumps(msgs[2]["tool_calls"][1]["function"]["arguments"], ensure_ascii=False) == \
        '{"radius": 3, "unit": "平方米"}'
    assert msgs[3] == {"role": "tool", "content": RESULT}  # text parts, not JSON of the parts
    assert msgs[4]["content"] == "面积是 7.07 和 28.27。"
    assert (res.counts["tool_calls"], res.counts["with_reasoning"]) == (2, 1)


def test_v1_parts_render_and_label_like_openai_messages(tmp_path: Path, tok) -> None:
    v1 = ingest_files([str(_jsonl(tmp_path / "v1.jsonl", [_v1_row()]))]).records[0]
    oa = ingest_files([str(_jsonl(tmp_path / "oa.jsonl", [_openai_row()]))]).records[0]
    assert v1["messages"] == oa["messages"] and v1["tools"] == oa["tools"]
    assert v1["id"] == oa["id"]
    rows_v1, stats, _ = format_records([v1], tok, max_length=2048, enable_thinking=False)
    rows_oa, _, _ = format_records([oa], tok, max_length=2048, enable_thinking=False)
    for key in ("text", "input_ids", "labels"):
        assert rows_v1[0][key] == rows_oa[0][key]
    text = rows_v1[0]["text"]
    assert f"<think>\n{THINK.strip()}\n</think>\n\n<tool_call>\n" in text
    assert "<think>\n两个结果都到了。\n</think>\n\n面积是 7.07 和 28.27。<|im_end|>" in text
    assert '<tool_call>\n{"name": "circle_area", "arguments": {"radius": 1.5}}\n</tool_call>' in text
    assert stats["assistant_turns"] == 2
    labelled = [t for t, lab in zip(rows_v1[0]["input_ids"], rows_v1[0]["labels"], strict=True)
                if lab != IGNORE_INDEX]
    assert "circle_area" in tok.decode(labelled) and RESULT not in tok.decode(labelled)


@pytest.mark.skipif(OFFICIAL is None, reason="needs shared/fixtures (the official Qwen3 template)")
def test_v1_parts_render_byte_identical_to_the_official_template(tmp_path: Path, tok) -> None:
    official = OFFICIAL.read_text(encoding="utf-8")
    v1 = ingest_files([str(_jsonl(tmp_path / "v1.jsonl", [_v1_row()]))]).records[0]
    oa = _openai_row()
    rows, _, _ = format_records([v1], tok, max_length=2048, enable_thinking=False)
    tools = [t for t in json.loads(TOOLS)]
    want = tok.apply_chat_template(oa["messages"], tools=tools, tokenize=False,
                                   enable_thinking=False, chat_template=official)
    assert rows[0]["text"] == want


@pytest.mark.parametrize(("part", "where"), [
    ({"type": "image_url", "value": "x.png"}, "messages[1].content[1].type"),
    ({"type": "tool_call", "value": "{\"name\": \"f\", \"arguments\": {"}, "messages[1].content[1].value"),
    ({"type": "tool_call", "value": "{\"arguments\": {}}"}, "messages[1].content[1].value"),
])
def test_v1_bad_part_is_a_one_line_reject_naming_file_line_part(tmp_path: Path, part: dict,
                                                                 where: str) -> None:
    good = {"messages": [{"role": "user", "content": [_part("text", "q")]},
                         {"role": "assistant", "content": [_part("text", "a")]}]}
    bad = {"messages": [good["messages"][0],
                        {"role": "assistant", "content": [_part("text", "a"), part]}]}
    path = _jsonl(tmp_path / "d.jsonl", [good, bad])
    res = ingest_files([str(path)])
    assert (res.counts["rows_in"], res.counts["kept"], res.counts["rejected_total"]) == (2, 1, 1)
    (rej,) = res.rejects
    assert (rej["source"], rej["line"], rej["field"]) == (str(path), 2, where)
    assert "\n" not in rej["detail"] and "messages[1].content[1]" in rej["detail"]
    with pytest.raises(IngestError) as exc:  # the whole file: one line, file, line and part
        check_files(res, [str(path)], 0.9)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "line 2" in msg and "content[1]" in msg


def test_v1_reasoning_part_on_a_user_turn_is_refused() -> None:
    from reprotune.data.ingest import convert_row

    row = {"messages": [{"role": "user", "content": [_part("reasoning", "hm")]},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: a reasoning part on a user"):
        convert_row(row)
    both = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "reasoning_content": "x",
                          "content": [_part("reasoning", "y"), _part("text", "a")]}]}
    with pytest.raises(ValueError, match="both 'reasoning_content' and reasoning content parts"):
        convert_row(both)


# --------------------------------------------------------------------------- v1 pairs
def _v1_turn(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts), "loss_weight": 1.0 if role == "assistant" else 0.0}


def _v1_pair_rows() -> list[dict]:
    """LLaMA-Factory v1's pair converter output: whole conversations, typed parts."""
    prompt = [_v1_turn("system", _part("text", "简短回答。")), _v1_turn("user", _part("text", "2+2？"))]
    return [
        {"chosen_messages": prompt + [_v1_turn("assistant", _part("reasoning", "2+2=4"),
                                                 _part("text", "4。"))],
         "rejected_messages": prompt + [_v1_turn("assistant", _part("text", "5。"))]},
        {"chosen_messages": [_v1_turn("user", _part("text", "Name a colour."))]
         + [_v1_turn("assistant", _part("text", "Blue."))],
         "rejected_messages": [_v1_turn("user", _part("text", "Name a colour."))]
         + [_v1_turn("assistant", _part("text", "Blue."))]},  # identical: rejected
    ]


def _trl_rows() -> list[dict]:
    """The first pair in TRL's implicit-prompt layout, which ingest already reads."""
    prompt = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "2+2？"}]
    return [{"chosen": prompt + [{"role": "assistant", "content": "4。",
                                  "reasoning_content": "2+2=4"}],
             "rejected": prompt + [{"role": "assistant", "content": "5。"}]}]


def test_v1_pair_rows_need_no_column_mapping(tmp_path: Path, tok) -> None:
    from reprotune.data.pairs import format_pairs

    v1 = ingest_files([str(_jsonl(tmp_path / "v1_pairs.jsonl", _v1_pair_rows()))],
                      fmt="auto")
    trl = ingest_files([str(_jsonl(tmp_path / "trl.jsonl", _trl_rows()))])
    c = v1.counts
    assert (c["rows_in"], c["kept"], c["rejected"]["identical_pair"]) == (2, 1, 1)
    assert c["rejected"]["unknown_format"] == 0 and c["with_preference"] == 1
    (rej,) = v1.rejects
    assert rej["line"] == 2 and rej["field"] == "rejected_messages"
    assert rej["detail"].startswith("rejected_messages is identical to chosen_messages")
    got, want = v1.records[0], trl.records[0]
    assert {k: v for k, v in got.items() if k != "source"} == \
        {k: v for k, v in want.items() if k != "source"}
    assert got["preference"] == {"prompt_turns": 2,
                                 "rejected": [{"role": "assistant", "content": "5。"}]}
    (row,), stats, drops = format_pairs([got], tok, max_length=512, enable_thinking=False)
    (row_t,), _, _ = format_pairs([want], tok, max_length=512, enable_thinking=False)
    assert drops == [] and stats["pairs_out"] == 1
    for key in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"):
        assert row[key] == row_t[key]


def test_v1_pair_errors_name_the_rows_fields() -> None:
    from reprotune.data.ingest import convert_row

    row = {"chosen_messages": [_v1_turn("user", _part("text", "q")),
                               _v1_turn("assistant", _part("audio", "a.wav"))],
           "rejected_messages": [_v1_turn("user", _part("text", "q")),
                                 _v1_turn("assistant", _part("text", "b"))]}
    with pytest.raises(ValueError, match=r"chosen_messages\[1\]\.content\[0\]: content part "
                                         r"type 'audio'") as exc:
        convert_row(row)
    assert exc.value.field == "chosen_messages[1].content[0].type"
    bad_rejected = {"chosen_messages": row["rejected_messages"],
                    "rejected_messages": row["chosen_messages"]}
    with pytest.raises(ValueError, match=r"^rejected_messages\[1\]\.content\[0\]: content part"):
        convert_row(bad_rejected)
