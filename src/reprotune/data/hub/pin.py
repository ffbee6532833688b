"""Pinning a hub dataset: ``python -m reprotune.data.hub pin OWNER/NAME --split S --out M``.

Resolves a branch or tag to the commit it points at (on the hub when reachable, else from
``refs/<branch>`` in the local HF cache), checks that the snapshot, subset and split are
there (downloading the snapshot when the hub is reachable, so later runs work offline), and
writes the manifest that ``ingest.inputs`` lists (see :mod:`reprotune.data.hub`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from reprotune import io
from reprotune.data.hub import (
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
    remote_sha,
    verify,
)

logger = logging.getLogger(__name__)


def resolve(hub: str, ref: str, where: str) -> str:
    """The commit sha of ``ref`` (a branch, tag or sha): from the hub when it is reachable,
    else from ``refs/<ref>`` in the local cache."""
    if SHA.fullmatch(ref):
        return ref
    if not offline():
        sha = remote_sha(hub, ref, where)
        if sha is not None:
            return sha
    sha = cached_ref(hub, ref)
    if sha is None:
        raise HubError(f"revision: the HF cache {hub_cache()} has no {ref!r} of {hub} and the "
                       f"hub is offline or unreachable; run this once with network access "
                       f"(HF_HUB_OFFLINE unset), or give --revision <40-hex sha>")
    logger.info("%s: %s of %s from the HF cache: %s", where, ref, hub, sha)
    return sha


def pin(hub: str, split: str, subset: str | None, ref: str, out: str | Path) -> HubSource:
    """Resolve ``ref`` to a commit, check that the snapshot, subset and split are there
    (downloading the snapshot when the hub is reachable), and write the manifest ``out``."""
    src = HubSource(hub=hub, split=split, subset=subset, revision=resolve(hub, ref, str(out)))
    verify(src, str(out))
    q = lambda v: "null" if v is None else json.dumps(v, ensure_ascii=False)  # noqa: E731
    text = (f"# hub dataset for ingest.inputs; {ref} pinned by reprotune.data.hub pin\n"
            + "".join(f"{k}: {q(getattr(src, k))}\n" for k in KEYS))
    with io.atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    load_manifest(out)  # what was written reads back as the same source
    return src


def main(argv: list[str] | None = None) -> int:
    """``python -m reprotune.data.hub pin OWNER/NAME --split S [--subset C] [--revision R]
    --out data/raw/NAME.hub.yaml``."""
    ap = argparse.ArgumentParser(prog="python -m reprotune.data.hub", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pin", help="write a manifest pinned to the commit a revision points at")
    p.add_argument("hub", help="dataset repo id, e.g. shibing624/alpaca-zh")
    p.add_argument("--split", required=True)
    p.add_argument("--subset", default=None, help="config name, when the dataset has several")
    p.add_argument("--revision", default="main", help="branch, tag or commit sha (default main)")
    p.add_argument("--out", required=True, help=f"manifest to write, e.g. data/raw/NAME{SUFFIX}")
    args = ap.parse_args(argv)
    if not is_manifest(args.out):
        print(f"--out: {args.out} must end in {SUFFIX} (that is how ingest knows it is a hub "
              f"manifest)", file=sys.stderr)
        return 2
    try:
        src = pin(args.hub, args.split, args.subset, args.revision, args.out)
    except HubError as exc:
        print(f"pin: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {src.hub} split {src.split} pinned at {src.revision}; list it in "
          f"ingest.inputs")
    return 0
