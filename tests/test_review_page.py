"""Blind side-by-side review (`make review`): the page, judged in a real headless Chromium,
its saved judgments, and the win rates the `review_wins` stage computes from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_plots_offline import CHROMIUM_FLAGS, _chromium

from reprotune import io
from reprotune.team.judgments import JudgmentError, outcomes, review_metrics, win_rate
from reprotune.team.review_page import blind_rows, build, main, render_page

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_ZH = ["计算 12 加 7 等于多少？", "把“早上好”翻译成英文。", "用一句话介绍长城，保留全角标点：！？",
              "列出三种水果", "今天天气怎么样？", "写一首关于月亮的短诗"]


def _preds(tmp: Path, shared: Path | None) -> tuple[list[dict], list[dict]]:
    """Base and fine-tuned predictions of 14 rows (real Chinese prompts when ../shared has
    them); written to tmp/data/eval as the evaluate stages would."""
    prompts = list(PROMPTS_ZH)
    path = (shared / "data" / "sharegpt_zh_1K_format.jsonl") if shared else None
    if path and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[:8]:
            prompts.append(json.loads(line)["conversations"][0]["value"][:200])
    prompts = (prompts * 3)[:14]
    base = [{"id": f"r{i}", "prompt": p, "reference": f"参考答案 {i}。", "prediction": f"基座回答 {i}"}
            for i, p in enumerate(prompts)]
    ft = [{**r, "prediction": f"微调回答 {i}：很好！"} for i, r in enumerate(base)]
    io.write_jsonl(tmp / "data/eval/predictions_base.jsonl", base)
    io.write_jsonl(tmp / "data/eval/predictions.jsonl", ft)
    return base, ft


def test_blind_rows_are_seeded_shuffled_and_hide_the_models(tmp_path: Path) -> None:
    base, ft = _preds(tmp_path, None)
    rows, left_is_a = blind_rows(base, ft, seed=0)
    assert blind_rows(base, ft, seed=0) == (rows, left_is_a)
    assert blind_rows(base, ft, seed=1) != (rows, left_is_a)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in base)
    assert [r["id"] for r in rows] != [r["id"] for r in base]  # order shuffled
    assert 0 < sum(left_is_a.values()) < len(rows)  # both sides used
    for r in rows:
        a_text = next(b["prediction"] for b in base if b["id"] == r["id"])
        assert (r["left"] == a_text) == left_is_a[r["id"]]
    page = render_page(rows, "base-vs-finetuned")
    assert "left_is_a" not in page and "predictions_base" not in page
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")
    assert "用一句话介绍长城，保留全角标点：！？" in page  # Chinese kept as text, not escaped


def test_win_rate_counts_and_interval() -> None:
    scores = outcomes([{"id": "x", "choice": "left"}, {"id": "y", "choice": "right"},
                       {"id": "z", "choice": "tie"}, {"id": "w", "choice": "skip"}],
                      {"x": True, "y": True, "z": False, "w": True})
    assert scores == [0.0, 1.0, 0.5]
    few = win_rate(scores, 1)
    assert (few["n"], few["b_wins"], few["a_wins"], few["ties"], few["skipped"]) == (3, 1, 1, 1, 1)
    assert few["win_rate_b"] == 0.5 and few["verdict"] == "too few rows to tell"
    many = win_rate([1.0] * 30 + [0.0] * 10)
    assert many["win_rate_b"] == 0.75 and 0.5 < many["low"] < 0.75 < many["high"]
    assert many["verdict"] == "b preferred"
    assert win_rate([0.5] * 60)["verdict"] == "no detectable preference"


def _key_and_judgments(d: Path, ids: list[str]) -> None:
    io.write_json(d / "s.key.json", {"format": "reprotune-review/1", "session": "s", "a": "base",
                                      "b": "finetuned", "a_source": "x", "b_source": "y",
                                      "left_is_a": {"r0": True, "r1": False}})
    io.write_json(d / "s.ann.judgments.json", {
        "format": "reprotune-review/1", "session": "s", "reviewer": "ann",
        "judgments": [{"id": i, "choice": "left"} for i in ids]})


def test_judgments_naming_unknown_ids_are_refused_with_the_ids(tmp_path: Path) -> None:
    _key_and_judgments(tmp_path, ["r0", "r1"])
    assert review_metrics(tmp_path)["sessions"]["s"]["overall"]["win_rate_b"] == 0.5
    _key_and_judgments(tmp_path, ["r0", "r7", "r9"])
    with pytest.raises(JudgmentError, match=r"ids \['r7', 'r9'\] are not in the predictions"):
        review_metrics(tmp_path)
    # the stage says it in one line, no traceback
    proc = subprocess.run([sys.executable, str(ROOT / "stages/review_wins.py"), "--dir",
                           str(tmp_path), "--out", str(tmp_path / "review.json")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("review_wins: ")
    assert "['r7', 'r9']" in proc.stderr


def test_make_review_command_writes_page_and_key(tmp_path: Path, monkeypatch, capsys) -> None:
    _preds(tmp_path, None)
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    key = io.read_json(tmp_path / "data/review/base-vs-finetuned.key.json")
    assert key["n_rows"] == 14 and key["a"] == "base" and key["b"] == "finetuned"
    assert (tmp_path / "reports/review.html").is_file()
    assert main(["--a", "no-such-rev"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make review: revision 'no-such-rev'")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_judge_ten_rows_in_chromium_then_win_rates(browser: Any, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    shared = ROOT.parent / "shared"
    base, ft = _preds(tmp_path, shared if (shared / "data").is_dir() else None)
    review_dir = tmp_path / "data/review"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        key = build("base", "finetuned", seed=0, page=tmp_path / "review.html",
                    review_dir=review_dir)
    finally:
        os.chdir(cwd)
    rows, _ = blind_rows(base, ft, seed=0)
    page = browser.new_page(accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
               else (problems.append(route.request.url), route.abort()))
    page.goto((tmp_path / "review.html").as_uri())
    assert page.inner_text("#progress") == "row 1 of 14, 0 judged"
    assert page.text_content("#prompt") == rows[0]["prompt"]  # Chinese, byte for byte
    assert page.text_content("#left") == rows[0]["left"]
    keys = ["ArrowLeft", "ArrowRight", "t", "s", "ArrowRight", "ArrowRight", "ArrowLeft", "t",
            "ArrowRight", "ArrowLeft"]
    choices = {"ArrowLeft": "left", "ArrowRight": "right", "t": "tie", "s": "skip"}
    for k in keys[:3]:
        page.keyboard.press(k)
    page.keyboard.press("Backspace")  # back to row 3, judged again below
    page.keyboard.press(keys[2])
    for k in keys[3:]:
        page.keyboard.press(k)
    assert page.inner_text("#progress") == "row 11 of 14, 10 judged"
    assert page.text_content("#prompt") == rows[10]["prompt"]
    page.fill("#reviewer", "张三 (zh)")
    with page.expect_download() as dl:
        page.click("#save")
    name = dl.value.suggested_filename
    assert name == "base-vs-finetuned.张三_zh_.judgments.json"
    dl.value.save_as(review_dir / name)
    page.close()
    assert problems == []
    saved = io.read_json(review_dir / name)
    assert saved["reviewer"] == "张三 (zh)" and saved["session"] == "base-vs-finetuned"
    assert saved["judgments"] == [{"id": r["id"], "choice": choices[k]}
                                  for r, k in zip(rows[:10], keys, strict=True)]
    # expected win rate of B from the key: left/right mapped to the models
    expected = outcomes(saved["judgments"], key["left_is_a"])
    metrics = review_metrics(review_dir)
    session = metrics["sessions"]["base-vs-finetuned"]
    overall = session["overall"]
    assert (overall["n"], overall["skipped"], overall["ties"]) == (9, 1, 2)
    assert overall["b_wins"] + overall["a_wins"] == 7
    assert overall["win_rate_b"] == round(sum(expected) / 9, 6)
    assert overall["low"] <= overall["win_rate_b"] <= overall["high"]
    assert overall["verdict"] == "too few rows to tell"
    assert session["reviewers"]["张三 (zh)"] == overall
    assert metrics["n_judgments"] == 10
