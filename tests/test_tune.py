"""`make tune` (reprotune.team.tune): an Optuna study whose trials are real `dvc exp run`
experiments on a toy project; the config checks against this repository's params and DAG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from ruamel.yaml import YAML
from toy_repos import REPO_ROOT, dvc, env, make_tune_repo, run

from reprotune.team import dvc_locks
from reprotune.team.tune import make_sampler
from reprotune.team.tune_space import TuneError, check_against_project, load_config
from reprotune.team.tune_trial import CurveWatch, error_line, fmt

GOOD = """study: s
space:
  lr: {type: log, low: 1.0e-4, high: 1.0e-2}
"""


def _check(tmp_path: Path, text: str, metric_data: dict | None = None) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    yaml = YAML(typ="safe", pure=True)
    check_against_project(load_config(path), path, yaml.load((REPO_ROOT / "params.yaml").read_text()),
                          yaml.load((REPO_ROOT / "dvc.yaml").read_text()), metric_data)


def test_a_good_config_against_this_project(tmp_path: Path) -> None:
    _check(tmp_path, GOOD + "  train.scheduler: {type: categorical, choices: [cosine, linear]}\n"
                            "  batch_size: {type: int, low: 4, high: 32, step: 4}\n"
                            "  train.warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.1}\n")
    cfg = load_config(REPO_ROOT / "tune.yaml")  # the committed config passes the same checks
    _check(tmp_path, (REPO_ROOT / "tune.yaml").read_text())
    assert cfg.space[0].grid_values() == [1e-5, 3e-5, 1e-4, 3e-4]
    assert cfg.space[1].grid_values() == [0.0, 0.05, 0.1, 0.15, 0.2]


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("lr:", "lrr:"), "space.lrr: not a key of params.yaml (did you mean 'lr'?)"),
    (GOOD.replace("1.0e-2", "2.0"),
     "space.lr: 2.0 is outside what params.yaml accepts (lr: 2.0 must be <= 1)"),
    (GOOD + "  train.scheduler: {type: categorical, choices: [cosine, cubic]}\n",
     "space.train.scheduler: 'cubic' is outside what params.yaml accepts (train.scheduler:"),
    (GOOD + "  batch_size: {type: int, low: 0, high: 8}\n", "space.batch_size: 0 is outside"),
    (GOOD + "metric: metrics/nope.json:x\n",
     "metric: metrics/nope.json is not written by any stage of dvc.yaml"),
    (GOOD + "metric: metrics/eval.json:bleu\ntargets: [train]\n",
     "metric: metrics/eval.json is written by stage evaluate, which targets ['train'] do not run"),
    (GOOD + "targets: [trian]\n", "targets: 'trian' is not a stage of dvc.yaml"),
    (GOOD + "sampler: bayes\n", "sampler: 'bayes' is not one of tpe, gp, random, grid"),
    (GOOD + "sampler: grid\n", "space.lr: the grid sampler needs its values"),
    (GOOD + "n_trail: 3\n", "n_trail: unknown key (did you mean 'n_trials'?)"),
    (GOOD + "direction: maximize\npruner: median\n", "pruner: the pruners read the val-loss curve"),
    (GOOD.replace("high: 1.0e-2", "high: 1.0e-5"), "space.lr: low (0.0001) must be below high"),
    (GOOD.replace("type: log", "type: loguniform"), "space.lr.type: 'loguniform' is not one of"),
    ("study: 'my study'\n" + GOOD[9:], "study: 'my study': letters, digits, - and _"),
    # issue 28: Optuna's own traceback said step=0 for these
    (GOOD + "  epochs: {type: int, low: 1, high: 4, step: 0.5}\n",
     "space.epochs.step: 0.5: an int param steps by a whole number (1, 2, ...); use type: float"),
    (GOOD + "  lora: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_fail_in_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TuneError) as err:
        _check(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path / 'tune.yaml'}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_metric_key_the_file_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TuneError, match=r"metric: metrics/train.json has no number 'best_val_los' "
                                        r"\(did you mean 'best_val_loss'\?\)"):
        _check(tmp_path, GOOD + "metric: metrics/train.json:best_val_los\n",
               {"best_val_loss": 1.0, "method": "full"})


def test_values_round_trip_and_curves_and_errors_are_read(tmp_path: Path) -> None:
    assert [fmt(v) for v in (1e-05, 0.0003, True, 16, "cosine", [1, 2])] == [
        "1e-05", "0.0003", "true", "16", "cosine", "[1, 2]"]
    curve = tmp_path / "val_loss.tsv"
    curve.write_text("step\tval_loss\n0\t7.5\n5\t3.25\n10\t3.0\n")  # the last trial's
    watch = CurveWatch(curve)
    assert watch.rows() == []
    curve.write_text("step\tval_loss\n0\t7.5\n")  # rewritten: still the old run's text
    assert watch.rows() == []
    curve.write_text("step\tval_loss\n0\t7.5\n5\t2.5\n10\t1.")  # this run's; a row half written
    assert watch.rows() == [(0, 7.5), (5, 2.5)]
    again = CurveWatch(curve)
    curve.unlink()  # the stage's fresh start
    assert again.rows() == []
    curve.write_text("step\tval_loss\n0\t7.5\n")
    assert again.rows() == [(0, 7.5)]
    assert CurveWatch(tmp_path / "missing.tsv").rows() == []
    out = ("Running stage 'train':\n> python stages/train.py\nTraceback (most recent call last):\n"
           "train: training diverged: the loss is not finite at step 5 (train loss nan); lower lr\n"
           "ERROR: failed to reproduce 'train': failed to run: python stages/train.py, exited with 1\n")
    assert error_line(out) == ("train: training diverged: the loss is not finite at step 5 (train "
                               "loss nan); lower lr (ERROR: failed to reproduce 'train': failed to "
                               "run: python stages/train.py, exited with 1)")


# ------------------------------------------------------------------ real studies (toy repo)
GRID = """study: {study}
sampler: grid
seed: 0
n_trials: 10
pruner: {pruner}
space:
  lr: {{type: categorical, choices: [1.0e-2, 1.0e-3, 3.0e-4, 0.5]}}
