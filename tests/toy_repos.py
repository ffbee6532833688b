"""A toy DVC project with real experiments, shaped like reprotune's metrics (for fast tests).

One stage turns ``lr`` into metrics files laid out like the pipeline's (``metrics/train.json``,
``metrics/eval.json`` with ``base``/``gain``, ``metrics/eval_base.json``) in well under a
second, so `dvc exp run`, `dvc exp show`, `dvc params diff` and `dvc metrics diff` run for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

TRAIN_PY = '''
import json, math, pathlib
from ruamel.yaml import YAML
p = YAML(typ="safe", pure=True).load(open("params.yaml"))
lr = p["lr"]
loss = round(0.5 + 0.4 * abs(math.log10(lr) + 3) + (0.1 if lr > 1e-3 else 0.0), 4)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("out").mkdir(exist_ok=True)
ev = {"bleu": round(70 - 20 * loss, 3), "rouge_l": round(0.9 - 0.2 * loss, 4),
      "f1": round(0.95 - 0.2 * loss, 4), "perplexity": round(math.exp(loss), 4),
      "accuracy": 1.0, "base": {"bleu": 0.0, "f1": 0.0}, "gain": {"bleu": round(70 - 20 * loss, 3)},
      "settings": {"seed": 1}}
json.dump({"best_val_loss": loss, "tokens_per_s": round(1000 + 1e5 * lr, 1), "method": "full"},
          open("metrics/train.json", "w"), indent=1)
json.dump(ev, open("metrics/eval.json", "w"), indent=1)
json.dump({"bleu": 0.0, "f1": 0.0, "perplexity": 1500.0}, open("metrics/eval_base.json", "w"))
rows = [{"id": i, "prompt": f"q{i}", "reference": f"a{i}",
         "prediction": f"a{i}" if i < round(10 * (1.2 - loss)) else f"wrong{i}"} for i in range(6)]
with open("out/predictions.jsonl", "w") as fh:
    fh.writelines(json.dumps(r) + "\\n" for r in rows)
with open("out/curve.tsv", "w") as fh:
    fh.write("step\\tval_loss\\n" + "".join(f"{s}\\t{loss + 1 / (s + 1)}\\n" for s in range(5)))
'''

DVC_YAML = '''stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [lr, epochs, train]
    outs: [out/predictions.jsonl]
    metrics:
      - metrics/train.json: {cache: false}
      - metrics/eval.json: {cache: false}
      - metrics/eval_base.json: {cache: false}
    plots:
      - out/curve.tsv: {cache: false, x: step, y: val_loss}
'''

PARAMS_YAML = "lr: 0.001\nepochs: 4\ntrain:\n  eval_steps: 25\n  patience: 4\n"


def env() -> dict[str, str]:
    """The test process's environment with this venv's python first and git identities set."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    out.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return out


def run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in ``cwd``; with ``ok`` assert it succeeded."""
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def dvc(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the venv's DVC in ``cwd``."""
    return run([sys.executable, "-m", "dvc", *args], cwd, ok)


def make_exp_repo(root: Path, lrs: dict[str, float]) -> Path:
    """A git + DVC repo at ``root``: the baseline committed on main, one experiment per lr."""
    root.mkdir(parents=True)
    (root / "train.py").write_text(TRAIN_PY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS_YAML)
    shutil.copytree(REPO_ROOT / "plots" / "templates", root / "plots" / "templates")
    run(["git", "init", "-q", "-b", "main"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "plots.html_template", str(REPO_ROOT / "plots" / "offline.html"))
    dvc(root, "repro", "-q")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    for name, lr in lrs.items():
        dvc(root, "exp", "run", "-q", "-S", f"lr={lr}", "-n", name)
    return root


# A toy `train` for `make tune`: the val-loss curve grows row by row (as the real train stage
# writes metrics/curves), the best val loss is best at lr=1e-3, and lr >= 0.5 diverges with
# a one-line error like the real stage's.
TUNE_TRAIN_PY = '''
import json, math, pathlib, sys, time
from ruamel.yaml import YAML
p = YAML(typ="safe", pure=True).load(open("params.yaml"))
lr, steps, pause = p["lr"], p["train"]["max_steps"], p["train"]["eval_steps"] / 100
base = 0.5 + 0.4 * abs(math.log10(lr) + 3) + (0.1 if lr > 1e-3 else 0.0)
curve = pathlib.Path("metrics/curves/plots/metrics/val_loss.tsv")
curve.parent.mkdir(parents=True, exist_ok=True)
with curve.open("w") as fh:
    fh.write("step\\tval_loss\\n")
    for step in range(steps + 1):
        if lr >= 0.5 and step == 1:
            sys.exit(f"train: training diverged: the loss is not finite at step 1 (val loss nan); lower lr ({lr:g})")
        # step 0 is the val loss before training: the same for every lr, as in the real stage
        fh.write(f"{step}\\t{2.0 if step == 0 else round(base + 1 / (step + 1), 4)}\\n")
        fh.flush()
        time.sleep(pause)
json.dump({"best_val_loss": round(base + 1 / (steps + 1), 4)}, open("metrics/train.json", "w"))
'''

TUNE_DVC_YAML = '''stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [lr, train]
    outs:
      - metrics/curves: {cache: false}
    metrics:
      - metrics/train.json: {cache: false}
'''


def make_tune_repo(root: Path, max_steps: int = 6, pause_steps: int = 25) -> Path:
    """A git + DVC repo at ``root`` with the toy train stage, its baseline committed on main.

    Each curve row takes ``pause_steps / 100`` seconds (read from ``train.eval_steps``)."""
    root.mkdir(parents=True)
    (root / "train.py").write_text(TUNE_TRAIN_PY)
    (root / "dvc.yaml").write_text(TUNE_DVC_YAML)
    (root / "params.yaml").write_text(
        f"lr: 0.001\ntrain:\n  max_steps: {max_steps}\n  eval_steps: {pause_steps}\n")
    (root / ".gitignore").write_text("/.tune/\ndvc_plots/\n")
    run(["git", "init", "-q", "-b", "main"], root)
    dvc(root, "init", "-q")
    dvc(root, "repro", "-q")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    return root
