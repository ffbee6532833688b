"""The data layouts users bring (docs/data.md, "Layouts"), each on a small sample written here:
LLaMA-Factory v1 typed content parts (text, reasoning, tool_call), v1 preference rows
(``chosen_messages``/``rejected_messages``), and plain text for continued pretraining
(``{"text": ...}`` rows and ``.txt`` files)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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
REPO = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- text (DAPT)
DOCS = ["第一篇：１＋１＝２。\r\n  缩进保留，  两个空格。\n",
        "Second document.\n\nIt has two paragraphs and a tab\there.",
        "5² = 25; naïve café ☕"]


def _text_inputs(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"text": DOCS[0], "group": "g1"}, {"text": DOCS[1]},
            {"text": "bad <|im_end|> inside"},  # the tokenizer's markup: rejected, not trained
            {"text": ["not", "text"]}]
    txt = tmp_path / "book.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + DOCS[2].encode("utf-8"))  # a BOM is not text
    jsonl = _jsonl(tmp_path / "corpus.jsonl", rows)
    with jsonl.open("a", encoding="utf-8") as fh:  # a number, as the file writes it
        fh.write('{"text": 42.50}\n')
    return jsonl, txt


def test_text_rows_and_txt_files_are_documents_counted_as_such(tmp_path: Path) -> None:
    jsonl, txt = _text_inputs(tmp_path)
    res = ingest_files([str(jsonl), str(txt)])
    c = res.counts
    assert (c["rows_in"], c["kept"], c["rejected_total"]) == (6, 4, 2)
    assert c["rows_in"] == c["kept"] + sum(c["rejected"].values())
    assert c["formats"]["text"] == {"rows_in": 6, "kept": 4,
                                    "rejected": {"special_token": 1, "wrong_type": 1}}
    assert c["text_documents"] == 4 and c["messages_by_role"] == {}
    assert c["files"][str(txt)] == {"rows_in": 1, "kept": 1, "rejected": {}}
    texts = [r["messages"][0]["content"] for r in res.records]
    assert texts == [DOCS[0], DOCS[1], "42.50", DOCS[2]]  # byte for byte; a number as written
    assert all(r["layout"] == "text" and r["messages"][0]["role"] == "assistant"
               and r["tools"] is None for r in res.records)
    assert res.records[0]["group"] == "g1" and res.records[3]["source"] == f"{txt}:1"
    assert [(r["line"], r["field"]) for r in res.rejects] == [(3, "text"), (4, "text")]


def test_text_beside_chat_fields_is_a_conversation() -> None:
    from reprotune.data.ingest import convert_row

    fmt, rec = convert_row({"text": "a note", "instruction": "q", "output": "a"})
    assert fmt == "alpaca" and "layout" not in rec
    pair = _trl_rows()[0]
    fmt, rec = convert_row({**pair, "text": "a summary column"})  # a pair, not a document
    assert fmt == "messages" and rec["preference"]["prompt_turns"] == 2
    fmt, rec = convert_row({"body": "doc"}, columns={"text": "body"})
    assert fmt == "text" and rec["messages"][0]["content"] == "doc"
    fmt, _ = convert_row({"text": "doc"}, fmt="text")
    assert fmt == "text"


def _packed(tmp_path: Path, tok, max_length: int):
    from reprotune.data.dedup import run_dedup
    from reprotune.data.split import split_rows
    from reprotune.data.text_packing import Packer
    from reprotune.params import DedupParams

    jsonl, txt = _text_inputs(tmp_path)
    records = ingest_files([str(jsonl), str(txt)]).records
    empty = {**records[0], "id": "empty", "messages": [{"role": "assistant", "content": ""}]}
    result = run_dedup([*records, empty], DedupParams(min_chars=0), progress=False)
    assert [d["reason"] for d in result.dropped] == ["empty_answer"]  # dedup counts it first
    train = split_rows(result.kept, val_ratio=0.0, test_ratio=0.0, stratify=None, group=None,
                       seed=0, leakage_threshold=0.7).parts["train"]
    assert all(r["layout"] == "text" for r in train)  # the marker survives dedup and split
    train.insert(1, empty)  # and the packer counts one that reaches it
    packer = Packer(tok, max_length)
    return train, packer, list(packer.rows(train))


@pytest.mark.parametrize("max_length", [16, 4096])
def test_text_mode_packs_documents_with_eos_and_labels_every_token(tmp_path: Path, tok,
                                                                    max_length: int) -> None:
    train, packer, rows = _packed(tmp_path, tok, max_length)
    s = packer.summary()
    assert s["documents_in"] == len(train) == 5
    assert (s["documents_packed"], s["dropped"]) == (4, {"empty_document": 1})
    assert s["documents_in"] == s["documents_packed"] + sum(s["dropped"].values())
    assert packer.dropped[0]["reason"] == "empty_document"
    assert all(len(r["input_ids"]) == max_length for r in rows[:-1])
    assert 0 < len(rows[-1]["input_ids"]) <= max_length and s["rows_out"] == len(rows)
    assert all(r["labels"] == r["input_ids"] and r["n_label_tokens"] == r["n_tokens"]
               for r in rows)  # loss on every token
    stream = [t for r in rows for t in r["input_ids"]]
    assert s["tokens_out"] == s["label_tokens"] == len(stream) == sum(packer.lengths)
    texts = [d["messages"][0]["content"] for d in train if d["messages"][0]["content"]]
    # no template, one EOS after each document, the text byte for byte
    assert tok.decode(stream) == "".join(t + tok.eos_token for t in texts)
    assert stream.count(tok.eos_token_id) == 4 and s["decode_mismatch"] == 0
    assert "<|im_start|>" not in tok.decode(stream)


def test_text_mode_rows_train_unchanged(tmp_path: Path, tok, tiny_base_dir) -> None:
    """The packed rows load through the trainer's own checks and give a finite loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from reprotune.data.format_stream import write_parquet
    from reprotune.data.formatting import formatted_schema
    from reprotune.data.text_packing import tables
    from reprotune.train.data import PaddingCollator, load_split

    _, _, rows = _packed(tmp_path, tok, 32)
    path = tmp_path / "train.parquet"
    assert write_parquet(path, tables(rows), formatted_schema()) == len(rows)
    split = load_split(path, tmp_path, vocab_size=len(tok), max_positions=512)
    assert len(split) == len(rows)
    batch = PaddingCollator(tok.pad_token_id)([split[i] for i in range(len(split))])
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    with torch.no_grad():
        loss = model(**{k: torch.as_tensor(v) for k, v in batch.items()}).loss
    assert torch.isfinite(loss)


