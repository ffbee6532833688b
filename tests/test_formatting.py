"""Chat-template rendering, multi-turn assistant masks, truncation and length stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reprotune.data.formatting import (
    DROP_TRUNCATED,
    FormatError,
    format_records,
    formatted_schema,
    resolve_max_length,
)
from reprotune.data.rendering import IGNORE_INDEX, label_tokens, turn_markers

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _rec(i: int, messages: list[dict], tools=None, label=None) -> dict:
    return {"id": f"r{i}", "source": f"t.jsonl:{i}", "messages": messages, "tools": tools,
            "label": label, "group": None}


RECORDS = [
    _rec(1, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         label="positive"),
    _rec(2, [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "计算 12 加 7"},
             {"role": "assistant", "content": "19"},
             {"role": "user", "content": "再加 1"},
             {"role": "assistant", "content": "20 🙂"}]),
    _rec(3, [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": '{"temp_c": 21}'},
             {"role": "assistant", "content": "It is 21 °C in Paris."}], tools=TOOLS),
]
# what each assistant turn must contribute to the labels, in order
EXPECTED = {
    "r1": ["Hello!<|im_end|>"],
    "r2": ["19<|im_end|>", "20 🙂<|im_end|>"],
    "r3": [CALL_TEXT + "<|im_end|>", "It is 21 °C in Paris.<|im_end|>"],
}


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    return load_tokenizer(tiny_base_dir)


def _runs(ids, labels, tok, labelled=True) -> list[str]:
    """Decoded contiguous runs of labelled (or unlabelled) tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if (lab != IGNORE_INDEX) == labelled:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_turn_markers_from_the_qwen3_template(tok):
    m = turn_markers(tok, enable_thinking=False)
    assert (m.header, m.gen_prompt, m.end) == (
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_end|>")
    assert turn_markers(tok, enable_thinking=True).gen_prompt == "<|im_start|>assistant\n"


def test_text_is_exactly_the_chat_template_rendering(tok):
    rows, stats, _ = format_records(RECORDS, tok, max_length=1024, enable_thinking=False)
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"]
    for rec, row in zip(RECORDS, rows, strict=True):
        want = tok.apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False,
                                       enable_thinking=False)
        assert row["text"] == want
        assert tok.decode(row["input_ids"]) == row["text"]
        assert row["input_ids"] == tok.encode(want, add_special_tokens=False)
        # the empty think block is rendered once, on the final assistant turn only
        assert row["text"].count("<think>\n\n</think>\n\n") == 1
    assert stats["decode_mismatch"] == 0 and stats["label_span_mismatch"] == 0


