"""DVC outputs never show up in `git status`: a newly added input's read output included,
also after a `dvc repro` that failed on a later stage (DVC then takes back the .gitignore
lines it wrote during that run, and a rerun that finds the stage up to date never writes
them again)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_cli import dvc, env, ran, unexplained_empty
from pipeline_cli import run as run_ok
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"What is {a} plus {a}?", "output": f"It is {2 * a}."}
        for a in range(1, 41)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _copy_repo(dst: Path) -> None:
    """The tracked files (with their .gitignore files) in a fresh git repo, no dvc.lock."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file() and not rel.endswith("dvc.lock"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run_ok(cmd, dst)


def _set_params(root: Path, inputs: list[str], order_by: str | None) -> None:
    yaml = YAML()
    params = yaml.load((root / "params.yaml").read_text())
    params["ingest"]["inputs"] = inputs  # no demo file: the data stages take seconds
    params["ingest"]["keep_fields"] = ["created_at"]
    params["split"]["order_by"] = order_by
    with (root / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)


def _untracked(root: Path) -> list[str]:
    out = run_ok(["git", "status", "--porcelain", "--untracked-files=all"], root)
    return sorted(line[3:] for line in out.splitlines() if line.startswith("??"))


def _outs(root: Path) -> list[str]:
    stages = YAML(typ="safe", pure=True).load((root / "dvc.lock").read_text())["stages"]
    return [o["path"] for s in stages.values() for o in s.get("outs", [])]


@pytest.mark.slow  # > 15 s: make test runs it, make test-fast does not
def test_new_inputs_read_outputs_stay_ignored_after_a_failed_and_a_good_repro(
        tmp_path: Path) -> None:
    """About 20 s idle: `dvc repro split` twice on two small files (no model, no demo)."""
    root = tmp_path / "repo"
    _copy_repo(root)
    inputs = ["data/raw/mine.jsonl", "data/raw/new/more.jsonl"]
    (root / "data/raw/new").mkdir()
    (root / inputs[0]).write_text(_jsonl(ROWS[:20]))
    (root / inputs[1]).write_text(_jsonl(ROWS[20:]))
    # both read stages succeed, then split fails: no row has the field it orders by
    _set_params(root, inputs, order_by="created_at")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "split"],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "40 of 40 rows have no 'created_at'" in proc.stderr, \
        proc.stdout + proc.stderr
    assert {f"read@{i}" for i in inputs} | {"ingest", "dedup"} <= ran(proc.stdout)
    # no row rejected: DVC warns that rejected.jsonl is empty, and ingest has said why
    assert "WARNING: 'data/interim/rejected.jsonl' is empty." in proc.stderr
    assert "data/interim/rejected.jsonl is empty: no row was rejected" in proc.stderr
    assert not unexplained_empty(proc.stdout + proc.stderr), proc.stderr
    assert (root / "data/interim/read" / inputs[1] / "records.jsonl").is_file()
    assert _untracked(root) == sorted(["dvc.lock", *inputs]), _untracked(root)

    _set_params(root, inputs, order_by=None)
    out = dvc(root, "repro", "split", timeout=600)
    assert not unexplained_empty(out), out
    assert _untracked(root) == sorted(["dvc.lock", *inputs]), _untracked(root)
    outs = _outs(root)
    assert {f"data/interim/read/{i}" for i in inputs} <= set(outs) and len(outs) >= 9, outs
    tracked = set(run_ok(["git", "ls-files"], root).splitlines())
    for out in outs:  # every output is ignored (not only hidden), or a metric git tracks
        if out not in tracked:
            run_ok(["git", "check-ignore", "-q", out], root)
