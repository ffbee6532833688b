"""The GPU speed-ups that a CPU can check: liger-kernel applied through its public API (a
stand-in module with its signature, as it is not installed here), the bf16 frozen base and
its exact fp32 restore."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from reprotune.params import FreezeParams, LoraParams
from reprotune.train import fused
from reprotune.train.methods import load_base, prepare_model


def test_liger_absent_or_on_cpu_keeps_the_eager_layers(tiny_base_dir):
    model = load_base(tiny_base_dir, "full")
    assert fused.apply_liger(model, "cpu") == (
        [], "liger-kernel: not on cpu (its Triton kernels need CUDA)")
    if not fused.liger_available():
        assert fused.apply_liger(model, "cuda") == (
            [], "liger-kernel is not installed: eager RMSNorm, RoPE and SwiGLU")


def test_liger_is_applied_through_its_public_function(tiny_base_dir, monkeypatch):
    calls = []

    def apply_liger_kernel_to_qwen3(rope=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                                    model=None):  # liger-kernel 0.6's signature
        calls.append({"rope": rope, "rms_norm": rms_norm, "swiglu": swiglu, "model": model,
                      "cross_entropy": cross_entropy, "flce": fused_linear_cross_entropy})

    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub.apply_liger_kernel_to_qwen3 = apply_liger_kernel_to_qwen3
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    monkeypatch.setattr(fused, "liger_available", lambda: True)
    model = prepare_model(load_base(tiny_base_dir, "lora"), "lora", lora=LoraParams(r=2))
    kernels, note = fused.apply_liger(model, "cuda")
    assert kernels == ["rms_norm", "rope", "swiglu"]
    assert note.endswith("apply_liger_kernel_to_qwen3(rms_norm, rope, swiglu)")
    (call,) = calls
    assert call["model"] is model.get_base_model()  # the transformers model, not peft's wrapper
    assert (call["rope"], call["rms_norm"], call["swiglu"]) == (True, True, True)
    assert (call["cross_entropy"], call["flce"]) == (False, False)  # the loss stays ours

    def refuses(**kw):
        raise RuntimeError("Triton: no GPU")

    sub.apply_liger_kernel_to_qwen3 = refuses
    kernels, note = fused.apply_liger(model, "cuda")
    assert kernels == [] and "refused qwen3 (RuntimeError: Triton: no GPU)" in note
    del sub.apply_liger_kernel_to_qwen3
    assert "no kernels for model type 'qwen3'" in fused.apply_liger(model, "cuda")[1]


def test_lora_frozen_base_in_bf16_trainable_parts_fp32(tiny_base_dir):
    torch.manual_seed(0)
    model = prepare_model(load_base(tiny_base_dir, "lora"), "lora", lora=LoraParams(r=2))
    assert fused.cast_frozen_base(model, "lora", "cpu", "fp32")[0] == []
    assert fused.cast_frozen_base(model, "full", "cuda", "bf16")[1] == (
        "method=full: fp32 master weights")
    names, note = fused.cast_frozen_base(model, "lora", "cuda", "bf16")  # as on a GPU
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert names == frozen and note.startswith("frozen base in bf16 (")
    for _, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_freeze_restores_the_exact_fp32_base_before_saving(tiny_base_dir):
    ref = load_base(tiny_base_dir, "freeze")
    model = prepare_model(load_base(tiny_base_dir, "freeze"), "freeze",
                          freeze=FreezeParams(trainable_layers=1))
    names, _ = fused.cast_frozen_base(model, "freeze", "cuda", "bf16")
    assert names and all("layers.0." in n or "embed" in n or "layers" not in n for n in names)
    assert fused.restore_frozen(model, tiny_base_dir, names) == len(names)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, ref_params[name]), name  # byte for byte the base's weights


@pytest.mark.parametrize("method", ["qlora"])
def test_qlora_keeps_its_own_dtypes(method):
    assert fused.cast_frozen_base(None, method, "cuda", "bf16") == (
        [], "method=qlora: 4-bit base (qlora.compute_dtype), fp32 adapters")
