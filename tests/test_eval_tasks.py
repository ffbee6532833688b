"""Per-task evaluation of a mixture (issue 32): each task's metrics, gains and paired intervals
beside the pooled ones (reprotune.evaluate.tasks)."""

from __future__ import annotations

import pytest

from reprotune.evaluate import metrics as M
from reprotune.evaluate import tasks
from reprotune.evaluate.comparison import compare, metrics_file
from reprotune.evaluate.evaluation import evaluate_model
from reprotune.params import EvalParams

SCORED = ("bleu", "chrf", "rouge1", "rouge2", "rouge_l", "f1", "em")


def _rec(i: int, task: str, pred: str, ref: str, **kw: object) -> dict:
    return {"id": f"{task}{i}", "task": task, "prediction": pred, "reference": ref,
            "capped": False, "label": None, **kw}


def test_task_metrics_score_each_task_on_its_own_rows() -> None:
    recs = [_rec(0, "en", "the sum is 5", "the sum is 5", nll=2.0, n_tokens=4),
            _rec(1, "en", "the sum is 7", "the sum is 7", nll=1.0, n_tokens=4),
            _rec(0, "zh", "", "答案是五", nll=6.0, n_tokens=2, capped=True),
            _rec(1, "zh", "答案是七", "答案是八", nll=2.0, n_tokens=2)]
    out = tasks.task_metrics(recs, tokenize="zh", classify=False)
    assert list(out) == ["en", "zh"]
    en, zh = out["en"], out["zh"]
    assert en["bleu"] == 100.0 and en["em"] == 1.0 and en["f1"] == 1.0 and en["rouge_l"] == 1.0
    assert en["n_rows"] == 2 and en["n_capped_predictions"] == 0
    assert en["perplexity"] == pytest.approx(1.454991, abs=1e-6)  # exp(3 nats / 8 tokens)
    assert en["nll"] == 0.375 and en["ppl_tokens"] == 8
    assert zh["em"] == 0.0 and zh["n_empty_predictions"] == 1 and zh["n_capped_predictions"] == 1
    assert zh["rouge_l"] == pytest.approx(M.rouge(["", "答案是七"], ["答案是五", "答案是八"])["rouge_l"],
                                          abs=1e-6)
    assert zh["bleu"] == pytest.approx(M.bleu_chrf(["", "答案是七"], ["答案是五", "答案是八"], "zh")["bleu"],
                                       abs=1e-6)
    assert zh["perplexity"] == pytest.approx(7.389056, abs=1e-6)  # exp(8 / 4)
    assert "accuracy" not in en
    assert tasks.task_metrics([{**r, "task": None} for r in recs], tokenize="zh",
                              classify=False) == {}


def test_task_metrics_classify_each_task_on_its_labels() -> None:
    recs = [_rec(0, "a", "positive", "positive", label="positive"),
            _rec(1, "a", "negative", "positive", label="positive"),
            _rec(0, "b", "yes", "yes", label="yes"), _rec(1, "b", "no", "no", label="no")]
    out = tasks.task_metrics(recs, tokenize="13a", classify=True)
    assert out["a"]["accuracy"] == 0.5 and out["b"]["accuracy"] == 1.0
    assert out["a"]["n_labelled"] == 2 and "perplexity" not in out["a"]


def _gains(n: int) -> tuple[list[dict], list[dict]]:
    """Base and fine-tuned predictions: the fine-tuned one right on task up, wrong on down."""
    base, ft = [], []
    for i in range(n):
        for task, good in (("up", True), ("down", False)):
            ref = f"answer number {i} for {task}"
            base.append({**_rec(i, task, ref if not good else "wrong", ref)})
            ft.append({**_rec(i, task, ref if good else "wrong", ref)})
    return base, ft


def test_per_task_intervals_show_one_task_gaining_and_another_losing() -> None:
    base, ft = _gains(40)
    iv = tasks.task_intervals(base, ft)
    assert sorted(iv) == ["down", "up"]
    assert iv["up"]["n_shared"] == iv["down"]["n_shared"] == 40
    assert iv["up"]["bleu"]["verdict"] == "better" and iv["down"]["bleu"]["verdict"] == "worse"
    assert iv["up"]["f1"]["diff"] == 1.0 and iv["down"]["f1"]["diff"] == -1.0
    # the same comparison as the pooled one, on each task's rows
    from reprotune.evaluate.paired import compare_records, intervals_file

    assert iv["up"] == intervals_file(compare_records([r for r in base if r["task"] == "up"],
                                                      [r for r in ft if r["task"] == "up"]))
    # the pooled comparison: the two cancel out
    pooled = intervals_file(compare_records(base, ft))
    assert pooled["f1"]["diff"] == 0.0 and pooled["f1"]["verdict"] == "no detectable change"
    assert tasks.task_intervals(base, [{**r, "task": None} for r in ft]) == {}


