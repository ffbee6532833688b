"""Attention confined to each sample of a packed row, registered with transformers.

:func:`enable` registers ``reprotune_packed`` through transformers' ``AttentionInterface``
(and a matching entry in ``AttentionMaskInterface``) and switches a model to it. Per call:

* a packed batch (``cu_seq_lens_q`` in the kwargs, from :class:`reprotune.train.packing.PackingCollator`):
  - CUDA with fp16/bf16 activations: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's
    FlashAttention-2 varlen kernel, causal through ``window_size=(-1, 0)``, GQA native): one
    kernel for the whole row, no T x T mask;
  - otherwise (CPU, fp32, dropout, an older torch): transformers' own ``sdpa`` attention run
    sample by sample, i.e. exactly the computation of each sample alone. Cost is the sum of
    the squared sample lengths, not the squared row length;
* any other batch (the padded evaluation batches): transformers' ``sdpa``, unchanged.

:func:`disable` restores the previous implementation (before saving: a saved model must not
name an attention function that only exists in this process).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

NAME = "reprotune_packed"


def varlen_available() -> bool:
    """PyTorch's varlen FlashAttention is importable and a CUDA device is present."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def kernel_name(device: str) -> str:
    """What packed batches will run on ``device`` (recorded in the train metrics)."""
    if device.startswith("cuda") and varlen_available():
        return "varlen_attn (torch FlashAttention-2 varlen)"
    return "sdpa per sample"


def _compute_dtype(query: Any) -> Any:
    import torch

    dev = query.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype


def _varlen(query: Any, key: Any, value: Any, cu: Any, max_len: int, scaling: float | None,
            dtype: Any) -> Any:
    from torch.nn.attention.varlen import varlen_attn

    # transformers hands over [1, heads, T, head_dim]; varlen wants [T, heads, head_dim]
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),
                      enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0)  # [1, T, heads, head_dim], the layout attention functions return


def packed_attention_forward(module: Any, query: Any, key: Any, value: Any,
                             attention_mask: Any, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """An ``AttentionInterface`` function: per-sample attention for packed rows, sdpa otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    max_len = kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    dtype = _compute_dtype(query)
    if (query.is_cuda and dropout == 0.0 and dtype in (torch.float16, torch.bfloat16)
            and varlen_available()):
        return _varlen(query, key, value, cu, int(max_len), scaling, dtype), None
    bounds = cu.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                   None, dropout=dropout, scaling=scaling, **kwargs)[0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outs, dim=1), None


def _mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """sdpa's mask for padded batches; none for packed rows (boundaries come as cu_seq_lens)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``reprotune_packed`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)


def _base(model: Any) -> Any:
    # a peft model's config is its base model's; set it where the attention layers read it
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable(model: Any) -> str:
    """Switch ``model`` to packed attention; returns the implementation to restore later."""
    register()
    base = _base(model)
    previous = base.config._attn_implementation
    if previous not in ("sdpa", "eager", NAME):
        log.warning("packing: the model used attention %r; packed rows run %s instead",
                    previous, NAME)
    base.set_attn_implementation(NAME)
    return previous


def disable(model: Any, previous: str) -> None:
    """Restore the attention implementation that :func:`enable` replaced."""
    _base(model).set_attn_implementation(previous)
