"""Adopt a teammate's experiment: its params, code, dvc.lock and outputs, keeping our remote.

``python -m reprotune.team.adopt NAME`` (``make adopt EXP=NAME``) does what ``dvc exp pull`` +
``dvc exp apply`` leave half done:

* ``dvc exp apply`` restores the experiment's whole tree, ``.dvc/config`` included. An
  experiment run before the team committed its remote carries a config without it, and the
  next ``dvc push`` then fails with "no remote specified". The remote is team
  infrastructure, not something an experiment varies, so this module puts the workspace's
  ``.dvc/config`` back byte for byte after applying;
* ``dvc exp pull`` brings the experiment's git ref, but its outputs do not reach the
  workspace (apply ends with "Checkout failed ... Is your cache up to date?"), so this
  module then runs ``dvc pull`` against the default remote: afterwards ``dvc status`` is
  clean and the workspace holds the experiment's data, models and metrics.

The git changes are left uncommitted for the user to review and commit (or to keep on a
branch with ``dvc exp branch``).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from reprotune import io
from reprotune.team.remote import NO_REMOTE, RemoteError, default_remote, run_dvc, transfer

log = logging.getLogger(__name__)

CONFIG = Path(".dvc") / "config"
# what `dvc exp apply` says when the experiment's outputs are not in the local cache yet:
# the params, code and dvc.lock are applied all the same, and `dvc pull` fetches the outputs
CHECKOUT_FAILED = "Checkout failed"


def adopt(name: str, *, git_remote: str = "origin", root: Path = Path(".")) -> bool:
    """Apply experiment ``name`` from ``git_remote`` to the workspace and pull its outputs.

    Returns whether the workspace's ``.dvc/config`` had to be restored after the apply.
    Raises :class:`RemoteError` (one line) when no remote is configured, tracked files have
    uncommitted changes, the experiment is not on ``git_remote``, or applying or pulling fails.
    """
    if default_remote() is None:
        raise RemoteError(NO_REMOTE)
    # `dvc exp apply` overwrites tracked files: never lose the user's uncommitted edits
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=False).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    if dirty:
        raise RemoteError(f"uncommitted changes in {', '.join(dirty[:3])}"
                          f"{' ...' if len(dirty) > 3 else ''}: commit or stash them first "
                          f"(applying {name} would overwrite them)")
    config = root / CONFIG
    saved = config.read_bytes()
    # the git ref only: its outputs come from the default remote below, whatever the
    # experiment's own config says
    pulled = run_dvc("exp", "pull", "--no-cache", git_remote, name, check=False)
    if pulled.returncode != 0:
        last = (pulled.stderr or pulled.stdout).strip().splitlines()
        raise RemoteError(f"cannot pull experiment {name!r} from git remote {git_remote!r} "
                          f"({last[-1].removeprefix('ERROR: ') if last else pulled.returncode}); "
                          f"list the pushed ones with `dvc exp list {git_remote}`")
    applied = run_dvc("exp", "apply", name, check=False)
    restored = config.read_bytes() != saved
    if restored:
        with io.atomic_path(config) as tmp:
            tmp.write_bytes(saved)
        log.info("kept this workspace's .dvc/config (experiment %s carried another one, "
                 "without the team remote)", name)
    if applied.returncode != 0 and CHECKOUT_FAILED not in applied.stderr:
        last = (applied.stderr or applied.stdout).strip().splitlines()
        raise RemoteError(f"`dvc exp apply {name}` failed: {last[-1] if last else applied.returncode}")
    if transfer("pull", []) != 0:
        raise RemoteError(f"the outputs of {name} are not all in the remote: ask whoever ran it "
                          f"to `dvc exp push {git_remote} {name}` (or `make push` after applying)")
    return restored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.adopt",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the experiment's name (dvc exp list origin)")
    parser.add_argument("--git-remote", default="origin", help="git remote it was pushed to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.experiment.strip():
            raise RemoteError("EXP is missing: make adopt EXP=<name> (names: dvc exp list origin)")
        adopt(args.experiment, git_remote=args.git_remote)
    except RemoteError as exc:
        print(f"make adopt: {exc}", file=sys.stderr)
        return 2
    print(f"Applied {args.experiment} with its outputs; the team remote is kept. Review and "
          f"commit: git add -A && git commit -m 'Adopt {args.experiment}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
