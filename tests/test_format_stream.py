"""The format stage on `datasets`: same rows as in memory, any num_proc, bounded row groups,
its Arrow cache in a temporary folder that goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data import format_stream
from reprotune.data.formatting import DROP_TRUNCATED, FormatError, format_records
from reprotune.params import DataParams, ParamsError, build


def _rec(i: int, user: str, answer: str, **extra) -> dict:
    return {"id": f"r{i}", "source": f"t.jsonl:{i}",
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}],
            "tools": None, "label": extra.get("label"), "group": extra.get("group"),
            "meta": extra.get("meta")}


def _records() -> list[dict]:
    """40 rows: varied lengths, labels, meta; one with forged markup, one whose prompt is too
    long for the limit used below (truncation drop), a few truncated with labels left."""
    recs = [_rec(i, f"question {i}: " + "word " * (i % 7), "answer " * (1 + i % 5),
                 label=i % 3 if i % 2 else None, group=f"g{i % 4}",
                 meta={"created_at": f"2024-01-{1 + i % 28:02d}", "k": [i, "z"]})
            for i in range(36)]
    recs.append(_rec(36, "fake", "a <|im_end|> b"))                      # special_token
    recs.append(_rec(37, "long " * 120, "ok"))                           # no label left
    recs.append(_rec(38, "Count", "one two three " * 40))                # truncated, kept
    recs.append(_rec(39, "计算 12 加 7 🙂", "19"))
    return recs


MAX_LENGTH = 64


def _format(data: Path, tok, *, out: Path, **kw) -> format_stream.Plan:
    """One file formatted as the train split (what format_splits does to each split)."""
    return format_stream.format_splits({"train": data}, tok, outs={"train": out}, **kw)["train"]


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    return load_tokenizer(tiny_base_dir)


def _stage(tmp: Path, data: Path, base: Path, num_proc: object, *,
           env: dict | None = None) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(f"data:\n  num_proc: {num_proc}\nformat:\n"
                                     f"  max_length: {MAX_LENGTH}\n", encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(root / "stages/format.py"), "--data-dir", str(data), "--base",
         str(base), "--out-dir", "p", "--dropped", "i/dropped.jsonl",
         "--metrics", "m/format.json", "--plot", "m/len.png"],
        cwd=tmp, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(root / "src"), **(env or {})})


def test_stage_output_is_byte_identical_for_any_num_proc_and_equals_in_memory(
        tmp_path, tiny_base_dir, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "splits"
    recs = _records()
    io.write_jsonl(data / "train.jsonl", recs[:30])
    with (data / "train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("\n   \n")  # blank lines are skipped, as io.read_jsonl does
    io.write_jsonl(data / "val.jsonl", recs[30:34])
    io.write_jsonl(data / "test.jsonl", recs[34:])
    files = ("p/train.parquet", "p/val.parquet", "p/test.parquet", "i/dropped.jsonl",
             "m/format.json", "m/len.png")
    outs = {}
    for n in (1, 2, 3, "auto"):
        res = _stage(tmp_path / f"np{n}", data, tiny_base_dir, n,
                     env={"HF_HOME": str(tmp_path / "hf")})
        assert res.returncode == 0, res.stderr
        outs[n] = {f: (tmp_path / f"np{n}" / f).read_bytes() for f in files}
        # the Arrow cache is gone, and nothing went to the user's HF cache
        assert sorted(p.name for p in (tmp_path / f"np{n}" / "p").iterdir()) == \
            ["test.parquet", "train.parquet", "val.parquet"]
        assert not (tmp_path / "hf").exists()
    for n in (2, 3, "auto"):
        assert outs[n] == outs[1], n
    # the stage's rows, drops and counts are exactly the in-memory formatter's, split by split
    rows, stats, dropped = format_records(recs, tok, max_length=MAX_LENGTH, enable_thinking=False,
                                          model_limit=512)
    table = pa.concat_tables(pq.read_table(tmp_path / "np1" / f"p/{s}.parquet")
                             for s in ("train", "val", "test"))
    assert table.to_pylist() == rows
    assert [pq.read_metadata(tmp_path / "np1" / f"p/{s}.parquet").num_rows
            for s in ("train", "val", "test")] == [30, 4, 4]  # r36 and r37 (test) dropped
    assert io.read_jsonl(tmp_path / "np1" / "i/dropped.jsonl") == [
        {**d, "split": "test"} for d in dropped]
    metrics = json.loads(outs[1]["m/format.json"])
    stats.pop("lengths")
    per_split = metrics.pop("splits")
    assert metrics.pop("max_length_from") == "train"
    # token_length is over every rendered row, as in memory; the rest are sums
    assert {k: v for k, v in metrics.items() if k != "chat_template_sha256"} == stats
    assert {s: (v["rows_in"], v["rows_out"]) for s, v in per_split.items()} == {
        "train": (30, 30), "val": (4, 4), "test": (6, 4)}
    assert sum(v["label_tokens"] for v in per_split.values()) == stats["label_tokens"]
    # and they are what the input holds: 40 in = 38 out + 1 special_token + 1 no-label drop
    assert (metrics["rows_in"], metrics["rows_out"], metrics["rows_dropped"]) == (40, 38, 2)
    assert {k: v for k, v in metrics["dropped"].items() if v} == {"special_token": 1,
                                                                  DROP_TRUNCATED: 1}
    assert [(d["id"], d["reason"]) for d in dropped] == [("r36", "special_token"),
                                                         ("r37", DROP_TRUNCATED)]
    assert metrics["truncated"] >= 2 and metrics["max_length"] == MAX_LENGTH
    by_id = {r["id"]: r for r in rows}
    assert by_id["r38"]["truncated"] and by_id["r38"]["n_tokens"] == MAX_LENGTH
    assert by_id["r1"]["label"] == "1" and json.loads(by_id["r1"]["meta"]) == recs[1]["meta"]
    assert json.loads(by_id["r39"]["messages"]) == recs[39]["messages"]


def test_row_groups_are_bounded_and_hold_the_same_rows(tmp_path, tok, monkeypatch):
    import pyarrow.parquet as pq

    data = tmp_path / "in.jsonl"
    recs = _records()
    io.write_jsonl(data, recs)
    kw = dict(max_length=MAX_LENGTH, enable_thinking=False, model_limit=512, warn_truncated=0.05,
              num_proc=1, progress=False)
    one = _format(data, tok, out=tmp_path / "a.parquet", dropped=tmp_path / "a.jsonl", **kw)
    monkeypatch.setattr(format_stream, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(format_stream, "MAP_BATCH", 5)
    seven = _format(data, tok, out=tmp_path / "b.parquet", dropped=tmp_path / "b.jsonl", **kw)
    a, b = pq.ParquetFile(tmp_path / "a.parquet"), pq.ParquetFile(tmp_path / "b.parquet")
    assert a.metadata.num_row_groups == 1
    assert [b.metadata.row_group(i).num_rows for i in range(b.metadata.num_row_groups)] == \
        [7, 7, 7, 7, 7, 3]
    assert b.read().equals(a.read()) and b.metadata.num_rows == one.stats["rows_out"] == 38
    assert seven.stats == one.stats
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # the byte bound ends a group after the batch (one map batch) that reaches it
    monkeypatch.setattr(format_stream, "ROW_GROUP_BYTES", 1)
    _format(data, tok, out=tmp_path / "c.parquet", dropped=tmp_path / "c.jsonl", **kw)
    c = pq.ParquetFile(tmp_path / "c.parquet")
    assert [c.metadata.row_group(i).num_rows for i in range(c.metadata.num_row_groups)] == \
        [5] * 7 + [3]  # the last batch (r35..r39) loses r36 and r37
    assert c.read().equals(a.read())


def test_failures_name_the_line_or_param_and_leave_no_cache(tmp_path, tok):
    import pyarrow.parquet as pq

    data = tmp_path / "in.jsonl"
    io.write_jsonl(data, _records()[:3])
    with data.open("a", encoding="utf-8") as fh:
        fh.write('{"id": "broken", \n')
    kw = dict(enable_thinking=False, model_limit=512, warn_truncated=0.05, num_proc=2,
              progress=False, out=tmp_path / "o" / "f.parquet", dropped=tmp_path / "d.jsonl")
    with pytest.raises(Exception, match=r"in.jsonl:4: invalid JSON"):
        _format(data, tok, max_length=MAX_LENGTH, **kw)
    io.write_jsonl(data, _records()[:3])
    with pytest.raises(FormatError, match=r"^train split: format.max_length: 8 leaves no "
                                          r"assistant token"):
        _format(data, tok, max_length=8, **kw)
    assert list((tmp_path / "o").iterdir()) == []  # no output, no Arrow cache left
    assert not (tmp_path / "d.jsonl").exists()
    data.write_text("\n \n", encoding="utf-8")  # no train rows: an error, nothing written
    with pytest.raises(FormatError, match=r"in.jsonl: no train rows left after formatting"):
        _format(data, tok, max_length="auto", **kw)
    assert list((tmp_path / "o").iterdir()) == [] and not (tmp_path / "d.jsonl").exists()
    # an empty held-out split (val_ratio: 0) is fine: an empty table with the schema
    io.write_jsonl(data, _records()[:3])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    plans = format_stream.format_splits({"train": data, "val": empty}, tok, max_length="auto",
                                        outs={"train": tmp_path / "o" / "t.parquet",
                                              "val": tmp_path / "o" / "v.parquet"}, **{
                                            k: v for k, v in kw.items() if k != "out"})
    assert plans["val"].stats["rows_in"] == 0 and plans["train"].stats["rows_out"] == 3
    assert pq.read_table(tmp_path / "o" / "v.parquet").num_rows == 0
    # auto comes from train: a test split of far longer prompts fails naming both
    long = tmp_path / "long.jsonl"
    io.write_jsonl(long, [_rec(50 + i, "long " * 200, "ok") for i in range(3)])
    with pytest.raises(FormatError, match=r"^test split: format.max_length: \d+ leaves no "
                                          r"assistant token in 3 of 3 rows .*\(auto is the p99 "
                                          r"of the train split's lengths"):
        format_stream.format_splits({"train": data, "test": long}, tok, max_length="auto",
                                    outs={"train": tmp_path / "o2" / "t.parquet",
                                          "test": tmp_path / "o2" / "s.parquet"}, **{
                                        k: v for k, v in kw.items() if k != "out"})
    assert not (tmp_path / "o2" / "t.parquet").exists()


def test_num_proc_param():
    import os

    assert build(DataParams, {}, "data").num_proc == "auto"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from reprotune.runtime import data_processes

    assert data_processes(build(DataParams, {"num_proc": "auto"}, "data")) == cores >= 1
    assert data_processes(build(DataParams, {"num_proc": 3}, "data")) == 3
    for bad, msg in ((0, r"data.num_proc: 0 must be >= 1"), ("many", r"data.num_proc: 'many'"),
                     (1.5, r"data.num_proc: 1.5"), (True, r"data.num_proc")):
        with pytest.raises(ParamsError, match=msg):
            build(DataParams, {"num_proc": bad}, "data")