"""
# With seed 0 the grid sampler tries 3e-4, 0.5 (diverges), 1e-3, then 1e-2, whose curve is
# worse than the median of the finished ones: pruned.


def _tune(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "reprotune.team.tune", *args], repo, ok)


def _study(repo: Path, name: str) -> optuna.Study:
    path = str(repo / ".tune" / f"{name}.journal")
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path)))


def _stage_locked(repo: Path) -> bool:
    """True once a running dvc has written its stage's locks (the state a kill leaves)."""
    path = repo / ".dvc" / "tmp" / "rwlock"
    try:
        return bool(json.loads(path.read_text() or "{}").get("write"))
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being rewritten
        return False


def _set_child_subreaper(on: bool) -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants become this process's children."""
    import ctypes

    assert ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0


def _zombies() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def _reap(pids: list[int]) -> None:
    for pid in pids:
        os.waitpid(pid, 0)


def test_release_dead_drops_zombie_and_gone_pids_and_keeps_live_ones(tmp_path: Path) -> None:
    """A zombie (exited, not reaped) and a gone pid lose their entries; a live one keeps its."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while not dvc_locks.is_dead(zombie.pid) and time.time() < deadline:
        time.sleep(0.05)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = os.getpid()
    info = {p: {"pid": p, "cmd": f"dvc exp run ({p})"} for p in (zombie.pid, gone.pid, live)}
    path = tmp_path / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "read": {"/r/params.yaml": [info[zombie.pid], info[live]], "/r/train.py": [info[gone.pid]]},
        "write": {"/r/metrics/train.json": info[zombie.pid], "/r/out": info[live]}}))
    try:
        assert dvc_locks.release_dead(path) == sorted([zombie.pid, gone.pid])
    finally:
        zombie.wait()
    assert json.loads(path.read_text()) == {"read": {"/r/params.yaml": [info[live]]},
                                            "write": {"/r/out": info[live]}}
    assert dvc_locks.release_dead(path) == [] and not dvc_locks.is_dead(live)
    assert dvc_locks.release_dead(tmp_path / "none") == []


def _experiments(repo: Path) -> dict[str, float]:
    """{experiment name: lr} of every finished experiment of HEAD (not a failed run's entry)."""
    found = {}
    for commit in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue
            for rev in exp["revs"]:
                found[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]["lr"]
    return found


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1 s per curve row: the pruner (polling every second) sees a trial mid-run even when
    # dvc starts fast (one CI run saw the pruned trial complete at 0.5 s per row)
    repo = make_tune_repo(tmp_path_factory.mktemp("tune") / "repo", pause_steps=100)
    (repo / "tune.yaml").write_text(GRID.format(study="toy", pruner="{type: median, startup_trials: 1}"))
    run(["git", "add", "tune.yaml"], repo)
    run(["git", "commit", "-qm", "tune config"], repo)
    return repo


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_study_trials_are_experiments_failures_and_prunes_recorded(toy: Path) -> None:
    t0 = time.perf_counter()
    out = _tune(toy, "run")
    first_s = time.perf_counter() - t0
    assert "Traceback" not in out.stdout + out.stderr
    trials = {t.params["lr"]: t for t in _study(toy, "toy").trials}
    assert [t.params["lr"] for t in _study(toy, "toy").trials] == [3e-4, 0.5, 1e-3, 1e-2]
    states = {lr: t.state.name for lr, t in trials.items()}
    # lr=1e-3 is the baseline commit's params, but a commit's metrics may be older than its
    # params: it is trained like any other
    assert states[1e-3] == "COMPLETE" and trials[1e-3].user_attrs == {"experiment": "tune-toy-2"}
    assert trials[1e-3].value == pytest.approx(0.5 + 1 / 7, abs=1e-4)
    # a diverging run fails with its one-line error, and the study goes on
    assert states[0.5] == "FAIL"
    assert trials[0.5].user_attrs["error"].startswith(
        "train: training diverged: the loss is not finite at step 1 (val loss nan); lower lr (0.5)")
    # worse than the median of the finished trials at some step: stopped early, as pruned
    pruned = [lr for lr, s in states.items() if s == "PRUNED"]
    assert pruned == [1e-2], states
    assert trials[1e-2].user_attrs["pruned_at_step"] < 6  # of 6: stopped early
    assert trials[1e-2].intermediate_values[1] == pytest.approx(1.5)  # its own curve
    assert trials[3e-4].intermediate_values[6] == pytest.approx(trials[3e-4].value)
    # every trained trial is a named experiment with its params, as `dvc exp show` lists it
    exps = _experiments(toy)
    for lr, t in trials.items():
        if t.state.name == "COMPLETE":
            assert exps[t.user_attrs["experiment"]] == lr
            assert t.user_attrs["experiment"] == f"tune-toy-{t.number}"
    assert not any(exps.get(trials[lr].user_attrs["experiment"]) for lr in [*pruned, 0.5]), (
        exps, {lr: t.user_attrs for lr, t in trials.items()})
    # results: best params, how to promote, plots that render offline
    assert "best: trial" in out.stdout and "lr=0.001" in out.stdout
    plots = toy / "dvc_plots" / "tune" / "toy"
    assert {"history.png", "parallel.png", "index.html"} <= {p.name for p in plots.iterdir()}
    page = (plots / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "http" not in page
    assert (plots / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a finished study reruns nothing: no new experiment, a fraction of the time
    t0 = time.perf_counter()
    again = _tune(toy, "run")
    assert "study toy is finished (4 trials); nothing to run" in again.stderr
    assert time.perf_counter() - t0 < 0.5 * first_s
    assert _experiments(toy) == exps and len(_study(toy, "toy").trials) == 4
    shown = _tune(toy, "show").stdout
    assert "4 trials (2 complete, 1 pruned, 1 fail)" in shown


@pytest.mark.slow  # reads the study test_study_trials_are_experiments... (slow) wrote
def test_a_new_study_takes_equal_experiments_results_without_training(toy: Path) -> None:
    """A lost journal costs nothing: the same space in a new study reuses the experiments."""
    before = _experiments(toy)
    _tune(toy, "run", "--study", "again")
    trials = {t.params["lr"]: t for t in _study(toy, "again").trials}
    first = {t.params["lr"]: t for t in _study(toy, "toy").trials}
    for lr, t in first.items():
        if t.state.name == "COMPLETE":
            assert trials[lr].user_attrs.get("reused") is True, lr
            assert trials[lr].value == t.value
    trained = {lr for lr, t in trials.items() if not t.user_attrs.get("reused")}
    assert trained == {lr for lr, t in first.items() if t.state.name != "COMPLETE"}
    assert set(before) <= set(_experiments(toy))


def test_an_invalid_space_is_refused_before_any_trial(toy: Path) -> None:
    (toy / "bad.yaml").write_text(GRID.format(study="bad", pruner="none").replace(
        "lr: {type", "lrr: {type"))
    before = _experiments(toy)
    proc = _tune(toy, "run", "--config", "bad.yaml", ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("make tune: bad.yaml: space.lrr: not a key of params.yaml "
                                   "(did you mean 'lr'?)")
    assert not (toy / ".tune" / "bad.journal").exists() and _experiments(toy) == before
    (toy / "bad.yaml").unlink()


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_a_killed_tune_continues_and_never_reruns_a_finished_trial(tmp_path: Path) -> None:
    repo = make_tune_repo(tmp_path / "repo", max_steps=8, pause_steps=50)
    (repo / "tune.yaml").write_text(GRID.format(study="k", pruner="none").replace(
        "1.0e-2, 1.0e-3, 3.0e-4, 0.5", "3.0e-4, 3.0e-3, 1.0e-2"))
    run(["git", "add", "tune.yaml"], repo)
    run(["git", "commit", "-qm", "tune config"], repo)
    # As in a container whose PID 1 does not reap orphans (the CI runner's): this process
    # adopts them and does not reap them until the end, so the killed dvc stays a zombie,
    # which DVC's own stale-lock check counts as alive
    _set_child_subreaper(True)
    proc = subprocess.Popen([sys.executable, "-m", "reprotune.team.tune", "run"], cwd=repo,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal, deadline = repo / ".tune" / "k.journal", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if journal.exists():
                states = [t.state.name for t in _study(repo, "k").trials]
                if states.count("COMPLETE") == 1 and "RUNNING" in states and _stage_locked(repo):
                    time.sleep(1)  # the second trial's stage runs: into its training
                    break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # make tune, dvc and the stage, as a kill would
        proc.wait()
    first = _study(repo, "k").trials
    done = [t for t in first if t.state.name == "COMPLETE"]
    assert len(done) == 1 and [t.state.name for t in first].count("RUNNING") == 1, first
    exps_before = _experiments(repo)
    try:
        assert _zombies(), "the killed dvc was expected to stay a zombie"
        resumed = _tune(repo, "run")
    finally:
        _set_child_subreaper(False)
        _reap(_zombies())
    assert "released the DVC locks of killed processes" in resumed.stderr
    trials = _study(repo, "k").trials
    assert trials[done[0].number].datetime_complete == done[0].datetime_complete  # not rerun
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in complete) == [3e-4, 3e-3, 1e-2]
    interrupted = next(t for t in first if t.state.name == "RUNNING")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == interrupted.number)
    assert retry.params == interrupted.params and retry.state.name == "COMPLETE"
    assert trials[interrupted.number].state.name == "FAIL"
    exps = _experiments(repo)
    assert set(exps_before) < set(exps) and len(exps) == 3
    assert "nothing to run" in _tune(repo, "run").stderr


def test_gp_sampler_is_seeded_and_finds_a_smooth_optimum_in_few_trials(tmp_path: Path) -> None:
    """`sampler: gp`: the same seed proposes the same trials; on a smooth 1-D objective (a
    bowl in log lr, as the val loss is over lr) 2 random starts and 4 GP steps land within
    0.1% of the optimum, where TPE's 6 trials from the same seed do not (1% off)."""
    import math

    path = tmp_path / "tune.yaml"

    def best(sampler: str) -> tuple[float, list[float]]:
        path.write_text(GOOD + f"sampler: {sampler}\nstartup_trials: 2\nseed: 0\n")
        study = optuna.create_study(sampler=make_sampler(load_config(path)))
        study.optimize(lambda t: (math.log10(t.suggest_float("lr", 1e-4, 1e-2, log=True)) + 2.8)
                       ** 2 + 1.0, n_trials=6)
        return study.best_value, [t.params["lr"] for t in study.trials]

    gp, gp_again, tpe = best("gp"), best("gp"), best("tpe")
    assert isinstance(make_sampler(load_config(path)), optuna.samplers.TPESampler)
    assert gp == gp_again
    assert gp[0] < 1.001 < 1.01 < tpe[0], (gp, tpe)
