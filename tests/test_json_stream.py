""".json files read as a stream (reprotune.data.jsonstream): the same rows, line numbers and
error text as the whole document parsed in memory, at any chunk size, with the window
never holding the whole file."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from reprotune.data import jsonstream
from reprotune.data.encoding import InputFileError
from reprotune.data.readers import iter_rows

BIG = "长" * 5000  # an element several small chunks long (15 000 bytes of UTF-8)


def _row(i: int) -> dict:
    return {"instruction": f"问题 {i}：一加一等于几？ q{i}", "output": BIG if i == 777 else f"答案 {i} 😀"}


def _rows(path: Path) -> list[tuple[int, dict | None, str | None, str | None]]:
    return [(r.line, r.data, r.error, r.raw) for r in iter_rows(path)]


def _broken(path: Path) -> str:
    with pytest.raises(InputFileError) as exc:
        list(iter_rows(path))
    return str(exc.value)


@pytest.fixture(params=[1, 7, 1 << 20], ids=["chunk1", "chunk7", "chunk1MiB"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(jsonstream, "CHUNK", request.param)
    return request.param


def test_large_array_in_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 000 pretty-printed CJK elements read with 1000-byte chunks: every element, in
    order, lines = index + 1, and the window never holds more than a few chunks plus the
    one 15 kB element (the file is 2.1 MB)."""
    monkeypatch.setattr(jsonstream, "CHUNK", 1000)
    want = [_row(i) for i in range(20_000)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(want, ensure_ascii=False, indent=2), encoding="utf-8")
    assert p.stat().st_size > 2_000_000
    rows = _rows(p)
    assert len(rows) == 20_000
    assert [r[0] for r in rows] == list(range(1, 20_001))
    assert [r[1] for r in rows] == want and all(r[2] is None for r in rows)

    widest = 0
    with p.open("rb") as fh:
        win = jsonstream.TextWindow(fh, "utf-8")
        kind, pos = jsonstream.classify(win)
        assert kind == "array"
        for n, item in enumerate(jsonstream.iter_array(str(p), win, pos, 500), 1):
            widest = max(widest, len(win.buf))
            assert item.line == n and item.error is None
    assert n == 20_000
    assert 5000 < widest < 5000 + 8 * 1000  # the big element + a few chunks, not the file


