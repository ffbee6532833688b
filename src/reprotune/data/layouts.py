"""Which layout an input file holds, conversations or text documents, for the check stage.

``format.mode`` decides how the format stage turns records into training rows: ``chat``
renders conversations with the chat template, ``text`` packs plain documents for continued
pretraining (:mod:`reprotune.data.text_packing`). The check stage runs before any input is
read, so it looks at the first readable row of each local input (a ``.txt`` file is a
document by its name) and refuses a mode that does not fit, naming ``format.mode`` and what
to set, before DVC deletes any output. A file that mixes the two layouts is caught later, by
the format stage, which refuses every record of the other layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from reprotune.data.formats import TEXT, detect_format
from reprotune.data.hub.manifest import is_manifest
from reprotune.data.readers import iter_rows

CHAT = "chat"
PEEK_ROWS = 20  # rows looked at for one that parses (a file's first rows may be broken)


class LayoutError(ValueError):
    """``format.mode`` does not fit the inputs; the message names the key and the fix."""


def input_layout(path: str | Path, columns: Mapping[str, str] | None = None) -> str | None:
    """``"text"``, ``"chat"``, or None when the file's first rows say nothing (a hub
    manifest, a missing file, no parseable row among the first :data:`PEEK_ROWS`)."""
    if is_manifest(path) or not Path(path).is_file():
        return None
    if Path(path).suffix.lower() == ".txt":
        return TEXT
    renamed = {user: canon for canon, user in (columns or {}).items()}
    try:
        for i, raw in enumerate(iter_rows(path)):
            if i >= PEEK_ROWS:
                break
            if raw.data is not None:
                fmt = detect_format({renamed.get(k, k): v for k, v in raw.data.items()})
                if fmt is not None:
                    return TEXT if fmt == TEXT else CHAT
    except (OSError, ValueError):  # a file-level problem: the read stage reports it
        return None
    return None


def check_layouts(inputs: Sequence[str], mode: str,
                  columns: Mapping[str, str] | None = None) -> None:
    """Raise :class:`LayoutError` when an input's layout does not fit ``format.mode``."""
    found = {path: input_layout(path, columns) for path in inputs}
    other = {CHAT: TEXT, TEXT: CHAT}[mode]
    wrong = [path for path, layout in found.items() if layout == other]
    if not wrong:
        return
    if mode == CHAT:
        raise LayoutError(
            f"format.mode: chat, but {', '.join(wrong)} hold(s) text documents ({{\"text\": ...}} "
            f"rows or a .txt file); set format.mode: text to continue "
            f"pretraining on them (docs/data.md, \"Continued pretraining\"), or list "
            f"conversation files in ingest.inputs")
    right = [path for path, layout in found.items() if layout == TEXT]
    raise LayoutError(
        f"format.mode: text, but {', '.join(wrong)} hold(s) conversations; set format.mode: "
        f"chat to fine-tune on them" + (f", or remove them from ingest.inputs and keep the "
                                        f"text input(s) {', '.join(right)}" if right else "")
        + " (DAPT then SFT: two experiments, docs/training.md)")
