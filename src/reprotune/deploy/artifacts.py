"""The registry of quantised-artifact families: build one, load one, by method name.

Every method belongs to one :class:`~reprotune.deploy.quant_common.Family` (its module says
how its files are made and read). :func:`build_artifact` adds what all artifacts share: the
manifest ``reprotune_quant.json`` (method, prompt format, layer errors) and the tokenizer,
chat template and soft prompt beside the weights; :func:`load_artifact` returns what a server
would run, with the ``enable_thinking`` the artifact carries. A method that cannot run here
raises :class:`~reprotune.deploy.quant_common.MethodUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.deploy import quant_bnb, quant_gguf, quant_int8, quant_onnx
from reprotune.deploy.merge import MERGED_INFO_FILE
from reprotune.deploy.quant_common import (
    QUANT_INFO_FILE,
    BuildContext,
    Family,
    save_side_files,
    worst_layers,
)

FAMILIES: tuple[Family, ...] = (quant_int8.FAMILY, quant_bnb.FAMILY, quant_gguf.FAMILY,
                                quant_onnx.FAMILY)
REGISTRY: dict[str, Family] = {m: f for f in FAMILIES for m in f.methods}
METHODS = tuple(REGISTRY)
INT8_METHODS = ("int8_dynamic", "bnb_int8", "gguf_q8_0", "onnx_int8")


def family(method: str) -> Family:
    if method not in REGISTRY:
        raise ValueError(f"unknown quantisation method {method!r} (known: {', '.join(METHODS)})")
    return REGISTRY[method]


def build_artifact(method: str, merged_dir: str | Path, out: str | Path, keep: Sequence[str],
                   float_model: Any) -> dict[str, Any]:
    """Write ``method``'s artifact to folder ``out`` (+ ``reprotune_quant.json``); returns the
    manifest. Raises :class:`MethodUnavailable` when the method cannot run here."""
    from transformers import AutoConfig

    from reprotune.deploy.merge import checkpoint_dtype

    fam = family(method)
    merged_dir, out = Path(merged_dir), Path(out)
    merged = io.read_json(merged_dir / MERGED_INFO_FILE)
    # from disk: ``float_model`` was loaded as float32 whatever the checkpoint holds
    dtype = checkpoint_dtype(AutoConfig.from_pretrained(merged_dir, local_files_only=True))
    out.mkdir(parents=True, exist_ok=True)
    built = fam.build(method, BuildContext(merged_dir, merged, float_model, keep, dtype), out)
    errors = built.pop("layer_errors")
    info = {"method": method, "source_method": merged["method"], "merged": merged["merged"],
            "enable_thinking": merged["enable_thinking"],
            "chat_template_sha256": merged["chat_template_sha256"],
            "keep_full_precision": list(keep), **built,
            "layer_error_mean": round(sum(errors.values()) / len(errors), 6) if errors else None,
            "layer_error_max": round(max(errors.values()), 6) if errors else None,
            "worst_layers": worst_layers(errors),
            "layer_errors": {k: round(v, 6) for k, v in sorted(errors.items())}}
    save_side_files(merged_dir, out, info, tokenizer=not fam.own_tokenizer)
    return info


def load_artifact(method: str, path: str | Path) -> tuple[Any, Any, bool]:
    """(model, tokenizer, enable_thinking) of an artifact folder, as a server would load it;
    ``method`` ``merged`` loads the merge output. Soft prompts are re-attached."""
    from reprotune.deploy.merge import attach_soft_prompt
    from reprotune.modeling import load_model, load_tokenizer

    path = Path(path)
    if method == "merged":
        model, tok = load_model(path), load_tokenizer(path)
        thinking = io.read_json(path / MERGED_INFO_FILE)["enable_thinking"]
    else:
        model, tok = family(method).load(method, path)
        thinking = (quant_gguf.enable_thinking(path) if family(method).own_tokenizer
                    else io.read_json(path / QUANT_INFO_FILE)["enable_thinking"])
    return attach_soft_prompt(model.eval(), path), tok, bool(thinking)
