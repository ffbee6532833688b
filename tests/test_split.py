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


def test_leakage_counts_near_duplicates_in_train() -> None:
    rows = _rows(200)
    # Plant a near-copy of every row as a second row in its own unit: some copies land in
    # test while their original is in train, and the leakage check must list exactly those.
    copies = [dict(r, id=r["id"] + "_copy") for r in rows]
    result = split_rows(rows + copies, val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                        seed=0, leakage_threshold=0.9)
    where = {r["id"]: s for s, part in result.parts.items() for r in part}
    expected = sum(1 for r in rows + copies for s in ("val", "test")
                   if where[r["id"]] == s and where[r["id"].removesuffix("_copy") if r["id"].endswith("_copy") else r["id"] + "_copy"] == "train")
    assert expected > 0
    assert result.metrics["leakage"]["val"] + result.metrics["leakage"]["test"] == expected
    assert {leak["split"] for leak in result.leaks} <= {"val", "test"}
    assert sum(result.metrics["counts"].values()) == 400
