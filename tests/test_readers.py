"""Row readers: every file type, 1-based line numbers, bad rows as errors (never exceptions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.readers import iter_rows


def _rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    return [(r.line, r.data, r.error) for r in iter_rows(path)]


def test_jsonl_lines_blank_lines_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\r\n{bad json\n[1, 2]\n{"a": "\xff"}\n  \n{"a": 3}')
    rows = _rows(p)
    assert [(ln, d) for ln, d, e in rows if e is None] == [(1, {"a": 1}), (3, {"a": 2}), (8, {"a": 3})]
    errors = {ln: e for ln, d, e in rows if e is not None}
    assert sorted(errors) == [4, 5, 6]
    assert errors[4].startswith("invalid JSON")
    assert "expected a JSON object, got array" in errors[5]
    assert "invalid UTF-8" in errors[6]
    bad = next(r for r in iter_rows(p) if r.line == 4)
    assert bad.raw == "{bad json" and bad.source == str(p) and bad.where == f"{p}:4"


def test_json_array_uses_index_plus_one(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"x": 1}, "oops", {"x": 3}]), encoding="utf-8")
    rows = _rows(p)
    assert [(ln, d) for ln, d, _ in rows] == [(1, {"x": 1}), (2, None), (3, {"x": 3})]
    assert "got string" in rows[1][2]


def test_json_single_object_and_jsonl_fallback(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text('{"x": 1}', encoding="utf-8")
    assert _rows(one) == [(1, {"x": 1}, None)]
    lines = tmp_path / "lines.json"
    lines.write_text('{"x": 1}\n{"x": 2\n{"x": 3}\n', encoding="utf-8")
    rows = _rows(lines)
    assert [(ln, d) for ln, d, _ in rows] == [(1, {"x": 1}), (2, None), (3, {"x": 3})]
    assert rows[1][2].startswith("invalid JSON")


def test_csv_line_numbers_follow_multiline_cells(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('instruction,output\nq1,a1\n"multi\nline q",a2\n\nq3,a3\nonly-one-field\n',
                 encoding="utf-8")
    rows = _rows(p)
    assert [(ln, d) for ln, d, _ in rows] == [
        (2, {"instruction": "q1", "output": "a1"}),
        (3, {"instruction": "multi\nline q", "output": "a2"}),
        (6, {"instruction": "q3", "output": "a3"}),
        (7, None),
    ]
    assert rows[3][2] == "expected 2 CSV fields, got 1"


def test_parquet_rows_keep_nested_values(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    io.write_parquet(p, [{"messages": msgs, "group": "g1"}, {"messages": msgs[:1], "group": None}])
    rows = _rows(p)
    assert [ln for ln, _, _ in rows] == [1, 2]
    assert rows[0][1] == {"messages": msgs, "group": "g1"}
    assert rows[1][1]["group"] is None


def test_missing_file_names_file_and_param(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as exc:
        list(iter_rows(missing))
    assert str(missing) in str(exc.value) and "ingest.inputs" in str(exc.value)


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "d.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*ingest\.inputs"):
        list(iter_rows(p))
