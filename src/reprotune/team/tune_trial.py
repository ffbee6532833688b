"""One ``make tune`` trial: draw its params, validate them, reuse an equal experiment or run
``dvc exp run -n <name> -S key=value ...`` while feeding the pruner the val-loss curve as
it grows, and read the objective back from the metrics file (:mod:`reprotune.team.tune`
runs the study around it)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reprotune import scorecard
from reprotune.params import ParamsError
from reprotune.team import exps
from reprotune.team.tune_space import VAL_CURVE, ParamSpace, TuneConfig, validate, with_overrides

log = logging.getLogger(__name__)

TUNE_DIR = Path(".tune")  # git-ignored: journals, locks and trial logs
POLL_S = 1.0              # how often the val-loss curve is read while a trial trains


class TrialFailed(RuntimeError):
    """A trial's params were refused or its ``dvc exp run`` failed (recorded, study goes on)."""


def fmt(value: Any) -> str:
    """A value as ``-S key=value`` writes it back unchanged into params.yaml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def suggest(trial: Any, p: ParamSpace) -> Any:
    """The trial's value of one param, drawn as its space says."""
    if p.kind == "categorical":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1))
    value = trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log", step=p.step)
    if p.step is None:
        # 4 significant digits, so params.yaml, dvc exp show and make exps read the value as
        # a person writes it (1e-4, not exp(log(1e-4)) = 0.00010000000000000009); the
        # rounding is far below any difference the search can measure
        value = min(max(float(f"{value:.4g}"), p.low), p.high)
    return value


def curve_rows(text: str) -> list[tuple[int, float]]:
    """(step, value) rows of a curve TSV; a row still being written is left for later."""
    out = []
    for line in text.split("\n")[1:-1]:  # the header; the last piece has no newline yet
        cells = line.split("\t")
        try:
            out.append((int(cells[0]), float(cells[1])))
        except (ValueError, IndexError):
            continue
    return out


class CurveWatch:
    """The rows of this run's curve file, never an earlier run's.

    The file a trial starts with belongs to the run before it, and DVC may rewrite it
    (fresh mtime) before the stage deletes it. Rows count once the file disappeared (the
    stage's fresh start) or its text stopped being a prefix of the old one: until then its
    rows equal the old run's, so there is nothing to tell apart.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.old = self._text()
        self.fresh = self.old is None

    def _text(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def rows(self) -> list[tuple[int, float]]:
        text = self._text()
        if text is None:
            self.fresh = True
            return []
        if not self.fresh and self.old is not None and not self.old.startswith(text):
            self.fresh = True
        return curve_rows(text) if self.fresh else []


def _default_sigint() -> None:
    """In the trial's process, before exec: SIGINT back to its default. A ``make tune`` (or
    test run) started in the background by a shell without job control inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt: the pruner's Ctrl-C would be
    lost and the pruned trial would train to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen[Any], grace_s: float = 60.0) -> None:
    """Stop ``dvc exp run`` and its stage commands the way Ctrl-C does (SIGINT), then kill."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in reversed(family):
        try:
            p.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


def error_line(output: str) -> str:
    """The line that says why a ``dvc exp run`` failed: the stage's own one-line error
    when it printed one (``train: training diverged ...``), else DVC's ERROR line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    dvc_errors = [i for i, ln in enumerate(lines) if ln.startswith("ERROR")]
    if not dvc_errors:
        return lines[-1] if lines else "dvc exp run failed without output"
    before = [ln for ln in lines[:dvc_errors[0]] if not ln.startswith(("Traceback", "File "))]
    cause = before[-1] if before else ""
    return f"{cause} ({lines[dvc_errors[0]]})" if cause else lines[dvc_errors[0]]


