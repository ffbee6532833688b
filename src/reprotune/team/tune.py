"""``make tune``: an Optuna study whose every trial is a named DVC experiment.

Each trial draws values for the params of ``tune.yaml``'s space, checks them with the
check stage's validation and runs ``dvc exp run -n tune-<study>-<n> -S key=value ...`` in
the workspace; its objective is read back from the metrics file the experiment wrote. The
trials are ordinary experiments: ``dvc exp show``, ``make exps``, ``dvc exp apply`` see them.

* Persistent: the study is an Optuna journal in the git-ignored ``.tune/`` folder (an
  append-only file, one JSON line per change, so a kill loses at most the trial it stopped).
  It is local state, not a pipeline output: the results themselves are the experiments
  (shareable with ``dvc exp push``), and since a trial whose params equal an existing
  experiment's takes that result without training, a lost journal is rebuilt from them.
  Rerunning ``make tune`` continues the study: finished trials are never rerun, a trial a
  kill interrupted is retried first (its training resumes from the checkpoint folder), and
  a finished study only prints its results.
* Reuse: before training, the experiments of HEAD (and HEAD itself) are searched for one
  with exactly the trial's params.yaml; DVC's run cache also restores any stage that ran
  with the same params and data before.
* Pruning: while ``dvc exp run`` trains, the val-loss curve (``metrics/curves``) is read as
  it grows and reported to the pruner; a hopeless trial is interrupted and recorded as
  pruned. A trial that fails (e.g. a NaN loss) is recorded as failed with its error line.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reprotune.params import ParamsError
from reprotune.team import exps
from reprotune.team.tune_space import (
    VAL_CURVE,
    ParamSpace,
    TuneConfig,
    TuneError,
    check_against_project,
    load_config,
    validate,
    with_overrides,
)

log = logging.getLogger(__name__)

TUNE_DIR = Path(".tune")           # git-ignored: journals, locks and trial logs
PLOTS_DIR = Path("dvc_plots/tune")  # git-ignored: the study's plots and summary page
POLL_S = 1.0                       # how often the val-loss curve is read while a trial trains


class TrialFailed(RuntimeError):
    """A trial's params were refused or its ``dvc exp run`` failed (recorded, study goes on)."""


def _yaml(path: str | Path) -> Any:
    return YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8")) or {}


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
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log", step=p.step)


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
            if row.kind != "workspace" and row.params == full and _finite(value):
                trial.set_user_attr("experiment", row.label)
                trial.set_user_attr("reused", "commit" if row.kind == "commit" else "experiment")
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
        value = exps.lookup(json.loads(Path(file).read_text(encoding="utf-8")), key)
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
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)
            try:
                while True:
                    finished = proc.poll() is not None
                    rows = [(s, v) for s, v in watch.rows() if s not in seen]
                    for step, value in rows:
                        trial.report(value, step)
                        seen.add(step)
                    if prune and rows and not finished and trial.should_prune():
                        _interrupt(proc)
                        return None, rows[-1][0]
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


@contextmanager
def _exclusive(study: str) -> Iterator[None]:
    """One ``make tune`` per study at a time: the trials share the workspace."""
    TUNE_DIR.mkdir(exist_ok=True)
    with (TUNE_DIR / f"{study}.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuneError(f"study {study}: another `make tune` is running it; wait for it "
                            f"or stop it (Ctrl-C)") from None
        yield


