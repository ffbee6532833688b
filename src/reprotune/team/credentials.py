"""Credentials for the team's DVC remote from environment variables (CI secrets).

The pull-request workflow (``.github/workflows/reprotune.yml``) runs ``make remote
URL=$DVC_REMOTE_URL`` and then ``python -m reprotune.team.credentials --url
"$DVC_REMOTE_URL"``, which turns the repository secrets for that kind of remote into what
DVC reads, written only to the git-ignored ``.dvc/config.local`` and files outside the
checkout (never ``.dvc/config``):

============  ==========================================  =====================================
remote        secrets (required; optional)                what is written
============  ==========================================  =====================================
local folder  none                                         nothing: the folder must be mounted
                                                           on the runner (a self-hosted one)
s3 / MinIO    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY;    nothing: DVC's S3 client reads them
              AWS_SESSION_TOKEN, AWS_DEFAULT_REGION,       from the environment
              DVC_REMOTE_ENDPOINT (MinIO)
gcs           GCP_SA_KEY (a service-account key's JSON)    the key as a 0600 file, its path as
                                                           ``credentialpath``
ssh           SSH_PRIVATE_KEY, SSH_KNOWN_HOSTS (the        the key as a 0600 file (``keyfile``),
              server's line of ``ssh-keyscan HOST``);      the host line appended to
              SSH_PASSPHRASE                               ~/.ssh/known_hosts, ``passphrase``
============  ==========================================  =====================================

A required secret that is missing ends with one line naming it and the ``gh secret set``
command; the values are never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reprotune.team.remote import RemoteError, backend_for, run_dvc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Secrets:
    """The repository secrets one kind of remote needs in CI."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    how: str = ""  # what to put in the required secret(s), for the error message


SECRETS: dict[str, Secrets] = {
    "local": Secrets(()),
    "s3": Secrets(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
                  ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "DVC_REMOTE_ENDPOINT"),
                  "the access key pair of a user that may read and write the bucket"),
    "gcs": Secrets(("GCP_SA_KEY",), (),
                   "the JSON key of a service account with Storage Object Admin on the bucket: "
                   "gh secret set GCP_SA_KEY < key.json"),
    "ssh": Secrets(("SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS"), ("SSH_PASSPHRASE",),
                   "a private key the server accepts (gh secret set SSH_PRIVATE_KEY < id_ed25519) "
                   "and the server's host key line (ssh-keyscan HOST | gh secret set "
                   "SSH_KNOWN_HOSTS)"),
}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (ssh refuses a wider key file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    os.chmod(path, 0o600)


def configure(url: str, env: Mapping[str, str], *, name: str = "storage",
              secrets_dir: Path, home: Path) -> list[str]:
    """Set up the credentials of remote ``name`` (at ``url``) from ``env``; returns the names
    of the secrets used. Raises :class:`RemoteError` naming any required secret that is unset."""
    kind = backend_for(url).kind
    need = SECRETS[kind]
    missing = [s for s in need.required if not env.get(s, "").strip()]
    if missing:
        raise RemoteError(f"a {kind} remote ({url}) needs the repository secret(s) "
                          f"{', '.join(missing)}: {need.how}")
    used = [s for s in (*need.required, *need.optional) if env.get(s, "").strip()]
    if kind == "gcs":
        try:
            json.loads(env["GCP_SA_KEY"])
        except json.JSONDecodeError as exc:
            raise RemoteError(f"GCP_SA_KEY is not a service-account key's JSON ({exc.msg}, "
                              f"line {exc.lineno}): {need.how}") from None
        key = secrets_dir / "gcp-key.json"
        _write_private(key, env["GCP_SA_KEY"])
        run_dvc("remote", "modify", "--local", name, "credentialpath", str(key))
    elif kind == "ssh":
        key = secrets_dir / "dvc_ssh_key"
        _write_private(key, env["SSH_PRIVATE_KEY"])
        run_dvc("remote", "modify", "--local", name, "keyfile", str(key))
        known = home / ".ssh" / "known_hosts"
        old = known.read_text(encoding="utf-8") if known.is_file() else ""
        _write_private(known, old + env["SSH_KNOWN_HOSTS"].strip() + "\n")
        if env.get("SSH_PASSPHRASE", "").strip():
            run_dvc("remote", "modify", "--local", name, "passphrase", env["SSH_PASSPHRASE"])
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.credentials",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the remote's URL (DVC_REMOTE_URL)")
    parser.add_argument("--name", default="storage")
    parser.add_argument("--secrets-dir", type=Path,
                        default=Path(os.environ.get("RUNNER_TEMP") or tempfile.gettempdir())
                        / "reprotune-credentials", help="where key files go (outside the checkout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        used = configure(args.url, os.environ, name=args.name, secrets_dir=args.secrets_dir,
                         home=Path.home())
    except RemoteError as exc:
        print(f"credentials: {exc}", file=sys.stderr)
        return 2
    kind = backend_for(args.url).kind
    print(f"{kind} remote '{args.name}': " + (f"credentials from {', '.join(used)}" if used else
          "no credentials needed (the folder must be reachable from this machine)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
