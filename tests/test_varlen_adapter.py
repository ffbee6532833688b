"""The varlen_attn adapter: called as each torch release (2.10-2.13) requires, checked through
fake kernels with those exact signatures, against per-sample sdpa; and the fallback."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from reprotune.train import fallbacks
from reprotune.train import packed_attention as pa
from reprotune.train.packing import PackingCollator, model_inputs


def reference(q, k, v, cu, causal: bool, scale: float | None, gqa: bool):
    """Per-sample sdpa of [T, H, D] tensors (what a varlen kernel computes)."""
    out = []
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, s, D]
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(out)


CALLS: list[dict] = []


def _kernel(query, key, value, cu_seq_q, causal, scale, gqa, **seen):
    CALLS.append({"kv_heads": key.shape[1], "scale": scale, "causal": causal, **seen})
    if query.shape[1] != key.shape[1] and not gqa:
        raise ValueError("expect query and key/value to have the same number of heads")
    return reference(query, key, value, cu_seq_q, causal, scale, gqa)


# The public signatures, parameter for parameter (torch/nn/attention/varlen.py of each release)
def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                return_aux=None):
    return _kernel(query, key, value, cu_seq_q, is_causal, None, False, is_causal=is_causal)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                scale=None, window_size=(-1, -1)):
    return _kernel(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale, False,
                   window_size=window_size)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                scale=None, window_size=(-1, -1), enable_gqa=False):
    return _kernel(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale, enable_gqa,
                   window_size=window_size, enable_gqa=enable_gqa)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
    return varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                       **{k: kw[k] for k in ("scale", "window_size", "enable_gqa") if k in kw})


def _installed():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


# the installed torch (2.13 here) is the 2.13 fake's signature, parameter for parameter
varlen_2_13.__signature__ = inspect.signature(_installed())

SIGS = {"2.10": (varlen_2_10, pa.VarlenSignature("is_causal", False, False)),
        "2.11": (varlen_2_11, pa.VarlenSignature("window_size", True, False)),
        "2.12": (varlen_2_12, pa.VarlenSignature("window_size", True, True)),
        "2.13": (varlen_2_13, pa.VarlenSignature("window_size", True, True))}


def test_the_installed_signature_is_read_from_its_parameters():
    assert pa.varlen_signature(_installed()) == SIGS["2.13"][1]
    assert {"window_size", "enable_gqa", "scale"} <= set(inspect.signature(_installed()).parameters)
    for fn, sig in SIGS.values():
        assert pa.varlen_signature(fn) == sig
    assert pa.varlen_signature(lambda q, k, v, a, b, c, d: q).causal == ""


def _qkv(heads_q: int = 4, heads_kv: int = 2, d: int = 16, lengths=(5, 1, 9, 3)):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (heads_q, heads_kv, heads_kv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("release", list(SIGS))
@pytest.mark.parametrize("scaling", [None, 0.25, 1 / math.sqrt(16)])
@pytest.mark.parametrize("heads_kv", [4, 2])
def test_each_release_is_called_right_and_matches_per_sample_sdpa(release, scaling, heads_kv):
    fn, sig = SIGS[release]
    q, k, v, cu, longest = _qkv(heads_kv=heads_kv)
    CALLS.clear()
    got = pa.call_varlen(fn, sig, q, k, v, cu, longest, scaling)
    want = reference(q, k, v, cu, True, scaling, heads_kv != 4)
    assert got.shape == q.shape and (got - want).abs().max().item() <= 1e-5
    (call,) = CALLS
    assert call["causal"] is True
    if release == "2.10":
        assert call == {"kv_heads": 4, "scale": None, "causal": True, "is_causal": True}
    else:
        assert call["window_size"] == (-1, 0) and call["scale"] == scaling
        native = release != "2.11"
        assert call.get("enable_gqa", False) == (native and heads_kv != 4)
        # where GQA is not native, the kernel gets the k/v heads repeated
        assert call["kv_heads"] == (heads_kv if native else 4)


def test_a_packed_model_forward_through_the_2_10_kernel_matches_each_sample_alone(
        tiny_base_dir, monkeypatch):
    """The whole attention function (layouts, GQA, scale) through a fake kernel on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    cfg = model.config
    assert cfg.num_attention_heads != cfg.num_key_value_heads  # the tiny model is GQA
    samples = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))}
               for n in (7, 3, 11)]
    batch = model_inputs(PackingCollator()([{"samples": samples}]))
    batch.pop("labels")
    monkeypatch.setattr(pa, "installed_varlen", lambda: (varlen_2_10, SIGS["2.10"][1], "fake 2.10"))
    monkeypatch.setattr(pa, "refusal", lambda query, dtype, dropout: None)  # as on CUDA
    CALLS.clear()
    previous = pa.enable(model)
    try:
        with torch.no_grad():
            packed = model(**batch).logits[0]
        assert pa.report("cuda") == {"attention": pa.VARLEN, "attention_note": "fake 2.10"}
    finally:
        pa.disable(model, previous)
    assert len(CALLS) == cfg.num_hidden_layers and CALLS[0]["kv_heads"] == cfg.num_attention_heads
    start = 0
    with torch.no_grad():
        for s in samples:
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            n = len(s["input_ids"])
            assert (packed[start:start + n] - alone).abs().max().item() <= 1e-4
            start += n


