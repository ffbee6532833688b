"""Hugging Face hub datasets as ingest inputs, pinned to a commit and read offline-safe.

DVC cannot hash a hub dataset, and ``dvc.yaml`` makes one ``read`` stage per entry of
``ingest.inputs`` with that entry as its dependency. So a hub dataset is declared in a small
*manifest* under ``data/raw/`` (a file ending in ``.hub.yaml``), listed in ``ingest.inputs``
like any file::

    hub: shibing624/alpaca-zh      # the dataset's repo id
    split: train
    subset: null                   # the config name, when the dataset has several
    revision: 0123...cdef          # a 40-hex commit sha: never a branch, which can move

DVC hashes the manifest, so pinning another revision reruns exactly that read stage; a branch
name is refused with the sha it points at in the cache (:mod:`reprotune.data.hub.pin` writes
manifests). The snapshot comes from the HF cache, and is downloaded only when missing and the
hub is not switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``). ``datasets`` resolves
the subset and split to data files, which are read like local files (or streamed by
``datasets`` when ingest has no reader for their type) and yielded as
:class:`~reprotune.data.readers.RawRow` (line = the row's number in the split), so conversion,
rejects, ``ingest.columns`` and ``ingest.keep_fields`` work as for local files. Every problem is one :class:`HubError` line
naming the manifest key or param and what would work.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

from reprotune.data.hub.manifest import (
    KEYS,
    SHA,
    SUFFIX,
    HubError,
    HubSource,
    cached_ref,
    hub_cache,
    is_manifest,
    load_manifest,
    offline,
    pin_command,
    repo_dir,
)
from reprotune.data.readers import ROW_FILES, InputFileError, RawRow
from reprotune.data.readers import iter_rows as read_file

__all__ = ["KEYS", "SHA", "SUFFIX", "HubError", "HubSource", "cached_ref", "check", "hub_cache",
           "is_manifest", "iter_rows", "load_manifest", "offline", "remote_sha", "snapshot",
           "verify"]
logger = logging.getLogger(__name__)

BATCH = 4096  # rows per Arrow batch streamed by datasets; rows read to check ingest.columns
NETWORK_TIMEOUT_S = 10.0  # a hub that does not answer fails fast instead of hanging the stage


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
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    kw = dict(repo_type="dataset", revision=src.revision, cache_dir=hub_cache())
    try:
        return Path(snapshot_download(src.hub, local_files_only=True, **kw))
    except IncompleteSnapshotError:  # an interrupted download
        state = "only partly in the HF cache"
    except LocalEntryNotFoundError:
        state = "not in the HF cache"
    fetch = (f"HF_HUB_OFFLINE=0 hf download {src.hub} --repo-type dataset --revision "
             f"{src.revision}")
    if offline():
        known = "" if repo_dir(src.hub).is_dir() else (
            "; the dataset is not cached at all (check the hub id)")
        raise HubError(f"{where}: hub: {src.hub} at revision {src.revision} is {state} "
                       f"{hub_cache()} and the hub is offline{known}; download it once "
                       f"with `{fetch}` (or point HF_HUB_CACHE at a cache that has it)")
    unreachable = (f"{where}: hub: {src.hub} at revision {src.revision} is {state} "
                   f"{hub_cache()} and the hub cannot be reached; download it where there is a "
                   f"network with `{fetch}`, or point HF_HUB_CACHE at a cache that has it")
    if remote_sha(src.hub, src.revision, where) is None:
        raise HubError(unreachable)
    logger.info("%s: downloading %s at %s into %s", where, src.hub, src.revision, hub_cache())
    try:
        return Path(snapshot_download(src.hub, etag_timeout=NETWORK_TIMEOUT_S, **kw))
    except (LocalEntryNotFoundError, OSError) as exc:  # the connection dropped meanwhile
        raise HubError(f"{unreachable} ({type(exc).__name__})") from exc


def _builder(folder: Path, src: HubSource, where: str, cache_dir: str) -> Any:
    """The ``datasets`` builder of the snapshot (its subset, its data files per split)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder), name=src.subset, cache_dir=cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        try:
            names = datasets.get_dataset_config_names(str(folder))
        except (ValueError, FileNotFoundError):
            names = []
        at = f"{src.hub}@{src.revision[:12]}"
        if src.subset is None and len(names) > 1:
            raise HubError(f"{where}: subset: missing, and {at} has several; set one of its "
                           f"subsets: {', '.join(names)}") from exc
        if src.subset is not None and src.subset not in names:
            raise HubError(f"{where}: subset: {src.subset!r} is not a subset of {at}; its "
                           f"subsets: {', '.join(names) or 'none'}") from exc
        raise HubError(f"{where}: {at} cannot be loaded with datasets: "
                       f"{str(exc).splitlines()[0]}") from exc
    splits = list(builder.config.data_files or {})
    if src.split not in splits:
        raise HubError(f"{where}: split: {src.split!r} is not a split of {src.hub}"
                       f"{f' (subset {src.subset})' if src.subset else ''}; its splits: "
                       f"{', '.join(splits) or 'none'}")
    return builder


