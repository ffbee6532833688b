"""Training curves in DVC's plot layout, written without dvclive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reprotune.train.curves import CHECKPOINT_COPY, PLOTS, CurveWriter, restore, snapshot, trim


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


def test_a_checkpoint_carries_the_curves_a_resumed_run_continues(tmp_path: Path) -> None:
    """DVC deletes the (non-persisted) curves before a rerun: the checkpoint's copy returns them."""
    live, ckpt = tmp_path / "curves", tmp_path / "checkpoints" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    w = CurveWriter(live, resume=False)
    for step in (0, 5, 10):
        w.step = step
        w.log("val_loss", 9.0 - step)
    w.summary()
    snapshot(live, ckpt)
    w.step = 15
    w.log("val_loss", 0.25)  # logged after the checkpoint, then the run was killed
    shutil.rmtree(live)  # what `dvc repro` does to a non-persisted output
    restore(ckpt, live, 10)
    assert _rows(live, "val_loss") == ["step\tval_loss", "0\t9.0", "5\t4.0", "10\t-1.0"]
    assert json.loads((live / "metrics.json").read_text()) == {"val_loss": -1.0, "step": 10}
    # a checkpoint without a copy (written before copies existed): what is there, cut at 10
    old = tmp_path / "checkpoints" / "checkpoint-5"
    old.mkdir()
    w = CurveWriter(live, resume=True)
    w.step = 15
    w.log("val_loss", 0.5)
    restore(old, live, 10)
    assert _rows(live, "val_loss")[-1] == "10\t-1.0"
    snapshot(live, ckpt)  # a second snapshot of the same step replaces the first
    assert sorted(p.name for p in ckpt.iterdir()) == [CHECKPOINT_COPY]


def test_ensure_writes_header_only_curves_and_keeps_logged_ones(tmp_path: Path) -> None:
    """Curves dvc.yaml draws must exist even when nothing was logged (align's pass-through):
    `dvc plots show` reports a load error for a missing file."""
    live = CurveWriter(tmp_path / "c", resume=False)
    live.step = 3
    live.log("train_loss", 0.5)
    live.ensure(("train_loss", "val_loss"))
    plots = tmp_path / "c" / "plots" / "metrics"
    assert (plots / "val_loss.tsv").read_text() == "step\tval_loss\n"
    assert (plots / "train_loss.tsv").read_text() == "step\ttrain_loss\n3\t0.5\n"
    live.log("val_loss", 0.25)
    assert (plots / "val_loss.tsv").read_text() == "step\tval_loss\n3\t0.25\n"
