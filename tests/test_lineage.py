"""Lineage: the run-info file in a model folder, and `make lineage` on a real git + DVC repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reprotune import io
from reprotune.lineage import LINEAGE_FILE, run_info, tree_md5, upstream, versions

MAKE_MODEL = """import pathlib
from reprotune.lineage import run_info, write_run_info
d = pathlib.Path("models/m")
d.mkdir(parents=True, exist_ok=True)
(d / "w.bin").write_text(open("data/b.txt").read() * 2)
write_run_info(d, run_info("model", {"lr": 0.1}, ["data/b.txt"], "cpu"))
"""
DVC_YAML = """stages:
  prep:
    cmd: python -c "open('data/b.txt', 'w').write(open('data/raw/a.txt').read().upper())"
    deps: [data/raw/a.txt]
    outs: [data/b.txt]
  model:
    cmd: python make_model.py
    deps: [data/b.txt, make_model.py]
    outs: [models/m]
"""


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_tree_md5_is_content_only_and_skips_the_lineage_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "x.txt").write_text("x")
        (d / "sub" / "y.txt").write_text("y")
    (a / LINEAGE_FILE).write_text("{}")
    assert tree_md5(a) == tree_md5(b)
    (b / "sub" / "y.txt").write_text("z")
    assert tree_md5(a) != tree_md5(b)
    assert tree_md5(a / "x.txt") == "9dd4e461268c8034f5c8564e155c67a6"  # md5 of "x"


def test_run_info_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("data")
    one = run_info("train", {"lr": 1e-3}, [tmp_path / "d.txt"], "cuda:0")
    assert one == run_info("train", {"lr": 1e-3}, [tmp_path / "d.txt"], "cuda:0")
    assert one["device"] == "cuda" and one["versions"]["torch"] == versions()["torch"]
    assert "+" not in one["versions"]["torch"]  # 2.13.0, not 2.13.0+cpu
    assert set(one) == {"stage", "params", "inputs", "versions", "device"}  # no time, no commit


def test_upstream_walks_dvc_lock() -> None:
    stages = {
        "a": {"deps": [{"path": "raw.txt", "md5": "1"}, {"path": "src/x.py", "md5": "c"}],
              "outs": [{"path": "mid.txt", "md5": "2"}]},
        "b": {"deps": [{"path": "mid.txt", "md5": "2"}, {"path": "cfg.txt", "md5": "3"}],
              "outs": [{"path": "out", "md5": "4"}]},
    }
    assert upstream(stages, "b") == [("mid.txt", "2", "a"), ("raw.txt", "1", None),
                                     ("cfg.txt", "3", None)]


def test_make_lineage_on_a_real_repo(tmp_path: Path, repo_root: Path) -> None:
    root = tmp_path / "repo"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "a.txt").write_text("hello")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "make_model.py").write_text(MAKE_MODEL)
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "repro", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "first model"], root)
    info = io.read_json(root / "models" / "m" / LINEAGE_FILE)
    assert info["inputs"] == {"data/b.txt": tree_md5(root / "data" / "b.txt")}

    out = _run([sys.executable, "-m", "reprotune.lineage", "models/m"], root)
    assert out.startswith("models/m: written by stage `model`, dvc.lock md5 ")
    assert "recorded in git commit: " in out and "first model" in out
    assert "params lr: 0.1" in out and "device: cpu" in out
    assert "data/b.txt" in out and "(from stage `prep`)" in out
    assert "data/raw/a.txt" in out and "(raw input)" in out
    proc = subprocess.run([sys.executable, "-m", "reprotune.lineage", "data/raw/a.txt"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "make lineage: data/raw/a.txt: no stage in dvc.lock writes it")
