"""Timings and other machine-dependent figures, kept out of the tracked metrics.

Tokens/s, wall time, load time, speed-ups, peak memory and thread counts differ on every
run. In a DVC-tracked metrics file they would change ``dvc.lock`` and ``dvc metrics diff``
on every rerun of the same code and params, so stages split them off with
:func:`split_timing` and write them to ``metrics/timing/<stage>.json``: git-ignored and not
declared in dvc.yaml, so a rerun leaves ``git status`` clean while the figures are still
there to read after each run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.cpu_kernels import machine

TIMING_DIR = Path("metrics/timing")
TIMING_KEYS = frozenset({
    "tokens_per_s", "tokens_per_s_steady", "train_time_s", "step_time_s", "wall_time_s",
    "peak_memory_mb", "peak_memory_kind",
    "torch_threads", "load_s", "speedup", "rows_per_s", "elapsed_s",
})


def split_timing(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(deterministic, timing)``: the timing keys of ``metrics`` (nested dicts included)
    moved to a dict of the same shape; ``metrics`` itself is not modified."""
    kept: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in TIMING_KEYS:
            timing[key] = value
        elif isinstance(value, dict):
            sub_kept, sub_timing = split_timing(value)
            kept[key] = sub_kept
            if sub_timing:
                timing[key] = sub_timing
        else:
            kept[key] = value
    return kept, timing


def write_timing(stage: str, timing: dict[str, Any], directory: str | Path = TIMING_DIR) -> Path:
    """Write ``<directory>/<stage>.json`` with a wall-clock stamp; returns its path."""
    path = Path(directory) / f"{stage}.json"
    io.write_json(path, {"stage": stage, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "machine": machine(), **timing})
    return path
