"""The official Qwen3 chat template, embedded in the package, and its fingerprint.

The template (Apache-2.0, from the Qwen3 model cards) ships as package data so the
pipeline never needs the hub or a shared folder to know how conversations are rendered.
Every artifact records :func:`template_fingerprint` of the template it was trained with,
so later stages can check that training and inference render prompts the same way.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

TEMPLATE_FILE = "qwen3_chat_template.jinja"


@lru_cache(maxsize=1)
def qwen3_template() -> str:
    """The embedded Qwen3 chat template, byte for byte as published (no trailing newline)."""
    ref = resources.files("reprotune").joinpath("templates", TEMPLATE_FILE)
    # read_bytes + decode, not read_text: universal-newline handling must not alter the bytes
    return ref.read_bytes().decode("utf-8")


def template_fingerprint(template: str) -> str:
    """sha256 hex digest of a chat template's UTF-8 bytes."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
