"""Fine-tuning methods: load the base for a method and mark what trains.

``method`` (top-level param) picks one of:

* ``full``: every parameter trains;
* ``freeze``: only the top ``freeze.trainable_layers`` decoder layers, plus the final norm
  (``freeze.train_norm``) and the output head (``freeze.train_lm_head``). With tied
  embeddings (the embedded tiny model and Qwen3-0.6B tie them) ``lm_head.weight`` *is*
  ``embed_tokens.weight``: training the head also trains the input embeddings, and freezing
  it freezes both;
* ``lora``: peft LoRA on ``lora.target_modules`` (optionally DoRA / rsLoRA);
* ``qlora``: the base loaded in 4 bit by bitsandbytes (NF4/FP4, double quantisation, a
  compute dtype), ``prepare_model_for_kbit_training``, then LoRA as above;
* ``prompt_tuning`` / ``prefix_tuning``: peft soft prompts of ``prompt.num_virtual_tokens``.

Every misconfiguration that can be seen before training raises :class:`TrainSetupError`
naming the param and what would work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from reprotune.params import FreezeParams, LoraParams, PromptParams, QloraParams

log = logging.getLogger(__name__)

METHODS = ("full", "freeze", "lora", "qlora", "prompt_tuning", "prefix_tuning")
PEFT_METHODS = ("lora", "qlora", "prompt_tuning", "prefix_tuning")
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


class TrainSetupError(ValueError):
    """Bad training input found before any training step; the message names the param."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise TrainSetupError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def resolve_compute_dtype(name: str, device: str) -> Any:
    """``auto``: bf16 on CUDA with bf16 support, else fp16 on CUDA, fp32 on CPU."""
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_base(base_dir: str | Path, method: str, *, qlora: QloraParams | None = None,
              device: str = "cpu") -> Any:
    """Load the base model from safetensors for ``method`` (4-bit for qlora, fp32 otherwise).

    fp32 master weights for every other method: mixed precision (if any) comes from the
    Trainer's autocast, so optimizer updates never round to bf16/fp16.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_method(method)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method == "qlora":
        qlora = qlora or QloraParams()
        compute = resolve_compute_dtype(qlora.compute_dtype, device)
        kwargs = {"dtype": compute, "device_map": {"": device},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type,
                      bnb_4bit_use_double_quant=qlora.double_quant,
                      bnb_4bit_compute_dtype=compute)}
        log.info("qlora: 4-bit %s base, double quantisation %s, compute dtype %s",
                 qlora.quant_type, qlora.double_quant, compute)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), use_safetensors=True,
                                                 local_files_only=True, **kwargs)
    if method != "qlora":
        model.to(device)
    return model


# --------------------------------------------------------------------------- helpers
def decoder_layers(model: Any) -> Any:
    """The decoder's stack of layers (the ModuleList with ``num_hidden_layers`` entries)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return module
    raise TrainSetupError(f"method=freeze: cannot find the decoder layers of "
                          f"{type(model).__name__}; use method=full or lora")


def _supported_by_lora(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d,
                               torch.nn.Conv2d)) or type(module).__name__ == "Conv1D"


