"""A causal-LM loss that never holds the logits of the whole batch.

The stock path (``model(**batch).loss``) materialises ``[tokens, vocab]`` logits, then fp32
copies and their gradients: at batch 8 x 2048 tokens x Qwen3's 151,936-entry vocabulary that
is 5 GB in bf16 before the copies. Here the decoder runs alone, and the output head and the
cross-entropy run together (``train.loss_impl``):

* ``chunked`` (PyTorch, any device): :class:`ChunkedLinearCrossEntropy` takes only the
  positions that have a label, computes their logits a chunk of rows at a time, and computes
  the gradients for hidden states, head weight and bias in the same pass (as fused kernels
  do), so backward is a multiply and no chunk's logits outlive their chunk;
* ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA only; the ``gpu`` extra);
* ``stock``: the model's own forward and loss.

:func:`install` makes the model's own ``forward`` compute the lean loss whenever it is given
``labels``, so the loss runs inside whatever wraps the model (accelerate's autocast,
DistributedDataParallel, FSDP) and the Trainer's own loss bookkeeping stays as it is.

All three return the sum over label tokens divided by ``num_items_in_batch`` (the label
tokens of the whole optimizer step, counted by the Trainer over the shifted labels) when it
is given, else the mean over the batch's label tokens: the stock normalisation, also under
gradient accumulation.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

from reprotune.constants import IGNORE_INDEX
from reprotune.train import fallbacks
from reprotune.train.fused import liger_available

log = logging.getLogger(__name__)

LOSS_IMPLS = ("stock", "chunked", "liger")
# Architectures whose causal-LM forward is exactly decoder -> lm_head -> cross-entropy (no
# logit soft-capping or scaling, no auxiliary losses): the head can be fused with the loss.
PLAIN_HEAD_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 512 MiB in fp32, whatever the vocabulary
CHUNK_ALIGN = 128  # rows per chunk a multiple of this: whole tensor-core tiles in each GEMM


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def resolve_loss_impl(setting: str, device: str, model: Any, method: str) -> tuple[str, str]:
    """The loss this run uses for ``train.loss_impl`` and a note saying why.

    ``auto``: liger on CUDA when installed, else chunked; stock where the head cannot be fused
    with the loss (soft prompts, a LoRA-wrapped or quantized head, another architecture).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    model_type = getattr(base.config, "model_type", "?")
    blocker = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # ZeRO-3 gathers a weight only around its own module's forward; the fused loss reads
        # the head's weight without calling the head
        blocker = "DeepSpeed may partition the head's weight (ZeRO-3), which it reads directly"
    elif method in ("prompt_tuning", "prefix_tuning"):
        blocker = f"method={method} builds its inputs inside peft's forward"
    elif model_type not in PLAIN_HEAD_MODEL_TYPES:
        blocker = f"model type {model_type!r} is not known to have a plain linear head"
    elif type(head).__name__ != "Linear" or type(head).__module__ != "torch.nn.modules.linear":
        blocker = f"the output head is a {type(head).__name__}, not a plain Linear"
    if setting == "stock":
        return "stock", "train.loss_impl: stock"
    if blocker:
        note = f"train.loss_impl: {setting}, but {blocker}; using the stock loss"
        (log.warning if setting != "auto" else log.info)(note)
        return "stock", note
    if setting == "liger" or (setting == "auto" and device.startswith("cuda") and liger_available()):
        if not (device.startswith("cuda") and liger_available()):
            from reprotune.train.methods import TrainSetupError

            raise TrainSetupError("train.loss_impl: liger needs a CUDA GPU and liger-kernel "
                                  "(pip install -e '.[gpu]'); use auto or chunked")
        return "liger", f"train.loss_impl: {setting}"
    return "chunked", f"train.loss_impl: {setting}"


