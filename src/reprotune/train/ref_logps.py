"""The reference model's log-probs, computed once: the ``ref_logps`` stage's library.

DPO and KTO compare the policy with the SFT model on every example. For a full fine-tune
TRL computes the reference's log-probs once per run (``precompute_ref_log_probs``), yet
each align run, and so every point of a ``-S align.beta=...`` sweep, computed them again.
This stage computes them once per (SFT model, pairs, the params that shape them) and
align reads them back (:func:`load`), so a sweep over beta, loss_type or lr reuses them.

What the values depend on, and so the stage's DVC deps: the SFT model (``models/finetuned``,
its chat template and ``enable_thinking`` included), format's pair and unpaired files
(``format.max_length`` acts through them), ``align.method`` (dpo: one log-prob per answer
of a pair; kto: per example, plus its KL completion's), ``align.batch_size`` (the padded
batches they are computed in, and KTO's KL completions, rotated within a batch) and
``seed`` (KTO's order of examples), with ``align.precompute_ref`` deciding whether they
are used at all. Not beta, loss_type, lr or any other knob of the loss.

The values are TRL's own: the same trainer align builds (:func:`reprotune.train.
align_methods.build_trainer`) computes them in its constructor, and align hands them back
through that constructor's ``_precompute_ref_logps``, so a run with the cache equals a run
without it. Files: ``<split>.parquet`` (``key``: the example's row id, in TRL's order, and
TRL's columns, ``ref_chosen_logps``/``ref_rejected_logps`` or ``ref_logps``/``ref_KL_logps``)
and ``info.json`` (the fingerprint of the inputs, checked by align: a mismatch, e.g. align
run by hand on other pairs, recomputes and says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.params import AlignParams
from reprotune.train.training import sha256_file

log = logging.getLogger(__name__)

INFO = "info.json"
SPLITS = ("train", "val")
COLUMNS = {"dpo": ("ref_chosen_logps", "ref_rejected_logps"), "kto": ("ref_logps", "ref_KL_logps")}


def fingerprint(cfg: AlignParams, seed: int, paths: list[Path], finetuned: str | Path,
                device: str, precision: str) -> str:
    """sha256 over what the reference log-probs depend on (see the module docstring), the
    device kind and precision included (a GPU's bf16 values are not a CPU's)."""
    finetuned = Path(finetuned)
    payload = {"method": cfg.method, "batch_size": cfg.batch_size, "seed": seed,
               "device": device.split(":")[0], "precision": precision,
               "files": {p.name: sha256_file(p) for p in paths},
               "sft": {str(p.relative_to(finetuned)): sha256_file(p)
                       for p in sorted(finetuned.rglob("*")) if p.is_file()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load(folder: str | Path, expected: str) -> dict[str, Any] | None:
    """``{split: pyarrow.Table}`` of the cached log-probs when ``folder`` holds them for
    the inputs of fingerprint ``expected``; None otherwise (align computes them itself)."""
    import pyarrow.parquet as pq

    info_file = Path(folder) / INFO
    if not info_file.is_file():
        return None
    info = io.read_json(info_file)
    if not info.get("computed"):
        return None
    if info["fingerprint"] != expected:
        log.warning("%s was computed from other inputs (the SFT model, pairs, align.method, "
                    "align.batch_size, seed or device differ): align computes the reference "
                    "log-probs itself; `dvc repro ref_logps` refreshes the cache", folder)
        return None
    return {s: pq.read_table(Path(folder) / f"{s}.parquet") for s in SPLITS
            if (Path(folder) / f"{s}.parquet").is_file()}


def skipped(out_dir: str | Path, cfg: AlignParams, kind: str | None) -> dict[str, Any]:
    """Only ``info.json`` (``computed: false``): align would not precompute the reference
    log-probs (method none, orpo, simpo, ``align.precompute_ref: false``, an adapter)."""
    info = {"computed": False, "method": cfg.method, "precompute_ref": cfg.precompute_ref,
            "sft_kind": kind, "why": "align.method none" if kind is None else
            "the method is reference-free, the SFT model an adapter (its reference is the "
            "frozen adapter copy) or align.precompute_ref is false"}
    with io.atomic_dir(out_dir) as tmp:
        io.write_json(tmp / INFO, info)
    return info


def write(out_dir: str | Path, trainer: Any, cfg: AlignParams, fingerprint_: str,
          device: str, precision: str, seed: int) -> dict[str, Any]:
    """Write the reference log-probs ``trainer`` (built with precompute on) computed in its
    constructor: one Parquet file per split (``key`` + TRL's columns), and ``info.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = {"computed": True, "method": cfg.method, "batch_size": cfg.batch_size, "seed": seed,
            "device": device.split(":")[0], "precision": precision, "fingerprint": fingerprint_,
            "columns": list(COLUMNS[cfg.method]), "rows": {}}
    with io.atomic_dir(out_dir) as tmp:
        for split, ds in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
            if ds is None:
                continue
            cols = ds.select_columns(list(COLUMNS[cfg.method])).data.table.combine_chunks()
            table = pa.table({"key": trainer.reprotune_keys[split],
                              **{c: cols.column(c) for c in COLUMNS[cfg.method]}})
            pq.write_table(table, tmp / f"{split}.parquet", compression="zstd")
            info["rows"][split] = table.num_rows
        io.write_json(tmp / INFO, info)
    return info
