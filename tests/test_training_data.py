"""The train stage's data path: checked, memory-mapped Arrow splits, lazy packs, collators."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reprotune.train import data
from reprotune.train.data import (
    ArrowSplit,
    PaddingCollator,
    check_rows,
    load_split,
    progress,
    split_size,
)
from reprotune.train.methods import TrainSetupError
from reprotune.train.packing import (
    PackedRows,
    PackingCollator,
    pack_rows,
    pack_stats,
    packed_dataset,
)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(0, 100) for _ in range(rng.randrange(1, 30))]
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]})
    return out


def write(path, rs, row_group_size: int | None = None, schema=SCHEMA):
    pq.write_table(pa.Table.from_pylist(rs, schema=schema), path, row_group_size=row_group_size)
    return path


def test_split_loads_memory_mapped_with_the_same_rows(tmp_path):
    rs = rows(500)
    path = write(tmp_path / "train.parquet", rs, row_group_size=128)
    before = pa.total_allocated_bytes()
    split = load_split(path, tmp_path, vocab_size=100, max_positions=64)
    # the rows live in the mapped file, not in Arrow's memory pool
    assert pa.total_allocated_bytes() - before < 10_000
    assert len(split) == 500 and split.table.num_rows == 500
    assert split.lengths.tolist() == [len(r["input_ids"]) for r in rs]
    for i in (0, 127, 128, 499):
        got = split[i]
        assert isinstance(got["input_ids"], np.ndarray) and not got["input_ids"].flags.writeable
        assert got["input_ids"].tolist() == rs[i]["input_ids"]
        assert got["labels"].tolist() == rs[i]["labels"]
    assert [r["labels"].tolist() for r in split] == [r["labels"] for r in rs]
    with pytest.raises(IndexError):
        split[500]
    assert split_size(path) == 500


def test_a_bad_row_is_named_by_its_row_in_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_ROWS", 64)  # the bad row sits in the fourth batch
    rs = rows(300)
    rs[200] = {"input_ids": [3, 150, 4], "labels": [3, 150, 4]}
    rs[250] = {"input_ids": [1, 2], "labels": [1]}
    path = write(tmp_path / "train.parquet", rs, row_group_size=100)
    with pytest.raises(TrainSetupError, match=r"train.parquet: row 201: token id 150 outside the "
                                              r"model's vocab of 100"):
        load_split(path, tmp_path, vocab_size=100, max_positions=64)


def test_the_first_failing_row_wins_and_keeps_its_row_by_row_message():
    good = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    # row 3 fails two checks (empty labels-wise, too long): the length check comes first
    batch = [good, good, {"input_ids": [1] * 20, "labels": [1] * 19},
             {"input_ids": [1, 2], "labels": [-100, -100]}]
    with pytest.raises(TrainSetupError, match=r"^t: row 3: input_ids \(20\) and labels \(19\)"):
        check_rows(batch, "t", vocab_size=9, max_positions=10)
    with pytest.raises(TrainSetupError, match=r"^t: row 12: no label tokens"):
        check_rows(batch[3:], "t", vocab_size=9, max_positions=10, first_row=12)
    with pytest.raises(TrainSetupError, match=r"^t: row 2: token id -1 outside"):
        check_rows([good, {"input_ids": [-1, 2], "labels": [-1, 2]}], "t", vocab_size=9,
                   max_positions=10)
    with pytest.raises(TrainSetupError, match=r"^t: row 1: input_ids \(0\) and labels \(0\)"):
        check_rows([{"input_ids": [], "labels": []}], "t", vocab_size=9, max_positions=10)
    with pytest.raises(TrainSetupError, match=r"^t: row 2: 20 tokens exceed the model's 10"):
        check_rows([good, {"input_ids": [1] * 20, "labels": [1] * 20}], "t", vocab_size=9,
                   max_positions=10)
    check_rows([good] * 3, "t", vocab_size=9, max_positions=10)
    check_rows([], "t", vocab_size=9, max_positions=10)


def test_wrong_column_types_and_nulls_name_the_file(tmp_path):
    floats = pa.schema([("input_ids", pa.list_(pa.float32())), ("labels", pa.list_(pa.int32()))])
    path = write(tmp_path / "f.parquet", [{"input_ids": [1.0], "labels": [1]}], schema=floats)
    with pytest.raises(TrainSetupError, match=r"f.parquet: input_ids is list<element: float>, "
                                              r"not lists of integer token ids"):
        load_split(path, tmp_path, vocab_size=9, max_positions=9)
    path = write(tmp_path / "n.parquet", [{"input_ids": [1], "labels": [1]},
                                          {"input_ids": None, "labels": [1]}])
    with pytest.raises(TrainSetupError, match=r"n.parquet: input_ids has null entries"):
        load_split(path, tmp_path, vocab_size=9, max_positions=9)
    pq.write_table(pa.table({"input_ids": [[1]]}), tmp_path / "m.parquet")
    with pytest.raises(TrainSetupError, match=r"m.parquet: missing column\(s\) \['labels'\]"):
        split_size(tmp_path / "m.parquet")


def test_progress_bar_only_for_big_splits(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress(data.PROGRESS_MIN_ROWS - 1, "x").disable
    assert not progress(data.PROGRESS_MIN_ROWS, "x").disable
    path = write(tmp_path / "train.parquet", rows(50))
    load_split(path, tmp_path, vocab_size=100, max_positions=64)
    assert "load train.parquet" not in capsys.readouterr().err
    monkeypatch.setattr(data, "PROGRESS_MIN_ROWS", 10)
    load_split(path, tmp_path, vocab_size=100, max_positions=64)
    assert "load train.parquet: 100%" in capsys.readouterr().err


def test_collators_give_the_same_tensors_from_arrow_as_from_lists(tmp_path):
    rs = rows(40, seed=3)
    split = load_split(write(tmp_path / "t.parquet", rs), tmp_path, vocab_size=100,
                       max_positions=64)
    pad = PaddingCollator(7, pad_to_multiple_of=8)
    a, b = pad(rs[:16]), pad([split[i] for i in range(16)])
    assert a.keys() == b.keys() and all(a[k].tolist() == b[k].tolist() for k in a)
    assert a["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == pad(
        rs[:1])["input_ids"].dtype
    lists, arrow = packed_dataset(rs, 64, 0), packed_dataset(split, 64, 0)
    assert isinstance(arrow, PackedRows) and len(lists) == len(arrow) > 5
    for k in range(len(arrow)):
        x, y = PackingCollator()([lists[k]]), PackingCollator()([arrow[k]])
        assert all(x[key].tolist() == y[key].tolist() if hasattr(x[key], "tolist")
                   else x[key] == y[key] for key in x)


def test_packs_hold_row_indices_in_the_packing_order():
    rs = rows(60, seed=1)
    lengths = [len(r["input_ids"]) for r in rs]
    packs = pack_rows(lengths, 50, seed=5)
    items = packed_dataset(rs, 50, 5)
    # the samples are the split's own rows (read when asked for), in the packs' order
    assert [[id(s) for s in it["samples"]] for it in items] == [[id(rs[i]) for i in p]
                                                                  for p in packs]
    sizes = [sum(lengths[i] for i in p) for p in packs]
    assert items.pack_tokens.tolist() == sizes
    assert pack_stats(items, 50) == {"packs": len(packs), "tokens_per_batch": 50,
                                     "mean_pack_tokens": round(sum(sizes) / len(sizes), 1),
                                     "budget_fill": round(sum(sizes) / (len(sizes) * 50), 4)}
    with pytest.raises(IndexError):
        items[len(packs)]


def test_arrow_split_over_several_chunks(tmp_path):
    t1 = pa.Table.from_pylist(rows(5, 1), schema=SCHEMA)
    t2 = pa.Table.from_pylist(rows(7, 2), schema=SCHEMA)
    split = ArrowSplit(pa.concat_tables([t1, t2]))
    assert len(split) == 12 and split.table.column("input_ids").num_chunks == 2
    assert [split[i]["input_ids"].tolist() for i in range(12)] == (
        t1.column("input_ids").to_pylist() + t2.column("input_ids").to_pylist())


def test_scratch_folder_is_removed_and_killed_runs_leftovers_too(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"{data.SCRATCH_PREFIX}{gone.stdout.strip()}-abc"
    live = tmp_path / f"{data.SCRATCH_PREFIX}{os.getppid()}-def"  # pytest's parent: alive
    for d in (stale, live):
        d.mkdir()
        (d / "train-x.arrow").write_bytes(b"x")
    with data.scratch_dir() as scratch:
        assert scratch.name.startswith(f"{data.SCRATCH_PREFIX}{os.getpid()}-")
        load_split(write(tmp_path / "t.parquet", rows(10)), scratch, vocab_size=100,
                   max_positions=64)
        assert len(list(scratch.glob("t-*.arrow"))) == 1
    assert not scratch.exists() and not stale.exists() and (live / "train-x.arrow").exists()
