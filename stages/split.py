"""DVC stage `split`: train/val/test split of the deduplicated records (seeded or by time) + leakage check.

It runs before base and format, so the embedded tokenizer is trained on the train split only
and ``format.max_length: auto`` is resolved from train lengths: no val/test text shapes the
model's inputs. Each split is written as the redacted file's own lines, byte for byte.

Memory: one pass keeps per row only the fields the split reads (id, source, the
``split.stratify`` / ``split.group`` fields, and ``meta`` when ``split.order_by`` is set);
the conversation texts of the leakage check go to a file on disk as they are read. A second
pass copies each line to its split's file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io, runtime, scorecard
from reprotune.data import SPLITS
from reprotune.data.leakage import conversation_text
from reprotune.data.mixture import TASK_FIELD
from reprotune.data.spill import DiskTexts
from reprotune.data.split import SplitError, check_fields, split_rows
from reprotune.params import load_section


def read_rows(src: str, cfg: Any) -> tuple[list[dict[str, Any]], DiskTexts, list[int]]:
    """The fields the split reads of every record of ``src`` but those ``split.exclude_ids``
    names (with a mixture's ``task``), their conversation texts, and the positions (in
    ``src``) of the excluded ones."""
    wanted = {"id", "source", cfg.stratify, cfg.group, TASK_FIELD} - {None}
    if cfg.order_by:
        wanted.add("meta")
    exclude = set(cfg.exclude_ids)
    rows: list[dict[str, Any]] = []
    texts = DiskTexts()
    keys: set[str] = set()
    excluded: list[int] = []
    for pos, rec in enumerate(io.iter_jsonl(src)):
        if rec.get("id") in exclude:
            excluded.append(pos)
            continue
        keys.update(rec)
        rows.append({k: rec[k] for k in wanted if k in rec})
        texts.append(conversation_text(rec))
    check_fields(keys, stratify=cfg.stratify, group=cfg.group)
    return rows, texts, excluded


def write_parts(src: str, out_dir: str, indices: dict[str, list[int]], n_rows: int,
                excluded: Sequence[int] = ()) -> None:
    """Each split's lines of ``src``, in input order and byte for byte, as
    ``<out_dir>/<split>.jsonl`` (rows the leakage check dropped and the ``excluded``
    positions of ``src`` go nowhere; ``indices`` count the other rows)."""
    dest = np.full(n_rows, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        dest[indices[name]] = k
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(io.atomic_path(Path(out_dir) / f"{n}.jsonl")).open("wb")
                for n in SPLITS]
        for fh in outs:
            stack.callback(fh.close)  # closed before atomic_path renames (LIFO)
        skip = set(excluded)
        with open(src, "rb") as fh:
            pos = row = 0
            for line in fh:
                if not line.strip():
                    continue  # io.iter_jsonl skips blank lines too: row numbers agree
                if pos in skip:
                    pos += 1
                    continue
                k = int(dest[row])
                if k >= 0:
                    outs[k].write(line if line.endswith(b"\n") else line + b"\n")
                row += 1
                pos += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/interim/redacted.jsonl")
    ap.add_argument("--out-dir", default="data/interim/splits")
    ap.add_argument("--metrics", default="metrics/split.json")
    ap.add_argument("--leaks", default="metrics/split_leakage.json")
    args = ap.parse_args()

    log = runtime.setup("split")
    cfg = load_section("split")
    io.clean_stale_temporaries(args.out_dir, args.metrics, args.leaks)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    try:
        rows, texts, excluded = read_rows(args.data, cfg)
        result = split_rows(rows, texts=texts, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                            stratify=cfg.stratify, group=cfg.group, seed=cfg.seed,
                            leakage_threshold=cfg.leakage_threshold, order_by=cfg.order_by,
                            on_leak=cfg.on_leak, progress=sys.stderr.isatty())
    except SplitError as exc:
        if exc.leaks:  # on_leak: fail: the rows to review
            io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                                       "count": len(exc.leaks), "rows": exc.leaks})
        sys.exit(f"split: {args.data}: {exc}")
    except OSError as exc:  # no input: the stage before it has not run
        sys.exit(f"split: cannot read {args.data}: {exc.strerror or exc} (run `dvc repro "
                 f"redact` first)")
    except ValueError as exc:  # a line of the input is not JSON (io.iter_jsonl names it)
        sys.exit(f"split: {exc}")
    n_rows = len(rows)
    del rows, texts
    write_parts(args.data, args.out_dir, result.indices, n_rows, excluded)
    if cfg.exclude_ids:  # rows in = split rows + excluded; ids that matched nothing named
        missing = len(cfg.exclude_ids) - len(excluded)
        result.metrics["excluded"] = {"ids": len(cfg.exclude_ids), "rows": len(excluded),
                                      "ids_not_found": missing}
        log.info("split.exclude_ids: %d rows left out (%d ids matched no row of %s)",
                 len(excluded), missing, args.data)
    io.write_json(args.metrics, result.metrics)
    scorecard.write(args.metrics, result.metrics)
    # every leaking row (ids, split, best match, similarity; text excerpts for the first ones)
    io.write_json(args.leaks, {"threshold": cfg.leakage_threshold, "on_leak": cfg.on_leak,
                               "count": len(result.leaks), "rows": result.leaks})
    log.info("wrote %s", ", ".join(f"{k}={v}" for k, v in result.metrics["counts"].items()))


if __name__ == "__main__":
    main()
