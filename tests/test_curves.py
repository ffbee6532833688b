"""Training curves in DVC's plot layout, written without dvclive."""

from __future__ import annotations

import json
from pathlib import Path

from reprotune.train.curves import PLOTS, CurveWriter, trim


def _rows(d: Path, name: str) -> list[str]:
    return (d / PLOTS / f"{name}.tsv").read_text().splitlines()


def test_writes_dvc_plot_layout(tmp_path: Path) -> None:
    w = CurveWriter(tmp_path, resume=False)
    for step, loss in ((1, 7.5), (5, 3.25)):
        w.step = step
        w.log("train_loss", loss)
    w.log("val_loss", 3.5)
    w.summary()
    assert _rows(tmp_path, "train_loss") == ["step\ttrain_loss", "1\t7.5", "5\t3.25"]
    assert _rows(tmp_path, "val_loss") == ["step\tval_loss", "5\t3.5"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "train_loss": 3.25, "val_loss": 3.5, "step": 5}


def test_resume_appends_after_trim_and_a_fresh_run_starts_empty(tmp_path: Path) -> None:
    w = CurveWriter(tmp_path, resume=False)
    for step in (1, 5, 10, 15):
        w.step = step
        w.log("train_loss", float(step))
    w.summary()
    with (tmp_path / PLOTS / "train_loss.tsv").open("a") as fh:
        fh.write("20\t")  # a row cut short by SIGKILL
    trim(tmp_path, 10)
    assert _rows(tmp_path, "train_loss") == ["step\ttrain_loss", "1\t1.0", "5\t5.0", "10\t10.0"]
    w = CurveWriter(tmp_path, resume=True)
    w.step = 15
    w.log("train_loss", 0.5)
    assert _rows(tmp_path, "train_loss")[-2:] == ["10\t10.0", "15\t0.5"]
    CurveWriter(tmp_path, resume=False)
    assert not list((tmp_path / PLOTS).glob("*.tsv")) and not (tmp_path / "metrics.json").exists()
