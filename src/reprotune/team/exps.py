"""Readable experiment tables and a params-vs-metric plot across experiments.

``dvc exp show`` prints every param, metric and dependency: hundreds of columns. ``show``
(``make exps``) runs it with ``--only-changed`` and keeps only what a person compares: the
params that differ between experiments and the headline metrics, sorted by one of them.
``plot`` (``make exps-plot``) collects one param and one metric per experiment from
``dvc exp show --json`` and draws them with ``dvc plots show`` (offline HTML template).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

log = logging.getLogger(__name__)

TRAIN_METRICS = "metrics/train.json"
EVAL_METRICS = "metrics/eval.json"
# (metrics file, key): val loss, BLEU, ROUGE-L, token F1, perplexity, accuracy. DVC names a
# column by its key alone when no other file has that key, else "file:key"; both match.
HEADLINE = [(TRAIN_METRICS, "best_val_loss"), (EVAL_METRICS, "bleu"), (EVAL_METRICS, "rouge_l"),
            (EVAL_METRICS, "f1"), (EVAL_METRICS, "perplexity"), (EVAL_METRICS, "accuracy")]
LOG_X_TEMPLATE = "plots/templates/scatter_logx.json"


def keep_pattern(headline: list[tuple[str, str]] = HEADLINE) -> str:
    """``--keep`` regex: the row label, its date and the headline metric columns."""
    cols = [f"({re.escape(path)}:)?{re.escape(key)}$" for path, key in headline]
    return "|".join(["Experiment$", "Created$", *cols])


def drop_pattern(params: dict[str, Any]) -> str:
    """``--drop`` regex: every column that is not a params.yaml key (metrics, deps).

    Columns are matched from their start (``re.match``); a top-level section ``train`` owns
    ``train.<key>`` columns, a top-level value ``lr`` the column ``lr`` itself.
    """
    owned = [f"{re.escape(k)}\\." if isinstance(v, dict) else f"{re.escape(k)}$"
             for k, v in params.items()]
    return f"(?!params\\.yaml:|{'|'.join(owned)})"


def show_args(params: dict[str, Any], sort_by: str, order: str = "asc",
              markdown: bool = False) -> list[str]:
    """Arguments of the ``dvc exp show`` call that ``make exps`` runs."""
    args = ["exp", "show", "--no-pager", "--only-changed", "--keep", keep_pattern(),
            "--drop", drop_pattern(params), "--sort-by", sort_by, "--sort-order", order]
    return [*args, "--md"] if markdown else args


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _value(files: dict[str, Any], name: str, default_file: str | None) -> Any:
    """Value of ``[file:]dotted.key`` in exp-show's {file: {"data": {...}}}."""
    path, _, key = name.rpartition(":")
    candidates = [path] if path else ([default_file] if default_file else []) + list(files)
    for f in candidates:
        value = _lookup((files.get(f) or {}).get("data") or {}, key)
        if value is not None:
            return value
    return None


def _revs(shown: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for commit in shown:
        yield _label(commit), commit.get("data") or {}
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield _label(rev), rev.get("data") or {}


def _label(rev: dict[str, Any]) -> str:
    return rev.get("name") or (rev["rev"] if rev["rev"] == "workspace" else rev["rev"][:7])


def param_metric_points(shown: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """One {experiment, x, y} point per revision of ``dvc exp show --json`` having both values.

    ``x`` is a params.yaml key (``lr``, ``dedup.threshold``), ``y`` a metric as
    ``file:key`` (or a key found in any metrics file). Repeated revisions appear once.
    """
    points: list[dict[str, Any]] = []
    for label, data in _revs(shown):
        xv = _value(data.get("params") or {}, x, "params.yaml")
        yv = _value(data.get("metrics") or {}, y, None)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (xv, yv))
        if numbers and label not in {p["experiment"] for p in points}:
            points.append({"experiment": label, _field(x): xv, _field(y): yv})
    # the workspace repeats the last experiment run or applied: keep it only when it differs
    others = {(p[_field(x)], p[_field(y)]) for p in points if p["experiment"] != "workspace"}
    return [p for p in points
            if p["experiment"] != "workspace" or (p[_field(x)], p[_field(y)]) not in others]


def _field(name: str) -> str:
    return name.rpartition(":")[2]


def _dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], text=True,
                          capture_output=capture, check=False)


def plot(x: str, y: str, out: Path) -> Path | None:
    """Write the points as JSON under ``out`` and render them with ``dvc plots show``."""
    proc = _dvc("exp", "show", "--json", capture=True)
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
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.exps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_show = sub.add_parser("show", help="changed params + headline metrics, sorted")
    p_show.add_argument("--sort-by", default=f"{TRAIN_METRICS}:best_val_loss")
    p_show.add_argument("--sort-order", default="asc", choices=["asc", "desc"])
    p_show.add_argument("--md", action="store_true", help="Markdown table")
    p_show.add_argument("--print-command", action="store_true", help="print, do not run")
    p_plot = sub.add_parser("plot", help="one param against one metric across experiments")
    p_plot.add_argument("--x", default="lr")
    p_plot.add_argument("--y", default=f"{TRAIN_METRICS}:best_val_loss")
    p_plot.add_argument("--out", type=Path, default=Path("dvc_plots/exps"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "plot":
        return 0 if plot(args.x, args.y, args.out) else 1
    params = YAML(typ="safe", pure=True).load(Path("params.yaml").read_text(encoding="utf-8"))
    dvc_args = show_args(params or {}, args.sort_by, args.sort_order, args.md)
    if args.print_command:
        print(" ".join(["dvc", *(f"'{a}'" if set(a) & set("|()?$\\!") else a
                                 for a in dvc_args)]))
        return 0
    return _dvc(*dvc_args).returncode


if __name__ == "__main__":
    sys.exit(main())
