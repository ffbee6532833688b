"""Running the real `dvc` / `python` of this venv in a copied project (the end-to-end tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def env() -> dict[str, str]:
    """This venv first on PATH (`python` in dvc.yaml = this interpreter), offline, a git author."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    out.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return out


def run(args: list[str], cwd: Path, timeout: int = 1500) -> str:
    """stdout + stderr of a command that must succeed."""
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out[-6000:]}"
    return out


def dvc(cwd: Path, *args: str, timeout: int = 1500) -> str:
    return run([str(Path(sys.executable).parent / "dvc"), *args], cwd, timeout)


def ran(output: str) -> set[str]:
    """The stages a dvc command ran (names as dvc prints them, e.g. `data/raw/dvc.yaml:demo`)."""
    return set(re.findall(r"Running stage '([\w@./:-]+)'", output))


def unexplained_empty(output: str) -> list[str]:
    """Files DVC warned "'<path>' is empty." about without the stage saying why: each stage
    that can leave a file empty logs "<path> is empty: <why>" (reprotune.io.note_empty)."""
    warned = re.findall(r"WARNING: '([^']+)' is empty\.", output)
    return [p for p in warned if f"{p} is empty: " not in output]


TINY_PRESET = Path(__file__).resolve().parents[1] / "configs" / "presets" / "tiny.yaml"


def tiny_overrides() -> dict[tuple[str, ...], object]:
    """The embedded-model preset (configs/presets/tiny.yaml) as {key path: value}: what the
    end-to-end tests apply to a copy of params.yaml, whose default is the real SmolLM2."""
    from reprotune.team.preset import load_preset

    return {tuple(k.split(".")): v for k, v in load_preset(TINY_PRESET).items()}
