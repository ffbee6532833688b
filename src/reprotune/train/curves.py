"""Step-indexed training curves in DVC's plot layout, without dvclive.

``<dir>/plots/metrics/<name>.tsv`` (``step<TAB><name>`` rows) and ``<dir>/metrics.json`` (the
latest value of each curve and the step): the files dvclive writes and ``dvc plots``
draws, written here directly. dvclive would import all of DVC into the training process,
which a GPU machine without DVC cannot do; the layout is all the pipeline needs from it.

The curves are an ordinary (not ``persist``) DVC output, so DVC deletes them before a rerun
and can restore the whole stage from its run cache. What a resumed run needs survives in the
untracked checkpoint folder instead: each checkpoint carries a copy of the curves as they
were at its step (:func:`snapshot`), and a resumed run starts from that copy
(:func:`restore`) and appends to it; a fresh run starts them empty.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reprotune import io

PLOTS = Path("plots") / "metrics"
SUMMARY = "metrics.json"
CHECKPOINT_COPY = "reprotune_curves"  # in each checkpoint folder: the curves at its step


def trim(live_dir: str | Path, last_step: int) -> None:
    """Drop curve rows logged after ``last_step`` (by a run killed after its last checkpoint)."""
    for tsv in (Path(live_dir) / PLOTS).rglob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        header = lines[0].split("\t")
        col = header.index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if _step(ln, len(header), col) <= last_step]
        with io.atomic_path(tsv) as tmp:
            tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")


def snapshot(live_dir: str | Path, checkpoint: str | Path) -> None:
    """Copy the curves into ``checkpoint`` (before it is marked complete)."""
    src, dst = Path(live_dir), Path(checkpoint) / CHECKPOINT_COPY
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        tmp.mkdir(parents=True)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def restore(checkpoint: str | Path, live_dir: str | Path, last_step: int) -> None:
    """The curves of a run resumed from ``checkpoint``: its copy when it has one (DVC deleted
    ``live_dir`` before the rerun), else what ``live_dir`` holds, cut at ``last_step``."""
    copy, live = Path(checkpoint) / CHECKPOINT_COPY, Path(live_dir)
    if copy.is_dir():
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(copy, live)
    trim(live, last_step)


def _step(line: str, width: int, col: int) -> float:
    """The step of a row; a row cut short by a kill mid-write counts as past every step."""
    cells = line.split("\t")
    try:
        return int(cells[col]) if len(cells) == width and cells[-1] else float("inf")
    except ValueError:
        return float("inf")


class CurveWriter:
    """Appends ``(step, value)`` rows per curve; :meth:`summary` rewrites metrics.json."""

    def __init__(self, live_dir: str | Path, *, resume: bool) -> None:
        self.dir = Path(live_dir)
        self.step = 0
        self._latest: dict[str, float] = {}
        if not resume:  # a fresh run: no rows of an earlier run may survive
            for old in (self.dir / PLOTS).glob("*.tsv"):
                old.unlink()
            (self.dir / SUMMARY).unlink(missing_ok=True)
        elif (self.dir / SUMMARY).is_file():
            self._latest = {k: v for k, v in io.read_json(self.dir / SUMMARY).items() if k != "step"}
        (self.dir / PLOTS).mkdir(parents=True, exist_ok=True)

    def log(self, name: str, value: float) -> None:
        """One row of curve ``name`` at the current :attr:`step`."""
        path = self.dir / PLOTS / f"{name}.tsv"
        new = not path.is_file()
        with path.open("a", encoding="utf-8", newline="\n") as fh:
            if new:
                fh.write(f"step\t{name}\n")
            fh.write(f"{self.step}\t{float(value)}\n")
        self._latest[name] = float(value)

    def ensure(self, names: tuple[str, ...]) -> None:
        """A header-only file for each curve in ``names`` nothing was logged to: the curves
        dvc.yaml draws must exist, or `dvc plots show` reports a load error for them."""
        for name in names:
            path = self.dir / PLOTS / f"{name}.tsv"
            if not path.is_file():
                path.write_text(f"step\t{name}\n", encoding="utf-8", newline="\n")

    def summary(self) -> None:
        """metrics.json: the latest value of every curve, and the step it was logged at."""
        with io.atomic_path(self.dir / SUMMARY) as tmp:
            tmp.write_text(json.dumps({**self._latest, "step": self.step}, indent=4) + "\n",
                           encoding="utf-8")
