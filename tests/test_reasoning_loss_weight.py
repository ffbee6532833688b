"""Reasoning traces (``reasoning_content``) and per-message ``loss_weight``, from the input
file through ingest, dedup, split and format: kept as written, rendered exactly as the Qwen3
template renders them, labelled as ``format.train_reasoning`` and ``loss_weight`` say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprotune.data.dedup import run_dedup
from reprotune.data.formatting import format_records
from reprotune.data.inputs import ingest_files
from reprotune.data.rendering import IGNORE_INDEX
from reprotune.data.split import split_rows
from reprotune.params import DedupParams

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3_chat_template.jinja"
REASONING = "用户问一加一。\n先想：1 + 1 = 2，答案是 2。"


def _runs(ids, labels, tok) -> list[str]:
    """Decoded contiguous runs of labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    return load_tokenizer(tiny_base_dir)


def _rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": "一加一等于几？", "name": "小明"},
                      {"role": "assistant", "content": "等于 2。", "reasoning_content": REASONING}]},
        {"messages": [{"role": "user", "content": "先问：你好", "loss_weight": 0.0},
                      {"role": "assistant", "content": "你好！", "loss_weight": 0.0,
                       "reasoning_content": "早先的思考"},
                      {"role": "user", "content": "再问：二加二？", "loss_weight": 0.0},
                      {"role": "assistant", "content": "是 4。", "loss_weight": 1.0}]},
        {"conversations": [{"from": "human", "value": "Name a colour."},
                           {"from": "gpt", "value": "Blue.", "weight": 1}]},
    ]


@pytest.fixture()
def ingested(tmp_path: Path):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()),
                 encoding="utf-8")
    return ingest_files([str(p)])


def test_ingest_keeps_reasoning_and_loss_weight_and_counts_other_keys(ingested) -> None:
    a, b, c = (r["messages"] for r in ingested.records)
    assert a[1] == {"role": "assistant", "content": "等于 2。", "reasoning_content": REASONING}
    assert a[0] == {"role": "user", "content": "一加一等于几？"}  # name: counted, not kept
    assert b[1] == {"role": "assistant", "content": "你好！", "reasoning_content": "早先的思考",
                    "loss_weight": 0}
    assert b[3] == {"role": "assistant", "content": "是 4。"}  # weight 1 is the default
    assert "loss_weight" not in b[0] and c[1] == {"role": "assistant", "content": "Blue."}
    counts = ingested.counts
    assert counts["dropped_message_keys"] == {"name": 1, "weight": 1}
    assert (counts["with_reasoning"], counts["loss_weight_zero_turns"]) == (2, 1)
    assert counts["kept"] == 3


def test_loss_weight_other_than_0_or_1_rejects_the_row(tmp_path: Path) -> None:
    bad = [{"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a", "loss_weight": w}]}
           for w in (0.5, 2, -1, "1", True)]
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    p = tmp_path / "w.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]), encoding="utf-8")
    res = ingest_files([str(p)])
    assert [r["reason"] for r in res.rejects] == ["invalid_loss_weight"] * 5
    assert [r["line"] for r in res.rejects] == [2, 3, 4, 5, 6]
    assert res.rejects[0]["field"] == "messages[1].loss_weight"
    assert "is 0.5; it must be 0" in res.rejects[0]["detail"]
    assert res.counts["kept"] == 1


def test_reasoning_survives_dedup_and_split(ingested) -> None:
    kept = run_dedup(ingested.records, DedupParams(min_chars=0), progress=False).kept
    assert [r["id"] for r in kept] == [r["id"] for r in ingested.records]
    parts = split_rows(kept, val_ratio=0.0, test_ratio=0.0, stratify=None, group=None, seed=0,
                       leakage_threshold=0.7).parts
    assert parts["train"][0]["messages"][1]["reasoning_content"] == REASONING
    assert parts["train"][1]["messages"][1]["loss_weight"] == 0


@pytest.mark.parametrize("thinking", [False, True])
def test_reasoning_rendered_as_the_template_and_labelled(tok, ingested, thinking: bool) -> None:
    rec = ingested.records[0]
    rows, stats, _ = format_records([rec], tok, max_length=1024, enable_thinking=thinking)
    want = tok.apply_chat_template(rec["messages"], tokenize=False, enable_thinking=thinking)
    assert rows[0]["text"] == want
    assert f"<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\n等于 2。<|im_end|>" in want
    # default: the think block the template places in the final turn is trained on
    assert _runs(rows[0]["input_ids"], rows[0]["labels"], tok) == [
        f"<think>\n{REASONING}\n</think>\n\n等于 2。<|im_end|>"]
    assert stats["train_reasoning"] is True
    rows, stats, _ = format_records([rec], tok, max_length=1024, enable_thinking=thinking,
                                    train_reasoning=False)
    assert rows[0]["text"] == want  # the same text: the reasoning is context, not a target
    assert _runs(rows[0]["input_ids"], rows[0]["labels"], tok) == ["等于 2。<|im_end|>"]
    assert stats["train_reasoning"] is False


@pytest.mark.skipif(not FIXTURE.is_file(), reason="needs ../shared/fixtures (the official template)")
def test_rendering_matches_the_official_qwen3_template(tok, ingested) -> None:
    official = FIXTURE.read_text(encoding="utf-8")
    rows, _, _ = format_records(ingested.records, tok, max_length=1024, enable_thinking=False)
    for rec, row in zip(ingested.records, rows, strict=True):
        assert row["text"] == tok.apply_chat_template(
            rec["messages"], tokenize=False, enable_thinking=False, chat_template=official)
    # the template drops reasoning from turns before the last user query
    assert "早先的思考" not in rows[1]["text"]


def test_loss_weight_zero_turn_is_not_labelled(tok, ingested) -> None:
    rows, stats, _ = format_records(ingested.records, tok, max_length=1024,
                                    enable_thinking=False)
    assert _runs(rows[1]["input_ids"], rows[1]["labels"], tok) == ["是 4。<|im_end|>"]
    assert "你好！<|im_end|>" in rows[1]["text"]  # still there, as context
    assert (stats["loss_weight_masked_turns"], stats["assistant_turns"]) == (1, 4)
