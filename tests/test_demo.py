"""Demo data: determinism, task mix, planted defects with exact counts, demo → ingest agreement."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.demo import MALFORMED, generate_demo, generate_demo_with_stats
from reprotune.data.inputs import ingest_files

ROOT = Path(__file__).resolve().parents[1]
ROWS = 1000


@pytest.fixture(scope="module")
def demo() -> tuple[list[str], dict]:
    return generate_demo_with_stats(ROWS, 3)


def _parsed(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_deterministic_and_seed_dependent() -> None:
    assert generate_demo(300, 7) == generate_demo(300, 7)
    assert generate_demo(300, 7) != generate_demo(300, 8)
    assert sorted(generate_demo(300, 7)) != sorted(generate_demo(300, 8))


def test_row_count_and_minimum() -> None:
    for rows in (10, 57, 20000):  # 20000: the sentiment pool runs out, arithmetic fills in
        assert len(generate_demo(rows, 0)) == rows
    with pytest.raises(ValueError, match="demo.rows"):
        generate_demo(9, 0)


def test_tasks_languages_and_formats(demo: tuple[list[str], dict]) -> None:
    lines, stats = demo
    rows = _parsed(lines)
    good = [r for r in rows if isinstance(r.get("output"), str) or "messages" in r]
    assert set(stats["tasks"]) == {"arithmetic", "arithmetic_followup", "unit_conversion", "translation",
                                   "sentiment", "identity"}
    assert set(stats["languages"]) == {"en", "zh"} and min(stats["languages"].values()) > 0.4 * ROWS
    assert stats["tasks"]["arithmetic_followup"] == ROWS * 5 // 100
    assert all(r.get("group") for r in rows if "question" not in r)
    for r in good:  # sentiment answers are the label word, other tasks carry no label
        if r.get("task") == "sentiment":
            assert r["label"] in ("positive", "negative") and r["output"] in ("", r["label"])
        else:
            assert "label" not in r
    multi = [r for r in good if "messages" in r]
    assert len(multi) == stats["formats"]["messages"] + stats["defects"]["bad_role_order"]
    two_answers = [r for r in multi if sum(m["role"] == "assistant" for m in r["messages"]) == 2]
    assert len(two_answers) >= stats["formats"]["messages"]
    en = next(r for r in good if r.get("task") == "arithmetic" and r["lang"] == "en" and r["output"])
    a, op, b = re.fullmatch(r"What is (\d+) ([-+×]) (\d+)\?", en["instruction"]).groups()
    want = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
    assert en["output"] == f"{a} {op} {b} = {want}" and en["group"] == f"arith:{a}{op}{b}"
    identity = [r for r in good if r.get("task") == "identity"]
    assert any("Reprotune-Tiny" in r["output"] for r in identity if r["lang"] == "zh")


def test_planted_defect_counts(demo: tuple[list[str], dict]) -> None:
    lines, stats = demo
    d = stats["defects"]
    assert d["exact_duplicate"] == d["near_duplicate"] == ROWS * 3 // 100
    assert d["empty_answer"] == ROWS // 100
    assert all(d[k] == 1 for k in MALFORMED) and stats["malformed_total"] == len(MALFORMED) >= 5
    # exact duplicate lines: each duplicated row appears exactly twice
    dup_counts = Counter(lines)
    assert sum(n - 1 for n in dup_counts.values()) == d["exact_duplicate"]
    assert max(dup_counts.values()) == 2
    rows = _parsed(lines)
    assert len(lines) - len(rows) == d["invalid_json"]
    assert sum(r.get("output") == "" for r in rows) == d["empty_answer"]
    assert sum("question" in r for r in rows) == d["unknown_format"]
    assert sum(isinstance(r.get("output"), list) for r in rows) == d["wrong_type"]
    assert sum("instruction" in r and "output" not in r for r in rows) == d["missing_output"]
    assert sum(stats["near_duplicate_edits"].values()) == d["near_duplicate"]


def test_near_duplicates_are_small_edits_of_another_row(demo: tuple[list[str], dict]) -> None:
    lines, stats = demo

    def key(r: dict) -> str:  # the edits change case, final punctuation, or add one word
        text = json.dumps(r.get("messages") or [r["instruction"], r["input"], r["output"]],
                          ensure_ascii=False).lower()
        return re.sub(r"[.?!。？！]|\bplease\b|\s|请|麻烦", "", text)

    rows = [r for r in _parsed(sorted(set(lines))) if isinstance(r.get("output"), str) or "messages" in r]
    by_key = Counter(key(r) for r in rows)
    assert sum(n - 1 for n in by_key.values()) == stats["defects"]["near_duplicate"]


def test_no_accidental_near_duplicates(demo: tuple[list[str], dict]) -> None:
    """Char 2-4-gram TF-IDF cosine (a stand-in for dedup): rows ≥ 0.85 apart share a group,
    i.e. only the planted near-duplicates, which keep their source's group, are that close."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    lines, _ = demo
    rows = [r for r in _parsed(sorted(set(lines))) if isinstance(r.get("output"), str)]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    x = TfidfVectorizer(analyzer="char", ngram_range=(2, 4)).fit_transform(texts)
    sim = (x @ x.T).tocoo()
    close = [(i, j) for i, j, v in zip(sim.row, sim.col, sim.data, strict=True) if i < j and v >= 0.85]
    assert close, "planted near-duplicates should be close"
    assert all(rows[i]["group"] == rows[j]["group"] for i, j in close)


def test_demo_then_ingest_counts_agree(tmp_path: Path, demo: tuple[list[str], dict]) -> None:
    lines, stats = demo
    path = tmp_path / "demo.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    res = ingest_files([str(path)])
    c = res.counts
    expected = stats["expected_ingest"]
    assert (c["rows_in"], c["kept"]) == (expected["rows_in"], expected["kept"])
    assert {k: v for k, v in c["rejected"].items() if v} == expected["rejected"]
    assert c["empty_answers"] == stats["defects"]["empty_answer"]
    assert c["formats"]["messages"]["kept"] == stats["formats"]["messages"]
    assert c["with_label"] == sum(stats["labels"].values())
    # exact duplicates collapse to one id; near-duplicates stay distinct conversations
    assert len({r["id"] for r in res.records}) == stats["unique_rows"] + stats["defects"]["near_duplicate"]
    assert all(r["group"] for r in res.records)


def test_stage_writes_file_and_metrics(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("demo:\n  rows: 120\n  seed: 5\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "demo.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = (tmp_path / "data/raw/demo.jsonl").read_text(encoding="utf-8").splitlines()
    assert written == generate_demo(120, 5)
    metrics = io.read_json(tmp_path / "metrics/demo.json")
    assert metrics["lines"] == 120 and metrics["defects"]["exact_duplicate"] == 3
    assert sum(metrics["tasks"].values()) == metrics["unique_rows"]
