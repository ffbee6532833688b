"""Rehash pipeline outputs against dvc.lock: catch files changed after their stage wrote them.

``dvc status`` compares sizes and modification times with its state database, so one flipped
bit with the old mtime put back is "up to date" and the next stage reads corrupt weights.
:func:`verify_paths` recomputes DVC's own hashes from the bytes: a file's md5, and for a
folder the md5 of its ``.dir`` listing (``[{"md5": ..., "relpath": ...}]`` sorted by path,
as ``dvc_data`` writes it), and compares them with the ``outs`` entry of the stage that wrote
the path in dvc.lock. When the listing is in the DVC cache, the message names the files that
differ. ``make verify`` (``python -m reprotune.verify``) checks every model folder; the
evaluate, merge and quantize stages check the model folder they read before loading it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune.io import TMP_GLOB

logger = logging.getLogger(__name__)

LOCK_FILE = Path("dvc.lock")
CHUNK = 1 << 20  # hashing reads this many bytes at a time


class IntegrityError(RuntimeError):
    """A path's bytes differ from what dvc.lock recorded; the message is one line."""


@dataclass(frozen=True)
class Locked:
    """An output as dvc.lock recorded it: the stage that wrote it and DVC's md5."""

    path: str
    stage: str
    md5: str  # a folder's ends in ".dir"
    nfiles: int | None


def locked_outputs(lock: Mapping[str, Any]) -> dict[str, Locked]:
    """Every ``outs`` entry of a parsed dvc.lock, by path."""
    found = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            if out.get("md5"):
                found[str(out["path"])] = Locked(str(out["path"]), stage, str(out["md5"]),
                                                 out.get("nfiles"))
    return found


def read_lock(path: str | Path = LOCK_FILE) -> dict[str, Any]:
    """dvc.lock parsed (an empty mapping when there is none yet).

    With libyaml's C loader (PyYAML, installed with transformers) when present: it reads the
    pipeline's 1,000-line lock in 0.1 s where pure-Python ruamel.yaml takes 1.3 s, at the start
    of every model stage. Only paths and hex md5s are used, which YAML 1.1 and 1.2 read alike.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        import yaml

        return yaml.load(text, Loader=yaml.CSafeLoader) or {}
    except (ImportError, AttributeError):  # no PyYAML, or one built without libyaml
        from ruamel.yaml import YAML

        return YAML(typ="safe", pure=True).load(text) or {}


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes: DVC 3's ``hash: md5`` of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def folder_listing(folder: str | Path) -> list[dict[str, str]]:
    """DVC's ``.dir`` listing of a folder: md5 and posix relpath of every file, sorted by
    relpath; interrupted-write temporaries (``.dvcignore``: :data:`TMP_GLOB`) left out."""
    folder = Path(folder)
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if fnmatch.fnmatch(name, TMP_GLOB):
                continue
            full = Path(dirpath) / name
            entries.append({"md5": file_md5(full), "relpath": full.relative_to(folder).as_posix()})
    return sorted(entries, key=lambda e: e["relpath"])


def listing_md5(listing: list[dict[str, str]]) -> str:
    """The ``<md5>.dir`` hash DVC gives a folder with this listing."""
    data = json.dumps(listing, sort_keys=True).encode("utf-8")
    return hashlib.md5(data).hexdigest() + ".dir"


def cache_dir(root: str | Path = ".") -> Path:
    """The DVC cache folder: ``cache.dir`` of .dvc/config.local or .dvc/config, else .dvc/cache."""
    import configparser

    root = Path(root)
    for name in ("config.local", "config"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(root / ".dvc" / name, encoding="utf-8")
        except configparser.Error:
            continue
        if cfg.has_option("cache", "dir"):
            where = Path(cfg.get("cache", "dir")).expanduser()
            return where if where.is_absolute() else root / ".dvc" / where
    return root / ".dvc" / "cache"


def cached_listing(md5: str, cache: Path) -> list[dict[str, str]] | None:
    """The ``.dir`` listing DVC stored for ``md5`` in its cache, or None when absent."""
    path = cache / "files" / "md5" / md5[:2] / md5[2:]
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def changed_files(now: list[dict[str, str]], then: list[dict[str, str]]) -> list[str]:
    """Relpaths that differ between two listings: changed, missing (-) or extra (+)."""
    a = {e["relpath"]: e["md5"] for e in now}
    b = {e["relpath"]: e["md5"] for e in then}
    return sorted([p for p in a.keys() & b.keys() if a[p] != b[p]]
                  + [f"-{p}" for p in b.keys() - a.keys()] + [f"+{p}" for p in a.keys() - b.keys()])


def verify_path(path: str, locked: Locked, root: Path = Path(".")) -> str | None:
    """None when ``path`` (relative to ``root``) hashes to its dvc.lock entry, else why not."""
    full = root / path
    if not full.exists():
        return "missing"
    if not locked.md5.endswith(".dir"):
        return None if full.is_file() and file_md5(full) == locked.md5 else "file differs"
    listing = folder_listing(full)
    if listing_md5(listing) == locked.md5:
        return None
    then = cached_listing(locked.md5, cache_dir(root))
    if then is None:
        return f"{len(listing)} files hash to {listing_md5(listing)[:12]}, not {locked.md5[:12]}"
    names = changed_files(listing, then)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more} differ{'s' if len(names) == 1 else ''}"


def verify_paths(paths: Iterable[str], *, lock: str | Path = LOCK_FILE,
                 root: str | Path = ".") -> list[str]:
    """Check each path against the dvc.lock entry of the stage that wrote it.

    Returns the paths checked (paths dvc.lock does not know yet, e.g. before the first
    ``dvc repro``, are skipped). Raises :class:`IntegrityError` naming the first path that
    differs, the stage that wrote it and the commands that restore or rebuild it."""
    root = Path(root)
    outs = locked_outputs(read_lock(root / lock))
    checked = []
    for path in paths:
        key = Path(path).as_posix().rstrip("/")
        if key not in outs:
            logger.info("%s: not in %s yet, not verified", key, lock)
            continue
        why = verify_path(key, outs[key], root)
        stage = outs[key].stage
        if why == "missing":
            raise IntegrityError(f"{key}: missing (stage `{stage}` writes it); restore it: dvc "
                                 f"checkout {key} (or dvc pull {key}, or rebuild: dvc repro {stage})")
        if why is not None:
            raise IntegrityError(
                f"{key}: {why} from what stage `{stage}` wrote ({lock}); its files were changed "
                f"or corrupted since (`dvc status` trusts sizes and times, so it misses this). "
                f"Restore them: dvc checkout --relink --force {key} (or rebuild: dvc repro -f "
                f"{stage}; or, if you changed them on purpose: dvc commit {stage})")
        checked.append(key)
    return checked


def check_stage_input(path: str, log: logging.Logger, *, lock: str | Path = LOCK_FILE) -> None:
    """A stage's first step: stop with one line when the model folder it reads is corrupt."""
    try:
        if verify_paths([path], lock=lock):
            log.info("%s matches %s", path, lock)
    except IntegrityError as exc:
        raise SystemExit(f"{log.name.rsplit('.', 1)[-1]}: {exc}") from None


