"""The fine-tuned model folder (``models/finetuned/``): written by train, loaded by the rest.

Evaluate, merge and quantize load it with :func:`load_finetuned`. The folder holds either a peft adapter (``kind: adapter``; the base model is loaded from the
manifest's ``base_dir``) or a whole model (``kind: full``), plus the tokenizer with its chat
template and ``reprotune_train.json``. Weights are read from safetensors only: a folder
holding only pickled ``.bin`` weights is refused rather than unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.params import QloraParams
from reprotune.train.methods import PEFT_METHODS

log = logging.getLogger(__name__)

MANIFEST_FILE = "reprotune_train.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the align stage's record; alone in a folder (align.method: none) it points at the SFT folder
ALIGN_FILE = "reprotune_align.json"


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding the weights of ``path``: the SFT folder an align pass-through
    names, else ``path`` itself (an aligned model, or any fine-tuned folder). A pointer
    that is not align's record, or names no folder, is a :class:`FinetunedLoadError`."""
    pointer = Path(path) / ALIGN_FILE
    if not pointer.is_file() or (Path(path) / MANIFEST_FILE).is_file():
        return Path(path)
    restore = f"restore it: dvc checkout {path} (or rerun align: dvc repro -f align)"
    try:
        target = io.read_json(pointer)["model"]
    except (ValueError, KeyError, TypeError) as exc:  # bad UTF-8 or JSON, no "model"
        why = str(exc).splitlines()[0] if not isinstance(exc, KeyError) else "no 'model' key"
        raise FinetunedLoadError(f"{pointer}: corrupt, not the align stage's record ({why}); "
                                 f"{restore}") from None
    if not isinstance(target, str) or not target.strip():
        raise FinetunedLoadError(f"{pointer}: corrupt, its 'model' is {target!r}, not a "
                                 f"folder; {restore}")
    if not (Path(target) / MANIFEST_FILE).is_file():
        raise FinetunedLoadError(f"{pointer}: names {target!r}, which holds no fine-tuned "
                                 f"model ({MANIFEST_FILE}); if the pointer is right, run the "
                                 f"train stage (dvc repro train), else {restore}")
    return Path(target)


def save_finetuned(model: Any, tokenizer: Any, out_dir: str | Path, *, method: str,
                   base_dir: str | Path, enable_thinking: bool,
                   qlora: QloraParams | None = None) -> dict[str, Any]:
    """Write the adapter (peft methods) or the whole model, the tokenizer and the manifest."""
    kind = "adapter" if method in PEFT_METHODS else "full"
    manifest: dict[str, Any] = {
        "method": method, "kind": kind, "base_dir": str(base_dir),
        "enable_thinking": enable_thinking,
        "chat_template_sha256": template_fingerprint(tokenizer.chat_template or "")}
    if method == "qlora":
        q = qlora or QloraParams()
        # the adapter was trained on a 4-bit base; loaders rebuild that base by default
        manifest["quantization"] = {"load_in_4bit": True, "quant_type": q.quant_type,
                                    "double_quant": q.double_quant,
                                    "compute_dtype": q.compute_dtype}
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors: the default of both transformers 5 and peft
        tokenizer.save_pretrained(tmp)
        io.write_json(tmp / MANIFEST_FILE, manifest)
    log.info("saved %s (%s) to %s", kind, method, out_dir)
    return manifest


class FinetunedLoadError(RuntimeError):
    """The fine-tuned model folder is missing, incomplete or not safetensors."""


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """``reprotune_train.json`` of a fine-tuned model folder, checked for its required keys."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FinetunedLoadError(f"{path}: not found; run the train stage first")
    manifest = io.read_json(path)
    missing = {"method", "kind", "base_dir"} - set(manifest)
    if missing or manifest["kind"] not in ("adapter", "full"):
        raise FinetunedLoadError(f"{path}: missing keys {sorted(missing)} or unknown kind "
                                 f"{manifest.get('kind')!r}; rerun the train stage")
    return manifest


def require_safetensors(model_dir: Path) -> None:
    """A full model folder must hold safetensors weights: pickles are never loaded."""
    if not any(model_dir.glob("*.safetensors")):
        raise FinetunedLoadError(f"{model_dir}: no .safetensors weights (pickled weights are "
                                 f"not loaded); rerun the train stage")


def _dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or not isinstance(dtype, str):
        return dtype if dtype is not None else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load_finetuned(model_dir: str | Path, *, dtype: Any = None, device: str | None = None,
                   base_dir: str | Path | None = None, quantized: bool | None = None,
                   ) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, manifest)`` from a train-stage output folder, in eval mode.

    ``dtype``: torch dtype or ``fp32``/``bf16``/``fp16`` (default fp32). ``device``: where
    to put the model (default cpu). ``base_dir`` overrides the manifest's base path (e.g.
    when the folder moved). ``quantized``: for qlora adapters, whether to rebuild the 4-bit
    base they were trained on (default: yes; ``False`` attaches them to the full-precision
    base, as merging does).
    """
    from transformers import AutoModelForCausalLM

    from reprotune.modeling import load_tokenizer

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    device = device or "cpu"
    dtype = _dtype(dtype)
    tokenizer = load_tokenizer(model_dir)
    if manifest["kind"] == "full":
        require_safetensors(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                     use_safetensors=True, local_files_only=True)
        model.to(device)
        return model.eval(), tokenizer, manifest

    from peft import PeftModel

    if not (model_dir / ADAPTER_WEIGHTS).is_file():
        raise FinetunedLoadError(f"{model_dir}: no {ADAPTER_WEIGHTS} (pickled adapters are not "
                                 f"loaded); rerun the train stage")
    base = Path(base_dir or manifest["base_dir"])
    if not base.is_dir():
        raise FinetunedLoadError(f"{model_dir}/{MANIFEST_FILE}: base_dir {str(base)!r} not found "
                                 f"(relative to {Path.cwd()}); pass base_dir= or rerun the base stage")
    quant = manifest.get("quantization")
    if quant and quantized is not False:
        from transformers import BitsAndBytesConfig

        from reprotune.train.methods import resolve_compute_dtype

        compute = resolve_compute_dtype(quant["compute_dtype"], device)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                 bnb_4bit_use_double_quant=quant["double_quant"],
                                 bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(
            str(base), dtype=compute, quantization_config=bnb, device_map={"": device},
            use_safetensors=True, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, use_safetensors=True,
                                                     local_files_only=True).to(device)
    # PeftModel reads adapter_model.safetensors when present (checked above)
    model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False,
                                      torch_device=device)
    log.info("loaded %s adapter from %s on base %s", manifest["method"], model_dir, base)
    return model.eval(), tokenizer, manifest
