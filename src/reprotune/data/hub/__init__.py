"""Hugging Face hub datasets as ingest inputs, pinned to a commit and read offline-safe.

DVC cannot hash a hub dataset, and ``dvc.yaml`` makes one ``read`` stage per entry of
``ingest.inputs`` with that entry as its dependency. So a hub dataset is declared in a small
*manifest* under ``data/raw/`` (a file ending in ``.hub.yaml``), listed in ``ingest.inputs``
like any file::

    hub: shibing624/alpaca-zh      # the dataset's repo id
    split: train
    subset: null                   # the config name, when the dataset has several
    revision: 0123...cdef          # a 40-hex commit sha: never a branch, which can move

DVC hashes the manifest, so pinning another revision reruns exactly that read stage. A branch
name is refused with the sha it points at in the local cache (``python -m reprotune.data.hub
pin`` writes the manifest, see :mod:`reprotune.data.hub.pin`). Loading takes the snapshot from the HF cache
(``snapshot_download(..., local_files_only=True)``); only when it is not cached and the hub is
not switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is it downloaded. The split is
streamed with ``datasets`` (no copy of the rows, bounded memory) and yielded as
:class:`~reprotune.data.readers.RawRow` (line = row index + 1), so conversion, rejects,
``ingest.columns`` and ``ingest.keep_fields`` work as for local files. Every problem is one
:class:`HubError` line naming the manifest key or param and what would work.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reprotune.data.readers import InputFileError, RawRow

logger = logging.getLogger(__name__)

SUFFIX = ".hub.yaml"
KEYS = ("hub", "split", "subset", "revision")
SHA = re.compile(r"[0-9a-f]{40}")
NETWORK_TIMEOUT_S = 10.0  # a hub that does not answer fails fast instead of hanging the stage


class HubError(InputFileError):
    """A hub input cannot be used; one line naming the manifest key or param and the fix."""


@dataclass(frozen=True)
class HubSource:
    """One pinned hub split: what a manifest declares (and what metrics/ingest.json records)."""

    hub: str
    split: str
    subset: str | None
    revision: str

    def info(self) -> dict[str, Any]:
        return asdict(self)


def is_manifest(path: str | Path) -> bool:
    """True for an ``ingest.inputs`` entry that declares a hub dataset (``*.hub.yaml``)."""
    return str(path).endswith(SUFFIX)


def offline() -> bool:
    """The hub is switched off (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set true)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_cache() -> Path:
    """The HF hub cache in use (``HF_HUB_CACHE``, else huggingface_hub's default), read now
    rather than when huggingface_hub was imported."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def cached_ref(repo_id: str, ref: str) -> str | None:
    """The commit sha that branch/tag ``ref`` of dataset ``repo_id`` had when last downloaded
    (``refs/<ref>`` in the hub cache), or None when the cache does not know it."""
    from huggingface_hub.file_download import repo_folder_name

    path = hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "refs" / ref
    try:
        sha = path.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return sha if SHA.fullmatch(sha) else None


def pin_command(hub: str, split: str, subset: str | None, ref: str, out: str | Path) -> str:
    """The shell command that (re)writes a pinned manifest."""
    sub = f" --subset {subset}" if subset else ""
    return f"python -m reprotune.data.hub pin {hub} --split {split}{sub} --revision {ref} --out {out}"


def _text(path: str, key: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise HubError(f"{path}: {key}: expected a non-empty string, got {value!r}")
    return value


def load_manifest(path: str | Path) -> HubSource:
    """Read and check a manifest: a YAML mapping of exactly :data:`KEYS` (``subset``
    optional), with ``revision`` a 40-hex commit sha."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    src = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{src}: hub manifest not found (listed in params.yaml "
                                f"ingest.inputs); write it with python -m reprotune.data.hub pin "
                                f"<owner/name> --split train --out {src}")
    try:
        raw = YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as exc:
        raise HubError(f"{src}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise HubError(f"{src}: expected a mapping with keys {', '.join(KEYS)}, got "
                       f"{type(raw).__name__}")
    for k in raw:
        if k not in KEYS:
            close = difflib.get_close_matches(str(k), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HubError(f"{src}: {k}: unknown key{hint}; known keys: {', '.join(KEYS)}")
    for k in ("hub", "split", "revision"):
        if k not in raw:
            raise HubError(f"{src}: {k}: missing; a manifest needs hub, split and revision "
                           f"(subset optional)")
    hub = _text(src, "hub", raw["hub"])
    try:
        validate_repo_id(hub)
    except HFValidationError as exc:
        raise HubError(f"{src}: hub: {hub!r} is not a hub repo id; use the dataset's "
                       f"owner/name as on huggingface.co, e.g. shibing624/alpaca-zh") from exc
    split = _text(src, "split", raw["split"])
    subset = _text(src, "subset", raw.get("subset"), optional=True)
    revision = str(raw["revision"]).strip()
    if not SHA.fullmatch(revision):
        sha = cached_ref(hub, revision)
        known = (f"the HF cache has {revision} = {sha}: pin `revision: {sha}`" if sha else
                 f"pin it with {pin_command(hub, split, subset, revision, src)}")
        raise HubError(f"{src}: revision: {revision!r} is not a commit sha (40 hex digits); a "
                       f"branch or tag can move without DVC noticing, so {known}")
    return HubSource(hub=hub, split=split, subset=subset, revision=revision)


def remote_sha(hub: str, revision: str, where: str) -> str | None:
    """The commit ``revision`` of dataset ``hub`` is on the hub, asked once with a short
    timeout and no retries; None when the hub cannot be reached (no network, hub down).
    A repo or revision the hub does not have raises :class:`HubError`."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return str(HfApi().dataset_info(hub, revision=revision, timeout=NETWORK_TIMEOUT_S).sha)
    except RepositoryNotFoundError as exc:  # also gated/private without a token
        raise HubError(f"{where}: hub: {hub} does not exist on the hub (or is private/gated: "
                       f"`hf auth login`); check the id on huggingface.co/datasets") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{where}: revision: {revision!r} is not a branch, tag or commit of "
                       f"{hub}; pin one with "
                       f"{pin_command(hub, 'train', None, 'main', where)}") from exc
    except (httpx2.TransportError, HfHubHTTPError, OSError) as exc:
        logger.debug("the hub cannot be reached (%s: %s)", type(exc).__name__, exc)
        return None


def snapshot(src: HubSource, where: str) -> Path:
    """The local folder of the pinned snapshot: from the HF cache, else (hub not switched
    off, and answering one short request) downloaded. Raises :class:`HubError` saying how
    to get it: with no network this fails at once instead of retrying."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kw = dict(repo_type="dataset", revision=src.revision, cache_dir=hub_cache())
    try:
        return Path(snapshot_download(src.hub, local_files_only=True, **kw))
    except LocalEntryNotFoundError:
        pass
    fetch = (f"HF_HUB_OFFLINE=0 hf download {src.hub} --repo-type dataset --revision "
             f"{src.revision}")
    if offline():
        known = "" if (hub_cache() / f"datasets--{src.hub.replace('/', '--')}").is_dir() else (
            "; the dataset is not cached at all (check the hub id)")
        raise HubError(f"{where}: hub: {src.hub} at revision {src.revision} is not in the HF "
                       f"cache {hub_cache()} and the hub is offline{known}; download it once "
                       f"with `{fetch}` (or point HF_HUB_CACHE at a cache that has it)")
    unreachable = (f"{where}: hub: {src.hub} at revision {src.revision} is not in the HF cache "
                   f"{hub_cache()} and the hub cannot be reached; download it where there is a "
                   f"network with `{fetch}`, or point HF_HUB_CACHE at a cache that has it")
    if remote_sha(src.hub, src.revision, where) is None:
        raise HubError(unreachable)
    logger.info("%s: downloading %s at %s into %s", where, src.hub, src.revision, hub_cache())
    try:
        return Path(snapshot_download(src.hub, etag_timeout=NETWORK_TIMEOUT_S, **kw))
    except (LocalEntryNotFoundError, OSError) as exc:  # the connection dropped meanwhile
        raise HubError(f"{unreachable} ({type(exc).__name__})") from exc


def _stream(folder: Path, src: HubSource, where: str, cache_dir: str) -> Any:
    """The split as a streaming ``datasets.IterableDataset`` (checks subset and split)."""
    import datasets

    try:
        dd = datasets.load_dataset(str(folder), name=src.subset, streaming=True,
                                   cache_dir=cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        try:
            names = datasets.get_dataset_config_names(str(folder))
        except (ValueError, FileNotFoundError):
            names = []
        if src.subset is None and len(names) > 1:
            raise HubError(f"{where}: subset: missing, and {src.hub}@{src.revision[:12]} has "
                           f"several; set one of its subsets: {', '.join(names)}") from exc
        if src.subset is not None and src.subset not in names:
            raise HubError(f"{where}: subset: {src.subset!r} is not a subset of {src.hub}@"
                           f"{src.revision[:12]}; its subsets: {', '.join(names) or 'none'}"
                           ) from exc
        raise HubError(f"{where}: {src.hub}@{src.revision[:12]} cannot be loaded with datasets: "
                       f"{str(exc).splitlines()[0]}") from exc
    if src.split not in dd:
        raise HubError(f"{where}: split: {src.split!r} is not a split of {src.hub}"
                       f"{f' (subset {src.subset})' if src.subset else ''}; its splits: "
                       f"{', '.join(dd)}")
    return dd[src.split]


def _columns(ds: Any) -> list[str]:
    """The dataset's column names (from its schema, else from its first row)."""
    if ds.column_names:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return list(first or ())


def verify(src: HubSource, where: str, columns: Mapping[str, str] | None = None) -> None:
    """Everything that can be wrong with a pinned source before its rows are read: the cached
    (or downloadable) snapshot, the subset, the split, and every column that
    ``ingest.columns`` maps from."""
    folder = snapshot(src, where)
    with tempfile.TemporaryDirectory(prefix="reprotune-hub-") as cache_dir:
        have = _columns(_stream(folder, src, where, cache_dir))
    for canon, col in (columns or {}).items():
        if col not in have:
            raise HubError(f"{where}: ingest.columns.{canon}: column {col!r} is not in {src.hub} "
                           f"(split {src.split}); its columns: {', '.join(have)}")


def check(path: str | Path, columns: Mapping[str, str] | None = None) -> HubSource:
    """:func:`verify` the manifest at ``path``; returns its source (recorded in the metrics)."""
    src = load_manifest(path)
    verify(src, str(path), columns)
    return src


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """The rows of the split a manifest pins, as RawRows (source = the manifest path,
    line = row index + 1), streamed: memory stays bounded whatever the split's size."""
    where = str(path)
    src = load_manifest(path)
    folder = snapshot(src, where)
    index = 0
    with tempfile.TemporaryDirectory(prefix="reprotune-hub-") as cache_dir:
        it = iter(_stream(folder, src, where, cache_dir))
        while True:
            try:
                row = next(it, None)
            except (ValueError, OSError, TypeError) as exc:  # a broken data file
                raise HubError(
                    f"{where}: {src.hub}@{src.revision[:12]} split {src.split}: data unreadable "
                    f"after row {index} ({type(exc).__name__}: {str(exc)[:200]!r}); re-download "
                    f"with `hf download {src.hub} --repo-type dataset --revision {src.revision} "
                    f"--force-download`") from exc
            if row is None:
                break
            index += 1
            yield RawRow(where, index, data=dict(row))
    logger.info("%s: %d rows of %s (split %s, revision %s)", where, index, src.hub, src.split,
                src.revision)
