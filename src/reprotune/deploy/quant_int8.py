"""``int8_dynamic``: torchao dynamic INT8 (``Int8DynamicActivationInt8WeightConfig``).

Weights int8 per output channel (symmetric), activations quantised per token on the fly;
CPU serving. This replaces ``torch.ao.quantization.quantize_dynamic``, which PyTorch has
deprecated. torchao quantises each ``nn.Linear`` not matched by ``keep_full_precision``; its
int8 values and scales are stored pickle-free in ``int8_dynamic.safetensors`` next to the
config and tokenizer. :func:`load_int8_dynamic` rebuilds the torchao model and copies the
stored int8 values and scales back in, so the reloaded weights are bit-identical.

The output head always stays float: generation and perplexity read its ``.weight`` for the
vocabulary size, and with tied embeddings an int8 head would be a second copy of the
embedding matrix. Unquantised tensors are stored in the merged checkpoint's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune.deploy.quant_common import BuildContext, Family, linears, relative_error

INT8_WEIGHTS = "int8_dynamic.safetensors"
INT8_FORMAT = "reprotune-int8-torchao/1"


def _config() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def quantized_names(float_model: Any, keep: Sequence[str]) -> list[str]:
    out_emb = float_model.get_output_embeddings()
    return [n for n in linears(float_model, keep) if float_model.get_submodule(n) is not out_emb]


def save_int8_dynamic(float_model: Any, out: Path, keep: Sequence[str],
                      store_dtype: Any) -> dict[str, Any]:
    """Quantise with torchao and write int8 values, scales and every other tensor to one
    safetensors file; ``float_model`` itself is left unchanged."""
    from safetensors.torch import save_file
    from torchao.quantization import quantize_

    names = quantized_names(float_model, keep)
    quantized = set(names)
    tensors: dict[str, Any] = {}
    errors: dict[str, float] = {}
    for n in names:
        linear = copy.deepcopy(float_model.get_submodule(n))  # the shared model stays float
        w = linear.weight.detach().float()
        quantize_(linear, _config())
        q, scale = linear.weight.qdata, linear.weight.scale.reshape(-1)
        tensors[f"{n}.weight_int8"] = q.contiguous()
        tensors[f"{n}.weight_scale"] = scale.float().contiguous()
        errors[n] = relative_error(w, q.float() * scale.float()[:, None])
    seen: set[int] = set()
    for k, v in float_model.state_dict().items():
        if k.rsplit(".", 1)[0] in quantized and k.endswith(".weight"):
            continue
        if v.data_ptr() in seen:  # tied weights are stored once; tie_weights() restores them
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().to(store_dtype if v.is_floating_point() else v.dtype).contiguous()
    # one metadata key: safetensors writes the metadata map in hash order, so two keys
    # came out in either order and the same weights gave different file bytes run to run
    save_file(tensors, str(out / INT8_WEIGHTS), metadata={"format": INT8_FORMAT})
    return {"quantized_modules": len(names), "layer_errors": errors, "api": "torchao "
            "quantize_(Int8DynamicActivationInt8WeightConfig)"}


def load_int8_dynamic(path: str | Path) -> tuple[Any, Any]:
    """Rebuild an ``int8_dynamic`` artifact -> (model with torchao int8 weights, tokenizer),
    with the artifact's soft prompt attached when it has one."""
    import torch
    from safetensors import safe_open
    from torchao.quantization import quantize_
    from transformers import AutoConfig, AutoModelForCausalLM

    from reprotune.deploy.merge import attach_soft_prompt
    from reprotune.modeling import load_tokenizer

    path = Path(path)
    with safe_open(str(path / INT8_WEIGHTS), framework="pt") as fh:
        if (fh.metadata() or {}).get("format") != INT8_FORMAT:
            raise ValueError(f"{path / INT8_WEIGHTS}: not a {INT8_FORMAT} file; rebuild it "
                             f"with `dvc repro quantize`")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    names = sorted(k.removesuffix(".weight_int8") for k in tensors if k.endswith(".weight_int8"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    packed = {n: (tensors.pop(f"{n}.weight_int8"), tensors.pop(f"{n}.weight_scale"))
              for n in names}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k.endswith(".weight") and k[:-7] in packed)
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path / INT8_WEIGHTS}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    with torch.no_grad():
        for n, (q, scale) in packed.items():  # float placeholders of the right values
            model.get_submodule(n).weight.copy_(q.float() * scale[:, None])
    # a soft prompt goes on before quantising: peft's partial load_state_dict expects float
    wrapped = attach_soft_prompt(model, path)
    wanted = set(names)
    quantize_(model, _config(), filter_fn=lambda m, fqn: fqn in wanted)
    with torch.no_grad():  # the stored values exactly, not a re-quantisation of them
        for n, (q, scale) in packed.items():
            w = model.get_submodule(n).weight
            w.qdata.copy_(q)
            w.scale.copy_(scale.reshape(w.scale.shape))
    model.tie_weights()
    return wrapped.eval(), load_tokenizer(path)


def _build(method: str, ctx: BuildContext, out: Path) -> dict[str, Any]:
    return save_int8_dynamic(ctx.float_model, out, ctx.keep, ctx.dtype)


def _load(method: str, path: Path) -> tuple[Any, Any]:
    return load_int8_dynamic(path)


FAMILY = Family(methods=("int8_dynamic",), build=_build, load=_load)
