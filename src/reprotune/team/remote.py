"""Team set-up: one DVC remote for the whole team, and push/pull that say what to do.

``python -m reprotune.team.remote add URL`` (``make remote URL=...``) picks the DVC back-end from
the URL's scheme, installs its extra from the pinned lock (``lock/<extra>.txt``), makes the
remote the default in ``.dvc/config`` and prints what to commit. ``push`` and ``pull``
(``make push`` / ``make pull``) refuse with one line when no remote is configured, instead
of DVC's three-line error.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

USAGE_HINT = ("use a local folder (/mnt/team/dvc-store), s3://bucket/path (ENDPOINT=http://host:9000 "
              "for MinIO), gs://bucket/path or ssh://user@host/path")
NO_REMOTE = ("no DVC remote is configured: run `make remote URL=...` once (docs/team.md), "
             "commit .dvc/config, then retry")


class RemoteError(RuntimeError):
    """A user error that ends the command with one line saying what to do."""


@dataclass(frozen=True)
class Backend:
    """How DVC reaches a remote: the pyproject extra to install and the plugin it provides."""

    kind: str                 # local | s3 | gcs | ssh
    extra: str | None         # pyproject extra (and lock/<extra>.txt); None: built into DVC
    module: str | None        # the plugin's import name, to skip installing it twice


BACKENDS = {
    "": Backend("local", None, None),
    "file": Backend("local", None, None),
    "s3": Backend("s3", "s3", "dvc_s3"),
    "gs": Backend("gcs", "gcs", "dvc_gs"),
    "ssh": Backend("ssh", "ssh", "dvc_ssh"),
}


def backend_for(url: str) -> Backend:
    """The back-end for ``url``; raises RemoteError for an empty URL or an unknown scheme."""
    if not url.strip():
        raise RemoteError(f"URL is missing: {USAGE_HINT}")
    scheme = urlparse(url).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter (C:\...) is a local folder
        scheme = ""
    if scheme not in BACKENDS:
        raise RemoteError(f"unsupported remote URL scheme '{scheme}://' in {url}: {USAGE_HINT}")
    return BACKENDS[scheme]


def _run(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise RemoteError(f"`{' '.join(args)}` failed: {last[-1] if last else proc.returncode}")
    return proc


def run_dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The venv's DVC with ``args``, output captured; with ``check`` a failure is one line."""
    return _run([sys.executable, "-m", "dvc", *args], check=check)


def install_extra(backend: Backend, root: Path) -> None:
    """Install the back-end's DVC plugin from its lock file (hash-checked, no resolving)."""
    if backend.extra is None or (backend.module and importlib.util.find_spec(backend.module)):
        return
    lock = root / "lock" / f"{backend.extra}.txt"
    if not lock.is_file():
        raise RemoteError(f"{lock} is missing: run `make lock` to create it, then retry")
    log.info("installing the DVC %s plugin from %s", backend.kind, lock)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes",
          "-r", str(lock)])
    _run([sys.executable, "-m", "pip", "check"])


def add(url: str, *, name: str = "storage", endpoint: str | None = None,
        install: bool = True, root: Path = Path(".")) -> Backend:
    """Make ``url`` the project's default DVC remote ``name`` (overwriting one of that name)."""
    backend = backend_for(url)
    if endpoint and backend.kind != "s3":
        raise RemoteError(f"ENDPOINT is for s3:// remotes (MinIO and other S3 servers), not {url}")
    if install:
        install_extra(backend, root)
    run_dvc("remote", "add", "--default", "--force", name, url)
    if endpoint:
        run_dvc("remote", "modify", name, "endpointurl", endpoint)
    return backend


def default_remote() -> str | None:
    """The default remote's name, or None when none is configured."""
    proc = run_dvc("remote", "default", check=False)
    # without one, DVC prints "No default remote set" on stdout and exits 1
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def transfer(command: str, extra_args: list[str]) -> int:
    """Run ``dvc push`` / ``dvc pull`` against the default remote; one line when there is none.

    A pull that could not fetch everything then names each missing output and the command
    that rebuilds it (DVC's own message only says the checkout failed).
    """
    if default_remote() is None:
        raise RemoteError(NO_REMOTE)
    # DVC's own progress and errors go straight to the terminal
    code = subprocess.call([sys.executable, "-m", "dvc", command, *extra_args])
    if command == "pull" and code != 0:
        for line in missing_outputs(Path.cwd()):
            print(f"make pull: {line}", file=sys.stderr)
    return code


def missing_outputs(root: Path) -> list[str]:
    """What to do about each cached output that is absent from the workspace: a stage output
    is rebuilt with ``dvc repro <stage>``; data added with ``dvc add`` must be pushed by
    whoever has it."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    todo: list[str] = []
    lock = root / "dvc.lock"
    stages = (yaml.load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}) \
        if lock.is_file() else {}
    declared = yaml.load((root / "dvc.yaml").read_text(encoding="utf-8")) \
        if (root / "dvc.yaml").is_file() else {}
    uncached = {next(iter(o)) for st in (declared or {}).get("stages", {}).values()
                for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])
                if isinstance(o, dict) and next(iter(o.values())).get("cache") is False}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if out["path"] not in uncached and not (root / out["path"]).exists():
                todo.append(f"{out['path']} is not in the remote; rebuild it with "
                            f"`dvc repro {name}` (or ask whoever ran that stage to `make push`)")
    for dvc_file in sorted(root.rglob("*.dvc")):
        if not dvc_file.is_file() or {".dvc", ".git"} & set(dvc_file.relative_to(root).parts):
            continue
        for out in (yaml.load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs", []):
            path = dvc_file.parent / out["path"]
            if not path.exists():
                todo.append(f"{path.relative_to(root)} is not in the remote; whoever added it "
                            f"must run `make push` (it is tracked by {dvc_file.name})")
    return todo


def _next_steps(backend: Backend, name: str) -> str:
    secrets = {
        "s3": f"dvc remote modify --local {name} access_key_id ... / secret_access_key ... "
              "(or AWS_* environment variables)",
        "gcs": f"dvc remote modify --local {name} credentialpath /path/to/key.json "
               "(or GOOGLE_APPLICATION_CREDENTIALS)",
        "ssh": f"dvc remote modify --local {name} keyfile ~/.ssh/id_ed25519 (or user/password)",
    }
    lines = [f"DVC remote '{name}' is now the project default.",
             "Commit it so teammates and CI use it: git add .dvc/config && "
             "git commit -m 'DVC remote'",
             "Then upload the pipeline's data and models: make push"]
    if backend.kind in secrets:
        lines.append("Credentials stay out of git (.dvc/config.local): " + secrets[backend.kind])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.remote", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="make URL the default DVC remote")
    p_add.add_argument("url")
    p_add.add_argument("--name", default="storage")
    p_add.add_argument("--endpoint", default="", help="S3 endpoint URL (MinIO)")
    p_add.add_argument("--no-install", action="store_true", help="do not install the DVC extra")
    for cmd in ("push", "pull"):
        p = sub.add_parser(cmd, help=f"dvc {cmd} to the default remote")
        p.add_argument("dvc_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "add":
            backend = add(args.url, name=args.name or "storage", endpoint=args.endpoint or None,
                          install=not args.no_install)
            print(_next_steps(backend, args.name or "storage"))
            return 0
        return transfer(args.command, args.dvc_args)
    except RemoteError as exc:
        target = "remote" if args.command == "add" else args.command  # the make target
        print(f"make {target}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
