"""Which fast paths a training run takes: packed attention, lean loss, fused AdamW, compile.

:func:`speed_setup` applies ``train.packing`` (already resolved for device and method),
``train.loss_impl`` and ``train.torch_compile`` to a prepared model and returns what ran, for
``metrics/train.json``: ``packing``, ``attention`` (the kernel that packed rows or padded
batches run) with ``attention_note`` saying why, ``loss_impl`` with a note saying why,
``fused_kernels`` (liger-kernel's, where installed, on CUDA) with ``fused_note``,
``base_dtype_note`` (a bf16 frozen base, :mod:`reprotune.train.fused`), ``optim`` and
``torch_compile``.

``train.torch_compile`` compiles each decoder layer (regional compilation: one small graph
reused by every layer, so compile time does not grow with depth); packs are then padded to
static shapes (:class:`reprotune.train.packing.PackingCollator`) so it does not recompile
per pack. It is off by default: no measurement in this repository shows that it pays off
yet (docs/gpu.md).
"""

from __future__ import annotations

import logging
from typing import Any

from reprotune.params import TrainParams
from reprotune.train import fused, lean_loss, packed_attention
from reprotune.train.lean_loss import resolve_loss_impl
from reprotune.train.methods import decoder_layers

log = logging.getLogger(__name__)

OPTIMIZER = "adamw_torch_fused"  # training_arguments() sets it; recorded here for the metrics


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place; returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    log.info("train.torch_compile: compiled %d decoder layers (the first steps include "
             "compilation)", len(layers))
    return len(layers)


def speed_setup(model: Any, train: TrainParams, method: str, device: str,
                packing: bool, precision: str = "fp32") -> dict[str, Any]:
    """Switch ``model`` to the fast paths this run takes and describe them.

    Not metrics: ``restore_attention``, the attention implementation to put back before
    the model is saved (None when unchanged), and ``bf16_frozen``, the parameters stored in
    bf16 (:func:`reprotune.train.fused.cast_frozen_base`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, Any] = {"packing": packing, "restore_attention": None}
    kernels, out["fused_note"] = fused.apply_liger(model, device)
    out["fused_kernels"] = ", ".join(kernels) if kernels else "none"
    out["bf16_frozen"], out["base_dtype_note"] = fused.cast_frozen_base(model, method, device,
                                                                        precision)
    if packing:
        out["restore_attention"] = packed_attention.enable(model)
        # what packed rows will run; train_model replaces both with what they ran
        out.update(packed_attention.report(device))
    else:
        out["attention"] = str(base.config._attn_implementation)
        out["attention_note"] = "unpacked: padded batches run the model's own attention"
    impl, note = resolve_loss_impl(train.loss_impl, device, model, method)
    if impl != "stock":
        lean_loss.install(model, impl)  # inside forward: DDP/FSDP wrappers keep it
    out.update(loss_impl=impl, loss_note=note, optim=OPTIMIZER,
               torch_compile=train.torch_compile)
    if train.torch_compile:
        compile_layers(model)
    log.info("fast paths: packing %s, attention %s, loss %s (%s), optimizer %s, compile %s",
             packing, out["attention"], impl, note, OPTIMIZER, train.torch_compile)
    return out