def test_text_mode_refuses_conversations_naming_format_mode(tok) -> None:
    from reprotune.data.formatting import FormatError
    from reprotune.data.text_packing import Packer

    chat = {"id": "x", "source": "d.jsonl:3", "messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]}
    with pytest.raises(FormatError, match=r"format.mode: text, but record d.jsonl:3 is a "
                                          r"conversation.*set format.mode: chat"):
        list(Packer(tok, 64).rows([chat]))


def test_text_documents_in_chat_mode_are_counted_for_the_refusal(tmp_path: Path) -> None:
    from reprotune import io
    from reprotune.data.text_packing import count_documents

    jsonl, txt = _text_inputs(tmp_path)
    records = ingest_files([str(jsonl), str(txt)]).records
    chat = ingest_files([str(_jsonl(tmp_path / "c.jsonl", [{"instruction": "q", "output": "a"}]))])
    io.write_jsonl(tmp_path / "train.jsonl", [*records, *chat.records])
    assert count_documents(tmp_path / "train.jsonl") == 4


def test_text_max_length_auto_is_the_context_at_most_2048() -> None:
    from reprotune.data.text_packing import text_max_length

    assert text_max_length("auto", 8192) == 2048
    assert text_max_length("auto", 512) == 512
    assert text_max_length("auto", None) == 2048
    assert text_max_length(4096, 1024) == 1024 and text_max_length(100, None) == 100


# --------------------------------------------------------------------------- format.mode checks
def _params(repo_root: Path, **sections: dict) -> dict:
    from reprotune.params import read_params

    raw = read_params(repo_root / "params.yaml")
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.mark.parametrize(("sections", "message"), [
    ({"format": {"mode": "txt"}}, r"format\.mode: 'txt' is not one of"),
    ({"format": {"mode": "text"}, "ingest": {"format": "alpaca"}},
     r"ingest\.format: alpaca reads conversations.*set ingest\.format: text"),
    ({"ingest": {"format": "text"}}, r"ingest\.format: text .*set format\.mode: text"),
    ({"format": {"mode": "text", "enable_thinking": True}},
     r"format\.enable_thinking: true has no effect with format\.mode: text"),
])
def test_bad_format_mode_combinations_name_the_key(repo_root: Path, sections: dict,
                                                   message: str) -> None:
    from reprotune.params import ParamsError, validate_all

    with pytest.raises(ParamsError, match=message):
        validate_all(_params(repo_root, **sections))


def test_good_format_mode_combinations_pass(repo_root: Path) -> None:
    from reprotune.params import validate_all

    validate_all(_params(repo_root, format={"mode": "text"}, ingest={"format": "text"}))
    validate_all(_params(repo_root, format={"mode": "text"}))
    validate_all(_params(repo_root))


def test_check_refuses_a_mode_that_does_not_fit_the_inputs(tmp_path: Path) -> None:
    from reprotune.data.layouts import LayoutError, check_layouts, input_layout

    jsonl, txt = _text_inputs(tmp_path)
    chat = _jsonl(tmp_path / "chat.jsonl", [{"instruction": "q", "output": "a"}])
    mapped = _jsonl(tmp_path / "mapped.jsonl", [{"body": "a document"}])
    assert [input_layout(p) for p in (jsonl, txt, chat, mapped)] == ["text", "text", "chat", None]
    assert input_layout(mapped, {"text": "body"}) == "text"
    check_layouts([str(jsonl), str(txt)], "text")
    check_layouts([str(chat)], "chat")
    with pytest.raises(LayoutError, match=r"^format\.mode: chat, but .*book\.txt hold\(s\) text "
                                          r"documents.*set format\.mode: text"):
        check_layouts([str(chat), str(txt)], "chat")
    with pytest.raises(LayoutError, match=r"^format\.mode: text, but .*chat\.jsonl hold\(s\) "
                                          r"conversations; set format\.mode: chat.*keep the text "
                                          r"input\(s\)"):
        check_layouts([str(jsonl), str(chat)], "text")


def test_generation_eval_refuses_packed_text_rows_pointing_at_merge() -> None:
    from reprotune.evaluate.evaluation import EvalDataError, parse_row

    row = {"id": "p1", "messages": None, "input_ids": [1, 2], "labels": [1, 2]}
    with pytest.raises(EvalDataError, match=r"test.parquet: row 1 \(id p1\): a packed text row "
                                            r"\(format.mode: text.*dvc repro evaluate merge"):
        parse_row(row, 0, "test.parquet")


def test_text_rows_are_evaluated_by_perplexity(tmp_path: Path, tok, tiny_base_dir) -> None:
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from reprotune.evaluate.text_eval import evaluate_text, is_packed_text

    _, _, rows = _packed(tmp_path, tok, 32)
    assert is_packed_text(rows) and not is_packed_text([{"messages": "[]", "input_ids": [1]}])
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    cfg = SimpleNamespace(max_rows=0, batch_size=4, max_new_tokens="auto")
    metrics, records = evaluate_text(model, tok, rows, cfg, progress=False)
    assert metrics["n_rows"] == len(records) == len(rows) and metrics["settings"]["mode"] == "text"
    assert metrics["perplexity"] > 1 and not metrics["cap_warning"]
    # every token but each row's first is predicted (the labels shift by one)
    assert [r["n_tokens"] for r in records] == [len(r["input_ids"]) - 1 for r in rows]
    assert metrics["ppl_tokens"] == sum(r["n_tokens"] for r in records)


# --------------------------------------------------------------------------- docs/data.md table
def _doc_layouts() -> list[tuple[str, str, str]]:
    """(layout, one-line row, read as) of docs/data.md's layouts table."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    table = text.split("<!-- layouts:start -->")[1].split("<!-- layouts:end -->")[0]
    out = []
    for line in table.strip().splitlines()[2:]:
        name, row, read_as = (c.strip() for c in line.strip("|").split(" | "))
        out.append((name, row.strip("`"), read_as))
    return out


@pytest.mark.parametrize(("name", "row", "read_as"), _doc_layouts(), ids=lambda v: str(v)[:30])
def test_every_documented_layout_line_ingests_as_documented(tmp_path: Path, name: str, row: str,
                                                            read_as: str) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(row + "\n", encoding="utf-8")
    res = ingest_files([str(path)])
    assert (res.counts["rows_in"], res.counts["kept"]) == (1, 1), res.rejects
    fmt, _, pair = read_as.partition(" + ")
    assert list(res.counts["formats"]) == [fmt]
    rec = res.records[0]
    assert (rec.get("preference") is not None) == (pair == "pair")
    assert rec["messages"][-1]["role"] == "assistant"
    if fmt == "text":
        assert rec["layout"] == "text"
        assert rec["messages"][0]["content"] == json.loads(row)["text"]
    if name.startswith("LLaMA-Factory v1 typed"):
        msgs = rec["messages"]
        assert msgs[1]["reasoning_content"] == "Call the tool."
        assert msgs[1]["tool_calls"][0]["function"] == {"name": "weather",
                                                        "arguments": {"city": "Paris"}}
        assert msgs[2] == {"role": "tool", "content": "18°C"}


def test_the_layouts_table_covers_every_format() -> None:
    from reprotune.data.formats import FORMATS

    read_as = {r.partition(" + ")[0] for _, _, r in _doc_layouts()}
    assert read_as == set(FORMATS)


# --------------------------------------------------------------------------- the stages, text mode
def _stage(root: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)


def _set(root: Path, **values: str) -> None:
    path = root / "params.yaml"
    text = path.read_text(encoding="utf-8")
    for old, new in values.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")


@pytest.mark.slow  # > 5 s: make test runs it, make test-fast does not
def test_text_mode_through_the_stages(tmp_path: Path) -> None:
    """check → read → ingest → dedup → redact → split → base → format with format.mode: text, as
    dvc.yaml runs them; then the refusals of a mode that does not fit."""
    import pyarrow.parquet as pq

    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"))
    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "so", "tu") for b in
             ("ban", "cor", "dil", "fen", "gus", "hap", "jet", "kim", "lun", "mop")]
    docs = [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(30 + i))
            for i in range(40)]
    _jsonl(root / "data" / "raw" / "corpus.jsonl", [{"text": d} for d in docs])
    (root / "data" / "raw" / "book.txt").write_text("第一章\n\n纯文本。\n", encoding="utf-8")
    inputs = ["data/raw/corpus.jsonl", "data/raw/book.txt"]
    _set(root, **{"  - data/raw/demo.jsonl\n": "".join(f"  - {i}\n" for i in inputs),
                  "name: smollm2-135m-instruct": "name: tiny",
                  "  max_length: auto  ": "  max_length: 64    "})
    refused = _stage(root, "check", "--out", "metrics/params_ok.json")
    assert refused.returncode != 0
    assert "format.mode: chat, but data/raw/corpus.jsonl, data/raw/book.txt hold(s) text " \
           "documents" in refused.stderr and "set format.mode: text" in refused.stderr
    _set(root, **{"  mode: chat  ": "  mode: text  "})
    steps = [("check", "--out", "metrics/params_ok.json"),
             *[("read", "--input", i, "--out", f"data/interim/read/{i}") for i in inputs],
             ("ingest",), ("dedup",), ("redact",), ("split",),
             ("base", "--data", "data/interim/splits/train.jsonl", "--out", "models/base"),
             ("format",)]
    for name, *args in steps:
        proc = _stage(root, name, *args)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    ingest = json.loads((root / "metrics" / "ingest.json").read_text())
    assert (ingest["rows_in"], ingest["kept"], ingest["text_documents"]) == (41, 41, 41)
    fmt = json.loads((root / "metrics" / "format.json").read_text())
    dedup = json.loads((root / "metrics" / "dedup.json").read_text())
    assert fmt["mode"] == "text" and fmt["max_length"] == 64
    assert fmt["documents_in"] == fmt["documents_packed"] + sum(fmt["dropped"].values())
    assert fmt["documents_in"] == dedup["kept"] == sum(
        sum(1 for _ in (root / "data/interim/splits" / f"{n}.jsonl").open()) for n in
        ("train", "val", "test"))
    assert fmt["tokens_out"] == fmt["label_tokens"] and fmt["decode_mismatch"] == 0
    train = pq.read_table(root / "data" / "processed" / "train.parquet").to_pylist()
    assert len(train) == fmt["splits"]["train"]["rows_out"]
    assert all(r["labels"] == r["input_ids"] for r in train)
    assert all(r["n_tokens"] == 64 for r in train[:-1])
    assert (root / "data" / "processed" / "pairs" / "train.jsonl").read_text() == ""
    # a split holding documents with format.mode: chat stops the format stage, naming the key
    _set(root, **{"  mode: text  ": "  mode: chat  "})
    proc = _stage(root, "format")
    assert proc.returncode != 0
    assert "format: format.mode: chat, but the splits hold text documents" in proc.stderr
