"""What a local model folder (``model.name: path/to/folder``) holds that transformers would
refuse only with a traceback: model or tokenizer code of its own (``auto_map``) while
``model.trust_remote_code`` is false, and weights saved only as pickles (``pytorch_model.bin``,
which reprotune never unpickles: unpickling can run code). :func:`folder_problem` says so in
one line with the fix; ``make check`` (:mod:`reprotune.params`) and the ``base`` stage
(:func:`reprotune.modeling.prepare_base`) call it before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILES = ("config.json", "tokenizer_config.json")  # where transformers reads auto_map
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _code_files(auto_map: Any) -> list[str]:
    """The .py files an ``auto_map`` names (``"modeling_x.XForCausalLM"``, a list for a
    tokenizer's slow and fast classes, ``"repo--modeling_x.X"`` for code in another repo)."""
    refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else [])
            for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def _builtin(model_type: Any) -> bool:
    """Whether transformers has its own classes for ``model_type`` (then it ignores
    ``auto_map`` unless told to trust the folder's code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def folder_problem(folder: str | Path, name: str, *, trust_remote_code: bool) -> str | None:
    """Why the model folder ``folder`` (given as ``model.name: name``) cannot be loaded as it
    is, with the fix, or None. Checks custom code without trust, and pickle-only weights."""
    folder = Path(folder)
    config = _read(folder / "config.json")
    if not trust_remote_code:
        for file in CONFIG_FILES:
            auto_map = _read(folder / file).get("auto_map")
            if auto_map and not _builtin(config.get("model_type")):
                code = ", ".join(_code_files(auto_map)) or "its auto_map"
                return (f"model.name: {name!r} ships its own code ({code}, named by {file} "
                        f"auto_map) for model_type {config.get('model_type')!r}, which "
                        f"transformers does not know, and model.trust_remote_code is false, so "
                        f"that code is never run; read it, and only if you trust it set "
                        f"model.trust_remote_code: true (or use a model of a built-in "
                        f"architecture)")
    files = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickled and not any(f.endswith(".safetensors") for f in files):
        out = f"{folder.as_posix().rstrip('/')}-safetensors"
        return (f"model.name: {name!r} holds its weights only as pickles ({', '.join(pickled)}), "
                f"which reprotune never loads (unpickling can run code); convert them once where "
                f"you trust the file: python -c \"from transformers import AutoModelForCausalLM "
                f"as M, AutoTokenizer as T; M.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{out}'); T.from_pretrained('{folder}').save_pretrained("
                f"'{out}')\" and set model.name: {out}")
    return None