def linear_module_names(model: Any) -> list[str]:
    """Distinct last name parts of the model's linear layers (q_proj, ..., lm_head)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def check_lora_targets(model: Any, targets: list[str]) -> None:
    """Every target must name (by full name or last name parts) a layer LoRA can wrap."""
    if targets == [ALL_LINEAR]:
        return
    modules = dict(model.named_modules())
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        bad = [type(m).__name__ for m in hits if not _supported_by_lora(m)]
        if not hits or bad:
            why = "matches no module" if not hits else f"matches {sorted(set(bad))} which LoRA cannot wrap"
            raise TrainSetupError(
                f"lora.target_modules: {target!r} {why} of {type(model).__name__}; linear "
                f"modules that exist: {', '.join(linear_module_names(model))} "
                f"(or [{ALL_LINEAR}] for all of them but the output head)")


def trainable_summary(model: Any) -> dict[str, Any]:
    """Trainable and total parameter counts and the trainable share.

    bitsandbytes packs two 4-bit weights per byte; those tensors count twice their numel
    (as peft's own count does), so ``total`` is the model's real parameter count.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            storage = getattr(p, "quant_storage", None)
            n *= 2 * (storage.itemsize if storage is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total,
            "share": round(trainable / total, 6) if total else 0.0}


# --------------------------------------------------------------------------- methods
def _freeze(model: Any, cfg: FreezeParams) -> Any:
    layers = decoder_layers(model)
    if cfg.trainable_layers > len(layers):
        raise TrainSetupError(f"freeze.trainable_layers: {cfg.trainable_layers} > the model's "
                              f"{len(layers)} decoder layers; use 1..{len(layers)} (or method=full)")
    for p in model.parameters():
        p.requires_grad = False
    for layer in layers[len(layers) - cfg.trainable_layers:]:
        for p in layer.parameters():
            p.requires_grad = True
    if cfg.train_norm:
        norm = getattr(getattr(model, "model", model), "norm", None)
        if norm is None:
            raise TrainSetupError("freeze.train_norm: the model has no final norm (model.norm); "
                                  "set it to false")
        for p in norm.parameters():
            p.requires_grad = True
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if cfg.train_lm_head:
        head.weight.requires_grad = True
        if tied:
            log.warning("freeze.train_lm_head: lm_head is tied to embed_tokens, so the input "
                        "embeddings train too (one shared matrix)")
    elif tied:
        log.info("freeze: lm_head is tied to embed_tokens; both stay frozen")
    return model


def _keep_4bit_weights_differentiable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight the first time
    it runs in eval mode without grad (the Trainer's evaluation) and from then on uses a
    kernel with no autograd support, also in training: gradients no longer flow back through
    the frozen 4-bit layers (measured here: layer-0 LoRA gradients off by ~30%).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _lora_config(cfg: LoraParams) -> Any:
    from peft import LoraConfig

    targets: Any = ALL_LINEAR if cfg.target_modules == [ALL_LINEAR] else list(cfg.target_modules)
    return LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)


def prepare_model(model: Any, method: str, *, lora: LoraParams | None = None,
                  freeze: FreezeParams | None = None, prompt: PromptParams | None = None,
                  gradient_checkpointing: bool = False) -> Any:
    """Mark what trains for ``method``; peft methods return the wrapped ``PeftModel``.

    Seed torch before calling: LoRA and soft-prompt weights are drawn from its RNG.
    """
    from transformers import PreTrainedModel

    check_method(method)
    lora, freeze, prompt = lora or LoraParams(), freeze or FreezeParams(), prompt or PromptParams()
    if not isinstance(model, PreTrainedModel):
        raise TrainSetupError(f"method={method}: needs a transformers PreTrainedModel, got "
                              f"{type(model).__name__} (load it with methods.load_base)")
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if method == "freeze":
        return _freeze(model, freeze)

    from peft import (
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    if method in ("lora", "qlora"):
        check_lora_targets(model, lora.target_modules)
        if method == "qlora":
            if not getattr(model, "is_loaded_in_4bit", False):
                raise TrainSetupError("method=qlora: the base model is not loaded in 4 bit; load "
                                      "it with methods.load_base(..., method='qlora')")
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
            _keep_4bit_weights_differentiable(model)
        elif getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise TrainSetupError("method=lora: the base is quantized; use method=qlora")
        return get_peft_model(model, _lora_config(lora))
    if method == "prefix_tuning" and gradient_checkpointing:
        # the prefix lives in the KV cache, which checkpointed layers do not keep
        raise TrainSetupError("train.gradient_checkpointing: not supported with "
                              "method=prefix_tuning; set it to false")
    cls = PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig
    return get_peft_model(model, cls(task_type="CAUSAL_LM",
                                     num_virtual_tokens=prompt.num_virtual_tokens))


def virtual_tokens(method: str, prompt: PromptParams) -> int:
    """Positions a soft-prompt method adds in front of every sequence (0 for the others)."""
    return prompt.num_virtual_tokens if method in ("prompt_tuning", "prefix_tuning") else 0