def test_gains_per_task_and_the_report_table() -> None:
    base, ft = _gains(40)
    bm = {"bleu": 0.0, "n_rows": 80, "tasks": tasks.task_metrics(base, tokenize="13a", classify=False)}
    fm = {"bleu": 0.0, "n_rows": 80, "tasks": tasks.task_metrics(ft, tokenize="13a", classify=False)}
    cmp = compare(fm, bm)
    assert cmp["tasks"]["up"]["f1"] == 1.0 and cmp["tasks"]["down"]["f1"] == -1.0
    assert cmp["gain"] == {"bleu": 0.0}
    out, gain = metrics_file(fm, cmp)
    assert out["tasks"] == fm["tasks"] and "tasks" not in gain  # the stage adds gain["tasks"]
    record = tasks.gain_record(cmp["tasks"], tasks.task_intervals(base, ft))
    assert record["up"]["gain"]["bleu"] == 100.0 and record["up"]["intervals"]["bleu"]["verdict"] == "better"
    md = tasks.report_section(fm, bm, record)
    assert "| up | 40 | bleu | 0.0000 | 100.0000 | 100.0000 | [+100.0000, +100.0000] | better |" in md
    assert "| down | 40 | f1 | 1.0000 | 0.0000 | -1.0000 | [-1.0000, -1.0000] | worse |" in md
    assert tasks.report_section({"bleu": 1.0}, {}, {}) == ""
    assert compare({"bleu": 1.0}, {"bleu": 0.5}).keys() == {"finetuned", "base", "gain"}


# --------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def lm_rows(tiny_base_dir):
    import torch

    from reprotune.data.formatting import format_records
    from reprotune.modeling import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_base_dir), load_model(tiny_base_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}],
             "tools": None, "label": label}
            for i, (q, a, label) in enumerate([
                ("What is 12 plus 7?", "The answer is 19.", None),
                ("计算 12 加 7 等于多少？", "答案是 19。", None),
                ("The movie was wonderful. Sentiment?", "positive", "positive"),
                ("这部电影很糟糕。情感？", "negative", "negative"),
                ("Translate 'apple' into Chinese", "苹果", None)])]
    rows, _, _ = format_records(recs, tok, max_length=256, enable_thinking=False)
    return model.eval(), tok, rows


def test_evaluate_model_adds_each_task_and_leaves_the_pooled_numbers_alone(lm_rows) -> None:
    model, tok, rows = lm_rows
    cfg = EvalParams(max_new_tokens=8, batch_size=2)
    plain, plain_recs = evaluate_model(model, tok, rows, cfg, enable_thinking=False, seed=0,
                                       progress=False)
    assert "tasks" not in plain and all("task" not in r for r in plain_recs)
    tagged = [{**r, "task": "en" if i in (0, 2, 4) else "zh"} for i, r in enumerate(rows)]
    mixed, recs = evaluate_model(model, tok, tagged, cfg, enable_thinking=False, seed=0,
                                 progress=False)
    per_task = mixed.pop("tasks")
    assert mixed == plain  # the pooled numbers are the existing computation, unchanged
    assert [r.pop("task") for r in recs] == ["en", "zh", "en", "zh", "en"] and recs == plain_recs
    assert per_task["en"]["n_rows"] == 3 and per_task["zh"]["n_rows"] == 2
    assert per_task["en"]["ppl_tokens"] + per_task["zh"]["ppl_tokens"] == plain["ppl_tokens"]
    assert per_task["en"]["n_labelled"] == per_task["zh"]["n_labelled"] == 1
    en = [r for i, r in enumerate(plain_recs) if i in (0, 2, 4)]
    bc = M.bleu_chrf([r["prediction"] for r in en], [r["reference"] for r in en],
                     plain["settings"]["bleu_tokenize"])  # the pooled run's tokenizer
    assert per_task["en"]["bleu"] == pytest.approx(bc["bleu"], abs=1e-6)
    # one task holding every row: its numbers are the pooled ones
    one, _ = evaluate_model(model, tok, [{**r, "task": "all"} for r in rows], cfg,
                            enable_thinking=False, seed=0, progress=False)
    for key in (*SCORED, "perplexity", "nll", "ppl_tokens", "accuracy", "macro_f1", "n_rows"):
        assert one["tasks"]["all"][key] == pytest.approx(plain[key], abs=2e-6), key