def _compute_dtype(x: Any) -> Any:
    import torch

    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: one chunk's logits stay under CHUNK_ELEMENTS, in whole CHUNK_ALIGN tiles.

    Fewer, larger chunks mean fewer passes over the head weight's fp32 gradient (each
    chunk reads and writes all of it): at Qwen3's vocabulary 768 rows, not 441.
    """
    rows = CHUNK_ELEMENTS // max(1, vocab) // CHUNK_ALIGN * CHUNK_ALIGN
    return max(CHUNK_ALIGN, min(8192, rows))


class _OutDtype:
    ok: bool = True  # cleared once if this torch/GPU refuses mm with out_dtype


def accumulate_fp32(acc: Any, a: Any, b: Any) -> Any:
    """``acc += a @ b`` with ``acc`` fp32 and the product accumulated in fp32; returns ``acc``.

    fp32 operands: one ``addmm_``. bf16/fp16 operands on CUDA: the GEMM writes its fp32
    accumulator straight into ``acc`` (``out_dtype``), so no chunk's product is rounded to
    bf16 before it is summed; elsewhere (CPU has no ``out_dtype`` GEMM) the operands are
    upcast, exact and only slower. ``acc`` None on CPU: the first product is the
    accumulator (no zero-filled buffer, which for a head's weight is vocab x hidden floats).
    """
    import torch

    if acc is None and not a.is_cuda:
        return torch.mm(a.float(), b.float())
    if acc is None:
        acc = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return acc
    if acc.is_cuda and _OutDtype.ok and a.dtype == b.dtype:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return acc
        except (RuntimeError, TypeError) as exc:  # older torch or GPU: say so once
            _OutDtype.ok = False
            fallbacks.record("addmm_out_dtype", exc, "the chunked loss upcasts the operands")
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return acc


def chunked_linear_cross_entropy(hidden: Any, weight: Any, labels: Any, bias: Any = None, *,
                                 chunk: int | None = None) -> Any:
    """Sum of ``cross_entropy(hidden @ weight.T + bias, labels)`` over non-ignored rows.

    ``hidden`` is ``[N, H]``, ``labels`` ``[N]`` (already shifted). Gradients flow to
    ``hidden``, ``weight`` and ``bias`` where they require them.
    """
    import torch

    dtype = _compute_dtype(hidden)
    # the one host sync of the loss, kept on purpose: it sizes the label rows, so prompt
    # and padding positions cost no logits at all
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad))
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, keep,
                                           chunk or chunk_rows(weight.shape[0]), dtype, track)


def _make_function() -> type:
    """The autograd.Function, built on first use so importing this module stays light."""
    import torch

    class _ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, keep, chunk, dtype, track):
            dev = hidden.device.type
            with torch.autocast(dev, enabled=False):
                h_all, y_all = hidden.index_select(0, keep), labels.index_select(0, keep)
                w = weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                need_h, need_w = track and hidden.requires_grad, track and weight.requires_grad
                need_b = track and bias is not None and bias.requires_grad
                g_h = torch.zeros_like(h_all) if need_h else None
                g_w = None  # fp32, created by the first chunk (accumulate_fp32)
                g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                for s in range(0, h_all.shape[0], chunk):
                    h, y = h_all[s:s + chunk].to(dtype), y_all[s:s + chunk]
                    logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                    if not (need_h or need_w or need_b):
                        continue
                    # d(sum CE)/d logits = softmax - one_hot, built in place of the logits
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
                    low = grad.to(dtype)
                    if need_h:
                        g_h[s:s + chunk] = (low @ w).to(g_h.dtype)
                    if need_w and (grad.is_cuda or low.dtype == torch.float32):
                        g_w = accumulate_fp32(g_w, low.T, h)  # fp32 sums, products included
                    elif need_w:
                        # CPU has no bf16 GEMM with fp32 output: as in autocast's own linear
                        # backward, the product (summed in fp32 inside the GEMM) is rounded
                        # to bf16 once, then chunks add up in fp32. An fp32 GEMM here cost
                        # as much as the head's two bf16 ones together (SmolLM2, Zen 4).
                        prod = low.T @ h
                        g_w = prod.float() if g_w is None else g_w.add_(prod)
                    if need_b:
                        g_b += grad.sum(0)
            ctx.shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype,
                                                   None if bias is None else bias.dtype)
            ctx.done = False
            ctx.save_for_backward(keep, g_h, g_w, g_b)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            keep, g_h, g_w, g_b = ctx.saved_tensors
            if ctx.done:  # the gradients below are scaled in place: one backward only
                raise RuntimeError("the chunked loss can be back-propagated once")
            ctx.done = True
            d_h = d_w = d_b = None
            if g_h is not None:
                d_h = torch.zeros(ctx.shape, dtype=ctx.dtypes[0], device=g_h.device)
                d_h.index_copy_(0, keep, (g_h * grad_out).to(ctx.dtypes[0]))
            if g_w is not None:  # in place: no second vocab x hidden buffer
                d_w = g_w.mul_(grad_out).to(ctx.dtypes[1])
            if g_b is not None:
                d_b = (g_b * grad_out).to(ctx.dtypes[2])
            return d_h, d_w, d_b, None, None, None, None, None

    return _ChunkedLinearCrossEntropy


class _Lazy:
    fn: type | None = None


def _function() -> type:
    if _Lazy.fn is None:
        _Lazy.fn = _make_function()
    return _Lazy.fn


class ChunkedLinearCrossEntropy:
    """``apply(hidden, weight, bias, labels, keep, chunk, dtype, track)``: see the module doc."""

    @staticmethod
    def apply(*args: Any) -> Any:
        return _function().apply(*args)


def liger_linear_cross_entropy(hidden: Any, weight: Any, labels: Any, bias: Any = None) -> Any:
    """Sum of the cross-entropy by liger-kernel's fused Triton kernel (CUDA)."""
    import inspect

    import torch
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    dtype = _compute_dtype(hidden)
    extra = {}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
        extra["accum_dtype"] = torch.float32  # the head's gradient summed in fp32 (0.6.2+)
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", **extra)
    return fn(weight.to(dtype), hidden.to(dtype), labels,
              None if bias is None else bias.to(dtype)).float()


class _LigerLoss:
    failed: bool = False  # set once if liger's fused loss raised: chunked from then on


def causal_lm_loss(model: Any, inputs: dict[str, Any], impl: str,
                   num_items_in_batch: Any = None) -> Any:
    """The batch's loss with ``impl`` (``chunked`` or ``liger``), stock normalisation."""
    import torch

    batch = dict(inputs)
    labels = batch.pop("labels")
    decoder, head = _decoder_and_head(model)
    # no KV cache in training: the hidden states are all we need
    hidden = decoder(**batch, use_cache=False).last_hidden_state
    # predictions at position i target label i+1, within each row (packed rows carry an
    # IGNORE_INDEX at every sample start, so no target crosses a sample boundary)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    total = None
    if impl == "liger" and not _LigerLoss.failed:
        try:
            total = liger_linear_cross_entropy(h, head.weight, y, head.bias)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a refusing kernel: the chunked loss, said loudly
            _LigerLoss.failed = True
            fallbacks.record("liger_loss", exc, "the chunked loss for the rest of this process")
    if total is None:
        total = chunked_linear_cross_entropy(h, head.weight, y, head.bias)
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


# forward() arguments that only shape the stock output; the lean path returns a loss alone
_OUTPUT_ONLY = ("return_dict", "output_attentions", "output_hidden_states", "logits_to_keep",
                "use_cache")


def install(model: Any, impl: str) -> None:
    """Make the (base) model's ``forward`` return the ``impl`` loss when given labels.

    Inside forward, a wrapper around the model (DDP's gradient hooks, FSDP's unsharding,
    accelerate's autocast) covers the lean loss as it covers the stock one. Without labels
    (generation, logits wanted) the model's own forward runs. :func:`uninstall` undoes it.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stock = type(base).forward

    def forward(self: Any, input_ids: Any = None, labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if labels is None or kwargs.get("inputs_embeds") is not None:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return stock(self, input_ids=input_ids, labels=labels, **kwargs)
        batch = {k: v for k, v in kwargs.items() if k not in _OUTPUT_ONLY and v is not None}
        loss = causal_lm_loss(self, {"input_ids": input_ids, "labels": labels, **batch}, impl,
                              num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    base.forward = types.MethodType(forward, base)
    base._reprotune_loss_impl = impl


def uninstall(model: Any) -> None:
    """Give the model back its own forward (before saving or reusing it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "forward" in vars(base) and getattr(base, "_reprotune_loss_impl", None):
        del base.forward
        del base._reprotune_loss_impl
