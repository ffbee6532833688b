import json
import random

import pytest

from reprotune.data.split import SplitError, assign_splits, split_rows


def _rows(n: int, *, groups: int | None = None, labels=("pos", "neg")) -> list[dict]:
    return [{"id": f"r{i}", "label": labels[i % len(labels)],
             "group": f"g{i % groups}" if groups else None,
             "messages": json.dumps([{"role": "user", "content": f"question number {i} about topic {i * 7919 % 1000}"},
                                     {"role": "assistant", "content": f"answer {i * 104729 % 99991}"}])}
            for i in range(n)]


def test_ratios_and_determinism() -> None:
    rows = _rows(1000)
    a = assign_splits(rows, val_ratio=0.1, test_ratio=0.2, stratify=None, group=None, seed=3)
    b = assign_splits(rows, val_ratio=0.1, test_ratio=0.2, stratify=None, group=None, seed=3)
    assert a == b
    assert (a.count("train"), a.count("val"), a.count("test")) == (700, 100, 200)
    c = assign_splits(rows, val_ratio=0.1, test_ratio=0.2, stratify=None, group=None, seed=4)
    assert c != a  # the seed matters


def test_assignment_does_not_depend_on_row_order() -> None:
    rows = _rows(300)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a = dict(zip((r["id"] for r in rows),
                 assign_splits(rows, val_ratio=0.1, test_ratio=0.1, stratify="label", group=None, seed=0), strict=True))
    b = dict(zip((r["id"] for r in shuffled),
                 assign_splits(shuffled, val_ratio=0.1, test_ratio=0.1, stratify="label", group=None, seed=0), strict=True))
    assert a == b


def test_groups_never_straddle_splits() -> None:
    rows = _rows(600, groups=40)
    names = assign_splits(rows, val_ratio=0.15, test_ratio=0.15, stratify=None, group="group", seed=1)
    by_group: dict[str, set[str]] = {}
    for r, s in zip(rows, names, strict=True):
        by_group.setdefault(r["group"], set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    # 40 groups of 15 rows: test and val each get 6 groups = 90 rows (15% of 600).
    assert names.count("test") == 90 and names.count("val") == 90


def test_stratified_split_keeps_label_shares() -> None:
    rows = _rows(900, labels=("a", "b", "c", "c", "c", "c"))  # a:150 b:150 c:600
    names = assign_splits(rows, val_ratio=0.1, test_ratio=0.2, stratify="label", group=None, seed=0)
    test = [r["label"] for r, s in zip(rows, names, strict=True) if s == "test"]
    assert (test.count("a"), test.count("b"), test.count("c")) == (30, 30, 120)


def test_unknown_field_names_the_param() -> None:
    with pytest.raises(SplitError, match=r"split\.stratify: field 'topic'"):
        assign_splits(_rows(10), val_ratio=0.1, test_ratio=0.1, stratify="topic", group=None, seed=0)


def test_empty_val_split_names_the_param() -> None:
    with pytest.raises(SplitError, match=r"split\.val_ratio"):
        split_rows(_rows(4), val_ratio=0.05, test_ratio=0.25, stratify=None, group=None, seed=0,
                   leakage_threshold=0.7)


def _twin(row_id: str) -> str:
    return row_id.removesuffix("_copy") if row_id.endswith("_copy") else row_id + "_copy"


def _planted(n: int = 200) -> list[dict]:
    """Each row plus an exact copy in its own unit, so copies land in all three splits."""
    rows = _rows(n)
    return rows + [dict(r, id=r["id"] + "_copy") for r in rows]


def _expected_leaks(where: dict[str, str]) -> dict[str, int]:
    """Val rows whose twin is in train; test rows whose twin is in train or val."""
    out = {"val_in_train": 0, "test_in_train": 0, "test_in_val": 0}
    for rid, s in where.items():
        before = {"val": ("train",), "test": ("train", "val")}.get(s, ())
        if where[_twin(rid)] in before:
            out[f"{s}_in_{where[_twin(rid)]}"] += 1
    return out


def test_leakage_report_counts_val_and_test_against_earlier_splits() -> None:
    result = split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                        seed=0, leakage_threshold=0.9, on_leak="report")
    where = {r["id"]: s for s, part in result.parts.items() for r in part}
    want = _expected_leaks(where)
    leak = result.metrics["leakage"]
    assert want["val_in_train"] > 0 and want["test_in_train"] > 0 and want["test_in_val"] > 0
    assert {k: leak[k] for k in want} == want
    assert leak["val"] == want["val_in_train"]
    assert leak["test"] == want["test_in_train"] + want["test_in_val"]
    assert leak["dropped"] == {"val": 0, "test": 0}
    assert sum(result.metrics["counts"].values()) == 400
    assert len(result.leaks) == leak["val"] + leak["test"]
    assert {(x["split"], x["match_split"]) for x in result.leaks} == {
        ("val", "train"), ("test", "train"), ("test", "val")}
    assert all(x["match_id"] == _twin(x["id"]) and x["similarity"] >= 0.9 for x in result.leaks)


