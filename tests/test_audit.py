"""make audit (suspect labels, loss outliers) and split.exclude_ids (the rows a review drops)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.label_review import LabelReviewError, label_issues, robust_outliers
from reprotune.evaluate.audit import review_labels

POS = ["great", "wonderful", "loved it", "excellent", "superb", "delightful", "很好", "满意"]
NEG = ["terrible", "awful", "hated it", "broken", "disappointing", "refund", "很差", "失望"]


def _reviews(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.sample(POS if label == "positive" else NEG, 2)
        texts.append(f"Review {i}: the product was {words[0]}, really {words[1]}.")
        labels.append(label)
    return texts, labels


def test_label_issues_find_planted_flips_first() -> None:
    texts, labels = _reviews(200, 0)
    flipped = [7, 40, 41, 99, 150, 180]
    for i in flipped:
        labels[i] = "negative" if labels[i] == "positive" else "positive"
    issues = label_issues(texts, labels, folds=5, seed=0)
    top = [x["index"] for x in issues[:len(flipped)]]
    assert sorted(top) == flipped  # every flip, ranked ahead of every clean row
    first = issues[0]
    assert first["given"] != first["likely"] and first["self_confidence"] < 0.5
    assert first["likely_prob"] == pytest.approx(1 - first["self_confidence"], abs=1e-3)


def test_label_review_refuses_one_class_and_rare_classes() -> None:
    with pytest.raises(LabelReviewError, match="1 class"):
        label_issues(["a", "b", "c"], ["x", "x", "x"])
    with pytest.raises(LabelReviewError, match=r"\['y'\]"):
        label_issues(["a", "b", "c"], ["x", "x", "y"])


def test_review_labels_names_rows_by_id_and_skips_unlabelled() -> None:
    texts, labels = _reviews(60, 1)
    labels[10] = "negative" if labels[10] == "positive" else "positive"
    records = [{"id": f"id{i}", "source": f"f.jsonl:{i + 1}", "label": lab,
                "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]}
               for i, (t, lab) in enumerate(zip(texts, labels, strict=True))]
    records.append({"id": "plain", "messages": [{"role": "user", "content": "hi"}]})
    rows, summary = review_labels(records, folds=5, seed=0)
    assert summary == {"rows": 61, "labelled_rows": 60, "suspect_labels": len(rows)}
    assert rows[0]["id"] == "id10" and rows[0]["source"] == "f.jsonl:11"
    assert rows[0]["text"].startswith("Review 10:")
    assert review_labels(records[-1:], folds=5, seed=0) == (
        [], {"rows": 1, "labelled_rows": 0, "skipped": "no row carries a label"})


def test_robust_outliers_are_the_far_high_values() -> None:
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 6.0, 0.98, 4.0]
    assert robust_outliers(values) == [6, 8]
    assert robust_outliers([1.0, 1.0, 1.0, 1.0]) == []  # no spread: nothing stands out


def test_split_exclude_ids_leaves_the_rows_out_and_counts_them(tmp_path: Path,
                                                               repo_root: Path) -> None:
    rows = [{"id": f"{i:040x}", "source": f"d.jsonl:{i + 1}",
             "messages": [{"role": "user", "content": f"question number {i} about topic {i * 7}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(50)]
    data = tmp_path / "dd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    gone = [rows[3]["id"], rows[17]["id"], "f" * 40]  # the last matches nothing
    (tmp_path / "params.yaml").write_text(
        "ingest:\n  inputs: [d.jsonl]\nsplit:\n  stratify:\n  group:\n  on_leak: report\n"
        f"  exclude_ids: {json.dumps(gone)}\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(repo_root / "stages/split.py"), "--data", str(data),
                           "--out-dir", "splits", "--metrics", "split.json", "--leaks", "l.json"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo_root / "src")},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = io.read_json(tmp_path / "split.json")
    assert m["excluded"] == {"ids": 3, "rows": 2, "ids_not_found": 1}
    assert m["rows"] == 48 and sum(m["counts"].values()) == 48
    written = [r for s in ("train", "val", "test")
               for r in io.read_jsonl(tmp_path / "splits" / f"{s}.jsonl")]
    assert len(written) == 48 and not {r["id"] for r in written} & set(gone)
    lines = set(data.read_text(encoding="utf-8").splitlines())  # byte for byte, as before
    assert all(json.dumps(r) in lines for r in written)
    assert "2 rows left out (1 ids matched no row" in proc.stderr


def test_audit_flips_bench_reports_what_it_found(tmp_path: Path) -> None:
    from bench_scripts import load_bench

    out = tmp_path / "flips.json"
    argv = ["--rows", "600", "--flip", "0.05", "--seeds", "2", "--out", str(out)]
    load_bench("audit_flips").main(argv)
    report = io.read_json(out)
    assert report["command"] == "python bench/audit_flips.py " + " ".join(argv)
    assert len(report["runs"]) == 2 and report["labelled_rows"] > 100
    for r in report["runs"]:
        assert r["flipped"] == round(0.05 * report["labelled_rows"])
        assert 0 <= r["top_k_share"] <= r["recall"] <= 1 and r["flagged"] >= 1
    assert report["mean_top_k_share"] >= 0.5  # sentiment words make most flips obvious
