"""Real Chinese data through ingest -> format -> evaluation references, byte for byte.

The 1,000 real Chinese sharegpt rows in ../shared carry full-width punctuation (，：？（）！；),
superscripts, aligned code and ASCII art. Every kept answer must reach the training text and
the evaluation reference exactly as the file has it, so a model that reproduces the answers
word for word scores BLEU 100.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprotune.data.formatting import format_records
from reprotune.data.inputs import ingest_files
from reprotune.evaluate import metrics as M
from reprotune.evaluate.evaluation import parse_row
from reprotune.modeling import load_tokenizer

ROLE = {"human": "user", "gpt": "assistant"}


def _raw_answers(path: Path) -> dict[int, list[str]]:
    """Line number -> the assistant texts of that line, straight from the file."""
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        conv = json.loads(line)["conversations"]
        out[lineno] = [t["value"] for t in conv if ROLE.get(t["from"]) == "assistant"]
    return out


def test_chinese_text_survives_byte_for_byte(shared_dir: Path, tiny_base_dir: Path) -> None:
    path = shared_dir / "data" / "sharegpt_zh_1K_format.jsonl"
    raw = _raw_answers(path)
    res = ingest_files([str(path)])
    assert res.counts["kept"] >= 990
    full_width = 0
    for rec in res.records:
        line = int(rec["source"].rsplit(":", 1)[1])
        got = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert got == raw[line], rec["source"]
        full_width += any(c in "，：？（）！；" for c in "".join(got))
    assert full_width > 900  # the data really is full-width punctuated

    tok = load_tokenizer(tiny_base_dir)
    sample = res.records[:200]
    rows, stats, _ = format_records(sample, tok, max_length=100_000, enable_thinking=False)
    assert stats["rows_out"] == len(sample) and stats["decode_mismatch"] == 0
    refs = []
    for i, (rec, row) in enumerate(zip(sample, rows, strict=True)):
        for m in rec["messages"]:
            assert m["content"] in row["text"]  # trained on the exact text
        example = parse_row(row, i, "sample")
        assert example.reference == rec["messages"][-1]["content"].strip()
        refs.append(example.reference)
    # a model that answers exactly as the data does scores a perfect corpus BLEU
    assert M.bleu_chrf(refs, refs, "auto")["bleu"] == pytest.approx(100.0)
    aligned = [r for r in refs if "  " in r]
    assert aligned  # runs of spaces (tables, code) are part of what is scored
