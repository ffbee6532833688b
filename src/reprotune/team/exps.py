"""Readable experiment tables and a params-vs-metric plot across experiments.

``dvc exp show`` prints every param, metric and dependency (hundreds of columns) and always
puts the params after the metrics. ``show`` (``make exps``) reads ``dvc exp show --json``
and prints what a person compares, in this order: the params that differ between the rows
shown (``lr`` first when it differs), then the headline metrics (val loss, the main eval
metric - accuracy for a classification test set, else BLEU - and its gain over the base),
sorted by the objective. The workspace and HEAD with its experiments are shown by default;
``-A`` (all commits) or ``-n N`` (the last N commits) bring older baselines back.
``plot`` (``make exps-plot``) draws one param against one metric for the same rows with
``dvc plots show`` (offline HTML template).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune import scorecard
from reprotune.scorecard import lookup
from reprotune.team import staleness

log = logging.getLogger(__name__)

TRAIN_METRICS = "metrics/train.json"
EVAL_METRICS = "metrics/eval.json"
GAIN_METRICS = "metrics/eval_gain.json"
OBJECTIVE = f"{TRAIN_METRICS}:best_val_loss"
# (metrics file, key): val loss, BLEU, ROUGE-L, token F1, perplexity, accuracy. DVC names a
# column by its key alone when no other file has that key, else "file:key"; both match.
HEADLINE = [(TRAIN_METRICS, "best_val_loss"), (EVAL_METRICS, "bleu"), (EVAL_METRICS, "rouge_l"),
            (EVAL_METRICS, "f1"), (EVAL_METRICS, "perplexity"), (EVAL_METRICS, "accuracy")]
LOG_X_TEMPLATE = "plots/templates/scatter_logx.json"
FIRST_PARAMS = ("lr", "method", "batch_size", "epochs")  # shown first when they differ
STALE = "(stale)"
STALE_NOTE = (f"{STALE}: the experiment did not rerun the stage that writes this value "
              "(dvc exp run <target> stopped before it); it is its baseline's")


@dataclass(frozen=True)
class ExpRow:
    """One row of ``dvc exp show --json``: the workspace, a commit or an experiment."""

    label: str     # experiment name, "workspace", or the commit's branch/short sha
    rev: str       # full sha, or "workspace"
    kind: str      # workspace | commit | experiment
    baseline: str  # label of the commit the row belongs to (its own label for a commit)
    params: dict[str, Any]   # params.yaml as that revision has it
    metrics: dict[str, Any]  # {metrics file: its data}
    state: str = "success"   # an experiment's run: success, or queued / running / failed
    stale: frozenset[str] = frozenset()  # outputs of stages that did not rerun (staleness.py)


def _label(rev: dict[str, Any]) -> str:
    return rev.get("name") or (rev["rev"] if rev["rev"] == "workspace" else rev["rev"][:7])


def _row(rev: dict[str, Any], kind: str, baseline: str) -> ExpRow:
    data = rev.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = {f: (v or {}).get("data") or {} for f, v in (data.get("metrics") or {}).items()}
    label = _label(rev)
    return ExpRow(label, rev["rev"], kind, baseline if kind == "experiment" else label,
                  params, metrics)


def rows(shown: list[dict[str, Any]]) -> list[ExpRow]:
    """Every revision of ``dvc exp show --json`` (workspace, commits, their experiments)."""
    out: list[ExpRow] = []
    for commit in shown:
        kind = "workspace" if commit["rev"] == "workspace" else "commit"
        base = _row(commit, kind, "")
        out.append(base)
        for exp in commit.get("experiments") or []:
            # a queued, running or failed run is listed too, with the workspace's files
            state = (exp.get("executor") or {}).get("state") or "success"
            out.extend(dataclasses.replace(_row(rev, "experiment", base.label), state=state)
                       for rev in exp.get("revs") or [])
    head = next((r.label for r in out if r.kind == "commit"), "")
    # the workspace is based on HEAD, the first commit shown
    return [dataclasses.replace(r, baseline=head) if r.kind == "workspace" else r for r in out]


def metric(row: ExpRow, name: str) -> Any:
    """Value of ``[file:]dotted.key`` in the row's metrics (a bare key: any file).

    A stage's full record (``metrics/train.json``) is a cached output, not a DVC metric:
    its compared keys are read from its scorecard (``metrics/scorecard/train.json``).
    """
    path, _, key = name.rpartition(":")
    if path and path not in row.metrics:
        path = scorecard.path_for(path).as_posix()
    for f in [path] if path else list(row.metrics):
        value = lookup(row.metrics.get(f) or {}, key)
        if value is not None:
            return value
    return None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def flatten(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; lists are leaves."""
    for k, v in params.items():
        if isinstance(v, dict) and v:
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def changed_params(shown: list[ExpRow]) -> list[str]:
    """Dotted params.yaml keys whose value is not the same in every row, ``lr`` etc. first."""
    values: dict[str, list[Any]] = {}
    for r in shown:
        for key, _ in flatten(r.params):
            values.setdefault(key, [])
    for r in shown:
        flat = dict(flatten(r.params))
        for key in values:
            values[key].append(json.dumps(flat.get(key), sort_keys=True))
    keys = [k for k, vs in values.items() if len(set(vs)) > 1]
    return sorted(keys, key=lambda k: (FIRST_PARAMS.index(k) if k in FIRST_PARAMS else
                                       len(FIRST_PARAMS), keys.index(k)))