def test_broken_array_in_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing comma at element 12 346 of 20 000: the same one-line error as before, with
    the file line and column json itself reports for the spot, whatever the chunk size."""
    items = [json.dumps(_row(i), ensure_ascii=False, indent=1) for i in range(20_000)]
    text = "[\n" + ",\n".join(items[:12_345]) + "\n" + ",\n".join(items[12_345:]) + "\n]\n"
    p = tmp_path / "broken.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    start = text.count("\n", 0, text.index('"问题 12344：'))  # the line of element 12345's "{"
    want = (f"{p}: line {ref.value.lineno} column {ref.value.colno}: expected ',' or ']' after "
            f"an element (in array element 12345, which starts on line {start}); the array "
            f"is broken before its end, so the rows after it cannot be read or counted. Fix "
            f"the file (`python -m json.tool {p}` points at the spot)")
    assert (ref.value.lineno, ref.value.colno) == (start + 4, 1)
    for size in (997, 1 << 20):
        monkeypatch.setattr(jsonstream, "CHUNK", size)
        assert _broken(p) == want


def test_column_on_one_long_line(tmp_path: Path, chunk: int) -> None:
    """A minified (one-line) array broken inside element 3000: the column counts across
    every chunk the window dropped."""
    items = [json.dumps(_row(i), ensure_ascii=False) for i in range(3000)]
    items[2999] = items[2999].replace('", "output"', '" "output"')
    text = "[" + ", ".join(items) + "]"
    p = tmp_path / "line.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    assert ref.value.lineno == 1 and ref.value.colno > 100_000
    assert _broken(p).startswith(
        f"{p}: line 1 column {ref.value.colno}: Expecting ',' delimiter (in array element "
        f"3000, which starts on line 1); the array is broken before its end")


def test_truncated_inside_and_after_an_element(tmp_path: Path, chunk: int) -> None:
    text = json.dumps([_row(i) for i in range(6)], ensure_ascii=False, indent=1)
    inside = tmp_path / "inside.json"
    inside.write_text(text[:text.index("答案 5") + 2], encoding="utf-8")
    rows = _rows(inside)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6] and [r[1] for r in rows[:5]] == [
        _row(i) for i in range(5)]
    tail = text[text.rindex("{"):text.index("答案 5") + 2]
    assert rows[5][1:] == (None, (
        "the file ends inside array element 6 (file line 22): truncated (Unterminated string "
        "starting at); 5 complete elements before it were read, the last 3 lines "
        f"({len(tail)} characters) were not"), tail)
    after = tmp_path / "after.json"
    after.write_text(text[:text.rindex("}") + 1] + "\n\n", encoding="utf-8")
    rows = _rows(after)
    assert len(rows) == 7 and rows[5][:3] == (6, _row(5), None)
    assert rows[6] == (7, None, "the file ends after array element 6 without the closing ']': "
                                "truncated; any later elements are missing", "")


def test_trailing_text_after_the_array(tmp_path: Path, chunk: int) -> None:
    p = tmp_path / "tail.json"
    p.write_text(json.dumps([_row(1), _row(2)]) + "\n" * 3 + " " * 3000 + "<html>oops</html>",
                 encoding="utf-8")
    rows = _rows(p)
    assert [r[:2] for r in rows[:2]] == [(1, _row(1)), (2, _row(2))]
    assert rows[2] == (3, None, "unexpected text after the closing ']' at file line 4",
                       "<html>oops</html>")


def test_one_object_and_json_lines(tmp_path: Path, chunk: int) -> None:
    one = tmp_path / "one.json"
    one.write_text("\n  " + json.dumps(_row(777), ensure_ascii=False, indent=2) + "\n\n",
                   encoding="utf-8")
    assert _rows(one) == [(1, _row(777), None, None)]
    number = tmp_path / "number.json"
    number.write_text("12345678901234567890 \n", encoding="utf-8")  # not cut into 1234...
    assert _rows(number) == [(1, None, "expected a JSON object, got number", "12345678901234567890")]
    lines = "\n".join(json.dumps(_row(i), ensure_ascii=False) for i in (1, 777, 3))
    for enc, bom in (("utf-8", b""), ("utf-16-le", codecs.BOM_UTF16_LE)):
        p = tmp_path / f"lines-{enc}.json"
        p.write_bytes(bom + (lines + '\n{"instruction": "x"\n\n').encode(enc))
        rows = _rows(p)
        assert [r[:2] for r in rows[:3]] == [(1, _row(1)), (2, _row(777)), (3, _row(3))]
        assert rows[3][0] == 4 and rows[3][2].startswith("invalid JSON: Expecting ',' delimiter")


@pytest.mark.parametrize("enc, bom", [("utf-8", b""), ("utf-8", codecs.BOM_UTF8),
                                      ("utf-16-le", codecs.BOM_UTF16_LE),
                                      ("utf-16-be", b""), ("utf-32-le", codecs.BOM_UTF32_LE)])
def test_bom_and_whitespace_variations(tmp_path: Path, chunk: int, enc: str, bom: bytes) -> None:
    want = [_row(i) for i in range(5)]
    text = "\r\n\t [ \r\n" + " ,\r\n".join(json.dumps(r, ensure_ascii=False) for r in want) + "\r\n]\t\r\n"
    p = tmp_path / "ws.json"
    p.write_bytes(bom + text.encode(enc))
    assert _rows(p) == [(i + 1, r, None, None) for i, r in enumerate(want)]
    empty = tmp_path / "empty.json"
    empty.write_bytes(bom + " \r\n [ \n ] trailing text is not read".encode(enc))
    assert _rows(empty) == []
    blank = tmp_path / "blank.json"
    blank.write_bytes(bom + " \n\r\n\t".encode(enc))
    assert _rows(blank) == []


def test_cut_literals_and_escapes_are_not_misread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    """Values a chunk end could cut into a shorter valid or invalid token (-Infinity,
    \\uXXXX escapes and surrogate pairs, long numbers): same rows at every chunk size."""
    p = tmp_path / "tokens.json"
    p.write_text('[{"a": -Infinity}, {"a": "\\ud83d\\ude00\\u4e2d"}, 12345678901234567890, '
                 '{"a": 1.5e-300}, {"a": [true, false, null, NaN]}]', encoding="utf-8")
    monkeypatch.setattr(jsonstream, "CHUNK", 1 << 20)
    want = _rows(p)
    assert [r[0] for r in want] == [1, 2, 3, 4, 5] and want[1][1] == {"a": "😀中"}
    assert want[2][2] == "expected a JSON object, got number"
    for size in range(1, 12):
        monkeypatch.setattr(jsonstream, "CHUNK", size)
        assert _rows(p) == want, size


def test_error_then_only_whitespace_is_a_truncation(tmp_path: Path, chunk: int) -> None:
    """An error followed by nothing but whitespace (here more than a chunk of it) ends the
    file, as before: a truncated tail row, not a broken array."""
    ctrl = tmp_path / "ctrl.json"
    ctrl.write_text('[{"a": 1}, {"a": "abc' + "\n" * 3000, encoding="utf-8")
    rows = _rows(ctrl)
    assert rows[0] == (1, {"a": 1}, None, None)
    assert rows[1][:3] == (2, None, (
        "the file ends inside array element 2 (file line 1): truncated (Invalid control "
        "character at); 1 complete elements before it were read, the last 3001 lines (3010 "
        "characters) were not"))
    assert rows[1][3] == '{"a": "abc' + "\n" * 490 and len(rows) == 2
    ideographic = tmp_path / "space.json"  # U+3000 is whitespace to str.strip, not to JSON
    ideographic.write_text('[{"a": 1} \u3000' + " \n" * 3000, encoding="utf-8")
    assert [r[:3] for r in _rows(ideographic)] == [(1, None, (
        "the file ends inside array element 1 (file line 1): truncated (expected ',' or ']' "
        "after an element); 0 complete elements before it were read, the last 3001 lines "
        "(6010 characters) were not"))]