def dvc_sees_change(stage: str, root: str | Path = ".") -> bool:
    """Whether ``dvc status`` already reports ``stage`` or a stage upstream of it as changed
    (so ``dvc repro`` reruns it); asked only for a folder whose bytes differ from dvc.lock, so
    a second or two of DVC's start-up is spent only then."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps",
                           stage], cwd=root, capture_output=True, text=True)
    try:
        return proc.returncode != 0 or bool(json.loads(proc.stdout or "{}"))
    except ValueError:
        return True  # not DVC's JSON: leave the decision to dvc repro


def before_repro(root: str | Path = ".", *, lock: str | Path = LOCK_FILE) -> list[str]:
    """``make repro``'s first step: every ``models/`` folder dvc.lock lists must hash to its
    entry, unless ``dvc repro`` is going to rebuild it anyway (missing, or its stage already
    changed in DVC's eyes: new params, code or a pulled dvc.lock). What is left is a change
    DVC cannot see (same sizes and times): :class:`IntegrityError` naming it and the fix.
    Returns ``(folders that match, folders left to dvc repro)``."""
    root = Path(root)
    outs = locked_outputs(read_lock(root / lock))
    match, rebuilt = [], []
    for path in sorted(p for p in outs if p.startswith("models/")):
        why = verify_path(path, outs[path], root)
        if why is not None and why != "missing" and not dvc_sees_change(outs[path].stage, root):
            verify_paths([path], lock=lock, root=root)  # raises, naming the files and the fix
        (match if why is None else rebuilt).append(path)
    return match, rebuilt


def main(argv: list[str] | None = None) -> int:
    """``python -m reprotune.verify [PATH ...]``: rehash PATHs (default: every ``models/``
    output in dvc.lock); one line per path, exit status 1 when any differs.
    ``--before-repro``: :func:`before_repro`, one line, exit status 1 when it stops."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--before-repro"]:
        try:
            match, rebuilt = before_repro()
        except IntegrityError as exc:
            print(f"verify: {exc}", file=sys.stderr)
            return 1
        left = f"; {len(rebuilt)} missing or changed, which dvc repro rebuilds" if rebuilt else ""
        print(f"verify: {len(match)} model folders match {LOCK_FILE}{left}")
        return 0
    outs = locked_outputs(read_lock())
    paths = [Path(p).as_posix().rstrip("/") for p in args] or sorted(
        p for p in outs if p.startswith("models/"))
    if not paths:
        print("verify: dvc.lock lists no model folders yet (run dvc repro first)")
        return 0
    status = 0
    for path in paths:
        try:
            if verify_paths([path]):
                print(f"{path}: matches dvc.lock (stage {outs[path].stage})")
            else:
                print(f"{path}: not in dvc.lock, not verified")
        except IntegrityError as exc:
            print(f"verify: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
