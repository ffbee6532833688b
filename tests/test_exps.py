"""`make exps` and `make exps-plot` (reprotune.team.exps): real `dvc exp run` on a toy project."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from toy_repos import dvc, make_exp_repo, run

from reprotune.team.exps import changed_params, param_metric_points, render, rows, table

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


def _cls_row(rev: str, name: str, lr: float, loss: float | None, acc: float) -> dict:
    metrics = {"metrics/eval.json": {"data": {"accuracy": acc, "bleu": 10.0,
                                              "settings": {"classification": True}}},
               "metrics/eval_gain.json": {"data": {"gain": {"accuracy": acc - 0.5}}}}
    if loss is not None:
        metrics["metrics/train.json"] = {"data": {"best_val_loss": loss}}
    return {"rev": rev, "name": name, "data": {"metrics": metrics, "params": {"params.yaml": {
        "data": {"method": "full", "seed": 42, "train": {"patience": 4, "eval_steps": 5},
                 "lr": lr}}}}}


def test_table_changed_params_lr_first_then_val_loss_accuracy_and_gain() -> None:
    head = _cls_row("a" * 40, "main", 0.001, 0.5, 0.8)
    exps = [_cls_row("b" * 40, "big", 0.003, 0.4, 0.9), _cls_row("c" * 40, "broken", 0.1, None, 0.1)]
    exps[0]["data"]["params"]["params.yaml"]["data"]["train"]["patience"] = 2
    shown = [{**head, "experiments": [{"revs": [e]} for e in exps]}]
    assert [r.kind for r in rows(shown)] == ["commit", "experiment", "experiment"]
    assert changed_params(rows(shown)) == ["lr", "train.patience"]
    header, body = table(rows(shown))
    assert header == ["Experiment", "lr", "train.patience", "best_val_loss", "accuracy",
                      "accuracy_gain"]
    assert body == [["big", 0.003, 2, 0.4, 0.9, 0.4], ["main", 0.001, 4, 0.5, 0.8, 0.30000000000000004],
                    ["broken", 0.1, 4, None, 0.1, -0.4]]  # no val loss: last
    _, desc = table(rows(shown), "metrics/eval.json:accuracy", "desc")
    assert [r[0] for r in desc] == ["big", "main", "broken"]
    # a sort key outside the headline metrics gets its own column
    assert table(rows(shown), "metrics/eval.json:bleu")[0][-1] == "bleu"
    md = render(header, body, markdown=True).splitlines()
    assert md[0] == "| Experiment | lr | train.patience | best_val_loss | accuracy | accuracy_gain |"
    assert md[2] == "| big | 0.003 | 2 | 0.4 | 0.9 | 0.4 |" and md[4].startswith("| broken | 0.1 | 4 | - |")
    assert render(header, body).splitlines()[1].split() == ["big", "0.003", "2", "0.4", "0.9", "0.4"]


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


def _names(rows_: list[list[str]]) -> list[str]:
    return [r[0] for r in rows_]


def test_exps_table_changed_params_first_then_headline_metrics_sorted(exp_repo: Path) -> None:
    header, body = _table(_exps(exp_repo, "show", "--md"))
    # lr is the param that differs; the toy's test set has no labels: BLEU is the eval metric
    assert header == ["Experiment", "lr", "best_val_loss", "bleu", "bleu_gain"]
    by_name = {r[0]: r for r in body}
    assert by_name["low-lr"][1] == "0.0001" and by_name["high-lr"][2] == "0.7908"
    assert by_name["main"][1:3] == ["0.001", "0.5"]
    # sorted by val loss, ascending (the workspace repeats high-lr, the last one run)
    assert [n for n in _names(body) if n != "workspace"] == ["main", "high-lr", "low-lr"]
    _, desc = _table(_exps(exp_repo, "show", "--md", "--sort-by", "metrics/eval.json:bleu",
                           "--sort-order", "desc"))
    assert [n for n in _names(desc) if n != "workspace"] == ["main", "high-lr", "low-lr"]
    text = _exps(exp_repo, "show").splitlines()
    assert text[0].split() == header and len(text) == 1 + len(body)
    command = _exps(exp_repo, "show", "--print-command")
    assert command.startswith("dvc exp show --only-changed --drop '.*' --keep '(Experiment|lr|")
    # the printed dvc command runs and keeps lr and the val loss
    shown = dvc(exp_repo, "exp", "show", "--no-pager", "--only-changed", "--drop", ".*",
                "--keep", "(Experiment|lr|best_val_loss)$", "--md").stdout
    assert _table(shown)[0] == ["Experiment", "best_val_loss", "lr"]


def test_older_baselines_come_back_on_request(exp_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(exp_repo, repo)
    dvc(repo, "exp", "apply", "main")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace(
        "lr: 0.001", "lr: 0.002"))
    dvc(repo, "repro", "-q")
    run(["git", "commit", "-qam", "new baseline"], repo)
    _, now = _table(_exps(repo, "show", "--md"))
    assert "low-lr" not in _names(now)  # the old baseline's experiments are not HEAD's
    header, every = _table(_exps(repo, "show", "--md", "-A"))
    assert header[:3] == ["Experiment", "Baseline", "lr"]
    assert {"low-lr", "high-lr"} <= set(_names(every))
    base = {r[0]: r[1] for r in every}
    assert base["low-lr"] == base["high-lr"] != base[_names(now)[0] if _names(now)[0] != "workspace"
                                                     else _names(now)[1]]
    _, last2 = _table(_exps(repo, "show", "--md", "-n", "2"))
    assert {"low-lr", "high-lr"} <= set(_names(last2))
    run([sys.executable, "-m", "reprotune.team.exps", "plot", "-A"], repo)
    points = json.loads((repo / "dvc_plots" / "exps" / "lr_vs_best_val_loss.json").read_text())
    assert sorted(p["lr"] for p in points) == [0.0001, 0.001, 0.002, 0.003]


def test_exps_plot_writes_points_and_an_offline_page(exp_repo: Path) -> None:
    run([sys.executable, "-m", "reprotune.team.exps", "plot"], exp_repo)
    out = exp_repo / "dvc_plots" / "exps"
    points = json.loads((out / "lr_vs_best_val_loss.json").read_text())
    assert {p["experiment"]: p["lr"] for p in points} == {"main": 0.001, "high-lr": 0.003,
                                                         "low-lr": 0.0001}
    page = (out / "index.html").read_text()
    assert "lr vs best_val_loss across experiments" in page
    assert '"type": "log"' in page and "cdn.jsdelivr" not in page