def open_study(cfg: TuneConfig) -> Any:
    """Create or load the study from its journal; refuse one made with another space."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    # our own lines say what each trial did; Optuna's would add a traceback per failed trial
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    TUNE_DIR.mkdir(exist_ok=True)
    path = str(TUNE_DIR / f"{cfg.study}.journal")
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if cfg.sampler == "grid":
        sampler: Any = optuna.samplers.GridSampler(
            {p.key: p.grid_values() for p in cfg.space}, seed=cfg.seed)
    elif cfg.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)
    pruner: Any = {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.pruner_min_resource, reduction_factor=cfg.pruner_reduction_factor),
    }[cfg.pruner]()
    study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                                pruner=pruner, direction=cfg.direction, load_if_exists=True)
    what = {"metric": cfg.metric, "direction": cfg.direction, "targets": list(cfg.targets),
            "space": [[p.key, p.kind, p.low, p.high, p.step, list(p.choices), list(p.grid)]
                      for p in cfg.space]}
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", what)
    elif stored != json.loads(json.dumps(what)):
        raise TuneError(f"study {cfg.study} was started with another metric, targets or space "
                        f"({TUNE_DIR / (cfg.study + '.journal')}); give the changed search a new "
                        f"`study:` name")
    return study


def _recover(study: Any) -> None:
    """Trials a killed run left RUNNING are told failed (interrupted) and queued again once."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    stale = [t.number for t in trials if t.state == TrialState.RUNNING]
    if stale:
        study.set_user_attr("interrupted", sorted({*study.user_attrs.get("interrupted", []), *stale}))
        for number in stale:
            study.tell(number, state=TrialState.FAIL)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in study.get_trials(deepcopy=False):
        if (_interrupted(study, t) and t.number not in retried
                and len(t.params) == len(study.user_attrs["definition"]["space"])):
            # what enqueue_trial adds, plus the grid sampler's point (else it loses track)
            grid = {k: v for k, v in t.system_attrs.items() if k in ("grid_id", "search_space")}
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, system_attrs={"fixed_params": t.params, **grid},
                user_attrs={"retry_of": t.number}))
            log.info("trial %d was interrupted: queued again", t.number)


def _interrupted(study: Any, trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and (
        bool(trial.user_attrs.get("interrupted"))
        or trial.number in study.user_attrs.get("interrupted", []))


def done_trials(study: Any) -> list[Any]:
    """Trials that count against ``n_trials``: complete, pruned, failed (not interrupted)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not _interrupted(study, t))]


def prepare(config: str | Path) -> tuple[TuneConfig, dict[str, Any]]:
    """The checked config and the workspace's params.yaml; nothing runs before this passes."""
    cfg = load_config(config)
    for f in ("params.yaml", "dvc.yaml"):
        if not Path(f).is_file():
            raise TuneError(f"{f}: not found (run make tune from the repository root)")
    params = _yaml("params.yaml")
    try:
        validate(params)
    except ParamsError as exc:
        raise TuneError(f"params.yaml: {exc}") from None
    file = cfg.metric.rpartition(":")[0]
    current = json.loads(Path(file).read_text(encoding="utf-8")) if Path(file).is_file() else None
    check_against_project(cfg, config, params, _yaml("dvc.yaml"), current)
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                      check=False).returncode != 0:
        raise TuneError("git: no commit yet; experiments are based on HEAD, commit first")
    return cfg, params


def run_study(config: str | Path, *, study_name: str | None = None, poll_s: float = POLL_S) -> Any:
    """Continue (or start) the study of ``config`` until its budget is spent."""
    cfg, params = prepare(config)
    if study_name:
        cfg = TuneConfig(**{**cfg.__dict__, "study": study_name})
    with _exclusive(cfg.study):
        study = open_study(cfg)
        _recover(study)
        remaining = cfg.n_trials - len(done_trials(study))
        if cfg.sampler == "grid":
            size = math.prod(len(p.grid_values()) for p in cfg.space)
            remaining = min(remaining, size - len(done_trials(study)))
        if remaining <= 0:
            log.info("study %s is finished (%d trials); nothing to run", cfg.study,
                     len(done_trials(study)))
            return study
        log.info("study %s: %d trials to run (%d done)", cfg.study, remaining,
                 len(done_trials(study)))
        study.optimize(Objective(cfg, params, poll_s),
                       n_trials=remaining, timeout=cfg.timeout, catch=(TrialFailed,))
        return study


def main(argv: list[str] | None = None) -> int:
    from reprotune.team import tune_report

    parser = argparse.ArgumentParser(prog="python -m reprotune.team.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "show"],
                        help="run: continue the study; show: its results and plots only")
    parser.add_argument("--config", default="tune.yaml")
    parser.add_argument("--study", help="study name instead of the config's `study:`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "run":
            study = run_study(args.config, study_name=args.study)
            cfg = load_config(args.config)
        else:
            cfg = load_config(args.config)
            if args.study:
                cfg = TuneConfig(**{**cfg.__dict__, "study": args.study})
            if not (TUNE_DIR / f"{cfg.study}.journal").is_file():
                raise TuneError(f"study {cfg.study}: no journal in {TUNE_DIR}/; run make tune first")
            study = open_study(cfg)
    except TuneError as exc:
        print(f"make tune: {exc}", file=sys.stderr)
        return 1
    print(tune_report.summary(study, cfg))
    page = tune_report.write_plots(study, cfg, PLOTS_DIR / cfg.study)
    print(f"plots: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
