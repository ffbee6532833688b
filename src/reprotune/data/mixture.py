"""Multi-task data mixtures: which task each input's rows belong to, and the weighted train mix.

``ingest.mixture.tasks`` names, per task, the files of ``ingest.inputs`` that hold its rows
and a weight. With tasks configured, the ``ingest`` stage writes every record with a
``task`` field (:func:`tag_part`; the text is never touched) and counts rows per task
(:func:`task_counts`); the split stratifies by it and evaluation reports each task apart.
Without tasks nothing changes: no record carries the field and no metric gains a key.

The weights apply to the **train split only**, in the ``format`` stage, before rendering:
resampling earlier would put copies of a row on both sides of the split (leakage) or have
dedup remove them, and val/test keep their natural rows so evaluation stays unbiased.

``strategy: concat`` keeps every train row once, in file order. ``strategy: interleave``
(:func:`sample_order`) keeps the number of train rows ``N`` and gives task ``t`` (``n_t``
rows, weight ``w_t``) ``k_t`` rows: the largest-remainder apportionment of
``N * w_t / sum(w)`` (the remainders' ties go to the task name first in sorted order). A task
with ``k_t >= n_t`` has every row ``k_t // n_t`` times plus ``k_t % n_t`` distinct rows once
more (oversampling, with repetition); one with ``k_t < n_t`` keeps ``k_t`` distinct rows
(undersampling, without repetition). Which rows, and their order within the task, come from
a generator seeded with ``(ingest.mixture.seed, task name)``, so a task's draw does not
depend on the other tasks. The tasks are then interleaved evenly: the ``j``-th row of task
``t`` goes to position key ``(j + 0.5) / k_t`` (ties: task name), so every stretch of the
file holds the tasks in their weighted shares.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from reprotune import io

logger = logging.getLogger(__name__)

TASK_FIELD = "task"  # the record field that names a row's task (absent without a mixture)
STRATEGIES = ("concat", "interleave")


class MixtureError(ValueError):
    """The mixture cannot be made from this data; the message names the task and the fix."""


def input_tasks(tasks: Mapping[str, Any]) -> dict[str, str]:
    """``{input path: task name}`` of ``ingest.mixture.tasks`` (values with ``inputs``)."""
    return {path: name for name, task in tasks.items() for path in task.inputs}


def tag_part(src: str | Path, fh: BinaryIO, task: str) -> int:
    """Copy the records of a read part to ``fh`` with ``task`` added as their last field;
    returns how many. Every other field is written back exactly as read."""
    n = 0
    for rec in io.iter_jsonl(src):
        rec[TASK_FIELD] = task
        fh.write(io.jsonl_line(rec).encode("utf-8"))
        n += 1
    return n


def task_counts(files: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Any]
                ) -> dict[str, dict[str, Any]]:
    """Per task, from ingest's per-file counts: its inputs, ``rows_in``, ``kept`` and
    ``rejected_total`` (``rows_in = kept + rejected_total``)."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(tasks):
        paths = list(tasks[name].inputs)
        buckets = [files.get(p, {"rows_in": 0, "kept": 0}) for p in paths]
        rows_in, kept = sum(b["rows_in"] for b in buckets), sum(b["kept"] for b in buckets)
        out[name] = {"inputs": paths, "rows_in": rows_in, "kept": kept,
                     "rejected_total": rows_in - kept}
    return out


def check_task_rows(per_task: Mapping[str, Mapping[str, Any]]) -> None:
    """:class:`MixtureError` naming the first task that kept no row."""
    for name, c in per_task.items():
        if c["kept"] == 0:
            raise MixtureError(
                f"ingest.mixture.tasks.{name}: its inputs ({', '.join(c['inputs'])}) kept no "
                f"row of {c['rows_in']} (see data/interim/rejected.jsonl); fix them or remove "
                f"the task")


def line_tasks(path: str | Path) -> list[str | None]:
    """The ``task`` of every record of a JSONL file, in order (None where it has none)."""
    return [rec.get(TASK_FIELD) for rec in io.iter_jsonl(path)]


def targets(sizes: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, int]:
    """Rows per task: the largest-remainder apportionment of ``sum(sizes)`` by ``weights``."""
    total, wsum = sum(sizes.values()), math.fsum(weights[t] for t in sizes)
    quotas = {t: total * weights[t] / wsum for t in sorted(sizes)}
    out = {t: math.floor(q) for t, q in quotas.items()}
    left = total - sum(out.values())
    for t in sorted(quotas, key=lambda t: (-(quotas[t] - out[t]), t))[:left]:
        out[t] += 1
    return out


