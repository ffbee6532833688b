"""`make exps` and `make exps-plot` (reprotune.team.exps): real `dvc exp run` on a toy project."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from toy_repos import make_exp_repo, run

from reprotune.team.exps import drop_pattern, keep_pattern, param_metric_points

PARAMS = {"method": "full", "lr": 0.001, "seed": 42, "train": {"patience": 4},
          "dedup": {"threshold": 0.85}}


def _kept(col: str) -> bool:
    return bool(re.match(keep_pattern(), col))


def _dropped(col: str) -> bool:
    return bool(re.match(drop_pattern(PARAMS), col))


@pytest.mark.parametrize("col", ["Experiment", "best_val_loss", "metrics/train.json:best_val_loss",
                                 "metrics/eval.json:bleu", "bleu", "rouge_l", "f1",
                                 "metrics/eval.json:perplexity", "accuracy"])
def test_headline_metrics_are_kept(col: str) -> None:
    assert _kept(col)


@pytest.mark.parametrize("col", ["gain.bleu", "base.f1", "macro_f1", "metrics/eval_base.json:bleu",
                                 "tokens_per_s", "metrics/quantize.json:accuracy", "rouge_l_x"])
def test_other_metrics_are_not_kept_but_dropped(col: str) -> None:
    assert not _kept(col) and _dropped(col)


@pytest.mark.parametrize(("col", "is_param"), [
    ("lr", True), ("params.yaml:method", True), ("train.patience", True),
    ("dedup.threshold", True), ("seed", True), ("lr_finder", False), ("training.x", False),
    ("data/raw", False), ("src/reprotune/io.py", False), ("metrics/train.json:method", False)])
def test_only_params_yaml_columns_survive_the_drop(col: str, is_param: bool) -> None:
    assert _dropped(col) is not is_param


SHOWN = [{"rev": "workspace", "name": None,
          "data": {"params": {"params.yaml": {"data": {"lr": 0.003, "train": {"patience": 4}}}},
                   "metrics": {"metrics/train.json": {"data": {"best_val_loss": 0.79}}}},
          "experiments": None},
         {"rev": "a" * 40, "name": "main",
          "data": {"params": {"params.yaml": {"data": {"lr": 0.001}}},
                   "metrics": {"metrics/train.json": {"data": {"best_val_loss": 0.5}}}},
          "experiments": [
              {"revs": [{"rev": "b" * 40, "name": "high-lr", "data": {
                  "params": {"params.yaml": {"data": {"lr": 0.003}}},
                  "metrics": {"metrics/train.json": {"data": {"best_val_loss": 0.79}}}}}]},
              {"revs": [{"rev": "c" * 40, "name": None, "data": {
                  "params": {"params.yaml": {"data": {"lr": 0.0001}}},
                  "metrics": {"metrics/train.json": {"data": {"best_val_loss": 0.9}}}}}]},
              {"revs": [{"rev": "d" * 40, "name": "failed", "data": {
                  "params": {"params.yaml": {"data": {"lr": 0.1}}}, "metrics": {}}}]}]}]


def test_param_metric_points_one_per_experiment() -> None:
    points = param_metric_points(SHOWN, "lr", "metrics/train.json:best_val_loss")
    # the workspace repeats high-lr and is left out; the failed run has no metric
    assert points == [{"experiment": "main", "lr": 0.001, "best_val_loss": 0.5},
                      {"experiment": "high-lr", "lr": 0.003, "best_val_loss": 0.79},
                      {"experiment": "ccccccc", "lr": 0.0001, "best_val_loss": 0.9}]
    # a bare metric key is looked up in every metrics file; a nested param by its dotted path
    assert param_metric_points(SHOWN, "lr", "best_val_loss") == points
    assert param_metric_points(SHOWN, "train.patience", "best_val_loss") == [
        {"experiment": "workspace", "train.patience": 4, "best_val_loss": 0.79}]


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_exp_repo(tmp_path_factory.mktemp("exps") / "repo",
                         {"low-lr": 1e-4, "high-lr": 3e-3})


def _exps(repo: Path, *args: str) -> str:
    return run([sys.executable, "-m", "reprotune.team.exps", *args], repo).stdout


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    return split(lines[0]), [split(ln) for ln in lines[2:]]


def test_exps_table_changed_params_and_headline_metrics_sorted(exp_repo: Path) -> None:
    header, rows = _table(_exps(exp_repo, "show", "--md"))
    assert header == ["Experiment", "Created", "best_val_loss", "metrics/eval.json:bleu", "rouge_l",
                      "metrics/eval.json:f1", "metrics/eval.json:perplexity", "accuracy", "lr"]
    by_name = {r[0].split("[")[-1].rstrip("]"): r for r in rows}
    assert by_name["low-lr"][header.index("lr")] == "0.0001"
    assert by_name["high-lr"][header.index("best_val_loss")] == "0.7908"
    # experiments of one baseline sorted by val loss, ascending
    assert [n for n in by_name if n.endswith("-lr")] == ["high-lr", "low-lr"]
    _, desc = _table(_exps(exp_repo, "show", "--md", "--sort-by", "metrics/eval.json:bleu",
                           "--sort-order", "desc"))
    assert [r[0].split("[")[-1].rstrip("]") for r in desc if r[0].endswith("-lr]")] == [
        "high-lr", "low-lr"]


def test_exps_plot_writes_points_and_an_offline_page(exp_repo: Path) -> None:
    run([sys.executable, "-m", "reprotune.team.exps", "plot"], exp_repo)
    out = exp_repo / "dvc_plots" / "exps"
    points = json.loads((out / "lr_vs_best_val_loss.json").read_text())
    assert {p["experiment"]: p["lr"] for p in points} == {"main": 0.001, "high-lr": 0.003,
                                                         "low-lr": 0.0001}
    page = (out / "index.html").read_text()
    assert "lr vs best_val_loss across experiments" in page
    assert '"type": "log"' in page and "cdn.jsdelivr" not in page
