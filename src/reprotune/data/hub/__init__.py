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
the subset and split; the rows are streamed in Arrow batches and yielded as
:class:`~reprotune.data.readers.RawRow`, so conversion, rejects, ``ingest.columns`` and
``ingest.keep_fields`` work as for local files. Every problem is one :class:`HubError` line
naming the manifest key or param and what would work.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
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
)
from reprotune.data.readers import RawRow

__all__ = ["KEYS", "SHA", "SUFFIX", "HubError", "HubSource", "cached_ref", "check", "hub_cache",
           "is_manifest", "iter_rows", "load_manifest", "offline", "remote_sha", "snapshot",
           "verify"]
logger = logging.getLogger(__name__)

BATCH = 4096  # rows converted to Python objects at a time
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


def _batches(builder: Any, split: str) -> Iterator[Any]:
    """Arrow batches of ``split``, BATCH rows at most: Parquet files are read with pyarrow
    (datasets' streaming reads a whole row group at once, which can be the whole file),
    other formats are streamed by datasets."""
    if builder.name == "parquet":
        import pyarrow.parquet as pq

        for f in builder.config.data_files[split]:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH)
    else:
        yield from builder.as_streaming_dataset(split=split).with_format("arrow").iter(BATCH)


def _rows(src: HubSource, where: str) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
    """(column names, rows) per batch of the pinned split; a broken data file raises
    :class:`HubError` saying after which row."""
    from datasets.exceptions import DatasetGenerationError

    folder, done = snapshot(src, where), 0
    with tempfile.TemporaryDirectory(prefix="reprotune-hub-") as cache_dir:
        batches = _batches(_builder(folder, src, where, cache_dir), src.split)
        while True:
            try:
                batch = next(batches, None)
            except (ValueError, OSError, TypeError, DatasetGenerationError) as exc:
                raise HubError(
                    f"{where}: {src.hub}@{src.revision[:12]} split {src.split}: data unreadable "
                    f"after row {done} ({type(exc).__name__}: {str(exc)[:200]!r}); re-download "
                    f"with `hf download {src.hub} --repo-type dataset --revision {src.revision} "
                    f"--force-download`") from exc
            if batch is None:
                return
            done += batch.num_rows
            yield batch.schema.names, batch.to_pylist()


def verify(src: HubSource, where: str, columns: Mapping[str, str] | None = None) -> None:
    """Everything that can be wrong with a pinned source before its rows are read: the cached
    (or downloadable) snapshot, the subset, the split, and every column that
    ``ingest.columns`` maps from (read from the first batch)."""
    batches = _rows(src, where)
    try:
        have, _ = next(batches, ([], []))
    finally:
        batches.close()  # removes its temporary datasets cache now
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
    line = row index + 1 across the split's files), BATCH rows in memory at a time."""
    where = str(path)
    src = load_manifest(path)
    index = 0
    for _, rows in _rows(src, where):
        for row in rows:
            index += 1
            yield RawRow(where, index, data=row)
    logger.info("%s: %d rows of %s (split %s, revision %s)", where, index, src.hub, src.split,
                src.revision)
