"""Attention confined to each sample of a packed row, registered with transformers.

:func:`enable` registers ``reprotune_packed`` through transformers' ``AttentionInterface``
(and a matching entry in ``AttentionMaskInterface``) and switches a model to it. Per call:

* a packed batch (``cu_seq_lens_q`` in the kwargs, from :class:`reprotune.train.packing.PackingCollator`):
  - CUDA with fp16/bf16 activations: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's
    FlashAttention-2 varlen kernel): one kernel for the whole row, no T x T mask. Its
    signature changed between releases, so it is read once from the installed function's
    parameters (:func:`varlen_signature`), never from a version string: torch 2.10 takes
    ``is_causal`` and no ``scale``; 2.11 ``window_size`` and ``scale`` but no ``enable_gqa``;
    2.12 and later all three. Where GQA is not native, the k/v heads are repeated; where
    ``scale`` is missing, the queries are pre-scaled (exact for any scale);
  - otherwise (CPU, fp32, dropout, no kernel, or the kernel refusing the dtype or shape):
    transformers' own ``sdpa`` attention run sample by sample, i.e. exactly the computation
    of each sample alone. Cost is the sum of the squared sample lengths, not the squared row
    length. On a CPU without AMX, bf16/fp16 queries are computed in fp32 (autocast off, the
    output cast back): PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32
    there (forward + backward, 9 heads x 64, 3 kv heads: 12.6 vs 9.5 ms at 256 tokens, 6.2
    vs 3.3 ms at 128, one thread of an AVX512-BF16 Zen 4), and fp32 is the more exact.
    A kernel that raises is a failed fast path (:mod:`reprotune.train.fallbacks`: one
    warning, ``fast_path_fallbacks: {"varlen": reason}`` in the metrics);
* any other batch (the padded evaluation batches): transformers' ``sdpa``, unchanged.

What packed rows actually ran, and why, is kept for the train metrics (:func:`report`:
``attention``, ``attention_note``). :func:`disable` restores the previous implementation
(before saving: a saved model must not name an attention function that only exists in this
process).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reprotune.train import fallbacks

log = logging.getLogger(__name__)

NAME = "reprotune_packed"
VARLEN = "varlen_attn (torch FlashAttention-2 varlen)"
PER_SAMPLE = "sdpa per sample"
MAX_HEAD_DIM = 256  # FlashAttention-2's limit; head_dim must also be a multiple of 8


@dataclass(frozen=True)
class VarlenSignature:
    """How the installed ``varlen_attn`` is called: the parameters it has."""

    causal: str         # "window_size" (2.11+), "is_causal" (2.10) or "" (cannot say causal)
    scale: bool         # takes ``scale`` (2.11+)
    enable_gqa: bool    # takes ``enable_gqa`` (2.12+); else k/v heads are repeated


def varlen_signature(fn: Callable[..., Any]) -> VarlenSignature:
    """Read ``fn``'s parameters (not the torch version) to know how to call it."""
    params = inspect.signature(fn).parameters
    causal = ("window_size" if "window_size" in params else
              "is_causal" if "is_causal" in params else "")
    return VarlenSignature(causal=causal, scale="scale" in params,
                           enable_gqa="enable_gqa" in params)


