"""`make tune` benchmark: TPE and GP with a few trials vs the exhaustive grid over the same space.

On the demo pipeline with a short training budget, in a throw-away clone of this checkout
(its experiments never reach this repository's refs; the DVC cache is this checkout's):

1. baseline A (``train.max_steps`` small): the grid study over 9 learning rates;
2. baseline B, identical results but a fresh run-cache key: the TPE study over the
   log range the grid spans; baseline C, the same for the GP study; then the TPE
   ``make tune`` again (a finished study);
3. ``dvc exp run train -S`` with params one TPE trial ran: DVC's run cache restores train.

Every study starts cold: ``train.collective_timeout_s``, which a one-process run does not
read, differs between A, B, C and every earlier run, so no experiment or run-cache entry
matches. Writes bench/results/tune_cpu.json.

    PYTHONPATH=src python bench/tune_compare.py --steps 12 --tpe-trials 3 --gp-trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]  # the grid (9 trials)
METRIC = "metrics/train.json:best_val_loss"


def sh(args: list[str], cwd: Path, ok: bool = True) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if ok and proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def set_params(repo: Path, **train: object) -> None:
    yaml = YAML()
    params = yaml.load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(train)
    with (repo / "params.yaml").open("w", encoding="utf-8") as fh:
        yaml.dump(params, fh)


STARTUP = {"grid": 0, "tpe": 1, "gp": 2}  # random trials before the model (GP fits from 2)


def tune_yaml(study: str, sampler: str, trials: int) -> str:
    """The grid over LRS, or TPE / GP over the log range they span."""
    space = (f"  lr: {{type: categorical, choices: {LRS}}}\n" if sampler == "grid" else
             f"  lr: {{type: log, low: {LRS[0]}, high: {LRS[-1]}}}\n")
    return (f"study: {study}\nmetric: {METRIC}\ntargets: [train]\nn_trials: {trials}\n"
            f"sampler: {sampler}\nseed: 0\nstartup_trials: {max(STARTUP[sampler], 1)}\n"
            f"pruner: none\nspace:\n{space}")


def study_result(repo: Path, name: str, wall_s: float) -> dict:
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(repo / ".tune" / f"{name}.journal"))))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return {"trials": len(study.trials), "complete": len(done), "wall_s": round(wall_s, 1),
            "best": study.best_value, "best_params": study.best_params,
            "values": [[t.params, t.value] for t in study.trials]}


def commit_baseline(repo: Path, timeout_s: int, message: str, **files: str) -> None:
    set_params(repo, collective_timeout_s=timeout_s)
    for name, text in files.items():
        (repo / name).write_text(text, encoding="utf-8")
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", message], repo)


def timed_tune(repo: Path, config: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = sh([sys.executable, "-m", "reprotune.team.tune", "run", "--config", config], repo)
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="train.max_steps of every trial")
    ap.add_argument("--tpe-trials", type=int, default=3)
    ap.add_argument("--gp-trials", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_cpu.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reprotune-tune-bench-"))
    repo = work / "repo"
    try:
        branch = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], ROOT).strip()
        sh(["git", "clone", "-q", "-b", branch, str(ROOT), str(repo)], work)
        cache = sh([sys.executable, "-m", "dvc", "cache", "dir"], ROOT).strip().splitlines()[-1]
        sh([sys.executable, "-m", "dvc", "cache", "dir", "--local", cache], repo)
        # train's inputs come from the cache; outputs of other code versions may be missing
        sh([sys.executable, "-m", "dvc", "checkout", "-q"], repo, ok=False)
        for dep in ("data/processed/train.parquet", "data/processed/val.parquet", "models/base"):
            if not (repo / dep).exists():
                raise SystemExit(f"{dep}: not in the DVC cache; run dvc repro base format first")
        # one evaluation at the end (and the one before training): no pruning here
        set_params(repo, max_steps=args.steps, eval_steps=args.steps, patience=0)
        grid_n = len(LRS)
        commit_baseline(repo, 601, "bench: grid baseline",
                        **{"grid.yaml": tune_yaml("grid", "grid", grid_n)})
        grid_s, _ = timed_tune(repo, "grid.yaml")
        grid = study_result(repo, "grid", grid_s)
        commit_baseline(repo, 602, "bench: tpe baseline",
                        **{"tpe.yaml": tune_yaml("tpe", "tpe", args.tpe_trials)})
        tpe_s, _ = timed_tune(repo, "tpe.yaml")
        tpe = study_result(repo, "tpe", tpe_s)
        commit_baseline(repo, 603, "bench: gp baseline",
                        **{"gp.yaml": tune_yaml("gp", "gp", args.gp_trials)})
        gp_s, _ = timed_tune(repo, "gp.yaml")
        gp = study_result(repo, "gp", gp_s)
        again_s, again_out = timed_tune(repo, "tpe.yaml")
        assert "nothing to run" in again_out, again_out
        params, _ = tpe["values"][0]
        t0 = time.perf_counter()
        out = sh([sys.executable, "-m", "dvc", "exp", "run", "-n", "cached", "train",
                  *(a for k, v in params.items() for a in ("-S", f"{k}={v!r}"))], repo)
        cached_s = time.perf_counter() - t0
        result = {
            "what": "make tune on the demo pipeline (train only), TPE vs exhaustive grid, cold",
            "command": f"PYTHONPATH=src python bench/tune_compare.py --steps {args.steps} "
                       f"--tpe-trials {args.tpe_trials} --gp-trials {args.gp_trials}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), CPU only",
            "train": {"max_steps": args.steps, "eval_steps": args.steps},
            "grid_space": {"lr": LRS},
            "tpe_space": {"lr": [LRS[0], LRS[-1], "log"], "startup_trials": STARTUP["tpe"]},
            "gp_space": {"lr": [LRS[0], LRS[-1], "log"], "startup_trials": STARTUP["gp"]},
            "grid": grid, "tpe": tpe, "gp": gp,
            **{f"{k}_gap_to_grid_best": round((r["best"] - grid["best"]) / grid["best"], 4)
               for k, r in (("tpe", tpe), ("gp", gp))},
            **{f"{k}_trial_share": round(r["trials"] / grid["trials"], 3)
               for k, r in (("tpe", tpe), ("gp", gp))},
            "target_within_2pct_with_a_third_of_the_trials": {
                k: r["best"] <= grid["best"] * 1.02 and 3 * r["trials"] <= grid["trials"]
                for k, r in (("tpe", tpe), ("gp", gp))},
            "repeat_finished_study_s": round(again_s, 1),
            "repeat_share_of_first": round(again_s / tpe_s, 4),
            "target_repeat_under_10pct": again_s < 0.1 * tpe_s,
            "run_cache_restore": {
                "command": "dvc exp run -n cached train " + " ".join(
                    f"-S {k}={v!r}" for k, v in params.items()),
                "wall_s": round(cached_s, 1),
                "train_restored": bool(re.search(r"Stage 'train' is cached", out)),
                "ran": sorted(set(re.findall(r"Running stage '([\w@./-]+)'", out)))},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({k: v for k, v in result.items() if k not in ("grid", "tpe", "gp")},
                         indent=1))
        print(f"grid best {grid['best']:.4f} in {grid['trials']} trials / {grid_s:.0f} s; "
              f"TPE best {tpe['best']:.4f} in {tpe['trials']} trials / {tpe_s:.0f} s; "
              f"GP best {gp['best']:.4f} in {gp['trials']} trials / {gp_s:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"clone kept: {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
