"""The pull-request workflow's remote credentials and fork handling, and .gitignore.

The workflow itself runs on GitHub (not here); this checks what can be checked on this
machine: every kind of remote `make remote` offers has its secrets passed into the job and
turned into DVC settings by `reprotune.team.credentials` (run for real on a DVC repo), and a
pull request from a fork skips the comment step with a notice.
"""

from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reprotune.team.credentials import SECRETS
from reprotune.team.remote import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "reprotune.yml"


def _workflow() -> dict:
    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text(encoding="utf-8"))


def _steps() -> dict[str, dict]:
    return {s.get("name", ""): s for s in _workflow()["jobs"]["review"]["steps"]}


def test_every_remote_kind_has_its_secrets_passed_to_the_job() -> None:
    env = _workflow()["jobs"]["review"]["env"]
    assert {b.kind for b in BACKENDS.values()} == set(SECRETS)
    names = {"DVC_REMOTE_URL"} | {s for sec in SECRETS.values()
                                  for s in (*sec.required, *sec.optional)}
    for name in sorted(names):
        assert env.get(name) == f"${{{{ secrets.{name} }}}}", name
    pull = _steps()["Pull the pipeline's outputs from the team remote"]
    assert pull["if"] == "env.DVC_REMOTE_URL != ''"
    lines = pull["run"].splitlines()
    assert [i for i, ln in enumerate(lines) if "make remote" in ln] < [
        i for i, ln in enumerate(lines) if "reprotune.team.credentials" in ln] < [
        i for i, ln in enumerate(lines) if "make pull" in ln]


def test_fork_pull_requests_skip_the_comment_with_a_notice() -> None:
    job = _workflow()["jobs"]["review"]
    assert job["env"]["FORK"] == (
        "${{ github.event.pull_request.head.repo.full_name != github.repository }}")
    steps = _steps()
    skip = steps["Skip the comment on a pull request from a fork"]
    assert skip["if"] == "env.FORK == 'true'" and "::notice" in skip["run"]
    comment = steps["Post or update the review comment"]
    assert comment["if"] == "env.FORK != 'true'" and "gh pr comment" in comment["run"]
    names = list(steps)  # the report is written (job summary) before either of them
    assert names.index("Write the report") < names.index(skip["name"]) < names.index(
        comment["name"])
    assert "GITHUB_STEP_SUMMARY" in steps["Write the report"]["run"]


def _new_repo(root: Path) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True,
                   env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    return root


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> Path:
    return _new_repo(tmp_path / "repo")


def _credentials(repo: Path, url: str, secrets: dict[str, str], home: Path
                 ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {
        s for sec in SECRETS.values() for s in (*sec.required, *sec.optional)}}
    env.update(secrets, HOME=str(home), DVC_NO_ANALYTICS="1")
    subprocess.run([sys.executable, "-m", "reprotune.team.remote", "add", url, "--no-install"],
                   cwd=repo, env=env, check=True, capture_output=True)
    return subprocess.run([sys.executable, "-m", "reprotune.team.credentials", "--url", url,
                           "--secrets-dir", str(home / "keys")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def _local_config(repo: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(repo / ".dvc" / "config.local")
    return cfg


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_gcs_and_ssh_secrets_become_local_dvc_settings(dvc_repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = json.dumps({"type": "service_account", "project_id": "p", "private_key": "k"})
    proc = _credentials(dvc_repo, "gs://bucket/reprotune", {"GCP_SA_KEY": key}, home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gcs remote 'storage': credentials from GCP_SA_KEY"
    path = Path(_local_config(dvc_repo)["'remote \"storage\"'"]["credentialpath"])
    assert path == home / "keys" / "gcp-key.json" and json.loads(path.read_text()) == json.loads(key)
    assert _mode(path) == 0o600 and key not in (dvc_repo / ".dvc" / "config").read_text()

    dvc_repo = _new_repo(tmp_path / "ssh-repo")  # a gs:// credentialpath is no ssh:// key
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text("old.example ssh-ed25519 AAAAold\n")
    ssh = {"SSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH "
                              "PRIVATE KEY-----", "SSH_KNOWN_HOSTS": "host.example ssh-ed25519 AAAAnew",
           "SSH_PASSPHRASE": "pass phrase"}
    proc = _credentials(dvc_repo, "ssh://ci@host.example/srv/dvc", ssh, home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("ssh remote 'storage': credentials from SSH_PRIVATE_KEY, "
                                   "SSH_KNOWN_HOSTS, SSH_PASSPHRASE")
    remote = _local_config(dvc_repo)["'remote \"storage\"'"]
    keyfile = Path(remote["keyfile"])
    assert keyfile.read_text() == ssh["SSH_PRIVATE_KEY"] + "\n" and _mode(keyfile) == 0o600
    assert remote["passphrase"] == "pass phrase"
    assert (home / ".ssh" / "known_hosts").read_text() == (
        "old.example ssh-ed25519 AAAAold\nhost.example ssh-ed25519 AAAAnew\n")
    tracked = (dvc_repo / ".dvc" / "config").read_text()
    assert "ssh://ci@host.example/srv/dvc" in tracked and "keyfile" not in tracked
    assert "passphrase" not in tracked


def test_s3_and_local_need_nothing_written(dvc_repo: Path, tmp_path: Path) -> None:
    proc = _credentials(dvc_repo, "s3://bucket/reprotune", {
        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == (
        "s3 remote 'storage': credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY")
    assert "s3cr3t" not in proc.stdout + proc.stderr
    assert not (dvc_repo / ".dvc" / "config.local").exists()
    proc = _credentials(dvc_repo, str(tmp_path / "store"), {}, tmp_path)
    assert proc.returncode == 0 and "no credentials needed" in proc.stdout


@pytest.mark.parametrize(("url", "secrets", "message"), [
    ("s3://b/p", {"AWS_ACCESS_KEY_ID": "AKIA"}, "a s3 remote (s3://b/p) needs the repository "
                                                "secret(s) AWS_SECRET_ACCESS_KEY: "),
    ("gs://b/p", {}, "a gcs remote (gs://b/p) needs the repository secret(s) GCP_SA_KEY: "),
    ("gs://b/p", {"GCP_SA_KEY": "not json"}, "GCP_SA_KEY is not a service-account key's JSON"),
    ("ssh://h/p", {"SSH_PRIVATE_KEY": "PRIVATEKEYBYTES"}, "a ssh remote (ssh://h/p) needs the repository "
                                            "secret(s) SSH_KNOWN_HOSTS: "),
])
def test_a_missing_secret_is_one_line_naming_it(dvc_repo: Path, tmp_path: Path, url: str,
                                                secrets: dict[str, str], message: str) -> None:
    proc = _credentials(dvc_repo, url, secrets, tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("credentials: " + message), proc.stderr
    for value in secrets.values():
        assert value not in proc.stderr
    assert not (tmp_path / "keys").exists()


def test_gitignore_covers_a_venv_that_is_a_symlink(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_bytes((ROOT / ".gitignore").read_bytes())
    (tmp_path / "shared-venv").mkdir()
    (repo / ".venv").symlink_to(tmp_path / "shared-venv")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == ["?? .gitignore"]
    (repo / ".venv").unlink()
    (repo / ".venv").mkdir()  # and a real folder, as `make install` makes it
    (repo / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == ["?? .gitignore"]
