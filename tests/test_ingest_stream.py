"""Streaming read and ingest: bounded memory, exactly the bytes and counts of the in-memory
path, bad rows in a large file rejected by line without losing their neighbours."""

from __future__ import annotations

import codecs
import csv
import io as pyio
import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data import encoding
from reprotune.data.encoding import InputFileError, check_decodes, decode_text
from reprotune.data.inputs import (
    IngestError,
    ingest_files,
    merge_part_files,
    merge_parts,
    part_dir,
    read_part,
    read_to_part,
    write_part,
)
from reprotune.data.readers import _byte_lines, iter_rows

ROOT = Path(__file__).resolve().parents[1]


def _row(i: int, pad: int = 0) -> dict:
    return {"instruction": f"问题 {i}: what is {i} + {i}?" + " x" * pad, "output": f"答 {2 * i}",
            "created_at": f"2024-01-01T00:00:{i % 60:02d}"}


# --------------------------------------------------------------------------- encodings, lines
def test_streaming_encoding_check_equals_whole_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk by chunk (3-byte chunks here, so characters and BOMs straddle chunks), the check
    accepts and refuses exactly what decoding the whole text does, with the same message."""
    monkeypatch.setattr(encoding, "CHUNK", 3)
    rng = random.Random(0)
    refused = 0
    for _ in range(600):
        enc = rng.choice(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                          "utf-32-be", "gbk"])
        text = "".join(rng.choice('{"a": 1}中😀é\n ') for _ in range(rng.randint(0, 30)))
        data = bytearray(text.encode(enc, "replace"))
        if data and rng.random() < 0.5:
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
        try:
            want: tuple = ("ok", decode_text("f.jsonl", data))
        except InputFileError as exc:
            want = ("error", str(exc))
        fh = pyio.BytesIO(data)
        try:
            enc_found, start = check_decodes("f.jsonl", fh)
            got: tuple = ("ok", data[start:].decode(enc_found))
            assert fh.tell() == start
        except InputFileError as exc:
            got = ("error", str(exc))
        assert got == want, data
        refused += want[0] == "error"
    assert 50 < refused < 550  # both outcomes were exercised


def test_byte_lines_cut_at_newlines_only() -> None:
    """Lines end at \\n (a \\r before it dropped); a lone \\r stays inside its line, where
    the reader decides whether it is JSON whitespace, a bad string or an old CR-only file."""
    rng = random.Random(1)
    for _ in range(2000):
        data = bytes(rng.choice(b"ab\r\n ") for _ in range(rng.randint(0, 20)))
        want = [line.removesuffix(b"\r") for line in data.split(b"\n")]
        if data.endswith(b"\n") or not data:
            want.pop()
        assert list(_byte_lines(pyio.BytesIO(data))) == want, data


# --------------------------------------------------------------------------- memory
def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _write_big(path: Path, n: int = 1500, pad: int = 2000) -> int:
    """~6 MB of rows; returns the file size."""
    rows = [_row(i, pad) for i in range(n)]
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-16" if ".utf16" in path.name else "utf-8")
    return path.stat().st_size


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv", "big.utf16.jsonl"])
def test_reading_memory_does_not_grow_with_the_file(tmp_path: Path, name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are parsed and dropped one at a time: the Python heap stays far below the file's
    size (reading the whole file first, as before, needs more than the file). The encoding
    check decodes CHUNK bytes at a time (1 MiB; 64 KiB here, so the bound can be tight)."""
    monkeypatch.setattr(encoding, "CHUNK", 1 << 16)
    size = _write_big(tmp_path / name)
    assert size > 6_000_000
    n = 0

    def consume() -> None:
        nonlocal n
        for row in iter_rows(tmp_path / name):
            assert row.error is None
            n += 1

    peak = _peak_bytes(consume)
    assert n == 1500
    assert peak < size / 8, (peak, size)


