"""Which fast paths a training run takes: packed attention, lean loss, fused AdamW, compile,
and what ``train.mode`` means on this machine.

``train.mode`` (:func:`mode_summary`): ``portable`` (the default) keeps CPU runs
bit-reproducible: fp32, and the AVX2 kernel pin that ``import reprotune`` sets, so the same
params and data give the same bytes on any x86-64 machine. ``fast`` lets ``train.precision:
auto`` pick bf16 autocast on a CPU that computes in bf16 (:func:`cpu_bf16`: AVX512-BF16 or
AMX), whose matrix products then run in oneDNN's bf16 kernels; its numbers hold for that CPU
type only. On CUDA both modes are the same (``auto`` already picks bf16/fp16 there).

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

from reprotune.cpu_kernels import is_portable
from reprotune.params import TrainParams
from reprotune.train import fallbacks, fused, lean_loss, packed_attention
from reprotune.train.cpu import BF16_FLAGS, cpu_bf16, cpu_kernels
from reprotune.train.lean_loss import resolve_loss_impl
from reprotune.train.methods import decoder_layers

log = logging.getLogger(__name__)

OPTIMIZER = "adamw_torch_fused"  # training_arguments() sets it; recorded here for the metrics


def mode_summary(mode: str, device: str, precision: str) -> dict[str, str]:
    """``mode`` and ``mode_note`` for the metrics: what ``train.mode`` did on ``device``."""
    if not device.startswith("cpu"):
        return {"mode": mode, "mode_note": f"{device}: train.mode changes nothing on a GPU"}
    kernels = cpu_kernels()
    if precision == "bf16":
        flag = cpu_bf16()
        how = f"native bf16 ({flag})" if flag else "bf16 emulated by this CPU (slower than fp32)"
        note = (f"bf16 autocast on CPU, {how}, {kernels}: results are specific to this CPU "
                f"type and may differ in the last digits elsewhere")
    elif mode == "fast":
        note = (f"train.mode: fast, but precision {precision} (this CPU has none of "
                f"{', '.join(BF16_FLAGS)}, or train.precision is set), {kernels}")
    elif is_portable():
        note = f"fp32, {kernels}: the same bytes on Intel and AMD x86-64 CPUs with AVX2"
    else:
        note = f"fp32, {kernels} (native kernels): results hold on this CPU type"
    return {"mode": mode, "mode_note": note}


# glibc mallopt parameters: allocations below the mmap threshold come from the heap, and free
# heap memory is returned to the system only above the trim threshold
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> str:
    """On glibc (Linux), keep freed memory in the process for the next step (a note says what
    was done, for the metrics).

    A CPU training step allocates and frees hundreds of megabytes of activations, casts and
    gradients (the tied head's gradient alone is vocab x hidden floats). glibc serves blocks
    above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh ``mmap`` pages and
    returns freed heap tops to the system, so every step pays page faults to zero the same
    memory again: measured on SmolLM2-135M (bf16, one thread), 155,000 faults per step, and
    a cast of an MLP weight 2.1 ms on average against 0.2 ms alone. With both thresholds at
    1 GiB the faults drop to ~10,000 per step (about 15% less profiled step time, one
    measurement each way) for ~0.4 GB more peak RSS. No number changes: only where freed
    memory goes.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl, macOS: no mallopt knobs)
    except (OSError, AttributeError):
        return "system allocator unchanged (not glibc)"
    ok = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    if not ok:
        return "glibc: mallopt refused; allocator unchanged"
    return f"glibc: freed memory kept for reuse (mmap and trim thresholds {KEEP_BYTES >> 20} MiB)"


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place; returns how many.

    Compilation happens at a layer's first call. Where it fails (no working compiler, a
    graph dynamo cannot take), every layer goes back to eager for the rest of the run and
    the failure is a recorded fast-path fallback (:mod:`reprotune.train.fallbacks`); out of
    memory is not a compilation failure and is raised as it is.
    """
    import torch

    layers = decoder_layers(model)

    def back_to_eager() -> None:
        for layer in layers:
            layer._compiled_call_impl = None

    for layer in layers:
        layer.compile()
        compiled = layer._compiled_call_impl

        def guarded(*args: Any, _compiled: Any = compiled, _layer: Any = layer,
                    **kwargs: Any) -> Any:
            try:
                return _compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager, said loudly
                fallbacks.record("torch_compile", exc, "eager decoder layers")
                back_to_eager()
                return _layer._call_impl(*args, **kwargs)

        layer._compiled_call_impl = guarded
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
    out: dict[str, Any] = {"packing": packing, "restore_attention": None,
                           **mode_summary(train.mode, device, precision)}
    kernels, out["fused_note"] = fused.apply_liger(model, device)
    out["fused_kernels"] = ", ".join(kernels) if kernels else "none"
    out["bf16_frozen"], out["base_dtype_note"] = fused.cast_frozen_base(model, method, device,
                                                                        precision)
    if device == "cpu":
        out["allocator"] = keep_freed_memory()
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
