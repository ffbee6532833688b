"""evaluate_model / compare / report / the evaluate stage, on the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.evaluate import metrics as M
from reprotune.evaluate.comparison import compare, is_finite_metrics, metrics_file
from reprotune.evaluate.evaluation import (
    EvalDataError,
    evaluate_model,
    load_test_rows,
    parse_row,
    reference_text,
)
from reprotune.evaluate.report import pick_examples, plot_confusion, render_report
from reprotune.params import EvalParams

RECORDS = [
    {"id": "r1", "messages": [{"role": "user", "content": "What is 12 plus 7?"},
                              {"role": "assistant", "content": "The answer is 19."}],
     "tools": None, "label": None},
    {"id": "r2", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "计算 12 加 7 等于多少？"},
                              {"role": "assistant", "content": "答案是 19。"}],
     "tools": None, "label": None},
    {"id": "r3", "messages": [{"role": "user", "content": "The movie was wonderful. Sentiment?"},
                              {"role": "assistant", "content": "positive"}],
     "tools": None, "label": "positive"},
    {"id": "r4", "messages": [{"role": "user", "content": "这部电影很糟糕。情感？"},
                              {"role": "assistant", "content": "negative"}],
     "tools": None, "label": "negative"},
    {"id": "r5", "messages": [{"role": "user", "content": "Hello!"},
                              {"role": "assistant", "content": "Hi"},
                              {"role": "user", "content": "Translate 'apple' into Chinese"},
                              {"role": "assistant", "content": "苹果"}],
     "tools": None, "label": None},
]


@pytest.fixture(scope="module")
def lm(tiny_base_dir):
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_base_dir), load_model(tiny_base_dir)
    g = torch.Generator().manual_seed(1)  # a chattier random model than the 0.02-std init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


@pytest.fixture(scope="module")
def rows(lm):
    from reprotune.data.formatting import format_records

    out, stats, _ = format_records(RECORDS, lm[1], max_length=256, enable_thinking=False)
    assert stats["rows_out"] == len(RECORDS)
    return out


CFG = EvalParams(max_new_tokens=8, batch_size=2)


def test_parse_row_errors_name_file_row_and_field():
    no_answer = {"id": "x", "messages": json.dumps([{"role": "user", "content": "hi"}])}
    with pytest.raises(EvalDataError, match=r"test\.parquet: row 3 \(id x\): field 'messages' "
                                            r"has no assistant turn"):
        parse_row(no_answer, 2, "test.parquet")
    with pytest.raises(EvalDataError, match=r"row 1 \(id y\): field 'messages' is not valid JSON"):
        parse_row({"id": "y", "messages": "[{"}, 0, "t.parquet")
    with pytest.raises(EvalDataError, match="starts with the assistant turn"):
        parse_row({"id": "z", "messages": [{"role": "assistant", "content": "a"}]}, 0, "t")


def test_parse_row_prompt_reference_and_tool_calls():
    ex = parse_row({"id": "m", "label": "", "messages": json.dumps(RECORDS[4]["messages"])}, 0, "t")
    assert [m["content"] for m in ex.prompt] == ["Hello!", "Hi", "Translate 'apple' into Chinese"]
    assert ex.reference == "苹果" and ex.user == "Translate 'apple' into Chinese"
    assert ex.label is None  # empty label = no label
    msg = {"role": "assistant", "content": "<think>\nx\n</think>\n\nSure.",
           "tool_calls": [{"type": "function", "function": {"name": "add",
                                                            "arguments": {"a": 1, "b": "二"}}}]}
    assert reference_text(msg) == ('Sure.\n<tool_call>\n{"name": "add", "arguments": '
                                   '{"a": 1, "b": "二"}}\n</tool_call>')


def test_load_test_rows_errors(tmp_path):
    with pytest.raises(EvalDataError, match=r"missing\.parquet: test split not found"):
        load_test_rows(tmp_path / "missing.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EvalDataError, match=r"empty\.jsonl: test split has no rows"):
        load_test_rows(tmp_path / "empty.jsonl")


def test_evaluate_model_end_to_end(lm, rows):
    model, tok = lm
    metrics, preds = evaluate_model(model, tok, rows, CFG, enable_thinking=False, seed=0,
                                    progress=False)
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    assert preds[4]["prompt"] == "Translate 'apple' into Chinese"
    assert preds[4]["reference"] == "苹果"
    # headline numbers are the library metrics of exactly these predictions
    hyp, ref = [p["prediction"] for p in preds], [p["reference"] for p in preds]
    bc = M.bleu_chrf(hyp, ref)
    assert metrics["bleu"] == pytest.approx(bc["bleu"], abs=1e-6)
    assert metrics["rouge_l"] == pytest.approx(M.rouge(hyp, ref)["rouge_l"], abs=1e-6)
    assert metrics["f1"] == pytest.approx(M.token_f1_em(hyp, ref)["f1"], abs=1e-6)
    assert metrics["settings"]["bleu_tokenize"] == "zh"  # 3 of 5 references are Chinese
    assert metrics["settings"]["max_new_tokens"] == 8 and metrics["n_rows"] == 5
    # classification on the two labelled rows
    assert metrics["settings"]["classification"] and metrics["n_labelled"] == 2
    assert metrics["confusion"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 2
    assert "pred_label" in preds[2] and "pred_label" not in preds[0]
    # perplexity: same as the library function on the same rows
    ppl = M.corpus_perplexity(model, rows, 1, pad_id=tok.pad_token_id, progress=False)
    assert metrics["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-5)
    assert metrics["ppl_tokens"] == sum(r["n_label_tokens"] for r in rows) - 0 == ppl["n_tokens"]
    assert is_finite_metrics(metrics)
    json.dumps(metrics, allow_nan=False)


def test_evaluate_model_task_and_max_rows(lm, rows):
    model, tok = lm
    gen_only, _ = evaluate_model(model, tok, rows, EvalParams(max_new_tokens=4, task="generation",
                                                              max_rows=2),
                                 enable_thinking=False, seed=0, progress=False)
    assert gen_only["n_rows"] == 2 and "accuracy" not in gen_only
    with pytest.raises(EvalDataError, match="t.parquet: eval.task is classification but no row"):
        evaluate_model(model, tok, rows[:2], EvalParams(max_new_tokens=2, task="classification"),
                       enable_thinking=False, seed=0, source="t.parquet", progress=False)


def test_evaluate_model_without_assistant_tokens_is_an_error(lm, rows):
    model, tok = lm
    masked = [dict(r, labels=[-100] * len(r["labels"])) for r in rows[:2]]
    with pytest.raises(EvalDataError, match="t.parquet: no scored"):
        evaluate_model(model, tok, masked, EvalParams(max_new_tokens=2), enable_thinking=False,
                       seed=0, source="t.parquet", progress=False)


def test_compare_gain_signs_and_mismatch():
    s = {"n_rows": 10, "bleu_tokenize": "zh", "max_new_tokens": 8, "do_sample": False,
         "task": "auto"}
    ft = {"bleu": 30.0, "rouge_l": 0.5, "perplexity": 20.0, "n_rows": 10, "settings": s}
    base = {"bleu": 10.0, "rouge_l": 0.75, "perplexity": 50.0, "n_rows": 10, "settings": s}
    cmp = compare(ft, base)
    assert cmp["gain"] == {"bleu": 20.0, "rouge_l": -0.25, "ppl_reduction": 30.0}
    assert cmp["finetuned"]["bleu"] == 30.0 and cmp["base"]["perplexity"] == 50.0
    assert "settings_mismatch" not in cmp
    out, gain = metrics_file(ft, cmp)
    assert out["bleu"] == 30.0 and "base" not in out and "gain" not in out  # each number once
    assert gain == {"gain": {"bleu": 20.0, "rouge_l": -0.25, "ppl_reduction": 30.0}}
    other = dict(base, settings=dict(s, n_rows=5))
    assert compare(ft, other)["settings_mismatch"] == ["n_rows"]


def test_report_and_confusion_plot(tmp_path):
    preds = [{"id": f"p{i}", "prompt": f"q{i}", "reference": "ref | x", "prediction": f"a\n{i}",
              "bleu": float(i), "rouge_l": 0.1 * i, "f1": 0.0, "em": 0.0} for i in range(6)]
    best, worst = pick_examples(preds, 2)
    assert [r["id"] for r in best] == ["p5", "p4"] and [r["id"] for r in worst] == ["p0", "p1"]
    best, worst = pick_examples(preds, 4)  # never the same record twice
    assert [r["id"] for r in best] == ["p5", "p4", "p3", "p2"]
    assert [r["id"] for r in worst] == ["p0", "p1"]
    cmp = {"finetuned": {"bleu": 30.0, "perplexity": 20.0, "n_rows": 6, "n_labelled": 2,
                         "n_other": 1},
           "base": {"bleu": 10.0, "perplexity": 50.0}, "gain": {"bleu": 20.0, "ppl_reduction": 30.0}}
    conf = {"labels": ["neg", "正面"], "columns": ["neg", "正面", "<other>"],
            "matrix": [[1, 0, 0], [0, 0, 1]]}
    text = render_report(cmp, {"bleu_tokenize": "zh"}, preds, examples=2, confusion=conf,
                         confusion_png="plots/cm.png", base_predictions=preds)
    assert "| BLEU (0-100) | 10.0000 | 30.0000 | 20.0000 |" in text
    assert "| perplexity (lower is better) | 50.0000 | 20.0000 | 30.0000 (reduction) |" in text
    assert "ref \\| x" in text and "a<br>5" in text  # table cells escaped
    assert "| 正面 | 0 | 0 | 1 |" in text and "![confusion matrix](plots/cm.png)" in text
    assert text.index("### Best 2") < text.index("| p5 |") < text.index("### Worst 2")
    for name, c in (("a.png", conf), ("b.png", conf), ("none.png", None)):
        plot_confusion(c, tmp_path / name)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # stable bytes
    assert (tmp_path / "none.png").stat().st_size > 0


def _run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    stage = Path(__file__).resolve().parents[1] / "stages" / "evaluate.py"
    return subprocess.run([sys.executable, str(stage), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_evaluate_stage_base_then_finetuned(tmp_path, repo_root, tiny_base_dir, rows):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo_root / "data" / "reference", tmp_path / "data" / "reference")  # eval.general_text
    shutil.copytree(tiny_base_dir, tmp_path / "models" / "base")
    from reprotune.data.formatting import formatted_schema

    io.write_parquet(tmp_path / "data/processed/test.parquet", rows, schema=formatted_schema())
    res = _run_stage(tmp_path, "--kind", "base", "--model", "models/base")
    assert res.returncode == 0, res.stderr[-3000:]
    base = io.read_json(tmp_path / "metrics/eval_base.json")
    assert base["n_rows"] == 5 and base["settings"]["kind"] == "base"
    assert math.isfinite(base["perplexity"]) and "confusion" not in base
    assert len(io.read_jsonl(tmp_path / "data/eval/predictions_base.jsonl")) == 5

    # the same model saved as a "fine-tuned" full model: every gain must be exactly 0
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    save_finetuned(load_model(tiny_base_dir), load_tokenizer(tiny_base_dir),
                   tmp_path / "models/finetuned", method="full", base_dir="models/base",
                   enable_thinking=False)
    res = _run_stage(tmp_path, "--kind", "finetuned", "--base-metrics", "metrics/eval_base.json",
                     "--gain", "metrics/eval_gain.json",
                     "--base-predictions", "data/eval/predictions_base.jsonl",
                     "--report", "reports/eval.md", "--confusion", "metrics/plots/cm.png")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = io.read_json(tmp_path / "metrics/eval.json")
    gain = io.read_json(tmp_path / "metrics/eval_gain.json")["gain"]
    assert ev["bleu"] == base["bleu"] and "base" not in ev
    assert set(gain) >= {"bleu", "chrf", "rouge_l", "f1", "em", "accuracy", "ppl_reduction"}
    assert all(v == 0.0 for v in gain.values())
    assert "-0.0" not in (tmp_path / "metrics/eval_gain.json").read_text()
    assert ev["settings"]["kind"] == "finetuned" and ev["settings"]["method"] == "full"
    assert "settings_mismatch" not in ev
    assert (tmp_path / "metrics/plots/cm.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "reports/eval.md").read_text()
    assert "| metric | base | fine-tuned | gain | 95% CI of the gain | verdict |" in report
    assert "| BLEU (0-100) |" in report and "too few rows to tell |" in report
    intervals = io.read_json(tmp_path / "metrics/eval_gain.json")["intervals"]
    assert intervals["n_shared"] == 5 and intervals["resamples"] == 1000
    assert intervals["bleu"] == {"diff": 0.0, "low": 0.0, "high": 0.0,
                                 "verdict": "too few rows to tell"}
    assert "![confusion matrix](../metrics/plots/cm.png)" in report
    assert len(io.read_jsonl(tmp_path / "data/eval/predictions.jsonl")) == 5


@pytest.mark.slow
def test_alpaca_slice_ingest_format_evaluate(shared_dir, tiny_base_dir):
    """Real data end to end: alpaca_en_demo.json slice -> ingest -> format -> evaluate."""
    inputs = pytest.importorskip("reprotune.data.inputs")
    from reprotune.data.formatting import format_records
    from reprotune.modeling import load_model, load_tokenizer

    res = inputs.ingest_files([str(shared_dir / "data" / "alpaca_en_demo.json")])
    records = res.records[:40]
    tok, model = load_tokenizer(tiny_base_dir), load_model(tiny_base_dir)
    rows, stats, _ = format_records(records, tok, max_length=256, enable_thinking=False)
    assert stats["rows_in"] == 40 == stats["rows_out"] + stats["rows_dropped"]
    metrics, preds = evaluate_model(model, tok, rows, EvalParams(max_new_tokens=16, batch_size=8),
                                    enable_thinking=False, seed=0, source="alpaca_en_demo.json",
                                    progress=False)
    assert metrics["n_rows"] == len(rows) == len(preds)
    assert metrics["settings"]["bleu_tokenize"] == "13a" and "accuracy" not in metrics
    assert is_finite_metrics(metrics) and metrics["perplexity"] > 1
    assert [p["id"] for p in preds] == [r["id"] for r in rows]


def test_max_new_tokens_auto_is_p95_of_reference_lengths(lm, rows):
    from reprotune.evaluate.evaluation import resolve_max_new_tokens

    model, tok = lm
    refs = ["a " * n for n in range(1, 21)]  # 1..20 words
    lengths = sorted(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
    import numpy as np

    assert resolve_max_new_tokens("auto", tok, refs) == int(np.ceil(np.percentile(lengths, 95))) + 1
    assert resolve_max_new_tokens(7, tok, refs) == 7
    metrics, preds = evaluate_model(model, tok, rows, EvalParams(max_new_tokens="auto"),
                                    enable_thinking=False, seed=0, progress=False)
    want = resolve_max_new_tokens("auto", tok, [p["reference"] for p in preds])
    assert metrics["settings"]["max_new_tokens"] == want
    assert metrics["settings"]["max_new_tokens_setting"] == "auto"


def test_answers_cut_by_the_cap_are_counted_and_warned(lm, rows, caplog):
    model, tok = lm
    with caplog.at_level("WARNING", logger="reprotune.evaluate.evaluation"):
        metrics, preds = evaluate_model(model, tok, rows, EvalParams(max_new_tokens=1),
                                        enable_thinking=False, seed=0, progress=False)
    # the chatty random model never stops within one token
    assert metrics["n_capped_predictions"] == sum(p["capped"] for p in preds) == len(rows)
    assert metrics["capped_share"] == 1.0 and metrics["cap_warning"] is True
    assert "GENERATION CAP" in caplog.text and "eval.max_new_tokens=1" in caplog.text


def test_corrupt_weights_end_in_one_line_naming_the_model_folder(tmp_path, repo_root,
                                                                 tiny_base_dir, rows):
    """A changed byte keeps size and mtime (dvc status misses it): NaN weights must not
    crash in math.exp but say which folder is broken and how to restore it."""
    from conftest import set_nan_weight

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    model_dir = tmp_path / "models" / "base"
    shutil.copytree(tiny_base_dir, model_dir)
    set_nan_weight(model_dir)  # one float of the final norm
    from reprotune.data.formatting import formatted_schema

    io.write_parquet(tmp_path / "data/processed/test.parquet", rows, schema=formatted_schema())
    res = _run_stage(tmp_path, "--kind", "base", "--model", "models/base")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: models/base: mean loss over") and "not finite" in last
    assert "dvc checkout --relink --force models/base" in last
    assert "Traceback" not in res.stderr and "OverflowError" not in res.stderr


def test_no_negative_zero_in_metrics_files(tmp_path):
    ft = {"bleu": 0.3, "n_rows": 1, "settings": {}}
    base = {"bleu": 0.3000000001, "n_rows": 1, "settings": {}}  # round(-1e-10, 6) is -0.0
    gain = compare(ft, base)["gain"]
    assert str(gain["bleu"]) == "0.0"
    io.write_json(tmp_path / "m.json", {"a": -0.0, "b": [-0.0, 1.5], "c": {"d": -0.0}})
    assert "-0.0" not in (tmp_path / "m.json").read_text()
    with pytest.raises(ValueError):
        io.write_json(tmp_path / "n.json", {"x": float("nan")})