def test_every_assistant_turn_is_labelled_and_nothing_else(tok):
    rows, stats, _ = format_records(RECORDS, tok, max_length=1024, enable_thinking=False)
    assert stats["assistant_turns"] == 5
    for rec, row in zip(RECORDS, rows, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        assert len(labels) == len(ids) == row["n_tokens"]
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
        assert _runs(ids, labels, tok) == EXPECTED[row["id"]]
        assert row["n_label_tokens"] == sum(lab != IGNORE_INDEX for lab in labels)
        prompt_side = "".join(_runs(ids, labels, tok, labelled=False))
        for m in rec["messages"]:
            if m["role"] != "assistant":  # user/system/tool text sits on the prompt side
                assert m["content"] in prompt_side
        # headers and the think block are prompt, as at inference with enable_thinking=False
        assert prompt_side.count("<|im_start|>assistant\n") == len(EXPECTED[row["id"]])
        assert "<think>\n\n</think>\n\n" in prompt_side
        assert "<think>" not in "".join(_runs(ids, labels, tok))
    assert stats["label_tokens"] == sum(r["n_label_tokens"] for r in rows)


def test_thinking_mode_labels_the_think_block(tok):
    rows, _, _ = format_records(RECORDS[1:2], tok, max_length=1024, enable_thinking=True)
    assert _runs(rows[0]["input_ids"], rows[0]["labels"], tok) == [
        "19<|im_end|>", "<think>\n\n</think>\n\n20 🙂<|im_end|>"]


def test_label_tokens_by_offsets():
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    ids = [10, 11, 12, 13, 14, 15]
    assert label_tokens(offsets, ids, [(2, 6), (8, 12)]) == [-100, 11, 12, -100, 14, 15]
    # a token that starts before a span is prompt; one that starts inside is labelled
    assert label_tokens([(0, 3), (3, 6)], [1, 2], [(2, 5)]) == [-100, 2]
    assert label_tokens(offsets, ids, []) == [-100] * 6


def test_truncation_counts_and_drops(tok):
    long_prompt = _rec(4, [{"role": "user", "content": "word " * 200},
                           {"role": "assistant", "content": "ok"}])
    long_answer = _rec(5, [{"role": "user", "content": "Count"},
                           {"role": "assistant", "content": "one two three " * 100}])
    recs = [RECORDS[0], long_prompt, long_answer]
    full = [len(tok.encode(tok.apply_chat_template(r["messages"], tokenize=False),
                           add_special_tokens=False)) for r in recs]
    max_length = 64
    assert full[0] < max_length < min(full[1:])
    rows, stats, dropped = format_records(recs, tok, max_length=max_length, enable_thinking=False)
    assert [r["id"] for r in rows] == ["r1", "r5"]
    assert stats["rows_in"] == 3 and stats["rows_out"] == 2 and stats["rows_dropped"] == 1
    assert {k: v for k, v in stats["dropped"].items() if v} == {DROP_TRUNCATED: 1}
    assert stats["truncated"] == 2 and stats["truncated_share"] == round(2 / 3, 4)
    assert stats["truncation_warning"] is True  # 67% > format.warn_truncated (5%)
    assert [(d["id"], d["reason"]) for d in dropped] == [("r4", DROP_TRUNCATED)]
    assert f"cut at {max_length}" in dropped[0]["detail"]
    cut = rows[1]
    assert cut["truncated"] is True and rows[0]["truncated"] is False
    assert cut["n_tokens"] == len(cut["input_ids"]) == len(cut["labels"]) == max_length
    assert 0 < cut["n_label_tokens"] < max_length
    assert stats["token_length"]["min"] == min(full) and stats["token_length"]["max"] == max(full)
    assert stats["lengths"] == full
    assert stats["tokens_out"] == full[0] + max_length


@pytest.mark.parametrize("content", ["fake <|im_end|> end", "<think>hidden</think>answer",
                                     "a <tool_response> b", "<|vision_start|>", "x<|fim_pad|>"])
def test_markup_in_content_is_dropped_with_reason(tok, content):
    bad = _rec(6, [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    rows, stats, dropped = format_records([RECORDS[0], bad], tok, max_length=256,
                                          enable_thinking=False)
    assert [r["id"] for r in rows] == ["r1"]
    assert {k: v for k, v in stats["dropped"].items() if v} == {"special_token": 1}
    assert dropped[0]["reason"] == "special_token" and "messages[1].content" in dropped[0]["detail"]


def test_forbidden_strings_come_from_the_tokenizer_and_template(tok):
    from reprotune.markup import default_forbidden, forbidden_strings, qwen3_added_tokens

    found = forbidden_strings(tok)
    assert {t for t, _ in qwen3_added_tokens()} <= set(found)  # all 26 added tokens
    assert len(qwen3_added_tokens()) == 26
    assert {"<tools>", "</tools>", "<think>", "</tool_response>"} <= set(found)  # template
    assert set(found) == set(default_forbidden())  # ingest and format agree for Qwen3


def test_max_length_auto_is_p99_capped_by_the_model(tok):
    lengths = list(range(1, 101))  # p99 of 1..100 = 99.01 -> 100
    assert resolve_max_length("auto", lengths, None) == 100
    assert resolve_max_length("auto", lengths, 64) == 64
    assert resolve_max_length(50, lengths, 1024) == 50 and resolve_max_length(4096, lengths, 1024) == 1024
    rows, stats, _ = format_records(RECORDS, tok, max_length="auto", enable_thinking=False,
                                    model_limit=512)
    assert stats["max_length_setting"] == "auto" and stats["model_limit"] == 512
    assert stats["max_length"] == min(512, int(-(-stats["token_length"]["p99"] // 1)))
    assert stats["truncated"] <= 1 and len(rows) == 3


def test_max_length_too_small_for_any_label_fails_naming_the_param(tok):
    with pytest.raises(FormatError, match=r"format.max_length: 8 leaves no assistant token in 3 of 3"):
        format_records(RECORDS, tok, max_length=8, enable_thinking=False)


def test_tools_render_exactly_as_the_official_template(tok, shared_dir):
    """OpenAI-style tools, as ingest stores them, render as the official Qwen3 template does."""
    import jinja2

    from reprotune.data.ingest import convert_row

    glaive = {"tools": json.dumps([{"name": "get_weather", "description": "Weather for a city",
                                    "parameters": {"type": "object", "required": ["city"],
                                                   "properties": {"city": {"type": "string"}}}}]),
              "conversations": [{"from": "human", "value": "Weather in Paris?"},
                                {"from": "function_call",
                                 "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                                {"from": "observation", "value": '{"temp_c": 21}'},
                                {"from": "gpt", "value": "21 °C."}]}
    _, rec = convert_row(glaive)
    rows, _, _ = format_records([rec], tok, max_length=4096, enable_thinking=False)
    official = (shared_dir / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    want = env.from_string(official).render(messages=rec["messages"], tools=rec["tools"],
                                            enable_thinking=False, add_generation_prompt=False)
    assert rows[0]["text"] == want
    assert '\n{"type": "function", "function": {"name": "get_weather", "description": ' in want
    assert '"required": ["city"], "properties"' in want  # key order as written


def test_rows_carry_canonical_fields_and_write_parquet(tok, tmp_path):
    from reprotune import io

    rows, _, _ = format_records(RECORDS, tok, max_length=1024, enable_thinking=False)
    r1, _, r3 = rows
    assert (r1["id"], r1["source"], r1["label"], r1["group"]) == ("r1", "t.jsonl:1", "positive", None)
    assert json.loads(r3["messages"]) == RECORDS[2]["messages"]
    assert json.loads(r3["tools"]) == TOOLS and r1["tools"] is None
    io.write_parquet(tmp_path / "f.parquet", rows, schema=formatted_schema())
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "f.parquet")
    assert str(table.schema.field("input_ids").type) == "list<element: int32>"
    assert table.to_pylist() == rows


def test_histogram_writes_a_stable_png(tmp_path):
    from reprotune.plots import histogram

    for name in ("a.png", "b.png"):
        histogram([3, 5, 5, 8, 13], tmp_path / "p" / name, title="t", xlabel="tokens", vline=10)
    a, b = (tmp_path / "p" / n for n in ("a.png", "b.png"))
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    histogram([], tmp_path / "empty.png", title="t", xlabel="x")
    assert (tmp_path / "empty.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a.png", "b.png"]


def _glaive_to_canonical(row: dict, i: int) -> dict:
    """The glaive tool-call demo (sharegpt) as canonical records, for this test only."""
    msgs = []
    for turn in row["conversations"]:
        role, value = turn["from"], turn["value"]
        if role == "function_call":
            call = json.loads(value)
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call["name"],
                                                  "arguments": call["arguments"]}}]})
        else:
            msgs.append({"role": {"human": "user", "gpt": "assistant",
                                  "observation": "tool"}[role], "content": value})
    return _rec(i, msgs, tools=json.loads(row["tools"]) or None)


def test_real_multi_turn_tool_data(tok, shared_dir):
    data = json.loads((shared_dir / "data" / "glaive_toolcall_en_demo.json").read_text())
    recs = [_glaive_to_canonical(r, i) for i, r in enumerate(data)]
    rows, stats, _ = format_records(recs, tok, max_length=100_000, enable_thinking=False)
    assert stats["rows_out"] == len(recs) == 300 and stats["truncated"] == 0
    assert stats["decode_mismatch"] == 0 and stats["label_span_mismatch"] == 0
    n_turns = sum(m["role"] == "assistant" for r in recs for m in r["messages"])
    assert stats["assistant_turns"] == n_turns
    for rec, row in zip(recs, rows, strict=True):
        runs = _runs(row["input_ids"], row["labels"], tok)
        turns = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert len(runs) == len(turns)
        for run, m in zip(runs, turns, strict=True):
            if m.get("tool_calls"):
                assert run.startswith("<tool_call>\n") and run.endswith("</tool_call><|im_end|>")
            else:
                assert run == m["content"] + "<|im_end|>"


def _base_and_format(tmp_path, repo_root, parts: dict[str, list[dict]], max_length) -> dict:
    """Run the base and format stages as dvc.yaml does, on the given split files."""
    from reprotune import io

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(
        "model:\n  name: tiny\n  tiny: {vocab: 400, hidden: 16, layers: 1, heads: 2, kv_heads: 1,"
        f" head_dim: 8, intermediate: 32, max_positions: 128}}\nformat:\n  max_length: {max_length}\n",
        encoding="utf-8")
    for name, recs in parts.items():
        io.write_jsonl(tmp_path / "splits" / f"{name}.jsonl", recs)
    env = {**os.environ, "PYTHONPATH": str(repo_root / "src")}
    run = dict(cwd=tmp_path, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, str(repo_root / "stages/base.py"), "--data",
                    "splits/train.jsonl", "--out", "base", "--metrics", "m/base.json"], **run)
    assert io.read_json(tmp_path / "m/base.json")["source"] == "embedded"
    subprocess.run([sys.executable, str(repo_root / "stages/format.py"), "--data-dir", "splits",
                    "--base", "base", "--out-dir", "p", "--metrics", "m/format.json",
                    "--dropped", "d.jsonl", "--plot", "m/len.png"], **run)
    return io.read_json(tmp_path / "m/format.json")


def test_base_and_format_stages(tmp_path, repo_root):
    from reprotune import io

    metrics = _base_and_format(tmp_path, repo_root,
                               {"train": [RECORDS[0], RECORDS[2]], "val": [RECORDS[1]],
                                "test": []}, 100)
    assert metrics["rows_in"] == 3 == metrics["rows_out"] + metrics["rows_dropped"]
    assert {s: v["rows_in"] for s, v in metrics["splits"].items()} == {"train": 2, "val": 1,
                                                                      "test": 0}
    assert "lengths" not in metrics and metrics["max_length"] == 100
    for name in ("train", "val", "test"):
        rows = io.read_parquet(tmp_path / "p" / f"{name}.parquet")
        assert len(rows) == metrics["splits"][name]["rows_out"]
        assert all(r["n_tokens"] <= 100 for r in rows)
    assert [r["id"] for r in io.read_parquet(tmp_path / "p" / "val.parquet")] == ["r2"]
    assert len(io.read_jsonl(tmp_path / "d.jsonl")) == metrics["rows_dropped"]
    assert (tmp_path / "m/len.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # > 15 s: make test runs it, make test-fast does not
def test_tokenizer_and_max_length_come_from_the_train_split_only(tmp_path, repo_root):
    """A word repeated only in test is not in the tiny tokenizer's vocabulary (it is when
    train holds it), and format.max_length: auto is the p99 of the train lengths, so the long
    test rows are cut rather than raising the limit."""
    from reprotune.modeling import load_tokenizer

    word = "qzxvjkwqzxvjkw"

    def rec(i: int, answer: str) -> dict:
        return _rec(i, [{"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": answer}])

    train = [rec(i, f"Answer {i} is short.") for i in range(40)]
    held = [rec(100 + i, " ".join([word] * 8)) for i in range(10)]
    metrics = _base_and_format(tmp_path / "a", repo_root,
                               {"train": train, "val": [], "test": held}, "auto")
    n_unseen = len(load_tokenizer(tmp_path / "a" / "base").encode(word, add_special_tokens=False))
    _base_and_format(tmp_path / "b", repo_root, {"train": train + held, "val": [], "test": []},
                     "auto")
    n_seen = len(load_tokenizer(tmp_path / "b" / "base").encode(word, add_special_tokens=False))
    assert n_seen <= 2 < 8 <= n_unseen
    train_p99 = metrics["splits"]["train"]["token_length"]["p99"]
    assert metrics["max_length"] == -(-train_p99 // 1) < metrics["splits"]["test"]["token_length"]["min"]
    assert metrics["max_length_from"] == "train"
    assert metrics["splits"]["test"]["truncated"] == 10 == metrics["splits"]["test"]["rows_out"]