def _rng(seed: int, task: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{task}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``rows``: each ``k // n`` times plus ``k % n`` distinct ones, shuffled."""
    repeats, extra = divmod(k, len(rows))
    picked = np.concatenate([np.tile(rows, repeats), rows[np.sort(rng.permutation(len(rows))[:extra])]])
    return picked[rng.permutation(len(picked))]


def sample_order(tasks: Sequence[str | None], weights: Mapping[str, float], *,
                 strategy: str, seed: int) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """The train rows to write, as positions into ``tasks`` (each row's task), and the
    counts per task: ``{weight, rows, sampled, repeated, left_out, share}`` with
    ``sampled = rows - left_out + repeated``. See the module docstring for the rule."""
    if strategy not in STRATEGIES:
        raise ValueError(f"ingest.mixture.strategy: {strategy!r} is not one of {STRATEGIES}")
    missing = sum(t is None for t in tasks)
    if missing:
        raise MixtureError(f"{missing} of {len(tasks)} train rows carry no task: the split "
                           f"predates ingest.mixture.tasks; rerun `dvc repro` from ingest")
    sizes = Counter(tasks)
    unknown = sorted(set(sizes) - set(weights))
    if unknown:
        raise MixtureError(f"train rows of task {unknown[0]!r}, which ingest.mixture.tasks does "
                           f"not name; rerun `dvc repro` from ingest")
    for name in sorted(set(weights) - set(sizes)):
        if strategy == "interleave":
            raise MixtureError(f"ingest.mixture.tasks.{name}: no train rows to sample (weight "
                               f"{weights[name]:g}); give it more rows or remove the task")
    if strategy == "concat":
        order = list(range(len(tasks)))
        want = dict(sizes)
    else:
        want = targets(sizes, weights)
        by_task = {t: np.flatnonzero(np.asarray([x == t for x in tasks])) for t in sizes}
        keyed = []
        for t in sorted(sizes):
            drawn = _draw(by_task[t], want[t], _rng(seed, t)) if want[t] else []
            keyed += [((j + 0.5) / want[t], t, int(i)) for j, i in enumerate(drawn)]
        order = [i for _, _, i in sorted(keyed)]
    total = max(1, len(order))
    counts = {}
    for t in sorted(sizes):
        n, k = sizes[t], want[t]
        counts[t] = {"weight": weights[t], "rows": n, "sampled": k, "repeated": max(0, k - n),
                     "left_out": max(0, n - k), "share": round(k / total, 6)}
        if k == 0:
            logger.warning("ingest.mixture.tasks.%s: weight %g gives it no train row of %d",
                           t, weights[t], len(tasks))
    return order, counts


def write_lines(src: str | Path, order: Sequence[int], dst: str | Path) -> int:
    """The non-blank lines of ``src`` at positions ``order`` (repeats allowed), byte for
    byte, written atomically to ``dst``; returns the lines written."""
    offsets = []
    with open(src, "rb") as fh:
        pos = 0
        for line in fh:
            if line.strip():
                offsets.append((pos, len(line)))
            pos += len(line)
    with open(src, "rb") as fh, io.atomic_path(dst) as tmp, tmp.open("wb") as out:
        for i in order:
            fh.seek(offsets[i][0])
            line = fh.read(offsets[i][1])
            out.write(line if line.endswith(b"\n") else line + b"\n")
    return len(order)


def mix_train(datas: Mapping[str, str | Path], mix: Any, scratch: str | Path
              ) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """The split files the format stage renders, and the ``mixture`` block of
    metrics/format.json (None, and ``datas`` as given, when neither the data nor the params
    hold a task). ``mix`` is ``ingest.mixture``; with ``interleave`` the sampled train lines
    are written to ``scratch/train.jsonl`` (:func:`sample_order`, :func:`write_lines`).
    Val and test are never resampled."""
    out = {name: Path(path) for name, path in datas.items()}
    per_split = {name: line_tasks(path) for name, path in out.items()}
    if not mix.tasks and all(t is None for ts in per_split.values() for t in ts):
        return out, None
    weights = {name: task.weight for name, task in mix.tasks.items()}
    order, counts = sample_order(per_split["train"], weights, strategy=mix.strategy,
                                 seed=mix.seed)
    if mix.strategy == "interleave":
        out["train"] = Path(scratch) / "train.jsonl"
        write_lines(datas["train"], order, out["train"])
    rows_in = {name: dict(sorted(Counter(map(str, ts)).items())) for name, ts in per_split.items()}
    rows_in["train"] = {t: c["sampled"] for t, c in counts.items()}
    block = {"strategy": mix.strategy, "seed": mix.seed, "train": counts, "rows_in": rows_in}
    for t, c in counts.items():
        logger.info("task %s: %d train rows, %d after sampling (weight %g: %d repeated, %d "
                    "left out)", t, c["rows"], c["sampled"], c["weight"], c["repeated"],
                    c["left_out"])
    return out, block


def parquet_tasks(path: str | Path) -> dict[str, int]:
    """Rows per task of a formatted Parquet file ({} when it has no task column)."""
    import pyarrow.parquet as pq

    if TASK_FIELD not in pq.read_schema(path).names:
        return {}
    col = pq.read_table(path, columns=[TASK_FIELD]).column(TASK_FIELD).to_pylist()
    return dict(sorted(Counter(col).items()))
