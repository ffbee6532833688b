"""`make remote` / `make push` / `make pull` through reprotune.team.remote, on real git and DVC."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune.team.remote import BACKENDS, RemoteError, backend_for


def _env() -> dict[str, str]:
    return dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def _run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _remote(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "reprotune.team.remote", *args], cwd, ok)


def _dvc_config(repo: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(repo / ".dvc" / "config")
    return cfg


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    (root / "data.txt").write_text("hello team\n")
    _run([sys.executable, "-m", "dvc", "add", "-q", "data.txt"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "init"], root)
    return root


@pytest.mark.parametrize(("url", "kind", "extra"), [
    ("/mnt/team/dvc-store", "local", None),
    ("../store", "local", None),
    ("file:///srv/dvc", "local", None),
    ("s3://bucket/reprotune", "s3", "s3"),
    ("gs://bucket/reprotune", "gcs", "gcs"),
    ("ssh://me@host:2222/srv/dvc", "ssh", "ssh"),
])
def test_backend_for_known_schemes(url: str, kind: str, extra: str | None) -> None:
    b = backend_for(url)
    assert (b.kind, b.extra) == (kind, extra)


def test_every_extra_has_a_lock_file(repo_root: Path) -> None:
    for backend in BACKENDS.values():
        if backend.extra:
            lock = (repo_root / "lock" / f"{backend.extra}.txt").read_text()
            plugin = backend.module.replace("_", "-")
            assert f"\n{plugin}==" in lock, plugin


@pytest.mark.parametrize("url", ["ftp://host/store", "azure://container/x", "", "  "])
def test_unknown_scheme_or_empty_url_is_one_line(tmp_path: Path, url: str) -> None:
    with pytest.raises(RemoteError):
        backend_for(url)
    proc = _remote(tmp_path, "add", url, ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make remote: "), proc.stderr
    assert "s3://bucket/path" in lines[0] and "Traceback" not in proc.stderr


def test_push_and_pull_without_remote_are_one_line(repo: Path) -> None:
    for cmd in ("push", "pull"):
        proc = _remote(repo, cmd, ok=False)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"make {cmd}: no DVC remote is configured: run `make remote URL=...` once (docs/team.md), "
            "commit .dvc/config, then retry")


def test_local_remote_push_then_teammate_pulls(repo: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = _remote(repo, "add", str(store)).stdout
    assert "git add .dvc/config" in out and "make push" in out
    cfg = _dvc_config(repo)
    assert cfg["core"]["remote"] == "storage"
    assert Path(cfg['\'remote "storage"\'']["url"]) == store
    _remote(repo, "push")
    assert any(p.is_file() for p in store.rglob("*"))  # the object arrived in the store
    _run(["git", "add", ".dvc/config"], repo)
    _run(["git", "commit", "-qm", "remote"], repo)

    mate = tmp_path / "mate"
    _run(["git", "clone", "-q", str(repo), str(mate)], tmp_path)
    assert not (mate / "data.txt").exists()
    _remote(mate, "pull")
    assert (mate / "data.txt").read_text() == "hello team\n"


def test_s3_remote_with_minio_endpoint(repo: Path) -> None:
    # --no-install: tests never reach a package index; the config is what matters here
    _remote(repo, "add", "s3://bucket/reprotune", "--endpoint", "http://127.0.0.1:9000",
            "--name", "minio", "--no-install")
    cfg = _dvc_config(repo)
    assert cfg["core"]["remote"] == "minio"
    section = cfg['\'remote "minio"\'']
    assert (section["url"], section["endpointurl"]) == ("s3://bucket/reprotune",
                                                        "http://127.0.0.1:9000")
    # re-running replaces the remote instead of failing on "already exists"
    _remote(repo, "add", "s3://other/path", "--name", "minio", "--no-install")
    assert _dvc_config(repo)['\'remote "minio"\'']["url"] == "s3://other/path"


def test_endpoint_only_for_s3(repo: Path) -> None:
    proc = _remote(repo, "add", "gs://bucket/x", "--endpoint", "http://x", "--no-install", ok=False)
    assert proc.returncode == 2 and "ENDPOINT is for s3://" in proc.stderr


def test_a_pull_that_misses_objects_names_them_and_the_fix(repo: Path, tmp_path: Path) -> None:
    (repo / "dvc.yaml").write_text("stages:\n  make_out:\n    cmd: python -c \"open('out.txt',"
                                   " 'w').write('built')\"\n    outs:\n      - out.txt\n")
    _run([sys.executable, "-m", "dvc", "repro", "-q"], repo)
    store = tmp_path / "store"
    _remote(repo, "add", str(store))
    _remote(repo, "push")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "stage + remote"], repo)
    for obj in store.rglob("*"):  # the remote lost both objects
        if obj.is_file():
            obj.unlink()

    mate = tmp_path / "mate"
    _run(["git", "clone", "-q", str(repo), str(mate)], tmp_path)
    proc = _remote(mate, "pull", ok=False)
    assert proc.returncode != 0
    mine = [ln for ln in proc.stderr.splitlines() if ln.startswith("make pull: ")]
    assert mine == [
        "make pull: out.txt is not in the remote; rebuild it with `dvc repro make_out` (or ask "
        "whoever ran that stage to `make push`)",
        "make pull: data.txt is not in the remote; whoever added it must run `make push` (it is "
        "tracked by data.txt.dvc)"]
