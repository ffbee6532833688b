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
* Reuse: before training, the experiments of HEAD are searched for one with exactly the
  trial's params.yaml (not HEAD itself: a commit's params may be newer than its metrics);
  DVC's run cache also restores any stage that ran with the same params and data before.
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
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reprotune.params import ParamsError
from reprotune.team import dvc_locks
from reprotune.team.tune_space import (
    TuneConfig,
    TuneError,
    check_against_project,
    load_config,
    validate,
)
from reprotune.team.tune_trial import POLL_S, TUNE_DIR, Objective, TrialFailed

log = logging.getLogger(__name__)

PLOTS_DIR = Path("dvc_plots/tune")  # git-ignored: the study's plots and summary page


def _yaml(path: str | Path) -> Any:
    return YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8")) or {}


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


def make_sampler(cfg: TuneConfig) -> Any:
    """The Optuna sampler ``cfg.sampler`` names, seeded with ``cfg.seed``."""
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(
            {p.key: p.grid_values() for p in cfg.space}, seed=cfg.seed)
    if cfg.sampler == "gp":
        # a Gaussian process: the better guess when only a handful of trials fit the budget
        # (TPE is close to random search before ~10 trials); on CPU a trial's metric is
        # deterministic, which lets the GP skip fitting observation noise
        return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials,
                                         deterministic_objective=True)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)


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
    sampler = make_sampler(cfg)
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
        released = dvc_locks.release_dead()
        if released:  # a killed run's dvc left its stage locked (see dvc_locks)
            log.info("released the DVC locks of killed processes %s", released)
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
    except KeyboardInterrupt:
        print("make tune: interrupted; run it again to continue the study", file=sys.stderr)
        return 130
    print(tune_report.summary(study, cfg))
    page = tune_report.write_plots(study, cfg, PLOTS_DIR / cfg.study)
    print(f"plots: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
