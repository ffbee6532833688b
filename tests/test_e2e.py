"""End to end, the way a user runs it: `dvc repro` in a fresh copy of the repository, then
`dvc exp run -S ...`, `dvc exp show` and `dvc metrics diff`, asserting values and reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Small but complete: every stage runs with every default method, on fewer rows/steps.
OVERRIDES = {
    ("demo", "rows"): 500,
    ("epochs",): 1,
    ("train", "eval_steps"): 5,
    ("eval", "max_rows"): 40,
    ("quantize", "eval_rows"): 20,
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out[-6000:]}"
    return out


def _dvc(cwd: Path, *args: str) -> str:
    return _run([str(Path(sys.executable).parent / "dvc"), *args], cwd)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@.-]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    yaml = YAML()
    params = yaml.load((dst / "params.yaml").read_text())
    for keys, value in OVERRIDES.items():
        node = params
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    with (dst / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    # A fresh start: no committed lock or outputs from the source checkout.
    (dst / "dvc.lock").unlink(missing_ok=True)
    _run(["git", "init", "-q", "-b", "main"], dst)
    _run(["git", "add", "-A"], dst)
    _run(["git", "commit", "-qm", "init"], dst)
    return dst


def test_repro_then_noop(project: Path) -> None:
    out = _dvc(project, "repro")
    assert {"demo", "ingest", "base", "dedup", "format", "split", "train"} <= _ran(out)
    m = lambda name: json.loads((project / "metrics" / f"{name}.json").read_text())  # noqa: E731

    ingest = m("ingest")
    assert ingest["rows_in"] == ingest["kept"] + sum(ingest["rejected"].values())
    assert sum(ingest["rejected"].values()) >= 5  # the demo plants malformed lines
    dedup = m("dedup")
    assert dedup["in"] == ingest["kept"]
    assert dedup["in"] == dedup["kept"] + sum(dedup["dropped"].values())
    assert dedup["dropped"]["exact_duplicate"] > 0 and dedup["dropped"]["near_duplicate"] > 0
    split = m("split")
    fmt = m("format")
    assert sum(split["counts"].values()) == fmt["rows_out"]
    train = m("train")
    assert train["best_val_loss"] < train["initial_val_loss"]

    again = _dvc(project, "repro")
    assert _ran(again) == set()
    assert "up to date" in again.lower()
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline"], project)


def test_lr_experiment_reruns_only_training_onward(project: Path) -> None:
    out = _dvc(project, "exp", "run", "-S", "lr=2e-5", "-n", "low-lr")
    ran = _ran(out)
    assert "train" in ran
    assert not ran & {"demo", "ingest", "base", "dedup", "format", "split", "eval_base"}
    diff = _dvc(project, "metrics", "diff", "--json")
    changed = json.loads(diff)
    assert any("eval.json" in path for path in changed), diff
    shown = json.loads(_dvc(project, "exp", "show", "--json"))
    assert "low-lr" in json.dumps(shown)


def test_dedup_threshold_experiment_reruns_from_dedup(project: Path) -> None:
    out = _dvc(project, "exp", "run", "-S", "dedup.threshold=0.6", "-n", "strict-dedup")
    ran = _ran(out)
    assert "dedup" in ran
    assert not ran & {"demo", "ingest", "base"}
    shown = json.dumps(json.loads(_dvc(project, "exp", "show", "--json")))
    assert "strict-dedup" in shown and "low-lr" in shown