def main_eval_metric(shown: list[ExpRow]) -> str:
    """accuracy when a row was evaluated on a labelled (classification) test set, else bleu."""
    cls = any(lookup(r.metrics.get(EVAL_METRICS) or {}, "settings.classification")
              # the eval scorecard has accuracy only for a labelled test set
              or lookup(r.metrics.get(scorecard.path_for(EVAL_METRICS).as_posix()) or {},
                        "accuracy") is not None for r in shown)
    return "accuracy" if cls else "bleu"


def metric_columns(shown: list[ExpRow], sort_by: str = OBJECTIVE) -> list[tuple[str, str]]:
    """(column title, ``file:key``) of the headline metrics, plus ``sort_by`` if not one."""
    main = main_eval_metric(shown)
    cols = [("best_val_loss", OBJECTIVE), (main, f"{EVAL_METRICS}:{main}"),
            (f"{main}_gain", f"{GAIN_METRICS}:gain.{main}")]
    if sort_by not in {name for _, name in cols}:
        cols.append((sort_by.rpartition(":")[2], sort_by))
    return cols


def table(shown: list[ExpRow], sort_by: str = OBJECTIVE, order: str = "asc"
          ) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): Experiment, [baseline], changed params, headline metrics, sorted.

    Rows with no value for ``sort_by`` (failed runs, commits without metrics) come last.
    """
    params = changed_params(shown)
    metric_cols = metric_columns(shown, sort_by)
    baselines = len({r.baseline for r in shown}) > 1
    header = ["Experiment", *(["Baseline"] if baselines else []), *params,
              *(col for col, _ in metric_cols)]
    sign = -1 if order == "desc" else 1

    def key(r: ExpRow) -> tuple[int, float]:
        v = metric(r, sort_by)
        return (0, sign * v) if _number(v) and not math.isnan(v) else (1, 0.0)

    declared = {f for r in shown for f in r.metrics}

    def value(r: ExpRow, name: str) -> Any:
        v = metric(r, name)
        file = _declared(name, declared).rpartition(":")[0]
        # the stage that writes it did not rerun in this experiment: the baseline's value
        return f"{_cell(v)} {STALE}" if v is not None and file in r.stale else v

    body = []
    for r in sorted(shown, key=key):
        flat = dict(flatten(r.params))
        body.append([r.label, *([r.baseline] if baselines else []), *(flat.get(p) for p in params),
                     *(value(r, name) for _, name in metric_cols)])
    return header, body


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}".rstrip("0").rstrip(".")
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def render(header: list[str], body: list[list[Any]], markdown: bool = False) -> str:
    """An aligned text table, or a Markdown one."""
    cells = [header, *([_cell(v) for v in r] for r in body)]
    if markdown:
        lines = [f"| {' | '.join(r)} |" for r in cells]
        return "\n".join([lines[0], f"|{'|'.join('---' for _ in header)}|", *lines[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def scope_args(all_commits: bool = False, num: int = 0) -> list[str]:
    """``dvc exp show`` flags for which baselines are shown (HEAD only by default)."""
    return ["-A"] if all_commits else (["-n", str(num)] if num > 1 else [])


def show_json(scope: list[str] | None = None) -> list[ExpRow]:
    """``dvc exp show --json`` (with ``scope`` flags) as rows."""
    proc = _dvc("exp", "show", "--json", *(scope or []), capture=True)
    if proc.returncode != 0:
        raise SystemExit(f"dvc exp show failed: {proc.stderr.strip().splitlines()[-1:]}")
    return [dataclasses.replace(r, stale=frozenset(staleness.stale_outputs(
        staleness.lock_at(r.rev)))) for r in rows(json.loads(proc.stdout))]


def show_command(shown: list[ExpRow], sort_by: str, order: str) -> str:
    """The ``dvc exp show`` call that keeps the same columns (DVC puts metrics first)."""
    cols = [re.escape(p) for p in changed_params(shown)]
    declared = {f for r in shown for f in r.metrics}
    for _, name in metric_columns(shown, sort_by):
        path, _, key = _declared(name, declared).rpartition(":")
        # DVC names a column by its key alone, or file:key when several files have the key
        cols.append(f"({re.escape(path)}:)?{re.escape(key)}")
    return (f"dvc exp show --only-changed --drop '.*' --keep '(Experiment|{'|'.join(cols)})$' "
            f"--sort-by '{_declared(sort_by, declared)}' --sort-order {order}")


def _declared(name: str, declared: set[str]) -> str:
    """``file:key`` as DVC names it: a full record's key is in its scorecard."""
    path, _, key = name.rpartition(":")
    if path and path not in declared:
        return f"{scorecard.path_for(path).as_posix()}:{key}"
    return name


