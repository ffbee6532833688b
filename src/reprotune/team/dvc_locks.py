"""DVC's read/write locks left behind by a killed ``dvc`` process.

DVC writes the pid of each running command into ``.dvc/tmp/rwlock`` and drops the entries
of processes that no longer exist. A process killed where nothing reaps orphans (a
container whose PID 1 is not an init, a CI runner) stays a zombie, which DVC counts as
alive: every later ``dvc exp run`` of the same stage then fails with "'metrics/train.json'
is busy". :func:`release_dead` drops the entries of processes that are gone or zombies,
under DVC's own lock on that file, and leaves every live process's entry alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RWLOCK = Path(".dvc") / "tmp" / "rwlock"


def is_dead(pid: int) -> bool:
    """True when ``pid`` has exited, including a zombie nobody has reaped yet."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _prune(lock: dict[str, Any], dead: set[int]) -> dict[str, Any]:
    """``lock`` without the entries of ``dead`` pids (empty sections dropped, as DVC does)."""
    read = {path: kept for path, infos in (lock.get("read") or {}).items()
            if (kept := [i for i in infos if int(i["pid"]) not in dead])}
    write = {path: info for path, info in (lock.get("write") or {}).items()
             if int(info["pid"]) not in dead}
    return {k: v for k, v in (("read", read), ("write", write)) if v}


def release_dead(rwlock: Path = RWLOCK) -> list[int]:
    """Drop the rwlock entries of exited processes; return their pids (none: file untouched)."""
    from dvc.lock import make_lock

    if not rwlock.is_file():
        return []
    with make_lock(str(rwlock.with_name("rwlock.lock")), tmp_dir=str(rwlock.parent), wait=True):
        lock = json.loads(rwlock.read_text(encoding="utf-8") or "{}")
        pids = {int(i["pid"]) for infos in (lock.get("read") or {}).values() for i in infos}
        pids |= {int(i["pid"]) for i in (lock.get("write") or {}).values()}
        dead = {pid for pid in pids if is_dead(pid)}
        if dead:
            tmp = rwlock.with_name(f"rwlock.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_prune(lock, dead)), encoding="utf-8")
            os.replace(tmp, rwlock)
    return sorted(dead)
