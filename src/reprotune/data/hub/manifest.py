"""Hub manifests (``*.hub.yaml``): what they hold, how they are checked, the local HF cache.

A manifest pins one split of a hub dataset to a commit (see :mod:`reprotune.data.hub`). Its
keys are exactly :data:`KEYS`; ``revision`` must be a 40-hex sha, and a branch name is refused
with the sha that ``refs/<branch>`` of the local HF cache gives it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reprotune.data.readers import InputFileError

logger = logging.getLogger(__name__)

SUFFIX = ".hub.yaml"
KEYS = ("hub", "split", "subset", "revision")
SHA = re.compile(r"[0-9a-f]{40}")


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


def repo_dir(repo_id: str) -> Path:
    """The cache folder of dataset ``repo_id`` (``datasets--owner--name``)."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="dataset")


def cached_ref(repo_id: str, ref: str) -> str | None:
    """The commit sha that branch/tag ``ref`` of dataset ``repo_id`` had when last downloaded
    (``refs/<ref>`` in the hub cache), or None when the cache does not know it."""
    path = repo_dir(repo_id) / "refs" / ref
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
