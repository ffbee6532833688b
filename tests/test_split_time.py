"""The time-ordered split (split.order_by) and the raw field it needs (ingest.keep_fields)."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.ingest import ingest_rows
from reprotune.data.readers import RawRow, iter_rows
from reprotune.data.split import SplitError, assign_splits, split_rows
from reprotune.data.timeorder import parse_time
from reprotune.params import ParamsError, validate_all

DAY = 86400.0


def _rows(n: int, *, groups: int | None = None, start: float = 1.7e9) -> list[dict]:
    """Row i was written on day i (ISO dates); rows are listed newest first."""
    out = []
    for i in reversed(range(n)):
        day = dt.datetime.fromtimestamp(start + i * DAY, tz=dt.timezone.utc).date().isoformat()
        out.append({"id": f"r{i}", "source": f"t.jsonl:{i + 1}", "label": "ab"[i % 2],
                    "group": f"g{i % groups}" if groups else None,
                    "meta": json.dumps({"created_at": day}),
                    "messages": json.dumps([
                        {"role": "user", "content": f"question {i} on topic {i * 7919 % 1000}"},
                        {"role": "assistant", "content": f"answer {i * 104729 % 99991}"}])})
    return out


def _day(row: dict) -> int:
    return int(row["id"][1:])


@pytest.mark.parametrize(("value", "want"), [
    ("2024-03-01", 1709251200.0),
    ("2024-03-01T12:30:00", 1709296200.0),
    ("2024-03-01T12:30:00Z", 1709296200.0),
    ("2024-03-01T20:30:00+08:00", 1709296200.0),
    ("2024-03-01 12:30:00.5", 1709296200.5),
    (1709296200, 1709296200.0),
    (1709296200.5, 1709296200.5),
    (" 1709296200 ", 1709296200.0),
    ("March 1st", None), ("01/03/2024", None), ("", None), (True, None),
    (float("nan"), None), ("inf", None), ({"t": 1}, None),
])
def test_parse_time_accepts_iso_and_epoch_seconds(value, want) -> None:
    assert parse_time(value) == want


def test_oldest_rows_train_newest_test() -> None:
    rows = _rows(100)
    names = assign_splits(rows, val_ratio=0.1, test_ratio=0.2, stratify=None, group=None, seed=0,
                          order_by="created_at")
    days = {s: sorted(_day(r) for r, n in zip(rows, names, strict=True) if n == s)
            for s in ("train", "val", "test")}
    assert days == {"train": list(range(70)), "val": list(range(70, 80)),
                    "test": list(range(80, 100))}


def test_time_split_does_not_depend_on_row_order_or_seed_without_ties() -> None:
    rows = _rows(200)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)

    def by_id(rs: list[dict], seed: int) -> dict[str, str]:
        names = assign_splits(rs, val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                              seed=seed, order_by="created_at")
        return {r["id"]: n for r, n in zip(rs, names, strict=True)}

    assert by_id(rows, 0) == by_id(shuffled, 0) == by_id(rows, 5)


def test_groups_take_the_time_of_their_newest_row_and_never_straddle() -> None:
    rows = _rows(300, groups=30)  # group g_k holds days k, k+30, ..., k+270
    result = split_rows(rows, val_ratio=0.1, test_ratio=0.1, stratify="label", group="group",
                        seed=0, leakage_threshold=0.99, order_by="created_at", on_leak="report")
    where = {r["group"]: s for s, part in result.parts.items() for r in part}
    assert all(where[r["group"]] == s for s, part in result.parts.items() for r in part)
    # newest rows: days 270..299 of groups g0..g29 -> test g27-g29, val g24-g26
    assert sorted(g for g, s in where.items() if s == "test") == ["g27", "g28", "g29"]
    assert sorted(g for g, s in where.items() if s == "val") == ["g24", "g25", "g26"]
    assert result.metrics["counts"] == {"train": 240, "val": 30, "test": 30}
    # every train row is no newer than the newest row of any val/test group
    newest_held_out = min(max(_day(r) for r in result.parts[s] if r["group"] == g)
                          for g, s in where.items() if s != "train")
    assert max(_day(r) for r in result.parts["train"]) <= newest_held_out
    order = result.metrics["order"]
    assert order["by"] == "created_at" and "newest row" in order["rule"]
    assert order["time_ranges"]["test"][1] > order["time_ranges"]["train"][1]
    assert set(result.metrics["strata"]["test"]) == {"a", "b"}  # reported, not balanced


def test_rows_without_the_field_or_unparsable_name_field_count_and_example() -> None:
    rows = _rows(20)
    rows[3]["meta"] = None
    rows[5]["meta"] = json.dumps({"other": 1})
    rows[7]["meta"] = json.dumps({"created_at": "last tuesday"})
    with pytest.raises(SplitError) as err:
        split_rows(rows, val_ratio=0.1, test_ratio=0.1, stratify=None, group=None, seed=0,
                   leakage_threshold=0.9, order_by="created_at")
    msg = str(err.value)
    assert msg.startswith("split.order_by: 2 of 20 rows have no 'created_at' (e.g. t.jsonl:17)")
    assert "1 rows have a value that is not an ISO 8601 date" in msg
    assert "t.jsonl:13: 'last tuesday'" in msg and "\n" not in msg


def test_order_by_must_be_a_kept_field() -> None:
    with pytest.raises(ParamsError, match=r"^split\.order_by: 'created_at' is not kept by ingest; "
                                          r"add it to ingest.keep_fields"):
        validate_all({"split": {"order_by": "created_at"}})
    validate_all({"split": {"order_by": "created_at"}, "ingest": {"keep_fields": ["created_at"]}})


def test_ingest_keeps_the_raw_field_verbatim_in_meta(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [RawRow("t.jsonl", 1, {"instruction": "q", "output": "a", "created_at": "2024-03-01"}),
            RawRow("t.jsonl", 2, {"instruction": "q2", "output": "a2", "created_at": 1709296200}),
            RawRow("t.jsonl", 3, {"instruction": "q3", "output": "a3", "created_at": None})]
    recs = ingest_rows(rows, keep_fields=["created_at"]).records
    assert [r["meta"] for r in recs] == [{"created_at": "2024-03-01"},
                                         {"created_at": 1709296200}, None]
    assert all(r["meta"] is None for r in ingest_rows(rows).records)
    # a Parquet timestamp column arrives as datetime: kept as ISO text
    stamp = dt.datetime(2024, 3, 1, 12, 30)
    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"], "ts": [stamp]}),
                   tmp_path / "t.parquet")
    rec = ingest_rows(iter_rows(tmp_path / "t.parquet"), keep_fields=["ts"]).records[0]
    assert rec["meta"] == {"ts": "2024-03-01T12:30:00"}


def test_field_survives_read_ingest_dedup_split_format_stages(tmp_path: Path, repo_root: Path,
                                                              tiny_base_dir: Path) -> None:
    """The real stage scripts, with order_by set: the newest rows end up in test."""
    raw = tmp_path / "data" / "raw" / "t.jsonl"
    raw.parent.mkdir(parents=True)
    lines = [{"instruction": f"Question {i}: what is {i * 37 % 101} plus {i * 13 % 97}?",
              "output": f"It is {i * 37 % 101 + i * 13 % 97}, for row {i} of the set.",
              "created_at": f"2024-01-{1 + i % 28:02d}T{i % 24:02d}:00:00Z"} for i in range(60)]
    raw.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (tmp_path / "params.yaml").write_text(
        "ingest:\n  inputs: [data/raw/t.jsonl]\n  keep_fields: [created_at]\n"
        "split:\n  order_by: created_at\n  stratify:\n  val_ratio: 0.1\n  test_ratio: 0.2\n",
        encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo_root / "src")}

    def stage(name: str, *args: str) -> None:
        subprocess.run([sys.executable, str(repo_root / f"stages/{name}.py"), *args], cwd=tmp_path,
                       env=env, check=True, capture_output=True)

    stage("read", "--input", "data/raw/t.jsonl", "--out", "read/data/raw/t.jsonl")
    stage("ingest", "--parts", "read", "--out", "ing.jsonl", "--rejected", "rej.jsonl",
          "--metrics", "m/ingest.json")
    assert io.read_json(tmp_path / "m/ingest.json")["with_meta"] == 60
    stage("dedup", "--data", "ing.jsonl", "--out", "dd.jsonl", "--dropped", "ddd.jsonl",
          "--metrics", "m/dedup.json", "--pairs", "m/pairs.json")
    stage("split", "--data", "dd.jsonl", "--out-dir", "splits", "--metrics", "m/split.json",
          "--leaks", "m/leaks.json")
    stage("format", "--data-dir", "splits", "--base", str(tiny_base_dir), "--out-dir", "out",
          "--dropped", "fd.jsonl", "--metrics", "m/format.json", "--plot", "m/len.png")
    parts = {s: io.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "val", "test")}
    assert {s: [r["id"] for r in rows] for s, rows in parts.items()} == {
        s: [r["id"] for r in io.read_jsonl(tmp_path / "splits" / f"{s}.jsonl")] for s in parts}
    when = {s: sorted(parse_time(json.loads(r["meta"])["created_at"]) for r in rows)
            for s, rows in parts.items()}
    kept = sum(len(v) for v in when.values())
    metrics = io.read_json(tmp_path / "m/split.json")
    assert io.read_json(tmp_path / "m/dedup.json")["kept"] == 60
    assert kept + sum(metrics["leakage"]["dropped"].values()) == metrics["rows"] == 60
    assert io.read_json(tmp_path / "m/format.json")["rows_out"] == kept
    assert when["train"][-1] <= when["val"][0] and when["val"][-1] <= when["test"][0]
    assert metrics["order"]["by"] == "created_at"
