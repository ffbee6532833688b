"""What a ``make tune`` study found: a trials table, the best trial and how to promote it,
and plots (optimisation history, parallel coordinates, param importances) as PNG files
plus one HTML page that embeds them, so everything renders offline."""

from __future__ import annotations

import base64
import html
import logging
import warnings
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.team.exps import render
from reprotune.team.tune_space import TuneConfig

log = logging.getLogger(__name__)

PLOTS = {"history": "optimization history", "parallel": "parallel coordinates",
         "importances": "param importances"}


def _note(t: Any) -> str:
    a = t.user_attrs
    if a.get("reused"):
        return "reused (not retrained)"
    if "pruned_at_step" in a:
        return f"pruned at step {a['pruned_at_step']}"
    if a.get("error"):
        return a["error"]
    if a.get("interrupted"):
        return "interrupted (queued again)"
    return f"retry of trial {a['retry_of']}" if "retry_of" in a else ""


def trials_table(study: Any, cfg: TuneConfig) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): one row per trial: number, state, params, objective, experiment, note."""
    keys = [p.key for p in cfg.space]
    header = ["trial", "state", *keys, cfg.metric.rpartition(":")[2], "experiment", "note"]
    body = [[t.number, t.state.name.lower(), *(t.params.get(k) for k in keys), t.value,
             t.user_attrs.get("experiment"), _note(t)]
            for t in study.get_trials(deepcopy=False)]
    return header, body


def best(study: Any) -> Any | None:
    """The best complete trial, or None."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def summary(study: Any, cfg: TuneConfig) -> str:
    """The trials table, the best trial's params and the commands that promote it."""
    from optuna.trial import TrialState

    counts = {s: len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"study {cfg.study}: {sum(counts.values())} trials "
             f"({', '.join(f'{n} {s.name.lower()}' for s, n in counts.items())}), "
             f"{cfg.direction} {cfg.metric}", render(*trials_table(study, cfg))]
    top = best(study)
    if top is None:
        return "\n".join([*lines, "no trial has completed yet"])
    exp = top.user_attrs.get("experiment")
    params = " ".join(f"{k}={v!r}" for k, v in top.params.items())
    lines += [f"best: trial {top.number}, {cfg.metric} = {top.value}, {params} "
              f"(experiment {exp})",
              f"promote: dvc exp apply {exp}   (then git add/commit), or: "
              f"dvc exp branch {exp} tuned-{cfg.study}"]
    return "\n".join(lines)


def _figures(study: Any) -> dict[str, Any]:
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    out: dict[str, Any] = {}
    with warnings.catch_warnings():  # the matplotlib backend is marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        if done:
            out["history"] = ovm.plot_optimization_history(study)
            out["parallel"] = ovm.plot_parallel_coordinate(study)
        if len({tuple(sorted(t.params.items())) for t in done}) >= 2:
            try:  # fANOVA needs some spread in the params and the values
                out["importances"] = ovm.plot_param_importances(study)
            except (RuntimeError, ValueError) as exc:
                log.info("param importances not drawn: %s", exc)
    return out


def write_plots(study: Any, cfg: TuneConfig, out_dir: str | Path) -> Path:
    """history.png, parallel.png, importances.png (what the trials allow) and index.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name, ax in _figures(study).items():
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        path = out / f"{name}.png"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        images.append((PLOTS[name], path))
    for stale in set(out.glob("*.png")) - {p for _, p in images}:
        stale.unlink()
    rows = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                   f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   for title, p in images)
    text = html.escape(summary(study, cfg))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>study "
            f"{html.escape(cfg.study)}</title></head><body><h1>study {html.escape(cfg.study)}"
            f"</h1><pre>{text}</pre>{rows}</body></html>\n")
    index = out / "index.html"
    with io.atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
