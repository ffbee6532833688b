"""Row readers: every file type, 1-based line numbers, bad rows as errors (never exceptions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.readers import InputFileError, iter_rows


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
    p = tmp_path / "d.xml"  # (.txt is a document: tests/test_layouts.py)
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xml'.*ingest\.inputs"):
        list(iter_rows(p))


# --------------------------------------------------------------------------- issue 18
SHARED_ZH = Path(__file__).resolve().parents[2] / "shared" / "data" / "sharegpt_zh_1K_format.jsonl"


def test_deep_values_are_one_reject_at_every_window_size(tmp_path: Path, monkeypatch) -> None:
    """A value too deep to decode ends as one reject naming its depth, wherever the
    streaming window cuts it; the rows around it are read."""
    from reprotune.data import jsonstream

    good = [{"instruction": f"q{i}", "output": "a"} for i in range(3)]
    deep = "[" * 3000 + "]" * 3000
    p = tmp_path / "deep.json"
    p.write_text(f"[{json.dumps(good[0])}, {deep}, {json.dumps(good[1])},\n{deep}, "
                 f"{json.dumps(good[2])}]", encoding="utf-8")
    for chunk in (7, 500, 1 << 20):
        monkeypatch.setattr(jsonstream, "CHUNK", chunk)
        rows = _rows(p)
        assert [(ln, d) for ln, d, _ in rows] == [(1, good[0]), (2, None), (3, good[1]),
                                                (4, None), (5, good[2])], chunk
        assert "array element 2 is nested 3000 levels deep" in rows[1][2]
    one = tmp_path / "one.json"  # a single top-level object, too deep
    one.write_text('{"a": ' * 3000 + "1" + "}" * 3000, encoding="utf-8")
    assert _rows(one) == [(1, None, "invalid JSON: nested 3000 levels deep (more than 100: a "
                                    "broken or hostile row)")]
    lines = tmp_path / "deep.jsonl"  # deep enough to decode, deeper than the bound
    lines.write_text(json.dumps({"instruction": "q", "output": [[[]]] * 2}) + "\n"
                     + '{"instruction": "q", "output": ' + "[" * 150 + "]" * 150 + "}\n",
                     encoding="utf-8")
    rows = _rows(lines)
    assert rows[0][2] is None and "nested 151 levels deep" in rows[1][2]


def test_csv_cell_longer_than_the_limit_says_so(tmp_path: Path, monkeypatch) -> None:
    import csv

    from reprotune.data import readers

    p = tmp_path / "long.csv"
    p.write_text("instruction,output\nq," + "x" * 300 + "\n", encoding="utf-8")
    old = csv.field_size_limit(100)
    try:
        monkeypatch.setattr(readers, "CSV_FIELD_LIMIT", 100)
        with pytest.raises(InputFileError) as exc:
            _rows(p)
    finally:
        csv.field_size_limit(old)
    msg = str(exc.value)
    assert "line 2: a cell starting on or after this line is longer than 100 characters" in msg
    assert "store rows this long as JSONL" in msg and "\n" not in msg
    assert _rows(p)[0][1]["output"] == "x" * 300  # at the real limit it is read


def test_encoding_hints_fit_the_cause(tmp_path: Path) -> None:
    import gzip

    west = tmp_path / "west.jsonl"
    west.write_bytes("".join(json.dumps({"instruction": f"Où est le café n° {i} ?", "output":
                                         "À côté de l'hôtel."}, ensure_ascii=False) + "\n"
                             for i in range(5)).encode("cp1252"))
    gz = tmp_path / "rows.jsonl"
    gz.write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n', mtime=0))
    for path, want, not_want in ((west, "iconv -f WINDOWS-1252 -t UTF-8", "GBK"),
                                 (gz, "gzip-compressed file: unpack it first", "iconv")):
        with pytest.raises(InputFileError) as exc:
            _rows(path)
        assert want in str(exc.value) and not_want not in str(exc.value)


@pytest.mark.skipif(not SHARED_ZH.is_file(), reason="needs ../shared/data")
def test_real_chinese_data_saved_as_gbk_gets_the_gbk_hint(tmp_path: Path) -> None:
    p = tmp_path / "zh.jsonl"
    p.write_bytes(SHARED_ZH.read_text(encoding="utf-8").encode("gb18030"))
    with pytest.raises(InputFileError) as exc:
        _rows(p)
    assert "iconv -f GBK -t UTF-8" in str(exc.value)


def test_lone_carriage_returns(tmp_path: Path) -> None:
    """Inside a line a lone CR is JSON whitespace or a broken string (one row either way);
    an old CR-only file is still one row per CR-ended line."""
    p = tmp_path / "cr.jsonl"
    p.write_bytes(b'{"a": 1,\r"b": 2}\n{"a": "x\ry"}\n{"a": 3}\n')
    rows = _rows(p)
    assert [(ln, d) for ln, d, _ in rows] == [(1, {"a": 1, "b": 2}), (2, None), (3, {"a": 3})]
    mac = tmp_path / "mac.jsonl"
    mac.write_bytes(b'{"a": 1}\r{"a": 2}\r{"a": 3}\r')
    assert [(ln, d) for ln, d, _ in _rows(mac)] == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3})]


def test_a_directory_input_says_so(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    with pytest.raises(InputFileError, match="is a directory, not a file"):
        _rows(tmp_path / "exports")