def test_a_refusing_kernel_falls_back_per_sample_and_says_so(tiny_base_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    def refuses(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    samples = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]},
               {"input_ids": [9, 10], "labels": [9, 10]}]
    batch = model_inputs(PackingCollator()([{"samples": samples}]))
    batch.pop("labels")
    monkeypatch.setattr(pa, "installed_varlen", lambda: (refuses, SIGS["2.13"][1], "fake"))
    monkeypatch.setattr(pa._Ran, "refused", None)
    fallbacks.reset()
    real_refusal = pa.refusal
    monkeypatch.setattr(pa, "refusal", lambda q, d, p: pa._Ran.refused)
    previous = pa.enable(model)
    try:
        with torch.no_grad():
            packed = model(**batch).logits[0]
            model(**batch)  # not tried again: one warning
        rep = pa.report("cuda")
    finally:
        pa.disable(model, previous)
    assert rep["attention"] == pa.PER_SAMPLE
    assert rep["attention_note"] == ("varlen_attn refused the call (RuntimeError: FlashAttention "
                                     "only supports Ampere GPUs or newer.)")
    # one warning, naming the failed fast path and its reason (reprotune.train.fallbacks)
    assert caplog.text.count("fast path varlen failed (RuntimeError: FlashAttention only") == 1
    assert fallbacks.report() == {"varlen": "RuntimeError: FlashAttention only supports Ampere "
                                            "GPUs or newer."}
    fallbacks.reset()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([samples[0]["input_ids"]])).logits[0]
    assert (packed[:4] - alone).abs().max().item() <= 1e-4
    # the real checks, on CPU tensors: why the kernel is not even tried
    monkeypatch.setattr(pa._Ran, "refused", None)
    x = torch.zeros(1, 2, 3, 16)
    assert real_refusal(x, torch.float32, 0.0) == "cpu: varlen_attn runs on CUDA only"


def test_report_without_a_kernel_or_on_cpu(monkeypatch):
    pa._Ran.varlen, pa._Ran.fallback = False, None
    assert pa.report("cpu") == {"attention": pa.PER_SAMPLE,
                                "attention_note": "cpu: varlen_attn runs on CUDA only"}
    note = "torch 2.9.0 has no torch.nn.attention.varlen (torch >= 2.10 has it)"
    monkeypatch.setattr(pa, "installed_varlen", lambda: (None, None, note))
    assert pa.report("cuda") == {"attention": pa.PER_SAMPLE, "attention_note": note}
    assert pa.kernel_name("cuda") == pa.PER_SAMPLE
    pa._Ran.fallback = "activations are float32: ..."
    assert pa.report("cuda")["attention_note"] == "activations are float32: ..."
    pa._Ran.fallback = None