def test_parquet_row_group_is_not_read_whole(tmp_path: Path) -> None:
    """A Parquet file of one big row group is decoded page by page: Arrow's memory stays
    far below the column chunk's size (pre-buffering the row group, pyarrow's default,
    holds all of it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(i, 100) for i in range(120_000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="none", row_group_size=10**6)
    size = path.stat().st_size
    assert size > 30_000_000 and pq.ParquetFile(path).metadata.num_row_groups == 1
    peak = n = 0
    for row in iter_rows(path):
        peak = max(peak, pa.total_allocated_bytes())
        assert row.data == rows[n]
        n += 1
    assert n == 120_000 and peak < size / 3, (peak, size)


def test_read_to_part_memory_does_not_grow_with_the_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoding, "CHUNK", 1 << 16)
    size = _write_big(tmp_path / "big.jsonl")
    peak = _peak_bytes(lambda: read_to_part(str(tmp_path / "big.jsonl"), tmp_path / "part"))
    assert io.read_json(tmp_path / "part" / "counts.json")["kept"] == 1500
    assert peak < size / 8, (peak, size)


# --------------------------------------------------------------------------- same bytes
def _inputs(tmp_path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(_row(1)) + "\n{broken\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                      "tool_calls": [{"name": "f", "arguments": "{\"z\": 1, \"a\": 2}"}]},
                      {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok"}],
         "tools": [{"name": "f", "parameters": {"z": {}, "a": {}}}], "label": "t"}) + "\r\n",
        encoding="utf-8")
    b = tmp_path / "b.csv"
    b.write_text("instruction,output,group\n\"多\nline\",答,g1\nq,,\n1,2,3,4\n", encoding="utf-8-sig")
    c = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([_row(i) for i in range(5)] + [{"instruction": "q",
                                                                        "output": None}]), c)
    return [str(a), str(b), str(c)]


def test_streamed_part_and_merge_equal_the_in_memory_bytes(tmp_path: Path) -> None:
    """read_to_part writes exactly what write_part(ingest_files) writes, and the byte-copy
    merge exactly what writing merge_parts' lists writes; the counts are the same."""
    paths = _inputs(tmp_path)
    for p in paths:
        read_to_part(p, part_dir(tmp_path / "stream", p), keep_fields=["created_at"])
        write_part(part_dir(tmp_path / "memory", p), ingest_files([p], keep_fields=["created_at"]))
        for f in ("records.jsonl", "rejected.jsonl", "counts.json"):
            got = (part_dir(tmp_path / "stream", p) / f).read_bytes()
            assert got == (part_dir(tmp_path / "memory", p) / f).read_bytes(), (p, f)
    counts = merge_part_files(tmp_path / "stream", paths, tmp_path / "out.jsonl",
                              tmp_path / "rej.jsonl")
    merged = merge_parts([read_part(part_dir(tmp_path / "memory", p), p) for p in paths])
    io.write_jsonl(tmp_path / "want_out.jsonl", merged.records)
    io.write_jsonl(tmp_path / "want_rej.jsonl", merged.rejects)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "want_out.jsonl").read_bytes()
    assert (tmp_path / "rej.jsonl").read_bytes() == (tmp_path / "want_rej.jsonl").read_bytes()
    assert counts.as_dict() == merged.counts == json.loads(json.dumps(
        ingest_files(paths, keep_fields=["created_at"]).counts))
    assert counts.as_dict()["kept"] == 9 and counts.as_dict()["rejected_total"] == 3


def test_merge_refuses_a_part_that_disagrees_with_its_counts(tmp_path: Path) -> None:
    paths = _inputs(tmp_path)[:1]
    part = part_dir(tmp_path / "parts", paths[0])
    read_to_part(paths[0], part)
    with (part / "records.jsonl").open("ab") as fh:
        fh.write(b'{"id": "extra"}\n')
    with pytest.raises(IngestError, match="holds 3 records and 1 rejects but its counts.json "
                                          "says 2 and 1"):
        merge_part_files(tmp_path / "parts", paths, tmp_path / "o.jsonl", tmp_path / "r.jsonl")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "r.jsonl").exists()


def test_file_error_mid_stream_keeps_the_previous_part(tmp_path: Path) -> None:
    """An unclosed CSV quote far into the file raises; the part folder is not replaced."""
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\nq,a\n", encoding="utf-8")
    read_to_part(str(p), tmp_path / "part")
    before = (tmp_path / "part" / "records.jsonl").read_bytes()
    p.write_text("instruction,output\n" + "q,a\n" * 3000 + '"open,a\nq,a\n', encoding="utf-8")
    with pytest.raises(InputFileError, match="line 3002: unexpected end of data"):
        read_to_part(str(p), tmp_path / "part")
    assert (tmp_path / "part" / "records.jsonl").read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.csv", "part"]  # no temporaries


