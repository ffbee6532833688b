"""GPU speed-ups applied to a prepared model: liger-kernel's fused layers, a bf16 frozen base.

* :func:`apply_liger`: where liger-kernel is installed and the run is on CUDA, its kernels
  for RMSNorm, RoPE and SwiGLU replace the eager ones through its public
  ``liger_kernel.transformers.apply_liger_kernel_to_<model_type>`` (the fused linear
  cross-entropy is the lean loss's ``liger`` choice, :mod:`reprotune.train.lean_loss`). Its
  RoPE patch is module-wide: every model of that type built later in the process uses it.
  Absent, on CPU or refused: the eager path, and the note says why;
* :func:`cast_frozen_base`: for methods that train a small part (LoRA, freeze, soft prompts)
  on CUDA in bf16, the frozen weights are stored in bf16 (they never receive an update, and
  autocast computes in bf16 anyway); trainable parameters keep fp32 master weights. A
  ``freeze`` run saves the whole model, so :func:`restore_frozen` puts the exact fp32 base
  weights back from the base's safetensors before saving.

Full fine-tuning keeps fp32 master weights everywhere (every weight is updated: rounding
each update to bf16 would lose small steps).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from reprotune.train import fallbacks

log = logging.getLogger(__name__)

LIGER_KERNELS = ("rope", "rms_norm", "swiglu")
BF16_BASE_METHODS = ("lora", "freeze", "prompt_tuning", "prefix_tuning")


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def liger_available() -> bool:
    """liger-kernel is installed (its kernels are Triton: CUDA only)."""
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model: Any, device: str) -> tuple[list[str], str]:
    """Apply liger-kernel's layer kernels to ``model`` where it can; (kernels applied, note)."""
    if not device.startswith("cuda"):
        return [], f"liger-kernel: not on {device} (its Triton kernels need CUDA)"
    if not liger_available():
        return [], "liger-kernel is not installed: eager RMSNorm, RoPE and SwiGLU"
    base = _base(model)
    model_type = getattr(base.config, "model_type", "?")
    try:
        from liger_kernel import transformers as liger
    except Exception as exc:  # noqa: BLE001 - a broken optional install is a note, not a crash
        fallbacks.record("liger_kernels", exc, "eager RMSNorm, RoPE and SwiGLU")
        return [], f"liger-kernel does not import ({fallbacks.reason(exc)}); eager layers"
    fn = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        return [], f"liger-kernel has no kernels for model type {model_type!r}; eager layers"
    params = inspect.signature(fn).parameters
    wanted = {k: True for k in LIGER_KERNELS if k in params}
    # the loss is the lean loss's business; liger's own forward would bypass it
    off = {k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in params}
    try:
        fn(**wanted, **off, model=base)
    except Exception as exc:  # noqa: BLE001 - refused: keep the eager layers, say why
        fallbacks.record("liger_kernels", exc, f"eager layers for {model_type}")
        return [], f"liger-kernel refused {model_type} ({fallbacks.reason(exc)}); eager layers"
    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        version = "?"
    applied = sorted(wanted)
    note = f"liger-kernel {version}: apply_liger_kernel_to_{model_type}({', '.join(applied)})"
    log.info(note)
    return applied, note


def cast_frozen_base(model: Any, method: str, device: str, precision: str) -> tuple[list[str], str]:
    """Store the frozen weights in bf16 where it is safe and useful; (names cast, note)."""
    import torch

    if method not in BF16_BASE_METHODS:
        if method == "qlora":
            return [], "method=qlora: 4-bit base (qlora.compute_dtype), fp32 adapters"
        return [], f"method={method}: fp32 master weights"
    if not device.startswith("cuda") or precision != "bf16":
        return [], f"frozen base in fp32 ({device}, precision {precision}; bf16 on CUDA only)"
    names, count = [], 0
    for name, p in model.named_parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            names.append(name)
            count += p.numel()
    note = f"frozen base in bf16 ({count:,} parameters); trainable parameters fp32"
    log.info(note)
    return names, note


def restore_frozen(model: Any, base_dir: str | Path, names: list[str]) -> int:
    """Put the fp32 base weights of ``names`` (bf16 since :func:`cast_frozen_base`) back,
    read from the base's safetensors; returns how many tensors were restored."""
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
    todo = {n for n in names if n in params}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key in todo:
                    p = params[key]
                    p.data = fh.get_tensor(key).to(device=p.device, dtype=torch.float32)
                    todo.discard(key)
    for key in sorted(todo):  # not in the files (renamed by a wrapper): widen what is there
        log.warning("%s: not found in %s; saved from its bf16 copy", key, base_dir)
        params[key].data = params[key].data.float()
    return len([n for n in names if n in params]) - len(todo)
