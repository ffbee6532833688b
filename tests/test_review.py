"""`make report` (reprotune.team.review): row order and filtering on inline data, then a real
report of a toy experiment against main, with real git and DVC."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from toy_repos import make_exp_repo, run

from reprotune.evaluate.paired import compare_records
from reprotune.team.review import (
    changed_predictions,
    metric_rank,
    metric_rows,
    metrics_markdown,
    params_markdown,
    plot_files,
    predictions_markdown,
    significance_markdown,
    tasks_markdown,
)

DIFF = {
    "metrics/quantize.json": {"int8_dynamic.size_mb": {"old": 2.1, "new": 2.2, "diff": 0.1},
                              "int8_dynamic.perplexity": {"old": 2.0, "new": 2.5, "diff": 0.5}},
    "metrics/eval.json": {"bleu": {"old": 66.73, "new": 49.72, "diff": -17.01},
                          "gain.bleu": {"old": 66.73, "new": 49.72, "diff": -17.01},
                          "chrf": {"old": 70.0, "new": 60.0, "diff": -10.0},
                          "perplexity": {"old": 1.9, "new": 1.9, "diff": -0.0},
                          "settings.model": {"old": "a", "new": "a"}},
    "metrics/train.json": {"best_val_loss": {"old": 0.76, "new": 0.9, "diff": 0.14},
                           "train_time_s": {"old": 20.0, "new": 31.0, "diff": 11.0},
                           "tokens_per_s": {"old": 12000, "new": 9000, "diff": -3000},
                           "peak_memory_mb": {"old": 900, "new": 950, "diff": 50}},
}


@pytest.mark.parametrize(("path", "key", "rank"), [
    ("metrics/eval.json", "bleu", 0), ("metrics/train.json", "best_val_loss", 0),
    ("metrics/eval.json", "chrf", 1), ("metrics/quantize.json", "int8_dynamic.perplexity", 1),
    ("metrics/eval.json", "gain.bleu", 2), ("metrics/eval.json", "base.perplexity", 2),
    ("metrics/train.json", "train_time_s", 3), ("metrics/train.json", "tokens_per_s", 3),
    ("metrics/quantize.json", "bnb_nf4.size_mb", 3), ("metrics/merge.json", "size_mb", 3),
    ("metrics/quantize.json", "merged.load_s", 3), ("metrics/train.json", "peak_memory_mb", 3)])
def test_metric_rank(path: str, key: str, rank: int) -> None:
    assert metric_rank(path, key) == rank


def test_rows_quality_first_no_zero_rows_timing_hidden() -> None:
    rows, hidden = metric_rows(DIFF)
    assert [(p.split("/")[1], k) for p, k, _ in rows] == [
        ("train.json", "best_val_loss"), ("eval.json", "bleu"), ("eval.json", "chrf"),
        ("quantize.json", "int8_dynamic.perplexity"), ("eval.json", "gain.bleu")]
    assert hidden == 4  # size_mb, train_time_s, tokens_per_s, peak_memory_mb
    everything, none_hidden = metric_rows(DIFF, include_volatile=True)
    assert none_hidden == 0 and len(everything) == 9
    assert [k for _, k, _ in everything[-4:]] == ["int8_dynamic.size_mb", "peak_memory_mb",
                                                  "tokens_per_s", "train_time_s"]


def test_metrics_markdown() -> None:
    md = metrics_markdown(*metric_rows(DIFF))
    lines = md.splitlines()
    assert lines[0] == "| metric | file | old | new | change |"
    assert lines[2] == "| **best_val_loss** | `metrics/train.json` | 0.76 | 0.9 | 0.14 |"
    assert lines[3] == "| **bleu** | `metrics/eval.json` | 66.73 | 49.72 | -17.01 |"
    assert "-0.0" not in md and "4 timing/memory/size rows left out" in md
    assert metrics_markdown([], 0) == "No metrics changed."


def test_params_markdown() -> None:
    md = params_markdown({"params.yaml": {"lr": {"old": 0.001, "new": 0.0001},
                                          "lora.target_modules": {"old": ["q"], "new": ["q", "v"]},
                                          "seed": {"old": 42, "new": 42}}})
    assert md.splitlines()[2:] == ['| `lora.target_modules` | ["q"] | ["q", "v"] |',
                                   "| `lr` | 0.001 | 0.0001 |"]
    assert params_markdown({}) == "No params changed."


def test_changed_predictions_side_by_side() -> None:
    old = [{"id": "a", "prompt": "2+2?", "reference": "4", "prediction": "4"},
           {"id": "b", "prompt": "x | y\nz", "reference": "1", "prediction": "1"},
           {"id": "c", "prompt": "gone", "reference": "1", "prediction": "1"}]
    new = [{"id": "a", "prompt": "2+2?", "reference": "4", "prediction": "4"},
           {"id": "b", "prompt": "x | y\nz", "reference": "1", "prediction": "2"},
           {"id": "d", "prompt": "new row", "reference": "1", "prediction": "9"}]
    pairs = changed_predictions(old, new)
    assert [(o["prediction"], n["prediction"]) for o, n in pairs] == [("1", "2")]
    md = predictions_markdown(pairs, "main", len(pairs))
    # a pipe or newline inside a cell must not break the table
    assert md.splitlines()[-1] == "| b | x \\| y z | 1 | 1 | 2 |"
    assert predictions_markdown([], "main", 0) == "No prediction changed."


def test_significance_markdown_leads_with_real_changes() -> None:
    old = [{"id": str(i), "prompt": f"q{i}", "reference": f"答案 {i} 是 {i % 7}",
            "prediction": f"答案 {i} 是 {i % 7}"} for i in range(120)]
    new = [{**r, "prediction": ""} if i % 2 else r for i, r in enumerate(old[20:])]
    md = significance_markdown(compare_records(old, new), "main")
    lines = md.splitlines()
    assert lines[0].startswith("Paired bootstrap over the 100 test rows both revisions answered")
    assert "The test sets differ (120 rows at `main`, 100 now)" in lines[0]
    assert lines[2] == "| metric | `main` | this change | change | 95% CI | verdict |"
    assert lines[4].startswith("| **bleu** | 100 |") and lines[4].endswith("| **worse** |")
    assert all("**worse**" in ln for ln in lines[4:])
    same = significance_markdown(compare_records(old, old), "main")
    assert "| bleu | 100 | 100 | 0 | [0, 0] | no detectable change |" in same


def test_tasks_markdown_shows_one_task_gaining_and_another_losing() -> None:
    """A mixture after a weight change: English got better, Chinese worse; pooled, the two
    cancel out, per task both show (issue 32)."""
    ref = {"en": "the answer is {i}", "zh": "答案是 {i}"}
    old, new = [], []
    for i in range(40):
        for task, gained in (("en", True), ("zh", False)):
            r = {"id": f"{task}{i}", "task": task, "prompt": f"q{i}",
                 "reference": ref[task].format(i=i)}
            old.append({**r, "prediction": r["reference"] if not gained else "wrong"})
            new.append({**r, "prediction": r["reference"] if gained else "wrong"})
    md = tasks_markdown(old, new, "main")
    lines = md.splitlines()
    assert lines[2] == "| task | rows | metric | `main` | this change | change | 95% CI | verdict |"
    assert "| en | 40 | f1 | 0 | 1 | 1 | [1, 1] | **better** |" in lines
    assert "| zh | 40 | f1 | 1 | 0 | -1 | [-1, -1] | **worse** |" in lines
    pooled = significance_markdown(compare_records(old, new), "main")
    assert "| f1 | 0.5 | 0.5 | 0 | [-0.225, 0.225] | no detectable change |" in pooled
    untagged = [{k: v for k, v in r.items() if k != "task"} for r in new]
    assert tasks_markdown(old, untagged, "main") == ""  # no mixture: no section


def test_plot_files_from_the_project_dvc_yaml(repo_root: Path) -> None:
    files = plot_files(repo_root / "dvc.yaml")
    assert "metrics/plots/confusion.png" in files and "metrics/plots/token_lengths.png" in files
    assert "metrics/curves/plots/metrics/val_loss.tsv" in files
    assert "Loss curves" not in files


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_exp_repo(tmp_path_factory.mktemp("review") / "repo", {"high-lr": 3e-3})
    return repo


def _report(repo: Path, *args: str, ok: bool = True):
    return run([sys.executable, "-m", "reprotune.team.review", "--predictions", "out/predictions.jsonl",
                *args], repo, ok)


def test_report_of_an_experiment_against_main(exp_repo: Path) -> None:
    md = _report(exp_repo, "--rev", "main").stdout
    sections = md.split("### ")
    assert sections[0].startswith("## reprotune: this change vs `main`")
    noise, metrics, params, plots, preds = sections[1:]
    assert noise.startswith("What changed beyond noise\n\nPaired bootstrap over the 6 test rows")
    # six rows: every quality metric is listed, none with a verdict
    assert "| rouge_l | 1 | 0.6667 | -0.3333 |" in noise and "| better |" not in noise
    assert noise.count("too few rows to tell") == 7  # bleu chrf rouge1 rouge2 rouge_l f1 em
    assert metrics.splitlines()[2].startswith("<details><summary>")
    assert metrics.splitlines()[6] == "| **best_val_loss** | `metrics/train.json` | 0.5 | 0.7908 | 0.2908 |"
    assert "tokens_per_s" not in metrics and "1 timing/memory/size rows left out" in metrics
    assert "| `lr` | 0.001 | 0.003 |" in params
    assert "- `out/curve.tsv`" in plots
    # DVC-tracked predictions at main come from the cache: two turned wrong
    assert "2 predictions changed" in preds and "| 4 | q4 | a4 | a4 | wrong4 |" in preds


def test_report_against_a_missing_rev_is_one_line(exp_repo: Path) -> None:
    proc = _report(exp_repo, "--rev", "no-such-branch", ok=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "make report: revision 'no-such-branch' does not exist here: pass a branch, tag or "
        "commit (REV=main); in a shallow CI clone run `git fetch origin main` first"]