class Objective:
    """One trial: draw params, validate, reuse an equal experiment or run one, read the metric."""

    def __init__(self, cfg: TuneConfig, params: dict[str, Any], poll_s: float = POLL_S) -> None:
        self.cfg, self.params, self.poll_s = cfg, params, poll_s

    def __call__(self, trial: Any) -> float:
        overrides = {p.key: suggest(trial, p) for p in self.cfg.space}
        full = with_overrides(self.params, overrides)
        try:
            validate(full)
        except ParamsError as exc:
            return self._fail(trial, f"params.yaml with {overrides}: {exc}")
        shown = exps.show_json()
        for row in shown:
            value = exps.metric(row, self.cfg.metric)
            # experiments only: DVC wrote their metrics from a run with exactly these params,
            # while a commit's (or the workspace's) params may be newer than its metrics
            if (row.kind == "experiment" and row.state == "success" and row.params == full
                    and _finite(value)):
                trial.set_user_attr("experiment", row.label)
                trial.set_user_attr("reused", True)
                log.info("trial %d: %s equals experiment %s: %s = %s (not retrained)",
                         trial.number, _show(overrides), row.label, self.cfg.metric, value)
                return float(value)
        name = _free_name(f"tune-{self.cfg.study}-{trial.number}", {r.label for r in shown})
        trial.set_user_attr("experiment", name)
        log.info("trial %d: dvc exp run -n %s %s", trial.number, name, _show(overrides))
        output, pruned_at = self._run(trial, name, overrides)
        if pruned_at is not None:
            import optuna

            trial.set_user_attr("pruned_at_step", pruned_at)
            log.info("trial %d pruned at step %d", trial.number, pruned_at)
            raise optuna.TrialPruned(f"val loss at step {pruned_at}")
        if output is not None:
            return self._fail(trial, error_line(output))
        file, _, key = self.cfg.metric.rpartition(":")
        value = scorecard.lookup(json.loads(Path(file).read_text(encoding="utf-8")), key)
        if not _finite(value):
            return self._fail(trial, f"{self.cfg.metric} is {value!r} after the run")
        log.info("trial %d: %s = %s", trial.number, self.cfg.metric, value)
        return float(value)

    def _fail(self, trial: Any, message: str) -> float:
        trial.set_user_attr("error", message)
        log.warning("trial %d failed: %s", trial.number, message)
        raise TrialFailed(message)

    def _run(self, trial: Any, name: str, overrides: dict[str, Any]) -> tuple[str | None, int | None]:
        """Run the experiment, reporting the val-loss curve as it grows.

        Returns (None, None) on success, (its output, None) on failure, (None, step) pruned.
        """
        args = [sys.executable, "-m", "dvc", "exp", "run", "-n", name,
                *(a for k, v in overrides.items() for a in ("-S", f"{k}={fmt(v)}")),
                *self.cfg.targets]
        log_path = TUNE_DIR / self.cfg.study / f"trial-{trial.number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        prune = self.cfg.pruner != "none"
        watch, seen = CurveWatch(VAL_CURVE), set()
        with log_path.open("w", encoding="utf-8") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=_default_sigint if os.name == "posix" else None)
            try:
                while True:
                    finished = proc.poll() is not None
                    rows = [(s, v) for s, v in watch.rows() if s not in seen]
                    for step, value in rows:
                        trial.report(value, step)
                        seen.add(step)
                    if prune and rows and not finished and trial.should_prune():
                        _interrupt(proc)
                        if proc.returncode != 0:
                            return None, rows[-1][0]
                        break  # it finished before the interrupt: a complete trial after all
                    if finished:
                        break
                    time.sleep(self.poll_s)
            except BaseException:  # Ctrl-C or a kill of make tune: stop the experiment too
                trial.set_user_attr("interrupted", True)
                _interrupt(proc)
                raise
        if proc.returncode != 0:
            return log_path.read_text(encoding="utf-8", errors="replace"), None
        return None, None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _show(overrides: dict[str, Any]) -> str:
    return " ".join(f"-S {k}={fmt(v)}" for k, v in overrides.items())


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when an experiment already has it (a journal
    deleted and rebuilt numbers its trials from 0 again)."""
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate
