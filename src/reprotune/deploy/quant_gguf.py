"""``gguf_f16`` / ``gguf_q8_0``: a llama.cpp / Ollama file (:mod:`reprotune.deploy.gguf_export`);
the file carries its own tokenizer, chat template and ``enable_thinking``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprotune.deploy.quant_common import BuildContext, Family, MethodUnavailable


def _build(method: str, ctx: BuildContext, out: Path) -> dict[str, Any]:
    from reprotune.deploy.gguf_export import GGUF_FILE, GGUFUnsupported, export_gguf

    try:
        return export_gguf(ctx.merged_dir, out / GGUF_FILE, qtype=method.split("_", 1)[1],
                           keep_full_precision=ctx.keep,
                           enable_thinking=ctx.merged["enable_thinking"],
                           chat_template_sha256=ctx.merged["chat_template_sha256"])
    except GGUFUnsupported as exc:
        raise MethodUnavailable(str(exc)) from exc


def _load(method: str, path: Path) -> tuple[Any, Any]:
    from reprotune.deploy.gguf_export import GGUF_FILE, load_exported

    return load_exported(path / GGUF_FILE)


def enable_thinking(path: Path) -> bool:
    """The ``enable_thinking`` the GGUF file itself records."""
    from reprotune.deploy.gguf_export import GGUF_FILE, read_gguf_summary

    return bool(read_gguf_summary(path / GGUF_FILE)["enable_thinking"])


FAMILY = Family(methods=("gguf_f16", "gguf_q8_0"), build=_build, load=_load, own_tokenizer=True)
