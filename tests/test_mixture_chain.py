"""A two-task mixture through the stages, as dvc.yaml runs them (issue 32): two data sets with
distinguishable answers (English sums, Chinese sums) -> read -> ingest -> split -> base ->
format -> eval_base -> train -> evaluate, on the embedded tiny model, with per-task counts at
every step and per-task metrics, gains and intervals at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io

ROOT = Path(__file__).resolve().parents[1]
EN, ZH = "data/raw/en.jsonl", "data/raw/zh.jsonl"
PARAMS = f"""\
method: full
lr: 0.01
epochs: 1
batch_size: 16
seed: 0
ingest:
  inputs: [{EN}, {ZH}]
  mixture:
    strategy: interleave
    seed: 3
    tasks:
      english: {{inputs: [{EN}], weight: 1.0}}
      chinese: {{inputs: [{ZH}], weight: 1.0}}
model:
  name: tiny
  tiny: {{vocab: 400, hidden: 16, layers: 1, heads: 2, kv_heads: 1, head_dim: 8,
          intermediate: 32, max_positions: 128}}
split: {{val_ratio: 0.15, test_ratio: 0.2, on_leak: report}}
format: {{max_length: 64}}
data: {{num_proc: 1}}
train: {{max_steps: 3, eval_steps: 3, eval_rows: 8, logging_steps: 1}}
eval: {{max_new_tokens: 6, batch_size: 32, general_text: general.jsonl}}
"""


def _data() -> tuple[list[dict], list[dict]]:
    """80 English and 40 Chinese questions whose answers tell the language apart."""
    en = [{"instruction": f"What is {a} plus {b}?", "output": f"The sum is {a + b}."}
          for a, b in ((i, 3 * i % 17 + 2) for i in range(80))]
    zh = [{"instruction": f"{a}加{b}等于多少？", "output": f"答案是{a + b}。"}
          for a, b in ((i, 5 * i % 13 + 1) for i in range(40))]
    return en, zh


def _stage(project: Path, script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=project,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{script} {' '.join(args)}:\n{proc.stderr[-4000:]}"
    return proc.stderr


@pytest.mark.slow
def test_two_task_mixture_from_ingest_to_per_task_evaluation(tmp_path: Path) -> None:
    project = tmp_path
    en, zh = _data()
    io.write_jsonl(project / EN, en)
    io.write_jsonl(project / ZH, zh)
    io.write_jsonl(project / "general.jsonl", [{"text": "The weather is mild today."},
                                               {"text": "今天天气很好。"}])
    (project / "params.yaml").write_text(PARAMS, encoding="utf-8")
    _stage(project, "check.py", "--out", "m/params_ok.json")
    for path in (EN, ZH):
        _stage(project, "read.py", "--input", path, "--out", f"data/interim/read/{path}")
    _stage(project, "ingest.py")

    # ingest: every record carries its input's task, its text untouched; counts per task
    ingest = io.read_json(project / "metrics/ingest.json")
    assert ingest["tasks"] == {
        "chinese": {"inputs": [ZH], "rows_in": 40, "kept": 40, "rejected_total": 0},
        "english": {"inputs": [EN], "rows_in": 80, "kept": 80, "rejected_total": 0}}
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    assert [r["task"] for r in recs] == ["english"] * 80 + ["chinese"] * 40
    assert [r["messages"][-1]["content"] for r in recs] == [x["output"] for x in en + zh]

    # split (dedup and redact pass these rows through unchanged): every task in every part
    _stage(project, "split.py", "--data", "data/interim/ingested.jsonl", "--out-dir", "splits",
           "--metrics", "metrics/split.json", "--leaks", "metrics/split_leakage.json")
    split = io.read_json(project / "metrics/split.json")
    assert split["tasks"] == {"train": {"chinese": 26, "english": 52},
                              "val": {"chinese": 6, "english": 12},
                              "test": {"chinese": 8, "english": 16}}

    # format: the train split resampled 1:1 (52 + 26 = 78 rows -> 39 each), val/test natural
    _stage(project, "base.py", "--data", "splits/train.jsonl", "--out", "models/base",
           "--metrics", "metrics/base.json")
    _stage(project, "format.py", "--data-dir", "splits", "--base", "models/base", "--out-dir",
           "p", "--dropped", "i/format_dropped.jsonl", "--metrics", "metrics/format.json",
           "--plot", "m/len.png", "--pairs-dir", "p/pairs")
    mix = io.read_json(project / "metrics/format.json")["mixture"]
    assert mix["train"] == {
        "chinese": {"weight": 1.0, "rows": 26, "sampled": 39, "repeated": 13, "left_out": 0,
                    "share": 0.5},
        "english": {"weight": 1.0, "rows": 52, "sampled": 39, "repeated": 0, "left_out": 13,
                    "share": 0.5}}
    assert mix["rows_in"] == {"train": {"chinese": 39, "english": 39},
                              "val": {"chinese": 6, "english": 12},
                              "test": {"chinese": 8, "english": 16}}
    assert mix["rows_out"] == mix["rows_in"]  # short rows: nothing dropped
    train = io.read_parquet(project / "p/train.parquet")
    assert [r["task"] for r in train[:4]] in (["chinese", "english"] * 2, ["english", "chinese"] * 2)
    assert len({r["id"] for r in train if r["task"] == "chinese"}) == 26  # each row at least once
    test = io.read_parquet(project / "p/test.parquet")
    assert {r["task"] for r in test} == {"english", "chinese"}

    # evaluation: each task's metrics beside the pooled ones; gains with paired intervals
    _stage(project, "evaluate.py", "--kind", "base", "--model", "models/base", "--test",
           "p/test.parquet", "--metrics", "metrics/eval_base.json", "--predictions",
           "e/predictions_base.jsonl", "--general", "e/general_base.jsonl")
    _stage(project, "train.py", "--train", "p/train.parquet", "--val", "p/val.parquet",
           "--base", "models/base", "--out", "models/finetuned", "--checkpoints",
           "models/checkpoints", "--live-dir", "metrics/curves", "--metrics", "metrics/train.json")
    _stage(project, "evaluate.py", "--kind", "finetuned", "--model", "models/finetuned",
           "--test", "p/test.parquet", "--metrics", "metrics/eval.json", "--predictions",
           "e/predictions.jsonl", "--base-metrics", "metrics/eval_base.json", "--gain",
           "metrics/eval_gain.json", "--base-predictions", "e/predictions_base.jsonl",
           "--general", "e/general.jsonl", "--base-general", "e/general_base.jsonl",
           "--report", "reports/eval.md", "--confusion", "m/confusion.png")
    ev = io.read_json(project / "metrics/eval.json")
    assert sorted(ev["tasks"]) == ["chinese", "english"]
    assert {t: m["n_rows"] for t, m in ev["tasks"].items()} == {"chinese": 8, "english": 16}
    for m in ev["tasks"].values():
        assert {"bleu", "chrf", "rouge_l", "f1", "em", "perplexity"} <= set(m)
    # pooled perplexity = exp(all NLL / all tokens): the tasks' token counts add up to it
    assert sum(m["ppl_tokens"] for m in ev["tasks"].values()) == ev["ppl_tokens"]
    preds = io.read_jsonl(project / "e/predictions.jsonl")
    assert {p["id"]: p["task"] for p in preds} == {r["id"]: r["task"] for r in test}
    gain = io.read_json(project / "metrics/eval_gain.json")["tasks"]
    for t in ("chinese", "english"):
        assert gain[t]["gain"]["bleu"] == pytest.approx(
            ev["tasks"][t]["bleu"] - io.read_json(project / "metrics/eval_base.json")["tasks"][t]["bleu"],
            abs=1e-5)
        iv = gain[t]["intervals"]
        assert iv["n_shared"] == ev["tasks"][t]["n_rows"]
        assert iv["bleu"]["verdict"] == "too few rows to tell"  # < 30 rows a task
    report = (project / "reports/eval.md").read_text(encoding="utf-8")
    assert "## Per task" in report and "| chinese | 8 | bleu |" in report
    assert "| english | 16 | perplexity (reduction) |" in report
    # the scorecard stays the pooled columns
    assert "tasks" not in json.loads((project / "metrics/scorecard/eval_gain.json").read_text())


def check_real_mixture(shared: Path, project: Path) -> None:
    """English alpaca and Chinese medical rows from ../shared/data as two tasks, through read,
    ingest and split: counts per task, every task in every part, the text byte for byte."""
    en = json.loads((shared / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:150]
    zh_lines = (shared / "data" / "medical_sft_1K_format.jsonl").read_bytes().splitlines(True)[:60]
    io.write_jsonl(project / "data/raw/en.json", en)
    (project / ZH).parent.mkdir(parents=True, exist_ok=True)
    (project / ZH).write_bytes(b"".join(zh_lines))
    (project / "params.yaml").write_text(
        "ingest:\n  inputs: [data/raw/en.json, data/raw/zh.jsonl]\n  mixture:\n    tasks:\n"
        "      en: {inputs: [data/raw/en.json]}\n      zh: {inputs: [data/raw/zh.jsonl], weight: 2}\n",
        encoding="utf-8")
    for path in ("data/raw/en.json", ZH):
        _stage(project, "read.py", "--input", path, "--out", f"data/interim/read/{path}")
    _stage(project, "ingest.py")
    tasks = io.read_json(project / "metrics/ingest.json")["tasks"]
    assert {t: c["kept"] for t, c in tasks.items()} == {"en": 150, "zh": 60}
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    zh = [r for r in recs if r["task"] == "zh"]
    raw = [json.loads(line) for line in zh_lines]
    assert [r["messages"][-1]["content"] for r in zh] == [x["conversations"][-1]["value"] for x in raw]
    assert any("，" in r["messages"][-1]["content"] for r in zh)  # full-width punctuation kept
    _stage(project, "split.py", "--data", "data/interim/ingested.jsonl", "--out-dir", "splits",
           "--metrics", "metrics/split.json", "--leaks", "metrics/split_leakage.json")
    parts = io.read_json(project / "metrics/split.json")["tasks"]
    assert all(n > 0 for split in parts.values() for n in split.values()), parts
    assert parts["test"]["zh"] == parts["val"]["zh"] == 6  # 10% of 60, stratified


def test_real_two_task_mixture_through_ingest_and_split(shared_dir: Path, tmp_path: Path) -> None:
    check_real_mixture(shared_dir, tmp_path)
