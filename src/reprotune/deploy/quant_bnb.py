"""``bnb_int8`` / ``bnb_nf4``: bitsandbytes LLM.int8() / NF4 (double quantisation) through
transformers' ``BitsAndBytesConfig``, saved with ``save_pretrained`` and reloadable with
``from_pretrained``; bitsandbytes >= 0.45 has CPU kernels, so this runs without CUDA."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune.deploy.quant_common import BuildContext, Family, MethodUnavailable, relative_error


def _bnb_config(method: str, keep: Sequence[str], dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=list(keep))


def _bnb_dequantized(module: Any) -> Any:
    import bitsandbytes as bnb

    w = module.weight
    if getattr(w, "quant_state", None) is not None:  # Params4bit
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * w.SCB.float()[:, None] / 127.0  # Int8Params: row-wise absmax


def save_bnb(merged_dir: Path, out: Path, method: str, keep: Sequence[str],
             float_model: Any, dtype: Any) -> dict[str, Any]:
    """Load ``merged_dir`` quantised by bitsandbytes on CPU and ``save_pretrained`` it.

    Unquantised modules keep ``dtype`` (the checkpoint's), which is also the NF4 compute dtype.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            merged_dir, quantization_config=_bnb_config(method, keep, dtype), device_map="cpu",
            dtype=dtype, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # any bitsandbytes backend failure means: not here
        raise MethodUnavailable(f"bitsandbytes cannot quantise on this machine: "
                                f"{type(exc).__name__}: {exc}") from exc
    errors = {}
    for n, m in model.named_modules():
        if type(m).__name__ in ("Linear8bitLt", "Linear4bit"):
            errors[n] = relative_error(float_model.get_submodule(n).weight.detach().float(),
                                       _bnb_dequantized(m))
    model.save_pretrained(out)
    return {"quantized_modules": len(errors), "layer_errors": errors}


def _build(method: str, ctx: BuildContext, out: Path) -> dict[str, Any]:
    return save_bnb(ctx.merged_dir, out, method, ctx.keep, ctx.float_model, ctx.dtype)


def _load(method: str, path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from reprotune.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", use_safetensors=True,
                                                 local_files_only=True)
    return model, load_tokenizer(path)


FAMILY = Family(methods=("bnb_int8", "bnb_nf4"), build=_build, load=_load)