def test_leakage_drop_removes_leaking_rows_from_val_and_test_only() -> None:
    report = split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                        seed=0, leakage_threshold=0.9, on_leak="report")
    drop = split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                      seed=0, leakage_threshold=0.9)  # default: drop
    leak = drop.metrics["leakage"]
    assert leak["on_leak"] == "drop"
    assert leak["dropped"] == {"val": leak["val"], "test": leak["test"]}
    assert drop.metrics["counts"] == {
        "train": len(report.parts["train"]),
        "val": len(report.parts["val"]) - leak["val"],
        "test": len(report.parts["test"]) - leak["test"]}
    assert drop.metrics["rows"] == sum(drop.metrics["counts"].values()) + leak["val"] + leak["test"]
    left = {r["id"]: s for s, part in drop.parts.items() for r in part}
    assert all(x["id"] not in left and x["action"] == "dropped" for x in drop.leaks)
    # nothing left in val/test has its twin in an earlier split
    assert all(left.get(_twin(rid)) not in {"val": ("train",), "test": ("train", "val")}.get(s, ())
               for rid, s in left.items())
    # deterministic
    again = split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                       seed=0, leakage_threshold=0.9)
    assert again.parts == drop.parts and again.metrics == drop.metrics


def test_leakage_fail_names_the_param_and_count() -> None:
    report = split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                        seed=0, leakage_threshold=0.9, on_leak="report")
    n = len(report.leaks)
    with pytest.raises(SplitError, match=rf"^split\.on_leak: fail: {n} held-out rows") as err:
        split_rows(_planted(), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                   seed=0, leakage_threshold=0.9, on_leak="fail")
    assert len(err.value.leaks) == n
    assert "\n" not in str(err.value)
    # no leaks: fail passes
    clean = split_rows(_rows(200), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                       seed=0, leakage_threshold=0.9, on_leak="fail")
    assert clean.leaks == [] and sum(clean.metrics["counts"].values()) == 200


def _split_stage():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "split_stage", Path(__file__).resolve().parents[1] / "stages" / "split.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def test_split_stage_keeps_small_rows_and_texts_on_disk(tmp_path) -> None:
    """The stage keeps id/source and the fields its params name per row, the conversation
    texts on disk; an unknown field fails naming the param and the records' keys."""
    from types import SimpleNamespace

    from reprotune import io
    from reprotune.data.leakage import conversation_text

    stage = _split_stage()
    recs = [{"source": f"f:{i}", **r, "messages": json.loads(r["messages"]), "tools": None,
             "meta": {"t": i}} for i, r in enumerate(_rows(50, groups=5))]
    io.write_jsonl(tmp_path / "d.jsonl", recs)
    rows, texts, excluded = stage.read_rows(
        str(tmp_path / "d.jsonl"),
        SimpleNamespace(stratify="label", group=None, order_by=None, exclude_ids=[]))
    assert excluded == []
    assert rows == [{k: r[k] for k in ("id", "source", "label")} for r in recs]
    assert list(texts) == [conversation_text(r) for r in recs]
    rows, _, _ = stage.read_rows(
        str(tmp_path / "d.jsonl"),
        SimpleNamespace(stratify=None, group="group", order_by="t", exclude_ids=[recs[0]["id"]]))
    assert len(rows) == 49 and rows[0]["id"] == recs[1]["id"]  # the excluded row is not read
    rows = [recs[0], *rows]
    assert sorted(rows[3]) == ["group", "id", "meta", "source"] and rows[3]["meta"] == {"t": 3}
    with pytest.raises(SplitError, match=r"^split\.group: field 'topic' is not a column of the "
                                         r"data; available: group, id, label, messages, meta, "
                                         r"source, tools "):
        stage.read_rows(str(tmp_path / "d.jsonl"),
                        SimpleNamespace(stratify=None, group="topic", order_by=None,
                                        exclude_ids=[]))


def test_split_stage_writes_each_split_as_the_input_lines(tmp_path) -> None:
    """Each split file holds its rows' input lines byte for byte, in input order; blank lines
    are skipped when counting rows, as io.iter_jsonl does; dropped rows go nowhere."""
    stage = _split_stage()
    lines = [json.dumps({"id": f"r{i}", "text": f"第{i}行，“引号”\u00e9 é"}, ensure_ascii=i % 2 == 0)
             + "\n" for i in range(7)]
    src = tmp_path / "d.jsonl"
    src.write_bytes(("".join(lines[:3]) + "\n  \n" + "".join(lines[3:])).rstrip("\n").encode())
    stage.write_parts(str(src), str(tmp_path / "out"),
                      {"train": [0, 2, 3, 6], "val": [1], "test": [5]}, 7)
    got = {s: (tmp_path / "out" / f"{s}.jsonl").read_bytes().decode() for s in ("train", "val", "test")}
    assert got == {"train": lines[0] + lines[2] + lines[3] + lines[6], "val": lines[1],
                   "test": lines[5]}  # r4 was dropped; the last line gains its newline
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "test.jsonl", "train.jsonl", "val.jsonl"]  # no temporary left


def test_texts_given_apart_from_rows_give_the_same_split() -> None:
    """split_rows with the texts passed apart (rows without messages) = with messages."""
    from reprotune.data.leakage import conversation_text

    rows = _planted()
    kw = dict(val_ratio=0.1, test_ratio=0.1, stratify=None, group=None, seed=0,
              leakage_threshold=0.7)
    full = split_rows(rows, **kw)
    small = [{k: v for k, v in r.items() if k != "messages"} for r in rows]
    apart = split_rows(small, texts=[conversation_text(r) for r in rows], **kw)
    assert full.leaks and apart.leaks == full.leaks
    assert apart.metrics == full.metrics and apart.indices == full.indices