def param_metric_points(shown: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """One {experiment, x, y} point per revision of ``dvc exp show --json`` having both values.

    ``x`` is a params.yaml key (``lr``, ``dedup.threshold``), ``y`` a metric as
    ``file:key`` (or a key found in any metrics file). Repeated revisions appear once.
    """
    points: list[dict[str, Any]] = []
    for r in rows(shown):
        xv, yv = lookup(r.params, x.rpartition(":")[2]), metric(r, y)
        if _number(xv) and _number(yv) and r.label not in {p["experiment"] for p in points}:
            points.append({"experiment": r.label, _field(x): xv, _field(y): yv})
    # the workspace repeats the last experiment run or applied: keep it only when it differs
    others = {(p[_field(x)], p[_field(y)]) for p in points if p["experiment"] != "workspace"}
    return [p for p in points
            if p["experiment"] != "workspace" or (p[_field(x)], p[_field(y)]) not in others]


def _field(name: str) -> str:
    return name.rpartition(":")[2]


def _dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], text=True,
                          capture_output=capture, check=False)


def plot(x: str, y: str, out: Path, scope: list[str] | None = None) -> Path | None:
    """Write the points as JSON under ``out`` and render them with ``dvc plots show``."""
    proc = _dvc("exp", "show", "--json", *(scope or []), capture=True)
    if proc.returncode != 0:
        raise SystemExit(f"make exps-plot: dvc exp show failed: {proc.stderr.strip()}")
    points = param_metric_points(json.loads(proc.stdout), x, y)
    if not points:
        print(f"make exps-plot: no experiment has both {x} and {y}; run some first, e.g. "
              f"dvc exp run -S lr=1e-4", file=sys.stderr)
        return None
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{_field(x)}_vs_{_field(y)}.json".replace("/", "_")
    data.write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
    # lr-like params span decades: a log x axis when every x is positive
    log_x = all(p[_field(x)] > 0 for p in points) and Path(LOG_X_TEMPLATE).is_file()
    args = ["plots", "show", str(data), "-x", _field(x), "-y", _field(y), "-o", str(out),
            "--template", LOG_X_TEMPLATE if log_x else "scatter",
            "--title", f"{_field(x)} vs {_field(y)} across experiments"]
    if _dvc(*args).returncode != 0:
        raise SystemExit("make exps-plot: dvc plots show failed (see above)")
    log.info("%d experiments plotted", len(points))
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.exps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_show = sub.add_parser("show", help="changed params + headline metrics, sorted")
    p_show.add_argument("--sort-by", default=OBJECTIVE)
    p_show.add_argument("--sort-order", default="asc", choices=["asc", "desc"])
    p_show.add_argument("--md", action="store_true", help="Markdown table")
    p_show.add_argument("--print-command", action="store_true",
                        help="print the dvc exp show call with the same columns, do not run")
    p_plot = sub.add_parser("plot", help="one param against one metric across experiments")
    p_plot.add_argument("--x", default="lr")
    p_plot.add_argument("--y", default=OBJECTIVE)
    p_plot.add_argument("--out", type=Path, default=Path("dvc_plots/exps"))
    for p in (p_show, p_plot):
        p.add_argument("-A", "--all-commits", action="store_true",
                       help="every commit's baseline and experiments")
        p.add_argument("-n", "--num", type=int, default=0,
                       help="the last N commits of the branch and their experiments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scope = scope_args(args.all_commits, args.num)
    if args.command == "plot":
        return 0 if plot(args.x, args.y, args.out, scope) else 1
    shown = show_json(scope)
    if args.print_command:
        print(show_command(shown, args.sort_by, args.sort_order) + "".join(f" {a}" for a in scope))
        return 0
    header, body = table(shown, args.sort_by, args.sort_order)
    print(render(header, body, markdown=args.md))
    if any(isinstance(v, str) and v.endswith(STALE) for r in body for v in r):
        print(f"\n{STALE_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
