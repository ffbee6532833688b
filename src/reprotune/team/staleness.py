"""Which stages of a revision's ``dvc.lock`` did not run on what their inputs are now.

``dvc exp run <target>`` (a tune trial stopping after ``train``, a sweep stopping at
``evaluate``) commits the whole workspace: the stages after the target keep the baseline's
outputs and metrics. In that commit's ``dvc.lock`` such a stage lists, for an input another
stage produces, the hash that input had when it last ran: different from the hash its
producer now records. That stage, and every stage downstream of it, is stale; so are the
metrics files it declares. ``make exps`` marks their values.
"""

from __future__ import annotations

import subprocess
from typing import Any

from ruamel.yaml import YAML


def _hash(entry: dict[str, Any]) -> str | None:
    return entry.get("md5") or entry.get("hash") and entry.get(entry["hash"])


def stale_stages(lock: dict[str, Any]) -> set[str]:
    """Names of the stages whose inputs changed after they last ran (or upstream ones did)."""
    stages: dict[str, Any] = lock.get("stages") or {}
    producer: dict[str, tuple[str, str | None]] = {}
    for name, st in stages.items():
        for out in st.get("outs") or []:
            producer[out["path"]] = (name, _hash(out))
    stale: set[str] = set()
    changed = True
    while changed:  # to a fixed point: staleness flows downstream
        changed = False
        for name, st in stages.items():
            if name in stale:
                continue
            for dep in st.get("deps") or []:
                made_by = producer.get(dep["path"])
                if made_by and (made_by[0] in stale or made_by[1] != _hash(dep)):
                    stale.add(name)
                    changed = True
                    break
    return stale


def stale_outputs(lock: dict[str, Any]) -> set[str]:
    """Paths of every output (metrics files included) of a stale stage."""
    stages = lock.get("stages") or {}
    return {out["path"] for name in stale_stages(lock)
            for out in stages[name].get("outs") or []}


def lock_at(rev: str) -> dict[str, Any]:
    """``dvc.lock`` of a git revision, or of the working tree for ``"workspace"``; {} if none."""
    if rev == "workspace":
        try:
            with open("dvc.lock", encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            return {}
    else:
        proc = subprocess.run(["git", "show", f"{rev}:dvc.lock"], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            return {}
        text = proc.stdout
    return YAML(typ="safe", pure=True).load(text) or {}