# --------------------------------------------------------------------------- a large file
def test_bad_rows_in_a_large_file_are_rejected_by_line(tmp_path: Path) -> None:
    """4000 rows with bad lines in the middle, through the read and ingest stages: each bad
    line is one reject with its line number, its neighbours are kept, counts add up."""
    (tmp_path / "data/raw").mkdir(parents=True)
    lines = [json.dumps(_row(i), ensure_ascii=False).encode() for i in range(4000)]
    bad = {1500: b'{"instruction": "q", "output": ', 1501: b'[1, 2, 3]',
           2200: b'{"instruction": "\xff\xfe", "output": "a"}', 3000: b'{"instruction": "q"}',
           3999: b'{"output": NaN, "instruction": "q"}'}
    for i, text in bad.items():
        lines[i] = text
    (tmp_path / "data/raw/big.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "params.yaml").write_text("ingest:\n  inputs: [data/raw/big.jsonl]\n",
                                          encoding="utf-8")
    for cmd in (["read.py", "--input", "data/raw/big.jsonl", "--out",
                 "data/interim/read/data/raw/big.jsonl"], ["ingest.py"]):
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / cmd[0]), *cmd[1:]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    recs = io.read_jsonl(tmp_path / "data/interim/ingested.jsonl")
    rej = io.read_jsonl(tmp_path / "data/interim/rejected.jsonl")
    m = io.read_json(tmp_path / "metrics/ingest.json")
    assert [(r["line"], r["reason"]) for r in rej] == [
        (1501, "parse_error"), (1502, "parse_error"), (2201, "parse_error"),
        (3001, "missing_field"), (4000, "non_finite_number")]
    assert "invalid UTF-8" in rej[2]["detail"] and rej[0]["raw"] == bad[1500].decode()
    assert (m["rows_in"], m["kept"], m["rejected_total"]) == (4000, 3995, 5)
    assert m["rows_in"] == m["kept"] + sum(m["rejected"].values())
    by_line = {int(r["source"].rsplit(":", 1)[1]): r for r in recs}
    assert len(by_line) == 3995 and [r["source"] for r in recs] == sorted(
        (r["source"] for r in recs), key=lambda s: int(s.rsplit(":", 1)[1]))
    for i in (1499, 1502, 2199, 2201, 2999, 3001, 3998):  # the neighbours, text exact
        assert by_line[i + 1]["messages"][0]["content"] == _row(i)["instruction"]
        assert by_line[i + 1]["messages"][1]["content"] == _row(i)["output"]


def test_utf16_bom_stream_equals_decoding_whole(tmp_path: Path) -> None:
    """A UTF-16 JSONL file read as a stream gives the rows of its decoded text."""
    text = "\n".join(json.dumps(_row(i), ensure_ascii=False) for i in range(50)) + "\r\n\n"
    p = tmp_path / "u.jsonl"
    p.write_bytes(codecs.BOM_UTF16_BE + text.encode("utf-16-be"))
    rows = list(iter_rows(p))
    assert [r.line for r in rows] == list(range(1, 51))
    assert [r.data for r in rows] == [json.loads(line) for line in text.split("\n") if line.strip()]


def test_json_problem_fast_check_agrees_with_the_walk() -> None:
    """The pre-check of json_problem never hides a problem the full walk finds."""
    from reprotune.data.jsonvalues import JSON_DECODER, _problem, json_problem

    rng = random.Random(2)
    parts = ['"a"', '"b"', '"\\ud800"', '"x\\udc00y"', '"ok"', "1", "null", "NaN", '"中"']

    def value(depth: int) -> str:
        kind = rng.random()
        if depth > 2 or kind < 0.4:
            return rng.choice(parts)
        if kind < 0.7:
            return "[" + ", ".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        keys = [rng.choice(['"a"', '"b"', '"c"', '"\\udfff"']) for _ in range(rng.randint(0, 3))]
        return "{" + ", ".join(f"{k}: {value(depth + 1)}" for k in keys) + "}"

    found = 0
    for _ in range(3000):
        obj = JSON_DECODER.decode(value(0))
        assert json_problem(obj) == _problem(obj, "")
        found += json_problem(obj) is not None
    assert 300 < found < 2700
    assert json_problem({1: "a", "b": ["\ud800"]}) == _problem({1: "a", "b": ["\ud800"]}, "")