@functools.lru_cache(maxsize=1)
def installed_varlen() -> tuple[Callable[..., Any] | None, VarlenSignature | None, str]:
    """The installed kernel, its signature and a note; detected once per process."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None, (f"torch {torch.__version__} has no torch.nn.attention.varlen "
                            f"(torch >= 2.10 has it)")
    sig = varlen_signature(varlen_attn)
    if not sig.causal:
        return None, sig, (f"torch {torch.__version__}: varlen_attn takes neither window_size "
                           f"nor is_causal, so it cannot be asked for causal attention")
    return varlen_attn, sig, f"torch {torch.__version__}: varlen_attn({sig.causal}" + (
        ", scale" if sig.scale else "") + (", enable_gqa" if sig.enable_gqa else
                                          "; k/v heads repeated for GQA") + ")"


def call_varlen(fn: Callable[..., Any], sig: VarlenSignature, q: Any, k: Any, v: Any, cu: Any,
                max_len: int, scaling: float | None) -> Any:
    """Causal varlen attention of ``[T, heads, head_dim]`` tensors through ``fn`` as ``sig``
    says it must be called; returns ``[T, heads_q, head_dim]``."""
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    kwargs: dict[str, Any] = {}
    if sig.causal == "window_size":
        kwargs["window_size"] = (-1, 0)  # (-1, 0) is causal in varlen_attn's convention
    else:
        kwargs["is_causal"] = True
    if heads_q != heads_kv:
        if sig.enable_gqa:
            kwargs["enable_gqa"] = True
        else:  # query head i reads kv head i // group, as transformers' repeat_kv
            k = k.repeat_interleave(heads_q // heads_kv, dim=1)
            v = v.repeat_interleave(heads_q // heads_kv, dim=1)
    default = 1.0 / math.sqrt(head_dim)
    if sig.scale:
        kwargs["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, default, rel_tol=1e-12):
        q = q * (scaling / default)  # softmax(s q k^T) == softmax(default (s/default) q k^T)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


class _Ran:
    """What packed rows ran since :func:`enable` (first reason per path), for the metrics."""

    varlen: bool = False
    fallback: str | None = None
    refused: str | None = None  # the kernel raised once: not tried again in this process


def refusal(query: Any, dtype: Any, dropout: float) -> str | None:
    """Why the varlen kernel cannot run this call (None: it can)."""
    import torch

    if not query.is_cuda:
        return f"{query.device.type}: varlen_attn runs on CUDA only"
    fn, _, note = installed_varlen()
    if fn is None:
        return note
    if _Ran.refused:
        return _Ran.refused
    if dropout:
        return f"attention dropout {dropout} (the varlen path has none)"
    if dtype not in (torch.float16, torch.bfloat16):
        return (f"activations are {str(dtype).removeprefix('torch.')}: the FlashAttention "
                f"kernel takes fp16/bf16 (train.precision: auto or bf16 on a GPU)")
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim}: FlashAttention needs a multiple of 8 up to {MAX_HEAD_DIM}"
    return None


def kernel_name(device: str) -> str:
    """What packed rows are expected to run on ``device`` (before any call)."""
    return VARLEN if device.startswith("cuda") and installed_varlen()[0] is not None else PER_SAMPLE


def report(device: str) -> dict[str, str]:
    """``attention`` and ``attention_note`` for the metrics: what packed rows ran and why."""
    fn, _, note = installed_varlen()
    if _Ran.varlen and not _Ran.fallback:
        return {"attention": VARLEN, "attention_note": note}
    if _Ran.varlen:
        return {"attention": f"{VARLEN}, some calls {PER_SAMPLE}",
                "attention_note": f"{note}; fallback: {_Ran.fallback}"}
    why = _Ran.fallback
    if why is None:  # no packed row ran yet: what is expected
        if not device.startswith("cuda"):
            why = f"{device}: varlen_attn runs on CUDA only"
        elif fn is not None:
            return {"attention": VARLEN, "attention_note": f"{note} (expected; no packed row ran yet)"}
        else:
            why = note
    return {"attention": PER_SAMPLE, "attention_note": why}


def _compute_dtype(query: Any) -> Any:
    import torch

    dev = query.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype


def _varlen(query: Any, key: Any, value: Any, cu: Any, max_len: int, scaling: float | None,
            dtype: Any) -> Any:
    fn, sig, _ = installed_varlen()
    # transformers hands over [1, heads, T, head_dim]; varlen wants [T, heads, head_dim]
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    out = call_varlen(fn, sig, q, k, v, cu, max_len, scaling)
    return out.unsqueeze(0)  # [1, T, heads, head_dim], the layout attention functions return


def cpu_upcast(query: Any) -> bool:
    """Whether per-sample attention runs this low-precision CPU call in fp32 (module doc)."""
    import torch

    from reprotune.train.cpu import cpu_flags

    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
            and "amx_bf16" not in cpu_flags())


def _per_sample(module: Any, query: Any, key: Any, value: Any, cu: Any, dropout: float,
                scaling: float | None, **kwargs: Any) -> Any:
    import contextlib

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    upcast = cpu_upcast(query)
    if upcast:
        query, key, value = (t.float() for t in (query, key, value))
    bounds = cu.tolist()  # the CPU path: one sdpa call per sample needs the bounds on the host
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b],
                                       value[:, :, a:b], None, dropout=dropout, scaling=scaling,
                                       **kwargs)[0]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    out = torch.cat(outs, dim=1)
    return out.to(dtype) if upcast else out


def packed_attention_forward(module: Any, query: Any, key: Any, value: Any,
                             attention_mask: Any, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """An ``AttentionInterface`` function: per-sample attention for packed rows, sdpa otherwise."""
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
    why = refusal(query, dtype, dropout)
    if why is None:
        try:
            out = _varlen(query, key, value, cu, int(max_len), scaling, dtype)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            # a kernel that refuses this GPU, dtype or shape: say so once (a warning and
            # fast_path_fallbacks in the metrics), then per sample
            why = _Ran.refused = (f"varlen_attn refused the call "
                                  f"({fallbacks.reason(exc)[:200]})")
            fallbacks.record("varlen", exc, f"packed rows run {PER_SAMPLE} from now on")
        else:
            _Ran.varlen = True
            return out, None
    if _Ran.fallback is None:
        _Ran.fallback = why
    return _per_sample(module, query, key, value, cu, dropout, scaling, **kwargs), None


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
    _Ran.varlen, _Ran.fallback = False, None
    if _Ran.refused:  # refused earlier in this process: this run is slow too, and says so
        fallbacks.record("varlen", _Ran.refused, f"packed rows run {PER_SAMPLE}")
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
