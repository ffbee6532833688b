"""Pull-request review: what a change did, as Markdown (``make report REV=main``).

Compares the workspace against ``REV``. It leads with what changed beyond noise: every
quality metric of the predictions at ``REV`` and now, recomputed from their per-row
statistics on the rows both answered (paired by id), with the difference, its 95% paired-
bootstrap interval and a verdict; for a mixture, the same per task (one task may gain
while another loses). Then, collapsed, ``dvc metrics diff`` (quality rows
first; timing, memory and size rows, different on every machine, left out unless
``--all``; unchanged rows and ``-0.0`` differences never appear), ``dvc params diff``, the
plot files and a few predictions whose text changed, side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reprotune.evaluate.paired import compare_records
from reprotune.evaluate.tasks import TABLE_METRICS, compare_by_task
from reprotune.team.exps import HEADLINE

log = logging.getLogger(__name__)

PREDICTIONS = "data/eval/predictions.jsonl"
HEADLINE_KEYS = {key for _, key in HEADLINE}
# Machine-dependent numbers: wall time, throughput, memory, sizes.
VOLATILE = re.compile(r"(^|[._])(time|seconds|duration|latency|load_s|wall|tokens_per_s|"
                      r"per_s|memory|rss|mb|bytes|size|compression)([._]|$)|_s$|_mb$")
COMPARISON = re.compile(r"(^|\.)(base|gain)\.")
TINY = 1e-9  # |change| below this is float noise (a "-0.0" row), not a change


class ReviewError(RuntimeError):
    """A user error that ends `make report` with one line saying what to do."""


def metric_rank(path: str, key: str) -> int:
    """Sort group of one metric row: 0 headline, 1 other quality, 2 comparison, 3 volatile."""
    if VOLATILE.search(key):
        return 3
    if COMPARISON.search(key):
        return 2
    leaf = key.rsplit(".", 1)[-1]
    return 0 if leaf in HEADLINE_KEYS and "." not in key else 1


def _changed(entry: dict[str, Any]) -> bool:
    old, new, diff = entry.get("old"), entry.get("new"), entry.get("diff")
    if isinstance(diff, int | float):
        return abs(diff) > TINY
    return old != new


def metric_rows(diff: dict[str, dict[str, dict[str, Any]]],
                include_volatile: bool = False) -> tuple[list[tuple[str, str, dict[str, Any]]], int]:
    """(path, key, {old, new, diff}) rows worth reviewing, ordered; and how many were hidden."""
    rows, hidden = [], 0
    for path, metrics in diff.items():
        for key, entry in metrics.items():
            if not _changed(entry):
                continue
            if metric_rank(path, key) == 3 and not include_volatile:
                hidden += 1
                continue
            rows.append((path, key, entry))
    order = [key for _, key in HEADLINE]  # headline rows in the order the README lists them
    rows.sort(key=lambda r: (metric_rank(r[0], r[1]),
                             order.index(r[1]) if metric_rank(r[0], r[1]) == 0 else 0, r[0], r[1]))
    return rows, hidden


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return _cell(json.dumps(value) if isinstance(value, list | dict) else str(value))


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())  # newlines would end the table row
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def params_markdown(diff: dict[str, dict[str, dict[str, Any]]]) -> str:
    """`dvc params diff --json` as a Markdown table (or a line saying nothing changed)."""
    rows = [f"| `{key}` | {_fmt(e.get('old'))} | {_fmt(e.get('new'))} |"
            for path, params in diff.items() for key, e in sorted(params.items())
            if e.get("old") != e.get("new")]
    if not rows:
        return "No params changed."
    return "\n".join(["| param | old | new |", "|---|---|---|", *rows])


def metrics_markdown(rows: list[tuple[str, str, dict[str, Any]]], hidden: int) -> str:
    """Metric rows as a Markdown table, with a note on the hidden timing/size rows."""
    lines = ["| metric | file | old | new | change |", "|---|---|---|---|---|"]
    lines += [f"| **{key}** | `{path}` | {_fmt(e.get('old'))} | {_fmt(e.get('new'))} | "
              f"{_fmt(e.get('diff'))} |" if metric_rank(path, key) == 0 else
              f"| {key} | `{path}` | {_fmt(e.get('old'))} | {_fmt(e.get('new'))} | "
              f"{_fmt(e.get('diff'))} |" for path, key, e in rows]
    text = "\n".join(lines) if rows else "No metrics changed."
    if hidden:
        text += (f"\n\n{hidden} timing/memory/size rows left out (they differ on every machine; "
                 "`python -m reprotune.team.review --all` shows them).")
    return text


def changed_predictions(old: list[dict[str, Any]], new: list[dict[str, Any]],
                        limit: int = 5) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Up to ``limit`` (old, new) prediction pairs, matched by id, whose prediction differs."""
    before = {str(r.get("id")): r for r in old}
    pairs = [(before[str(r.get("id"))], r) for r in new
             if str(r.get("id")) in before and before[str(r.get("id"))].get("prediction")
             != r.get("prediction")]
    return pairs[:limit]


