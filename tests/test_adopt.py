"""`make adopt EXP=...` (reprotune.team.adopt): a teammate's experiment, two clones, real git
and DVC, a local-folder remote. Clone A runs an experiment BEFORE the team commits its remote
(the case where plain `dvc exp apply` loses the remote), pushes it; clone B adopts it, pushes
its own commit, and A pulls the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from toy_repos import dvc, make_exp_repo, run

EXP = "lr-big"  # lr 0.01: best_val_loss 1.0, predictions right for rows 0 and 1 only


def _adopt(cwd: Path, *args: str, ok: bool = True):
    return run([sys.executable, "-m", "reprotune.team.adopt", *args], cwd, ok)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("team")
    a = make_exp_repo(root / "a", {EXP: 0.01})  # the experiment's commit has no remote
    run(["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], root)
    dvc(a, "remote", "add", "-d", "storage", str(root / "store"))
    run(["git", "add", ".dvc/config"], a)
    run(["git", "commit", "-qm", "DVC remote"], a)
    run(["git", "remote", "add", "origin", str(root / "origin.git")], a)
    run(["git", "push", "-q", "origin", "main"], a)
    dvc(a, "push", "-q")
    dvc(a, "exp", "push", "origin", EXP)
    run(["git", "checkout", "-q", "--", "."], a)  # `dvc exp run` left the experiment applied
    dvc(a, "checkout", "-q")
    return root


def _clone(team: Path, name: str) -> Path:
    run(["git", "clone", "-q", str(team / "origin.git"), str(team / name)], team)
    return team / name


def test_plain_exp_pull_and_apply_lose_the_remote_and_the_outputs(team: Path) -> None:
    """Why `make adopt` exists: what DVC alone does in a fresh clone."""
    c = _clone(team, "c")
    dvc(c, "exp", "pull", "origin", EXP)
    dvc(c, "exp", "apply", EXP, ok=False)
    assert dvc(c, "remote", "default", ok=False).returncode != 0  # the remote is gone
    assert not (c / "out" / "predictions.jsonl").exists()
    assert "no remote specified" in dvc(c, "push", ok=False).stderr


def test_adopt_keeps_the_remote_pulls_outputs_and_round_trips(team: Path) -> None:
    b = _clone(team, "b")
    config = (b / ".dvc" / "config").read_bytes()
    out = _adopt(b, EXP).stdout
    assert f"Applied {EXP} with its outputs; the team remote is kept" in out
    assert (b / ".dvc" / "config").read_bytes() == config  # the team remote survives
    assert "lr: 0.01" in (b / "params.yaml").read_text()
    assert json.loads((b / "metrics" / "train.json").read_text())["best_val_loss"] == 1.0
    preds = [json.loads(ln) for ln in (b / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == ["a0", "a1", "wrong2", "wrong3", "wrong4", "wrong5"]
    assert "up to date" in dvc(b, "status").stdout.lower()
    changed = run(["git", "status", "--porcelain"], b).stdout
    assert "params.yaml" in changed and "dvc.lock" in changed and ".dvc/config" not in changed

    # B commits the adopted experiment and pushes: the remote is there to push to
    run(["git", "commit", "-qam", f"Adopt {EXP}"], b)
    run(["git", "push", "-q", "origin", "main"], b)
    assert run([sys.executable, "-m", "reprotune.team.remote", "push"], b).returncode == 0

    # A gets B's commit and its outputs: nothing to recompute
    a = team / "a"
    run(["git", "pull", "-q", "origin", "main"], a)
    dvc(a, "pull", "-q")
    assert "up to date" in dvc(a, "status").stdout.lower()
    assert (a / "out" / "predictions.jsonl").read_text() == (b / "out" / "predictions.jsonl").read_text()


def test_adopt_errors_are_one_line_and_touch_nothing(team: Path, tmp_path: Path) -> None:
    d = _clone(team, "d")
    proc = _adopt(d, "no-such-exp", ok=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("make adopt: cannot pull experiment 'no-such-exp' from git "
                                  "remote 'origin' (")
    assert proc.stderr.rstrip().endswith("list the pushed ones with `dvc exp list origin`")
    assert run(["git", "status", "--porcelain"], d).stdout == ""
    # uncommitted edits are never overwritten
    (d / "params.yaml").write_text((d / "params.yaml").read_text() + "# my edit\n")
    proc = _adopt(d, EXP, ok=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"make adopt: uncommitted changes in params.yaml: commit or stash them first "
        f"(applying {EXP} would overwrite them)")
    assert (d / "params.yaml").read_text().endswith("# my edit\n")
    run(["git", "checkout", "--", "params.yaml"], d)
    proc = _adopt(d, "", ok=False)
    assert proc.returncode == 2 and proc.stderr.startswith("make adopt: EXP is missing")

    # without a remote (a project that never ran `make remote`): say so, apply nothing
    lone = make_exp_repo(tmp_path / "lone", {})
    proc = _adopt(lone, EXP, ok=False)
    assert proc.returncode == 2 and "no DVC remote is configured" in proc.stderr
