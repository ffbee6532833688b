"""File I/O at the edges: atomic writes, JSON/JSONL, Parquet tables.

Every writer goes through :func:`atomic_path`: it writes a temporary file next to the
target and renames it into place, so an interrupted run never leaves a half-written file.
Temporaries are named ``.<target>.<random>.tmp`` (:data:`TMP_GLOB`, git-ignored); a run
killed with SIGKILL cannot remove its own, so stages call :func:`clean_stale_temporaries`
on their output folders at start.

Data rows keep the key order they arrived in (tool schemas and call arguments are the
user's text); only metrics files are key-sorted, for stable diffs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

logger = logging.getLogger(__name__)

TMP_GLOB = ".*.tmp"  # what atomic_path / atomic_dir leave behind when killed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, *, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries: give them the mode open() would (umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def clean_stale_temporaries(*paths: str | Path) -> int:
    """Remove ``.*.tmp`` files/folders left by killed runs next to ``paths`` (or inside them,
    for folders). Returns how many were removed."""
    n = 0
    folders = {Path(p) if Path(p).is_dir() else Path(p).parent for p in paths}
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for stale in sorted(folder.glob(TMP_GLOB)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            logger.info("removed %s (left by an interrupted run)", stale)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_prefix(kind: str) -> str:
    """Prefix of a process's scratch folders in $TMPDIR, ``reprotune-<kind>-<pid>-``: the pid
    lets a later run tell what a killed run left behind (:func:`remove_dead_scratch`)."""
    return f"reprotune-{kind}-{os.getpid()}-"


def remove_dead_scratch(kind: str, folder: str | Path | None = None) -> int:
    """Remove the ``kind`` scratch folders (in ``folder``, default $TMPDIR) whose process is
    gone: a SIGKILLed run cannot remove its own. Returns how many were removed."""
    head, n = f"reprotune-{kind}-", 0
    for old in Path(folder or tempfile.gettempdir()).glob(f"{head}*-*"):
        pid = old.name[len(head):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by a run that was killed", old)
            shutil.rmtree(old, ignore_errors=True)
            n += 1
    return n


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _chmod_default(tmp_path, directory=False)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; swap it in for ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _chmod_default(tmp, directory=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _no_negative_zero(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj + 0.0  # -0.0 -> 0.0: a sign on zero is rounding noise in a metrics diff
    if isinstance(obj, dict):
        return {k: _no_negative_zero(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_negative_zero(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON (stable bytes for DVC hashes and git diffs);
    NaN/Infinity are refused and -0.0 is written as 0.0."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_no_negative_zero(obj), ensure_ascii=False, indent=2,
                                  sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


def note_empty(path: str | Path, why: str) -> bool:
    """When ``path`` is an empty file, log one line saying why and return True.

    DVC warns "'<path>' is empty." about every empty output or dependency of the stage it
    just ran, without a reason; the stage that knows the reason calls this last, so the
    explanation comes right before DVC's warning.
    """
    p = Path(path)
    if not (p.is_file() and p.stat().st_size == 0):
        return False
    logger.info("%s is empty: %s (DVC's \"is empty\" warning about it needs no action)",
                path, why)
    return True


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSONL line as this project writes it: keys in their own order (never sorted: a
    tool schema's key order is the user's), text unescaped, NaN refused."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


class JsonlWriter:
    """Rows appended one at a time to an open JSONL file (see :func:`open_jsonl`)."""

    def __init__(self, fh: TextIO) -> None:
        self._fh = fh
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(jsonl_line(row))
        self.rows += 1


@contextlib.contextmanager
def open_jsonl(path: str | Path) -> Iterator[JsonlWriter]:
    """Stream rows into ``path`` (atomically: the file appears complete, or not at all)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        yield JsonlWriter(fh)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (:func:`jsonl_line`); returns the number of rows."""
    with open_jsonl(path) as out:
        for row in rows:
            out.write(row)
    return out.rows


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file written by this project, one at a time (trusted: errors
    name file and line)."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file written by this project (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path))


def append_file(src: str | Path, fh: BinaryIO, chunk: int = 1 << 20) -> int:
    """Append the bytes of ``src`` to the open binary file ``fh`` in chunks (memory does not
    grow with the file); returns the number of newlines copied (the rows of a JSONL file)."""
    lines = 0
    with Path(src).open("rb") as f:
        while block := f.read(chunk):
            fh.write(block)
            lines += block.count(b"\n")
    return lines


def write_parquet(path: str | Path, rows: list[dict[str, Any]], schema: Any = None) -> None:
    """Write rows to Parquet (zstd, no timestamps in metadata: identical input, identical bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