def predictions_markdown(pairs: list[tuple[dict[str, Any], dict[str, Any]]], rev: str,
                         total_changed: int) -> str:
    """Changed predictions side by side: prompt, reference, prediction at rev and now."""
    if not pairs:
        return "No prediction changed."
    lines = [f"{total_changed} predictions changed; the first {len(pairs)}:", "",
             f"| id | prompt | reference | `{rev}` | this change |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(str(n.get('id')), 16)} | {_cell(n.get('prompt', ''), 80)} | "
              f"{_cell(n.get('reference', ''), 60)} | {_cell(o.get('prediction', ''), 60)} | "
              f"{_cell(n.get('prediction', ''), 60)} |" for o, n in pairs]
    return "\n".join(lines)


def significance_markdown(cmp: dict[str, Any], rev: str) -> str:
    """The headline table of :func:`reprotune.evaluate.paired.compare_records` (``a`` = the
    predictions at ``rev``, ``b`` = now): real changes first, then the rest."""
    if not cmp["metrics"]:
        return (f"No row id is in both prediction files ({cmp['n_a']} at `{rev}`, "
                f"{cmp['n_b']} now): nothing to compare.")
    order = {"better": 0, "worse": 0, "no detectable change": 1, "too few rows to tell": 2}
    rows = sorted(cmp["metrics"].items(), key=lambda kv: order.get(kv[1]["verdict"], 3))
    lines = [f"| metric | `{rev}` | this change | change | 95% CI | verdict |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        ci = "—" if m["low"] is None else f"[{_fmt(m['low'])}, {_fmt(m['high'])}]"
        bold = "**" if m["verdict"] in ("better", "worse") else ""
        lines.append(f"| {bold}{name}{bold} | {_fmt(m['a'])} | {_fmt(m['b'])} | "
                     f"{_fmt(m['diff'])} | {ci} | {bold}{m['verdict']}{bold} |")
    shared = cmp["n_shared"]
    note = (f"Paired bootstrap over the {shared} test rows both revisions answered "
            f"({cmp['resamples']} resamples, seed {cmp['seed']}; BLEU/chrF from sacrebleu's "
            f"sufficient statistics; classification on {cmp['n_labelled']} labelled rows).")
    if shared < max(cmp["n_a"], cmp["n_b"]):
        note += (f" The test sets differ ({cmp['n_a']} rows at `{rev}`, {cmp['n_b']} now): "
                 f"only the shared rows are compared.")
    return note + "\n\n" + "\n".join(lines)


def tasks_markdown(old: list[dict[str, Any]], new: list[dict[str, Any]], rev: str) -> str:
    """Per task of a mixture (the predictions' ``task``): the main metrics at ``rev`` and
    now on that task's rows, with the paired interval and verdict ('' without tasks), so a
    task that gained and one that lost both show."""
    per_task = compare_by_task(old, new)
    if not per_task:
        return ""
    lines = [f"| task | rows | metric | `{rev}` | this change | change | 95% CI | verdict |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for task, cmp in per_task.items():
        for name in TABLE_METRICS:
            if name not in cmp["metrics"]:
                continue
            m = cmp["metrics"][name]
            ci = "—" if m["low"] is None else f"[{_fmt(m['low'])}, {_fmt(m['high'])}]"
            bold = "**" if m["verdict"] in ("better", "worse") else ""
            lines.append(f"| {_cell(task, 40)} | {m['n']} | {name} | {_fmt(m['a'])} | "
                         f"{_fmt(m['b'])} | {_fmt(m['diff'])} | {ci} | "
                         f"{bold}{m['verdict']}{bold} |")
    return ("Each task of the mixture on its own test rows (paired bootstrap per task, as "
            "above; a verdict needs 30 rows of the task).\n\n" + "\n".join(lines))


def plot_files(dvc_yaml: Path) -> list[str]:
    """Plot data files named in dvc.yaml: stage ``plots:`` outs and top-level plot sources."""
    spec = YAML(typ="safe", pure=True).load(dvc_yaml.read_text(encoding="utf-8")) or {}
    found: list[str] = []
    for stage in (spec.get("stages") or {}).values():
        for out in stage.get("plots") or []:
            found.extend(out if isinstance(out, dict) else [out])
    for plot in spec.get("plots") or []:
        pid, props = next(iter(plot.items())) if isinstance(plot, dict) else (plot, {})
        y = (props or {}).get("y")
        found.extend(y if isinstance(y, dict) else [pid])
    return sorted({f for f in found if Path(f).suffix})


def _dvc_json(*args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ReviewError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout or "{}")


def _read_at(path: str, rev: str | None) -> bytes | None:
    """Bytes of ``path`` at ``rev`` (git or DVC tracked; None: the workspace), None if absent."""
    if rev is None:
        return Path(path).read_bytes() if Path(path).is_file() else None
    import dvc.api

    try:
        return dvc.api.read(path, repo=".", rev=rev, mode="rb")
    except Exception as exc:  # noqa: BLE001 - absent at rev, or its object is in no cache/remote
        log.debug("%s at %s: %s", path, rev, exc)
        return None


def _jsonl(data: bytes | None) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (data or b"").decode("utf-8").splitlines() if ln.strip()]


def check_rev(rev: str) -> None:
    """Raise ReviewError when ``rev`` names no commit."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReviewError(f"revision '{rev}' does not exist here: pass a branch, tag or commit "
                          "(REV=main); in a shallow CI clone run `git fetch origin main` first")


def build_report(rev: str, predictions: str = PREDICTIONS, examples: int = 5,
                 include_volatile: bool = False) -> str:
    """The whole Markdown report of the workspace against ``rev``."""
    check_rev(rev)
    rows, hidden = metric_rows(_dvc_json("metrics", "diff", rev), include_volatile)
    changed_plots = [f for f in plot_files(Path("dvc.yaml")) if _read_at(f, rev) != _read_at(f, None)]
    old_raw, new_raw = _read_at(predictions, rev), _read_at(predictions, None)
    if old_raw is None or new_raw is None:
        where = f"at `{rev}`" if old_raw is None else "in the workspace"
        # dvc.api.read already tried the local cache and the default remote
        preds_md = (f"`{predictions}` is not available {where}: push it from where it was "
                    "built (`make push`), or run `dvc repro` here, then `make report` again.")
        noise_md = preds_md
    else:
        old_preds, new_preds = _jsonl(old_raw), _jsonl(new_raw)
        try:
            noise_md = significance_markdown(compare_records(old_preds, new_preds), rev)
            if per_task := tasks_markdown(old_preds, new_preds, rev):
                noise_md += "\n\n#### Per task\n\n" + per_task
        except ValueError as exc:
            raise ReviewError(f"{predictions}: {exc}") from None
        changed = changed_predictions(old_preds, new_preds, limit=len(new_preds))
        preds_md = predictions_markdown(changed[:examples], rev, len(changed))
    plots_md = ("\n".join(f"- `{f}`" for f in changed_plots) + f"\n\n`dvc plots diff {rev}` draws "
                "them side by side." if changed_plots else "No plot changed.")
    return "\n\n".join([
        f"## reprotune: this change vs `{rev}`",
        "### What changed beyond noise", noise_md,
        "### Metrics",
        "<details><summary>Every changed number of the metrics files (dvc metrics diff; "
        "no intervals)</summary>\n\n" + metrics_markdown(rows, hidden) + "\n\n</details>",
        "### Params", params_markdown(_dvc_json("params", "diff", rev)),
        "### Plots", plots_md,
        "### Predictions", preds_md,
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.review", description=__doc__)
    parser.add_argument("--rev", default="main", help="compare the workspace against this rev")
    parser.add_argument("--predictions", default=PREDICTIONS)
    parser.add_argument("--examples", type=int, default=5, help="changed predictions to show")
    parser.add_argument("--all", action="store_true", help="keep timing/memory/size rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        sys.stdout.write(build_report(args.rev, args.predictions, args.examples, args.all))
    except ReviewError as exc:
        print(f"make report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