def _raw_rows(builder: Any, split: str) -> Iterator[RawRow]:
    """The split's rows, file by file. Files of a type ingest reads (.json, .jsonl, .csv,
    .parquet) go through :func:`reprotune.data.readers.iter_rows` exactly as local files do
    (a malformed line is one rejected row, Parquet is read in bounded batches); other types
    (.arrow, compressed, .txt: one row per line, ``datasets``' text builder, ...) are
    streamed by ``datasets`` in Arrow batches."""
    files = [str(f) for f in builder.config.data_files[split]]
    if all(Path(f).suffix.lower() in ROW_FILES for f in files):
        for f in files:
            yield from read_file(f)
        return
    for batch in builder.as_streaming_dataset(split=split).with_format("arrow").iter(BATCH):
        for row in batch.to_pylist():
            yield RawRow(split, 0, data=row)


def _rows(src: HubSource, where: str) -> Iterator[RawRow]:
    """The pinned split's rows (source = ``where``, line = row number in the split); a file
    that cannot be read raises :class:`HubError` naming the manifest."""
    from datasets.exceptions import DatasetGenerationError

    folder, index = snapshot(src, where), 0
    fix = f"`hf download {src.hub} --repo-type dataset --revision {src.revision} --force-download`"
    with tempfile.TemporaryDirectory(prefix="reprotune-hub-") as cache_dir:
        rows = _raw_rows(_builder(folder, src, where, cache_dir), src.split)
        while True:
            try:
                raw = next(rows, None)
            except InputFileError as exc:  # a data file of the snapshot, as for a local file
                raise HubError(f"{where}: {src.hub}@{src.revision[:12]}: {exc}; if the cached "
                               f"copy is damaged: {fix}") from exc
            except (ValueError, OSError, TypeError, DatasetGenerationError) as exc:
                raise HubError(
                    f"{where}: {src.hub}@{src.revision[:12]} split {src.split}: data unreadable "
                    f"after row {index} ({type(exc).__name__}: {str(exc)[:200]!r}); if the "
                    f"cached copy is damaged: {fix}") from exc
            if raw is None:
                return
            index += 1
            yield replace(raw, source=where, line=index)


def verify(src: HubSource, where: str, columns: Mapping[str, str] | None = None) -> None:
    """Everything that can be wrong with a pinned source before its rows are read: the cached
    (or downloadable) snapshot, the subset, the split, and every column that
    ``ingest.columns`` maps from (the columns of the first BATCH rows)."""
    rows, have = _rows(src, where), {}
    try:
        for raw in islice(rows, BATCH):
            have.update(dict.fromkeys(raw.data or ()))
    finally:
        rows.close()  # removes its temporary datasets cache now
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
    """The rows of the split a manifest pins, as RawRows: source = the manifest path, line =
    the row's number in the split (1-based, across its files in order)."""
    where, n = str(path), 0
    src = load_manifest(path)
    for raw in _rows(src, where):
        n += 1
        yield raw
    logger.info("%s: %d rows of %s (split %s, revision %s)", where, n, src.hub, src.split,
                src.revision)
